"""Quantised copies computed in bounded memory: fused experts one slice at a time, each copy once.

A requantised or converted part is computed in chunks of whole experts (`transform.chunks`), with
its noise drawn in `moegrow.noise`'s blocks over the whole part, so the bytes must not depend on
the chunking. The noise blocks are made small here (1000 elements) so that they straddle experts
and chunks of the tiny checkpoints, as 4 M-element blocks straddle the experts of a real one.
"""

from __future__ import annotations

import json

import pytest
import torch

from moegrow import noise
from moegrow.quant import mx, transform

from . import mx_checkpoints as ckpt
from .conftest import run, weights


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(key: str):
        if key not in made:
            build = ckpt.gpt_oss_mxfp4 if key == "mxfp4" else ckpt.inkling2_mxfp8
            made[key] = build(tmp_path_factory.mktemp(key))
        return made[key]
    return get


def _bytes(folder) -> dict[str, bytes]:
    return {n: t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for n, t in weights(folder).items()}


def _grow(src, out, dtype: str) -> None:
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--dtype", dtype, "--quiet")
    assert code == 0, err


def _verify(src, out) -> dict:
    code, stdout, err = run("verify", src, out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], report["problems"] or err
    return report


@pytest.mark.parametrize("generator", ["pcg64", "torch"])
def test_noise_stream_is_the_blocks_in_order(generator, monkeypatch):
    """Any runs of a part's draws, taken in order, are the runs of its blocks laid end to end."""
    monkeypatch.setattr(noise, "BLOCK", 100)
    total = 1234
    whole = torch.cat([noise.noise_block(7, "w", 3, b, min(100, total - lo), "cpu", generator=generator)
                       for b, lo in enumerate(range(0, total, 100))])
    stream = transform.NoiseStream(7, "w", 3, total, "cpu", generator)
    cuts = [0, 0, 37, 100, 101, 350, 999, 1000, 1233, 1234]
    for lo, hi in zip(cuts, cuts[1:]):
        assert torch.equal(stream.take(lo, hi - lo), whole[lo:hi]), (lo, hi)


@pytest.mark.parametrize(("key", "dtype"), [("mxfp4", "keep"), ("mxfp4", "bfloat16"), ("mxfp8", "keep")])
def test_chunks_of_experts_give_the_bytes_of_the_whole(key, dtype, sources, tmp_path, monkeypatch):
    """One expert per chunk (noise blocks straddling them) writes the bytes that one chunk per tensor
    writes; verify, itself chunked, passes on both and measures the noise."""
    src = sources(key)
    monkeypatch.setattr(noise, "BLOCK", 1000)
    monkeypatch.setattr(transform, "CHUNK_ELEMENTS", 1 << 40)
    _grow(src, tmp_path / "whole", dtype)
    monkeypatch.setattr(transform, "CHUNK_ELEMENTS", 1)
    _grow(src, tmp_path / "chunked", dtype)
    whole, chunked = _bytes(tmp_path / "whole"), _bytes(tmp_path / "chunked")
    assert whole.keys() == chunked.keys()
    assert [n for n in whole if whole[n] != chunked[n]] == []
    report = _verify(src, tmp_path / "chunked")
    # in dequantised space: the noise plus the requantisation's rounding (coarse for e2m1)
    assert report["noise_std"] and all(0.005 < s < 0.05 for s in report["noise_std"].values()), report["noise_std"]
    monkeypatch.setattr(transform, "CHUNK_ELEMENTS", 1 << 40)
    assert _verify(src, tmp_path / "whole")["noise_std"] == pytest.approx(report["noise_std"], rel=1e-9)


@pytest.mark.parametrize("member", ["_blocks", "_scales"])
def test_chunked_verify_names_a_tampered_last_expert(member, sources, tmp_path, monkeypatch):
    """A bit flipped in the last expert of a requantised copy (the last chunk) fails verify, naming the tensor."""
    from safetensors.torch import load_file, save_file

    src, out = sources("mxfp4"), tmp_path / "out"
    monkeypatch.setattr(transform, "CHUNK_ELEMENTS", 1)
    _grow(src, out, "keep")
    name = "model.layers.1.mlp.experts.down_proj" + member
    f = out / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[-1] ^= 1
    save_file(tensors, f, metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and f"{name}: part 1 is not" in stdout + err, stdout + err


def test_each_copy_is_encoded_once(sources, tmp_path, monkeypatch):
    """A requantised copy's values and scales come from one decode-noise-encode, in grow and in verify."""
    calls = []
    quantize = mx.Mxfp4.quantize

    def counted(self, group, x):
        calls.append(group.name)
        return quantize(self, group, x)

    monkeypatch.setattr(mx.Mxfp4, "quantize", counted)
    src, out = sources("mxfp4"), tmp_path / "out"
    _grow(src, out, "keep")
    fused = [n for n in weights(src) if n.endswith("_blocks")]
    assert sorted(calls) == sorted(n.removesuffix("_blocks") for n in fused)  # one copy each, 2x
    calls.clear()
    _verify(src, out)
    assert sorted(calls) == sorted(n.removesuffix("_blocks") for n in fused)
