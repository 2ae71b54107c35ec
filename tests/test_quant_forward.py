"""`verify --forward` on quantised checkpoints: fp8 with block scales (blocks that divide the weights
and ragged edge blocks), gpt_oss MXFP4 and inkling2 MXFP8, as SOURCE and as OUTPUT.

The checkpoints are quantised by the formats' own rules (tests/test_quant.py, tests/mx_checkpoints.py).
Where the growth keeps the dequantised source's function (`--dtype float32 --noise 0`: OUTPUT is a
float checkpoint transformers loads as it is; `--dtype keep --noise 0`: byte copies), every layer and
the logits agree within 1e-5; the reference for the quantised source is transformers'
`_dequantize_fp8_weight` (fp8) through the same layer loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegrow.layerwise import layerwise_diff

from . import mx_checkpoints as ckpt
from .conftest import run
from .test_quant import SOURCES, dequantised, make_fp8

EXACT = 1e-5


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            made[key] = make_fp8(key, tmp_path_factory.mktemp(f"fp8-{key}"))
        return made[key]
    return get


@pytest.fixture(scope="module")
def mx_source(tmp_path_factory):
    makers = {"mxfp4": ckpt.gpt_oss_mxfp4, "mxfp8": ckpt.inkling2_mxfp8}
    made: dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            made[fmt] = makers[fmt](tmp_path_factory.mktemp(fmt))
        return made[fmt]
    return get


def _grow(src: Path, out: Path, *args: str) -> Path:
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet", *args)
    assert code == 0, err
    return out


def _forward(src: Path, out: Path, *args: str) -> tuple[int, dict]:
    code, stdout, err = run("verify", src, out, "--forward", "--json", *args)
    assert code in (0, 1), err
    return code, json.loads(stdout)


def _exact(report: dict, record_property) -> None:
    f = report["forward"]
    record_property("layers", [(d["layer"], d["max_abs_diff"]) for d in f["layers"]])
    record_property("max_logit_diff", f["max_abs_logit_diff"])
    assert report["ok"], report["problems"]
    assert f["function_preserving"] and f["layers_are_copies"]
    assert f["layers"] and all(d["max_abs_diff"] <= EXACT for d in f["layers"]), f["layers"]
    assert f["max_abs_logit_diff"] <= EXACT, f["max_abs_logit_diff"]


@pytest.mark.parametrize("key", SOURCES)
def test_fp8_source_runs_as_transformers_dequantises_it(key, fp8, tmp_path, record_property):
    """The layer loop's fp8 source against the source dequantised by transformers' `_dequantize_fp8_weight`
    (block size from the config) and saved in float32: same layers, same logits. The ragged source is one
    transformers' own load-time dequantisation gets wrong."""
    src, ref = fp8(key), tmp_path / "reference"
    ref.mkdir()
    save_file(dequantised(src), ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    del config["quantization_config"]
    (ref / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    result = layerwise_diff(src, ref)
    record_property("layers", [(d.layer, d.max_abs_diff) for d in result.layers])
    assert len(result.layers) == config["num_hidden_layers"]
    assert result.max_abs_diff <= EXACT and result.max_abs_logit_diff <= EXACT, result


@pytest.mark.parametrize("key", SOURCES)
def test_fp8_float32_zero_noise_is_exact(key, fp8, tmp_path, record_property):
    src = fp8(key)
    out = _grow(src, tmp_path / "out", "--dtype", "float32", "--noise", "0")
    code, report = _forward(src, out)
    assert code == 0
    _exact(report, record_property)


def test_fp8_keep_zero_noise_is_exact_both_quantised(fp8, tmp_path, record_property):
    src = fp8("ragged")
    out = _grow(src, tmp_path / "out", "--noise", "0")
    assert "quantization_config" in json.loads((out / "config.json").read_text())
    code, report = _forward(src, out)
    assert code == 0
    _exact(report, record_property)
    code, report = _forward(src, out, "--whole")
    assert code == 0 and report["forward"]["max_abs_logit_diff"] <= EXACT, report


def test_fp8_bfloat16_is_reported_not_failed(fp8, tmp_path):
    """--dtype bfloat16 rounds the dequantised weights: the differences are reported, nothing fails."""
    src = fp8("divides")
    out = _grow(src, tmp_path / "out", "--dtype", "bfloat16", "--noise", "0")
    code, report = _forward(src, out)
    f = report["forward"]
    assert code == 0 and report["ok"], report["problems"]
    assert not f["function_preserving"] and not f["layers_are_copies"]
    assert f["max_abs_diff"] > EXACT  # the rounding shows


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
@pytest.mark.parametrize("dtype", ["keep", "float32"])
def test_mx_zero_noise_is_exact(fmt, dtype, mx_source, tmp_path, record_property):
    src = mx_source(fmt)
    out = _grow(src, tmp_path / "out", "--dtype", dtype, "--noise", "0")
    code, report = _forward(src, out)
    assert code == 0
    _exact(report, record_property)


def _tamper(out: Path, name: str, index: int | None, flip: int) -> None:
    """Flip bits `flip` in every byte of tensor `name` (of its expert `index`, for fused experts)."""
    f = out / "model.safetensors"
    tensors = load_file(f)
    raw = tensors[name].view(torch.uint8).clone()
    target = raw if index is None else raw[index]
    target ^= flip
    tensors[name] = raw.view(tensors[name].dtype)
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.mark.parametrize(("source", "name", "index", "flip"), [
    ("fp8", "model.layers.2.mlp.experts.11.down_proj.weight", None, 0x80),  # e4m3 sign bits
    ("mxfp4", "model.layers.1.mlp.experts.down_proj_blocks", 5, 0x88),      # both e2m1 codes' sign bits
])
def test_tampered_copy_fails_bytes_and_forward_names_the_layer(source, name, index, flip, fp8, mx_source, tmp_path):
    src = fp8("ragged") if source == "fp8" else mx_source(source)
    out = _grow(src, tmp_path / "out", "--noise", "0")
    _tamper(out, name, index, flip)
    code, report = _forward(src, out)
    layer = int(name.split(".")[2])
    assert code == 1
    assert any(p.startswith(name) for p in report["problems"]), report["problems"]  # the byte check
    assert any(p.startswith(f"decoder layer {layer} differs") for p in report["problems"]), report["problems"]
    assert not any(p.startswith("decoder layer") and f"layer {layer} " not in p for p in report["problems"])
