"""Per-family knowledge, as data: one `Layout` entry per MoE model family.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
Adding a family is adding an entry to its lineage's module; no other module branches on model_type.

A `Layout` is a family's identity (`name`, `model_types`, `wrapper`) and its parts, each a frozen dataclass
(model.py), written in an entry as `names=Names(...)`; entries that share a part name it by alias
(`_DEEPSEEK_NAMES`, `_LOCAL_COUNTS`, `_MLP_NAMES`... in shared.py), as transformers' conversion_mapping shares rules:
  names   `Names`       layer_prefix, experts_prefix, fused_experts, router_weights, router_biases, buffers,
                        shared_prefix, mtp_prefix (where the tensors are)
  counts  `Counts`      experts_keys, top_k_keys, shared_experts_keys, layers_keys, layers_list_keys (config aliases)
  axes    `ExpertAxis`  expert_axis, inner_axis, rows_per_expert_key, expert_segments, segment_tensors,
                        expert_tables, neurons (how each tensor lays out the expert axis; the neuron axes of --reinit)
  moe     `MoeLayers`   moe_rule, dense_prefix_key, default_dense, moe_block_types, moe_range, moe_period_key
                        (which layers are MoE)
  depth   `DepthRules`  depth_keys, depth_refused, depth_refused_keys, not_in_first_layer, index_dependent_layers
                        (the residual writers of --depth-init identity are the `RESIDUAL` table)
  width   `WidthRules`  width_rules, tensor_rules, exact_width, inexact_reason, width_refused
  doc     `Doc`         routing, notes
Readers name the part: `layout.names.layer_prefix`. A derived layout is `layout.with_(layer_prefix=...)`, which
takes a part's field by its own name (`as_saved`, `Wrapper.layout_overrides`, the wrappers' `text_layout`s);
`model.PART_OF` maps each field to its part. New knowledge goes in as a part's field, or a new part.
Quantisation is not per family: a format (moegrow/quant/, `CODECS`) is detected from the checkpoint's
quantization_config and tensor names and applies to any family, so it has no part here.

Modules:
  model.py      the parts, `Layout`, the rules they hold (`DepthKey`, `WidthRule`, `TensorRule`), `Residual`,
                `Wrapper` (multimodal checkpoints), `lookup`
  shared.py     constants, shared parts and rule builders several lineages use (config keys, `_DEEPSEEK_NAMES`,
                `_group_rules`)
  mixtral.py, qwen.py, olmo.py, deepseek.py, deepseek_kin.py, hunyuan.py, granite.py, hybrid.py, inkling.py,
  other.py      the families, one module per lineage: each family's `Layout` and, beside it, its `Residual`
  families.py   `LAYOUTS` and the families' `RESIDUAL`, gathered from the lineage modules
  wrappers.py   `WRAPPERS` (multimodal checkpoints) and the residual writers of wrapper-only decoders
  registry.py   `layout_for`, `as_saved`, `wrapper_of`, `supported_*_types`; the full `RESIDUAL` table
"""

from __future__ import annotations

from .model import (
    Counts,
    DepthKey,
    DepthRules,
    Doc,
    ExpertAxis,
    Layout,
    MoeLayers,
    Names,
    Residual,
    TensorRule,
    WidthRule,
    WidthRules,
    Wrapper,
    lookup,
)
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
    "LAYOUTS", "RESIDUAL", "WRAPPERS", "Counts", "DepthKey", "DepthRules", "Doc", "ExpertAxis", "Layout", "MoeLayers",
    "Names", "Residual", "TensorRule", "WidthRule", "WidthRules", "Wrapper",
    "as_saved", "layout_for", "lookup", "supported_model_types", "supported_wrapper_types", "wrapper_of",
]
