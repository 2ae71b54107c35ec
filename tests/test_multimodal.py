"""Multimodal checkpoints whose text decoder is a supported MoE family (layouts.WRAPPERS).

The text decoder grows (its config nested under text_config, its layers under the wrapper's
prefix); the vision tower and projector are copied byte for byte. Logits are compared on text-only
input_ids through the multimodal class itself.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from moegrow.layouts import layout_for

from .conftest import COMMON, FAMILIES, TOKENS, built_once, randomise, run, save
from .test_families import FAMILY_CONFIGS

LLAMA4_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=8, intermediate_size_mlp=24, num_hidden_layers=3,
                   num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                   num_experts_per_tok=1, interleave_moe_layer_step=2, max_position_embeddings=64, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2)
LLAMA4_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, image_size=16,
                     patch_size=8, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
QWEN35_TEXT = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                   eos_token_id=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                   shared_expert_intermediate_size=12, linear_num_key_heads=2, linear_num_value_heads=2,
                   linear_key_head_dim=8, linear_value_head_dim=8,
                   layer_types=["linear_attention", "full_attention", "linear_attention"])
QWEN35_VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=4,
                     num_position_embeddings=16)

ARIA_VISION = dict(model_type="idefics3_vision", hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                   num_attention_heads=2, image_size=16, patch_size=8)
MINIMAX_M3_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         image_size=16, patch_size=4)
GEMMA4_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=8, patch_size=4, position_embedding_size=64)
QWEN4_EXP_VISION = QWEN35_VISION
# dots3_note's vision tower has MoE blocks of its own (vision_encoder.blocks.N.mlp.experts): they must stay untouched
DOTS3_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, patch_size=4,
                    adapter_in_dim=16, adapter_out_dim=16, mlp_layer_types=["dense", "sparse"],
                    moe_intermediate_size=8, num_local_experts=2, num_experts_per_tok=1)
DOTS3_AUDIO = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                   adapter_input_size=16, adapter_out_dim=16, downsample_hidden_size=8, feature_size=16)

INKLING2_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                       projection_hidden_dim=16, posemb_grid_size=4, text_hidden_size=16)

INKLING_VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=4)
KIMI_TEXT = {**COMMON, **FAMILIES["deepseek_v3"], "first_k_dense_replace": 0, "model_type": "deepseek_v3",
             "n_routed_experts": 4, "n_group": 2, "topk_group": 1}
KIMI_VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                   pos_emb_height=4, pos_emb_width=4)


# issue 10, item 5: the multimodal MoE releases whose text decoder has no causal-LM class of its own
TINY = {k: COMMON[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                               "pad_token_id", "bos_token_id", "eos_token_id")}
MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1], mrope_interleaved=True)
# moe_intermediate_size 4: gate_up_proj [E, 8, 16] is not square, so a transposed (Hub) layout is told apart
QWEN3_VL_TEXT = dict(TINY, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
                     rope_parameters=MROPE)
# deepstack: visual features added after decoder layers 0 and 1 (interposition cannot keep that: refused)
QWEN3_VL_VISION = dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=4,
                       num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
# partial rotary 0.5 (GLM's): head_dim 16 rotates 8 dims, 4 frequencies split [2, 1, 1]
GLM4V_TEXT = dict(TINY, head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                  n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
                  rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                       mrope_section=[2, 1, 1]))
GLM4V_VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=16, patch_size=4)
# text experts [8] and vision experts [4] wide: a vision expert at a text index fails to load
ERNIE_VL_TEXT = dict(TINY, head_dim=8, moe_num_experts=4, moe_k=2, moe_intermediate_size=[8, 4],
                     moe_num_shared_experts=1,
                     rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2]))
ERNIE_VL_VISION = dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, patch_size=4)
OMNI_TEXT = dict(TINY, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                 rope_parameters=MROPE)
OMNI_VISION = dict(QWEN3_VL_VISION)
OMNI_AUDIO = dict(num_mel_bins=8, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=24, d_model=16,
                  output_dim=16, downsample_hidden_size=8, max_source_positions=16)
# the talker's own MoE decoder (qwen2_moe-like, with a shared expert) is copied untouched; it reads the thinker's
# hidden state after accept_hidden_layer layers (spatial_merge_size: read by the talker, not a config field)
OMNI_TALKER = dict(text_config=dict(TINY, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                                    shared_expert_intermediate_size=12, rope_parameters=MROPE),
                   code_predictor_config=dict(TINY, head_dim=8, num_hidden_layers=1, num_code_groups=2),
                   num_code_groups=2, thinker_hidden_size=16, accept_hidden_layer=2, spatial_merge_size=2)
OMNI_CODE2WAV = dict(codebook_size=16, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                     intermediate_size=24, num_hidden_layers=1, num_quantizers=2, upsample_rates=[2, 2],
                     upsampling_ratios=[2], decoder_dim=16, sliding_window=8)


def omni_config(text: dict, vision: dict) -> transformers.PretrainedConfig:
    thinker = dict(text_config=text, vision_config=vision, audio_config=OMNI_AUDIO)
    return transformers.Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=OMNI_TALKER,
                                           code2wav_config=OMNI_CODE2WAV)


def text_of(family: str, **overrides) -> dict:
    """The text decoder's config: the family's tiny config from test_families (4 experts where it had 8)."""
    return {**COMMON, **FAMILY_CONFIGS[family], **overrides}


# wrapper model_type: (config class, model class, text config, vision config, decoder layer prefix, text family,
#                      MoE layers of the 3-layer source)
CASES = {
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration", LLAMA4_TEXT, LLAMA4_VISION,
               "language_model.model.layers.", "llama4_text", [1]),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", QWEN35_TEXT, QWEN35_VISION,
                    "model.language_model.layers.", "qwen3_5_moe_text", [0, 1, 2]),
    "aria": ("AriaConfig", "AriaForConditionalGeneration", text_of("aria_text"), ARIA_VISION,
             "language_model.model.layers.", "aria_text", [0, 1, 2]),
    "minimax_m3_vl": ("MiniMaxM3VLConfig", "MiniMaxM3SparseForConditionalGeneration", text_of("minimax_m3_vl_text"),
                      MINIMAX_M3_VISION, "language_model.model.layers.", "minimax_m3_vl_text", [1, 2]),
    "gemma4": ("Gemma4Config", "Gemma4ForConditionalGeneration", text_of("gemma4_text"), GEMMA4_VISION,
               "model.language_model.layers.", "gemma4_text", [0, 1, 2]),
    # no PLE layers here (ple_layer_ids refuses every 2x depth map, tested below)
    "qwen4_exp": ("Qwen4ExpConfig", "Qwen4ExpForConditionalGeneration", text_of("qwen4_exp_text", ple_layer_ids=[]),
                  QWEN4_EXP_VISION, "model.language_model.layers.", "qwen4_exp_text", [0, 1, 2]),
    "dots3_note": ("Dots3NoteConfig", "Dots3NoteForConditionalGeneration",
                   text_of("dots3_note_text", n_routed_experts=4, n_group=2, topk_group=1), DOTS3_VISION,
                   "model.layers.", "dots3_note_text", [1, 2]),
    "inkling2": ("Inkling2Config", "Inkling2ForConditionalGeneration", text_of("inkling2_text"), INKLING2_VISION,
                 "model.llm.layers.", "inkling2_text", [0, 1, 2]),
    "inkling_mm_model": ("InklingConfig", "InklingForConditionalGeneration", text_of("inkling_text"), INKLING_VISION,
                         "model.llm.layers.", "inkling_text", [1, 2]),
    # save_pretrained writes the decoder as ...model.blocks.N (Hub checkpoints: ...model.layers.N, tested below)
    "kimi_k25": ("Kimi_K25Config", "Kimi_K25ForConditionalGeneration", KIMI_TEXT, KIMI_VISION,
                 "language_model.model.blocks.", "deepseek_v3", [0, 1, 2]),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", QWEN3_VL_TEXT, QWEN3_VL_VISION,
                     "model.language_model.layers.", "qwen3_vl_moe_text", [0, 1, 2]),
    # the thinker's decoder grows; built by omni_config (thinker_config.text_config), its logits by model.thinker
    "qwen3_omni_moe": (omni_config, "Qwen3OmniMoeForConditionalGeneration", OMNI_TEXT, OMNI_VISION,
                       "thinker.model.layers.", "qwen3_omni_moe_text", [0, 1, 2]),
    "glm4v_moe": ("Glm4vMoeConfig", "Glm4vMoeForConditionalGeneration", GLM4V_TEXT, GLM4V_VISION,
                  "model.language_model.layers.", "glm4v_moe_text", [1, 2]),
    # save_pretrained writes the Hub names: the decoder at model.layers. beside model.vision_model. / resampler_model.
    "ernie4_5_vl_moe": ("Ernie4_5_VLMoeConfig", "Ernie4_5_VLMoeForConditionalGeneration", ERNIE_VL_TEXT,
                        ERNIE_VL_VISION, "model.layers.", "ernie4_5_vl_moe_text", [1, 2]),
}
# where the decoder's config sits, where not at text_config; the submodule giving text logits, where not the model
TEXT_KEY = {"qwen3_omni_moe": "thinker_config.text_config"}
TEXT_MODULE = {"qwen3_omni_moe": "thinker"}
# (wrapper, method): the config key named in the refusal of that 2x depth growth
DEPTH_METHOD_REFUSED = {
    ("qwen3_vl_moe", "interpose"): "vision_config.deepstack_visual_indexes",
    ("qwen3_omni_moe", "interpose"): "thinker_config.vision_config.deepstack_visual_indexes",
    ("glm4v_moe", "stack"): "first_k_dense_replace",
}
# wrappers whose text family refuses every depth growth: (the reason named)
DEPTH_ALWAYS_REFUSED = {"inkling2": "n_layers_per_attn_res_block"}
# other config kwargs a tiny multimodal config needs
EXTRA = {"minimax_m3_vl": dict(projector_hidden_size=16), "dots3_note": dict(audio_config=DOTS3_AUDIO),
         "kimi_k25": dict(projection_hidden_size=16), "inkling_mm_model": dict(audio_config=dict(n_mel_bins=8,
                                                                                                   mel_vocab_size=16))}


def build(case: str, vision_overrides: dict | None = None, **text_overrides):
    config_cls, model_cls, text, vision, *_ = CASES[case]
    text, vision = {**text, **text_overrides}, {**vision, **(vision_overrides or {})}
    if callable(config_cls):
        config = config_cls(text, vision)
    else:
        config = getattr(transformers, config_cls)(text_config=text, vision_config=vision, **EXTRA.get(case, {}))
    torch.manual_seed(0)
    return randomise(getattr(transformers, model_cls)(config))


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A saved checkpoint per wrapper case, built on first use in each worker."""
    return built_once(tmp_path_factory, build)


def mm_logits(folder, case: str, **inputs) -> torch.Tensor:
    """Load through the multimodal class (no missing / unexpected / mismatched keys); text-only logits."""
    model, info = getattr(transformers, CASES[case][1]).from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    model = getattr(model, TEXT_MODULE[case]) if case in TEXT_MODULE else model
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS, **inputs).logits


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def text_key(case: str) -> str:
    return TEXT_KEY.get(case, "text_config")


def text_config(config: dict, case: str) -> dict:
    for part in text_key(case).split("."):
        config = config[part]
    return config


def without_text(config: dict, case: str) -> dict:
    """A copy of a wrapper config without its decoder's config (what growth must leave untouched)."""
    config = json.loads(json.dumps(config))
    *path, last = text_key(case).split(".")
    parent = config
    for part in path:
        parent = parent[part]
    del parent[last]
    return config


def outside_decoder(tensors: dict, prefix: str) -> dict:
    """The tensors that are not the text decoder's layers (vision tower, projector, embeddings...)."""
    return {n: t for n, t in tensors.items() if not n.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_describes_the_text_decoder(case, source):
    *_, prefix, family, moe = CASES[case]
    code, stdout, err = run("inspect", source(case), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert (info["model_type"], info["family"], info["text_config"]) == (case, family, text_key(case))
    assert info["layer_prefix"] == prefix
    assert info["num_layers"] == 3 and info["moe_layers"] == moe and info["num_experts"] == 4
    # parameter counts: the whole checkpoint's, and the language model's alone (decoder + lm_head)
    model = build(case)
    text_model = getattr(model, TEXT_MODULE[case]) if case in TEXT_MODULE else model
    lm = {id(p): p for p in [*text_model.get_decoder().parameters(), *text_model.get_output_embeddings().parameters()]}
    # saved buffers count too (gemma4's layer_scalar, dots3_note's vision router bias), the decoder's router
    # correction biases do not
    saved = model.state_dict()
    buffers = {n: b.numel() for n, b in model.named_buffers()
               if n in saved and not ("language_model" in n and "correction_bias" in n)}
    assert info["total_params"] == model.num_parameters() + sum(buffers.values())
    text_buffers = sum(k for n, k in buffers.items() if "language_model" in n or n.startswith("thinker.model."))
    assert info["text_total_params"] == sum(p.numel() for p in lm.values()) + text_buffers < info["total_params"]
    assert info["active_params"] - info["text_active_params"] == info["total_params"] - info["text_total_params"]
    code, stdout, err = run("inspect", source(case))
    assert code == 0 and "multimodal: text decoder" in stdout, err
    assert f"params (text decoder): {info['text_total_params']:,} total" in stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_width_2x_exact_vision_untouched(case, source, tmp_path, record_property):
    *_, prefix, family, _ = CASES[case]
    src = source(case)
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    before = mm_logits(src, case)
    assert before.abs().max() > 0
    diff = (before - mm_logits(out, case)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    old, new = read_config(src), read_config(out)
    layout = layout_for(old)
    assert (layout.name, layout.num_experts(new)) == (family, 8)
    assert layout.top_k(new) == 2 * layout.top_k(old)
    assert without_text(new, case) == without_text(old, case)
    t_old, t_new = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    kept = outside_decoder(t_old, prefix)
    assert any("vision" in n or "visual" in n for n in kept) and outside_decoder(t_new, prefix).keys() == kept.keys()
    for name, t in kept.items():
        assert t_new[name].numpy().tobytes() == t.numpy().tobytes(), name
    if case == "dots3_note":  # the vision tower's own experts are not the decoder's: not widened
        assert any(n.startswith("vision_encoder.") and ".mlp.experts." in n for n in kept)
    # verify --forward: AutoModelForCausalLM's class for the wrapper, else (aria, minimax_m3_vl, inkling_mm_model,
    # inkling2, kimi_k25, qwen3_vl_moe, glm4v_moe, ernie4_5_vl_moe) the image-text one, else (qwen3_omni_moe) the
    # multimodal-LM class's thinker
    code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


@pytest.mark.parametrize("method", ["interpose", "stack"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_depth_2x_loads_and_runs(case, method, source, tmp_path):
    *_, prefix, _, moe = CASES[case]
    src = source(case)
    out = tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--json", "--quiet")
    refused = DEPTH_ALWAYS_REFUSED.get(case) or DEPTH_METHOD_REFUSED.get((case, method))
    if refused:
        assert code == 2 and refused in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
        return
    assert code == 0, err
    layer_map = [0, 0, 1, 1, 2, 2] if method == "interpose" else [0, 1, 2, 0, 1, 2]
    summary = json.loads(stdout)
    assert summary["layer_map"] == layer_map and summary["layers"] == [3, 6]
    assert any(c.startswith(f"{text_key(case)}.num_hidden_layers: 3 -> 6") for c in summary["config_changes"])
    old, new = text_config(read_config(src), case), text_config(read_config(out), case)
    assert new["num_hidden_layers"] == 6
    for key in ("layer_types", "mlp_layer_types"):
        if old.get(key) is not None:
            assert new[key] == [old[key][m] for m in layer_map], key
    if "moe_layers" in old:
        assert new["moe_layers"] == [j for j, m in enumerate(layer_map) if m in moe]
    assert mm_logits(out, case).isfinite().all()  # loads clean and runs
    t_old, t_new = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for name, t in outside_decoder(t_old, prefix).items():
        assert torch.equal(t_new[name], t), name
    assert run("verify", src, out)[0] == 0


def test_unsupported_text_decoder_is_refused(source, ckpt_copy, tmp_path):
    src = ckpt_copy(source("llama4"))
    config = read_config(src)
    config["text_config"]["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "text_config.model_type 'llama'" in err and len(err.strip().splitlines()) == 1, err


# per-layer inputs held outside the decoder layers: no layer copy can follow them, so depth is refused
DEPTH_REFUSED = {
    "gemma4": (dict(hidden_size_per_layer_input=4, vocab_size_per_layer_input=64), "hidden_size_per_layer_input"),
    "qwen4_exp": (dict(ple_layer_ids=[1, 3]), "ple_layer_ids"),
}


@pytest.mark.parametrize("method", ["interpose", "stack"])
@pytest.mark.parametrize("case", sorted(DEPTH_REFUSED))
def test_depth_refused_with_per_layer_inputs(case, method, tmp_path):
    overrides, reason = DEPTH_REFUSED[case]
    src = save(build(case, **overrides), tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", method)
    assert code == 2 and reason in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture
def kimi_hub(source, ckpt_copy):
    """The save_pretrained kimi_k25 checkpoint renamed as Hub Kimi-K2.5 names its decoder: language_model.model.layers.N
    (transformers' conversion mapping reads them back as ...blocks.N)."""
    from safetensors.torch import save_file

    src = ckpt_copy(source("kimi_k25"))
    tensors = load_file(src / "model.safetensors")
    hub = {k.replace("language_model.model.blocks.", "language_model.model.layers."): t for k, t in tensors.items()}
    assert hub.keys() != tensors.keys()
    save_file(hub, src / "model.safetensors", metadata={"format": "pt"})
    return src


def test_kimi_k25_hub_prefix_width(kimi_hub, tmp_path):
    """Hub Kimi-K2.5 names the decoder language_model.model.layers.N (save_pretrained: ...blocks.N): both grow."""
    code, stdout, err = run("inspect", kimi_hub, "--json")
    assert code == 0 and json.loads(stdout)["layer_prefix"] == "language_model.model.layers.", err
    out = tmp_path / "out"
    code, _, err = run("grow-width", kimi_hub, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    names = load_file(out / "model.safetensors").keys()
    assert "language_model.model.layers.2.mlp.experts.7.up_proj.weight" in names
    assert not any(n.startswith("language_model.model.blocks.") for n in names)
    diff = (mm_logits(kimi_hub, "kimi_k25") - mm_logits(out, "kimi_k25")).abs().max().item()
    assert diff <= 1e-5, diff
    code, _, err = run("verify", kimi_hub, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


def test_kimi_k25_hub_prefix_depth(kimi_hub, tmp_path):
    """Depth 2x under the Hub prefix: the layers are renumbered under the names the checkpoint carries."""
    out = tmp_path / "out"
    code, _, err = run("grow-depth", kimi_hub, out, "--layers", "2x", "--method", "interpose", "--quiet")
    assert code == 0, err
    t_old, t_new = load_file(kimi_hub / "model.safetensors"), load_file(out / "model.safetensors")
    prefix = "language_model.model.layers."
    assert {n.removeprefix(prefix).split(".")[0] for n in t_new if n.startswith(prefix)} == {str(i) for i in range(6)}
    for j, m in enumerate([0, 0, 1, 1, 2, 2]):
        for name, t in t_old.items():
            if name.startswith(f"{prefix}{m}."):
                assert torch.equal(t_new[name.replace(f"{prefix}{m}.", f"{prefix}{j}.", 1)], t), (j, name)
    assert outside_decoder(t_new, prefix).keys() == outside_decoder(t_old, prefix).keys()
    assert mm_logits(out, "kimi_k25").isfinite().all()  # loads clean (no missing / unexpected keys) and runs
    assert run("verify", kimi_hub, out)[0] == 0


def test_inkling_mm_router_segments(source, tmp_path):
    """The published names: router rows [E routed, E copies, S shared, S copies] (the router normalises over routed and
    shared weights), fused shared experts shared_w13 / shared_w2 duplicated whole, correction bias gate.bias [2E]."""
    src = source("inkling_mm_model")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    assert read_config(out)["text_config"]["n_shared_experts"] == 2
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for layer in (1, 2):  # the MoE layers
        p = f"model.llm.layers.{layer}.mlp."
        gate = before[p + "gate.weight"]
        assert gate.shape[0] == 5
        assert torch.equal(after[p + "gate.weight"], torch.cat([gate[:4], gate[:4], gate[4:], gate[4:]]))
        assert torch.equal(after[p + "gate.bias"], torch.cat([before[p + "gate.bias"]] * 2))
        for rel in ("experts.w13_weight", "experts.w2_weight", "shared_experts.shared_w13_weight",
                    "shared_experts.shared_w2_weight"):
            assert torch.equal(after[p + rel], torch.cat([before[p + rel]] * 2)), rel
        assert torch.equal(after[p + "gate.global_scale"], before[p + "gate.global_scale"])


def test_ernie4_5_vl_moe_vision_experts(source, tmp_path, record_property):
    """Modality-isolated experts: experts.0..3 text, 4..7 vision -> 0..7 text (originals, copies), 8..15 vision; the
    transposed gates [H, E] (text gate.weight, vision gate.weight_1) and the bias [2, E] (a row per modality) grow
    along axis 1, the bias halved. Tokens marked as image tokens run the vision experts: exact too."""
    src = source("ernie4_5_vl_moe")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    p = "model.layers.1.mlp."
    for e in range(4):
        for c in range(2):  # text expert e and its copy: text slots 0..7; vision expert e and its copy: 8..15
            up = "up_proj.weight"
            assert torch.equal(after[f"{p}experts.{e + 4 * c}.{up}"], before[f"{p}experts.{e}.{up}"])
            assert torch.equal(after[f"{p}experts.{8 + e + 4 * c}.{up}"], before[f"{p}experts.{4 + e}.{up}"])
    for gate in ("gate.weight", "gate.weight_1"):
        assert before[p + gate].shape == (16, 4)
        assert torch.equal(after[p + gate], torch.cat([before[p + gate]] * 2, dim=1))
    bias = p + "moe_statics.e_score_correction_bias"
    assert torch.equal(after[bias], torch.cat([before[bias] / 2] * 2, dim=1))
    # the second half of the sequence runs the vision experts (moe_mm_token_type_ids 1)
    types = torch.zeros_like(TOKENS)
    types[:, 8:] = 1
    vision = mm_logits(src, "ernie4_5_vl_moe", moe_mm_token_type_ids=types)
    assert (vision - mm_logits(src, "ernie4_5_vl_moe")).abs().max() > 1e-3  # the vision experts matter
    diff = (vision - mm_logits(out, "ernie4_5_vl_moe", moe_mm_token_type_ids=types)).abs().max().item()
    record_property("max_logit_diff_vision_tokens", diff)
    assert diff <= 1e-5, diff


def test_qwen3_omni_moe_talker_reads_the_grown_thinker(tmp_path):
    """talker_config.accept_hidden_layer (the thinker hidden state the talker reads, after its first a layers)
    follows the map: stacking keeps it (the first 3 layers are the source's), interposition doubles it (after the
    copies of the first a layers), a map that keeps neither is refused. One deepstack layer: interposition keeps it
    (new layer 0 is old layer 0). The talker's MoE decoder and code2wav are copied untouched."""
    src = save(build("qwen3_omni_moe", vision_overrides=dict(deepstack_visual_indexes=[0])), tmp_path / "src")
    for method, want in (("interpose", 4), ("stack", 2)):
        out = tmp_path / method
        code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--quiet")
        assert code == 0, err
        assert read_config(out)["talker_config"]["accept_hidden_layer"] == want, method
        assert mm_logits(out, "qwen3_omni_moe").isfinite().all()
    t_old, t_new = load_file(src / "model.safetensors"), load_file(tmp_path / "interpose" / "model.safetensors")
    talker = [n for n in t_old if n.startswith(("talker.", "code2wav."))]
    assert any(".mlp.experts." in n for n in talker) and any(n.startswith("code2wav.") for n in talker)
    for name in talker:
        assert torch.equal(t_new[name], t_old[name]), name
    code, _, err = run("grow-depth", src, tmp_path / "bad", "--layer-map", "0,2,1,2", "--quiet")
    assert code == 2 and "talker_config.accept_hidden_layer" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def test_qwen3_vl_moe_hub_transposed_experts(source, ckpt_copy, tmp_path, record_property):
    """Hub Qwen3-VL-MoE stores the fused experts in x out (gate_up_proj [E, H, 2F], down_proj [E, F, H]; transformers'
    conversion transposes them on load): the expert axis is still 0, so they grow alike."""
    from safetensors.torch import save_file

    src = ckpt_copy(source("qwen3_vl_moe"))
    tensors = load_file(src / "model.safetensors")
    hub = {n: t.transpose(1, 2).contiguous() if n.endswith(("experts.gate_up_proj", "experts.down_proj")) else t
           for n, t in tensors.items()}
    assert hub["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (4, 16, 8)
    save_file(hub, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    grown = load_file(out / "model.safetensors")["model.language_model.layers.0.mlp.experts.gate_up_proj"]
    assert grown.shape == (8, 16, 8)
    before = mm_logits(src, "qwen3_vl_moe")
    assert (before - mm_logits(source("qwen3_vl_moe"), "qwen3_vl_moe")).abs().max() == 0  # read back as saved
    diff = (before - mm_logits(out, "qwen3_vl_moe")).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
