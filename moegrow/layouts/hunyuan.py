"""Tencent Hunyuan's MoE families."""

from __future__ import annotations

from .model import Counts, DepthKey, DepthRules, Doc, ExpertAxis, Layout, MoeLayers, Names, Residual, WidthRules
from .shared import (
    _ATTN,
    _COUNT,
    _DEEPSEEK_WRITERS,
    _EXPERT_DOWN,
    _LAYER_TYPES,
    _MLP_DOWN,
    _MOE_TYPES,
    _ROUTED,
    _SIGMOID_BIAS,
    _SIGMOID_GROUPS,
    _fused_neurons,
    _group_rules,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.wg.weight",),
            shared_prefix="mlp.shared_mlp.",
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("moe_topk", "num_experts_per_tok"),
        ),
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(
            routing="softmax (float32 gate) over all experts, top-k, renormalised; plus a shared MLP",
            notes=("per-layer num_experts / moe_topk lists are refused",),
        ),
    ),
    Layout(
        name="hy_v3",
        model_types=("hy_v3",),
        names=Names(
            shared_prefix="mlp.shared_mlp.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.router.gate.weight",),
            router_biases=("mlp.expert_bias",),
            buffers=("mlp.expert_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("num_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types", default_dense=1),
        depth=DepthRules(depth_keys=(_COUNT, _MOE_TYPES)),
        doc=Doc(
            routing=_SIGMOID_BIAS + " (float32); times router_scaling_factor; plus a shared MLP",
            notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
        ),
    ),
    Layout(
        name="hy_v4",
        model_types=("hy_v4",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.e_score_correction_bias",),
            buffers=("mlp.gate.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=_ROUTED,
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        axes=ExpertAxis(neurons=_fused_neurons("mlp.experts.")),
        moe=MoeLayers(
            moe_rule="mlp_layer_types",
            default_dense=1,  # the config class's default mlp_layer_types: one dense layer, then MoE
        ),
        depth=DepthRules(
            depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES,
                        DepthKey("indexer_types", "per_layer_reuse", reuses="shared")),
        ),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; plus shared experts (with hyper-connections)",
            notes=("indexer_types 'shared' layers reuse the top-k of the nearest earlier 'full' layer: a depth map "
                   "is refused where a copied shared layer would reuse anything but a copy of its original's "
                   "full layer (interposition and stacking keep the pattern)",),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "hunyuan_v1_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, "mlp.shared_mlp.down_proj")),
    "hy_v3": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, "mlp.shared_mlp.down_proj")),
    # hyper-connections without the comb mix: out = post * f + input streams
    "hy_v4": _DEEPSEEK_WRITERS,
}
