"""AllenAI's OLMo MoE families."""

from __future__ import annotations

from .model import Counts, DepthKey, DepthRules, Doc, Layout, Names, Residual
from .shared import _ATTN, _COUNT, _EXPERT_DOWN, _SOFTMAX_TOPK

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="olmoe",
        model_types=("olmoe",),
        names=Names(experts_prefix="mlp.experts.", router_weights=("mlp.gate.weight",)),
        counts=Counts(experts_keys=("num_experts", "num_local_experts"), top_k_keys=("num_experts_per_tok",)),
        depth=DepthRules(depth_keys=(DepthKey("num_hidden_layers", "count"),)),
        doc=Doc(routing=_SOFTMAX_TOPK),
    ),
    Layout(
        name="flex_olmo",
        model_types=("flex_olmo",),
        names=Names(experts_prefix="mlp.experts.", router_weights=("mlp.gate.weight",)),
        counts=Counts(experts_keys=("num_experts", "num_local_experts"), top_k_keys=("num_experts_per_tok",)),
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(routing=_SOFTMAX_TOPK),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "olmoe": Residual((_ATTN, _EXPERT_DOWN)),
    "flex_olmo": Residual((_ATTN, _EXPERT_DOWN)),  # olmo2 post-sublayer RMSNorms
}
