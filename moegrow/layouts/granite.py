"""IBM Granite's MoE families, and JetMoE, whose MoE block they derive from.

Fused input_linear / output_linear experts (expert axis first) and a router.layer gate.
"""

from __future__ import annotations

from .model import DepthKey, DepthRules, Doc, ExpertAxis, Layout, Names, Residual, WidthRule, WidthRules
from .shared import _ATTN, _COUNT, _LAYER_TYPES, _LOCAL_COUNTS, _fused_neurons

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="granitemoe",
        model_types=("granitemoe",),
        names=Names(
            experts_prefix="block_sparse_moe.experts.",
            fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
            router_weights=("block_sparse_moe.router.layer.weight",),
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(routing="top-k of the router logits, softmax over the k"),
    ),
    Layout(
        name="granitemoeshared",
        model_types=("granitemoeshared",),
        names=Names(
            experts_prefix="block_sparse_moe.experts.",
            fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
            router_weights=("block_sparse_moe.router.layer.weight",),
            shared_prefix="shared_mlp.",
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(routing="top-k of the router logits, softmax over the k; plus a shared MLP"),
    ),
    Layout(
        name="jetmoe",
        model_types=("jetmoe",),
        names=Names(
            experts_prefix="mlp.experts.",  # no per-expert form: every expert tensor is fused, expert axis first
            # MoE MLP experts [E,2F,H] / [E,H,F], and attention experts (MoA: per expert, the query projection
            # [E,kv*d,H] and the output projection [E,H,kv*d]); mlp.bias and self_attention.experts.bias are
            # per-output [H] (added once after the experts), not per-expert
            fused_experts=("mlp.input_linear.weight", "mlp.output_linear.weight",
                           "self_attention.experts.input_linear.weight", "self_attention.experts.output_linear.weight"),
            router_weights=("mlp.router.layer.weight", "self_attention.experts.router.layer.weight"),
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        width=WidthRules(
            width_rules=(WidthRule("num_attention_heads", "top_k", "the attention heads are num_key_value_heads x "
                                   "top-k (one group of query heads per selected attention expert)"),),
        ),
        doc=Doc(
            routing=("top-k of the router logits, softmax over the k, for the MoE MLP and for the attention experts "
                     "(each selected one projects num_key_value_heads query heads and back), which share the expert "
                     "count and top-k"),
            notes=("width growth duplicates the attention experts too; with top-k doubled each token runs twice the "
                   "query heads (a pair of identical heads per original, each weighted half)",),
        ),
    ),
    Layout(
        name="granitemoe_swa",
        model_types=("granitemoe_swa",),
        names=Names(
            experts_prefix="block_sparse_moe.experts.",
            fused_experts=("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
            router_weights=("block_sparse_moe.router.weight",),
            shared_prefix="shared_mlp.",
        ),
        counts=_LOCAL_COUNTS,
        axes=ExpertAxis(neurons=_fused_neurons("block_sparse_moe.experts.")),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("layer_rope_theta", "per_layer"))),
        doc=Doc(routing="top-k of the router logits, softmax over the k; plus a shared MLP"),
    ),
    Layout(
        name="granitemoehybrid",
        model_types=("granitemoehybrid",),
        names=Names(
            experts_prefix="block_sparse_moe.experts.",
            fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
            router_weights=("block_sparse_moe.router.layer.weight",),
            shared_prefix="shared_mlp.",
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        doc=Doc(routing="top-k of the router logits, softmax over the k; plus a shared MLP (mamba / attention layers)"),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    # granite: the sublayer output times residual_multiplier is added (zero stays zero)
    "granitemoe": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj")),
    "granitemoeshared": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj",
                                  "shared_mlp.output_linear")),
    "jetmoe": Residual(("self_attention.experts.output_linear", "self_attention.experts.bias", "mlp.output_linear",
                        "mlp.bias")),  # attention experts and MoE MLP, each with an output bias
    "granitemoe_swa": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj",
                                "shared_mlp.output_linear")),
    "granitemoehybrid": Residual((_ATTN, "mamba.out_proj", "block_sparse_moe.output_linear",
                                  "block_sparse_moe.experts.down_proj", "shared_mlp.output_linear")),
}
