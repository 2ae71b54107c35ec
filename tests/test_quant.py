"""Quantised checkpoints (fine-grained fp8 with block scales) and --dtype.

The sources are tiny deepseek_v3 models quantised here by the format's own rules (DeepSeek-V3's
release: every decoder linear weight float8_e4m3fn with one float32 `weight_scale_inv` per block,
scale = block amax / 448; the rest bfloat16, correction biases float32). Two block sizes: 8x8
divides every weight; 16x16 leaves ragged edge blocks (rows 24 and 40, like DeepSeek-V3's
kv_a_proj_with_mqa with 576 rows for 128-row blocks). The reference for dequantisation is
transformers' own code: `_dequantize_fp8_weight` (block size from the config) and, where it is
right, loading with the fp8 quantizer's dequantize path.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

from .conftest import TOKENS, build_model, logits, run, save, weights

FP8_MAX = 448.0
# key -> (block, config overrides): 8x8 divides every tiny weight; 16x16 leaves ragged edges
# (dense MLP 24 rows: 2 scale rows; kv_a_proj_with_mqa 32 + 8 = 40 rows: 3 scale rows)
SOURCES = {"divides": ((8, 8), {}), "ragged": ((16, 16), {"kv_lora_rank": 32})}


def quantise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's rule: per block, scale_inv = amax / 448, values = x / scale_inv in float8_e4m3fn."""
    rows, cols = w.shape
    r, c = -(-rows // block[0]), -(-cols // block[1])
    padded = torch.zeros(r * block[0], c * block[1])
    padded[:rows, :cols] = w
    blocks = padded.reshape(r, block[0], c, block[1])
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(padded.shape)[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale.float()


def is_quantised(name: str, t: torch.Tensor) -> bool:
    """The linear weights DeepSeek-V3 stores in fp8: every decoder linear but the router (`mlp.gate`)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and t.ndim == 2
            and "norm" not in name and not name.endswith("mlp.gate.weight"))


def make_fp8(key: str, root: Path) -> Path:
    block, overrides = SOURCES[key]
    float_dir = save(build_model("deepseek_v3", **overrides), root / "float")
    tensors = {}
    for name, t in load_file(float_dir / "model.safetensors").items():
        if is_quantised(name, t):
            tensors[name], tensors[name + "_scale_inv"] = quantise(t, block)
        else:
            tensors[name] = t.float() if "correction_bias" in name else t.to(torch.bfloat16)
    folder = root / "fp8"
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((float_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


def dequantised(folder: Path) -> dict[str, torch.Tensor]:
    """The source's weights as transformers' `_dequantize_fp8_weight` dequantises them (float32)."""
    block = json.loads((folder / "config.json").read_text())["quantization_config"]["weight_block_size"]
    w = weights(folder)
    return {n: _dequantize_fp8_weight(t, w[n + "_scale_inv"], block, torch.float32) if t.dtype == torch.float8_e4m3fn
            else t.float() for n, t in w.items() if not n.endswith("_scale_inv")}


def reference_logits(folder: Path, tmp: Path) -> torch.Tensor:
    """Logits of the source dequantised by `_dequantize_fp8_weight`, saved in float32 and loaded."""
    ref = tmp / "reference"
    ref.mkdir()
    save_file(dequantised(folder), ref / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (ref / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return logits(ref)


def load_dequantising(folder: Path) -> torch.nn.Module:
    """The source loaded by transformers' fp8 quantizer, which dequantises on a machine without a GPU.
    (Its environment check asks for accelerate, which it does not use on this path: skipped.)"""
    import transformers.quantizers.quantizer_finegrained_fp8 as fp8

    available = fp8.is_accelerate_available
    fp8.is_accelerate_available = lambda: True
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    finally:
        fp8.is_accelerate_available = available
    return model.float().eval()  # the quantizer leaves the unquantised bf16 tensors in bf16


@pytest.fixture(scope="session")
def fp8_source(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in made:
            made[key] = make_fp8(key, tmp_path_factory.mktemp(f"fp8-{key}"))
        return made[key]
    return get


def _grow(src: Path, out: Path, *args: str) -> None:
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet", *args)
    assert code == 0, err


def _verify(src: Path, out: Path) -> dict:
    code, stdout, err = run("verify", src, out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["ok"], report["problems"] or err
    return report


@pytest.mark.parametrize("key", SOURCES)
def test_dequantisation_equals_transformers(key, fp8_source):
    """moegrow's fp8 decoding equals `_dequantize_fp8_weight` on every weight; the fixture's ragged weights
    are ones that transformers' load-time dequantisation (block size from the scale grid) gets wrong."""
    from moegrow.quant.fp8 import BlockFp8
    from moegrow.source import open_source

    src = open_source(str(fp8_source(key)))
    codec = BlockFp8.detect(src.config, src.tensors)
    assert codec is not None
    w, ref = weights(src.folder), dequantised(src.folder)
    groups = codec.groups(src.tensors)
    assert len(groups) == sum(t.dtype == torch.float8_e4m3fn for t in w.values())
    load_time_wrong = []
    for g in groups:
        data = {m.role: w[m.name] for m in g.members}
        assert torch.equal(codec.dequantize(g, data), ref[g.name]), g.name
        try:
            at_load = Fp8Dequantize(None)._dequantize_one(data["values"], data["scales"], torch.float32)
            if not torch.equal(at_load, ref[g.name]):
                load_time_wrong.append(g.name)
        except ValueError:  # the scale grid does not divide the shape (576 rows, 5 scale rows)
            load_time_wrong.append(g.name)
    if key == "divides":
        assert not load_time_wrong
    else:
        assert any("kv_a_proj_with_mqa" in n for n in load_time_wrong)
        assert any("mlp.gate_proj" in n for n in load_time_wrong)  # 24 rows read as blocks of 12


def test_requantising_an_original_gives_its_bytes(fp8_source):
    """Encoding the decoded weight again reproduces the source's values and scales (ragged edges included)."""
    from moegrow.quant.fp8 import BlockFp8
    from moegrow.source import open_source

    src = open_source(str(fp8_source("ragged")))
    codec = BlockFp8.detect(src.config, src.tensors)
    w = weights(src.folder)
    for g in codec.groups(src.tensors):
        data = {m.role: w[m.name] for m in g.members}
        again = codec.quantize(g, codec.dequantize(g, data))
        assert torch.equal(again["values"].view(torch.uint8), data["values"].view(torch.uint8)), g.name
        assert torch.equal(again["scales"], data["scales"]), g.name


@pytest.mark.parametrize("key", SOURCES)
def test_float32_zero_noise_computes_the_dequantised_source(key, fp8_source, tmp_path, record_property):
    src, out = fp8_source(key), tmp_path / "out"
    _grow(src, out, "--dtype", "float32")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    grown = weights(out)
    assert all(t.dtype == torch.float32 for t in grown.values())
    assert not any(n.endswith("_scale_inv") for n in grown)
    got = logits(out)
    want = reference_logits(src, tmp_path)
    diff = float((got - want).abs().max())
    record_property("max_abs_logit_diff_vs_dequantize_fp8_weight", diff)
    assert diff <= 1e-5, diff
    if key == "divides":  # transformers' own load-time dequantisation is right on these shapes
        with torch.no_grad():
            loaded = load_dequantising(src)(input_ids=TOKENS).logits
        diff = float((got - loaded).abs().max())
        record_property("max_abs_logit_diff_vs_load_dequantize", diff)
        assert diff <= 1e-5, diff
    _verify(src, out)


def test_bfloat16_with_noise_loads_and_measures_the_noise(fp8_source, tmp_path):
    src, out = fp8_source("ragged"), tmp_path / "out"
    _grow(src, out, "--dtype", "bfloat16", "--noise", "0.01")
    grown = weights(out)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert grown[bias].dtype == torch.float32  # kept float32, as the bf16 source keeps it
    assert all(t.dtype == torch.bfloat16 for n, t in grown.items() if "correction_bias" not in n)
    logits(out)  # no missing, unexpected or mismatched keys
    ref = dequantised(src)
    diffs = []
    for layer in (1, 2):
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                orig = ref[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"]
                copy = grown[f"model.layers.{layer}.mlp.experts.{e + 8}.{proj}.weight"].float()
                diffs.append((copy - orig).reshape(-1))
    std = float(torch.cat(diffs).std())
    assert abs(std - 0.01) < 0.001, std
    report = _verify(src, out)
    stds = list(report["noise_std"].values())
    assert len(stds) == 48 and abs(sum(stds) / len(stds) - 0.01) < 0.001


@pytest.mark.parametrize("key", SOURCES)
def test_keep_requantises_copies_and_keeps_originals(key, fp8_source, tmp_path):
    src, out = fp8_source(key), tmp_path / "out"
    _grow(src, out, "--noise", "0.01")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == json.loads((src / "config.json").read_text())["quantization_config"]
    before, after = weights(src), weights(out)
    for name, t in before.items():  # originals (experts 0..7 and all but the router) and their scales
        if ".mlp.gate." in name:
            continue  # router rows duplicated
        assert torch.equal(after[name].view(torch.uint8), t.view(torch.uint8)) if t.dtype == torch.float8_e4m3fn \
            else torch.equal(after[name], t), name
    block = config["quantization_config"]["weight_block_size"]
    noise = []
    for layer in (1, 2):
        for e in range(8):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                orig, copy = (f"model.layers.{layer}.mlp.experts.{i}.{proj}.weight" for i in (e, e + 8))
                assert after[copy].dtype == torch.float8_e4m3fn and after[copy].shape == before[orig].shape
                assert after[copy + "_scale_inv"].shape == before[orig + "_scale_inv"].shape
                d = (_dequantize_fp8_weight(after[copy], after[copy + "_scale_inv"], block, torch.float32)
                     - _dequantize_fp8_weight(before[orig], before[orig + "_scale_inv"], block, torch.float32))
                noise.append(d.reshape(-1))
    std = float(torch.cat(noise).std())  # noise and the requantisation's rounding, in dequantised space
    assert 0.008 < std < 0.013, std
    report = _verify(src, out)
    assert len(report["noise_std"]) == 48
    if key == "divides":  # transformers loads the grown fp8 checkpoint (dequantising) with every key in place
        model = load_dequantising(out)
        assert model.config.n_routed_experts == 16


@pytest.mark.parametrize("member", ["weight", "weight_scale_inv"])
def test_verify_fails_on_a_tampered_requantised_copy(member, fp8_source, tmp_path):
    src, out = fp8_source("ragged"), tmp_path / "out"
    _grow(src, out, "--noise", "0.01")
    name = f"model.layers.2.mlp.experts.11.down_proj.{member}"
    f = out / "model.safetensors"
    tensors = load_file(f)
    raw = tensors[name].view(torch.uint8).clone()
    raw.view(-1)[0] ^= 1  # one bit of one value (or scale)
    tensors[name] = raw.view(tensors[name].dtype)
    save_file(tensors, f, metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and name in stdout + err, stdout + err


def test_keep_zero_noise_is_byte_copies(fp8_source, tmp_path):
    src, out = fp8_source("ragged"), tmp_path / "out"
    code, stdout, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["dtype"] == "keep" and summary["quantization"]["format"] == "fp8"
    record = json.loads((out / "moegrow.json").read_text())
    assert record["noise_device"] == "none"  # nothing went through torch
    assert record["growth"]["dtype"] == "keep"
    _verify(src, out)


def test_dry_run_shows_the_conversion(fp8_source, tmp_path):
    src = fp8_source("divides")
    sizes = {}
    for dtype in ("keep", "bfloat16", "float32"):
        code, stdout, err = run("grow-depth", src, tmp_path / "o", "--layers", "2x", "--dtype", dtype,
                                "--dry-run", "--json")
        assert code == 0, err
        s = json.loads(stdout)
        assert s["dtype"] == dtype and s["quantization"]["block_size"] == [8, 8]
        sizes[dtype] = s["bytes_out"]
    w = weights(src)

    def size(keep: bool, per_element: int) -> int:
        """Bytes of the depth-grown checkpoint: layer tensors twice, the others once."""
        total = 0
        for n, t in w.items():
            if n.endswith("_scale_inv") and not keep:
                continue
            each = t.element_size() if keep else 4 if "correction_bias" in n else per_element
            total += t.numel() * each * (2 if n.startswith("model.layers.") else 1)
        return total
    assert sizes == {"keep": size(True, 0), "bfloat16": size(False, 2), "float32": size(False, 4)}
    assert not (tmp_path / "o").exists()


def test_inspect_reports_quantisation(fp8_source, checkpoints):
    src = fp8_source("ragged")
    code, stdout, err = run("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    w = weights(src)
    q = info["quantization"]
    assert q["format"] == "fp8" and q["block_size"] == [16, 16]
    assert q["quantized_tensors"] == sum(t.dtype == torch.float8_e4m3fn for t in w.values())
    n_all = sum(t.numel() for n, t in w.items() if not n.endswith("_scale_inv"))
    assert info["dtype_bytes"]["keep"] == sum(t.numel() * t.element_size() for t in w.values())
    assert info["dtype_bytes"]["float32"] == 4 * n_all
    code, stdout, _ = run("inspect", src.parent / "float", "--json")  # the model before quantisation
    assert (info["total_params"], info["active_params"]) == (json.loads(stdout)["total_params"],
                                                             json.loads(stdout)["active_params"])
    code, stdout, _ = run("inspect", checkpoints["deepseek_v3"], "--json")
    assert json.loads(stdout)["quantization"] is None
    code, _, err = run("inspect", src)
    assert code == 0 and "quantisation: fp8, blocks 16x16" in err + _


def test_float_source_converted_to_bfloat16(checkpoints, tmp_path):
    src, out = checkpoints["deepseek_v3"], tmp_path / "out"
    _grow(src, out, "--dtype", "bfloat16")
    grown = weights(out)
    assert all(t.dtype == torch.bfloat16 for t in grown.values())  # a float32 source keeps nothing in float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits(out)
    record = json.loads((out / "moegrow.json").read_text())
    assert not record["function_preserving"]  # float32 rounded to bfloat16
    _verify(src, out)


def test_bad_dtype_is_refused(fp8_source, tmp_path):
    code, _, err = run("grow-width", fp8_source("divides"), tmp_path / "o", "--experts", "2x", "--dtype", "int8")
    assert code == 2 and "--dtype" in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
