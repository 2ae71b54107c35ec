"""Grown OLMo-core checkpoints load into OLMo-core itself (skipped where ai2-olmo-core is absent).

Runs where `make install` installed the training extra (pyproject.toml): each grown checkpoint's
config.json builds a TransformerConfig of the grown sizes, whose model and AdamW load model_and_optim/ with OLMo-core's
own `load_model_and_optim_state`; the loaded weights and moments are compared with the source's.
The trainer's save folder saved at world size 2 with FSDP (olmo/run) grows and loads back at world size
2 with FSDP through the trainer's own Checkpointer.load into a TransformerTrainModule. Where CUDA is
available (OLMo-core's MoE forward runs triton kernels), the noise-free width-2x grown model's logits
are compared with the source's.
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


def _fsdp_rank(rank: int, name: str, folder: str, out: str, port: int) -> None:
    """Load a step folder into an FSDP TransformerTrainModule at world size 2 with the trainer's
    Checkpointer; rank 0 saves the full model and (flattened) optimizer state and the trainer state."""
    import torch.distributed as dist
    from olmo_core.distributed.parallel import DataParallelType
    from olmo_core.nn.transformer import TransformerConfig
    from olmo_core.optim import AdamWConfig
    from olmo_core.train.checkpoint import CheckpointerConfig
    from olmo_core.train.train_module import TransformerDataParallelConfig, TransformerTrainModule
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = TransformerConfig.from_dict(json.loads(Path(folder, "config.json").read_text())["model"])
    module = TransformerTrainModule(cfg.build(init_device="cpu"), AdamWConfig(lr=1e-3), rank_microbatch_size=16,
                                    max_sequence_length=16, device=torch.device("cpu"),
                                    dp_config=TransformerDataParallelConfig(name=DataParallelType.fsdp))
    checkpointer = CheckpointerConfig().build(work_dir=Path(out) / f"work{rank}")
    trainer = checkpointer.load(folder, module)
    model, optim = get_state_dict(module.model, module.optim, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True))
    if rank == 0:
        torch.save({"model": model, "optim": optim, "trainer": trainer}, Path(out, f"{name}.pt"))
    dist.destroy_process_group()


def test_fsdp_save_folder_grows_and_loads_at_world_size_2(tmp_path: Path) -> None:
    out = tmp_path / "grown"
    code, _, err = run("grow", OLMO / "run", out, "--layer-map", "0,1,1", "--experts", "2x")
    assert code == 0, err
    for port, (name, folder) in enumerate({"src": OLMO / "run" / "step2", "grown": out / "step2"}.items(), 29543):
        # one spawn each: OLMo-core builds one world mesh per process
        torch.multiprocessing.spawn(_fsdp_rank, args=(name, str(folder), str(tmp_path), port), nprocs=2)
    src, grown = torch.load(tmp_path / "src.pt"), torch.load(tmp_path / "grown.pt")
    assert grown["trainer"] == src["trainer"] and src["trainer"]["global_step"] == 2
    n_src = len(src["model"])
    assert len(grown["model"]) == n_src + sum(k.startswith("blocks.1.") for k in src["model"])
    for j, m in enumerate([0, 1, 1]):
        for kind, prefix, suffixes in (("model", "", ("",)), ("optim", "state.", (".exp_avg", ".exp_avg_sq"))):
            for name in src["model"]:
                if not name.startswith(f"blocks.{m}."):
                    continue
                key = prefix + name
                for suffix in suffixes:
                    want = src[kind][key + suffix]
                    got = grown[kind][prefix + f"blocks.{j}." + name[len(f"blocks.{m}."):] + suffix]
                    if "feed_forward_moe.experts." in name or "feed_forward_moe.router.weight" in name:
                        assert torch.equal(got, torch.cat([want, want])), (key, suffix)
                    else:
                        assert torch.equal(got, want), (key, suffix)
    w1 = "blocks.2.feed_forward_moe.experts.mlp.w1"
    assert float(grown["optim"][f"state.{w1}.step"]) == 2.0
    assert float(grown["optim"][f"state.{w1}.exp_avg"].abs().sum()) > 0
    assert grown["optim"][f"param_groups.{w1}.lr"] == src["optim"][f"param_groups.{w1.replace('2', '1', 1)}.lr"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="OLMo-core's MoE forward runs triton kernels (CUDA)")
def test_noise_free_width_keeps_the_logits_on_cuda(tmp_path: Path) -> None:
    """Source and width-2x grown (noise 0, top-k scaled) default-MoE models: max abs logit difference, float32."""
    from olmo_core.nn.transformer import TransformerConfig

    out = tmp_path / "wide"
    code, _, err = run("grow-width", OLMO / "default", out, "--experts", "2x")
    assert code == 0, err
    src_cfg = TransformerConfig.from_dict(json.loads((OLMO / "default" / "config.json").read_text())["model"])
    src = src_cfg.build(init_device="cpu")
    src.load_state_dict(torch.load(OLMO / "default.state.pt"))
    wide, _ = load(out)
    assert wide.blocks["0"].feed_forward_moe.router.num_experts == 8
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        a = src.cuda().float().eval()(tokens).float()
        b = wide.cuda().float().eval()(tokens).float()
    diff = float((a - b).abs().max())
    print(f"OLMo-core default MoE, width 2x, noise 0: max abs logit difference {diff:.3g} (CUDA, float32)")
    assert a.abs().max() > 0.1 and diff <= 1e-5


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
