"""Build a tiny random Mixture-of-Experts checkpoint to try moegrow on (no download needed).

Usage: .venv/bin/python examples/make_tiny_moe.py [mixtral|qwen2_moe|qwen3_moe|olmoe|deepseek_v3|llama] OUT [--fp8 B]

llama is dense: a source for `moegrow upcycle`.

`--fp8 B` writes it as DeepSeek-V3's releases are stored: every decoder linear but the router in
float8_e4m3fn with one float32 `weight_scale_inv` per BxB block (scale = block amax / 448, edge
blocks ragged where a dimension is not a multiple of B), the rest bfloat16, correction biases float32,
and `quantization_config` saying so.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

CONFIGS = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=32),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32,
                        v_head_dim=32, head_dim=32),
    "llama": dict(),  # dense, to upcycle into mixtral
}
FP8_MAX = 448.0  # the largest float8_e4m3fn value


def fp8_blocks(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scale_inv) of a 2-D weight: per BxB block, scale_inv = amax / 448 and values = w / scale_inv."""
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w.float()
    blocks = padded.reshape(r, block, c, block)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    values = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(padded.shape)[:rows, :cols]
    return values.to(torch.float8_e4m3fn).contiguous(), scale


def to_fp8(folder: Path, block: int) -> None:
    """Rewrite a saved checkpoint in place as a DeepSeek-V3-style fp8 release."""
    path = folder / "model.safetensors"
    tensors = {}
    for name, t in load_file(path).items():
        if (name.startswith("model.layers.") and name.endswith(".weight") and t.ndim == 2
                and "norm" not in name and not name.endswith("mlp.gate.weight")):
            tensors[name], tensors[name + "_scale_inv"] = fp8_blocks(t, block)
        else:
            tensors[name] = t.float() if "correction_bias" in name else t.to(torch.bfloat16)
    save_file(tensors, path, metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


SIZES = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(family: str, out: str | Path, **sizes) -> Path:
    """Save a tiny random `family` checkpoint (bf16) to `out`; `sizes` overrides the config's sizes."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.for_model(family, **{**SIZES, **CONFIGS[family], **sizes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # routers with real spread, so that routing matters
        for name, p in model.named_parameters():
            if "gate.weight" in name or "router" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return Path(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", nargs="?", default="mixtral", choices=sorted(CONFIGS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--fp8", type=int, metavar="B", help="store as fp8 with BxB block scales")
    args = parser.parse_args()
    build(args.family, args.out)
    if args.fp8:
        to_fp8(args.out, args.fp8)
    fp8 = f" (fp8, {args.fp8}x{args.fp8} block scales)" if args.fp8 else ""
    print(f"wrote a tiny {args.family} checkpoint{fp8} to {args.out}")


if __name__ == "__main__":
    main()
