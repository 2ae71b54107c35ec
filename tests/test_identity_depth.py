"""`--depth-init identity`: added layer copies with their residual writers zeroed compute the source's function.

For every family of the test registry (conftest.FAMILIES, test_families.FAMILY_CONFIGS, dbrx, llama4_text) whose
depth growth is supported: logits equal to the source's (float32), the originals byte-identical, the zeroed tensors
zero, `verify --forward` passing (each added copy the identity on its input) and failing once a zeroed tensor is
changed; families whose layer is not x + f(x) are refused in one line naming why. Wrappers reach their text
family's data (test_multimodal's cases).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from . import test_multimodal as mm
from .conftest import FAMILIES, TOKENS, build_model, built_once, logits, run, save, weights
from .test_families import (
    FAMILY_CONFIGS,
    INTERPOSE_REFUSED,
    MODEL_CLASSES,
    STACK_REFUSED,
    _dbrx,
    _llama4,
    build,
    family_logits,
)

EXTRA = ("dbrx", "llama4_text")
REGISTRY = sorted({*FAMILIES, *FAMILY_CONFIGS, *EXTRA})
# zaya refuses every 2x map (layer 0 alone lacks router_states_scale): this one keeps layer 0 in place
MAPS = {"zaya": "0,1,1,2,2"}
# 'shared' indexer layers reuse the nearest earlier 'full' layer's top-k: under interposition an original would
# reuse an added copy's (refused, see test_identity_keeps_shared_indexers_on_the_originals); stacking is exact
IDENTITY_STACK = {"glm_moe_dsa", "hy_v4"}
# depth growth supported by some 2x map: interposition, else stacking
DEPTH = {f: "interpose" if f not in INTERPOSE_REFUSED and f not in IDENTITY_STACK else "stack"
         for f in REGISTRY if f in MAPS or not (f in INTERPOSE_REFUSED and f in STACK_REFUSED)}
# families whose layer is not x + f(x) (with these tiny configs): a word of the reason each refusal names
REFUSED = {"minimax": "input_layernorm", "beam": "depth-scaled", "deepseek_v4": "hyper-connections",
           "doge": "input_residual", "longcat_flash": "zero_expert_num", "zaya": "residual_scale"}


def _build(family: str):
    if family in FAMILIES:
        return build_model(family)
    return build(family)


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    """A saved float32 checkpoint per family, built on first use in each worker."""
    def make(family: str):
        if family == "dbrx":
            return _dbrx(tmp_path_factory.mktemp(family) / "src")
        if family == "llama4_text":
            return _llama4(tmp_path_factory.mktemp(family))
        return save(_build(family), tmp_path_factory.mktemp(family))
    saved: dict = {}

    def get(family: str):
        if family not in saved:
            saved[family] = make(family)
        return saved[family]
    return get


def _grow(src, out, family, *extra):
    shape = ("--layer-map", MAPS[family]) if family in MAPS else ("--layers", "2x", "--method", DEPTH[family])
    return run("grow-depth", src, out, *shape, "--depth-init", "identity", "--json", "--quiet", *extra)


def _zeroed(out) -> list[str]:
    """Output tensors the provenance record says are filled with zeros."""
    mapping = json.loads((out / "moegrow.json").read_text())["tensors"]
    return sorted(n for n, parts in mapping.items() if any(len(p) == 4 and p[3].get("fill") == 0 for p in parts))


@pytest.mark.parametrize("family", sorted(DEPTH))
def test_identity_depth_2x(family, source, tmp_path, record_property):
    src, out = source(family), tmp_path / "out"
    code, stdout, err = _grow(src, out, family)
    if family in REFUSED:
        assert code == 2 and REFUSED[family] in err and "--depth-init identity" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
        return
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["function_preserving"] and summary["depth_init"] == "identity"
    zeroed = _zeroed(out)
    assert summary["identity_init"]["zeroed"]["count"] == len(zeroed) > 0
    before = family_logits(src, family)
    diff = (before - family_logits(out, family)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert before.abs().max() > 0 and diff <= 1e-5, diff
    # the first occurrence of each layer is byte-identical to its source; the added copies differ only in zeros
    layer_map = summary["layer_map"]
    old, new = weights(src), weights(out)
    record = json.loads((out / "moegrow.json").read_text())["tensors"]
    added = {j for j, m in enumerate(layer_map) if m in layer_map[:j]}
    for name, parts in record.items():
        t = new[name]
        if name in zeroed:
            assert not t.any(), name
            continue
        if not t.is_floating_point() or t.numel() == 0:
            continue
        assert torch.equal(t, old[parts[0][0]]) or name.endswith("layer_scalar"), name
    assert {j for j in added if any(f".{j}." in n for n in zeroed)} == added
    forward = () if family in MODEL_CLASSES else ("--forward", "--atol", "1e-5")
    code, stdout, err = run("verify", src, out, *forward, "--json")
    assert code == 0, stdout + err
    if forward:
        layers = json.loads(stdout)["forward"]["identity_layers"]
        assert sorted(map(int, layers)) == sorted(added) and max(layers.values()) <= 1e-5, layers
    # a zeroed tensor changed: verify names it
    victim = zeroed[len(zeroed) // 2]
    tensors = load_file(out / "model.safetensors")
    tensors[victim].view(-1)[0] = 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and victim in err and "--depth-init identity" in err, err


def test_copy_is_still_the_default(source, tmp_path):
    """Without the flag nothing is zeroed and nothing claims exactness; a record from before the flag verifies."""
    src, out = source("qwen3_moe"), tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["depth_init"] == "copy" and summary["identity_init"] == {}
    assert not summary["function_preserving"] and summary["preservation"] == "no (depth growth adds layers)"
    assert not _zeroed(out)
    record = json.loads((out / "moegrow.json").read_text())
    del record["growth"]["depth_init"]  # as moegrow wrote it before --depth-init
    (out / "moegrow.json").write_text(json.dumps(record))
    assert run("verify", src, out)[0] == 0


def test_dry_run_names_the_zeroed_tensors(source, tmp_path):
    src, out = source("deepseek_v3"), tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "5", "--depth-init", "identity", "--dry-run")
    assert code == 0 and not out.exists(), err
    # layer map 0,0,1,1,2: new layer 1 copies dense layer 0 (o_proj, down_proj), new layer 3 copies MoE layer 1
    # (o_proj, 8 experts' down_proj, the shared experts' down_proj): 2 + 10 tensors zeroed
    assert "layer map: 0,0,1,1,2" in err and "function-preserving: yes" in err
    line = next(x for x in err.splitlines() if "depth init identity" in x)
    assert "12 tensors of the added layers zeroed" in line, line
    for rel in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "mlp.experts.*.down_proj.weight",
                "mlp.shared_experts.down_proj.weight"):
        assert rel in line, line


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_next", "gpt_oss", "llama4_text", "gemma4_text"])
def test_grow_identity_and_width_exact(family, source, tmp_path, record_property):
    src, out = source(family), tmp_path / "out"
    code, stdout, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--depth-init", "identity",
                            "--json", "--quiet")
    assert code == 0, err
    assert json.loads(stdout)["function_preserving"]
    diff = (family_logits(src, family) - family_logits(out, family)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    assert _zeroed(out) and all(not weights(out)[n].any() for n in _zeroed(out))
    code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


def test_grow_identity_with_noise(source, tmp_path):
    """Noise on the expert copies of a zeroed down projection: pure noise, recorded and verified; not exact."""
    src, out = source("qwen3_moe"), tmp_path / "out"
    code, stdout, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--depth-init", "identity",
                            "--noise", "0.01", "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    assert not json.loads(stdout)["function_preserving"]
    copy = "model.layers.1.mlp.experts.5.down_proj.weight"  # layer 1 is the copy of 0; expert 5 copies expert 1
    t = weights(out)[copy]
    assert t.any() and 0.005 < t.std().item() < 0.02
    assert not weights(out)["model.layers.1.mlp.experts.1.down_proj.weight"].any()
    code, _, err = run("verify", src, out)
    assert code == 0, err


@pytest.mark.parametrize("layer_map", ["1,0,2,2", "0,0,2,2", "0,2,1,2"])
def test_identity_needs_the_originals_in_order(layer_map, source, tmp_path):
    code, _, err = run("grow-depth", source("qwen3_moe"), tmp_path / "out", "--layer-map", layer_map,
                       "--depth-init", "identity")
    assert code == 2 and "first occurrences" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_identity_keeps_shared_indexers_on_the_originals(tmp_path):
    """glm_moe_dsa's 'shared' layers reuse the nearest earlier 'full' layer's top-k: interposition would make an
    original reuse an added copy's; stacking keeps the originals together and is exact."""
    src = save(build("glm_moe_dsa", index_topk=4), tmp_path / "src")
    code, _, err = run("grow-depth", src, tmp_path / "a", "--layers", "2x", "--depth-init", "identity")
    assert code == 2 and "indexer_types" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run("grow-depth", src, tmp_path / "b", "--layers", "2x", "--method", "stack",
                       "--depth-init", "identity", "--quiet")
    assert code == 0, err
    assert (family_logits(src, "glm_moe_dsa") - family_logits(tmp_path / "b", "glm_moe_dsa")).abs().max() <= 1e-5


def test_gemma4_shared_kv_layers_refused(tmp_path):
    src = save(build("gemma4_text", num_kv_shared_layers=1), tmp_path / "src")
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--depth-init", "identity")
    assert code == 2 and "num_kv_shared_layers" in err and len(err.strip().splitlines()) == 1, err


def test_gemma4_layer_scalar_set_to_one(tmp_path):
    """gemma4 multiplies each layer's output by layer_scalar: an added copy gets 1, its original keeps its own."""
    model = build("gemma4_text")
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.5 + i)
    src = save(model, tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--depth-init", "identity", "--quiet")
    assert code == 0, err
    w = weights(out)
    assert [w[f"model.layers.{j}.layer_scalar"].item() for j in range(6)] == [0.5, 1.0, 1.5, 1.0, 2.5, 1.0]
    assert (family_logits(src, "gemma4_text") - family_logits(out, "gemma4_text")).abs().max() <= 1e-5
    assert run("verify", src, out, "--forward", "--atol", "1e-5")[0] == 0


def test_fp8_zeroed_weights_keep_their_scales(source, ckpt_copy, tmp_path):
    """A quantised writer: fp8 weight bytes zeroed (fp8 0 is byte 0), its block scale copied as it is."""
    src = ckpt_copy(source("deepseek_v3"))
    tensors = load_file(src / "model.safetensors")
    fp8 = [n for n in tensors if n.endswith("down_proj.weight")]
    for n in fp8:
        tensors[n] = tensors[n].to(torch.float8_e4m3fn)
        tensors[n.replace(".weight", ".weight_scale_inv")] = torch.full((1, 1), 0.5)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--depth-init", "identity", "--quiet")
    assert code == 0, err
    w = weights(out)
    down = "model.layers.3.mlp.experts.0.down_proj"  # layer 3: the added copy of layer 1
    assert w[f"{down}.weight"].dtype == torch.float8_e4m3fn and not w[f"{down}.weight"].view(torch.uint8).any()
    assert w[f"{down}.weight_scale_inv"].item() == 0.5
    assert run("verify", src, out)[0] == 0


@pytest.fixture(scope="module")
def wrapper_source(tmp_path_factory):
    return built_once(tmp_path_factory, mm.build)


@pytest.mark.parametrize("case", sorted(set(mm.CASES) - set(mm.DEPTH_ALWAYS_REFUSED)))
def test_wrappers_take_their_text_family_data(case, wrapper_source, tmp_path, record_property):
    src, out = wrapper_source(case), tmp_path / "out"
    method = "stack" if (case, "interpose") in mm.DEPTH_METHOD_REFUSED else "interpose"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--depth-init", "identity",
                       "--quiet")
    assert code == 0, err
    prefix = mm.CASES[case][4]
    added = [1, 3, 5] if method == "interpose" else [3, 4, 5]
    assert all(any(n.startswith(f"{prefix}{j}.") for n in _zeroed(out)) for j in added)
    assert not any(n.startswith(f"{prefix}{j}.") for n in _zeroed(out) for j in set(range(6)) - set(added))
    diff = (mm.mm_logits(src, case) - mm.mm_logits(out, case)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


@pytest.mark.parametrize("family, why", [("beam", "depth-scaled"), ("longcat_flash", "zero_expert_num=2")])
def test_inspect_names_the_identity_refusal(family, why, source):
    code, stdout, err = run("inspect", source(family))
    assert code == 0, err
    assert "--depth-init identity refused: " in stdout and why in stdout, stdout
    info = json.loads(run("inspect", source("deepseek_v3"), "--json")[1])
    assert info["identity_depth_refused"] is None and "self_attn.o_proj" in info["residual_writers"]


def test_model_card_gives_the_depth_init(source, tmp_path):
    src, out = source("qwen3_moe"), tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--depth-init", "identity", "--quiet")[0] == 0
    card = (out / "README.md").read_text()
    assert "--depth-init identity" in card and "--device" not in card  # zeros need no device
    line = next(x for x in card.splitlines() if "depth init `identity`" in x)
    assert "15 tensors are zeroed" in line, line  # 3 added copies x (o_proj + 4 experts' down_proj)
    assert json.loads((out / "moegrow.json").read_text())["noise_device"] == "none"


def test_unknown_depth_init_is_refused(source, tmp_path):
    code, _, err = run("grow", source("qwen3_moe"), tmp_path / "out", "--layers", "2x", "--experts", "2x",
                       "--depth-init", "zero")
    assert code == 2 and "--depth-init" in err and "'zero'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_identity_on_a_quantised_source(dtype, tmp_path, record_property):
    """An fp8 (block-scaled) DeepSeek-V3: the added copies' zeroed writers requantised (--dtype keep: values
    all zero bytes) or dequantised (float32: zeros); the grown model computes the dequantised source's function."""
    from .test_quant import load_dequantising, make_fp8, reference_logits

    src, out = make_fp8("divides", tmp_path / "fp8"), tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--depth-init", "identity", "--dtype", dtype,
                            "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["identity_init"]["zeroed"]["count"] == 22  # as for the float source: weights, not members
    w = weights(out)
    down = "model.layers.3.mlp.experts.0.down_proj.weight"  # layer 3: the added copy of layer 1
    assert not w[down].float().any() and w[down].dtype == (torch.float8_e4m3fn if dtype == "keep" else torch.float32)
    if dtype == "keep":
        assert torch.equal(w["model.layers.2.mlp.experts.0.down_proj.weight_scale_inv"],
                           weights(src)["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"])  # an original
        with torch.no_grad():
            before, after = (load_dequantising(f)(input_ids=TOKENS).logits for f in (src, out))
    else:
        before, after = reference_logits(src, tmp_path), logits(out)
    diff = (before - after).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    code, stdout, err = run("verify", src, out, "--json")
    assert code == 0, stdout + err


def test_training_checkpoints_take_identity(tmp_path):
    """A Megatron-LM run folder (tests/fixtures): `--depth-init identity` grows it (tests/test_training_recipes.py
    checks the values); a map that reorders the originals is refused in one line, as for Hugging Face."""
    from .test_megatron import FIX

    code, _, err = run("grow-depth", FIX / "run", tmp_path / "out", "--layer-map", "1,0,1", "--depth-init", "identity")
    assert code == 2 and "--depth-init identity" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    code, _, err = run("grow-depth", FIX / "run", tmp_path / "out", "--layer-map", "0,1,1", "--depth-init", "identity")
    assert code == 0, err
