"""Peak memory and time of growing a quantised checkpoint with noise (fused MXFP4 experts, fp8 blocks).

`mxfp4`: a one-layer gpt_oss checkpoint with gpt-oss-120b's expert widths (hidden 2880, expert FFN
2880, so gate_up_proj_blocks is [E, 5760, 90, 16]) and E experts (default 32); random MXFP4 codes,
scales around 2**-5. `fp8`: a DeepSeek-V3-style checkpoint (deepseek_v3 names, float8_e4m3fn
linears with 128x128 `weight_scale_inv` blocks, the rest bf16; hidden 1024, expert FFN 512,
64 experts, 4 layers). Each run grows it 2x in width with --noise 0.01 (--dtype keep: the copies
are requantised) and verifies it, each in a fresh process; prints wall time, peak RSS (the child's
ru_maxrss) and a digest of the output's tensors, so that two code trees can be compared byte for
byte.

Usage: python benchmarks/quant_memory.py {mxfp4,fp8} [--experts 32] [--code DIR] [--work DIR]
       [--dtype keep] [--threads 1]
(`--code`: the moegrow tree to run, default this one.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _save(folder: Path, tensors: dict, config: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def _shapes(model_class, config) -> dict:
    """name -> shape of every tensor of a model of `config` (built on the meta device)."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def _random(shape: tuple[int, ...], gen) -> object:
    """Random bf16 values, std 0.02."""
    import torch

    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def _release_names(shapes: dict) -> dict:
    """transformers' fused expert tensors as the release stores them: one linear per expert."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith("mlp.experts.gate_up_proj"):  # [E, 2F, H]
            base = name.removesuffix("gate_up_proj")
            for e in range(shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = out[f"{base}{e}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif name.endswith("mlp.experts.down_proj"):  # [E, H, F]
            base = name.removesuffix("down_proj")
            for e in range(shape[0]):
                out[f"{base}{e}.down_proj.weight"] = (shape[1], shape[2])
        else:
            out[name] = shape
    return out


def build_mxfp4(folder: Path, experts: int) -> None:
    import torch
    import transformers

    config = transformers.GptOssConfig(
        hidden_size=2880, intermediate_size=2880, num_local_experts=experts, num_experts_per_tok=4,
        num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=64, vocab_size=1024,
        layer_types=["full_attention"], tie_word_embeddings=False)
    config.num_hidden_layers = 1
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in _shapes(transformers.GptOssForCausalLM, config).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, k, rows = shape  # [E, in, out]: stored output-major, 32 inputs per scale
            tensors[name + "_blocks"] = torch.randint(0, 256, (e, rows, k // 32, 16), dtype=torch.uint8, generator=gen)
            tensors[name + "_scales"] = torch.randint(120, 124, (e, rows, k // 32), dtype=torch.uint8, generator=gen)
        else:
            tensors[name] = _random(shape, gen)
    out = config.to_dict()
    out["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    _save(folder, tensors, out)


def build_fp8(folder: Path, experts: int) -> None:
    import torch
    import transformers

    block = 128
    config = transformers.DeepseekV3Config(
        hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512, n_routed_experts=experts,
        num_experts_per_tok=8, n_shared_experts=1, num_hidden_layers=4, first_k_dense_replace=1,
        num_attention_heads=8, num_key_value_heads=8, q_lora_rank=384, kv_lora_rank=256,
        qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64, vocab_size=1024, n_group=8, topk_group=4)
    tensors = {}
    gen = torch.Generator().manual_seed(1)
    for name, shape in _release_names(_shapes(transformers.DeepseekV3ForCausalLM, config)).items():
        t = _random(shape, gen)
        linear = (name.startswith("model.layers.") and name.endswith(".weight") and t.ndim == 2
                  and "norm" not in name and not name.endswith("mlp.gate.weight"))
        if not linear:
            tensors[name] = t.float() if "correction_bias" in name else t
            continue
        w = t.float()
        rows, cols = w.shape
        r, c = -(-rows // block), -(-cols // block)
        padded = torch.zeros(r * block, c * block)
        padded[:rows, :cols] = w
        blocks = padded.reshape(r, block, c, block)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
        q = (blocks / scale[:, None, :, None]).clamp(-448, 448).reshape(padded.shape)[:rows, :cols]
        tensors[name], tensors[name + "_scale_inv"] = q.to(torch.float8_e4m3fn).contiguous(), scale
    out = config.to_dict()
    out["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    out["dtype"] = "bfloat16"
    _save(folder, tensors, out)


def measure(code: Path, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in GiB) of `python -m moegrow ARGS` run from the tree `code`."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "moegrow", *args], env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"moegrow {' '.join(args)} failed")
    return seconds, usage.ru_maxrss / 1024**2


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("format", choices=["mxfp4", "fp8"])
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--code", type=Path, default=ROOT)
    ap.add_argument("--work", type=Path, default=Path("bench-work"))
    ap.add_argument("--dtype", default="keep")
    ap.add_argument("--threads", default="1")
    a = ap.parse_args()
    experts = a.experts or {"mxfp4": 32, "fp8": 64}[a.format]
    src = a.work / f"{a.format}-{experts}"
    if not (src / "config.json").exists():
        (build_mxfp4 if a.format == "mxfp4" else build_fp8)(src, experts)
    out = a.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    size = sum(f.stat().st_size for f in src.glob("*.safetensors")) / 1024**3
    grow = measure(a.code, "grow-width", str(src), str(out), "--experts", "2x", "--noise", "0.01", "--dtype",
                   a.dtype, "--threads", a.threads, "--quiet")
    check = measure(a.code, "verify", str(src), str(out), "--quiet")
    print(json.dumps({"format": a.format, "experts": experts, "source_gib": round(size, 2), "dtype": a.dtype,
                      "code": str(a.code), "grow_s": round(grow[0], 1), "grow_peak_rss_gib": round(grow[1], 2),
                      "verify_s": round(check[0], 1), "verify_peak_rss_gib": round(check[1], 2),
                      "output_digest": digest(out)}))


if __name__ == "__main__":
    main()
