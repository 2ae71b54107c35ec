"""AllenAI's OLMo MoE families."""

from __future__ import annotations

from .model import DepthKey, DepthRules, Doc, Layout, Residual
from .shared import _ATTN, _COUNT, _EXPERT_DOWN, _MLP_NAMES, _NUM_COUNTS, _SOFTMAX_TOPK

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="olmoe",
        model_types=("olmoe",),
        names=_MLP_NAMES,
        counts=_NUM_COUNTS,
        depth=DepthRules(depth_keys=(DepthKey("num_hidden_layers", "count"),)),
        doc=Doc(routing=_SOFTMAX_TOPK),
    ),
    Layout(
        name="flex_olmo",
        model_types=("flex_olmo",),
        names=_MLP_NAMES,
        counts=_NUM_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(routing=_SOFTMAX_TOPK),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "olmoe": Residual((_ATTN, _EXPERT_DOWN)),
    "flex_olmo": Residual((_ATTN, _EXPERT_DOWN)),  # olmo2 post-sublayer RMSNorms
}
