"""Mixtral and its descendants: MiniMax, PhiMoE (experts under block_sparse_moe., w1/w2/w3)."""

from __future__ import annotations

from .model import DepthKey, DepthRules, Doc, ExpertAxis, Layout, MoeLayers, Names, Residual, WidthRules
from .shared import (
    _ATTN,
    _BLOCK_SPARSE_NAMES,
    _COUNT,
    _DEEPSEEK_WRITERS,
    _LAYER_TYPES,
    _LOCAL_COUNTS,
    _MOE_TYPES,
    _SIGMOID_BIAS,
    _fused_neurons,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="mixtral",
        model_types=("mixtral",),
        names=_BLOCK_SPARSE_NAMES,
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(DepthKey("num_hidden_layers", "count"), DepthKey("layer_types", "per_layer"))),
        doc=Doc(routing="softmax over all experts, top-k, renormalised over the k"),
    ),
    Layout(
        name="minimax",
        model_types=("minimax",),
        names=_BLOCK_SPARSE_NAMES,
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        doc=Doc(routing="softmax over all experts, top-k, renormalised over the k"),
    ),
    Layout(
        name="minimax_m2",
        model_types=("minimax_m2",),
        names=Names(
            experts_prefix="block_sparse_moe.experts.",
            router_weights=("block_sparse_moe.gate.weight",),
            router_biases=("block_sparse_moe.e_score_correction_bias",),
            buffers=("block_sparse_moe.e_score_correction_bias",),
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        doc=Doc(routing="sigmoid scores; top-k of score + e_score_correction_bias; always normalised"),
    ),
    Layout(
        name="minimax_m3_vl_text",
        model_types=("minimax_m3_vl_text",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.e_score_correction_bias",),
            buffers=("mlp.gate.e_score_correction_bias",),
        ),
        counts=_LOCAL_COUNTS,
        axes=ExpertAxis(neurons=_fused_neurons("mlp.experts.")),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES)),
        doc=Doc(
            routing=_SIGMOID_BIAS + "; times routed_scaling_factor; plus a shared MLP",
            notes=("a config that gives moe_layer_freq instead of mlp_layer_types is read as all-MoE and "
                   "refused if its tensors disagree",),
        ),
    ),
    Layout(
        name="phimoe",
        model_types=("phimoe",),
        names=_BLOCK_SPARSE_NAMES,
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        width=WidthRules(
            exact_width=False,
            inexact_reason=("sparsemixer routing always picks 2 experts (num_experts_per_tok is not read): after "
                            "duplication the second pick is the first pick's copy and the weights change"),
        ),
        doc=Doc(
            routing=("sparsemixer, hard-wired top-2: the argmax expert, weighted by a softmax masked near the "
                     "max; then the argmax of the rest, likewise"),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "mixtral": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
    "minimax": Residual(refused=(
        "the residual is taken after the input norm (residual = input_layernorm(x)) and scaled by the alpha "
        "factors, so a layer with zeroed outputs still normalises the stream")),
    "minimax_m2": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
    "minimax_m3_vl_text": _DEEPSEEK_WRITERS,
    "phimoe": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
}
