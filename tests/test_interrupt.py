"""Interrupting a growth: SIGTERM exits 143, SIGINT 130, and neither leaves OUTPUT or a partial
folder; SIGKILL leaves at most `.NAME.moegrow-partial-PID`, which the next run removes.

The growth runs as `python -m moegrow` in a child process whose byte copier is slowed down (and
announces its first copy in a marker file), so that the signal lands mid-write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import run

SLOW = """
import os, runpy, signal, sys, time
from moegrow import io
signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
marker = os.environ["MOEGROW_TEST_MARKER"]
copy = io.ByteCopier.copy
def slow_copy(self, *args, **kw):
    if not os.path.exists(marker):
        open(marker, "w").close()
    time.sleep(0.05)
    return copy(self, *args, **kw)
io.ByteCopier.copy = slow_copy
sys.argv[0] = "moegrow"
runpy.run_module("moegrow", run_name="__main__", alter_sys=True)
"""


def start(src: Path, out: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    marker = out.parent / f"started-{out.name}"
    env = {**os.environ, "MOEGROW_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", SLOW, "grow-width", str(src), str(out), "--experts", "2x",
                             "--quiet", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 60
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the growth never started writing: {proc.communicate()}")
        time.sleep(0.01)
    time.sleep(0.1)  # well inside the copying (about 1.5 s of it)
    return proc, marker


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moegrow-" in p.name)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_signal_mid_write_leaves_nothing(sig, code, word, checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    proc, _ = start(src, out)
    assert leftovers(tmp_path) == [f".out.moegrow-partial-{proc.pid}"]  # caught mid-write
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"moegrow: {word}", stderr
    assert "Traceback" not in stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_sigterm_during_force_keeps_the_old_output(checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--quiet")[0] == 0
    proc, _ = start(src, out, "--force")
    proc.terminate()
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 143, stderr
    assert json.loads((out / "moegrow.json").read_text())["operation"] == "grow-depth"
    assert leftovers(tmp_path) == []


def test_sigkill_leaves_only_a_partial_folder_that_the_next_run_removes(checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    proc, _ = start(src, out)
    proc.kill()
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()  # never an OUTPUT whose index lists missing files
    assert leftovers(tmp_path) == [f".out.moegrow-partial-{proc.pid}"]
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    assert leftovers(tmp_path) == []
    assert run("verify", src, out)[0] == 0
