"""The noise path's reused buffers: noise written in place, per-thread scratch, reads into a given buffer.

The reference below restates the recorded generator independently (sha256 of seed, tensor, part and block
seeds torch's CPU generator; values converted to float32, scaled, plus std times the draws, rounded once).
"""

import hashlib
import os
import threading

import pytest
import torch

from moegrow import noise
from moegrow.errors import SourceError
from moegrow.io import pread_into

from .conftest import run

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _reference(raw: bytes, dtype: str, std: float, scale: float, seed: int, tensor: str, part: int,
               block: int) -> bytes:
    src = torch.frombuffer(bytearray(raw), dtype=DTYPES[dtype])
    compute = torch.float64 if dtype == "F64" else torch.float32
    out = []
    for b, lo in enumerate(range(0, src.numel(), block)):
        x = src[lo:lo + block].to(compute) * scale if scale != 1.0 else src[lo:lo + block].to(compute)
        digest = hashlib.sha256(f"moegrow\0{seed}\0{tensor}\0{part}\0{b}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
        draws = torch.randn(x.numel(), generator=g, dtype=torch.float32).to(compute)
        out.append(torch.add(x, draws, alpha=std).to(src.dtype))
    return torch.cat(out).view(torch.uint8).numpy().tobytes()


def _values(n: int, dtype: str) -> bytearray:
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(DTYPES[dtype])
    return bytearray(x.view(torch.uint8).numpy().tobytes())


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n", [1, 17, 999, 1000, 2500])
@pytest.mark.parametrize(("std", "scale"), [(0.01, 1.0), (0.02, 0.5), (0.0, 0.7)])
def test_noise_in_place_is_the_recorded_noise(dtype, n, std, scale, monkeypatch):
    monkeypatch.setattr(noise, "BLOCK", 1000)  # blocks cross the tensors of 2500 values
    raw = _values(n, dtype)
    want = _reference(bytes(raw), dtype, std, scale, 3, "w", 2, 1000)
    fresh = bytes(noise.add_noise(raw, dtype, std, 3, "w", 2, "cpu", scale))
    assert raw == _values(n, dtype)  # without `out`, the input is left as it is
    other = bytearray(len(raw))
    assert bytes(noise.add_noise(raw, dtype, std, 3, "w", 2, "cpu", scale, out=other)) == want == bytes(other)
    view = memoryview(raw)
    assert bytes(noise.add_noise(view, dtype, std, 3, "w", 2, "cpu", scale, out=view)) == want == bytes(raw)
    assert fresh == want


def test_scratch_grows_with_the_block(monkeypatch):
    """A thread's scratch buffers made for small blocks are not reused for larger ones."""
    monkeypatch.setattr(noise, "BLOCK", 16)
    small = _values(40, "BF16")
    assert bytes(noise.add_noise(small, "BF16", 0.01, 0, "a", 0, "cpu")) == _reference(
        bytes(small), "BF16", 0.01, 1.0, 0, "a", 0, 16)
    monkeypatch.setattr(noise, "BLOCK", 3000)
    large = _values(5000, "BF16")
    assert bytes(noise.add_noise(large, "BF16", 0.01, 0, "a", 0, "cpu")) == _reference(
        bytes(large), "BF16", 0.01, 1.0, 0, "a", 0, 3000)


def test_threads_draw_the_same_noise_side_by_side(monkeypatch):
    """Two threads noising at once, each in its own scratch buffers, write what one thread writes."""
    monkeypatch.setattr(noise, "BLOCK", 500)
    tensors = [_values(1000 + 37 * k, "BF16") for k in range(8)]
    want = [_reference(bytes(t), "BF16", 0.01, 1.0, 1, f"t{k}", 0, 500) for k, t in enumerate(tensors)]
    got: dict[int, bytes] = {}

    def work(ks: range) -> None:
        for _ in range(20):
            for k in ks:
                got[k] = bytes(noise.add_noise(bytearray(tensors[k]), "BF16", 0.01, 1, f"t{k}", 0, "cpu"))

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
