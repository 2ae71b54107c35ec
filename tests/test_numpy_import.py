"""numpy imported by moegrow starts no BLAS thread pool, and leaves the environment as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import os; from moegrow.numpy_import import import_numpy; import_numpy(); "
         "print(len(os.listdir('/proc/self/task')), os.environ.get('OPENBLAS_NUM_THREADS'))")


def _threads_after_import(env_value: str | None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    if env_value is not None:
        env["OPENBLAS_NUM_THREADS"] = env_value
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    threads, value = out.stdout.split()
    return int(threads), value


@pytest.mark.skipif(not Path("/proc/self/task").exists() or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc, on a machine with a second core")
def test_import_numpy_starts_no_blas_threads():
    assert _threads_after_import(None) == (1, "None")  # one thread, and the variable gone again
    # a number the user chose is theirs: numpy's OpenBLAS then starts that many threads
    assert _threads_after_import("2") == (2, "2")
