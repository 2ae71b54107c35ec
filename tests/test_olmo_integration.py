"""Grown OLMo-core checkpoints load into OLMo-core itself (skipped where ai2-olmo-core is absent).

Runs in the fixture venv (tests/fixtures/README.md): each grown checkpoint's config.json builds a
TransformerConfig of the grown sizes, whose model and AdamW load model_and_optim/ with OLMo-core's
own `load_model_and_optim_state`; the loaded weights and moments are compared with the source's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("olmo_core")

import torch  # noqa: E402

from .conftest import run  # noqa: E402

OLMO = Path(__file__).parent / "fixtures" / "training" / "olmo"


@pytest.fixture(scope="module", autouse=True)
def gloo() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", RANK="0", WORLD_SIZE="1")
        dist.init_process_group("gloo")


def load(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from olmo_core.distributed.checkpoint import load_model_and_optim_state
    from olmo_core.nn.transformer import TransformerConfig

    cfg = TransformerConfig.from_dict(json.loads((folder / "config.json").read_text())["model"])
    model = cfg.build(init_device="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad()
    load_model_and_optim_state(folder / "model_and_optim", model, opt)
    return model, opt


def moments(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict]:
    return {n: opt.state[p] for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["default", "dropless"])
def test_width_and_depth_load_into_olmo_core(tmp_path: Path, kind: str) -> None:
    src = torch.load(OLMO / f"{kind}.state.pt")
    out = tmp_path / "grown"
    code, _, err = run("grow", OLMO / kind, out, "--layer-map", "0,1,1", "--experts", "2x")
    assert code == 0, err
    model, opt = load(out)
    assert len(model.blocks) == 3
    state = model.state_dict()
    for j, m in enumerate([0, 1, 1]):
        for name, t in src.items():
            prefix = f"blocks.{m}."
            if not name.startswith(prefix):
                continue
            got = state[f"blocks.{j}." + name[len(prefix):]]
            if "feed_forward_moe.experts." in name or "feed_forward_moe.router.weight" in name:
                assert got.shape[0] == 2 * t.shape[0]
                assert torch.equal(got[: t.shape[0]], t) and torch.equal(got[t.shape[0]:], t), name
            else:
                assert torch.equal(got, t), name
    for name in ("embeddings.weight", "lm_head.w_out.weight"):
        assert torch.equal(state[name], src[name])
    src_model, src_opt = load(OLMO / kind)
    a, b = moments(src_model, src_opt), moments(model, opt)
    w1 = "feed_forward_moe.experts.mlp.w1"
    got, want = b[f"blocks.2.{w1}"]["exp_avg"], a[f"blocks.1.{w1}"]["exp_avg"]
    assert torch.equal(got, torch.cat([want, want])) and float(want.abs().sum()) > 0
    assert float(b[f"blocks.2.{w1}"]["step"]) == float(a[f"blocks.1.{w1}"]["step"]) == 2.0



@pytest.mark.parametrize("kind", ["default", "dropless"])
def test_identity_depth_loads_into_olmo_core(tmp_path: Path, kind: str) -> None:
    """--depth-init identity: OLMo-core loads the grown blocks, the added blocks' attention.w_out and experts' w2
    zero with zero AdamW moments (their per-parameter step kept), the originals as they were. (OLMo-core's MoE
    forward needs its GPU kernels, so the logits are compared for Megatron only.)"""
    out = tmp_path / "grown"
    code, _, err = run("grow", OLMO / kind, out, "--layers", "2x", "--depth-init", "identity", "--experts", "2x")
    assert code == 0, err
    model, opt = load(out)
    src = torch.load(OLMO / f"{kind}.state.pt")
    params, state = dict(model.named_parameters()), moments(model, opt)
    for j, m in enumerate([0, 0, 1, 1]):
        for rel in ("attention.w_out.weight", "feed_forward_moe.experts.mlp.w2"):
            got, want = params[f"blocks.{j}.{rel}"], src[f"blocks.{m}.{rel}"]
            if j % 2:
                assert not got.any() and not state[f"blocks.{j}.{rel}"]["exp_avg"].any()
                assert not state[f"blocks.{j}.{rel}"]["exp_avg_sq"].any()
                assert float(state[f"blocks.{j}.{rel}"]["step"]) == 2.0
            else:
                n = want.shape[0]
                assert torch.equal(got[:n], want) and state[f"blocks.{j}.{rel}"]["exp_avg"].any(), rel
        assert torch.equal(params[f"blocks.{j}.attention.w_q.weight"], src[f"blocks.{m}.attention.w_q.weight"])
