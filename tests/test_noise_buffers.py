"""The noise path's reused buffers: noise written in place, per-thread scratch, reads into a given buffer.

The references below restate each generator independently, in torch arithmetic (sha256 of seed, tensor,
part and block seeds the block; values converted to float32, scaled, plus the noise, rounded once):
`torch`: torch's CPU generator, std times `torch.randn`; `pcg64`: numpy's PCG64 words as little-endian
16-bit table indices, the table times std rounded to float32 (float64 for F64) added.
"""

import hashlib
import os
import threading

import numpy as np
import pytest
import torch

from moegrow import noise, quantile_noise
from moegrow.errors import SourceError
from moegrow.io import pread_into

from .conftest import run

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
GENERATORS = ["pcg64", "torch"]


def _block_seed(seed: int, tensor: str, part: int, block: int) -> int:
    digest = hashlib.sha256(f"moegrow\0{seed}\0{tensor}\0{part}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _table() -> np.ndarray:
    return np.frombuffer(quantile_noise.TABLE_FILE.read_bytes(), dtype="<f4")


def _reference(raw: bytes, dtype: str, std: float, scale: float, seed: int, tensor: str, part: int,
               block: int, generator: str = "torch") -> bytes:
    src = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype])
    compute = torch.float64 if dtype == "F64" else torch.float32
    out = []
    for b, lo in enumerate(range(0, src.numel(), block)):
        x = src[lo:lo + block].to(compute) * scale if scale != 1.0 else src[lo:lo + block].to(compute)
        if generator == "torch":
            g = torch.Generator().manual_seed(_block_seed(seed, tensor, part, b))
            draws = torch.randn(x.numel(), generator=g, dtype=torch.float32).to(compute)
            out.append(torch.add(x, draws, alpha=std).to(src.dtype))
            continue
        words = np.random.PCG64(_block_seed(seed, tensor, part, b)).random_raw((x.numel() + 3) // 4)
        index = words.astype("<u8").view("<u2")[:x.numel()].astype(np.int64)
        scaled = _table().astype(np.float64)[index] * std
        z = torch.from_numpy(scaled if compute == torch.float64 else scaled.astype(np.float32))
        out.append((x + z if std else x).to(src.dtype))
    return torch.cat(out).view(torch.uint8).numpy().tobytes()


def _values(n: int, dtype: str) -> bytearray:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DTYPES[dtype])
    return bytearray(x.view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("generator", GENERATORS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [1, 17, 999, 1000, 2500])
@pytest.mark.parametrize(("std", "scale"), [(0.01, 1.0), (0.02, 0.5), (0.0, 0.7)])
def test_noise_in_place_is_the_recorded_noise(generator, dtype, n, std, scale, monkeypatch):
    monkeypatch.setattr(noise, "BLOCK", 1000)  # blocks cross the tensors of 2500 values
    monkeypatch.setattr(quantile_noise, "CHUNK", 64)  # and chunks cross the blocks
    raw = _values(n, dtype)
    want = _reference(bytes(raw), dtype, std, scale, 3, "w", 2, 1000, generator)
    fresh = bytes(noise.add_noise(raw, dtype, std, 3, "w", 2, "cpu", scale, generator=generator))
    assert raw == _values(n, dtype)  # without `out`, the input is left as it is
    other = bytearray(len(raw))
    assert bytes(noise.add_noise(raw, dtype, std, 3, "w", 2, "cpu", scale, out=other,
                                 generator=generator)) == want == bytes(other)
    view = memoryview(raw)
    assert bytes(noise.add_noise(view, dtype, std, 3, "w", 2, "cpu", scale, out=view,
                                 generator=generator)) == want == bytes(raw)
    assert fresh == want


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_pcg64_device_arithmetic_writes_the_cpu_bytes(dtype, monkeypatch):
    """The device path (torch arithmetic, here on the CPU: a GPU runs the same operations) writes the bytes
    of the numpy path: the scaled table entries are added, not std times the draws."""
    monkeypatch.setattr(noise, "BLOCK", 1000)
    raw = _values(2500, dtype)
    want = bytes(noise.add_noise(raw, dtype, 0.02, 5, "w", 1, "cpu", 0.5, generator="pcg64"))
    src = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype])
    dst = torch.empty_like(src)
    noise._add_noise_device(src, dst, 0.02, 5, "w", 1, "cpu", 0.5, "pcg64")
    assert dst.view(torch.uint8).numpy().tobytes() == want


def test_generators_differ_and_are_checked():
    raw = _values(3000, "BF16")
    a = bytes(noise.add_noise(raw, "BF16", 0.01, 0, "w", 0, "cpu", generator="pcg64"))
    b = bytes(noise.add_noise(raw, "BF16", 0.01, 0, "w", 0, "cpu", generator="torch"))
    assert a != b and a != bytes(raw) and b != bytes(raw)
    with pytest.raises(ValueError, match="unknown noise generator 'mt'"):
        noise.add_noise(raw, "BF16", 0.01, 0, "w", 0, "cpu", generator="mt")


def test_table_is_the_published_one():
    """The shipped table is the one `build_table` computes from the inverse normal CDF, symmetric, of mean 0
    and std 1, and its bytes are the ones the module checks."""
    data = quantile_noise.TABLE_FILE.read_bytes()
    assert data == quantile_noise.build_table()
    assert hashlib.sha256(data).hexdigest() == quantile_noise.TABLE_SHA256
    t = np.frombuffer(data, dtype="<f4").astype(np.float64)
    assert len(t) == 65536 and np.all(np.diff(t) > 0) and np.array_equal(t, -t[::-1])
    assert abs(t.mean()) < 1e-12 and abs(t.std() - 1.0) < 1e-7
    assert 4.3 < t.max() < 4.33


def test_pcg64_draws_are_standard_normal():
    """Four million draws (one block): moments of N(0, 1) and a Kolmogorov-Smirnov distance within what a
    table of 65,536 quantiles and sampling allow; consecutive draws uncorrelated."""
    from scipy import stats

    z = noise.noise_block(0, "w", 0, 0, 1 << 22, "cpu", generator="pcg64").double().numpy()
    assert abs(z.mean()) < 3e-3 and abs(z.std() - 1.0) < 2e-3
    assert abs(stats.kurtosis(z, fisher=False) - 3.0) < 0.02 and abs(stats.skew(z)) < 0.01
    assert stats.kstest(z, "norm").statistic < 1e-3
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 2e-3
    other = noise.noise_block(0, "w", 0, 1, 1 << 20, "cpu", generator="pcg64").double().numpy()
    assert abs(np.corrcoef(z[:1 << 20], other)[0, 1]) < 5e-3  # another block: other draws


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_nonfinite_counts_nan_and_inf(dtype):
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)).to(DTYPES[dtype])
    values[[3, 500, 999]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=DTYPES[dtype])
    values[7] = torch.finfo(DTYPES[dtype]).max
    raw = bytearray(values.view(torch.uint8).numpy().tobytes())
    assert noise.count_nonfinite(raw, dtype) == 3
    assert noise.count_nonfinite(bytearray(_values(1000, dtype)), dtype) == 0


def test_scratch_grows_with_the_block(monkeypatch):
    """A thread's scratch buffers made for small blocks are not reused for larger ones."""
    monkeypatch.setattr(noise, "BLOCK", 16)
    small = _values(40, "BF16")
    assert bytes(noise.add_noise(small, "BF16", 0.01, 0, "a", 0, "cpu", generator="torch")) == _reference(
        bytes(small), "BF16", 0.01, 1.0, 0, "a", 0, 16)
    monkeypatch.setattr(noise, "BLOCK", 3000)
    large = _values(5000, "BF16")
    assert bytes(noise.add_noise(large, "BF16", 0.01, 0, "a", 0, "cpu", generator="torch")) == _reference(
        bytes(large), "BF16", 0.01, 1.0, 0, "a", 0, 3000)


@pytest.mark.parametrize("generator", GENERATORS)
def test_threads_draw_the_same_noise_side_by_side(generator, monkeypatch):
    """Two threads noising at once, each in its own scratch buffers, write what one thread writes."""
    monkeypatch.setattr(noise, "BLOCK", 500)
    tensors = [_values(1000 + 37 * k, "BF16") for k in range(8)]
    want = [_reference(bytes(t), "BF16", 0.01, 1.0, 1, f"t{k}", 0, 500, generator) for k, t in enumerate(tensors)]
    got: dict[int, bytes] = {}

    def work(ks: range) -> None:
        for _ in range(20):
            for k in ks:
                got[k] = bytes(noise.add_noise(bytearray(tensors[k]), "BF16", 0.01, 1, f"t{k}", 0, "cpu",
                                               generator=generator))

    threads = [threading.Thread(target=work, args=(range(i, 8, 2),)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[k] for k in range(8)] == want


def test_pread_into_fills_the_buffer_or_names_the_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 4)
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(300)
        pread_into(fd, memoryview(buf)[:200], 100, str(path))
        assert buf[:200] == (bytes(range(256)) * 4)[100:300] and buf[200:] == bytes(100)
        with pytest.raises(SourceError, match="f.bin: unexpected end of file"):
            pread_into(fd, memoryview(buf), 900, str(path))
    finally:
        os.close(fd)


def test_worker_threads_leave_the_callers_torch_threads(checkpoints, tmp_path):
    """Workers run torch on one thread each (`--threads 2`); the caller's setting is as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        code, _, err = run("grow-width", checkpoints["deepseek_v3"], tmp_path / "o", "--experts", "2x",
                           "--noise", "0.01", "--threads", "2", "--quiet")
        assert code == 0, err
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
