"""Grown Megatron checkpoints load into megatron-core itself (skipped where megatron-core is absent).

Runs where `make install` installed the training extra (pyproject.toml): each grown checkpoint is
loaded with `dist_checkpointing.load` into a GPTModel of the grown sizes with its Adam optimizer, strictly (no
missing, no unexpected key), at world size 1 and 2 (expert parallel 2), and for noise-free width
growth the logits are compared with the source model's (loaded from the source checkpoint).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402

from .conftest import run  # noqa: E402

FIX = Path(__file__).parent / "fixtures"
MEGATRON = FIX / "training" / "megatron"
sys.path.insert(0, str(FIX))


def load(folder: Path, arch: dict, ep: bool = False, optimizer: bool = True, **config: object) \
        -> tuple[torch.nn.Module, dict]:
    """A GPTModel of `arch` (and its Adam; `config`: extra TransformerConfig fields) loaded strictly from
    `folder`; returns (model, loaded state)."""
    import make_training_fixtures as mf
    import megatron_tiny as mt
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    model = mt.build(arch, ep=ep, seed=123, **config)
    opt = None
    if optimizer:
        opt = torch.optim.Adam(model.parameters(), lr=0.0)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # Adam's state exists (zeros) to be loaded into
    state = mf.megatron_state(model, opt, 0, 2 if ep else 1)
    loaded, missing, unexpected = dist_checkpointing.load(state, str(folder), strict=StrictHandling.RETURN_ALL)
    assert not missing and not unexpected, (sorted(missing)[:5], sorted(unexpected)[:5])
    result = model.load_state_dict(loaded["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    if opt is not None:
        step = loaded["optimizer"]["state"].pop("common_step")  # as megatron's FP32Optimizer restores it
        for per_param in loaded["optimizer"]["state"].values():
            per_param["step"] = step.clone()
        opt.load_state_dict(loaded["optimizer"])
        loaded["adam"] = opt
    return model.eval(), loaded


def _grow(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    code, _, err = run(*args[:2], out, *args[2:])
    assert code == 0, err
    return out


def test_world_size_1_width_exact_depth_loads(tmp_path: Path) -> None:
    import megatron_tiny as mt

    created = not torch.distributed.is_initialized()  # under xdist another module's group may be up: keep it
    mt.init_distributed(port=29531)
    src_model, _ = load(MEGATRON / "run" / "iter_0000020", {})
    wide = _grow(tmp_path, "wide", "grow-width", str(MEGATRON / "run"), "--experts", "2x")
    model, loaded = load(wide / "iter_0000020", {"num_experts": 8, "moe_router_topk": 4})
    diff = float((mt.logits(model) - mt.logits(src_model)).abs().max())
    print(f"world size 1, width 2x, noise 0: max abs logit difference {diff:.3g}")
    assert diff <= 1e-5
    names = [n for n, _ in model.named_parameters()]
    state = loaded["adam"].state
    params = dict(model.named_parameters())
    for e in range(4):
        a = state[params[f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc1.weight"]]
        b = state[params[f"decoder.layers.1.mlp.experts.local_experts.{e + 4}.linear_fc1.weight"]]
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert a["exp_avg"].abs().sum() > 0
    assert len(names) == len(params)
    deep = _grow(tmp_path, "deep", "grow", str(MEGATRON / "run"), "--layers", "2x", "--experts", "2x",
                 "--noise", "0.01")
    load(deep / "iter_0000020", {"num_layers": 4, "num_experts": 8, "moe_router_topk": 4})
    if created:
        torch.distributed.destroy_process_group()


def _worker(rank: int, folders: dict, out: str) -> None:
    import megatron_tiny as mt

    mt.init_distributed(rank, 2, ep=2, port=29532)
    src, _ = load(Path(folders["src"]), {}, ep=True)
    wide, _ = load(Path(folders["wide"]), {"num_experts": 8, "moe_router_topk": 4}, ep=True)
    load(Path(folders["deep"]), {"num_layers": 4, "num_experts": 8, "moe_router_topk": 4}, ep=True)
    diff = float((mt.logits(wide) - mt.logits(src)).abs().max())
    Path(out, f"rank{rank}.json").write_text(json.dumps({"diff": diff}))
    torch.distributed.destroy_process_group()


def test_world_size_2_expert_parallel(tmp_path: Path) -> None:
    wide = _grow(tmp_path, "wide", "grow-width", str(MEGATRON / "ep2"), "--experts", "2x")
    deep = _grow(tmp_path, "deep", "grow", str(MEGATRON / "ep2"), "--layers", "2x", "--experts", "2x",
                 "--noise", "0.01", "--router-noise", "0.01")
    folders = {"src": str(MEGATRON / "ep2"), "wide": str(wide), "deep": str(deep)}
    torch.multiprocessing.spawn(_worker, args=(folders, str(tmp_path)), nprocs=2)
    diffs = [json.loads((tmp_path / f"rank{r}.json").read_text())["diff"] for r in range(2)]
    print(f"world size 2 (expert parallel 2), width 2x, noise 0: max abs logit difference {max(diffs):.3g}")
    assert max(diffs) <= 1e-5


def _dp_reshardable_optimizer(model: torch.nn.Module) -> dict:
    """The optimizer record Megatron's DistributedOptimizer.sharded_state_dict writes with
    sharding_type 'dp_reshardable' (megatron-core 0.16.1, distrib_optimizer.py), built by hand at data
    parallel size 1 (the distributed optimizer needs CUDA buffers to construct): one grad buffer, one
    bucket holding every parameter flattened; param, exp_avg and exp_avg_sq as ShardedTensors of the
    bucket's key at each parameter's range; per_bucket_numel as ShardedObjects; the torch optimizer's
    own state_dict entries as ShardedObjects; `param_state_sharding_type` in common."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    group = "optimizer.distributed.dp_group_idx_0"
    bucket = f"{group}.gbuf_idx_0.dtype_{(torch.float32, torch.float32)}.bucket_idx_0"
    params = [p.detach().reshape(-1) for p in model.parameters()]
    total = sum(p.numel() for p in params)
    param_state, start = [], 0
    for p in params:
        entry = {}
        for name in ("param", "exp_avg", "exp_avg_sq"):
            t = p.clone() if name == "param" else torch.rand_like(p) * 0.01
            entry[name] = ShardedTensor(f"{bucket}.{name}", t, t.dtype, t.shape, (total,), (start,),
                                        axis_fragmentations=None, flattened_range=None, allow_shape_mismatch=False,
                                        replica_id=(0, 0, 0))
        param_state.append(entry)
        start += p.numel()
    per_bucket = {k: ShardedObject(f"{group}.{k}", {(torch.float32, torch.float32): [[total]]}, (1,), (0,),
                                   replica_id=(0, 0, 0)) for k in ("per_bucket_numel", "per_bucket_numel_unpadded")}
    inner = {"optimizer": {"param_groups": [{"lr": 1e-3, "params": list(range(len(params)))}]},
             "grad_scaler": None}
    return {**{k: ShardedObject(f"{group}.{k}", v, (1,), (0,), replica_id=(0, 0, 0)) for k, v in inner.items()},
            "param_state": {0: {(torch.float32, torch.float32): [param_state]}, **per_bucket},
            "param_state_sharding_type": "dp_reshardable"}


def test_distributed_optimizer_dp_reshardable_is_refused_unless_dropped(tmp_path: Path) -> None:
    import make_training_fixtures as mf
    import megatron_tiny as mt

    created = not torch.distributed.is_initialized()
    mt.init_distributed(port=29535)
    model = mt.build()
    state = mf.megatron_state(model, None, 30, 1)
    state["args"].use_distributed_optimizer = True
    state["optimizer"] = _dp_reshardable_optimizer(model)
    src = tmp_path / "src"
    mf.save(state, src)
    from moegrow.dcp_io import DcpReader

    flat = [k for k in DcpReader(src).tensors if k.startswith("optimizer.distributed.")]
    assert len(flat) == 3 and all(".bucket_idx_0." in k for k in flat), flat
    info = json.loads(run("inspect", src, "--json")[1])
    assert info["optimizer"]["kind"] == "distributed (dp_reshardable)" and not info["optimizer"]["growable"]
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "dp_reshardable" in err and "--optimizer drop" in err and not (tmp_path / "out").exists()
    out = _grow(tmp_path, "out", "grow-width", str(src), "--experts", "2x", "--optimizer", "drop")
    grown, _ = load(out, {"num_experts": 8, "moe_router_topk": 4}, optimizer=False)
    diff = float((mt.logits(grown) - mt.logits(model)).abs().max())
    assert diff <= 1e-5
    assert run("verify", src, out)[0] == 0
    if created:
        torch.distributed.destroy_process_group()


def test_mtp_layer_widens_and_loads(tmp_path: Path) -> None:
    """A checkpoint with an MoE multi-token-prediction layer, grown 2x in width at zero noise, loads strictly
    into a GPTModel of 8 experts with its MTP layer; every MTP expert copy equals its original, and the
    language-model loss (the decoder's) is the source's."""
    import megatron_tiny as mt

    created = not torch.distributed.is_initialized()
    mt.init_distributed(port=29536)
    src, _ = load(MEGATRON / "mtp", {}, mtp_num_layers=1)
    out = _grow(tmp_path, "wide", "grow-width", str(MEGATRON / "mtp"), "--experts", "2x")
    wide, loaded = load(out, {"num_experts": 8, "moe_router_topk": 4}, mtp_num_layers=1)
    experts = wide.mtp.layers[0].transformer_layer.mlp.experts.local_experts
    src_experts = src.mtp.layers[0].transformer_layer.mlp.experts.local_experts
    state, params = loaded["adam"].state, dict(wide.named_parameters())
    for e in range(4):
        for fc in ("linear_fc1", "linear_fc2"):
            a, b = getattr(experts[e], fc).weight, getattr(experts[e + 4], fc).weight
            assert torch.equal(a, b) and torch.equal(a, getattr(src_experts[e], fc).weight)
        name = f"mtp.layers.0.transformer_layer.mlp.experts.local_experts.{e}.linear_fc1.weight"
        copy = state[params[name.replace(f"experts.{e}.", f"experts.{e + 4}.")]]
        assert torch.equal(state[params[name]]["exp_avg"], copy["exp_avg"]) and copy["exp_avg"].abs().sum() > 0
    s = mt.ARCH["seq_length"]
    tokens = torch.randint(0, mt.ARCH["padded_vocab_size"], (2, s), generator=torch.Generator().manual_seed(5))
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).view(1, 1, s, s)
    with torch.no_grad():
        losses = [m(tokens, torch.arange(s).unsqueeze(0).expand(2, s), mask, labels=tokens) for m in (src, wide)]
    diff = float((losses[0] - losses[1]).abs().max())
    print(f"MTP checkpoint, width 2x, noise 0: max abs language-model loss difference {diff:.3g}")
    assert diff <= 1e-5
    if created:
        torch.distributed.destroy_process_group()

def test_identity_depth_keeps_the_logits(tmp_path: Path) -> None:
    """--depth-init identity: the added layers' linear_proj and expert linear_fc2 are zero, so megatron-core's
    GPTModel of the grown depth computes the source's logits (and its Adam state loads strictly)."""
    import megatron_tiny as mt

    mt.init_distributed(port=29533)
    src_model, _ = load(MEGATRON / "run" / "iter_0000020", {})
    deep = _grow(tmp_path, "deep", "grow", str(MEGATRON / "run"), "--layers", "2x", "--depth-init", "identity",
                 "--experts", "2x")
    model, loaded = load(deep / "iter_0000020", {"num_layers": 4, "num_experts": 8, "moe_router_topk": 4})
    diff = float((mt.logits(model) - mt.logits(src_model)).abs().max())
    print(f"world size 1, depth 2x identity + width 2x, noise 0: max abs logit difference {diff:.3g}")
    assert diff <= 1e-5
    params = dict(model.named_parameters())
    state = loaded["adam"].state
    proj = params["decoder.layers.1.self_attention.linear_proj.weight"]
    assert not proj.any() and not state[proj]["exp_avg"].any() and not state[proj]["exp_avg_sq"].any()
    assert params["decoder.layers.0.self_attention.linear_proj.weight"].any()
    copied = _grow(tmp_path, "copied", "grow-depth", str(MEGATRON / "run"), "--layers", "2x")
    model, _ = load(copied / "iter_0000020", {"num_layers": 4})
    assert float((mt.logits(model) - mt.logits(src_model)).abs().max()) > 1e-3, "copy init changes the function"
    torch.distributed.destroy_process_group()


def test_select_first_and_reinit_load_strictly(tmp_path: Path) -> None:
    """--select first (6 of 4 experts) and --reinit: megatron-core loads the grown checkpoints strictly, the
    new experts' weights and Adam moments where moegrow put them."""
    import megatron_tiny as mt

    mt.init_distributed(port=29534)
    src, src_loaded = load(MEGATRON / "run" / "iter_0000020", {})
    sel = _grow(tmp_path, "sel", "grow-width", str(MEGATRON / "run"), "--experts", "6", "--select", "first")
    model, loaded = load(sel / "iter_0000020", {"num_experts": 6})
    a, b = dict(src.named_parameters()), dict(model.named_parameters())
    for e in range(2):
        name = "decoder.layers.1.mlp.experts.local_experts.{}.linear_fc2.weight"
        assert torch.equal(b[name.format(4 + e)], a[name.format(e)])
        assert torch.equal(loaded["adam"].state[b[name.format(4 + e)]]["exp_avg"],
                           src_loaded["adam"].state[a[name.format(e)]]["exp_avg"])
    assert b["decoder.layers.0.mlp.router.weight"].shape[0] == 6
    rein = _grow(tmp_path, "rein", "grow-width", str(MEGATRON / "run"), "--experts", "2x", "--reinit", "0.5")
    model, loaded = load(rein / "iter_0000020", {"num_experts": 8, "moe_router_topk": 4})
    fc2 = dict(model.named_parameters())["decoder.layers.0.mlp.experts.local_experts.5.linear_fc2.weight"]
    zero_cols = (loaded["adam"].state[fc2]["exp_avg"] == 0).all(dim=0)
    assert int(zero_cols.sum()) == fc2.shape[1] // 2, "the re-initialised neurons' moments are zero"
    torch.distributed.destroy_process_group()
