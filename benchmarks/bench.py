"""moegrow benchmark: wall time and peak RSS of each growth against the I/O floor (`cp` + `sync`).

Builds a synthetic bf16 checkpoint with real Mixtral tensor names in several shards (size 1 is
about 1.2 GiB; `--size 4` is four times the layers), then runs, each in a fresh process:
grow-depth --layers 2x, grow-width --experts 2x (noise 0 and 0.01), grow --layers 2x --experts 2x
--noise 0.01, and grow-width --noise 0.01 with `--noise-generator torch` (the generator before pcg64, the
noise path's baseline). The floor for each is `cp -r` of its output folder plus `sync`, timed in the same
run. Prints a table and writes JSON (default bench-results/bench-<size>.json).

Usage: python benchmarks/bench.py [--size 1] [--work DIR] [--out FILE] [--keep] [--cases 1,3] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HIDDEN, FFN, EXPERTS, VOCAB = 1024, 2048, 8, 32000
LAYERS_PER_SIZE = 10
SHARD_BYTES = 400 * 1024**2


def _bf16_block(nbytes: int) -> bytes:
    """Valid bf16 values (normal, std 0.02): the top halves of float32 draws."""
    import numpy as np

    x = np.random.default_rng(0).normal(0, 0.02, nbytes // 2).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def build_checkpoint(folder: Path, size: int) -> int:
    """Write a Mixtral-layout checkpoint; return its byte count."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moegrow.io import header_bytes

    layers = LAYERS_PER_SIZE * size
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
        tensors += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        tensors.append((p + "block_sparse_moe.gate.weight", (EXPERTS, HIDDEN)))
        for e in range(EXPERTS):
            q = p + f"block_sparse_moe.experts.{e}."
            tensors += [(q + "w1.weight", (FFN, HIDDEN)), (q + "w2.weight", (HIDDEN, FFN)),
                        (q + "w3.weight", (FFN, HIDDEN))]
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    block = _bf16_block(max(2 * s[0] * (s[1] if len(s) > 1 else 1) for _, s in tensors))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for t in tensors:
        n = 2 * t[1][0] * (t[1][1] if len(t[1]) > 1 else 1)
        if shards[-1] and acc + n > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append(t)
        acc += n
    folder.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, "BF16", s, 2 * s[0] * (s[1] if len(s) > 1 else 1)) for n, s in shard]
        head, _ = header_bytes(entries)
        with open(folder / name, "wb") as f:
            f.write(head)
            for _, _, _, nbytes in entries:
                f.write(block[:nbytes])
                total += nbytes
        weight_map.update({n: name for n, _ in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": HIDDEN,
        "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "num_local_experts": EXPERTS, "num_experts_per_tok": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def compile_package(compile_it: bool = True) -> str:
    """Compile the moegrow that the timed runs import (their PYTHONPATH) to bytecode, as `pip install`
    does: where PYTHONDONTWRITEBYTECODE is set (or the package is an editable checkout that was never
    run), every run would otherwise compile its ~50 modules from source first, 0.1 s of each
    start-up that an installed moegrow does not spend. Compiled in a child process: Linux counts the
    parent's memory at fork in every child's peak RSS. Returns the package's folder."""
    where = subprocess.run([sys.executable, "-c", "import moegrow, os; print(os.path.dirname(moegrow.__file__))"],
                           check=True, capture_output=True, text=True).stdout.strip()
    if compile_it:
        subprocess.run([sys.executable, "-m", "compileall", "-q", where], check=True)
    return where


def timed(cmd: list[str], cpu: dict[str, float] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command in its own process; its user and system CPU
    seconds go to `cpu` when given."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    if cpu is not None:
        cpu.update(user=round(usage.ru_utime, 2), system=round(usage.ru_stime, 2))
    return wall, usage.ru_maxrss / 1024


def warm(folder: Path) -> None:
    """Read every file once, so that the page cache holds it (the fast-disk reading): into one small
    buffer, since the parent's peak RSS at fork counts in every timed child's."""
    buf = bytearray(1024 * 1024)
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def deepseek(work: Path) -> list[dict]:
    """The DeepSeek-V3-count cases: `grow --layers 2x --experts 2x` on a small-shape checkpoint with the
    real 91,991 names (peak RSS, CPU seconds) and `verify` of its output, and `--dry-run` on the full-size
    index (sparse files)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import deepseek as ds

    results = []
    moegrow = [sys.executable, "-m", "moegrow", "grow"]
    for full in (False, True):
        src = work / ("dsv3-full" if full else "dsv3-small")
        if not src.exists():
            subprocess.run([sys.executable, ds.__file__, str(src), "full" if full else "small"], check=True)
        out = work / "dsv3-out"
        shutil.rmtree(out, ignore_errors=True)
        cpu: dict[str, float] = {}
        extra = ["--dry-run"] if full else ["--quiet"]
        wall, rss = timed([*moegrow, str(src), str(out), "--layers", "2x", "--experts", "2x", *extra], cpu)
        label = "DeepSeek-V3 full-size --dry-run" if full else "DeepSeek-V3-count grow 2x2x"
        results.append({"case": label, "seconds": round(wall, 3), "peak_rss_mib": round(rss, 1),
                        "user_cpu_seconds": cpu["user"], "system_cpu_seconds": cpu["system"],
                        "bytes_out": folder_bytes(out) if out.exists() else 0})
        print(f"{label:32s} {wall:7.2f} s  user CPU {cpu['user']:6.2f} s  system CPU {cpu['system']:6.2f} s  "
              f"peak RSS {rss:6.1f} MiB", flush=True)
        if not full:  # verify of the grown output: the record (362,127 entries) streamed, every tensor read
            cpu = {}
            wall, rss = timed([sys.executable, "-m", "moegrow", "verify", str(src), str(out), "--quiet"], cpu)
            results.append({"case": "DeepSeek-V3-count verify 2x2x", "seconds": round(wall, 3),
                            "peak_rss_mib": round(rss, 1), "user_cpu_seconds": cpu["user"],
                            "system_cpu_seconds": cpu["system"]})
            print(f"{'DeepSeek-V3-count verify 2x2x':32s} {wall:7.2f} s  user CPU {cpu['user']:6.2f} s  "
                  f"system CPU {cpu['system']:6.2f} s  peak RSS {rss:6.1f} MiB", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    return results


def floor(src: Path, dest: Path, cpu: dict[str, float] | None = None) -> float:
    """cp of the same bytes plus sync: the I/O floor. cp's user and system CPU seconds go to `cpu`
    when given (the machine-load-proof comparison: CPU seconds against CPU seconds)."""
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    timed(["cp", "-r", str(src), str(dest)], cpu)
    subprocess.run(["sync"], check=True)
    t = time.perf_counter() - start
    shutil.rmtree(dest)
    return t


CASES = {
    "grow-depth 2x": ["grow-depth", "--layers", "2x"],
    "grow-width 2x noise 0": ["grow-width", "--experts", "2x"],
    "grow-width 2x noise 0.01": ["grow-width", "--experts", "2x", "--noise", "0.01"],
    "grow 2x2x noise 0.01": ["grow", "--layers", "2x", "--experts", "2x", "--noise", "0.01"],
    # the generator before pcg64, as the baseline of the noise path in the same run
    "grow-width 2x noise 0.01 torch": ["grow-width", "--experts", "2x", "--noise", "0.01",
                                       "--noise-generator", "torch"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1, help="checkpoint size multiplier (1 = about 1.2 GiB)")
    ap.add_argument("--work", type=Path, default=Path("bench-results/work"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--disk", choices=("slow", "fast"), default="slow",
                    help="slow: as the files fall (cold source, cp + sync to the work folder's disk); fast: the "
                         "source and the floor's input read once first so the page cache holds them (use a "
                         "--work folder on tmpfs, e.g. /dev/shm, for a disk that is memory)")
    ap.add_argument("--deepseek", action="store_true",
                    help="also the DeepSeek-V3-count cases (91,991 tensors: grow 2x2x, full-size --dry-run)")
    ap.add_argument("--cases", default="", help="comma-separated case numbers to run (1-5), all by default")
    ap.add_argument("--repeat", type=int, default=1, help="run each case this many times (the disk and the load vary)")
    ap.add_argument("--no-compile", action="store_true",
                    help="do not compile moegrow's bytecode first (time what a run that compiles its modules at "
                         "every start costs, as under PYTHONDONTWRITEBYTECODE)")
    args = ap.parse_args()
    if args.build_only:
        build_checkpoint(args.build_only, args.size)
        return
    work = args.work / f"size{args.size}"
    src = work / "src"
    if not src.exists():
        print(f"building a size-{args.size} checkpoint in {src} ...", flush=True)
        shutil.rmtree(work, ignore_errors=True)
        # In a child process: Linux keeps a process's peak RSS across fork + exec, so the
        # parent must stay small for the children's peak RSS to be their own.
        subprocess.run([sys.executable, __file__, "--size", str(args.size), "--build-only", str(src)], check=True)
    src_bytes = folder_bytes(src)
    package = compile_package(not args.no_compile)
    moegrow = [sys.executable, "-m", "moegrow"]
    results = []
    chosen = {int(c) for c in args.cases.split(",") if c}
    runs = [(label, extra) for n, (label, extra) in enumerate(CASES.items(), 1) if not chosen or n in chosen]
    for label, extra in [r for _ in range(args.repeat) for r in runs]:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run(["sync"], check=True)
        if args.disk == "fast":
            warm(src)
        cpu: dict[str, float] = {}
        wall, rss = timed([*moegrow, extra[0], str(src), str(out), *extra[1:], "--quiet"], cpu)
        out_bytes = folder_bytes(out)
        if args.disk == "fast":
            warm(out)  # the floor's source warm too: cp then reads from memory, as moegrow did
        cp_cpu: dict[str, float] = {}
        cp = floor(out, work / "floor", cp_cpu)
        shutil.rmtree(out)
        results.append({"case": label, "seconds": round(wall, 3), "peak_rss_mib": round(rss, 1),
                        "user_cpu_seconds": cpu["user"], "system_cpu_seconds": cpu["system"],
                        "bytes_out": out_bytes, "floor_seconds": round(cp, 3), "ratio": round(wall / cp, 3),
                        "cp_user_cpu_seconds": cp_cpu["user"], "cp_system_cpu_seconds": cp_cpu["system"],
                        "load_average": round(os.getloadavg()[0], 2)})
        print(f"{label:28s} {wall:7.2f} s  floor {cp:6.2f} s  ratio {wall / cp:5.2f}  "
              f"peak RSS {rss:6.1f} MiB  user {cpu['user']:5.2f} s  sys {cpu['system']:5.2f} s  "
              f"cp user {cp_cpu['user']:5.2f} s  sys {cp_cpu['system']:5.2f} s  "
              f"load {os.getloadavg()[0]:4.1f}  out {out_bytes / 1024**3:.2f} GiB", flush=True)
    if args.deepseek:
        results += deepseek(work)
    report = {"size": args.size, "disk": args.disk, "source_bytes": src_bytes, "moegrow": package, "machine": {
        "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "results": results}
    dest = args.out or Path("bench-results") / f"bench-{args.size}{'-fast' if args.disk == 'fast' else ''}.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(report, indent=2) + "\n")
    print(f"source {src_bytes / 1024**3:.2f} GiB; results in {dest}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
