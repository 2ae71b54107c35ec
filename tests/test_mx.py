"""MXFP4 (gpt_oss) and MXFP8 (inkling2) codecs against transformers' own dequantisation and quantisers."""

from __future__ import annotations

import types

import pytest
import torch

from moegrow.quant import mx

from . import mx_checkpoints as ckpt
from .conftest import TOKENS, logits, run


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes, so that -0.0, NaN and every payload compare exactly."""
    return t.contiguous().view(torch.uint8)


def random_mxfp4(*shape: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks (every byte value) [*shape, 16] and scale bytes 1..252 [*shape] (finite in float32)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (*shape, 16), dtype=torch.uint8, generator=gen),
            torch.randint(1, 253, shape, dtype=torch.uint8, generator=gen))


def spread(*shape: int, dim: int = -1, seed: int = 0) -> torch.Tensor:
    """Gaussian values whose blocks of 32 along `dim` span 2**-40 .. 2**40 in magnitude."""
    gen = torch.Generator().manual_seed(seed)
    grid = list(shape)
    grid[dim] //= 32
    powers = torch.randint(-40, 40, grid, generator=gen).float()
    return torch.randn(shape, generator=gen) * torch.exp2(powers).repeat_interleave(32, dim=dim)


def index(folder) -> dict[str, types.SimpleNamespace]:
    """name -> (safetensors dtype, shape) of a checkpoint, as the codecs' detect/groups see it."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            for k in s.keys():  # noqa: SIM118
                sl = s.get_slice(k)
                out[k] = types.SimpleNamespace(dtype=sl.get_dtype(), shape=tuple(sl.get_shape()))
    return out


@pytest.fixture(scope="module")
def mxfp4_source(tmp_path_factory):
    return ckpt.gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss_mxfp4"))


@pytest.fixture(scope="module")
def mxfp8_source(tmp_path_factory):
    return ckpt.inkling2_mxfp8(tmp_path_factory.mktemp("inkling2_mxfp8"))


# ---------------------------------------------------------------- MXFP4

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_mxfp4_is_transformers_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_mxfp4(3, 40, 4)
    scales[0, 0] = torch.tensor([0, 1, 252, 127], dtype=torch.uint8)  # the extreme exponents too
    ours = mx.dequantize_mxfp4(blocks, scales)
    assert ours.dtype == torch.float32 and ours.shape == (3, 128, 40)
    assert torch.equal(bits(ours.to(dtype)), bits(convert_moe_packed_tensors(blocks, scales, dtype=dtype)))
    # streaming: one expert at a time gives the same slice
    assert torch.equal(bits(mx.dequantize_mxfp4(blocks[1:2], scales[1:2])), bits(ours[1:2]))


def test_quantize_mxfp4_follows_the_kernels_rule():
    x = spread(4, 64, 48, dim=-2)
    x[0, :32, 0] = 0.0                       # an all-zero block: scale byte 0
    x[0, :32, 1] = -0.0
    x[1, 5, :] = -1e-30                      # tiny negatives round to -0 (code 8)
    # a block of exact ties (scale 4: amax 24 = 6 * 4): every midpoint between e2m1 magnitudes, both signs
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    x[2, 32:, 7] = ties * 4
    blocks, scales = mx.quantize_mxfp4(x)
    ref_blocks, ref_scales = ckpt.reference_mxfp4(x)
    assert blocks.shape == (4, 48, 2, 16) and scales.shape == (4, 48, 2)
    assert torch.equal(blocks, ref_blocks) and torch.equal(scales, ref_scales)
    assert scales[0, 0, 0] == 0 and scales[0, 1, 0] == 0
    again = mx.quantize_mxfp4(x.clone())
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)  # deterministic


def test_quantize_mxfp4_by_hand():
    """One block of 32 inputs (one output row): amax 7 -> 7/6 rounds up to scale 2 (byte 128); ties away."""
    column = torch.zeros(32)
    column[:10] = torch.tensor([7.0, 0.5, 0.49, -2.5, 5.0, 4.9, 1.0, 2.9, -0.0, 12.0 / 13.0])
    blocks, scales = mx.quantize_mxfp4(column[:, None])       # x is [in, out]: [32, 1]
    assert scales.tolist() == [[128]]
    # 7/2 = 3.5 -> 4 (code 6); 0.25 -> 0.5 (tie, up: 1); 0.245 -> 0; -1.25 -> -1.5 (tie: 8|3);
    # 2.5 -> 3 (tie: 5); 2.45 -> 2 (4); 0.5 -> 0.5 (1); 1.45 -> 1.5 (3); -0 -> 8; 0.46 -> 0.5 (1)
    codes = [6, 1, 0, 11, 5, 4, 1, 3, 8, 1] + [0] * 22
    assert blocks.reshape(-1).tolist() == [codes[i] | codes[i + 1] << 4 for i in range(0, 32, 2)]
    assert mx.dequantize_mxfp4(blocks, scales)[:10, 0].tolist() == [8, 1, 0, -3, 6, 4, 1, 3, -0.0, 1]
    # saturation never needed: the scale always covers amax (amax / scale <= 6)
    x = spread(2, 256, 8, dim=-2, seed=3)
    b, s = mx.quantize_mxfp4(x)
    ratio = x.abs().unflatten(-2, (8, 32)).amax(-2) / torch.exp2(s.float() - 127).transpose(-1, -2)
    assert ratio.max() <= 6.0


def test_mxfp4_requantising_representable_values_gives_them_back():
    blocks, scales = random_mxfp4(4, 24, 3, seed=1)
    x = mx.dequantize_mxfp4(blocks, scales)
    assert torch.equal(bits(mx.dequantize_mxfp4(*mx.quantize_mxfp4(x))), bits(x))
    # a block whose largest code is 6.0 or 4.0 keeps its very bytes
    top = (blocks & 0x7).amax(-1).maximum((blocks >> 4 & 0x7).amax(-1)) >= 6
    b2, s2 = mx.quantize_mxfp4(x)
    assert top.any() and torch.equal(b2[top], blocks[top]) and torch.equal(s2[top], scales[top])


def test_mxfp4_names_and_shapes():
    name = "model.layers.3.mlp.experts.gate_up_proj"
    assert mx.mxfp4_dequantised_name(name + "_blocks") == name == mx.mxfp4_dequantised_name(name + "_scales")
    assert mx.mxfp4_member_names(name) == (name + "_blocks", name + "_scales")
    assert mx.mxfp4_dequantised_shape((32, 5760, 90, 16)) == (32, 2880, 5760)  # gpt-oss-20b's gate_up_proj
    assert mx.mxfp4_member_shapes((32, 2880, 5760)) == ((32, 5760, 90, 16), (32, 5760, 90))
    with pytest.raises(ValueError, match="not an MXFP4"):
        mx.mxfp4_dequantised_name(name)
    with pytest.raises(ValueError, match="divisible by 32"):
        mx.mxfp4_member_shapes((4, 16, 48))


def test_gpt_oss_mxfp4_checkpoint_loads_as_transformers_dequantises_it(mxfp4_source):
    """transformers' own load (Mxfp4Config(dequantize=True), CPU) equals our dequantisation bit for bit."""
    from safetensors.torch import load_file

    tensors = load_file(mxfp4_source / "model.safetensors")
    assert {n.rsplit(".", 1)[1] for n in tensors if n.endswith(("_blocks", "_scales"))} == {
        "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"}
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 64, 1, 16)
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"].dtype == torch.uint8
    state = ckpt.load_mxfp4(mxfp4_source).state_dict()
    checked = 0
    for name, blocks in tensors.items():
        if name.endswith("_blocks"):
            weight = mx.mxfp4_dequantised_name(name)
            assert torch.equal(bits(state[weight]), bits(mx.dequantize_mxfp4(blocks, tensors[weight + "_scales"])))
            checked += 1
    assert checked == 6
    # and the quantised model is close to the float one it came from (what 4 bits can hold)
    float_state = ckpt.gpt_oss_float().state_dict()
    err = (state["model.layers.1.mlp.experts.down_proj"] - float_state["model.layers.1.mlp.experts.down_proj"])
    assert 0 < err.abs().max() <= float_state["model.layers.1.mlp.experts.down_proj"].abs().max() / 4


def test_gpt_oss_mxfp4_width_noise0_keeps_the_logits(mxfp4_source, tmp_path, record_property):
    out = tmp_path / "out"
    code, _, err = run("grow-width", mxfp4_source, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    before = ckpt.mxfp4_logits(mxfp4_source)
    diff = (before - ckpt.mxfp4_logits(out)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert before.abs().max() > 0 and diff <= 1e-5, diff
    import json

    assert json.loads((out / "config.json").read_text())["quantization_config"] == ckpt.GPT_OSS_QUANTIZATION


def test_mxfp4_codec(mxfp4_source):
    from safetensors.torch import load_file

    tensors = index(mxfp4_source)
    codec = mx.Mxfp4.detect({"quantization_config": ckpt.GPT_OSS_QUANTIZATION}, tensors)
    assert isinstance(codec, mx.Mxfp4)
    assert mx.Mxfp4.detect({}, tensors) is None
    assert mx.Mxfp4.detect({"quantization_config": {"quant_method": "fp8"}}, tensors) is None
    groups = {g.name: g for g in codec.groups(tensors)}
    assert len(groups) == 6
    group = groups["model.layers.2.mlp.experts.gate_up_proj"]
    assert group.format == "mxfp4" and group.shape == (4, 32, 64)
    assert [m.role for m in group.members] == ["values", "scales"]
    assert all(codec.member_name(g.name, m.role) == m.name for g in groups.values() for m in g.members)
    assert group.member("values").shape == (4, 64, 1, 16) and group.member("scales").dtype == "U8"
    data = load_file(mxfp4_source / "model.safetensors")
    members = {m.role: data[m.name] for m in group.members}
    x = codec.dequantize(group, members)
    assert torch.equal(x, mx.dequantize_mxfp4(members["values"], members["scales"]))
    # requantised: the same values (a block whose amax rounded down to a power of two takes a smaller scale)
    assert torch.equal(bits(codec.dequantize(group, codec.quantize(group, x))), bits(x))
    # one expert slice at a time: no values mixed across the expert axis
    part = codec.quantize(group, x[1:3] * 1.7)
    whole = codec.quantize(group, x * 1.7)
    assert all(torch.equal(part[r], whole[r][1:3]) for r in ("values", "scales"))
    assert codec.describe()["format"] == "mxfp4"


# ---------------------------------------------------------------- MXFP8

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_mxfp8_is_transformers_bit_for_bit(dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    gen = torch.Generator().manual_seed(0)
    values = torch.randint(0, 256, (3, 16, 96), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    scales = torch.randint(0, 255, (3, 16, 3), dtype=torch.uint8, generator=gen)
    ours = mx.dequantize_mxfp8(values, scales)
    assert ours.dtype == torch.float32 and ours.shape == values.shape
    theirs = Fp8Dequantize(None)._dequantize_one(values, scales, output_dtype=dtype)
    assert torch.equal(bits(ours.to(dtype)), bits(theirs))
    assert torch.equal(bits(mx.dequantize_mxfp8(values[2:], scales[2:])), bits(ours[2:]))


def test_quantize_mxfp8_is_transformers_quantiser():
    """Fp8Quantize with Inkling-2's config (ue8m0 scales, [1, 32] blocks) gives the same bytes."""
    for seed in range(20):
        x = spread(4, 8, 64, seed=seed)
        x[..., 0] = 448 * torch.exp2(torch.randint(-10, 10, (4, 8), generator=torch.Generator().manual_seed(seed)))
        x[0, 0] = 0.0
        values, scales = mx.quantize_mxfp8(x)
        ref_values, ref_scales = ckpt.transformers_mxfp8(x)
        assert values.dtype == torch.float8_e4m3fn and scales.dtype == torch.uint8 and scales.shape == (4, 8, 2)
        assert torch.equal(bits(values), bits(ref_values)) and torch.equal(scales, ref_scales), seed


def test_mxfp8_requantising_representable_values_gives_them_back():
    gen = torch.Generator().manual_seed(2)
    values = (torch.randn(2, 8, 64, generator=gen) * 40).to(torch.float8_e4m3fn)
    scales = torch.randint(100, 160, (2, 8, 2), dtype=torch.uint8, generator=gen)
    x = mx.dequantize_mxfp8(values, scales)
    assert torch.equal(bits(mx.dequantize_mxfp8(*mx.quantize_mxfp8(x))), bits(x))


def test_inkling2_mxfp8_checkpoint_as_transformers_dequantises_it(mxfp8_source):
    from safetensors.torch import load_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    tensors = load_file(mxfp8_source / "model.safetensors")
    w13 = tensors["model.llm.layers.0.mlp.experts.w13_weight"]
    s13 = tensors["model.llm.layers.0.mlp.experts.w13_weight_scale"]
    assert w13.dtype == torch.float8_e4m3fn and w13.shape == (4, 64, 32)
    assert s13.dtype == torch.uint8 and s13.shape == (4, 64, 1)
    quantised = [n for n in tensors if n.endswith("_scale")]
    assert len(quantised) == 6
    for scale in quantised:
        values = tensors[scale.removesuffix("_scale")]
        theirs = Fp8Dequantize(None)._dequantize_one(values, tensors[scale], output_dtype=torch.float32)
        assert torch.equal(bits(mx.dequantize_mxfp8(values, tensors[scale])), bits(theirs)), scale


def test_inkling2_mxfp8_dequantised_loads_as_transformers_round_trip(mxfp8_source, tmp_path, record_property):
    """Our dequantised experts, written as a float checkpoint, load cleanly and give the logits of the float
    model whose experts went through transformers' own Fp8Quantize and Fp8Dequantize in memory; the same
    checkpoint without the scales applied (what transformers 5.23's CPU dequantising load of Inkling-2
    computes) is far off."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    out = tmp_path / "dequantised"
    shutil.copytree(mxfp8_source, out)
    tensors = load_file(mxfp8_source / "model.safetensors")
    unscaled = dict(tensors)
    for name in [n for n in tensors if n.endswith("_scale")]:
        weight = name.removesuffix("_scale")
        tensors[weight] = mx.dequantize_mxfp8(tensors[weight], tensors.pop(name))
        del unscaled[name]
        unscaled[weight] = unscaled[weight].to(torch.float32)
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    model = ckpt.inkling2_float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                values, scales = ckpt.transformers_mxfp8(p)
                p.copy_(Fp8Dequantize(None)._dequantize_one(values, scales, output_dtype=torch.float32))
        reference = model(input_ids=TOKENS).logits
    diff = (logits(out) - reference).abs().max().item()
    save_file(unscaled, out / "model.safetensors", metadata={"format": "pt"})
    wrong = (logits(out) - reference).abs().max().item()
    record_property("max_logit_diff", diff)
    record_property("max_logit_diff_unscaled", wrong)
    assert diff <= 1e-5 and wrong > 0.1, (diff, wrong)


def test_mxfp8_codec(mxfp8_source):
    import json

    from safetensors.torch import load_file

    tensors = index(mxfp8_source)
    config = json.loads((mxfp8_source / "config.json").read_text())
    codec = mx.Mxfp8.detect(config, tensors)
    assert isinstance(codec, mx.Mxfp8)
    assert isinstance(mx.Mxfp8.detect({}, tensors), mx.Mxfp8)  # the Hub config has no quantization_config
    assert mx.Mxfp8.detect({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}},
                           tensors) is None
    assert mx.Mxfp8.detect({"quantization_config": ckpt.GPT_OSS_QUANTIZATION}, tensors) is None
    groups = {g.name: g for g in codec.groups(tensors)}
    assert sorted(groups) == sorted(f"model.llm.layers.{i}.mlp.experts.{w}" for i in range(3)
                                    for w in ("w13_weight", "w2_weight"))
    group = groups["model.llm.layers.1.mlp.experts.w2_weight"]
    assert group.shape == (4, 32, 32) and group.member("scales").name == group.name + "_scale"
    assert all(codec.member_name(g.name, m.role) == m.name for g in groups.values() for m in g.members)
    data = load_file(mxfp8_source / "model.safetensors")
    members = {m.role: data[m.name] for m in group.members}
    x = codec.dequantize(group, members)
    assert torch.equal(bits(codec.dequantize(group, codec.quantize(group, x))), bits(x))
    part, whole = codec.quantize(group, x[2:] * 3.3), codec.quantize(group, x * 3.3)
    assert all(torch.equal(bits(part[r]), bits(whole[r][2:])) for r in ("values", "scales"))
    assert codec.describe() == {"format": "mxfp8", "block_size": [1, 32], "scale_fmt": "e8m0", "element": "e4m3"}
