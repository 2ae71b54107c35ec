"""Deterministic Gaussian noise for copied experts.

The noise of a tensor depends only on the generator, the seed, the output tensor's name, the part
index and the block index (blocks of `BLOCK` elements), never on thread count, processing order or
device. Each block has its own generator state, so memory stays bounded by one block and blocks can
run in any order. Two generators (`GENERATORS`; the plan and its record name one):

* `pcg64` (the default, `quantile_noise`): numpy's PCG64 bits through a table of normal quantiles,
  on the CPU without torch; every device writes the same bytes.
* `torch`: `torch.randn` (mt19937 and Box-Muller on the CPU, Philox on CUDA), moegrow's generator
  before `pcg64`; records without a generator were written with it, and it reproduces their bytes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

BLOCK = 1 << 22  # elements per noise block (16 MiB of float32)
GENERATORS = ("pcg64", "torch")
DEFAULT_GENERATOR = "pcg64"
RECORDED_BEFORE = "torch"  # the generator of a record that names none (written before `pcg64`)

_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_INT_DTYPES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def block_seed(seed: int, tensor: str, part: int, block: int) -> int:
    digest = hashlib.sha256(f"moegrow\0{seed}\0{tensor}\0{part}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`."""
    if device == "auto" and not gpu_device_node():
        return "cpu"  # without importing torch (1.3-1.6 s of CPU) on a machine that has no GPU
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import GrowthError

        raise GrowthError("--device cuda: torch sees no CUDA device")
    return device


def gpu_device_node() -> bool:
    """Whether the machine shows an NVIDIA (or, for ROCm, AMD) device node: without one torch sees no GPU."""
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES.get(dtype) or _INT_DTYPES[dtype])


def needs_torch(part: Any, dtype: str, generator: str, device: str) -> bool:
    """Whether making `part` (a `plan.Part` of source dtype `dtype`) imports torch: everything but copies,
    zero fills and the numpy path (`pcg64` noise or scaling of a float tensor on the CPU)."""
    if part.is_copy or part.init == "zeros":
        return False
    if part.add or part.decode or part.relative or part.reinit is not None or part.fill not in (None, 0.0):
        return True
    if part.fill == 0.0 and part.noise == 0.0 and part.scale == 1.0:
        return False
    from .quantile_noise import NUMPY_DTYPES

    return generator != "pcg64" or device != "cpu" or dtype not in NUMPY_DTYPES


def in_pieces(part: Any, dtype: str, generator: str, device: str) -> bool:
    """Whether `part` can be made a piece at a time (`noise_piece`): pcg64 noise or a scale on the CPU in
    a float dtype numpy has, nothing that needs the whole part (relative noise's std, --reinit, a fill)."""
    return (device == "cpu" and not part.is_copy and part.fill is None and not part.init
            and not needs_torch(part, dtype, generator, device))


def noise_piece(raw: bytearray | memoryview, dtype: str, part: Any, seed: int, tensor: str, index: int,
                start: int, *, generator: str) -> memoryview:
    """Values `start`.. of part `index` of `tensor` (`raw`: that piece of the part's source bytes; `start` a
    multiple of 4), scaled and noised in place: the bytes `transform` makes of the whole part, cut there."""
    assert in_pieces(part, dtype, generator, "cpu")
    return _add_noise_numpy(raw, dtype, part.noise, seed, tensor, index, part.scale, raw, start)


def transform(raw: bytearray, dtype: str, part: Any, seed: int, tensor: str, index: int,
              device: str, out: Any = None, *, generator: str) -> memoryview:
    """Part `index` of output `tensor` (a `plan.Part`) from its source bytes: shifted, filled or noised.

    `out`: a writable buffer of `raw`'s length (`raw` itself is allowed) that a noised or scaled part is
    written into, instead of a new one; other parts ignore it."""
    if part.add:
        return shift(raw, dtype, part.add)
    if part.fill is not None:
        raw = filled(len(raw), dtype, part.fill)
        if part.noise == 0.0 and part.scale == 1.0:
            return memoryview(raw)
    if getattr(part, "relative", False) or getattr(part, "reinit", None) is not None:
        from .noise_modes import part_bytes  # --noise-mode relative, --reinit

        return part_bytes(raw, dtype, part, seed, tensor, index, device, generator=generator)
    return add_noise(raw, dtype, part.noise, seed, tensor, index, device, part.scale, out=out, generator=generator)


def filled(nbytes: int, dtype: str, value: float) -> bytearray:
    """`nbytes` bytes of `dtype` values all equal to `value` (identity depth init). Zero is zero bytes in
    every dtype, quantised ones included (an fp8 or fp4 code 0 is +0.0); other values need a float dtype."""
    if value == 0.0:
        return bytearray(nbytes)
    import torch

    size = torch.empty((), dtype=torch_dtype(dtype)).element_size()
    values = torch.full((nbytes // size,), value, dtype=torch_dtype(dtype))
    return bytearray(values.view(torch.uint8).numpy().tobytes())


def generate(init: str, std: float, dtype: str, nbytes: int, seed: int, tensor: str,
             part: int, *, generator: str) -> bytearray | memoryview:
    """A tensor made from nothing (`plan.Part.init`): zeros, or N(0, std^2) drawn on the CPU (the same
    blocks as `add_noise` on zeros, so any machine regenerates the same bytes)."""
    zeros = bytearray(nbytes)
    if init == "zeros":
        return zeros
    if init == "normal":
        return add_noise(zeros, dtype, std, seed, tensor, part, "cpu", generator=generator)
    raise ValueError(f"unknown init {init!r}")


def shift(raw: bytearray, dtype: str, add: int) -> memoryview:
    """An integer tensor's bytes with `add` added to every value (expert indices moved to copies)."""
    import torch

    if not raw:
        return memoryview(raw)
    values = torch.frombuffer(raw, dtype=torch_dtype(dtype)) + add
    return memoryview(values.view(torch.uint8).numpy())


def join(pieces: list[tuple[bytearray, tuple[int, ...]]], dtype: str, axis: int) -> memoryview:
    """Tensors (bytes, shape) of one dtype concatenated along `axis`, as bytes."""
    import torch

    tensors = [torch.frombuffer(raw, dtype=torch_dtype(dtype)).view(shape) if raw
               else torch.empty(shape, dtype=torch_dtype(dtype)) for raw, shape in pieces]
    return memoryview(torch.cat(tensors, dim=axis).contiguous().view(-1).view(torch.uint8).numpy())


def noise_block(seed: int, tensor: str, part: int, block: int, numel: int, device: str, *,
                generator: str) -> Any:
    """The float32 standard-normal draws of one block (std 1; the caller scales), a torch tensor on `device`."""
    import torch

    if generator == "pcg64":
        from .quantile_noise import standard_normal

        return torch.from_numpy(standard_normal(block_seed(seed, tensor, part, block), numel)).to(device)
    _check(generator)
    g = torch.Generator(device=device)
    g.manual_seed(block_seed(seed, tensor, part, block))
    return torch.randn(numel, generator=g, dtype=torch.float32, device=device)


def add_noise(raw: bytearray, dtype: str, std: float, seed: int, tensor: str, part: int,
              device: str, scale: float = 1.0, out: Any = None, *, generator: str) -> memoryview:
    """Return `raw` (one tensor's bytes) times `scale` plus N(0, std^2) noise, rounded back to `dtype`.

    `out`: a writable buffer of `raw`'s length to write the result into (`raw` itself is allowed: block by
    block, each block is read before it is written); a new one when None.
    """
    if not raw:  # an empty tensor: nothing to add (torch.frombuffer refuses empty buffers)
        return memoryview(raw)
    if generator == "pcg64" and device == "cpu":
        return _add_noise_numpy(raw, dtype, std, seed, tensor, part, scale, out)
    _check(generator)
    import torch

    src = torch.frombuffer(raw, dtype=torch_dtype(dtype))
    dst = torch.empty_like(src) if out is None else torch.frombuffer(out, dtype=src.dtype)
    if device != "cpu":
        _add_noise_device(src, dst, std, seed, tensor, part, device, scale, generator)
        return memoryview(dst.view(torch.uint8).numpy())
    # On the CPU, one pass per block through two float32 (float64 for F64) buffers reused by this thread:
    # the same operations in the same order as on a device (convert, scale, add std * draws, round once),
    # so the same bytes, without a fresh 16 MiB buffer (and its page faults) per step of every block.
    compute = torch.float64 if dtype == "F64" else torch.float32
    x, draws = _scratch(compute)
    for b, lo in enumerate(range(0, src.numel(), BLOCK)):
        chunk = src[lo:lo + BLOCK]
        n = chunk.numel()
        xb = x[:n]
        xb.copy_(chunk)
        if scale != 1.0:
            xb.mul_(scale)
        if std:
            g = torch.Generator()
            g.manual_seed(block_seed(seed, tensor, part, b))
            noise = torch.randn(n, generator=g, dtype=torch.float32, out=draws[:n])
            xb.add_(noise if compute == torch.float32 else noise.to(compute), alpha=std)
        dst[lo:lo + n].copy_(xb)
    return memoryview(dst.view(torch.uint8).numpy())


def _add_noise_numpy(raw: Any, dtype: str, std: float, seed: int, tensor: str, part: int, scale: float,
                     out: Any, start: int = 0) -> memoryview:
    """`add_noise` for `pcg64` on the CPU (`quantile_noise.add_noise`), on numpy views of the bytes; `raw`
    holds the part's values from index `start` on."""
    import numpy as np

    from . import quantile_noise

    kind = quantile_noise.NUMPY_DTYPES[dtype]
    src = np.frombuffer(raw, dtype=kind)
    dst = np.empty_like(src) if out is None else np.frombuffer(out, dtype=kind)
    quantile_noise.add_noise(src, dst, dtype, std, scale, lambda b: block_seed(seed, tensor, part, b), BLOCK,
                             start)
    return memoryview(dst.view(np.uint8))


def _add_noise_device(src: Any, dst: Any, std: float, seed: int, tensor: str, part: int, device: str,
                      scale: float, generator: str) -> None:
    """`add_noise` with the arithmetic on `device` (CUDA), block by block. With `pcg64` the scaled table
    entries are looked up on the CPU and added on the device: the same IEEE operations, the CPU's bytes."""
    import torch

    compute = torch.float64 if src.dtype == torch.float64 else torch.float32
    for b, lo in enumerate(range(0, src.numel(), BLOCK)):
        chunk = src[lo:lo + BLOCK]
        x = chunk.to(device).to(compute)  # to the GPU in the stored dtype (fewer bytes), widened there
        if scale != 1.0:
            x.mul_(scale)
        if std and generator == "pcg64":
            x.add_(_scaled_draws(std, seed, tensor, part, b, chunk.numel(), compute).to(device))
        elif std:
            x.add_(noise_block(seed, tensor, part, b, chunk.numel(), device, generator=generator).to(compute),
                   alpha=std)
        dst[lo:lo + BLOCK] = x.to(src.dtype).cpu()


def _scaled_draws(std: float, seed: int, tensor: str, part: int, block: int, n: int, compute: Any) -> Any:
    """`pcg64`'s std-scaled draws of one block as a CPU torch tensor of `compute` (what the CPU path adds)."""
    import torch

    from . import quantile_noise as q

    wide = compute == torch.float64
    idx = q.draw_indices(q.bit_stream(block_seed(seed, tensor, part, block)), n)
    return torch.from_numpy(q.scaled_table(std, wide)[idx])


def _check(generator: str) -> None:
    if generator not in GENERATORS:
        raise ValueError(f"unknown noise generator {generator!r} (known: {', '.join(GENERATORS)})")


_SCRATCH = threading.local()


def _scratch(compute: Any) -> tuple[Any, Any]:
    """This thread's (values, draws) buffers of at least `BLOCK` elements: values in `compute`, draws float32."""
    import torch

    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    for dtype in (torch.float32, compute):
        if dtype not in buffers or buffers[dtype].numel() < BLOCK:
            buffers[dtype] = torch.empty(BLOCK, dtype=dtype)
    draws = buffers[torch.float32]
    if compute == torch.float32:  # the values need a buffer of their own
        if "values" not in buffers or buffers["values"].numel() < BLOCK:
            buffers["values"] = torch.empty(BLOCK, dtype=torch.float32)
        return buffers["values"], draws
    return buffers[compute], draws


# a float dtype's exponent field, as (unsigned view, mask): all ones there is Inf or NaN
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
             "BF16": ("<u2", 0x7F80)}


def count_nonfinite(raw: bytearray, dtype: str) -> int:
    """How many NaN or Inf values the bytes of a float tensor (`dtype`, a safetensors name) hold: those
    whose exponent bits are all ones (integer work on numpy views, no torch; in chunks through a buffer
    this thread keeps, counted only where a chunk's largest exponent field is all ones)."""
    import numpy as np

    if not raw or dtype not in _EXPONENT:
        return 0
    kind, bits_mask = _EXPONENT[dtype]
    mask = np.array(bits_mask, dtype=kind)
    bits = np.frombuffer(raw, dtype=kind)
    chunk = 1 << 18
    buffers = getattr(_SCRATCH, "exponent", None)
    if buffers is None:
        buffers = _SCRATCH.exponent = {}
    buf = buffers.get(kind)
    if buf is None:
        buf = buffers[kind] = np.empty(chunk, dtype=kind)
    count = 0
    for lo in range(0, len(bits), chunk):
        part = buf[:min(chunk, len(bits) - lo)]
        np.bitwise_and(bits[lo:lo + chunk], mask, out=part)
        if part.max() == mask:
            count += int(np.count_nonzero(part == mask))
    return count
