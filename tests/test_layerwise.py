"""`verify --forward` one decoder layer at a time (moegrow/layerwise.py), on every family and wrapper.

The cases are the registries of test_families / test_multimodal (and conftest's five families), so a
family or wrapper added there is covered here too. Layer-wise logits must agree with the whole-model
comparison (`--whole`); each layer of a width growth at noise 0 and each depth copy must compute its
source layer's function; a tampered copy must fail, naming its layer.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moegrow.layouts import layout_for

from . import test_multimodal as mm
from .conftest import FAMILIES, build_model, built_once, randomise, run
from .test_families import FAMILY_CONFIGS, INEXACT, LLAMA4
from .test_families import build as build_family

CASES = ([f"family:{f}" for f in sorted({*FAMILIES, *FAMILY_CONFIGS, "llama4_text"})]
         + [f"wrapper:{w}" for w in sorted(mm.CASES)])
ATOL = 1e-5


def build(case: str):
    kind, name = case.split(":")
    if kind == "wrapper":
        return mm.build(name)
    if name in FAMILIES:
        return build_model(name)
    if name == "llama4_text":
        torch.manual_seed(0)
        return randomise(transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model("llama4_text", **LLAMA4)))
    return build_family(name)


@pytest.fixture(scope="session")
def source(tmp_path_factory):
    return built_once(tmp_path_factory, build)


def forward(src, out, *flags: str) -> tuple[int, dict, str]:
    """`verify --forward --json` (plus flags): exit code, the report, stderr."""
    code, stdout, err = run("verify", src, out, "--forward", "--json", "--atol", str(ATOL), *flags)
    return code, json.loads(stdout), err


def num_layers(folder) -> int:
    config = json.loads((folder / "config.json").read_text())
    return layout_for(config).num_layers(config)


@pytest.mark.parametrize("case", CASES)
def test_width_layerwise_agrees_with_whole(case, source, tmp_path, record_property):
    name = case.split(":")[1]
    src, out = source(case), tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet",
                       *(("--allow-inexact",) if name in INEXACT else ()))
    if code == 2 and "not supported" in err:  # zaya, doge: no duplication can be expressed
        return
    assert code == 0, err
    code, report, err = forward(src, out)
    lw = report["forward"]
    _, whole_report, _ = forward(src, out, "--whole")
    whole = whole_report["forward"]
    record_property("layerwise", {k: lw[k] for k in ("max_abs_diff", "max_abs_logit_diff")})
    record_property("whole_max_abs_logit_diff", whole["max_abs_logit_diff"])
    assert (lw["mode"], whole["mode"]) == ("layerwise", "whole")
    n = num_layers(src)
    assert [(d["layer"], d["source_layer"]) for d in lw["layers"]] == [(i, i) for i in range(n)]
    assert lw["max_abs_diff"] == max(d["max_abs_diff"] for d in lw["layers"])
    assert abs(lw["max_abs_logit_diff"] - whole["max_abs_logit_diff"]) <= 1e-6, (lw, whole)
    if name in INEXACT:  # phimoe: reported, not failed
        assert code == 0 and not lw["layers_are_copies"] and lw["max_abs_diff"] > 1e-3, (err, lw)
    else:
        assert code == 0 and report["ok"], report["problems"]
        assert lw["layers_are_copies"] and lw["max_abs_diff"] <= ATOL
        assert whole["max_abs_logit_diff"] <= ATOL


@pytest.mark.parametrize("case", CASES)
def test_depth_copies_compute_their_source_layer(case, source, tmp_path):
    src = source(case)
    for method in ("interpose", "stack"):
        out = tmp_path / method
        code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--json", "--quiet")
        if code == 0:
            break
        assert code == 2, err
    else:
        return  # every 2x depth map refused (the reason is tested in test_families / test_multimodal)
    layer_map = json.loads(stdout)["layer_map"]
    code, report, err = forward(src, out)
    lw = report["forward"]
    assert code == 0, report["problems"]
    assert [(d["layer"], d["source_layer"]) for d in lw["layers"]] == list(enumerate(layer_map))
    why = layout_for(json.loads((src / "config.json").read_text())).depth.index_dependent_layers
    if why:  # beam: a copy at another index computes another function: reported, not failed
        assert not lw["layers_are_copies"]
        assert max(d["max_abs_diff"] for d in lw["layers"] if d["layer"] != d["source_layer"]) > 1e-3
    else:
        assert lw["layers_are_copies"] and lw["max_abs_diff"] <= ATOL, lw["layers"]


def _tamper_expert_copies(out, layer: int) -> None:
    """Add 1 to the second half of every expert tensor of `layer` that holds a copy (per-expert tensors: the copy
    experts' weights; fused: the copies' half), so that some token reaches one whatever the routing; moegrow.json
    is left as it is (noise 0)."""
    mapping = json.loads((out / "moegrow.json").read_text())["tensors"]
    config = json.loads((out / "config.json").read_text())
    prefix = f"{layout_for(config, names=mapping).names.layer_prefix}{layer}."
    names = [n for n, parts in mapping.items()
             if n.startswith(prefix) and "expert" in n and "shared" not in n and (len(parts) > 1 or n != parts[0][0])]
    assert names
    tensors = load_file(out / "model.safetensors")
    for name in names:
        flat = tensors[name].view(-1)
        flat[flat.numel() // 2:] += 1.0
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("case", ["family:qwen3_moe", "family:gpt_oss", "family:nemotron_h", "wrapper:kimi_k25"])
def test_tampered_width_copy_fails_naming_the_layer(case, source, tmp_path):
    src, out = source(case), tmp_path / "out"
    assert run("grow-width", src, out, "--experts", "2x", "--quiet")[0] == 0
    _tamper_expert_copies(out, 1)
    code, report, _ = forward(src, out)
    assert code == 1
    named = [p for p in report["problems"] if p.startswith("decoder layer")]
    assert named and all(p.startswith("decoder layer 1 differs from source layer 1 by") for p in named), named
    assert [d["layer"] for d in report["forward"]["layers"] if d["max_abs_diff"] > ATOL] == [1]


def test_tampered_depth_copy_fails_naming_the_layer(source, tmp_path):
    src, out = source("family:qwen3_moe"), tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--json", "--quiet")
    assert code == 0 and json.loads(stdout)["layer_map"] == [0, 0, 1, 1, 2, 2], err
    _tamper_expert_copies(out, 3)
    code, report, err = forward(src, out)
    assert code == 1
    named = [p for p in report["problems"] if p.startswith("decoder layer")]
    assert len(named) == 1 and named[0].startswith("decoder layer 3 differs from source layer 1 by"), named
    code, _, err = run("verify", src, out, "--forward")  # the human form names it too
    assert code == 1 and "decoder layer 3 differs from source layer 1" in err and "layer 3 (source layer 1)" in err


def test_noise_is_reported_not_failed(source, tmp_path):
    src, out = source("family:qwen3_moe"), tmp_path / "out"
    assert run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--quiet")[0] == 0
    code, report, err = forward(src, out)
    lw = report["forward"]
    assert code == 0, report["problems"]
    assert not lw["layers_are_copies"] and not lw["function_preserving"]
    assert all(d["max_abs_diff"] > ATOL for d in lw["layers"]) and lw["max_abs_logit_diff"] > ATOL


def test_mtp_layers_after_the_decoder_are_not_decoder_layers(source, tmp_path):
    """deepseek_v3's MTP layer sits at model.layers.{L}: transformers ignores it, and so does the layer loop."""
    src = tmp_path / "src"
    model_folder = source("family:deepseek_v3")
    src.mkdir()
    for f in model_folder.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    tensors.update({n.replace("model.layers.2.", "model.layers.3."): t.clone() for n, t in tensors.items()
                    if n.startswith("model.layers.2.")})
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    assert run("grow-width", src, out, "--experts", "2x", "--quiet")[0] == 0
    code, report, _ = forward(src, out)
    assert code == 0, report["problems"]
    assert [d["layer"] for d in report["forward"]["layers"]] == [0, 1, 2]


def test_grow_both_axes_checks_every_layer_against_its_source(source, tmp_path):
    """`grow --layers 2x --experts 2x` at noise 0: the whole model is not the source's function, every layer is."""
    src, out = source("family:qwen3_moe"), tmp_path / "out"
    assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--quiet")[0] == 0
    code, report, _ = forward(src, out)
    lw = report["forward"]
    assert code == 0 and lw["layers_are_copies"] and not lw["function_preserving"], report["problems"]
    assert [d["source_layer"] for d in lw["layers"]] == [0, 0, 1, 1, 2, 2] and lw["max_abs_diff"] <= ATOL
    _tamper_expert_copies(out, 2)
    code, report, _ = forward(src, out)
    assert code == 1 and any(p.startswith("decoder layer 2 differs from source layer 1") for p in report["problems"])
