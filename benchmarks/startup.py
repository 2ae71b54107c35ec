"""Where a byte-copy growth's time goes outside the copies: a timeline from `strace -tt`.

Runs `python -m moegrow GROWTH SOURCE OUT --quiet` (fresh process, cwd outside any checkout) under
`strace -f --seccomp-bpf -tt -e trace=execve,copy_file_range,renameat2,exit_group`, which stops the
process only at those calls, and prints per run: exec to the first `copy_file_range` (start-up: the
interpreter, imports, argument parsing, reading headers, planning), first to last copy, the last copy
to the final rename (fsync, config, record, card, the source check) and the rename to the process's
exit. With several PYTHONPATH trees (`--tree DIR`, repeatable) the runs alternate between them, so a
before/after comparison shares the machine's load. Needs strace.

Usage: python benchmarks/startup.py SOURCE [--growth "grow-width --experts 2x"] [--rounds 5] [--tree DIR]...
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("first byte", "copies", "to rename", "to exit", "total")


def _seconds(line: str) -> float:
    h, m, s = line.split()[1].split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def timeline(tree: str | None, growth: list[str], source: Path, out: Path) -> dict[str, float]:
    """One run's phases, in seconds."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace"
        cmd = ["strace", "-f", "--seccomp-bpf", "-tt", "-e", "trace=execve,copy_file_range,renameat2,exit_group",
               "-o", str(trace), sys.executable, "-m", "moegrow", growth[0], str(source), str(out), *growth[1:],
               "--quiet"]
        subprocess.run(cmd, check=True, env=env, cwd=tmp)
        lines = [ln for ln in trace.read_text().splitlines() if "resumed>" not in ln]
    start = _seconds(next(ln for ln in lines if "execve(" in ln))
    copies = [_seconds(ln) for ln in lines if "copy_file_range(" in ln]
    rename = [_seconds(ln) for ln in lines if "renameat2(" in ln][-1]
    end = _seconds([ln for ln in lines if "exit_group(" in ln][-1])
    shutil.rmtree(out)
    return {"first byte": copies[0] - start, "copies": copies[-1] - copies[0], "to rename": rename - copies[-1],
            "to exit": end - rename, "total": end - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("--growth", default="grow-width --experts 2x", help="the growth and its flags")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[],
                    help="a PYTHONPATH holding the moegrow to time (repeat to alternate several); "
                         "default: the installed one")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: beside SOURCE)")
    args = ap.parse_args()
    out = (args.out or args.source.parent / "startup-out").resolve()
    source = args.source.resolve()
    trees = args.tree or [None]
    runs: dict[str | None, list[dict[str, float]]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            t = timeline(tree, args.growth.split(), source, out)
            runs[tree].append(t)
            print(f"{tree or 'installed'}: " + "  ".join(f"{k} {v:.3f}" for k, v in t.items()), flush=True)
    for tree, ts in runs.items():
        print(f"{tree or 'installed'} (min / median / max s): " + "  ".join(
            f"{k} {min(x[k] for x in ts):.3f}/{statistics.median(x[k] for x in ts):.3f}/{max(x[k] for x in ts):.3f}"
            for k in PHASES))


if __name__ == "__main__":
    main()
