"""Megatron-core torch_dist checkpoints (fixtures saved by megatron-core 0.16.1, tests/fixtures/README.md):
inspect, growth in depth and width with the Adam moments, provenance, errors. Needs no megatron."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from moegrow.dcp_io import DcpReader
from moegrow.torch_pickle import load_record

from .conftest import run

FIX = Path(__file__).parent / "fixtures" / "training" / "megatron"
FC1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
FC2 = "decoder.layers.mlp.experts.experts.linear_fc2.weight"
ROUTER = "decoder.layers.mlp.router.weight"
QKV = "decoder.layers.self_attention.linear_qkv.weight"
EXP_AVG = "optimizer.state.exp_avg."
EXP_AVG_SQ = "optimizer.state.exp_avg_sq."


def full(folder: Path, key: str) -> torch.Tensor:
    r = DcpReader(folder)
    t = r.tensors[key]
    return r.read_slice(key, (0,) * len(t.shape), t.shape)


def test_inspect_run_folder_latest_and_iteration() -> None:
    code, out, _ = run("inspect", FIX / "run", "--json")
    assert code == 0
    info = json.loads(out)
    assert (info["num_layers"], info["num_experts"], info["top_k"]) == (2, 4, 2)
    assert (info["iteration"], info["iterations"]) == (20, [10, 20])
    assert info["optimizer"]["present"] and info["optimizer"]["states"] == ["exp_avg", "exp_avg_sq"]
    assert info["optimizer"]["step"] == 2 and info["optimizer"]["growable"]
    assert FC1 in info["model_keys"] and ROUTER in info["model_keys"]
    code, out, _ = run("inspect", FIX / "run", "--iteration", "10", "--json")
    assert code == 0 and json.loads(out)["iteration"] == 10 and not json.loads(out)["optimizer"]["present"]
    code, out, _ = run("inspect", FIX / "run")
    assert code == 0 and "iteration 20" in out and "top-k: 2" in out


def test_inspect_expert_parallel_and_bare() -> None:
    info = json.loads(run("inspect", FIX / "ep2", "--json")[1])
    assert info["parallel"]["saved_by_ranks"] == 2 and info["parallel"]["expert_model_parallel_size"] == 2
    bare = json.loads(run("inspect", FIX / "bare", "--json")[1])
    assert bare["top_k"] is None and not bare["args_in_common_pt"] and bare["num_experts"] == 4


def test_width_copies_experts_router_and_moments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run("grow-width", FIX / "run", out, "--experts", "2x")
    assert code == 0, err
    src, dst = FIX / "run" / "iter_0000020", out / "iter_0000020"
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert (dst / "metadata.json").read_bytes() == (src / "metadata.json").read_bytes()
    for key in (FC1, FC2, ROUTER, EXP_AVG + FC1, EXP_AVG_SQ + FC2, EXP_AVG + ROUTER):
        a, b = full(src, key), full(dst, key)
        assert b.shape == (a.shape[0], 8, *a.shape[2:])
        assert torch.equal(b[:, :4], a) and torch.equal(b[:, 4:], a), key
    assert torch.equal(full(dst, QKV), full(src, QKV))
    common = load_record(dst / "common.pt")
    assert (common["args"].num_experts, common["args"].moe_router_topk, common["args"].num_layers) == (8, 4, 2)
    assert float(common["optimizer"]["state"]["common_step"]) == 2.0
    objects = DcpReader(dst).objects
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.7_2.8" in objects
    assert "rng_state/shard_0.0_1.1" in objects
    rng = "rng_state/shard_0.0_1.1"
    assert DcpReader(dst).object_bytes(rng) == DcpReader(src).object_bytes(rng)
    record = json.loads((out / "moegrow.json").read_text())
    assert record["format"] == "megatron-torch_dist" and record["function_preserving"]
    assert record["growth"]["factor"] == 2 and record["source"]["iteration"] == 20
    assert record["tensors"][FC1]["shape"] == [2, 8, 16, 8]


def test_grow_noise_on_copies_only_moments_exact(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("grow", FIX / "ep2", out, "--layers", "2x", "--experts", "2x", "--noise", "0.01", "--seed", "3")
    code, _, err = run(*args)
    assert code == 0, err
    for key in (FC1, FC2):
        a, b = full(FIX / "ep2", key), full(out, key)
        assert b.shape == (4, 8, *a.shape[2:])
        for j, m in enumerate([0, 0, 1, 1]):
            assert torch.equal(b[j, :4], a[m]), "originals stay exact"
            diff = b[j, 4:] - a[m]
            assert 0.006 < float(diff.std()) < 0.014 and float(diff.abs().min()) >= 0
        mom = full(out, EXP_AVG + key)
        src_mom = full(FIX / "ep2", EXP_AVG + key)
        for j, m in enumerate([0, 0, 1, 1]):
            assert torch.equal(mom[j, 4:], src_mom[m]) and torch.equal(mom[j, :4], src_mom[m])
    assert torch.equal(full(out, ROUTER)[:, 4:], full(out, ROUTER)[:, :4]), "no --router-noise: exact rows"
    assert load_record(out / "common.pt")["args"].num_layers == 4
    again = tmp_path / "again"
    assert run(*args[:2], again, *args[3:])[0] == 0
    assert torch.equal(full(out, FC1), full(again, FC1)), "the same seed gives the same values"
    record = json.loads((out / "moegrow.json").read_text())
    assert record["growth"]["layer_map"] == [0, 0, 1, 1] and not record["function_preserving"]


def test_depth_renames_layer_entries(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow-depth", FIX / "run", out, "--layer-map", "0,1,1", "--iteration", "10")[0] == 0
    dst = out / "iter_0000010"
    assert torch.equal(full(dst, QKV)[2], full(FIX / "run" / "iter_0000010", QKV)[1])
    objects = DcpReader(dst).objects
    assert "decoder.layers.self_attention.linear_qkv._extra_state/shard_2_3" in objects
    assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_2.3_3.4" in objects
    assert not any(o.endswith("_2") or "_2.4" in o for o in objects)
    assert (out / "latest_checkpointed_iteration.txt").read_text() == "10"


def test_optimizer_drop(tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run("grow-width", FIX / "ep2", out, "--experts", "2x", "--optimizer", "drop")
    assert code == 0, err
    assert not [k for k in DcpReader(out).tensors if k.startswith("optimizer.")]
    assert "optimizer" not in load_record(out / "common.pt")


@pytest.mark.parametrize("args, message", [
    (("grow-width", "bare", "--experts", "2x"), "--top-k"),
    (("grow-depth", "bare", "--layers", "2x", "--iteration", "3"), "--iteration applies"),
    (("grow-width", "run", "--experts", "3", ), "not a multiple"),
    (("grow-width", "run", "--experts", "2x", "--optimizer", "maybe"), "--optimizer must be"),
])
def test_refusals(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    op, name, *flags = args
    code, _, err = run(op, FIX / name, tmp_path / "out", *flags)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_damaged_source_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIX / "bare", src)
    data = (src / "__0_0.distcp").read_bytes()
    (src / "__0_0.distcp").write_bytes(data[: len(data) // 2])
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x")
    assert code == 2 and "truncated" in err and not (tmp_path / "out").exists()


def test_verify_passes_on_grown_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow", FIX / "ep2", out, "--layers", "2x", "--experts", "2x", "--noise", "0.01", "--seed", "3")[0] == 0
    code, out_text, err = run("verify", FIX / "ep2", out, "--json")
    assert code == 0, err
    report = json.loads(out_text)
    assert report["ok"] and report["tensors_checked"] == len(DcpReader(out).tensors)
    assert 0.006 < report["noise_std"][FC1] < 0.014 and ROUTER not in report["noise_std"]
    run_out = tmp_path / "run"
    assert run("grow-depth", FIX / "run", run_out, "--layer-map", "0,1,1", "--iteration", "10")[0] == 0
    code, _, err = run("verify", FIX / "run", run_out)
    assert code == 0 and "ok:" in err


@pytest.mark.parametrize("what", ["copy", "noise", "moment", "args", "object", "seed"])
def test_verify_fails_on_tampering(tmp_path: Path, what: str) -> None:
    out = tmp_path / "out"
    assert run("grow-width", FIX / "run", out, "--experts", "2x", "--noise", "0.01", "--seed", "1")[0] == 0
    dst = out / "iter_0000020"

    def bump(t: torch.Tensor) -> torch.Tensor:
        t.view(-1)[0] += 0.5
        return t

    if what in ("copy", "noise", "moment"):
        key = {"copy": QKV, "noise": FC2, "moment": EXP_AVG_SQ + FC1}[what]
        r = DcpReader(dst)
        chunks = r.tensors[key].chunks
        chunk = chunks[-1] if what == "noise" else chunks[0]  # the last chunk of FC2 is a noised copy
        info = r._where[(key, chunk.offsets)]
        import io

        path = dst / info.relative_path
        data = bytearray(path.read_bytes())
        t = torch.load(io.BytesIO(bytes(data[info.offset: info.offset + info.length])), weights_only=True)
        buf = io.BytesIO()
        torch.save(bump(t.clone()), buf)
        assert len(buf.getvalue()) == info.length
        data[info.offset: info.offset + info.length] = buf.getvalue()
        path.write_bytes(bytes(data))
        expect = f"{key} at {list(chunk.offsets)}: " + ("is not" if what == "noise" else "differs from its source")
    elif what == "args":
        from moegrow.torch_pickle import save_record

        common = load_record(dst / "common.pt")
        common["args"].num_experts = 4
        save_record(common, dst / "common.pt")
        expect = "args.num_experts is 4, the growth gives 8"
    elif what == "object":
        r = DcpReader(dst)
        key = "rng_state/shard_0.0_1.1"
        info = r._where[(key, None)]
        path = dst / info.relative_path
        data = bytearray(path.read_bytes())
        data[info.offset + info.length - 1] ^= 0xFF
        path.write_bytes(bytes(data))
        expect = f"{key}: not the bytes"
    else:
        rec = json.loads((out / "moegrow.json").read_text())
        rec["growth"]["seed"] = 2
        (out / "moegrow.json").write_text(json.dumps(rec))
        expect = "recorded noise (seed 2"
    code, _, err = run("verify", FIX / "run", out)
    assert code == 1 and expect in err and "Traceback" not in err, err


def test_verify_refuses_a_record_that_is_not_a_training_growth(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow-width", FIX / "bare", out, "--experts", "2x", "--top-k", "4")[0] == 0
    (out / "moegrow.json").write_text("{}")
    code, _, err = run("verify", FIX / "bare", out)
    assert code == 2 and "moegrow.json" in err and "Traceback" not in err


def test_verify_forward_is_refused_for_training_checkpoints(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run("grow-width", FIX / "bare", out, "--experts", "2x", "--top-k", "4")[0] == 0
    code, _, err = run("verify", FIX / "bare", out, "--forward")
    assert code == 2 and "--forward" in err and "Traceback" not in err


MTP = "mtp.layers.0.transformer_layer.mlp."


def test_mtp_layer_experts_widen_on_axis_0(tmp_path: Path) -> None:
    """An MoE multi-token-prediction layer (megatron/mtp) widens with the decoder; depth leaves it as it is."""
    src, out = FIX / "mtp", tmp_path / "out"
    code, _, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--noise", "0.01",
                       "--router-noise", "0.02", "--seed", "4")
    assert code == 0, err
    for name, std in (("experts.experts.linear_fc1.weight", 0.01), ("experts.experts.linear_fc2.weight", 0.01),
                      ("router.weight", 0.02)):
        a, b = full(src, MTP + name), full(out, MTP + name)
        assert a.shape[0] == 4 and b.shape == (8, *a.shape[1:]) and torch.equal(b[:4], a), name
        assert 0.7 * std < float((b[4:] - a).std()) < 1.3 * std, name
        m, n = full(src, EXP_AVG + MTP + name), full(out, EXP_AVG + MTP + name)
        assert torch.equal(n, torch.cat([m, m])) and float(m.abs().sum()) > 0, "moments are copied, never noised"
    for key in ("mtp.layers.0.eh_proj.weight", "mtp.layers.0.transformer_layer.self_attention.linear_qkv.weight"):
        assert torch.equal(full(out, key), full(src, key))
    r, s = DcpReader(out), DcpReader(src)
    fc2 = MTP + "experts.experts.linear_fc2._extra_state/shard_{}_{}"
    assert r.object_bytes(fc2.format(6, 8)) == s.object_bytes(fc2.format(2, 4))
    assert not [k for k in r.objects if k.startswith(MTP) and k.endswith("_4")]
    code, text, err = run("verify", src, out, "--json")
    assert code == 0 and json.loads(text)["ok"], err


def test_verify_regenerates_with_the_recorded_generator(tmp_path: Path) -> None:
    """A record without `noise_generator` was written before pcg64: verify regenerates torch's noise."""
    for generator in ("pcg64", "torch"):
        out = tmp_path / generator
        code, _, err = run("grow-width", FIX / "run", out, "--experts", "2x", "--noise", "0.01", "--seed", "1",
                           "--noise-generator", generator)
        assert code == 0, err
        rec = json.loads((out / "moegrow.json").read_text())
        assert rec["growth"].pop("noise_generator") == generator
        (out / "moegrow.json").write_text(json.dumps(rec))
        code, _, err = run("verify", FIX / "run", out)
        if generator == "torch":
            assert code == 0, err
        else:
            assert code == 1 and "recorded noise (seed 1" in err, err
