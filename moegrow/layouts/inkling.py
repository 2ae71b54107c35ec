"""Inkling's text decoders (published names under model.llm.)."""

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
    WidthRule,
    WidthRules,
)
from .shared import _ATTN, _COUNT, _FUSED_DOWN, _LAYER_TYPES, _MLP_DOWN, _MOE_TYPES, _SHARED_DOWN

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="inkling2_text",
        model_types=("inkling2_text",),
        names=Names(
            layer_prefix="model.llm.layers.",
            experts_prefix="mlp.experts.",
            # fused [E,2F,H] (gate and up interleaved along dim 1 on load) and [E,H,F]; the MXFP8 release's scales
            # (assumed expert axis first; tested on a hand-built checkpoint only)
            fused_experts=("mlp.experts.w13_weight", "mlp.experts.w2_weight",
                           "mlp.experts.w13_weight_scale", "mlp.experts.w2_weight_scale"),
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.bias",),  # the correction bias (e_score_correction_bias once loaded)
            buffers=("mlp.gate.bias",),
        ),
        counts=Counts(experts_keys=("n_routed_experts", "num_local_experts"), top_k_keys=("num_experts_per_tok",)),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES),
            depth_refused=("the attention-residual queries are layer-indexed tensors outside the layers "
                           "(model.llm.attn_res.attn_queries.{i} belongs to layer i+1, so layer 0 has none, and "
                           "mlp_queries.{i}), which a layer copy cannot renumber or supply, and the attention-residual "
                           "blocks (n_layers_per_attn_res_block) follow each layer's position"),
        ),
        doc=Doc(
            routing=("scoring_func (sigmoid) of the router logits; top-k of score + correction bias (mlp.gate.bias); "
                     "normalised; times route_scale"),
        ),
    ),
    Layout(
        name="inkling_text",
        model_types=("inkling_text",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj",
                           "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.gate.e_score_correction_bias",),
            buffers=("mlp.gate.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=("n_routed_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        axes=ExpertAxis(
            # the router scores routed then shared experts ([E+S] rows); the fused shared experts are [S, ...]
            expert_segments=("n_shared_experts",),
            segment_tensors=(("mlp.shared_experts.gate_proj", 1), ("mlp.shared_experts.up_proj", 1),
                             ("mlp.shared_experts.down_proj", 1)),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES, DepthKey("local_layer_ids", "index_list"))),
        width=WidthRules(
            width_rules=(WidthRule("n_shared_experts", "mul", "the router normalises over routed and shared experts: "
                                   "the shared experts are duplicated too, so every weight halves with its pair"),),
        ),
        doc=Doc(
            routing=("sigmoid (float32); top-k of routed score + e_score_correction_bias; weights = sigmoid of the "
                     "k routed and S shared logits, normalised over all k + S, times route_scale and global_scale; "
                     "the shared experts' outputs are scaled by their weights"),
            notes=("the shared experts are duplicated (n_shared_experts x2) and take --noise like routed copies; "
                   "router rows grow as [E, E copies, S, S copies]",),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    # the short convolutions after each sublayer add nothing to zero (no bias)
    "inkling_text": Residual((_ATTN, _MLP_DOWN, *_FUSED_DOWN, _SHARED_DOWN)),
}
