"""Deterministic Gaussian noise for copied experts.

The noise of a tensor depends only on the seed, the output tensor's name, the part index and the
block index (blocks of `BLOCK` elements), never on thread count or processing order. Each block
has its own generator, so memory stays bounded by one block and blocks can run in any order.
torch is imported here only, and only when noise is asked for.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

BLOCK = 1 << 22  # elements per noise block (16 MiB of float32)

_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_INT_DTYPES = {"I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
               "U16": "uint16", "U32": "uint32", "U64": "uint64"}


def block_seed(seed: int, tensor: str, part: int, block: int) -> int:
    digest = hashlib.sha256(f"moegrow\0{seed}\0{tensor}\0{part}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when torch sees a GPU, else `cpu`."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        from .errors import GrowthError

        raise GrowthError("--device cuda: torch sees no CUDA device")
    return device


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES.get(dtype) or _INT_DTYPES[dtype])


def transform(raw: bytearray, dtype: str, part: Any, seed: int, tensor: str, index: int,
              device: str, out: Any = None) -> memoryview:
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

        return part_bytes(raw, dtype, part, seed, tensor, index, device)
    return add_noise(raw, dtype, part.noise, seed, tensor, index, device, part.scale, out=out)


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
             part: int) -> bytearray | memoryview:
    """A tensor made from nothing (`plan.Part.init`): zeros, or N(0, std^2) drawn on the CPU (the same
    blocks as `add_noise` on zeros, so any machine regenerates the same bytes)."""
    zeros = bytearray(nbytes)
    if init == "zeros":
        return zeros
    if init == "normal":
        return add_noise(zeros, dtype, std, seed, tensor, part, "cpu")
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


def noise_block(seed: int, tensor: str, part: int, block: int, numel: int, device: str) -> Any:
    """The float32 standard-normal draws of one block (std 1; the caller scales)."""
    import torch

    g = torch.Generator(device=device)
    g.manual_seed(block_seed(seed, tensor, part, block))
    return torch.randn(numel, generator=g, dtype=torch.float32, device=device)


def add_noise(raw: bytearray, dtype: str, std: float, seed: int, tensor: str, part: int,
              device: str, scale: float = 1.0, out: Any = None) -> memoryview:
    """Return `raw` (one tensor's bytes) times `scale` plus N(0, std^2) noise, rounded back to `dtype`.

    `out`: a writable buffer of `raw`'s length to write the result into (`raw` itself is allowed: block by
    block, each block is read before it is written); a new one when None.
    """
    import torch

    if not raw:  # an empty tensor: nothing to add (torch.frombuffer refuses empty buffers)
        return memoryview(raw)
    src = torch.frombuffer(raw, dtype=torch_dtype(dtype))
    dst = torch.empty_like(src) if out is None else torch.frombuffer(out, dtype=src.dtype)
    if device != "cpu":
        _add_noise_device(src, dst, std, seed, tensor, part, device, scale)
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


def _add_noise_device(src: Any, dst: Any, std: float, seed: int, tensor: str, part: int, device: str,
                      scale: float) -> None:
    """`add_noise` with the arithmetic on `device` (CUDA), block by block."""
    import torch

    compute = torch.float64 if src.dtype == torch.float64 else torch.float32
    for b, lo in enumerate(range(0, src.numel(), BLOCK)):
        chunk = src[lo:lo + BLOCK]
        x = chunk.to(device).to(compute)  # to the GPU in the stored dtype (fewer bytes), widened there
        if scale != 1.0:
            x.mul_(scale)
        if std:
            x.add_(noise_block(seed, tensor, part, b, chunk.numel(), device).to(compute), alpha=std)
        dst[lo:lo + BLOCK] = x.to(src.dtype).cpu()


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


def count_nonfinite(raw: bytearray, dtype: str) -> int:
    """How many NaN or Inf values the bytes of a float tensor (`dtype`, a safetensors name) hold."""
    import torch

    if not raw or dtype not in _TORCH_DTYPES:
        return 0
    values = torch.frombuffer(raw, dtype=torch_dtype(dtype))
    # NaN and Inf survive a sum: one fast reduction settles the common, all-finite case
    if bool(torch.isfinite(values.sum(dtype=torch.float64 if dtype == "F64" else torch.float32))):
        return 0
    return values.numel() - int(torch.isfinite(values).sum())
