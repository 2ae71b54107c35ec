"""Per-family knowledge, as data: one `Layout` entry per MoE model family.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
Adding a family is adding an entry to its lineage's module; no other module branches on model_type.

Modules:
  model.py      the dataclasses (`Layout`, `DepthKey`, `WidthRule`, `TensorRule`, `Residual`, `Wrapper`), `lookup`
  shared.py     constants and rule builders several lineages share (config keys, `_DEEPSEEK_PARTS`, `_group_rules`)
  mixtral.py, qwen.py, olmo.py, deepseek.py, deepseek_kin.py, hunyuan.py, granite.py, hybrid.py, inkling.py,
  other.py      the families, one module per lineage: each family's `Layout` and, beside it, its `Residual`
  families.py   `LAYOUTS` and the families' `RESIDUAL`, gathered from the lineage modules
  wrappers.py   `WRAPPERS` (multimodal checkpoints) and the residual writers of wrapper-only decoders
  registry.py   `layout_for`, `as_saved`, `wrapper_of`, `supported_*_types`; the full `RESIDUAL` table

Design note: `Layout`'s parts (not done, on purpose). `Layout` has 40 flat fields, read as `layout.<field>` about
100 times across cli, configs, grow, anatomy, counts, inspection, plan, card and upcycle (files other branches
are editing), and named as strings in `Wrapper.layout_overrides` and in `dataclasses.replace(layout, ...)` calls
(`as_saved`, `_layout_for`, wrappers.py). They fall into cohesive parts, each a frozen dataclass of its own:
  identity    name, model_types, wrapper
  Names       layer_prefix, experts_prefix, fused_experts, router_weights, router_biases, buffers, shared_prefix,
              mtp_prefix (where the tensors are)
  Counts      experts_keys, top_k_keys, shared_experts_keys, layers_keys, layers_list_keys (config aliases)
  ExpertAxis  expert_axis, inner_axis, rows_per_expert_key, expert_segments, segment_tensors, expert_tables
              (how each tensor lays out the expert axis)
  MoeLayers   moe_rule, dense_prefix_key, default_dense, moe_block_types, moe_range, moe_period_key
              (which layers are MoE)
  DepthRules  depth_keys, depth_refused, depth_refused_keys, not_in_first_layer, index_dependent_layers
              (and `Residual`, now a table)
  WidthRules  width_rules, tensor_rules, exact_width, inexact_reason, width_refused
  Doc         routing, notes
New knowledge goes in as a part, not as more flat fields: quantisation (the scale suffixes `_KEEP_SUFFIXES`,
block shapes, which tensors carry scales) would be a `Quant` part; neuron axes for re-initialisation a part of
ExpertAxis. The path without a flag day: give `Layout` the parts as properties built from the flat fields, move
readers over module by module as their files fall quiet, then make the parts the fields (entries written as
`names=Names(...)`) and keep the flat names as read-only properties until no reader uses them.
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
