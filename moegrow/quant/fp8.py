"""Fine-grained fp8 (`quant_method: fp8`): float8 values with float32 `weight_scale_inv` per block.

DeepSeek-V3 / V3.1 / R1 / V3.2, Kimi-K2, GLM-4.5-FP8, MiniMax-M2 and the Qwen3 FP8 releases store
each linear weight `X.weight` as float8_e4m3fn and `X.weight_scale_inv`, one float32 per
`weight_block_size` block (edge blocks may be partial: DeepSeek-V3's kv_a_proj_with_mqa has 576
rows for 128-row blocks); fused experts saved by transformers use `X` and `X_scale_inv`, blocks
over the last two dims. `scale_fmt: ue8m0` stores power-of-two scales (float32 or float8_e8m0fnu);
`weight_block_size: null` is one scale per tensor.

Dequantisation is transformers' `_dequantize_fp8_weight` (DeepSeek's `weight_dequant`): block
size from the config, each value times its block's scale in float32. Quantisation is per block:
scale = amax / 448 (the fp8 maximum; 1 for an all-zero block), rounded up to a power of two for
ue8m0, values = clamp(x / scale) in float8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .codec import Codec, Member, QuantGroup, TensorMeta
from .tensors import torch_dtype

if TYPE_CHECKING:
    import torch

VALUE_DTYPES = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}  # dtype -> largest finite value
SCALE_DTYPES = ("F32", "BF16", "F8_E8M0")
SUFFIX = "_scale_inv"


class BlockFp8(Codec):
    format = "fp8"

    def __init__(self, block: tuple[int, int] | None, scale_fmt: str = "float") -> None:
        self.block = block
        self.scale_fmt = scale_fmt

    @classmethod
    def detect(cls, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> BlockFp8 | None:
        q = config.get("quantization_config")
        if not isinstance(q, dict) or q.get("quant_method") != "fp8":
            return None
        block = q.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                return None
            block = (block[0], block[1])
        codec = cls(block, str(q.get("scale_fmt") or "float"))
        groups = codec.groups(tensors)
        if not groups:
            return None
        codec._found = (tensors, groups)  # for the `groups` call that follows detection (46,000 for DeepSeek-V3)
        return codec

    _found: tuple[Mapping[str, TensorMeta], list[QuantGroup]] | None = None

    def groups(self, tensors: Mapping[str, TensorMeta]) -> list[QuantGroup]:
        found, self._found = self._found, None
        if found is not None and found[0] is tensors:
            return list(found[1])
        found = []
        for name, t in tensors.items():
            if t.dtype not in VALUE_DTYPES or len(t.shape) < 2:
                continue
            s = tensors.get(self.member_name(name, "scales"))
            if s is None or s.dtype not in SCALE_DTYPES or tuple(s.shape) != self.scale_shape(t.shape, s.shape):
                continue
            found.append(QuantGroup(self.format, name, tuple(t.shape), (
                Member("values", name, t.dtype, tuple(t.shape)),
                Member("scales", self.member_name(name, "scales"), s.dtype, tuple(s.shape)))))
        return found

    def scale_shape(self, shape: tuple[int, ...], found: tuple[int, ...]) -> tuple[int, ...]:
        """The scale grid of a weight of `shape` (`found`: the stored one, for per-tensor's () or (1,))."""
        if self.block is None:
            return tuple(found) if tuple(found) in ((), (1,)) else ()
        b0, b1 = self.block
        return (*shape[:-2], -(-shape[-2] // b0), -(-shape[-1] // b1))

    def member_name(self, name: str, role: str) -> str:
        if role == "values":
            return name
        return name + SUFFIX  # X.weight -> X.weight_scale_inv, X -> X_scale_inv

    def dequantize(self, group: QuantGroup, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        w = data["values"].to(torch.float32)
        s = data["scales"].to(torch.float32)
        if self.block is None:
            return w * s.reshape(())
        rows, cols = w.shape[-2:]
        b0, b1 = self.block
        s = s.repeat_interleave(b0, dim=-2)[..., :rows, :].repeat_interleave(b1, dim=-1)[..., :cols]
        return w * s

    def quantize(self, group: QuantGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        values, scales = group.member("values"), group.member("scales")
        top = VALUE_DTYPES[values.dtype]
        x = x.to(torch.float32)
        if self.block is None:
            s = self._scale(x.abs().amax(), top, scales.dtype)
            q = (x / s.to(torch.float32)).clamp(-top, top).to(torch_dtype(values.dtype))
            return {"values": q, "scales": s.reshape(scales.shape)}
        b0, b1 = self.block
        rows, cols = x.shape[-2:]
        r, c = -(-rows // b0), -(-cols // b1)
        padded = x.new_zeros((*x.shape[:-2], r * b0, c * b1))
        padded[..., :rows, :cols] = x
        blocks = padded.unflatten(-1, (c, b1)).unflatten(-3, (r, b0))  # (..., r, b0, c, b1)
        s = self._scale(blocks.abs().amax(dim=(-3, -1)), top, scales.dtype)
        q = (blocks / s.to(torch.float32)[..., :, None, :, None]).clamp(-top, top)
        q = q.flatten(-2).flatten(-3, -2)[..., :rows, :cols]
        return {"values": q.to(torch_dtype(values.dtype)), "scales": s}

    def _scale(self, amax: torch.Tensor, top: float, dtype: str) -> torch.Tensor:
        """Each block's scale, amax / `top` (1 for an all-zero block), in the scale dtype. Computed on the
        CPU (one value per block): CUDA divides by a scalar as a multiply by its reciprocal, which rounds
        some scales one ulp away from the CPU's (measured on an H100), and the bytes must not depend on
        the device."""
        import torch

        device, amax = amax.device, amax.cpu()
        s = torch.where(amax > 0, amax / top, torch.ones_like(amax))
        if self.scale_fmt == "ue8m0" or dtype == "F8_E8M0":
            s = torch.exp2(torch.ceil(torch.log2(s)))
        return s.to(torch_dtype(dtype)).to(device)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "block_size": list(self.block) if self.block else None,
                "scale_fmt": self.scale_fmt}
