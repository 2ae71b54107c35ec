"""Families with no relatives among the others (one lineage each)."""

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
    TensorRule,
    WidthRule,
    WidthRules,
)
from .shared import (
    _ATTN,
    _COUNT,
    _DEEPSEEK_WRITERS,
    _EXPERT_DOWN,
    _FUSED_DOWN,
    _HALVED_WHEN_RAW,
    _LAYER_TYPES,
    _LOCAL_COUNTS,
    _MLP_DOWN,
    _MLP_NAMES,
    _MLP_TYPES,
    _MOE_TYPES,
    _NUM_COUNTS,
    _NUM_DENSE,
    _RAW_SIGMOID,
    _SHARED1_DOWN,
    _SHARED_DOWN,
    _SIGMOID_BIAS,
    _SOFTMAX_TOPK,
    _fused_neurons,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="mellum",
        model_types=("mellum",),
        names=_MLP_NAMES,
        counts=_LOCAL_COUNTS,
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES)),
        doc=Doc(
            routing=_SOFTMAX_TOPK,
            notes=("MTP layers (num_nextn_predict_layers, mtp_layer_types) are not laid out by "
                   "transformers' save_pretrained and are not handled.",),
        ),
    ),
    Layout(
        name="gpt_oss",
        model_types=("gpt_oss",),
        names=Names(
            experts_prefix="mlp.experts.",
            # gate/up interleaved in the last dim of gate_up_proj: duplication along axis 0 keeps it
            fused_experts=tuple(f"mlp.experts.{n}" for n in (
                "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias",
                "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")),
            router_weights=("mlp.router.weight",),
            router_biases=("mlp.router.bias",),
        ),
        counts=_LOCAL_COUNTS,
        axes=ExpertAxis(neurons=(("mlp.experts.gate_up_proj", 2, "interleaved"), ("mlp.experts.down_proj", 1, ""))),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        doc=Doc(
            routing="router logits with a bias; top-k of the logits, softmax over the k",
            notes=("The Hub release's MXFP4 experts (*_blocks / *_scales, uint8, expert axis first) are "
                   "duplicated byte for byte like the others but cannot take --noise (refused, naming the tensor).",),
        ),
    ),
    Layout(
        name="afmoe",
        model_types=("afmoe",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.router.gate.weight",),
            router_biases=("mlp.expert_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("num_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="first_k_dense", dense_prefix_key="num_dense_layers"),
        depth=DepthRules(depth_keys=(_COUNT, _NUM_DENSE, _LAYER_TYPES)),
        doc=Doc(
            routing=_SIGMOID_BIAS + " (block-level mlp.expert_bias); times route_scale; plus shared experts",
            notes=("a config without layer_types derives it from global_attn_every_n_layers, which a "
                   "layer map does not follow",),
        ),
    ),
    Layout(
        name="laguna",
        model_types=("laguna",),
        names=Names(
            shared_prefix="mlp.shared_expert.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.experts.e_score_correction_bias",),  # saved under experts, not the gate
        ),
        counts=_NUM_COUNTS,
        moe=MoeLayers(moe_rule="mlp_layer_types", default_dense=1),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES, DepthKey("num_attention_heads_per_layer", "per_layer")),
        ),
        doc=Doc(
            routing=("optional tanh softcap of the logits; " + _SIGMOID_BIAS + "; times "
                     "moe_routed_scaling_factor; plus a shared expert"),
        ),
    ),
    Layout(
        name="aria_text",
        model_types=("aria_text",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            # stored in x out ([E,H,2F], [E,F,H]); the expert axis is still 0
            fused_experts=("mlp.experts.fc1.weight", "mlp.experts.fc2.weight"),
            router_weights=("mlp.router.weight",),
        ),
        counts=Counts(
            experts_keys=("moe_num_experts", "num_experts", "num_local_experts"),
            top_k_keys=("moe_topk", "num_experts_per_tok"),
            shared_experts_keys=("moe_num_shared_experts",),
        ),
        depth=DepthRules(depth_keys=(_COUNT,)),
        doc=Doc(routing="top-k of the router logits, softmax over the k; plus shared experts"),
    ),
    Layout(
        name="llama4_text",
        model_types=("llama4_text",),
        names=Names(
            experts_prefix="feed_forward.experts.",
            fused_experts=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
            router_weights=("feed_forward.router.weight",),
            shared_prefix="feed_forward.shared_expert.",
        ),
        counts=_LOCAL_COUNTS,
        axes=ExpertAxis(
            neurons=(("feed_forward.experts.gate_up_proj", 2, "halves"), ("feed_forward.experts.down_proj", 1, "")),
        ),
        moe=MoeLayers(moe_rule="moe_layer_list"),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("no_rope_layers", "per_layer"),
                        DepthKey("moe_layers", "index_list")),
        ),
        width=WidthRules(
            tensor_rules=(TensorRule("feed_forward.experts.down_proj",
                                     "a selected pair (original and copy) gets the same input scale each, so "
                                     "the pair's output would double, and no config key can absorb the factor"),),
        ),
        doc=Doc(
            routing=("top-k of the router logits; sigmoid of the k selected logits scales each expert's "
                     "input (not its output); plus an always-on shared expert"),
            notes=("width growth halves every expert's down projection (originals included): originals are "
                   "not byte-identical",),
        ),
    ),
    Layout(
        name="kolibri1",
        model_types=("kolibri1",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            # the correction bias is saved outside the MoE block (transformers renames it on load)
            router_biases=("moe.router.expert_bias",),
            buffers=("moe.router.expert_bias",),
            shared_prefix="mlp.shared_experts.",
        ),
        counts=_LOCAL_COUNTS,
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES)),
        width=WidthRules(
            tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID, when=(("norm_topk_prob", False),),
                                     defaults=(("norm_topk_prob", False),)),),
        ),
        doc=Doc(
            routing=("top-k of the raw router logits + expert_bias; weights = sigmoid of the selected "
                     "logits, normalised only when norm_topk_prob (default false); plus a shared expert"),
            notes=(_HALVED_WHEN_RAW + " (the default)",),
        ),
    ),
    Layout(
        name="cohere2_moe",
        model_types=("cohere2_moe",),
        names=Names(
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            shared_prefix="mlp.shared_experts.",
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("num_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES)),
        width=WidthRules(
            tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID,
                                     when=(("expert_selection_fn", "sigmoid"), ("norm_topk_prob", False)),
                                     defaults=(("expert_selection_fn", "softmax"), ("norm_topk_prob", True))),),
        ),
        doc=Doc(
            routing=("top-k of the router logits; softmax over the k (expert_selection_fn softmax), or "
                     "sigmoid of the k, normalised when norm_topk_prob; plus shared experts, summed or "
                     "averaged with the routed output"),
            notes=(_HALVED_WHEN_RAW + " with expert_selection_fn sigmoid",
                   "a config without mlp_layer_types is read as all-MoE (the unsaved first_k_dense_replace "
                   "kwarg defaults to 0) and refused if its tensors disagree"),
        ),
    ),
    Layout(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
            router_biases=("mlp.moe_statics.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=("moe_num_experts", "num_experts"),
            top_k_keys=("moe_k", "num_experts_per_tok"),
            shared_experts_keys=("moe_num_shared_experts",),
        ),
        axes=ExpertAxis(
            expert_axis=(("mlp.moe_statics.e_score_correction_bias", 1),),  # [1, E]
        ),
        moe=MoeLayers(
            moe_rule="layer_range",
            moe_range=(("moe_layer_start_index", 1), ("moe_layer_end_index", -1), ("moe_layer_interval", 1)),
        ),
        depth=DepthRules(depth_keys=(_COUNT, DepthKey("moe_layer_start_index", "moe_range"))),
        width=WidthRules(
            tensor_rules=(TensorRule("mlp.moe_statics.e_score_correction_bias",
                                     "the correction bias is added to softmax probabilities, which halve with "
                                     "twice the experts; the bias must halve with them to keep the selection"),),
        ),
        doc=Doc(
            routing=("softmax (float32) over all experts; top-k of probabilities + e_score_correction_bias; "
                     "weights = probabilities / clamp(sum, moe_norm_min); plus shared experts"),
            notes=("width growth halves the correction bias (originals included): originals are not byte-identical",
                   "the MoE layers are a range (start, end, interval): stacking a model with a dense first layer "
                   "cannot be expressed and is refused"),
        ),
    ),
    Layout(
        name="longcat_flash",
        model_types=("longcat_flash",),
        names=Names(
            mtp_prefix="model.mtp.",  # Hub MTP block (dense MLP): kept out of depth growth and parameter counts
            experts_prefix="mlp.experts.",
            router_weights=("mlp.router.classifier.weight",),
            router_biases=("mlp.router.classifier.bias", "mlp.router.e_score_correction_bias"),
            buffers=("mlp.router.e_score_correction_bias",),
        ),
        counts=Counts(
            layers_keys=("num_layers",),  # each layer holds two attention blocks and two dense MLPs
            experts_keys=("n_routed_experts", "num_local_experts"),
            top_k_keys=("moe_topk", "num_experts_per_tok"),
        ),
        axes=ExpertAxis(
            # router rows and gate/up slots: n_routed_experts routed, then zero_expert_num identity experts
            expert_segments=("zero_expert_num",),
        ),
        depth=DepthRules(depth_keys=(DepthKey("num_layers", "count"),)),
        width=WidthRules(
            width_rules=(WidthRule("zero_expert_num", "mul", "zero (identity) experts are duplicated with the routed "
                                   "ones: a selected pair of copies weighs as much as the original"),),
            tensor_rules=(TensorRule("mlp.router.e_score_correction_bias",
                                     "the correction bias is added to softmax probabilities, which halve with "
                                     "twice the experts; the bias must halve with them to keep the selection"),),
        ),
        doc=Doc(
            routing=("softmax (float32) over routed + zero (identity) experts; top-k of probabilities + "
                     "e_score_correction_bias; weights = probabilities x routed_scaling_factor (not renormalised)"),
            notes=("router rows, correction bias and gate/up slots are [routed, zero] and grow segment by segment: "
                   "[E, E copies, Z, Z copies]",
                   "width growth halves the correction bias (originals included): originals are not byte-identical"),
        ),
    ),
    Layout(
        name="dbrx",
        model_types=("dbrx",),
        names=Names(
            layer_prefix="transformer.blocks.",
            experts_prefix="ffn.experts.mlp.",
            # 2-D [E*F, H] each (w2 transposed): expert e is rows e*F .. (e+1)*F - 1, F = ffn_hidden_size
            fused_experts=("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"),
            router_weights=("ffn.router.layer.weight",),
        ),
        counts=Counts(
            layers_keys=("n_layers", "num_hidden_layers"),
            experts_keys=("ffn_config.moe_num_experts",),
            top_k_keys=("ffn_config.moe_top_k",),
        ),
        axes=ExpertAxis(rows_per_expert_key="ffn_config.ffn_hidden_size"),
        depth=DepthRules(depth_keys=(DepthKey("n_layers", "count"),)),
        width=WidthRules(
            tensor_rules=(TensorRule("ffn.experts.mlp.w2", "top-k weights divided by their p-norm with p != 1 make a "
                                     "selected pair weigh 2^(1-1/p) times the original",
                                     p_norm_key="ffn_config.moe_normalize_expert_weights"),),
        ),
        doc=Doc(
            routing=("softmax over all experts; top-k; weights divided by their p-norm, p = "
                     "ffn_config.moe_normalize_expert_weights (default 1; null: not normalised)"),
            notes=("config keys nested in ffn_config (moe_num_experts, moe_top_k, ffn_hidden_size) are read and "
                   "written there",
                   "with moe_normalize_expert_weights p not 1 (nor null), width growth scales every expert's w2 by "
                   "f^(1/p - 1), originals included"),
        ),
    ),
    Layout(
        name="doge",
        model_types=("doge",),
        names=Names(
            experts_prefix="mlp.experts.",
            # product-key experts: one row per expert in two embeddings; the router has 2*sqrt(E) rows
            fused_experts=("mlp.down_embed.weight", "mlp.up_embed.weight"),
            router_weights=(),
        ),
        counts=Counts(experts_keys=("num_experts",), top_k_keys=("num_experts_per_tok",)),
        depth=DepthRules(depth_keys=(_COUNT,)),
        width=WidthRules(
            exact_width=False,
            inexact_reason="product-key routing: the router scores sqrt(E) keys per axis, not experts",
            width_refused=("product-key experts: the router (mlp.router_gate.weight) has 2*sqrt(E) rows, one per "
                           "key, not one per expert, and E must stay a square (2x cannot; 4x would need both key "
                           "sets duplicated and the experts re-indexed, which moegrow's duplication cannot express)"),
        ),
        doc=Doc(
            routing=("product keys: 2 x sqrt(E) key logits, top sqrt(E) per axis, summed over pairs, top-k, "
                     "softmax over the k; a dense MLP runs beside the experts"),
        ),
    ),
    Layout(
        name="gemma4_text",
        model_types=("gemma4_text",),
        names=Names(
            experts_prefix="experts.",
            fused_experts=("experts.gate_up_proj", "experts.down_proj"),
            # the router sits at layer level beside a dense MLP; per_expert_scale [E] multiplies the selected weights
            router_weights=("router.proj.weight",),
            router_biases=("router.per_expert_scale",),
        ),
        counts=Counts(experts_keys=("num_experts",), top_k_keys=("top_k_experts",)),
        axes=ExpertAxis(neurons=_fused_neurons("experts.")),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("per_layer_config", "per_layer_dict"),
                        DepthKey("num_kv_shared_layers", "suffix_count")),
            depth_refused_keys=(("hidden_size_per_layer_input", "the per-layer input embeddings "
                                 "(embed_tokens_per_layer, per_layer_model_projection) hold one slice per layer in "
                                 "one tensor, which a layer copy cannot re-slice"),),
        ),
        doc=Doc(
            routing=("softmax over all experts; top-k; renormalised over the k; times the selected experts' "
                     "per_expert_scale; added to a dense MLP's output"),
            notes=("per_layer_config (per-layer attention overrides, keyed by layer index) follows the layer map",
                   "the last num_kv_shared_layers layers reuse earlier layers' keys and values (and have no k/v "
                   "projections): a map must keep their copies last",
                   "depth growth with per-layer input embeddings (hidden_size_per_layer_input > 0) is refused"),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "mellum": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN)),
    "gpt_oss": Residual((_ATTN, *_FUSED_DOWN)),  # o_proj and down_proj biases too
    "afmoe": _DEEPSEEK_WRITERS,
    "laguna": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
    "aria_text": Residual((_ATTN, _MLP_DOWN, "mlp.experts.fc2", _SHARED_DOWN)),
    "llama4_text": Residual((_ATTN, "feed_forward.down_proj", "feed_forward.experts.down_proj",
                             "feed_forward.shared_expert.down_proj")),
    "kolibri1": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED_DOWN)),  # post-sublayer RMSNorms
    "cohere2_moe": _DEEPSEEK_WRITERS,  # attention and MLP in parallel, both added
    "ernie4_5_moe": _DEEPSEEK_WRITERS,
    "longcat_flash": Residual(("self_attn.*.o_proj", "mlps.*.down_proj", _EXPERT_DOWN, *_FUSED_DOWN),
                              refused_keys=(("zero_expert_num", "zero-computation experts add their input, "
                                             "times its routing weight, to the stream; no zeroed tensor removes "
                                             "it"),)),
    "dbrx": Residual(("norm_attn_norm.attn.out_proj", "ffn.experts.mlp.w2")),
    "doge": Residual(refused=(
        "the residual is scaled by learned weights (input_residual, post_attention_residual), so a layer with "
        "zeroed outputs is not the identity")),
    "gemma4_text": Residual(
        (_ATTN, _MLP_DOWN, "experts.down_proj"), ones=("layer_scalar",),
        refused_keys=(("num_kv_shared_layers", "the last layers reuse the keys and values of the last earlier "
                       "layer of their type, which would be an added copy that sees another input"),)),
}
