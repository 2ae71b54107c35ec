"""Multimodal checkpoints whose text decoder is a supported family (`Wrapper` entries): the decoder grows,
the rest (vision towers, projectors, their config keys) is copied."""

from __future__ import annotations

from .families import LAYOUTS
from .model import DepthKey, Layout, Residual, Wrapper
from .shared import _ATTN, _COUNT, _DEEPSEEK_WRITERS, _EXPERT_DOWN, _FUSED_DOWN, _MLP_DOWN, _MOE_TYPES

# Multimodal checkpoints whose text decoder is one of the families above: the decoder grows, the rest is copied.
WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper(("llama4",), "text_config", "language_model.model.layers."),
    Wrapper(("qwen3_5_moe",), "text_config", "model.language_model.layers."),
    Wrapper(("aria",), "text_config", "language_model.model.layers."),
    # MiniMaxM3SparseForConditionalGeneration saves the Hub names (block_sparse_moe., experts per expert
    # w1/w2/w3), which its conversion mapping fuses into the text class's mlp.experts.gate_up_proj on load
    Wrapper(("minimax_m3_vl",), "text_config", "language_model.model.layers.", layout_overrides=(
        ("experts_prefix", "block_sparse_moe.experts."),
        ("fused_experts", ()),
        ("shared_prefix", "block_sparse_moe.shared_experts."),
        ("router_weights", ("block_sparse_moe.gate.weight",)),
        ("router_biases", ("block_sparse_moe.e_score_correction_bias",)),
        ("buffers", ("block_sparse_moe.e_score_correction_bias",)),
    )),
    Wrapper(("gemma4",), "text_config", "model.language_model.layers."),
    Wrapper(("qwen4_exp",), "text_config", "model.language_model.layers."),
    # save_pretrained writes the published layout: the decoder at the top (model.layers.), the towers beside it
    Wrapper(("dots3_note",), "text_config", "model.layers."),
    # the text model's own prefix; depth growth is refused as for inkling2_text (attention-residual queries)
    Wrapper(("inkling2",), "text_config", "model.llm.layers."),
    # the published (sglang) names: fused w13 / w2 experts and shared experts, correction bias `gate.bias`
    Wrapper(("inkling_mm_model",), "text_config", "model.llm.layers.", layout_overrides=(
        ("fused_experts", ("mlp.experts.w13_weight", "mlp.experts.w2_weight", "mlp.shared_experts.shared_w13_weight",
                           "mlp.shared_experts.shared_w2_weight")),
        ("segment_tensors", (("mlp.shared_experts.shared_w13_weight", 1), ("mlp.shared_experts.shared_w2_weight", 1))),
        ("router_biases", ("mlp.gate.bias",)),
        ("buffers", ("mlp.gate.bias",)),
    )),
    Wrapper(("kimi_k25",), "text_config", "language_model.model.layers.",
            alt_prefixes=("language_model.model.blocks.",)),
)

# -- Multimodal MoE releases whose text decoder has no causal-LM class of its own (issue 10, item 5) -----------
# Each decoder's layout lives in its wrapper (`Wrapper.text_layout`): it is not a standalone family.


def _family(name: str) -> Layout:
    return next(lay for lay in LAYOUTS if lay.name == name)


WRAPPERS += (
    # fused experts `mlp.experts.gate_up_proj` / `down_proj` (expert axis first; the Hub release stores the last two
    # dims transposed, which transformers' conversion reads back), `mlp.gate`; qwen3_moe routing, always normalised
    Wrapper(("qwen3_vl_moe",), "text_config", "model.language_model.layers.", text_layout=_family("qwen3_moe").with_(
        name="qwen3_vl_moe_text", model_types=("qwen3_vl_moe_text",),
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        routing="softmax over all experts, top-k, always renormalised over the k (no norm_topk_prob key)"),
        depth_keys=(DepthKey("vision_config.deepstack_visual_indexes", "positional_prefix"),)),
    # the thinker's decoder is qwen3_moe's (per-expert names, norm_topk_prob); the talker's MoE decoder (qwen2_moe-like,
    # under talker.model.layers.) is not grown: one layout grows one decoder, so it is copied untouched with code2wav
    Wrapper(("qwen3_omni_moe",), "thinker_config.text_config", "thinker.model.layers.",
        text_layout=_family("qwen3_moe").with_(name="qwen3_omni_moe_text", model_types=("qwen3_omni_moe_text",)),
        depth_keys=(DepthKey("thinker_config.vision_config.deepstack_visual_indexes", "positional_prefix"),
                    DepthKey("talker_config.accept_hidden_layer", "hidden_index")),
        text_module="thinker"),
    # glm4_moe's decoder (per-expert, `mlp.gate` + correction bias, shared experts, first_k_dense_replace)
    Wrapper(("glm4v_moe",), "text_config", "model.language_model.layers.", text_layout=_family("glm4_moe").with_(
        name="glm4v_moe_text", model_types=("glm4v_moe_text",), notes=())),
    # modality-isolated experts: per layer E text experts then E vision experts, saved per expert as experts.0..2E-1
    # (the text ones first; transformers splits them in half on load); transposed gates [H, E], text `gate.weight`
    # and vision `gate.weight_1`; the correction bias [2, E], a row per modality. Width growth keeps each half whole:
    # experts [text E, text copies, vision E, vision copies], gates and bias doubled along their expert axis 1
    Wrapper(("ernie4_5_vl_moe",), "text_config", "model.layers.", text_layout=_family("ernie4_5_moe").with_(
        name="ernie4_5_vl_moe_text", model_types=("ernie4_5_vl_moe_text",),
        router_weights=("mlp.gate.weight", "mlp.gate.weight_1"),
        expert_axis=(("mlp.gate.weight", 1), ("mlp.gate.weight_1", 1), ("mlp.moe_statics.e_score_correction_bias", 1)),
        inner_axis=("mlp.gate.weight", "mlp.gate.weight_1", "mlp.moe_statics.e_score_correction_bias"),
        expert_segments=("moe_num_experts",),  # the vision experts: as many as the text ones
        routing=("per modality (text tokens: text experts; image / video tokens: vision experts): softmax (float32) "
                 "over the E experts; top-k of probabilities + that modality's e_score_correction_bias row; weights = "
                 "probabilities / clamp(sum, moe_norm_min); plus shared experts"),
        moe_rule="mlp_layer_types", moe_range=(), default_dense=1, depth_keys=(_COUNT, _MOE_TYPES),
        notes=("width growth halves the correction bias (originals included): originals are not byte-identical",)),
        tower_prefixes=("model.vision_model.", "model.resampler_model.")),
)
# -- end of issue 10, item 5 ---------------------------------------------------------------------------------------


# residual writers (see `Residual`) of the decoders that live only in a wrapper, and of wrappers whose
# checkpoints name the decoder's tensors their own way; other wrappers take their text family's entry
RESIDUAL: dict[str, Residual] = {
    # decoders that live only in their wrapper (`Wrapper.text_layout`)
    "qwen3_vl_moe_text": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, *_FUSED_DOWN)),
    "qwen3_omni_moe_text": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, *_FUSED_DOWN)),
    "glm4v_moe_text": _DEEPSEEK_WRITERS,
    "ernie4_5_vl_moe_text": _DEEPSEEK_WRITERS,  # text and vision experts alike
    # wrappers whose checkpoints name the decoder's tensors their own way (layouts.WRAPPERS' layout_overrides)
    "minimax_m3_vl": Residual((_ATTN, _MLP_DOWN, "block_sparse_moe.experts.*.w2",
                               "block_sparse_moe.shared_experts.down_proj")),
    "inkling_mm_model": Residual(("attn.wo_ud", "mlp.w2_md", "mlp.experts.w2_weight",
                                  "mlp.shared_experts.shared_w2_weight")),  # the published (sglang) names
}
