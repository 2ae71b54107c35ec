"""Other vendors' families built on DeepSeek-V3's MoE block.

Its tensor names and count keys (`_DEEPSEEK_NAMES`, `_DEEPSEEK_COUNTS`) and group-limited sigmoid routing
(`_group_rules`), with their own layer-indexed keys.
"""

from __future__ import annotations

from .model import Counts, DepthKey, DepthRules, Doc, Layout, MoeLayers, Names, Residual, WidthRules
from .shared import (
    _COUNT,
    _DEEPSEEK_COUNTS,
    _DEEPSEEK_NAMES,
    _DEEPSEEK_WRITERS,
    _EXPERT_DOWN,
    _FIRST_K,
    _FIRST_K_INFO,
    _LAYER_TYPES,
    _MLP_DOWN,
    _MLP_TYPES,
    _MOE_TYPES,
    _ROUTED,
    _SHARED_DOWN,
    _SIGMOID_GROUPS,
    _group_rules,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="dots1",
        model_types=("dots1",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(moe_rule="first_k_dense"),
        depth=DepthRules(depth_keys=(_COUNT, _FIRST_K, _LAYER_TYPES, DepthKey("max_window_layers", "prefix_count"))),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + "; plus shared experts"),
    ),
    Layout(
        name="solar_open",
        model_types=("solar_open",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + "; plus shared experts"),
    ),
    Layout(
        name="exaone_moe",
        model_types=("exaone_moe",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.e_score_correction_bias",),
            buffers=("mlp.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("num_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + " (correction bias at block level); plus shared experts"),
    ),
    Layout(
        name="mimo_v2_flash",
        model_types=("mimo_v2_flash",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.e_score_correction_bias",),
            buffers=("mlp.gate.e_score_correction_bias",),
        ),
        counts=Counts(experts_keys=_ROUTED, top_k_keys=("num_experts_per_tok",)),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS),
    ),
    Layout(
        name="axk1",
        model_types=("axk1",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(
            moe_rule="mlp_layer_types",
            default_dense=1,  # the unsaved first_k_dense_replace kwarg's default
        ),
        depth=DepthRules(depth_keys=(_COUNT, _MOE_TYPES)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + "; plus shared experts; a post-MoE RMSNorm"),
    ),
    Layout(
        name="axk2",
        model_types=("axk2",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(moe_rule="mlp_layer_types", default_dense=1),
        depth=DepthRules(depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + " (n_group may be null: no groups); plus shared experts"),
    ),
    Layout(
        name="beam",
        model_types=("beam",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.e_score_correction_bias",),
            buffers=("mlp.gate.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts", "n_routed_experts"),
            top_k_keys=("num_experts_per_tok",),
        ),
        moe=MoeLayers(
            moe_rule="mlp_layer_types",
            default_dense=3,  # a config without mlp_layer_types has min(3, L) dense layers
        ),
        depth=DepthRules(
            depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES),
            index_dependent_layers="residual adds are scaled by the layer's index (1/sqrt(2(l+1)))",
        ),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + " (the scaling applied to the block output)"),
    ),
    Layout(
        name="bailing_hybrid",
        model_types=("bailing_hybrid",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.expert_bias",),
            buffers=("mlp.gate.expert_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts", "n_routed_experts"),
            top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
            shared_experts_keys=("num_shared_experts", "n_shared_experts"),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _MOE_TYPES, _FIRST_K_INFO, _LAYER_TYPES)),
        width=WidthRules(
            width_rules=_group_rules(n_group=("num_expert_group", "n_group"),
                                     norm=("moe_renormalize", "norm_topk_prob")),
        ),
        doc=Doc(
            routing=_SIGMOID_GROUPS + " (num_expert_group, moe_renormalize; bias saved as gate.expert_bias); "
                    "plus shared experts",
            notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",
                   "a config without layer_types derives it from layer_group_size, which a layer map does "
                   "not follow",),
        ),
    ),
    Layout(
        name="dots3_note_text",
        model_types=("dots3_note_text",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(
            moe_rule="mlp_layer_types",
            default_dense=1,  # the unsaved first_k_dense_replace kwarg's default
        ),
        depth=DepthRules(depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES, DepthKey("per_layer_config", "per_layer_dict"))),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; plus shared experts",
            notes=("per_layer_config (the sliding-attention layers' attention shapes, keyed by layer index) follows "
                   "the layer map",),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "dots1": _DEEPSEEK_WRITERS,
    "solar_open": _DEEPSEEK_WRITERS,
    "exaone_moe": _DEEPSEEK_WRITERS,
    "mimo_v2_flash": _DEEPSEEK_WRITERS,
    "axk1": _DEEPSEEK_WRITERS,
    "axk2": _DEEPSEEK_WRITERS,
    "beam": Residual(refused=(
        "the k-th residual add scales the stream by sqrt((k-1)/k) (depth-scaled residuals), so no layer is "
        "x + f(x), and moving the originals to new depths rescales them")),
    "bailing_hybrid": Residual(("attention.dense", _MLP_DOWN, _EXPERT_DOWN, _SHARED_DOWN)),
    "dots3_note_text": _DEEPSEEK_WRITERS,
}
