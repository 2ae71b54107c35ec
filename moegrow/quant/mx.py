"""Microscaling formats: MXFP4 (gpt_oss experts) and MXFP8 (inkling2 experts).

Both share one power-of-two scale (an e8m0 byte b: 2**(b - 127)) per 32 consecutive values along
a weight's input dimension.

MXFP4, as the gpt-oss release stores it: ``X_blocks`` (uint8 [..., rows, G, 16], two e2m1 codes
per byte, low nibble first) and ``X_scales`` (uint8 [..., rows, G]) stand for ``X``, the float
parameter transformers computes with, [..., G*32, rows] (the model holds [E, in, out]: the blocks
are stored output-major, and dequantisation transposes the last two dims).

MXFP8, as the Inkling-2 release stores it: ``X`` (float8_e4m3fn [..., rows, cols]) and
``X_scale`` (uint8 [..., rows, cols/32]), a block of [1, 32]; the dequantised tensor keeps X's
name and shape.

Dequantisation is transformers' own arithmetic (``integrations/mxfp4.py``
``convert_moe_packed_tensors``; ``finegrained_fp8.py`` ``Fp8Dequantize._dequantize_one``), bit
for bit in float32. Quantisation computes the block scale as amax / (the element format's
largest value, 6 or 448) rounded *up* to a power of two, so no value saturates (the OCP spec's
floor(log2(amax)) - emax rounds down and saturates instead):

- MXFP4 as OpenAI's triton kernels do it (``downcast_to_mxfp``, the quantiser transformers' MXFP4
  path calls): e2m1 elements round to nearest with ties away from zero, at most 6; an all-zero
  block gets scale byte 0;
- MXFP8 as transformers' ``Fp8Quantize`` does it with Inkling-2's config (ue8m0, [1, 32]): e4m3
  elements by torch's round-to-nearest-even cast, clamped to 448; an all-zero block gets 1.0.

Requantising values that already are MX-representable gives them back exactly (the scale may drop
to the smallest one that holds them, the values do not change).

Every function takes one tensor (or a slice of one along its leading dims) and never a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .codec import Codec, Member, QuantGroup, TensorMeta

if TYPE_CHECKING:
    import torch

BLOCK = 32            # values per shared scale
E8M0_BIAS = 127
FP4_MAX, FP8_MAX = 6.0, 448.0
# e2m1 code -> value (bit 3 the sign), as transformers' FP4_VALUES
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# midpoints between consecutive e2m1 magnitudes: a magnitude's code is how many of them it reaches
_FP4_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

MXFP4_BLOCKS, MXFP4_SCALES = "_blocks", "_scales"
MXFP8_SCALE = "_scale"


# ---------------------------------------------------------------- shared exponent

def e8m0_exponent(amax: torch.Tensor, top: float) -> torch.Tensor:
    """Each block's scale byte: 2**(byte - 127) is amax / `top` rounded up to a power of two.

    Computed on the float32 bits of amax / top, as the triton kernels do (0 for an all-zero block,
    at least 1 otherwise)."""
    import torch

    ratio = (amax.to(torch.float32) / top).contiguous()
    bits = ratio.view(torch.int32).to(torch.int64)
    # a non-zero mantissa carries into the exponent field: the next power of two up
    exponent = ((bits + 0x7FFFFF) >> 23) & 0xFF
    return exponent.to(torch.uint8)


def e8m0_to_float(scales: torch.Tensor) -> torch.Tensor:
    """2**(byte - 127) in float32."""
    import torch

    return torch.exp2(scales.to(torch.float32) - E8M0_BIAS)


def _blocked_scales(x32: torch.Tensor, top: float, zero: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as [..., G, 32] times each block's inverse scale, the scale bytes [..., G]); an all-zero
    block gets byte `zero` (its values are 0 whatever the scale)."""
    import torch

    if x32.shape[-1] % BLOCK:
        raise ValueError(f"MX quantisation needs a last dim divisible by {BLOCK}, got {tuple(x32.shape)}")
    groups = x32.unflatten(-1, (x32.shape[-1] // BLOCK, BLOCK))
    amax = groups.abs().amax(dim=-1)
    exponent = torch.where(amax == 0, zero, e8m0_exponent(amax, top)).to(torch.uint8)
    inverse = torch.where(amax == 0, 0.0, torch.exp2(E8M0_BIAS - exponent.to(torch.float32)))
    return groups * inverse.unsqueeze(-1), exponent


# ---------------------------------------------------------------- MXFP4

def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 [..., G*32, rows] from blocks [..., rows, G, 16] and scales [..., rows, G].

    transformers' ``convert_moe_packed_tensors`` at dtype float32: a table look-up of each nibble,
    then ``ldexp`` by the scale's exponent, then the last two dims swapped."""
    import torch

    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    blocks = blocks.to(torch.uint8)
    table = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    values = torch.stack((table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]), dim=-1)
    values = values.flatten(-2)  # [..., rows, G, 32], low nibble first
    values = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return values.flatten(-2).transpose(-1, -2).contiguous()


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., rows, G, 16], scales [..., rows, G]) for float x [..., G*32, rows].

    The inverse of `dequantize_mxfp4`: blocks of 32 along x's second-to-last dim (the input dim)."""
    import torch

    x32 = x.to(torch.float32).transpose(-1, -2).contiguous()
    scaled, exponent = _blocked_scales(x32, FP4_MAX, zero=0)  # the kernels' byte
    midpoints = torch.tensor(_FP4_MIDPOINTS, dtype=torch.float32, device=x.device)
    # ties (a magnitude on a midpoint) round away from zero; 5 and above saturate to 6 (code 7)
    magnitude = torch.bucketize(scaled.abs(), midpoints, right=True).to(torch.uint8)
    codes = magnitude | (torch.signbit(scaled).to(torch.uint8) << 3)
    pairs = codes.unflatten(-1, (BLOCK // 2, 2))
    return (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous(), exponent.contiguous()


def mxfp4_dequantised_name(name: str) -> str:
    """``X_blocks`` or ``X_scales`` -> ``X``."""
    for suffix in (MXFP4_BLOCKS, MXFP4_SCALES):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name}: not an MXFP4 *_blocks / *_scales tensor")


def mxfp4_member_names(name: str) -> tuple[str, str]:
    """``X`` -> (``X_blocks``, ``X_scales``)."""
    return name + MXFP4_BLOCKS, name + MXFP4_SCALES


def mxfp4_dequantised_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., rows, G, 16] -> [..., G*32, rows]."""
    *prefix, rows, groups, _ = blocks_shape
    return (*prefix, groups * BLOCK, rows)


def mxfp4_member_shapes(shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """[..., K, rows] -> (blocks [..., rows, K/32, 16], scales [..., rows, K/32])."""
    *prefix, k, rows = shape
    if k % BLOCK:
        raise ValueError(f"MXFP4 needs an input dim divisible by {BLOCK}, got {tuple(shape)}")
    return (*prefix, rows, k // BLOCK, BLOCK // 2), (*prefix, rows, k // BLOCK)


# ---------------------------------------------------------------- MXFP8

def dequantize_mxfp8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 of values' shape: each value times 2**(its block's byte - 127).

    transformers' ``Fp8Dequantize._dequantize_one`` for uint8 (e8m0) scales: the block shape is
    read off the scale grid ([1, 32] in the Inkling-2 release)."""
    import torch

    rows, cols = values.shape[-2:]
    scale_rows, scale_cols = scales.shape[-2:]
    if tuple(values.shape[:-2]) != tuple(scales.shape[:-2]) or rows % scale_rows or cols % scale_cols:
        raise ValueError(f"MXFP8 values {tuple(values.shape)} do not match scales {tuple(scales.shape)}")
    q = values.to(torch.float32).unflatten(-1, (scale_cols, cols // scale_cols))
    q = q.unflatten(-3, (scale_rows, rows // scale_rows))  # [..., sr, br, sc, bc]
    s = e8m0_to_float(scales)[..., :, None, :, None]
    return (q * s).reshape(values.shape)


def quantize_mxfp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values of x's shape, uint8 scales [..., rows, cols/32]): blocks [1, 32].

    The same bytes as transformers' ``Fp8Quantize`` with Inkling-2's config (ue8m0, [1, 32]),
    which gives an all-zero block the scale 1.0 (byte 127)."""
    import torch

    scaled, exponent = _blocked_scales(x.to(torch.float32), FP8_MAX, zero=E8M0_BIAS)  # Fp8Quantize's 1.0
    values = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).flatten(-2)
    return values.contiguous(), exponent.contiguous()


def mxfp8_scale_name(name: str) -> str:
    """``...w13_weight`` -> ``...w13_weight_scale``."""
    return name + MXFP8_SCALE


def mxfp8_scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., rows, cols] -> [..., rows, cols/32]."""
    if shape[-1] % BLOCK:
        raise ValueError(f"MXFP8 needs a last dim divisible by {BLOCK}, got {tuple(shape)}")
    return (*shape[:-1], shape[-1] // BLOCK)


# ---------------------------------------------------------------- codecs

class Mxfp4(Codec):
    """gpt_oss's MXFP4 experts (``quantization_config.quant_method: mxfp4``)."""

    format = "mxfp4"
    roles = ("values", "scales")

    @classmethod
    def detect(cls, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> Mxfp4 | None:
        q = config.get("quantization_config")
        if not isinstance(q, dict) or q.get("quant_method") != "mxfp4":
            return None
        codec = cls()
        return codec if codec.groups(tensors) else None

    def groups(self, tensors: Mapping[str, TensorMeta]) -> list[QuantGroup]:
        found = []
        for name, t in tensors.items():
            if not name.endswith(MXFP4_BLOCKS) or t.dtype != "U8" or len(t.shape) < 3 or t.shape[-1] != BLOCK // 2:
                continue
            weight = mxfp4_dequantised_name(name)
            s = tensors.get(weight + MXFP4_SCALES)
            if s is None or s.dtype != "U8" or tuple(s.shape) != tuple(t.shape[:-1]):
                continue
            found.append(QuantGroup(self.format, weight, mxfp4_dequantised_shape(tuple(t.shape)), (
                Member("values", name, "U8", tuple(t.shape)),
                Member("scales", weight + MXFP4_SCALES, "U8", tuple(s.shape)))))
        return found

    def member_name(self, name: str, role: str) -> str:
        return mxfp4_member_names(name)[self.roles.index(role)]

    def dequantize(self, group: QuantGroup, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_mxfp4(data["values"], data["scales"])

    def quantize(self, group: QuantGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        blocks, scales = quantize_mxfp4(x)
        return {"values": blocks, "scales": scales}

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "block_size": BLOCK, "scale_fmt": "e8m0", "element": "e2m1"}


class Mxfp8(Codec):
    """Inkling-2's MXFP8 experts: float8_e4m3fn ``X`` with a uint8 e8m0 ``X_scale`` per [1, 32].

    The Hub config of an Inkling-2 release has no ``quantization_config`` (transformers adds
    ``quant_method: fp8, weight_block_size: [1, 32], scale_fmt: ue8m0`` on load): the tensors decide,
    a float8 tensor with a uint8 ``_scale`` beside it of one byte per 32 values along its last dim."""

    format = "mxfp8"
    roles = ("values", "scales")

    @classmethod
    def detect(cls, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> Mxfp8 | None:
        q = config.get("quantization_config")
        if q is not None and not (isinstance(q, dict) and q.get("quant_method") == "fp8"
                                  and list(q.get("weight_block_size") or []) == [1, BLOCK]):
            return None
        codec = cls()
        return codec if codec.groups(tensors) else None

    def groups(self, tensors: Mapping[str, TensorMeta]) -> list[QuantGroup]:
        found = []
        for name, t in tensors.items():
            if t.dtype != "F8_E4M3" or len(t.shape) < 2 or t.shape[-1] % BLOCK:
                continue
            s = tensors.get(mxfp8_scale_name(name))
            if s is None or s.dtype != "U8" or tuple(s.shape) != mxfp8_scale_shape(tuple(t.shape)):
                continue
            found.append(QuantGroup(self.format, name, tuple(t.shape), (
                Member("values", name, "F8_E4M3", tuple(t.shape)),
                Member("scales", mxfp8_scale_name(name), "U8", tuple(s.shape)))))
        return found

    def member_name(self, name: str, role: str) -> str:
        return name if role == "values" else mxfp8_scale_name(name)

    def dequantize(self, group: QuantGroup, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return dequantize_mxfp8(data["values"], data["scales"])

    def quantize(self, group: QuantGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values, scales = quantize_mxfp8(x)
        return {"values": values, "scales": scales}

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "block_size": [1, BLOCK], "scale_fmt": "e8m0", "element": "e4m3"}
