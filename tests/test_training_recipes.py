"""The growth recipes on training checkpoints (fixtures saved by megatron-core 0.16.1 and ai2-olmo-core 3.0.0):
--depth-init identity, --noise-mode relative, --reinit, --select first, each with its Adam moments, provenance
and verify (passing, and failing on a tampered output). Needs neither library."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from moegrow.dcp_io import DcpReader
from moegrow.neurons import selection_seed
from moegrow.torch_pickle import load_record

from .conftest import run

FIX = Path(__file__).parent / "fixtures" / "training"
MEG = FIX / "megatron"
OLMO = FIX / "olmo"
L = "decoder.layers."
FC1, FC2 = L + "mlp.experts.experts.linear_fc1.weight", L + "mlp.experts.experts.linear_fc2.weight"
PROJ, QKV, ROUTER = L + "self_attention.linear_proj.weight", L + "self_attention.linear_qkv.weight", \
    L + "mlp.router.weight"
AVG, AVG_SQ = "optimizer.state.exp_avg.", "optimizer.state.exp_avg_sq."


def full(folder: Path, key: str) -> torch.Tensor:
    r = DcpReader(folder)
    t = r.tensors[key]
    return r.read_slice(key, (0,) * len(t.shape), t.shape)


def grow(*args: object) -> None:
    code, _, err = run(*args)
    assert code == 0, err


def verify(src: Path, out: Path) -> tuple[int, str]:
    code, _, err = run("verify", src, out)
    return code, err


def tamper(folder: Path, key: str, offsets: tuple[int, ...], edit) -> None:  # noqa: ANN001
    """Rewrite one stored chunk of OUTPUT in place (same size), `edit` changing its tensor."""
    r = DcpReader(folder)
    info = r._where[(key, offsets)]
    path = folder / info.relative_path
    data = bytearray(path.read_bytes())
    t = torch.load(io.BytesIO(bytes(data[info.offset: info.offset + info.length])), weights_only=True).clone()
    edit(t)
    buf = io.BytesIO()
    torch.save(t, buf)
    assert len(buf.getvalue()) == info.length
    data[info.offset: info.offset + info.length] = buf.getvalue()
    path.write_bytes(bytes(data))


def neurons(seed: int, layer: int, expert: int, copy: int, n: int, fraction: float) -> list[int]:
    """The neurons --reinit picks for a copy, by the Hugging Face recipe's rule (moegrow.neurons)."""
    g = torch.Generator().manual_seed(selection_seed(seed, layer, expert, copy))
    return sorted(torch.randperm(n, generator=g)[:round(fraction * n)].tolist())


# ---------------------------------------------------------------------------------------------
# --depth-init identity


def test_megatron_identity_zeroes_added_writers_and_their_moments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow-depth", MEG / "run", out, "--layers", "2x", "--depth-init", "identity")
    src, dst = MEG / "run" / "iter_0000020", out / "iter_0000020"
    for key in (PROJ, FC2, QKV, FC1):
        a, b = full(src, key), full(dst, key)
        for prefix in ("", AVG, AVG_SQ):
            ma, mb = full(src, prefix + key), full(dst, prefix + key)
            for j, m in enumerate([0, 0, 1, 1]):
                if j % 2 and key in (PROJ, FC2):
                    assert not mb[j].any(), (prefix, key, j)
                else:
                    assert torch.equal(mb[j], ma[m]), (prefix, key, j)
        assert a.any() and b.shape[0] == 4
    record = json.loads((out / "moegrow.json").read_text())
    assert record["growth"]["depth_init"] == "identity" and record["function_preserving"]
    zeroed = [c for c in record["tensors"][PROJ]["chunks"] if c[-1] == {"zero": True}]
    assert [c[0][0] for c in zeroed] == [1, 3]
    assert verify(MEG / "run", out)[0] == 0
    tamper(dst, AVG_SQ + FC2, (3, 2, 0, 0), lambda t: t.view(-1).__setitem__(0, 1.0))
    code, err = verify(MEG / "run", out)
    assert code == 1 and f"{AVG_SQ + FC2} at [3, 2, 0, 0]: is not zero" in err, err


def test_olmo_identity_zeroes_w_out_and_w2_keeps_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow", OLMO / "default", out, "--layer-map", "0,0,1,1", "--depth-init", "identity", "--experts", "2x",
         "--noise", "0.01")
    src, dst = OLMO / "default" / "model_and_optim", out / "model_and_optim"
    for j, m in enumerate([0, 0, 1, 1]):
        for rel in ("attention.w_out.weight", "feed_forward_moe.experts.mlp.w2"):
            b, a = full(dst, f"model.blocks.{j}.{rel}"), full(src, f"model.blocks.{m}.{rel}")
            avg = full(dst, f"optim.state.blocks.{j}.{rel}.exp_avg")
            step = full(dst, f"optim.state.blocks.{j}.{rel}.step")
            assert float(step) == 2.0
            n = a.shape[0]
            if j % 2 == 0:
                assert torch.equal(b[:n], a)
                assert torch.equal(avg[:n], full(src, f"optim.state.blocks.{m}.{rel}.exp_avg"))
                continue
            assert not avg.any() and not full(dst, f"optim.state.blocks.{j}.{rel}.exp_avg_sq").any()
            if rel.endswith("w2"):  # the copies of zeroed experts get --noise on zeros, as for Hugging Face
                assert not b[:n].any() and 0.005 < float(b[n:].std()) < 0.015
            else:
                assert not b.any()
        q = "attention.w_q.weight"
        assert torch.equal(full(dst, f"model.blocks.{j}.{q}"), full(src, f"model.blocks.{m}.{q}"))
    assert verify(OLMO / "default", out)[0] == 0
    tamper(dst, "model.blocks.1.attention.w_out.weight", (0, 0), lambda t: t.view(-1).__setitem__(5, 0.25))
    code, err = verify(OLMO / "default", out)
    assert code == 1 and "model.blocks.1.attention.w_out.weight at [0, 0]: is not zero" in err, err


@pytest.mark.parametrize("args, message", [
    ((MEG / "run", "--layer-map", "1,0,1", "--depth-init", "identity"), "first occurrence"),
    ((OLMO / "default", "--layer-map", "1,0,1", "--depth-init", "identity"), "first occurrence"),
    ((MEG / "run", "--layers", "2x", "--depth-init", "zeros"), "--depth-init must be"),
])
def test_identity_refusals(tmp_path: Path, args: tuple, message: str) -> None:
    code, _, err = run("grow-depth", args[0], tmp_path / "out", *args[1:])
    assert code == 2 and message in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_identity_refused_where_a_layer_is_not_x_plus_f_x(tmp_path: Path) -> None:
    import shutil

    from moegrow.torch_pickle import save_record

    olmo = tmp_path / "olmo"
    shutil.copytree(OLMO / "default", olmo)
    cfg = json.loads((olmo / "config.json").read_text())
    cfg["model"]["block"]["name"] = "moe_fused_v2"
    (olmo / "config.json").write_text(json.dumps(cfg))
    meg = tmp_path / "meg"
    shutil.copytree(MEG / "bare", meg)
    common = load_record(meg / "common.pt")
    import argparse

    common["args"] = argparse.Namespace(apply_residual_connection_post_layernorm=True)
    save_record(common, meg / "common.pt")
    for src, message in ((olmo, "block 'moe_fused_v2'"), (meg, "apply_residual_connection_post_layernorm")):
        code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--depth-init", "identity")
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
        assert run("grow-depth", src, tmp_path / "out", "--layers", "2x")[0] == 0, "copy init still grows it"
        shutil.rmtree(tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# --noise-mode relative


def test_megatron_relative_noise_is_the_absolute_draws_scaled_per_expert(tmp_path: Path) -> None:
    rel, ab = tmp_path / "rel", tmp_path / "abs"
    grow("grow-width", MEG / "ep2", rel, "--experts", "2x", "--noise", "0.05", "--noise-mode", "relative",
         "--router-noise", "0.1", "--seed", "4")
    grow("grow-width", MEG / "ep2", ab, "--experts", "2x", "--noise", "0.05", "--router-noise", "0.1", "--seed", "4")
    a, r, b = full(MEG / "ep2", FC2).double(), full(rel, FC2).double(), full(ab, FC2).double()
    assert torch.equal(r[:, :4], a) and torch.equal(b[:, :4], a)
    for layer in range(2):
        for e in range(4):
            sd = float(a[layer, e].std())
            draws = (b[layer, 4 + e] - a[layer, e]) / 0.05  # the standard-normal draws of absolute noise
            assert torch.allclose((r[layer, 4 + e] - a[layer, e]) / (0.05 * sd), draws, atol=1e-3)
    fc1_a, fc1_r = full(MEG / "ep2", FC1).double(), full(rel, FC1).double()
    ratios = [float((fc1_r[i, 4 + e] - fc1_a[i, e]).std() / fc1_a[i, e].std()) for i in range(2) for e in range(4)]
    assert 0.035 < sum(ratios) / len(ratios) < 0.065
    ra, rr = full(MEG / "ep2", ROUTER).double(), full(rel, ROUTER).double()
    row = [float((rr[i, 4 + e] - ra[i, e]).std() / ra[i, e].std()) for i in range(2) for e in range(4)]
    assert 0.06 < sum(row) / len(row) < 0.14, "router rows: relative to each row's std"
    assert torch.equal(full(rel, AVG + FC1)[:, 4:], full(MEG / "ep2", AVG + FC1)), "moments never noised"
    code, text, err = run("verify", MEG / "ep2", rel, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert 0.035 < report["noise_std"][FC1 + " (relative)"] < 0.065
    record = json.loads((rel / "moegrow.json").read_text())
    assert record["growth"]["noise_mode"] == "relative"
    copies = [c for c in record["tensors"][FC1]["chunks"] if c[0][1] >= 4]
    assert len(copies) == 8 and all(c[-1] == {"noise_mode": "relative"} for c in copies)
    assert all(c[2][2:] == [0, 0] for c in copies), "copies cut to whole experts (gate and up together)"


def test_olmo_relative_noise_and_tampered_seed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow-width", OLMO / "dropless", out, "--experts", "2x", "--noise", "0.05", "--noise-mode", "relative")
    key = "model.blocks.0.feed_forward_moe.experts.mlp.w1"
    a, b = full(OLMO / "dropless" / "model_and_optim", key), full(out / "model_and_optim", key)
    rows = a.shape[0] // 4
    assert torch.equal(b[:4 * rows], a)
    ratios = [float((b[(4 + e) * rows:(5 + e) * rows] - a[e * rows:(e + 1) * rows]).std()
                    / a[e * rows:(e + 1) * rows].std()) for e in range(4)]
    assert 0.035 < sum(ratios) / 4 < 0.065
    assert verify(OLMO / "dropless", out)[0] == 0
    rec = json.loads((out / "moegrow.json").read_text())
    rec["growth"]["noise_mode"] = "absolute"
    (out / "moegrow.json").write_text(json.dumps(rec))
    code, err = verify(OLMO / "dropless", out)
    assert code == 1 and "tensor mapping differs" in err, err


# ---------------------------------------------------------------------------------------------
# --reinit


def test_megatron_reinit_same_neurons_in_gate_up_down_and_moments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow-width", MEG / "run", out, "--experts", "2x", "--reinit", "0.5", "--seed", "7")
    src, dst = MEG / "run" / "iter_0000020", out / "iter_0000020"
    fc1_a, fc1_b = full(src, FC1), full(dst, FC1)
    fc2_a, fc2_b = full(src, FC2), full(dst, FC2)
    m1_a, m1_b = full(src, AVG + FC1), full(dst, AVG + FC1)
    m2_b = full(dst, AVG_SQ + FC2)
    f = fc2_a.shape[-1]
    assert torch.equal(fc1_b[:, :4], fc1_a) and torch.equal(fc2_b[:, :4], fc2_a)
    picked = set()
    for layer in range(2):
        for e in range(4):
            want = neurons(7, layer, e, 1, f, 0.5)
            picked.add(tuple(want))
            gate = (fc1_b[layer, 4 + e, :f] != fc1_a[layer, e, :f]).any(dim=1).nonzero().view(-1).tolist()
            up = (fc1_b[layer, 4 + e, f:] != fc1_a[layer, e, f:]).any(dim=1).nonzero().view(-1).tolist()
            down = (fc2_b[layer, 4 + e] != fc2_a[layer, e]).any(dim=0).nonzero().view(-1).tolist()
            assert gate == up == down == want, (layer, e)
            rows = want + [f + n for n in want]
            assert not m1_b[layer, 4 + e, rows].any() and not m2_b[layer, 4 + e][:, want].any()
            keep = [n for n in range(2 * f) if n not in rows]
            assert torch.equal(m1_b[layer, 4 + e, keep], m1_a[layer, e, keep])
    assert len(picked) > 1, "each layer and expert draws its own neurons"
    record = json.loads((out / "moegrow.json").read_text())
    assert not record["function_preserving"] and record["growth"]["reinit"] == 0.5
    assert verify(MEG / "run", out)[0] == 0
    n = neurons(7, 0, 1, 1, f, 0.5)[0]
    tamper(dst, FC2, (0, 5, 0, 0), lambda t: t[0, 0, :, n].add_(1.0))
    code, err = verify(MEG / "run", out)
    assert code == 1 and "re-initialised neurons differ" in err, err


@pytest.mark.parametrize("kind, w1_axis", [("default", 1), ("dropless", 0)])
def test_olmo_reinit_follows_the_expert_layout(tmp_path: Path, kind: str, w1_axis: int) -> None:
    out = tmp_path / "out"
    grow("grow-width", OLMO / kind, out, "--experts", "2x", "--reinit", "0.5", "--seed", "2")
    src, dst = OLMO / kind / "model_and_optim", out / "model_and_optim"
    cfg = json.loads((OLMO / kind / "config.json").read_text())["model"]
    d, hidden = cfg["d_model"], cfg["block"]["feed_forward_moe"]["hidden_size"]
    for layer in range(2):
        base = f"blocks.{layer}.feed_forward_moe.experts.mlp."
        for e in range(4):
            want = neurons(2, layer, e, 1, hidden, 0.5)
            found = []
            for w, axis in (("w1", w1_axis), ("w3", w1_axis), ("w2", 0)):
                a, b = full(src, "model." + base + w), full(dst, "model." + base + w)
                rows = a.shape[0] // 4
                sa, sb = a[e * rows:(e + 1) * rows], b[(4 + e) * rows:(5 + e) * rows]
                assert sa.shape == ((d, hidden) if axis == 1 else (hidden, d))
                found.append((sa != sb).any(dim=1 - axis).nonzero().view(-1).tolist())
                mom = full(dst, f"optim.state.{base}{w}.exp_avg")[(4 + e) * rows:(5 + e) * rows]
                assert not mom.index_select(axis, torch.tensor(want)).any()
            assert found == [want] * 3, (layer, e)
    assert verify(OLMO / kind, out)[0] == 0


def test_reinit_refused_where_neurons_are_unknown(tmp_path: Path) -> None:
    src = tmp_path / "src"
    import shutil

    shutil.copytree(OLMO / "default", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model"]["block"]["feed_forward_moe"]["name"] = "mystery"
    (src / "config.json").write_text(json.dumps(cfg))
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--reinit", "0.5")
    assert code == 2 and "--reinit" in err and "not known" in err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# --select first / load


def test_megatron_select_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow-width", MEG / "run", out, "--experts", "6", "--select", "first")
    src, dst = MEG / "run" / "iter_0000020", out / "iter_0000020"
    for key in (FC1, FC2, ROUTER, AVG + FC1, AVG_SQ + ROUTER):
        a, b = full(src, key), full(dst, key)
        assert b.shape == (a.shape[0], 6, *a.shape[2:])
        assert torch.equal(b[:, :4], a) and torch.equal(b[:, 4:], a[:, :2]), key
    args = load_record(dst / "common.pt")["args"]
    assert (args.num_experts, args.moe_router_topk) == (6, 2)
    objects = DcpReader(dst).objects
    assert "decoder.layers.mlp.experts.experts.linear_fc1._extra_state/shard_1.5_2.6" in objects
    assert not [o for o in objects if "_2.8" in o or ".6_2.6" in o]
    record = json.loads((out / "moegrow.json").read_text())
    assert record["growth"]["select"] == "first" and record["growth"]["experts"] == 6
    assert not record["function_preserving"]
    assert verify(MEG / "run", out)[0] == 0


def test_olmo_select_first_with_noise(tmp_path: Path) -> None:
    out = tmp_path / "out"
    grow("grow-width", OLMO / "default", out, "--experts", "5", "--select", "first", "--top-k", "3", "--noise",
         "0.01")
    key = "blocks.1.feed_forward_moe.experts.mlp.w2"
    a, b = full(OLMO / "default" / "model_and_optim", "model." + key), full(out / "model_and_optim", "model." + key)
    rows = a.shape[0] // 4
    assert b.shape == (5 * rows, a.shape[1]) and torch.equal(b[:4 * rows], a)
    assert 0.005 < float((b[4 * rows:] - a[:rows]).std()) < 0.015
    m = full(out / "model_and_optim", f"optim.state.{key}.exp_avg")
    assert torch.equal(m[4 * rows:], full(OLMO / "default" / "model_and_optim", f"optim.state.{key}.exp_avg")[:rows])
    router = full(out / "model_and_optim", "model.blocks.0.feed_forward_moe.router.weight")
    assert router.shape == (5 * 16,)
    moe = json.loads((out / "config.json").read_text())["model"]["block"]["feed_forward_moe"]
    assert (moe["num_experts"], moe["router"]["top_k"]) == (5, 3)
    assert verify(OLMO / "default", out)[0] == 0


@pytest.mark.parametrize("flags, message", [
    (("--experts", "6", "--select", "load", "--calibration", "x.txt"), "cannot run without its trainer"),
    (("--experts", "6", "--select", "load"), "cannot run without its trainer"),
    (("--experts", "6"), "give --select first"),
    (("--experts", "6", "--select", "first", "--top-k", "scale"), "--top-k scale"),
    (("--experts", "2x", "--select", "first"), "apply to grow-width with --experts N"),
    (("--experts", "6", "--select", "first", "--noise", "0.01", "--noise-mode", "relative"),
     "--noise-mode relative and --reinit do not yet apply to a selected expert count"),
    (("--experts", "6", "--select", "first", "--reinit", "0.5"),
     "--noise-mode relative and --reinit do not yet apply to a selected expert count"),
])
def test_select_refusals(tmp_path: Path, flags: tuple[str, ...], message: str) -> None:
    for src in (MEG / "run", OLMO / "default"):
        code, _, err = run("grow-width", src, tmp_path / "out", *flags)
        assert code == 2 and message in err and "Traceback" not in err, err
        assert not (tmp_path / "out").exists()
