"""`--device cuda`: noise drawn and added on the GPU, quantised copies requantised there.

These run only where torch sees a GPU (CI has none; they were run on a lent H100, see docs/performance.md).
What they establish: the default `pcg64` noise on the GPU writes the CPU's bytes; `torch` CUDA noise has the
asked std, repeats byte for byte on the same GPU, and passes `verify` (which checks its std: CUDA's
generator draws other numbers than the CPU's, so it is not regenerated);
every path that draws no noise (dequantising to a float dtype, scaling) writes the CPU's bytes; fp8, MXFP4
and MXFP8 requantisation on the GPU gives the CPU's bytes for the same values; and a grown fp8 checkpoint
loaded by transformers on the GPU computes the source's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moegrow.quant import mx

from . import mx_checkpoints as ckpt
from .conftest import TOKENS, logits, run, weights
from .test_quant import _grow, _verify, fp8_source  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


def test_cuda_pcg64_noise_writes_the_cpus_bytes(checkpoints, tmp_path):
    """pcg64: the table entries are looked up on the CPU and added on the GPU, so the bytes are the CPU's;
    verify regenerates them."""
    src = checkpoints["mixtral"]
    _grow(src, tmp_path / "cuda", "--noise", "0.01", "--router-noise", "0.02", "--device", "cuda")
    _grow(src, tmp_path / "cpu", "--noise", "0.01", "--router-noise", "0.02", "--device", "cpu")
    assert json.loads((tmp_path / "cuda" / "moegrow.json").read_text())["noise_device"] == "cuda"
    assert _bytes(tmp_path / "cuda") == _bytes(tmp_path / "cpu")
    _verify(src, tmp_path / "cuda")


def test_cuda_noise_has_its_std_repeats_and_verifies(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    a, b = tmp_path / "a", tmp_path / "b"
    _grow(src, a, "--noise", "0.01", "--device", "cuda", "--noise-generator", "torch")
    _grow(src, b, "--noise", "0.01", "--device", "cuda", "--noise-generator", "torch")
    assert _bytes(a) == _bytes(b)  # the same GPU repeats its draws
    assert json.loads((a / "moegrow.json").read_text())["noise_device"] == "cuda"
    logits(a)  # loads with no missing, unexpected or mismatched keys
    before, after = weights(src), weights(a)
    diffs = [(after[n.replace(f"experts.{e}.", f"experts.{e + 4}.")] - t).reshape(-1)
             for n, t in before.items() for e in range(4) if f".experts.{e}." in n]
    std = float(torch.cat(diffs).std())
    assert abs(std - 0.01) < 0.001, std
    report = _verify(src, a)
    assert abs(sum(report["noise_std"].values()) / len(report["noise_std"]) - 0.01) < 0.001
    cpu = tmp_path / "cpu"
    _grow(src, cpu, "--noise", "0.01", "--device", "cpu", "--noise-generator", "torch")
    assert _bytes(cpu) != _bytes(a)  # another generator: verify measures, does not regenerate


def test_cuda_copy_without_noise_fails_verify(checkpoints, tmp_path):
    """A `torch` noised copy replaced by its noise-free original is caught by the std check."""
    src, out = checkpoints["mixtral"], tmp_path / "out"
    _grow(src, out, "--noise", "0.01", "--device", "cuda", "--noise-generator", "torch")
    f = out / "model.safetensors"
    tensors = load_file(f)
    name = next(n for n in sorted(tensors) if ".layers.1." in n and ".experts.5." in n)
    tensors[name] = tensors[name.replace("experts.5.", "experts.1.")].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    code, stdout, _ = run("verify", src, out, "--json")
    assert code == 1 and any("experts.5" in p for p in json.loads(stdout)["problems"])


@pytest.mark.parametrize("key", ["divides", "ragged"])
def test_cuda_dequantising_writes_the_cpus_bytes(key, fp8_source, tmp_path):  # noqa: F811
    src = fp8_source(key)
    for dtype in ("float32", "bfloat16"):
        _grow(src, tmp_path / f"cpu-{dtype}", "--dtype", dtype, "--device", "cpu")
        _grow(src, tmp_path / f"cuda-{dtype}", "--dtype", dtype, "--device", "cuda")
        assert _bytes(tmp_path / f"cpu-{dtype}") == _bytes(tmp_path / f"cuda-{dtype}"), dtype


def test_cuda_requantising_fp8_equals_the_cpu(fp8_source):  # noqa: F811
    from moegrow.quant.fp8 import BlockFp8
    from moegrow.source import open_source

    src = open_source(str(fp8_source("ragged")))
    codec = BlockFp8.detect(src.config, src.tensors)
    g = torch.Generator().manual_seed(0)
    for group in codec.groups(src.tensors):
        x = torch.randn(group.shape, generator=g) * 0.05
        cpu, gpu = codec.quantize(group, x), codec.quantize(group, x.cuda())
        for role in cpu:
            assert torch.equal(cpu[role].view(torch.uint8) if cpu[role].dtype == torch.float8_e4m3fn else cpu[role],
                               gpu[role].cpu().view(torch.uint8) if gpu[role].dtype == torch.float8_e4m3fn
                               else gpu[role].cpu()), (group.name, role)


def test_cuda_requantising_mx_equals_the_cpu():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 256, 96, generator=g) * 0.05
    x[0, :32, 0] = 0.0  # an all-zero block
    for cpu, gpu in zip(mx.quantize_mxfp4(x), mx.quantize_mxfp4(x.cuda()), strict=True):
        assert torch.equal(cpu, gpu.cpu())
    for cpu, gpu in zip(mx.quantize_mxfp8(x), mx.quantize_mxfp8(x.cuda()), strict=True):
        assert torch.equal(cpu.view(torch.uint8), gpu.cpu().view(torch.uint8))


def test_cuda_noise_on_fp8_keep_verifies(fp8_source, tmp_path):  # noqa: F811
    src, out = fp8_source("divides"), tmp_path / "out"
    _grow(src, out, "--noise", "0.01", "--device", "cuda")
    report = _verify(src, out)
    assert len(report["noise_std"]) == 48
    assert gpu_logits(out).shape[-1] == gpu_logits(src).shape[-1]  # loads, every key in place


def test_cuda_noise_on_mxfp4_keep_verifies(tmp_path):
    src = ckpt.gpt_oss_mxfp4(tmp_path / "src")
    out = tmp_path / "out"
    _grow(src, out, "--noise", "0.01", "--device", "cuda")
    report = _verify(src, out)
    assert report["noise_std"]
    ckpt.mxfp4_logits(out)  # transformers loads it (dequantising) with every key in place


def gpu_logits(folder: Path) -> torch.Tensor:
    """Logits of a checkpoint loaded by transformers on the GPU in float32, an fp8 one dequantised there by
    its fine-grained fp8 quantizer (`dequantize=True`: the fp8 matmul kernels of transformers 5.23 come from
    the Hub's `kernels` package, which the lent machine cannot reach)."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    quant = {"quantization_config": transformers.FineGrainedFP8Config(dequantize=True)} \
        if "quantization_config" in config else {}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="cuda", output_loading_info=True, **quant)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    for p in model.parameters():  # the quantizer dequantises to bfloat16 whatever `dtype` says (and refuses .float())
        p.data = p.data.float()
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS.cuda()).logits.float().cpu()


def test_grown_fp8_computes_the_source_on_the_gpu(fp8_source, tmp_path, record_property):  # noqa: F811
    """Noise-free width growth on the GPU, kept in fp8 and converted to float32, computes the source's
    logits when transformers loads each on the GPU (the source and the fp8 output dequantised by its
    quantizer there)."""
    src = fp8_source("divides")
    _grow(src, tmp_path / "keep", "--device", "cuda")
    _grow(src, tmp_path / "f32", "--dtype", "float32", "--device", "cuda")
    want = gpu_logits(src)
    for kind in ("keep", "f32"):
        diff = float((gpu_logits(tmp_path / kind) - want).abs().max())
        record_property(f"max_abs_logit_diff_{kind}", diff)
        print(f"fp8 source vs grown ({kind}) on the GPU: max abs logit diff {diff:.3g}")
        assert diff <= 1e-4, (kind, diff)
