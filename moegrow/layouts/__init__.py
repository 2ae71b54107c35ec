"""Per-family knowledge, as data: one `Layout` entry per MoE model family.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
Adding a family is adding an entry here; no other module branches on model_type.

Modules:
  model.py      the dataclasses (`Layout`, `DepthKey`, `WidthRule`, `TensorRule`, `Residual`, `Wrapper`), `lookup`
  shared.py     constants and rule builders several lineages share (config keys, `_DEEPSEEK_PARTS`, `_group_rules`)
  mixtral.py, qwen.py, olmo.py, deepseek.py, deepseek_kin.py, hunyuan.py, granite.py, hybrid.py, inkling.py,
  other.py      the families, one module per lineage: each family's `Layout` and, beside it, its `Residual`
  families.py   `LAYOUTS` and the families' `RESIDUAL`, gathered from the lineage modules
  wrappers.py   `WRAPPERS` (multimodal checkpoints) and the residual writers of wrapper-only decoders
  registry.py   `layout_for`, `as_saved`, `wrapper_of`, `supported_*_types`; the full `RESIDUAL` table
"""

from __future__ import annotations

from .model import DepthKey, Layout, Residual, TensorRule, WidthRule, Wrapper, lookup
from .registry import (
    LAYOUTS,
    RESIDUAL,
    WRAPPERS,
    as_saved,
    layout_for,
    supported_model_types,
    supported_wrapper_types,
    wrapper_of,
)

__all__ = [
    "LAYOUTS", "RESIDUAL", "WRAPPERS", "DepthKey", "Layout", "Residual", "TensorRule", "WidthRule", "Wrapper",
    "as_saved", "layout_for", "lookup", "supported_model_types", "supported_wrapper_types", "wrapper_of",
]
