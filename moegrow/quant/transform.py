"""Computing the parts of an encoded output tensor (`plan.Encode`): decode, scale, noise, encode.

Shared by execution and `verify` (which recomputes them bit for bit). Each part is computed alone:
its source (a float tensor, or a quantised weight's members) read, decoded to float32 (float64 for
float64), scaled, noised with the noise seeded by the encoded weight's dequantised output name,
and written as the output's float dtype or as one member of the source's quantised format.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..io import DTYPE_SIZES
from ..plan import OutTensor, Part, Plan, TensorMeta
from .tensors import from_bytes, to_bytes, torch_dtype

Reader = Callable[[str, int, int], bytes]  # (source tensor, offset in it, byte count) -> bytes


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _sliced(shape: tuple[int, ...], part: Part) -> tuple[int, ...]:
    """The shape of `part`'s rows of a tensor of `shape` (rows run along axis 0)."""
    if part.rows is None:
        return tuple(shape)
    return (part.rows[1] - part.rows[0], *shape[1:])


def verbatim(t: OutTensor, part: Part, tensors: Mapping[str, TensorMeta]) -> bool:
    """Whether a part of an encoded tensor is a byte copy (an original's member under --dtype keep)."""
    return part.is_copy and not part.decode and tensors[part.source].dtype == t.dtype


def part_shape(plan: Plan, t: OutTensor, part: Part, tensors: Mapping[str, TensorMeta]) -> tuple[int, ...]:
    """The shape of `part`'s slice of the output tensor."""
    if t.encode is not None and t.encode.format and part.decode:
        return _sliced(plan.quant.groups[part.source].member(t.encode.member).shape, part)
    if part.decode:
        return _sliced(plan.quant.groups[part.source].shape, part)
    return _sliced(tensors[part.source].shape, part)


def part_nbytes(plan: Plan, t: OutTensor, part: Part, tensors: Mapping[str, TensorMeta]) -> int:
    return _numel(part_shape(plan, t, part, tensors)) * DTYPE_SIZES[t.dtype]


def _read(read: Reader, name: str, dtype: str, shape: tuple[int, ...], part: Part) -> Any:
    nbytes = _numel(shape) * DTYPE_SIZES[dtype]
    off, n = part.span(nbytes)
    return from_bytes(read(name, off, n), dtype, _sliced(shape, part))


def source_values(plan: Plan, part: Part, tensors: Mapping[str, TensorMeta], read: Reader) -> Any:
    """A part's source as float32 (float64 for a float64 tensor), decoded where quantised, not yet scaled;
    a filled part (identity depth init) is its constant, its source unread."""
    import torch

    if part.fill is not None:
        shape = plan.quant.groups[part.source].shape if part.decode else tuple(tensors[part.source].shape)
        wide = not part.decode and tensors[part.source].dtype == "F64"
        return torch.full(_sliced(shape, part), part.fill, dtype=torch.float64 if wide else torch.float32)

    if part.decode:
        g = plan.quant.groups[part.source]
        data = {m.role: _read(read, m.name, m.dtype, m.shape, part) for m in g.members}
        return plan.quant.codec.dequantize(g, data).to(torch.float32)
    src = tensors[part.source]
    x = _read(read, part.source, src.dtype, tuple(src.shape), part)
    return x.to(torch.float64 if src.dtype == "F64" else torch.float32)


def noised(x: Any, part: Part, seed: int, group: str, index: int, device: str) -> Any:
    """`x` times the part's scale plus its noise (seeded by `group` and the part index, in blocks)."""
    from ..noise import BLOCK, noise_block

    if part.relative or part.reinit is not None:  # --noise-mode relative, --reinit: in dequantised space
        from ..noise_modes import apply

        return apply(x, part, seed, group, index, device).reshape(x.shape)
    x = x.to(device)
    if part.scale != 1.0:
        x = x * part.scale
    if part.noise:
        flat = x.reshape(-1).clone()
        for b, lo in enumerate(range(0, flat.numel(), BLOCK)):
            n = min(BLOCK, flat.numel() - lo)
            flat[lo:lo + n] += part.noise * noise_block(seed, group, index, b, n, device).to(flat.dtype)
        x = flat.reshape(x.shape)
    return x


def encoded_part(plan: Plan, t: OutTensor, i: int, tensors: Mapping[str, TensorMeta], read: Reader,
                 device: str = "cpu") -> bytes:
    """The bytes of part `i` of encoded tensor `t` (not a `verbatim` one)."""
    assert t.encode is not None
    part = t.parts[i]
    x = noised(source_values(plan, part, tensors, read), part, plan.seed, t.encode.group, i, device)
    if t.encode.format:
        g = plan.quant.groups[part.source]
        return to_bytes(plan.quant.codec.quantize(g, x)[t.encode.member].cpu())
    return to_bytes(x.to(torch_dtype(t.dtype)).cpu())
