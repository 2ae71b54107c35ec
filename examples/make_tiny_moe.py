"""Build a tiny random Mixture-of-Experts checkpoint to try moegrow on (no download needed).

Usage: .venv/bin/python examples/make_tiny_moe.py [mixtral|qwen2_moe|qwen3_moe|olmoe|deepseek_v3|llama] OUT
(llama is dense: a source for `moegrow upcycle`.)
"""

from __future__ import annotations

import sys

import torch
import transformers

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

SIZES = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build(family: str, out: str, **sizes) -> str:
    """Save a tiny random `family` checkpoint (bf16) to `out`; `sizes` overrides the config's sizes."""
    transformers.logging.set_verbosity_error()
    config = transformers.AutoConfig.for_model(family, **{**SIZES, **CONFIGS[family], **sizes})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    with torch.no_grad():  # routers with real spread, so that routing matters
        for name, p in model.named_parameters():
            if "gate.weight" in name or "router" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def main() -> None:
    family, out = (sys.argv[1], sys.argv[2]) if len(sys.argv) == 3 else ("mixtral", sys.argv[-1])
    build(family, out)
    print(f"wrote a tiny {family} checkpoint to {out}")


if __name__ == "__main__":
    main()
