"""fp8 with per-channel / per-tensor scales: transformers' fbgemm_fp8 (Llama-4) and compressed-tensors FP8.

Sources are tiny real models quantised here by each format's rules, independently of moegrow:

- fbgemm_fp8: a llama4_text model whose feed-forward linears are `FbgemmFp8Linear`s (weight [out, in]
  float8, weight_scale float32 [out, 1]) and whose fused experts are `FbgemmFp8Llama4TextExperts`
  (the shapes are checked against those transformers modules), quantised per output channel as
  fbgemm's `quantize_fp8_per_row` does (scale = amax / 448). transformers has no CPU dequantisation
  for this format: the reference is fbgemm's row-wise product evaluated with `torch._scaled_mm` (the
  call transformers makes on XPU) on an identity input, with the weight and scale views
  `FbgemmFp8Llama4TextExperts.forward` passes.
- compressed-tensors FP8 (format float-quantized, strategy channel or tensor), as llm-compressor
  writes a "-FP8-dynamic" Qwen3 MoE: the compressed-tensors package is not installed (and not a
  dependency), so the checkpoint is quantised by its documented rule restated here (symmetric:
  scale = max(|min(x, 0)|, max(x, 0)) / 448 in the weight's dtype, eps for zero; values = clamp(x /
  scale, -448, 448) cast to float8) and the reference dequantisation is transformers' own
  `CompressedTensorsDequantize` FP8 path (the one that needs nothing from compressed-tensors; its
  module-level import is given an empty stand-in).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moegrow.quant.channel_fp8 import CompressedFp8, FbgemmFp8

from .conftest import COMMON, FAMILIES, logits, run, save, weights

FP8_MAX = 448.0
LLAMA4 = dict(vocab_size=64, hidden_size=16, intermediate_size=12, intermediate_size_mlp=24, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
# transformers' FbgemmFp8Config as a Llama-4 Maverick FP8 release writes it
FBGEMM = {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
          "modules_to_not_convert": ["self_attn", "router", "lm_head", "embed_tokens"]}


def _config_with(folder: Path, quantization: dict, dtype: str = "bfloat16") -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = quantization
    config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------- fbgemm_fp8 (llama4_text)

def fbgemm_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8_per_row's rule on rows of w [N, K]: (float8 [N, K], float32 scale [N])."""
    amax = w.float().abs().amax(dim=-1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def make_fbgemm(root: Path) -> Path:
    from transformers.integrations.fbgemm_fp8 import FbgemmFp8Linear, FbgemmFp8Llama4TextExperts

    config = transformers.AutoConfig.for_model("llama4_text", **LLAMA4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "router" in name else 0.2)
    folder = save(model.eval(), root)
    experts = FbgemmFp8Llama4TextExperts(config).state_dict()  # the names and shapes fbgemm loads into
    tensors = {}
    for name, t in load_file(folder / "model.safetensors").items():
        if name.endswith("experts.gate_up_proj"):  # [E, hidden, 2d]: rows of its transpose
            q, s = fbgemm_rows(t.transpose(1, 2).reshape(-1, t.shape[1]))
            tensors[name] = q.reshape(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2).contiguous()
            tensors[name + "_scale"] = s.reshape(t.shape[0], 1, t.shape[2])
        elif name.endswith("experts.down_proj"):  # [E, d, hidden]
            q, s = fbgemm_rows(t.transpose(1, 2).reshape(-1, t.shape[1]))
            tensors[name] = q.reshape(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2).contiguous()
            tensors[name + "_scale"] = s.reshape(t.shape[0], t.shape[2], 1)
        elif ".feed_forward." in name and name.endswith("_proj.weight"):
            q, s = fbgemm_rows(t)
            linear = FbgemmFp8Linear(t.shape[1], t.shape[0], False).state_dict()
            assert linear["weight_scale"].shape == (t.shape[0], 1)
            tensors[name], tensors[name + "_scale"] = q, s[:, None]
        else:
            tensors[name] = t.to(torch.bfloat16)
    for key, t in experts.items():
        name = f"model.layers.1.feed_forward.experts.{key}"
        assert (tensors[name].shape, tensors[name].dtype) == (t.shape, t.dtype), key
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _config_with(folder, FBGEMM)
    return folder


def fbgemm_reference(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each quantised weight as fbgemm's row-wise product computes with it: `torch._scaled_mm` of an
    identity by the views transformers' fbgemm modules pass (WQ [N, K] row-major, w_scale [N])."""
    def rowwise(wq: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:  # -> dequantised [N, K]
        k = wq.shape[1]
        eye = torch.eye(k).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(eye, wq.t(), scale_a=torch.ones(k, 1), scale_b=w_scale.reshape(1, -1).float(),
                               out_dtype=torch.float32)
        return out.t()

    ref = {}
    for name, t in w.items():
        if name.endswith("_scale"):
            continue
        s = w.get(name + "_scale")
        if s is None:
            ref[name] = t.float()
        elif name.endswith("experts.gate_up_proj"):  # [E, hidden, 2d], scale [E, 1, 2d]
            ref[name] = torch.stack([rowwise(t[i].transpose(0, 1).contiguous(), s[i][0]).t() for i in range(len(t))])
        elif name.endswith("experts.down_proj"):  # [E, d, hidden], scale [E, hidden, 1]
            ref[name] = torch.stack([rowwise(t[i].transpose(0, 1).contiguous(), s[i].view(-1)).t()
                                     for i in range(len(t))])
        else:
            ref[name] = rowwise(t, s.view(-1))
    return ref


# ---------------------------------------------------------------- compressed-tensors (qwen3_moe)

def ct_quantise(w: torch.Tensor, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """compressed-tensors' symmetric FP8 rule, in the weight's dtype (bf16): per output row or per tensor."""
    dims = {"dim": -1, "keepdim": True} if strategy == "channel" else {}
    lo = torch.clamp(w.amin(**dims), max=0)
    hi = torch.clamp(w.amax(**dims), min=0)
    scale = torch.maximum(lo.abs(), hi) / (2 * FP8_MAX / 2)
    scale = torch.where(scale == 0, torch.finfo(w.dtype).eps, scale)
    q = torch.clamp(w / scale, -FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.reshape(-1, 1) if strategy == "channel" else scale.reshape(1)


def ct_config(strategy: str) -> dict:
    activations = {"type": "float", "num_bits": 8, "strategy": "token" if strategy == "channel" else "tensor",
                   "symmetric": True, "dynamic": strategy == "channel"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": activations, "weights": {
                "type": "float", "num_bits": 8, "strategy": strategy, "symmetric": True, "dynamic": False}}},
            "ignore": ["lm_head", "re:.*mlp.gate$"]}


def make_ct(root: Path, strategy: str) -> Path:
    """A Qwen3 MoE "-FP8-dynamic" style checkpoint (strategy channel), or a static per-tensor one with
    an input_scale per linear (strategy tensor); the rest bf16."""
    config = transformers.AutoConfig.for_model("qwen3_moe", **{**COMMON, **FAMILIES["qwen3_moe"]})
    torch.manual_seed(0)
    from .conftest import randomise

    folder = save(randomise(transformers.AutoModelForCausalLM.from_config(config)), root)
    tensors = {}
    for name, t in load_file(folder / "model.safetensors").items():
        t = t.to(torch.bfloat16)
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            tensors[name], tensors[name + "_scale"] = ct_quantise(t, strategy)
            if strategy == "tensor":
                tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.01], dtype=torch.bfloat16)
        else:
            tensors[name] = t
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _config_with(folder, ct_config(strategy))
    return folder


def ct_reference(w: dict[str, torch.Tensor], monkeypatch) -> dict[str, torch.Tensor]:
    """Each weight dequantised by transformers' `CompressedTensorsDequantize` FP8 path, in float32."""
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize

    stand_in = types.ModuleType("compressed_tensors.compressors")
    stand_in.BaseCompressor = None  # imported by `convert`, unused on the FP8 path
    monkeypatch.setitem(sys.modules, "compressed_tensors", types.ModuleType("compressed_tensors"))
    monkeypatch.setitem(sys.modules, "compressed_tensors.compressors", stand_in)
    scheme = types.SimpleNamespace(weights=types.SimpleNamespace(type="float", num_bits=8))
    quantizer = types.SimpleNamespace(compressor=types.SimpleNamespace(quantization_config=None))
    op = CompressedTensorsDequantize(hf_quantizer=quantizer, scheme=scheme)
    model = types.SimpleNamespace(get_parameter=lambda name: torch.empty(0))  # float32
    ref = {}
    for name, t in w.items():
        if name.endswith(("_scale", "input_scale")):
            continue
        if name + "_scale" not in w:
            ref[name] = t.float()
            continue
        out = op.convert({name: [t], name + "_scale": [w[name + "_scale"]]}, source_patterns=[],
                         target_patterns=[], full_layer_name=name, model=model)
        ref[name] = out[name][0]
    return ref


# ---------------------------------------------------------------- shared

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made = {}

    def get(key: str) -> Path:
        if key not in made:
            root = tmp_path_factory.mktemp(key)
            made[key] = make_fbgemm(root / "src") if key == "fbgemm" else make_ct(root / "src", key.split("-")[1])
        return made[key]
    return get


KEYS = ["fbgemm", "ct-channel", "ct-tensor"]


def reference(key: str, folder: Path, monkeypatch) -> dict[str, torch.Tensor]:
    w = weights(folder)
    return fbgemm_reference(w) if key == "fbgemm" else ct_reference(w, monkeypatch)


def reference_logits(key: str, folder: Path, tmp: Path, monkeypatch) -> torch.Tensor:
    ref = tmp / "reference"
    ref.mkdir()
    dequantised = {n: t.contiguous() for n, t in reference(key, folder, monkeypatch).items()}
    save_file(dequantised, ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (ref / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return logits(ref)


def _verify(src: Path, out: Path) -> dict:
    code, stdout, err = run("verify", src, out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], report["problems"] or err
    return report


@pytest.mark.parametrize("key", KEYS)
def test_detected_and_dequantised_as_transformers(key, sources, monkeypatch):
    from moegrow.quant.plan import quantisation
    from moegrow.source import open_source

    src = open_source(str(sources(key)))
    quant = quantisation(src.config, src.tensors)
    assert quant is not None and type(quant.codec) is (FbgemmFp8 if key == "fbgemm" else CompressedFp8)
    w, ref = weights(src.folder), reference(key, src.folder, monkeypatch)
    assert len(quant.groups) == sum(t.dtype == torch.float8_e4m3fn for t in w.values())
    for g in quant.groups.values():
        got = quant.codec.dequantize(g, {m.role: w[m.name] for m in g.members})
        assert torch.equal(got, ref[g.name]), g.name
        # a copy requantised from the dequantised weight decodes to the same weight
        again = quant.codec.quantize(g, got)
        assert torch.equal(quant.codec.dequantize(g, again), got), g.name


@pytest.mark.parametrize("key", KEYS)
def test_float32_zero_noise_computes_the_dequantised_source(key, sources, tmp_path, monkeypatch, record_property):
    src, out = sources(key), tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--dtype", "float32", "--quiet")
    assert code == 0, err
    grown = weights(out)
    assert all(t.dtype == torch.float32 for t in grown.values())
    assert not any(n.endswith(("_scale", "input_scale")) for n in grown)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    diff = float((logits(out) - reference_logits(key, src, tmp_path, monkeypatch)).abs().max())
    record_property("max_abs_logit_diff_vs_transformers_dequantised", diff)
    assert diff <= 1e-5, diff
    _verify(src, out)


@pytest.mark.parametrize("key", KEYS)
def test_keep_with_noise_requantises_copies(key, sources, tmp_path):
    """Originals and their scales byte-identical, copies requantised (new scales), verify passes and
    measures the noise in dequantised space; bfloat16 loads with every key in place."""
    src, out = sources(key), tmp_path / "out"
    extra = ["--top-k", "keep"] if key == "fbgemm" else []  # llama4's exact width halves down_proj
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--quiet", *extra)
    assert code == 0, err
    before, after = weights(src), weights(out)
    fp8 = [n for n, t in before.items() if t.dtype == torch.float8_e4m3fn and "expert" in n]
    assert fp8
    for name in fp8:
        for member in (name, name + "_scale"):
            b, a = before[member], after[member]
            if name.endswith(("gate_up_proj", "down_proj")):  # fused: originals first, copies after
                assert torch.equal(a[:len(b)].view(torch.uint8), b.view(torch.uint8)), member
                assert not torch.equal(a[len(b):].view(torch.uint8), b.view(torch.uint8)), member
            else:
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), member
    if key == "ct-tensor":  # a copy's activation scale is its original's
        assert torch.equal(after["model.layers.0.mlp.experts.5.down_proj.input_scale"],
                           before["model.layers.0.mlp.experts.1.down_proj.input_scale"])
    report = _verify(src, out)
    assert report["noise_std"] and all(0.005 < s < 0.02 for s in report["noise_std"].values()), report["noise_std"]
    bf16 = tmp_path / "bf16"
    code, _, err = run("grow-width", src, bf16, "--experts", "2x", "--noise", "0.01", "--dtype", "bfloat16",
                       "--quiet", *extra)
    assert code == 0, err
    logits(bf16)  # no missing, unexpected or mismatched keys
    _verify(src, bf16)


@pytest.mark.parametrize("key", KEYS)
def test_verify_fails_on_a_tampered_copy(key, sources, tmp_path):
    src, out = sources(key), tmp_path / "out"
    extra = ["--top-k", "keep"] if key == "fbgemm" else []
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--quiet", *extra)
    assert code == 0, err
    name = ("model.layers.1.feed_forward.experts.down_proj_scale" if key == "fbgemm"
            else "model.layers.1.mlp.experts.6.up_proj.weight")
    f = out / "model.safetensors"
    tensors = load_file(f)
    raw = tensors[name].contiguous().view(torch.uint8).clone()
    raw.view(-1)[-1] ^= 1
    tensors[name] = raw.view(tensors[name].dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and name in stdout + err, stdout + err
