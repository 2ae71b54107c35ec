"""fp8 with one scale per output channel or per tensor: transformers' `fbgemm_fp8` and the FP8
schemes of `compressed-tensors` ("-FP8-dynamic" releases and the like).

Both store a quantised weight `X.weight` (or a fused expert tensor `X`) as float8_e4m3fn with its
scale `X.weight_scale` (`X_scale`) beside it, and dequantise it as values times scale, broadcast:

- fbgemm_fp8 (`integrations/fbgemm_fp8.py`): a linear's `weight_scale` is float32 [out, 1] (one per
  output row, `quantize_fp8_per_row`); Llama-4's fused experts (`FbgemmFp8Llama4TextExperts`) hold
  `gate_up_proj` [E, hidden, 2*d] with `gate_up_proj_scale` [E, 1, 2*d] and `down_proj` [E, d, hidden]
  with `down_proj_scale` [E, hidden, 1]: both one scale per output, i.e. per value of the last dim
  (the [E, N, 1] one stored transposed). transformers has no CPU path: its kernels (and the
  `torch._scaled_mm` it calls on XPU) compute with (values * scale) per output channel.
- compressed-tensors, format `float-quantized` (or `naive-quantized`), weights {type: float,
  num_bits: 8}, strategy `channel` ([out, 1]) or `tensor` ([1]): the scale in the model's dtype
  (bf16 usually) or float32; `input_scale` (static activation scales) and `weight_zero_point` may
  sit beside (`extras`: kept under --dtype keep, dropped when dequantising). Its decompressor
  computes values.to(scale dtype) * scale, transformers' fused-expert path values.float() *
  scale.float(): the same numbers, since an e4m3 value times a bf16, fp16 or fp32 scale is exact in
  float32 (at most 4 + 11 significant bits) before the final rounding.

Dequantisation here is values.float() * scale.float(). Quantisation (a noised copy): per channel
(or tensor) scale = amax / 448 in float32, stored in the scale's dtype (an all-zero channel gets
1.0 for fbgemm, the scale dtype's eps for compressed-tensors, as its `calculate_qparams`), values =
clamp(x / stored scale, -448, 448) cast to float8_e4m3fn (round to nearest even).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .codec import Codec, Member, QuantGroup, TensorMeta
from .tensors import torch_dtype

if TYPE_CHECKING:
    import torch

FP8_MAX = 448.0
SCALE_DTYPES = ("F32", "BF16", "F16")
SUFFIX = "_scale"  # X.weight -> X.weight_scale, X -> X_scale
# compressed-tensors tensors beside a quantised linear that stand for no weight value
CT_EXTRAS = (".input_scale", ".weight_zero_point", ".input_zero_point")


def scale_layout(values: tuple[int, ...], scale: tuple[int, ...], last_dim: bool) -> str | None:
    """How a scale of shape `scale` applies to values of shape `values`: ``tensor`` (one scale),
    ``rows`` ([..., K, 1]: one per row), ``columns`` ([..., 1, N]), ``columns_t`` ([..., N, 1] for 3-d
    values with `last_dim`: fbgemm's down_proj, one per column stored transposed); None if none."""
    lead, (k, n) = tuple(values[:-2]), values[-2:]
    if scale in ((), (1,)) and len(values) == 2:
        return "tensor"
    if len(scale) != len(values) or tuple(scale[:-2]) != lead:
        return None
    if len(values) >= 3 and last_dim:  # fbgemm's fused experts: one scale per output (last dim)
        return "columns" if scale[-2:] == (1, n) else "columns_t" if scale[-2:] == (n, 1) else None
    return "rows" if scale[-2:] == (k, 1) else "columns" if scale[-2:] == (1, n) else None


class ChannelFp8(Codec):
    """The shared rules; subclasses name their `quant_method` and all-zero scale."""

    format = ""
    quant_method = ""
    last_dim = False     # 3-d scales are per last dim (fbgemm's Llama-4 experts)
    zero_scale = "one"   # all-zero channel: "one" (1.0) or "eps" (the scale dtype's eps)

    @classmethod
    def accepts(cls, q: Mapping[str, Any]) -> bool:
        return q.get("quant_method") == cls.quant_method

    @classmethod
    def detect(cls, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> ChannelFp8 | None:
        q = config.get("quantization_config")
        if not isinstance(q, dict) or not cls.accepts(q):
            return None
        codec = cls()
        return codec if codec.groups(tensors) else None

    def groups(self, tensors: Mapping[str, TensorMeta]) -> list[QuantGroup]:
        found = []
        for name, t in tensors.items():
            if t.dtype != "F8_E4M3" or len(t.shape) < 2:
                continue
            s = tensors.get(name + SUFFIX)
            if s is None or s.dtype not in SCALE_DTYPES or not self._layout(t.shape, s.shape):
                continue
            found.append(QuantGroup(self.format, name, tuple(t.shape), (
                Member("values", name, t.dtype, tuple(t.shape)),
                Member("scales", name + SUFFIX, s.dtype, tuple(s.shape)))))
        return found

    def _layout(self, values: tuple[int, ...], scale: tuple[int, ...]) -> str | None:
        return scale_layout(tuple(values), tuple(scale), self.last_dim)

    def member_name(self, name: str, role: str) -> str:
        return name if role == "values" else name + SUFFIX

    def dequantize(self, group: QuantGroup, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        q, s = data["values"].to(torch.float32), data["scales"].to(torch.float32)
        layout = self._layout(group.shape, group.member("scales").shape)
        if layout == "tensor":
            return q * s.reshape(())
        return q * (s.transpose(-1, -2) if layout == "columns_t" else s)

    def quantize(self, group: QuantGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        scales = group.member("scales")
        layout = self._layout(group.shape, scales.shape)
        x = x.to(torch.float32)
        if layout == "tensor":
            amax = x.abs().amax().reshape(scales.shape)
        else:
            amax = x.abs().amax(dim=-1 if layout == "rows" else -2, keepdim=True)
        s = self._scale(amax, scales.dtype)
        stored = s.transpose(-1, -2).contiguous() if layout == "columns_t" else s
        values = (x / s.to(torch.float32).reshape(s.shape if layout != "tensor" else ()))
        return {"values": values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), "scales": stored}

    def _scale(self, amax: torch.Tensor, dtype: str) -> torch.Tensor:
        """amax / 448 per channel (or tensor), on the CPU so that the bytes do not depend on the device
        (see `BlockFp8._scale`)."""
        import torch

        device, amax = amax.device, amax.cpu()
        target = torch_dtype(dtype)
        zero = torch.finfo(target).eps if self.zero_scale == "eps" else 1.0
        s = (amax / FP8_MAX).to(target)
        return torch.where(amax > 0, s, torch.full_like(s, zero)).to(device)

    def describe(self) -> dict[str, Any]:
        return {"format": self.format, "block_size": None, "scale_fmt": "per-channel or per-tensor"}


class FbgemmFp8(ChannelFp8):
    """transformers' `fbgemm_fp8` (Llama-4 Maverick FP8 and other fbgemm releases)."""

    format = "fbgemm_fp8"
    quant_method = "fbgemm_fp8"
    last_dim = True


class CompressedFp8(ChannelFp8):
    """compressed-tensors' FP8 weights (strategy channel or tensor)."""

    format = "compressed-tensors-fp8"
    quant_method = "compressed-tensors"
    zero_scale = "eps"

    @classmethod
    def accepts(cls, q: Mapping[str, Any]) -> bool:
        """Every config group quantises weights to 8-bit floats, stored as float8 (not packed)."""
        groups = q.get("config_groups")
        if q.get("quant_method") != cls.quant_method or not isinstance(groups, dict) or not groups:
            return False
        for g in groups.values():
            w = g.get("weights") if isinstance(g, dict) else None
            fmt = g.get("format") or q.get("format")
            if not (isinstance(w, dict) and w.get("type") == "float" and w.get("num_bits") == 8
                    and w.get("strategy", "tensor") in ("tensor", "channel")
                    and fmt in ("float-quantized", "naive-quantized")):
                return False
        return True

    def extras(self, tensors: Mapping[str, TensorMeta]) -> list[str]:
        weights = {g.name.removesuffix(".weight") for g in self.groups(tensors)}
        return [n for n in tensors if n.endswith(CT_EXTRAS) and n.rsplit(".", 1)[0] in weights]
