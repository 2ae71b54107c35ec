"""Writeback started as a growth goes (`io.start_writeback`): the bytes are those of a run without it."""

from __future__ import annotations

import os
import sys

from moegrow import execute, io

from .conftest import run
from .test_grow import digest


def test_start_writeback_keeps_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(1 << 20)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, data, 0)
        io.start_writeback(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == data
    if sys.platform.startswith("linux"):  # found in libc there, not silently skipped
        assert io._sync_file_range


def test_growth_with_writeback_after_every_tensor(checkpoints, tmp_path, monkeypatch):
    src = checkpoints["mixtral"]
    args = ["--experts", "2x", "--noise", "0.01", "--max-shard-size", "30KB", "--quiet"]
    assert run("grow-width", src, tmp_path / "plain", *args)[0] == 0
    calls = []

    def counted(fd: int) -> None:
        calls.append(fd)
        io.start_writeback(fd)

    monkeypatch.setattr(execute, "_WRITEBACK_EVERY", 1)
    monkeypatch.setattr(execute, "start_writeback", counted)
    assert run("grow-width", src, tmp_path / "flushed", *args)[0] == 0
    assert len(set(calls)) > 1  # every output shard was flushed as it was written
    assert digest(tmp_path / "plain") == digest(tmp_path / "flushed")


def test_each_shard_is_written_back_once_complete(checkpoints, tmp_path, monkeypatch):
    """Shards far smaller than `_WRITEBACK_EVERY` still start their writeback, when their last tensor is in."""
    calls = []

    def counted(fd: int) -> None:
        calls.append(fd)
        io.start_writeback(fd)

    monkeypatch.setattr(execute, "start_writeback", counted)
    out = tmp_path / "out"
    assert run("grow-width", checkpoints["mixtral"], out, "--experts", "2x", "--max-shard-size", "30KB",
               "--quiet")[0] == 0
    shards = list(out.glob("*.safetensors"))
    assert len(shards) > 2 and len(calls) == len(set(calls)) == len(shards)
