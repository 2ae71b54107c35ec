"""Tiny real checkpoints, built with transformers from a config and saved with save_pretrained."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
# Tiny models gain nothing from intra-op threads, and pytest-xdist already runs one worker per core:
# more threads per worker only oversubscribe the CPU.
torch.set_num_threads(1)

COMMON = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=12, norm_topk_prob=False),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                      norm_topk_prob=True),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
                        kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, head_dim=8, norm_topk_prob=True),
}


def build_model(model_type: str, seed: int = 0, **overrides):
    """A tiny random model with non-trivial routers (and correction biases) so routing matters."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILIES[model_type],
                                                              **overrides})
    torch.manual_seed(seed)
    return randomise(transformers.AutoModelForCausalLM.from_config(config))


def randomise(model):
    """Routers drawn wide (std 0.5) so that routing matters, correction biases from U(-0.3, 0.3), and hash
    tables (deepseek_v4's tid2eid) with k distinct experts per token; in place, from torch's current seed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "gate" in name or "router" in name else 0.2)
        for name, b in model.named_buffers():
            if "correction_bias" in name or "expert_bias" in name:
                b.uniform_(-0.3, 0.3)
            if name.endswith("tid2eid"):
                experts = model.config.get_text_config().num_local_experts
                b.copy_(torch.stack([torch.randperm(experts)[:b.shape[1]] for _ in b]))
    return model.eval()


def built_once(tmp_path_factory, build: Callable[[str], Any]) -> Callable[[str], Path]:
    """`get(key)`: the checkpoint of `build(key)`, saved on first use in each worker, then reused."""
    saved: dict[str, Path] = {}

    def get(key: str) -> Path:
        if key not in saved:
            saved[key] = save(build(key), tmp_path_factory.mktemp(key))
        return saved[key]
    return get


def save(model, folder: Path, **kw) -> Path:
    model.save_pretrained(folder, **kw)
    # a side file that must travel to the output untouched
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return folder


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One saved float32 checkpoint per family (built once per test worker)."""
    root = tmp_path_factory.mktemp("src")
    return {mt: save(build_model(mt), root / mt) for mt in FAMILIES}


@pytest.fixture
def ckpt_copy(tmp_path):
    """Copy a checkpoint into the test's own folder (for tests that mutate a source)."""
    def copy(src: Path) -> Path:
        dest = tmp_path / ("src-" + src.name)
        shutil.copytree(src, dest)
        return dest
    return copy


TOKENS = torch.randint(3, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(folder: Path) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    model.eval()
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with safetensors itself."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_tensor(k) for k in s.keys()})  # noqa: SIM118
    return out


def run(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from moegrow import cli

    out, err = io.StringIO(), io.StringIO()
    cli.err.file = err
    code = 0
    with redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main([str(a) for a in args])
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue(), err.getvalue()
