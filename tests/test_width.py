"""grow-width on every family: function preservation, noise, determinism, verify."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import FAMILIES, logits, run, weights


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_width_2x_zero_noise_preserves_logits(family, checkpoints, tmp_path, record_property):
    src = checkpoints[family]
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--quiet")
    assert code == 0, err
    diff = (logits(src) - logits(tmp_path / "out")).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    src_config = json.loads((src / "config.json").read_text())
    key = next(k for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in src_config)
    assert config[key] == 2 * src_config[key]
    assert config["num_experts_per_tok"] == 2 * src_config["num_experts_per_tok"]
    code, _, err = run("verify", src, tmp_path / "out", "--forward", "--atol", "1e-5")
    assert code == 0, err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_width_noise_on_copies_only_and_deterministic(family, checkpoints, tmp_path):
    src = checkpoints[family]
    std = 0.01
    for name in ("a", "b"):
        code, _, err = run("grow-width", src, tmp_path / name, "--experts", "2x", "--noise", std,
                           "--seed", "7", "--quiet")
        assert code == 0, err
    for f in (tmp_path / "a").iterdir():  # same seed twice: identical files
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    before, after = weights(src), weights(tmp_path / "a")
    n_experts = json.loads((src / "config.json").read_text())
    n_experts = next(n_experts[k] for k in ("num_local_experts", "num_experts", "n_routed_experts")
                     if k in n_experts)
    diffs = []
    for name, t in after.items():
        if ".experts." not in name or ".shared_experts." in name:
            b = before[name]  # router rows (no --router-noise) and other tensors: exact copies
            assert torch.equal(t, torch.cat([b] * (t.shape[0] // b.shape[0])) if t.shape != b.shape else b), name
            continue
        prefix, _, rest = name.partition(".experts.")
        e, _, tail = rest.partition(".")
        orig = f"{prefix}.experts.{int(e) % n_experts}.{tail}"
        if int(e) < n_experts:
            assert torch.equal(t, before[orig]), name  # originals byte-identical
        else:
            diffs.append((t - before[orig]).flatten())
    measured = torch.cat(diffs).std().item()
    assert abs(measured - std) <= 0.1 * std, measured
    # different seed: different noise
    run("grow-width", src, tmp_path / "c", "--experts", "2x", "--noise", std, "--seed", "8", "--quiet")
    assert (tmp_path / "c" / "model.safetensors").read_bytes() != (tmp_path / "a" / "model.safetensors").read_bytes()
    code, out, err = run("verify", src, tmp_path / "a", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["noise_std"]
    assert all(abs(v - std) < 0.5 * std for v in report["noise_std"].values())


def test_router_rows_duplicated_with_router_noise(checkpoints, tmp_path):
    src = checkpoints["deepseek_v3"]
    code, _, err = run("grow-width", src, tmp_path / "o", "--experts", "16", "--router-noise", "0.05",
                       "--quiet")
    assert code == 0, err
    before, after = weights(src), weights(tmp_path / "o")
    w0, w1 = before["model.layers.1.mlp.gate.weight"], after["model.layers.1.mlp.gate.weight"]
    assert torch.equal(w1[:8], w0)
    assert 0.03 < (w1[8:] - w0).std().item() < 0.07
    b0, b1 = (before["model.layers.1.mlp.gate.e_score_correction_bias"],
              after["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(b1, torch.cat([b0, b0]))
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert (config["n_group"], config["topk_group"]) == (8, 4)


def test_deepseek_unnormalised_halves_scaling_factor(tmp_path):
    from .conftest import build_model, save

    src = save(build_model("deepseek_v3", norm_topk_prob=False), tmp_path / "src")
    code, _, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["routed_scaling_factor"] == pytest.approx(2.5 / 2)
    assert (logits(src) - logits(tmp_path / "o")).abs().max().item() <= 1e-5


def test_top_k_keep_warns_and_is_not_exact(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    code, out, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--top-k", "keep", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["top_k"] == [2, 2] and summary["function_preserving"] is False
    assert "does not compute the source's function" in err
    code, out, err = run("verify", src, tmp_path / "o", "--forward", "--json")
    assert code == 0, err  # not claimed exact: the difference is reported, not a failure
    assert json.loads(out)["forward"]["max_abs_logit_diff"] > 1e-4


def test_top_k_integer(checkpoints, tmp_path):
    code, out, _ = run("grow-width", checkpoints["olmoe"], tmp_path / "o", "--experts", "3x",
                       "--top-k", "3", "--dry-run", "--json")
    assert code == 0
    assert json.loads(out)["top_k"] == [2, 3] and json.loads(out)["experts"] == [4, 12]
    assert not (tmp_path / "o").exists()


def test_experts_not_a_multiple_is_refused(checkpoints, tmp_path):
    code, _, err = run("grow-width", checkpoints["mixtral"], tmp_path / "o", "--experts", "6")
    assert code == 2
    assert "not a multiple" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_verify_fails_on_tampered_output(family, checkpoints, tmp_path):
    src = checkpoints[family]
    out = tmp_path / "o"
    assert run("grow-width", src, out, "--experts", "2x", "--quiet")[0] == 0
    from safetensors.torch import load_file, save_file

    sd = load_file(out / "model.safetensors")
    name = next(k for k in sd if ".experts.1." in k)
    sd[name] = sd[name] + 1e-3
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1
    assert name in err
