"""Hybrid stacks: layers of several kinds (Mamba, convolution, attention, MoE), picked per layer by a
pattern or a period.
"""

from __future__ import annotations

from .model import Counts, DepthKey, DepthRules, Doc, Layout, MoeLayers, Names, Residual, WidthRule, WidthRules
from .shared import (
    _ATTN,
    _COUNT,
    _LAYER_TYPES,
    _MTP_OUTSIDE,
    _NUM_COUNTS,
    _NUM_DENSE,
    _ROUTED,
    _SIGMOID_GROUPS,
    _group_rules,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        names=Names(
            experts_prefix="feed_forward.experts.",
            router_weights=("feed_forward.gate.weight",),
            router_biases=("feed_forward.expert_bias",),
            buffers=("feed_forward.expert_bias",),
        ),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="first_k_dense", dense_prefix_key="num_dense_layers"),
        depth=DepthRules(depth_keys=(_COUNT, _NUM_DENSE, _LAYER_TYPES)),
        width=WidthRules(
            width_rules=(WidthRule("routed_scaling_factor", "div", "unnormalised sigmoid weights do not "
                                   "halve, so a selected pair would weigh twice", unless="norm_topk_prob"),),
        ),
        doc=Doc(
            routing=("sigmoid scores; top-k of score + expert_bias (when use_expert_bias); normalised "
                     "(sum + 1e-6) when norm_topk_prob; times routed_scaling_factor"),
        ),
    ),
    Layout(
        name="nemotron_h",
        model_types=("nemotron_h",),
        names=Names(
            layer_prefix="backbone.layers.",
            shared_prefix="mixer.shared_experts.",
            experts_prefix="mixer.experts.",
            router_weights=("mixer.gate.weight",),
            router_biases=("mixer.gate.e_score_correction_bias",),
            buffers=("mixer.gate.e_score_correction_bias",),
            mtp_prefix="mtp.",
        ),
        counts=Counts(
            layers_list_keys=("layers_block_type", "hybrid_override_pattern"),
            experts_keys=_ROUTED,
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        moe=MoeLayers(
            moe_rule="block_types",
            moe_block_types=(("layers_block_type", "moe"), ("hybrid_override_pattern", "E")),
        ),
        depth=DepthRules(
            depth_keys=(_COUNT, DepthKey("layers_block_type", "per_layer"),
                        DepthKey("hybrid_override_pattern", "per_layer_chars")),
        ),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; non-gated (relu2) experts; plus shared experts",
            notes=("one block per layer (mamba, attention, MoE or MLP) under mixer.; the layer count is the "
                   "length of layers_block_type (or hybrid_override_pattern); num_hidden_layers, when "
                   "present, is rewritten too",
                   _MTP_OUTSIDE,),
        ),
    ),
    Layout(
        name="zaya",
        model_types=("zaya",),
        names=Names(
            experts_prefix="mlp.experts.",
            fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            # mlp.gate.router_mlp.out_proj.weight and mlp.gate.balancing_biases have E+1 rows (the last is the
            # skip class): not router rows in moegrow's sense, so width growth is refused
            router_weights=(),
        ),
        counts=_NUM_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES), not_in_first_layer=("mlp.gate.router_states_scale",)),
        width=WidthRules(
            exact_width=False,
            inexact_reason=("top-k is validated == 1 (a copied pair cannot both be picked), and the skip class, "
                            "not duplicated, keeps its share of the softmax"),
            width_refused=("the router's last row (mlp.gate.router_mlp.out_proj.weight, mlp.gate.balancing_biases: "
                           "E+1 rows) is a skip class that must stay after the copies, and top-k must stay 1: "
                           "moegrow's duplication cannot express this"),
        ),
        doc=Doc(
            routing=("a router MLP (fed the previous layer's router state) gives E+1 classes, the last a skip "
                     "class; softmax; top-1 of probabilities + balancing_biases; the skip class gets weight 0"),
        ),
    ),
    Layout(
        name="jamba",
        model_types=("jamba",),
        names=Names(experts_prefix="feed_forward.experts.", router_weights=("feed_forward.router.weight",)),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="period", moe_period_key="expert_layer_period"),
        depth=DepthRules(
            depth_keys=(_COUNT, DepthKey("expert_layer_period", "period", "expert_layer_offset", (2, 1)),
                        DepthKey("attn_layer_period", "period", "attn_layer_offset", (8, 4))),
        ),
        doc=Doc(
            routing="softmax over all experts, top-k, weights not renormalised",
            notes=("MoE layers are every expert_layer_period-th from expert_layer_offset and attention layers every "
                   "attn_layer_period-th from attn_layer_offset: a depth map is refused unless one period / offset "
                   "pair says each new set (stacking works when the layer count is a multiple of both periods; "
                   "interposition only with period 1)",),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "lfm2_moe": Residual(("conv.out_proj", "self_attn.out_proj", "feed_forward.w2", "feed_forward.experts.*.w2",
                          "feed_forward.experts.down_proj")),
    "nemotron_h": Residual(("mixer.o_proj", "mixer.out_proj", "mixer.down_proj", "mixer.experts.*.down_proj",
                            "mixer.shared_experts.down_proj")),  # one mixer a layer: attention, Mamba, MLP or MoE
    "zaya": Residual(refused=(
        "the residual is scaled and shifted (post_*_residual_scale) and each router takes the previous "
        "layer's router state, so a layer with zeroed outputs is not the identity")),
    "jamba": Residual((_ATTN, "mamba.out_proj", "feed_forward.down_proj", "feed_forward.experts.*.down_proj")),
}
