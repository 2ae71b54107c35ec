"""Tiny MX-quantised checkpoints, as the releases store them, quantised independently of moegrow.

- `gpt_oss_mxfp4`: a GptOssForCausalLM whose experts are MXFP4 ``*_blocks`` / ``*_scales`` (the
  openai/gpt-oss release layout and `quantization_config`), quantised by `reference_mxfp4`, a
  restatement of the triton kernels' rule (the quantiser transformers' MXFP4 path calls);
- `inkling2_mxfp8`: an Inkling2 text model whose routed experts are float8_e4m3fn ``w13_weight`` /
  ``w2_weight`` with a uint8 e8m0 ``*_scale`` per 32 inputs (the Inkling-2-Small-MXFP8 layout),
  quantised by transformers' own `Fp8Quantize` with the config transformers gives that release.

transformers 5.23 loads the MXFP4 one on the CPU with ``Mxfp4Config(dequantize=True)`` (see
`load_mxfp4`); its fp8 quantiser needs accelerate even to dequantise, and its dequantising load of
Inkling-2 does not apply the ``*_scale`` (they arrive as unexpected ``*_scale_inv`` keys), so the
MXFP8 checkpoint is checked against transformers' `Fp8Dequantize` itself instead.
"""

from __future__ import annotations

import copy
import json
import types
from pathlib import Path

import torch
import transformers

from .conftest import COMMON, TOKENS, randomise, save

GPT_OSS = dict(hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
               sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
# openai/gpt-oss-20b's config.json
GPT_OSS_QUANTIZATION = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
INKLING2_TEXT = dict(hidden_size=32, intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, head_dim=8,
                     swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_head_dim=8, unpadded_vocab_size=64,
                     sliding_window_size=8, d_rel=4, rel_extent=16, n_layers_per_attn_res_block=2,
                     layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"])
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def reference_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks [..., N, K/32, 16], scales [..., N, K/32]) of a float weight [..., K, N], by the kernels' rule.

    Per 32 inputs: r = amax / 6 in float32; the scale is the smallest power of two >= r (2**-126 at
    least, byte 0 for an all-zero block); each value / scale goes to the nearest e2m1 magnitude, a
    tie to the larger one, 6 at most, keeping its sign bit. Written as a nearest-neighbour search,
    independently of moegrow's bucketing."""
    x = w.to(torch.float32).transpose(-1, -2)
    groups = x.unflatten(-1, (x.shape[-1] // 32, 32))
    amax = groups.abs().amax(dim=-1)
    mantissa, exponent = torch.frexp(amax / 6.0)  # amax / 6 = mantissa * 2**exponent, mantissa in [0.5, 1)
    power = (exponent - (mantissa == 0.5).to(exponent.dtype)).clamp(min=-126)
    scales = torch.where(amax == 0, 0, power + 127).to(torch.uint8)
    q = groups.to(torch.float64) * torch.exp2(-power.to(torch.float64)).unsqueeze(-1)
    grid = torch.tensor(FP4_GRID[::-1], dtype=torch.float64)  # larger first: argmin takes the first of a tie
    magnitude = 7 - (q.abs().unsqueeze(-1) - grid).abs().argmin(dim=-1)
    codes = (magnitude | (torch.signbit(groups).long() << 3)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)), scales


def transformers_mxfp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn values, uint8 e8m0 scales) from transformers' Fp8Quantize, as it would save Inkling-2."""
    from transformers.integrations.finegrained_fp8 import Fp8Quantize
    from transformers.models.inkling2.configuration_inkling2 import INKLING2_QUANTIZATION_CONFIG

    q = INKLING2_QUANTIZATION_CONFIG
    config = transformers.FineGrainedFP8Config(weight_block_size=q["weight_block_size"], scale_fmt=q["scale_fmt"])
    out = Fp8Quantize(types.SimpleNamespace(quantization_config=config))._quantize_one("w", w)
    return out["w"], out["w_scale_inv"].view(torch.uint8)


def _rewrite(folder: Path, encode) -> None:
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, t in load_file(folder / "model.safetensors").items():
        tensors.update(encode(name, t))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _set_quantization(folder: Path, quantization: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = copy.deepcopy(quantization)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def gpt_oss_float(seed: int = 0, **overrides):
    config = transformers.GptOssConfig(**{**COMMON, **GPT_OSS, **overrides})
    torch.manual_seed(seed)
    return randomise(transformers.GptOssForCausalLM(config))


def gpt_oss_mxfp4(folder: Path, seed: int = 0, **overrides) -> Path:
    """A gpt_oss checkpoint with MXFP4 experts; the rest float32."""
    save(gpt_oss_float(seed, **overrides), folder)

    def encode(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            return {name: t}
        blocks, scales = reference_mxfp4(t)
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    _rewrite(folder, encode)
    _set_quantization(folder, GPT_OSS_QUANTIZATION)
    return folder


def inkling2_float(seed: int = 0, **overrides):
    config = transformers.AutoConfig.for_model("inkling2_text", **{**COMMON, **INKLING2_TEXT, **overrides})
    torch.manual_seed(seed)
    return randomise(transformers.AutoModelForCausalLM.from_config(config))


def inkling2_mxfp8(folder: Path, seed: int = 0, **overrides) -> Path:
    """An inkling2_text checkpoint (release names, model.llm.*) with MXFP8 routed experts; the rest float32.

    Its config carries the quantization_config transformers adds to an Inkling-2 release on load."""
    from transformers.models.inkling2.configuration_inkling2 import INKLING2_QUANTIZATION_CONFIG

    save(inkling2_float(seed, **overrides), folder)

    def encode(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith(("mlp.experts.w13_weight", "mlp.experts.w2_weight")):
            return {name: t}
        values, scales = transformers_mxfp8(t)
        return {name: values, f"{name}_scale": scales}

    _rewrite(folder, encode)
    _set_quantization(folder, INKLING2_QUANTIZATION_CONFIG)
    return folder


def load_mxfp4(folder: Path):
    """A gpt_oss MXFP4 checkpoint loaded by transformers, dequantised to float32 on the CPU (clean load)."""
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True,
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    return model.eval()


def mxfp4_logits(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_mxfp4(folder)(input_ids=TOKENS).logits
