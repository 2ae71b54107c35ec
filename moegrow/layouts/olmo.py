"""AllenAI's OLMo MoE families."""

from __future__ import annotations

from .model import DepthKey, Layout, Residual
from .shared import _ATTN, _COUNT, _EXPERT_DOWN, _SOFTMAX_TOPK

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="olmoe",
        model_types=("olmoe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        depth_keys=(DepthKey("num_hidden_layers", "count"),),
    ),
    Layout(
        name="flex_olmo",
        model_types=("flex_olmo",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        depth_keys=(_COUNT,),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "olmoe": Residual((_ATTN, _EXPERT_DOWN)),
    "flex_olmo": Residual((_ATTN, _EXPERT_DOWN)),  # olmo2 post-sublayer RMSNorms
}
