"""Computing the parts of an encoded output tensor (`plan.Encode`): decode, scale, noise, encode.

Shared by execution and `verify` (which recomputes them bit for bit). Each part is computed alone,
in chunks of whole rows along its leading axis (`chunks`: a slice of experts of a fused tensor, so
that memory stays bounded by `CHUNK_ELEMENTS` floats and not by the tensor): its source (a float
tensor, or a quantised weight's members) read, decoded to float32 (float64 for float64), scaled,
noised with the noise seeded by the encoded weight's dequantised output name, and written as the
output's float dtype or as the members of the source's quantised format. The noise of an element
does not depend on the chunking: it is drawn in `moegrow.noise`'s blocks over the whole part
(`NoiseStream`), whatever rows a chunk holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..io import DTYPE_SIZES
from ..plan import OutTensor, Part, Plan, TensorMeta
from .tensors import from_bytes, to_bytes, torch_dtype

Reader = Callable[[str, int, int], bytes]  # (source tensor, offset in it, byte count) -> bytes

# floats of a part computed at once (64 MiB of float32): one expert of gpt-oss-120b's gate_up_proj
# (2880 x 5760) is 16.6 M, so a chunk is one expert there; a part is never cut inside a row
CHUNK_ELEMENTS = 1 << 24


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
    return value_shape(plan, part, tensors)


def value_shape(plan: Plan, part: Part, tensors: Mapping[str, TensorMeta]) -> tuple[int, ...]:
    """The shape of `part`'s values as floats (a quantised weight's: dequantised)."""
    if part.decode:
        return _sliced(plan.quant.groups[part.source].shape, part)
    return _sliced(tensors[part.source].shape, part)


def part_nbytes(plan: Plan, t: OutTensor, part: Part, tensors: Mapping[str, TensorMeta]) -> int:
    return _numel(part_shape(plan, t, part, tensors)) * DTYPE_SIZES[t.dtype]


@dataclass(frozen=True)
class Chunk:
    """Rows of a part computed together: `part` is the part narrowed to them, `offset` the index of
    their first element in the part's values (where their noise starts)."""

    part: Part
    offset: int


def chunks(plan: Plan, part: Part, tensors: Mapping[str, TensorMeta]) -> list[Chunk]:
    """A part as runs of whole rows along axis 0, each of at most `CHUNK_ELEMENTS` values (one row at
    least). A quantised weight is cut only when it has 3 dims or more (a fused expert tensor: the
    codecs quantise each expert alone); a 2-d one (a block of fp8 rows shares one scale) stays whole."""
    shape = value_shape(plan, part, tensors)
    whole_part = part.relative or part.reinit is not None  # statistics over the whole part (noise_modes)
    if not shape or whole_part or (part.decode and len(shape) < 3):
        return [Chunk(part, 0)]
    per_row = _numel(shape[1:])
    step = max(1, CHUNK_ELEMENTS // max(per_row, 1))
    if step >= shape[0]:
        return [Chunk(part, 0)]
    if part.rows is not None:
        start, of = part.rows[0], part.rows[2]
    else:
        full = plan.quant.groups[part.source].shape if part.decode else tensors[part.source].shape
        start, of = 0, full[0]
    return [Chunk(replace(part, rows=(start + a, start + min(a + step, shape[0]), of)), a * per_row)
            for a in range(0, shape[0], step)]


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


class NoiseStream:
    """The standard-normal draws of one part, any run of its elements at a time: `moegrow.noise`'s
    blocks of `BLOCK` elements over the part's `total` values, each drawn once while its runs are
    taken in order (the block a run ends in is kept for the next)."""

    def __init__(self, seed: int, group: str, index: int, total: int, device: str, generator: str) -> None:
        self.seed, self.group, self.index, self.total, self.device = seed, group, index, total, device
        self.generator = generator
        self._block: tuple[int, Any] | None = None

    def take(self, offset: int, n: int) -> Any:
        """Draws `offset` .. `offset + n` of the part (float32, on the device)."""
        import torch

        from ..noise import BLOCK, noise_block

        pieces, pos = [], offset
        while pos < offset + n:
            b = pos // BLOCK
            lo = b * BLOCK
            if self._block is None or self._block[0] != b:
                size = min(BLOCK, self.total - lo)
                self._block = (b, noise_block(self.seed, self.group, self.index, b, size, self.device,
                                              generator=self.generator))
            block = self._block[1]
            end = min(lo + block.numel(), offset + n)
            pieces.append(block[pos - lo:end - lo])
            pos = end
        if not pieces:
            return torch.empty(0, dtype=torch.float32, device=self.device)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def noised(x: Any, part: Part, noise: NoiseStream | None, offset: int, device: str) -> Any:
    """`x` (values `offset`.. of the part) times the part's scale plus its noise."""
    if part.relative or part.reinit is not None:  # --noise-mode relative, --reinit: in dequantised space,
        from ..noise_modes import apply  # on the whole part (`chunks` keeps such a part whole)

        assert noise is not None and offset == 0
        return apply(x, part, noise.seed, noise.group, noise.index, device,
                     generator=noise.generator).reshape(x.shape)
    x = x.to(device)
    if part.scale != 1.0:
        x = x * part.scale
    if part.noise:
        assert noise is not None
        flat = x.reshape(-1).clone()
        flat += part.noise * noise.take(offset, flat.numel()).to(flat.dtype)
        x = flat.reshape(x.shape)
    return x


def computed(plan: Plan, t: OutTensor, i: int, tensors: Mapping[str, TensorMeta], read: Reader,
             device: str = "cpu", sources: bool = False) -> Iterator[tuple[Chunk, dict[str, bytes], Any]]:
    """Part `i` of encoded tensor `t` (not a `verbatim` one), chunk by chunk: each chunk's bytes by role,
    every member's of a requantised weight (computed once for all of them), else {"": bytes}; and, with
    `sources`, the chunk's source values (`source_values`, for verify's noise measurement), else None."""
    assert t.encode is not None
    part = t.parts[i]
    noise = None
    if part.noise or part.reinit is not None:
        noise = NoiseStream(plan.seed, t.encode.group, i, _numel(value_shape(plan, part, tensors)), device,
                            plan.noise_generator)
    for chunk in chunks(plan, part, tensors):
        src = source_values(plan, chunk.part, tensors, read)
        x = noised(src, chunk.part, noise, chunk.offset, device)
        if t.encode.format:
            g = plan.quant.groups[part.source]
            out = {role: to_bytes(q.cpu()) for role, q in plan.quant.codec.quantize(g, x).items()}
        else:
            out = {"": to_bytes(x.to(torch_dtype(t.dtype)).cpu())}
        del x
        yield chunk, out, src if sources else None


def encoded_part(plan: Plan, t: OutTensor, i: int, tensors: Mapping[str, TensorMeta], read: Reader,
                 device: str = "cpu") -> bytes:
    """The bytes of part `i` of encoded tensor `t` (not a `verbatim` one), whole."""
    assert t.encode is not None
    role = t.encode.member if t.encode.format else ""
    return b"".join(out[role] for _, out, _ in computed(plan, t, i, tensors, read, device))
