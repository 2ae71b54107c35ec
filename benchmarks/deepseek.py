"""A checkpoint with DeepSeek-V3's real tensor names and count (91,991 tensors, fp8 weights with
128x128 block scales, MTP layer 61), at small shapes (real bytes) or full size (sparse files).

`build(folder, full=False)`: small shapes (hidden 128, experts 64 x 128), about 0.4 GB of real bytes.
`build(folder, full=True)`: DeepSeek-V3's real shapes; each shard is its header plus ftruncate, so
the folder takes no disk space and serves `--dry-run` (never a real growth).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

SMALL = dict(hidden=128, q_lora=128, kv_lora=64, rope=32, nope=32, v_head=32, heads=2, moe_inter=64,
             inter=256, vocab=1024)
FULL = dict(hidden=7168, q_lora=1536, kv_lora=512, rope=64, nope=128, v_head=128, heads=128, moe_inter=2048,
            inter=18432, vocab=129280)
LAYERS, DENSE, EXPERTS, SHARDS, BLOCK = 61, 3, 256, 163, 128
_SIZES = {"BF16": 2, "F32": 4, "F8_E4M3": 1}


def _tensors(d: dict[str, int]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, shape) of every tensor, in DeepSeek-V3's order."""
    h = d["hidden"]
    out: list[tuple[str, str, tuple[int, ...]]] = [("model.embed_tokens.weight", "BF16", (d["vocab"], h))]

    def fp8(name: str, rows: int, cols: int) -> None:
        out.append((name + ".weight", "F8_E4M3", (rows, cols)))
        out.append((name + ".weight_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK))))

    def mlp(p: str, inter: int) -> None:
        fp8(p + "gate_proj", inter, h)
        fp8(p + "up_proj", inter, h)
        fp8(p + "down_proj", h, inter)

    for i in range(LAYERS + 1):  # layer 61: the MTP layer
        p = f"model.layers.{i}."
        if i == LAYERS:
            out += [(p + "embed_tokens.weight", "BF16", (d["vocab"], h)), (p + "enorm.weight", "BF16", (h,)),
                    (p + "hnorm.weight", "BF16", (h,)), (p + "eh_proj.weight", "BF16", (h, 2 * h))]
        out.append((p + "input_layernorm.weight", "BF16", (h,)))
        fp8(p + "self_attn.q_a_proj", d["q_lora"], h)
        out.append((p + "self_attn.q_a_layernorm.weight", "BF16", (d["q_lora"],)))
        fp8(p + "self_attn.q_b_proj", d["heads"] * (d["nope"] + d["rope"]), d["q_lora"])
        fp8(p + "self_attn.kv_a_proj_with_mqa", d["kv_lora"] + d["rope"], h)
        out.append((p + "self_attn.kv_a_layernorm.weight", "BF16", (d["kv_lora"],)))
        fp8(p + "self_attn.kv_b_proj", d["heads"] * (d["nope"] + d["v_head"]), d["kv_lora"])
        fp8(p + "self_attn.o_proj", h, d["heads"] * d["v_head"])
        out.append((p + "post_attention_layernorm.weight", "BF16", (h,)))
        if i < DENSE:
            mlp(p + "mlp.", d["inter"])
        else:
            out += [(p + "mlp.gate.weight", "BF16", (EXPERTS, h)),
                    (p + "mlp.gate.e_score_correction_bias", "F32", (EXPERTS,))]
            for e in range(EXPERTS):
                mlp(p + f"mlp.experts.{e}.", d["moe_inter"])
            mlp(p + "mlp.shared_experts.", d["moe_inter"])
        if i == LAYERS:
            out += [(p + "shared_head.norm.weight", "BF16", (h,)),
                    (p + "shared_head.head.weight", "BF16", (d["vocab"], h))]
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (d["vocab"], h))]
    return out


def _config(d: dict[str, int]) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d["hidden"],
        "intermediate_size": d["inter"], "moe_intermediate_size": d["moe_inter"], "num_hidden_layers": LAYERS,
        "num_nextn_predict_layers": 1, "num_attention_heads": d["heads"], "num_key_value_heads": d["heads"],
        "n_shared_experts": 1, "n_routed_experts": EXPERTS, "routed_scaling_factor": 2.5,
        "kv_lora_rank": d["kv_lora"], "q_lora_rank": d["q_lora"], "qk_rope_head_dim": d["rope"],
        "v_head_dim": d["v_head"], "qk_nope_head_dim": d["nope"], "topk_method": "noaux_tc", "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": DENSE, "norm_topk_prob": True,
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "vocab_size": d["vocab"],
        "tie_word_embeddings": False, "rope_theta": 10000, "attention_bias": False, "dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [BLOCK, BLOCK]},
    }


def _fill(f, nbytes: int, dtype: str) -> None:
    """Valid values: fp8 0x38 (1.0), float32 1.0 (scales), bf16 0x3c00-ish small values."""
    pattern = {"F8_E4M3": b"\x38\xb0\x30\x28", "F32": b"\x00\x00\x80\x3f", "BF16": b"\x23\x3c\x23\xbc"}[dtype]
    f.write(pattern * (nbytes // len(pattern)))


def build(folder: Path, full: bool = False) -> int:
    """Write the checkpoint; return its tensor count."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from moegrow.io import header_bytes

    d = FULL if full else SMALL
    tensors = _tensors(d)
    folder.mkdir(parents=True)
    per = math.ceil(len(tensors) / SHARDS)
    weight_map, total = {}, 0
    for k in range(SHARDS):
        shard = tensors[k * per:(k + 1) * per]
        name = f"model-{k + 1:05d}-of-{SHARDS:06d}.safetensors"
        entries = [(n, dt, s, _SIZES[dt] * math.prod(s)) for n, dt, s in shard]
        head, _ = header_bytes(entries)
        size = sum(e[3] for e in entries)
        with open(folder / name, "wb") as f:
            f.write(head)
            if full:
                os.ftruncate(f.fileno(), len(head) + size)
            else:
                for _, dt, _, nbytes in entries:
                    _fill(f, nbytes, dt)
        total += size
        weight_map.update({n: name for n, _, _ in shard})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(_config(d), indent=2))
    return len(tensors)


if __name__ == "__main__":
    import sys

    print(build(Path(sys.argv[1]), full=len(sys.argv) > 2 and sys.argv[2] == "full"))
