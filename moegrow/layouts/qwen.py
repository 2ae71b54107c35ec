"""Qwen's MoE families, and Qwen-style layouts.

decoder_sparse_step / mlp_only_layers pick the MoE layers; a sigmoid-gated shared expert under
mlp.shared_expert.
"""

from __future__ import annotations

from .model import DepthKey, DepthRules, Doc, Layout, MoeLayers, Names, Residual, TensorRule, WidthRules
from .shared import (
    _ATTN,
    _COUNT,
    _EXPERT_DOWN,
    _HALVED_WHEN_RAW,
    _LAYER_TYPES,
    _MLP_DOWN,
    _MLP_NAMES,
    _MTP_OUTSIDE,
    _NUM_COUNTS,
    _RAW_SIGMOID,
    _SHARED1_DOWN,
    _SOFTMAX_TOPK,
)

_QWEN_DEPTH = (
    DepthKey("num_hidden_layers", "count"),
    DepthKey("layer_types", "per_layer"),
    DepthKey("max_window_layers", "prefix_count"),
    DepthKey("decoder_sparse_step", "sparse_step"),
    DepthKey("mlp_only_layers", "index_list"),
)
_QWEN_LINEAR_WRITERS = (_ATTN, "linear_attn.out_proj", _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_expert.",
        ),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="sparse_step"),
        depth=DepthRules(depth_keys=_QWEN_DEPTH),
        doc=Doc(routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert"),
    ),
    Layout(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        names=_MLP_NAMES,
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="sparse_step"),
        depth=DepthRules(depth_keys=_QWEN_DEPTH),
        doc=Doc(routing=_SOFTMAX_TOPK),
    ),
    Layout(
        name="qwen3_next",
        model_types=("qwen3_next",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_expert.",
            mtp_prefix="mtp.",
        ),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="sparse_step"),
        depth=DepthRules(depth_keys=_QWEN_DEPTH),
        doc=Doc(routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert", notes=(_MTP_OUTSIDE,)),
    ),
    Layout(
        name="qwen3_5_moe_text",
        model_types=("qwen3_5_moe_text",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_expert.",
            mtp_prefix="mtp.",
        ),
        counts=_NUM_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        doc=Doc(
            routing="softmax over all experts, top-k, renormalised; plus a sigmoid-gated shared expert",
            notes=(_MTP_OUTSIDE,),
        ),
    ),
    Layout(
        name="qwen4_exp_text",
        model_types=("qwen4_exp_text",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_expert.",
            mtp_prefix="mtp.",
        ),
        counts=_NUM_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("ple_layer_ids", "ranked_index_list_1based"))),
        doc=Doc(
            routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert (with hyper-connections)",
            notes=(_MTP_OUTSIDE,
                   "a PLE layer's n-gram table sizes and hashing derive from its rank in ple_layer_ids: depth "
                   "maps that copy a PLE layer to another rank (any 2x map) are refused",),
        ),
    ),
    Layout(
        name="flint",
        model_types=("flint",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_expert.",
        ),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="sparse_step"),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("decoder_sparse_step", "sparse_step"),
                        DepthKey("mlp_only_layers", "index_list")),
        ),
        width=WidthRules(
            tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID, when=(("norm_topk_prob", False),),
                                     defaults=(("norm_topk_prob", True),)),),
        ),
        doc=Doc(
            routing=("sigmoid scores; top-k of the scores; normalised when norm_topk_prob (the default); "
                     "plus an ungated shared expert"),
            notes=("a config without mlp_only_layers makes layers 0 and 1 dense (the config class's default)",
                   _HALVED_WHEN_RAW),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "qwen2_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
    "qwen3_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN)),
    "qwen3_next": Residual(_QWEN_LINEAR_WRITERS),
    "qwen3_5_moe_text": Residual(_QWEN_LINEAR_WRITERS),
    # hyper-connections without stream mixing: out = input streams + injection of f (zero when f is)
    "qwen4_exp_text": Residual((*_QWEN_LINEAR_WRITERS, "ple.value_proj")),
    "flint": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
}
