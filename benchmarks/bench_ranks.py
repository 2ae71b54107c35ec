"""moegrow benchmark: one growth by 1 process against the same by P processes (torchrun, gloo).

Builds bench.py's synthetic Mixtral checkpoint (size 1 is about 1.2 GiB, bf16), then runs
grow-width --experts 2x --noise 0.01 (the noised copies make it CPU-bound, the case where more
processes can help) with `--max-shard-size` small enough for several shards per rank: first in one
process, then under `torchrun --standalone --nproc-per-node P` for each P given. Checks that every
run's files are byte-identical to the single-process run's, prints a table, writes JSON (default
bench-results/bench-ranks-<size>.json). Wall times include torchrun's start (a few seconds).

Usage: python benchmarks/bench_ranks.py [--size 1] [--procs 2] [--max-shard-size 250MB] [--threads 1]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import folder_bytes, timed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CASE = ["grow-width", "--experts", "2x", "--noise", "0.01", "--device", "cpu"]


def same_files(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
    return not mismatch and not errors


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1, help="checkpoint size multiplier (1 = about 1.2 GiB)")
    ap.add_argument("--procs", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    ap.add_argument("--max-shard-size", default="250MB", help="output shard limit: the unit of parallelism")
    ap.add_argument("--threads", type=int, default=1, help="--threads of each process")
    ap.add_argument("--work", type=Path, default=Path("bench-results/work-ranks"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    args = ap.parse_args()
    work = args.work / f"size{args.size}"
    src = work / "src"
    if not src.exists():
        print(f"building a size-{args.size} checkpoint in {src} ...", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--size", str(args.size),
                        "--build-only", str(src)], check=True)
    flags = [*CASE[1:], "--max-shard-size", args.max_shard_size, "--threads", str(args.threads), "--quiet"]
    results = []
    ref = work / "out-1"
    for procs in [1, *args.procs]:
        out = work / f"out-{procs}"
        shutil.rmtree(out, ignore_errors=True)
        launch = [sys.executable, "-m", "moegrow"]
        if procs > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                      str(procs), "-m", "moegrow"]
        subprocess.run(["sync"], check=True)
        wall, rss = timed([*launch, CASE[0], str(src), str(out), *flags])
        same = procs == 1 or same_files(ref, out)
        shards = len(list(out.glob("*.safetensors")))
        results.append({"processes": procs, "seconds": round(wall, 3), "peak_rss_mib": round(rss, 1),
                        "bytes_out": folder_bytes(out), "shards": shards, "identical_to_1": same})
        print(f"{procs} process(es)  {wall:7.2f} s  {shards} shards  peak RSS (largest process) {rss:6.1f} MiB"
              f"  identical to 1 process: {same}", flush=True)
        if procs > 1:
            shutil.rmtree(out)
    shutil.rmtree(ref)
    report = {"size": args.size, "case": " ".join(CASE), "max_shard_size": args.max_shard_size,
              "threads": args.threads, "source_bytes": folder_bytes(src),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}, "results": results}
    dest = args.out or Path("bench-results") / f"bench-ranks-{args.size}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results in {dest}")
    if not all(r["identical_to_1"] for r in results):
        raise SystemExit("a multi-process run's bytes differ from the single-process run's")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
