"""OLMo-core DCP checkpoints (fixtures saved by ai2-olmo-core 3.0.0, tests/fixtures/README.md): inspect,
growth in depth and width with the AdamW state, config.json, refusals. Needs no olmo_core."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from moegrow.dcp_io import DcpReader

from .conftest import run

OLMO = Path(__file__).parent / "fixtures" / "training" / "olmo"
W1 = "blocks.{}.feed_forward_moe.experts.mlp.w1"
W2 = "blocks.{}.feed_forward_moe.experts.mlp.w2"
ROUTER = "blocks.{}.feed_forward_moe.router.weight"
QKV = "blocks.{}.attention.w_q.weight"


def full(folder: Path, key: str) -> torch.Tensor:
    r = DcpReader(folder / "model_and_optim")
    t = r.tensors[key]
    return r.read_slice(key, (0,) * len(t.shape), t.shape)


def test_inspect() -> None:
    code, out, err = run("inspect", OLMO / "default", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["format"] == "olmo-core-dcp" and info["moe_type"] == "default"
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (2, 4, 2) and info["width_exact"]
    assert info["optimizer"]["present"] and info["optimizer"]["step"] == 2.0
    assert "model.blocks.1.feed_forward_moe.router.weight" in info["model_keys"]
    assert json.loads(run("inspect", OLMO / "dropless", "--json")[1])["moe_type"] == "dropless"


@pytest.mark.parametrize("kind", ["default", "dropless"])
def test_width_appends_copies_of_every_expert(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "out"
    code, _, err = run("grow-width", OLMO / kind, out, "--experts", "2x")
    assert code == 0, err
    src = OLMO / kind
    for i in range(2):
        for key in (W1.format(i), W2.format(i), ROUTER.format(i)):
            for prefix, suffix in (("model.", ""), ("optim.state.", ".exp_avg"), ("optim.state.", ".exp_avg_sq")):
                a, b = full(src, prefix + key + suffix), full(out, prefix + key + suffix)
                n = a.shape[0]
                assert b.shape == (2 * n, *a.shape[1:]) and torch.equal(b[:n], a) and torch.equal(b[n:], a), key
            assert torch.equal(full(out, f"optim.state.{key}.step"), full(src, f"optim.state.{key}.step"))
        assert torch.equal(full(out, "model." + QKV.format(i)), full(src, "model." + QKV.format(i)))
    model = json.loads((out / "config.json").read_text())["model"]
    assert model["block"]["feed_forward_moe"]["num_experts"] == 8
    assert model["block"]["feed_forward_moe"]["router"]["top_k"] == 4 and model["n_layers"] == 2
    source_cfg = json.loads((src / "config.json").read_text())
    assert json.loads((out / "config.json").read_text())["run_name"] == source_cfg["run_name"]
    record = json.loads((out / "moegrow.json").read_text())
    assert record["format"] == "olmo-core-dcp" and record["function_preserving"]


def test_noise_on_copied_experts_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow-width", OLMO / "default", out, "--experts", "2x", "--noise", "0.01", "--seed", "5")[0] == 0
    a, b = full(OLMO / "default", "model." + W1.format(0)), full(out, "model." + W1.format(0))
    n = a.shape[0]
    assert torch.equal(b[:n], a)
    assert 0.007 < float((b[n:] - a).std()) < 0.013
    m = "optim.state." + W1.format(0) + ".exp_avg"
    assert torch.equal(full(out, m)[n:], full(OLMO / "default", m)), "moments are never noised"
    r = "model." + ROUTER.format(0)
    assert torch.equal(full(out, r)[64:], full(out, r)[:64]), "no --router-noise: exact router rows"


def test_depth_renumbers_blocks_and_param_groups(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run("grow-depth", OLMO / "default", out, "--layer-map", "0,1,1")
    assert code == 0, err
    for key in ("model." + QKV.format(2), "optim.state." + W2.format(2) + ".exp_avg"):
        assert torch.equal(full(out, key), full(OLMO / "default", key.replace("blocks.2", "blocks.1")))
    r = DcpReader(out / "model_and_optim")
    names = torch.load(io.BytesIO(r.object_bytes("optim.param_groups.0.params")), weights_only=True)
    src = DcpReader(OLMO / "default" / "model_and_optim")
    old = torch.load(io.BytesIO(src.object_bytes("optim.param_groups.0.params")), weights_only=True)
    assert len(names) == len(old) + sum(n.startswith("blocks.1.") for n in old)
    assert W1.format(2) in names and names.count(W1.format(1)) == 1
    assert r.object_bytes("optim.param_groups.0.lr") == src.object_bytes("optim.param_groups.0.lr")
    assert json.loads((out / "config.json").read_text())["model"]["n_layers"] == 3


def test_optimizer_drop(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow-width", OLMO / "dropless", out, "--experts", "2x", "--optimizer", "drop")[0] == 0
    r = DcpReader(out / "model_and_optim")
    assert not [k for k in [*r.tensors, *r.objects] if k.startswith("optim.")]


def test_refusals(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(OLMO / "default", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model"]["block"]["feed_forward_moe"]["router"]["gating_function"] = "sigmoid"
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "sigmoid" in err and "--allow-inexact" in err and not (tmp_path / "out").exists()
    (src / "config.json").unlink()
    code, _, err = run("inspect", src)
    assert code == 2 and "config.json: missing" in err and "Traceback" not in err


def test_verify(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow", OLMO / "default", out, "--layer-map", "0,1,1", "--experts", "2x", "--noise", "0.01")[0] == 0
    code, text, err = run("verify", OLMO / "default", out, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["ok"] and report["tensors_checked"] == len(DcpReader(out / "model_and_optim").tensors)
    assert 0.006 < report["noise_std"]["model." + W1.format(2)] < 0.014
    cfg = json.loads((out / "config.json").read_text())
    cfg["model"]["block"]["feed_forward_moe"]["num_experts"] = 4
    (out / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("verify", OLMO / "default", out)
    assert code == 1 and "model.block.feed_forward_moe.num_experts is 4, the growth gives 8" in err


RUN = OLMO / "run"  # a save folder written by OLMo-core's trainer Checkpointer at world size 2 (FSDP)


def test_save_folder_reads_the_latest_step_or_iteration(tmp_path: Path) -> None:
    info = json.loads(run("inspect", RUN, "--json")[1])
    assert (info["iteration"], info["iterations"]) == (2, [1, 2])
    assert info["checkpoint"].endswith("step2/model_and_optim")
    assert info["parallel"]["saved_by_ranks"] == 2
    info = json.loads(run("inspect", RUN, "--json", "--iteration", "1")[1])
    assert info["iteration"] == 1 and info["optimizer"]["step"] == 1.0
    code, _, err = run("inspect", RUN, "--iteration", "5")
    assert code == 2 and "step5: no such OLMo-core checkpoint" in err and "[1, 2]" in err
    code, _, err = run("inspect", RUN / "step2", "--iteration", "2")
    assert code == 2 and "--iteration applies to a save folder" in err
    partial = tmp_path / "save"
    shutil.copytree(RUN / "step1", partial / "step1")
    shutil.copytree(RUN / "step2", partial / "step2")
    (partial / "step2" / ".metadata.json").unlink()  # a save still in progress: the trainer writes it last
    assert json.loads(run("inspect", partial, "--json")[1])["iteration"] == 1
    (partial / "step1" / ".metadata.json").unlink()
    code, _, err = run("grow-width", partial, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "no complete OLMo-core checkpoint" in err and not (tmp_path / "out").exists()


def test_fsdp_save_folder_grows_and_verifies(tmp_path: Path) -> None:
    src = DcpReader(RUN / "step2" / "model_and_optim")
    assert len(src.metadata.state_dict_metadata["model." + W1.format(0)].chunks) == 2, "sharded by FSDP's 2 ranks"
    out = tmp_path / "grown"
    code, _, err = run("grow", RUN, out, "--layer-map", "0,1,1", "--experts", "2x", "--noise", "0.01")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["moegrow.json", "step2"]
    step = out / "step2"
    for name in ("train/rank0.pt", "train/rank1.pt", ".metadata.json"):
        assert (step / name).read_bytes() == (RUN / "step2" / name).read_bytes()
    for j, m in enumerate([0, 1, 1]):
        a, b = full(RUN / "step2", "model." + W2.format(m)), full(step, "model." + W2.format(j))
        assert torch.equal(b[: a.shape[0]], a) and 0.007 < float((b[a.shape[0]:] - a).std()) < 0.013
        key = f"optim.state.{QKV.format(m)}.exp_avg"
        assert torch.equal(full(step, key.replace(f"blocks.{m}", f"blocks.{j}")), full(RUN / "step2", key))
    # the train module's flattened param groups: one set of fields per parameter, the new block's included
    r = DcpReader(step / "model_and_optim")
    lr = f"optim.param_groups.{W1.format(2)}.lr"
    assert r.object_bytes(lr) == src.object_bytes(lr.replace("blocks.2", "blocks.1"))
    assert len(r.objects) == len(src.objects) + sum(k.startswith("optim.param_groups.blocks.1.") for k in src.objects)
    assert json.loads((step / "config.json").read_text())["model"]["n_layers"] == 3
    code, text, err = run("verify", RUN, out, "--json")
    assert code == 0, err
    assert json.loads(text)["ok"] and json.loads((out / "moegrow.json").read_text())["source"]["iteration"] == 2
    (step / "train" / "rank1.pt").write_bytes(b"x")
    code, _, err = run("verify", RUN, out)
    assert code == 1 and "rank1.pt: missing or not a copy" in err
