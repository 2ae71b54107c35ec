"""The noise path on the GPU against the CPU, in the same run: `grow-width --experts 2x --noise 0.01`.

Builds bench.py's synthetic bf16 Mixtral-layout checkpoint, then runs, each in a fresh process:
byte copies only (noise 0, the I/O reference), noise drawn on the CPU (`--device cpu`, with 2 and with
`--cpu-threads` worker threads) and on the GPU (`--device cuda`, twice: the second output is compared
byte for byte with the first). The floor is `cp -r` of the output plus `sync`, timed right after each run.
Needs a machine where torch sees a GPU. Prints a table and writes JSON (--out).

Usage: python benchmarks/bench_cuda.py [--size 2] [--work DIR] [--out FILE] [--cpu-threads 8]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import floor, folder_bytes, timed  # noqa: E402


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("bench-results/cuda"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench-cuda.json"))
    ap.add_argument("--cpu-threads", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py: torch sees no CUDA device")
    src = args.work / "src"
    if not src.exists():
        shutil.rmtree(args.work, ignore_errors=True)
        subprocess.run([sys.executable, str(Path(__file__).parent / "bench.py"), "--size", str(args.size),
                        "--build-only", str(src)], check=True)
    base = [sys.executable, "-m", "moegrow", "grow-width", str(src)]
    cases = {
        "noise 0 (byte copies)": ["--noise", "0"],
        "noise 0.01, cpu, 2 threads": ["--noise", "0.01", "--device", "cpu", "--threads", "2"],
        f"noise 0.01, cpu, {args.cpu_threads} threads": ["--noise", "0.01", "--device", "cpu",
                                                         "--threads", str(args.cpu_threads)],
        "noise 0.01, cuda": ["--noise", "0.01", "--device", "cuda"],
        "noise 0.01, cuda (again)": ["--noise", "0.01", "--device", "cuda"],
    }
    results, digests = [], {}
    for label, extra in cases.items():
        out = args.work / "out"
        shutil.rmtree(out, ignore_errors=True)
        cpu: dict[str, float] = {}
        wall, rss = timed([*base, str(out), "--experts", "2x", *extra, "--quiet"], cpu)
        digests[label] = digest(out)
        cp = floor(out, args.work / "floor")
        row = {"case": label, "seconds": round(wall, 3), "floor_seconds": round(cp, 3), "ratio": round(wall / cp, 3),
               "peak_rss_mib": round(rss, 1), "user_cpu_seconds": cpu["user"], "system_cpu_seconds": cpu["system"],
               "bytes_out": folder_bytes(out)}
        results.append(row)
        print(f"{label:30s} {wall:7.2f} s  floor {cp:6.2f} s  ratio {wall / cp:5.2f}  peak RSS {rss:7.1f} MiB  "
              f"user {cpu['user']:6.2f} s  sys {cpu['system']:5.2f} s", flush=True)
        shutil.rmtree(out)
    same = digests["noise 0.01, cuda"] == digests["noise 0.01, cuda (again)"]
    print(f"cuda runs byte-identical: {same}; cpu and cuda bytes differ: "
          f"{digests['noise 0.01, cuda'] != digests['noise 0.01, cpu, 2 threads']}")
    report = {"gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "source_bytes": folder_bytes(src), "cuda_repeats": same, "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(args.work)


if __name__ == "__main__":
    main()
