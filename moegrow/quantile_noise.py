"""moegrow's default noise generator, `pcg64`: numpy's PCG64 bit stream through a table of normal quantiles.

Each value takes 16 bits of the stream and becomes `TABLE[bits]`, the standard normal's quantile at
(i + 0.5) / 65,536 (mirrored, so the table's mean is exactly 0, and rescaled to a population std of
exactly 1): a normal discretised to 65,536 equally likely values, bounded at +-4.32. Why not
`torch.randn`: a table lookup and integer bits cost half its CPU per value here, without importing
torch (1.3-1.6 s of CPU holding the GIL), and every step after the bits is an exactly rounded IEEE
operation (a lookup, a multiply, an add, a round to the output dtype), so any machine and any device
reproduces the bytes. numpy guarantees PCG64's bit stream across versions (NEP 19); the table is data
(moegrow/data/normal_quantiles.f32, checked against `build_table` and `TABLE_SHA256` by the tests).

Noise of one block (`noise.BLOCK` values of a part) comes from `PCG64(noise.block_seed(...))`, 16 bits
per value in stream order (the little-endian 16-bit words of the 64-bit outputs).
"""

from __future__ import annotations

import hashlib
import math
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any

SIZE = 1 << 16
TABLE_FILE = Path(__file__).parent / "data" / "normal_quantiles.f32"
TABLE_SHA256 = "8babbcaf96568f10165a1eab530c0e5c92d04de96761b6dbb3dadfa94baba37f"
CHUNK = 1 << 18  # values per pass: the buffers of one chunk stay in the CPU's L2 cache


def build_table() -> bytes:
    """The table's bytes (65,536 little-endian float32), from the inverse normal CDF in float64."""
    from statistics import NormalDist

    inv = NormalDist().inv_cdf
    half = [inv((i + 0.5) / SIZE) for i in range(SIZE // 2)]  # negative quantiles, mirrored below
    values = half + [-v for v in reversed(half)]
    rms = math.sqrt(math.fsum(v * v for v in values) / SIZE)
    import numpy as np

    return np.asarray([v / rms for v in values], dtype="<f4").tobytes()


@lru_cache(maxsize=1)
def table() -> Any:
    """The table as a float32 numpy array (read once; refused if its bytes are not the published ones)."""
    import numpy as np

    from .errors import MoegrowError

    try:
        data = TABLE_FILE.read_bytes()
    except OSError as e:
        raise MoegrowError(f"{TABLE_FILE}: cannot read moegrow's normal quantile table ({e.strerror or e}); "
                           "reinstall moegrow") from None
    if hashlib.sha256(data).hexdigest() != TABLE_SHA256:
        raise MoegrowError(f"{TABLE_FILE}: not moegrow's normal quantile table (sha256 differs); reinstall moegrow")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)


@lru_cache(maxsize=8)
def scaled_table(std: float, wide: bool) -> Any:
    """`std` times the table: float32 (each entry rounded once from the float64 product), float64 if `wide`."""
    import numpy as np

    product = table().astype(np.float64) * std
    return product if wide else product.astype(np.float32)


def bit_stream(block_seed: int) -> Any:
    import numpy as np

    return np.random.PCG64(block_seed)


def draw_indices(stream: Any, n: int) -> Any:
    """The next `n` table indices of `stream` (uint16), 4 per 64-bit output; `n` a multiple of 4 but at
    the end of a block."""

    words = stream.random_raw((n + 3) // 4).astype("<u8", copy=False)
    return words.view("<u2")[:n]


def standard_normal(block_seed: int, n: int) -> Any:
    """The block's `n` draws (float32), std 1: for callers that scale and add themselves."""
    return table()[draw_indices(bit_stream(block_seed), n)]


_SCRATCH = threading.local()


def _buffers() -> dict[str, Any]:
    """This thread's chunk buffers, made once: a fresh buffer per chunk costs a page fault per 4 KiB."""
    import numpy as np

    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or len(bufs["x"]) < CHUNK:
        bufs = _SCRATCH.bufs = {"x": np.empty(CHUNK, np.float32), "z": np.empty(CHUNK, np.float32),
                                "u": np.empty(CHUNK, np.uint32), "i": np.empty(CHUNK, np.intp),
                                "x64": np.empty(CHUNK, np.float64), "z64": np.empty(CHUNK, np.float64)}
    return bufs


NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def add_noise(src: Any, dst: Any, dtype: str, std: float, scale: float, seeds: Any, block: int,
              start: int = 0) -> None:
    """dst = round(src * scale + std * TABLE[bits]) for one tensor, `block` values per seeded block.

    `src`, `dst`: numpy views of the tensor's values in `NUMPY_DTYPES[dtype]` (bf16 as its raw uint16;
    `dst` may be `src`). `seeds(b)` gives block b's PCG64 seed. The arithmetic, per value: widen to
    float32 (float64 for F64), multiply by float32(scale) unless it is 1, add the scaled table entry,
    round to the dtype (to nearest, ties to even). `start`: the index of `src[0]` in the tensor, a
    multiple of 4 (a piece of a tensor made apart: its block's stream is advanced to it, PCG64's
    `advance` at the cost of a multiplication, so the pieces give the whole tensor's bytes)."""
    import numpy as np

    wide = dtype == "F64"
    ts = scaled_table(std, wide) if std else None
    sc = np.float64(scale) if wide else np.float32(scale)
    assert CHUNK % 4 == 0 and start % 4 == 0  # a chunk takes whole 64-bit words from the stream
    bufs = _buffers()
    x, z, ix = (bufs["x64"], bufs["z64"], bufs["i"]) if wide else (bufs["x"], bufs["z"], bufs["i"])
    total = src.shape[0]
    lo = 0
    while lo < total:
        b, into = divmod(start + lo, block)
        stream = bit_stream(seeds(b)) if std else None
        if stream is not None and into:
            stream.advance(into // 4)
        end = min(total, lo + block - into)
        for c in range(lo, end, CHUNK):
            n = min(CHUNK, end - c)
            xs = x[:n]
            _widen(src[c:c + n], xs, dtype)
            if scale != 1.0:
                np.multiply(xs, sc, out=xs)
            if stream is not None:
                np.copyto(ix[:n], draw_indices(stream, n))
                ts.take(ix[:n], mode="wrap", out=z[:n])  # indices < len(ts): "wrap" is the fastest check
                np.add(xs, z[:n], out=xs)
            _narrow(xs, dst[c:c + n], dtype, bufs["u"][:n])
        lo = end


def _widen(src: Any, x: Any, dtype: str) -> None:
    """Values of `src` into the float buffer `x` (exact)."""
    import numpy as np

    if dtype == "BF16":
        np.left_shift(src, np.uint32(16), out=x.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(x, src)


def _narrow(x: Any, dst: Any, dtype: str, u: Any) -> None:
    """`x` rounded to nearest, ties to even, into `dst` (bf16 by integer rounding; NaN stays NaN)."""
    import numpy as np

    if dtype != "BF16":
        np.copyto(dst, x, casting="same_kind")
        return
    bits = x.view(np.uint32)
    np.right_shift(bits, np.uint32(16), out=u)
    np.bitwise_and(u, np.uint32(1), out=u)
    np.add(u, np.uint32(0x7FFF), out=u)
    np.add(u, bits, out=u)  # a NaN here came from a bf16 value: low bits zero, no carry into the sign
    np.right_shift(u, np.uint32(16), out=u)
    np.copyto(dst, u, casting="unsafe")
