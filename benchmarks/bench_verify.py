"""`verify --forward` in bounded memory: peak RSS against the grown model's float32 size.

Writes a synthetic qwen3_moe checkpoint with Qwen3-30B-A3B's widths (hidden 2048, 32 heads of 128, 4 KV
heads, expert FFN 768, top-8) but 16 layers of 32 experts and a 32k vocabulary (about 5.3 GiB of bf16,
written as raw bytes in the names save_pretrained uses: no model is built in torch), grows it 2x in width
with moegrow (noise 0), then runs `moegrow verify --forward --json` in its own process and measures its
wall time and peak RSS (wait4). Loading the whole grown model in float32 would take its float32 size,
printed beside; the figure to meet is a quarter of it. Writes JSON (default bench-results/bench-verify.json)
and removes the checkpoints unless --keep.

Usage: python benchmarks/bench_verify.py [--layers 16] [--experts 32] [--work DIR] [--out FILE] [--keep]
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

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, EXPERT_FFN, TOP_K, VOCAB = 2048, 32, 4, 128, 768, 8, 32000
SHARD_BYTES = 2 * 1024**3
POOL = 64 * 1024**2  # bf16 values drawn once; each tensor reads them from its own offset


def _pool() -> bytes:
    """Valid bf16 values (normal, std 0.02): the top halves of float32 draws."""
    import numpy as np

    x = np.random.default_rng(0).normal(0, 0.02, POOL).astype(np.float32)
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def tensors(layers: int, experts: int) -> list[tuple[str, tuple[int, ...]]]:
    """qwen3_moe's tensors as save_pretrained names them (per-expert gate / up / down projections)."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,)),
                (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
                (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
                (p + "self_attn.q_norm.weight", (HEAD_DIM,)), (p + "self_attn.k_norm.weight", (HEAD_DIM,)),
                (p + "mlp.gate.weight", (experts, HIDDEN))]
        for e in range(experts):
            q = p + f"mlp.experts.{e}."
            out += [(q + "gate_proj.weight", (EXPERT_FFN, HIDDEN)), (q + "up_proj.weight", (EXPERT_FFN, HIDDEN)),
                    (q + "down_proj.weight", (HIDDEN, EXPERT_FFN))]
    return [*out, ("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def build_checkpoint(folder: Path, layers: int, experts: int) -> int:
    """Write the checkpoint in 2 GiB shards; norms are ones, every other tensor random. Returns its bytes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moegrow.io import header_bytes

    pool = _pool()
    ones = b"\x80\x3f" * HIDDEN  # bf16 1.0
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    acc = 0
    for name, shape in tensors(layers, experts):
        n = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        if shards[-1] and acc + n > SHARD_BYTES:
            shards.append([])
            acc = 0
        shards[-1].append((name, shape))
        acc += n
    folder.mkdir(parents=True)
    weight_map, total, k = {}, 0, 0
    for s, shard in enumerate(shards):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = [(n, "BF16", shape, 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)) for n, shape in shard]
        head, _ = header_bytes(entries)
        with open(folder / file, "wb") as f:
            f.write(head)
            for name, _, _, nbytes in entries:
                if name.endswith("norm.weight"):
                    f.write(ones[:nbytes])
                else:
                    start = (k * 7919 * 2) % (len(pool) - nbytes) & ~1
                    f.write(pool[start:start + nbytes])
                k += 1
                total += nbytes
        weight_map.update({n: file for n, _ in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
        "intermediate_size": 6144, "moe_intermediate_size": EXPERT_FFN, "num_hidden_layers": layers,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM,
        "num_experts": experts, "num_experts_per_tok": TOP_K, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "dtype": "bfloat16",
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return total


def float32_bytes(folder: Path) -> int:
    """The grown model's parameters in float32: what loading it whole (`--whole`) takes, at least."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moegrow.io import read_index

    return sum(4 * t.nbytes // 2 for t in read_index(folder).values())


def timed(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, stdout) of a command in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"failed ({code}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024**2, stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path("bench-results/verify-work"))
    ap.add_argument("--out", type=Path, default=Path("bench-results/bench-verify.json"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build_checkpoint(args.build_only, args.layers, args.experts)
        return
    src, out = args.work / "src", args.work / "out"
    moegrow = [sys.executable, "-m", "moegrow"]
    try:
        if not src.exists():
            print(f"writing a {args.layers}-layer, {args.experts}-expert qwen3_moe checkpoint in {src} ...", flush=True)
            shutil.rmtree(args.work, ignore_errors=True)
            # in a child: Linux keeps a process's peak RSS across fork + exec, so the parent stays small
            subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--experts", str(args.experts),
                            "--build-only", str(src)], check=True)
        shutil.rmtree(out, ignore_errors=True)
        grow_s, grow_rss, _ = timed([*moegrow, "grow-width", str(src), str(out), "--experts", "2x", "--quiet"])
        f32 = float32_bytes(out) / 1024**3
        wall, rss, stdout = timed([*moegrow, "verify", str(src), str(out), "--forward", "--json"])
        report = json.loads(stdout)
        fwd = report["forward"]
        result = {
            "layers": args.layers, "experts": args.experts, "grown_experts": 2 * args.experts,
            "source_gib": round(sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1024**3, 2),
            "grown_float32_gib": round(f32, 2), "grow_seconds": round(grow_s, 1),
            "verify_seconds": round(wall, 1), "verify_peak_rss_gib": round(rss, 2),
            "rss_over_float32": round(rss / f32, 3), "ok": report["ok"], "problems": report["problems"][:3],
            "max_abs_diff": fwd["max_abs_diff"], "max_abs_logit_diff": fwd["max_abs_logit_diff"],
            "layers_diff": [d["max_abs_diff"] for d in fwd["layers"]],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        }
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"source {result['source_gib']} GiB bf16; grown ({2 * args.experts} experts) {f32:.2f} GiB in float32")
    print(f"verify --forward: {'ok' if report['ok'] else 'FAILED'} in {wall:.1f} s, peak RSS {rss:.2f} GiB "
          f"= {rss / f32:.3f} of the float32 model (the target: at most 0.25)")
    print(f"  max abs layer difference {fwd['max_abs_diff']:.3g}, max abs logit difference "
          f"{fwd['max_abs_logit_diff']:.3g}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
