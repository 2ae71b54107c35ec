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

from .conftest import TOKENS, run, save

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

# wrapper model_type: (config class, model class, text config, vision config, decoder layer prefix, text family,
#                      MoE layers of the 3-layer source)
CASES = {
    "llama4": ("Llama4Config", "Llama4ForConditionalGeneration", LLAMA4_TEXT, LLAMA4_VISION,
               "language_model.model.layers.", "llama4_text", [1]),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", QWEN35_TEXT, QWEN35_VISION,
                    "model.language_model.layers.", "qwen3_5_moe_text", [0, 1, 2]),
}


def build(case: str):
    config_cls, model_cls, text, vision, *_ = CASES[case]
    config = getattr(transformers, config_cls)(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "router" in name or "gate" in name else 0.2)
    return model.eval()


_BUILT: dict[str, object] = {}


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    def get(case: str):
        if case not in _BUILT:
            _BUILT[case] = save(build(case), tmp_path_factory.mktemp(case))
        return _BUILT[case]
    return get


def mm_logits(folder, case: str) -> torch.Tensor:
    """Load through the multimodal class (no missing / unexpected / mismatched keys); text-only logits."""
    model, info = getattr(transformers, CASES[case][1]).from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def outside_decoder(tensors: dict, prefix: str) -> dict:
    """The tensors that are not the text decoder's layers (vision tower, projector, embeddings...)."""
    return {n: t for n, t in tensors.items() if not n.startswith(prefix)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_inspect_describes_the_text_decoder(case, source):
    *_, prefix, family, moe = CASES[case]
    code, stdout, err = run("inspect", source(case), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert (info["model_type"], info["family"], info["text_config"]) == (case, family, "text_config")
    assert info["layer_prefix"] == prefix
    assert info["num_layers"] == 3 and info["moe_layers"] == moe and info["num_experts"] == 4
    code, stdout, err = run("inspect", source(case))
    assert code == 0 and "multimodal: text decoder" in stdout, err


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
    ekey = "num_local_experts" if "num_local_experts" in old["text_config"] else "num_experts"
    assert new["text_config"][ekey] == 8
    assert new["text_config"]["num_experts_per_tok"] == 2 * old["text_config"]["num_experts_per_tok"]
    assert {k: v for k, v in new.items() if k != "text_config"} == {k: v for k, v in old.items() if k != "text_config"}
    t_old, t_new = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    kept = outside_decoder(t_old, prefix)
    assert any("vision" in n or "visual" in n for n in kept) and outside_decoder(t_new, prefix).keys() == kept.keys()
    for name, t in kept.items():
        assert t_new[name].numpy().tobytes() == t.numpy().tobytes(), name
    # verify --forward loads the language model alone (AutoModelForCausalLM maps the wrapper to it)
    code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


@pytest.mark.parametrize("method", ["interpose", "stack"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_depth_2x_loads_and_runs(case, method, source, tmp_path):
    *_, prefix, _, moe = CASES[case]
    src = source(case)
    out = tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--json", "--quiet")
    assert code == 0, err
    layer_map = [0, 0, 1, 1, 2, 2] if method == "interpose" else [0, 1, 2, 0, 1, 2]
    summary = json.loads(stdout)
    assert summary["layer_map"] == layer_map and summary["layers"] == [3, 6]
    assert any(c.startswith("text_config.num_hidden_layers: 3 -> 6") for c in summary["config_changes"])
    old, new = read_config(src)["text_config"], read_config(out)["text_config"]
    assert new["num_hidden_layers"] == 6
    assert new["layer_types"] == [old["layer_types"][m] for m in layer_map]
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
