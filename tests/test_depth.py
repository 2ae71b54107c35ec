"""grow-depth on every family: interposition and stacking load cleanly and follow the map."""

from __future__ import annotations

import json

import pytest
import torch

from .conftest import FAMILIES, logits, run, weights


def check_map(src, out, layer_map):
    before, after = weights(src), weights(out)
    per_layer = [k for k in before if k.startswith("model.layers.")]
    assert len(after) == len(before) - len(per_layer) + sum(
        1 for k in per_layer for m in layer_map if k.startswith(f"model.layers.{m}."))
    for j, m in enumerate(layer_map):
        for k in per_layer:
            if k.startswith(f"model.layers.{m}."):
                new = f"model.layers.{j}." + k.split(".", 3)[3]
                assert torch.equal(after[new], before[k]), new


@pytest.mark.parametrize("method", ["interpose", "stack"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_depth_2x(family, method, checkpoints, tmp_path):
    src = checkpoints[family]
    out = tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--json", "--quiet")
    if family == "deepseek_v3" and method == "stack":
        # stacking puts a copy of dense layer 0 at layer 3: first_k_dense_replace cannot say so
        assert code == 2 and "first_k_dense_replace" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()
        return
    assert code == 0, err
    expected = [0, 0, 1, 1, 2, 2] if method == "interpose" else [0, 1, 2, 0, 1, 2]
    assert json.loads(stdout)["layer_map"] == expected
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    if family == "deepseek_v3":
        assert config["first_k_dense_replace"] == 2
    check_map(src, out, expected)
    logits(out)  # loads with no missing / unexpected keys, and runs
    code, _, err = run("verify", src, out)
    assert code == 0, err


def test_depth_counts_and_explicit_map(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    code, out, _ = run("grow-depth", src, tmp_path / "a", "--layers", "5", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["layer_map"] == [0, 0, 1, 1, 2]
    code, _, err = run("grow-depth", src, tmp_path / "b", "--layer-map", "0,1,1,2,2,0", "--quiet")
    assert code == 0, err
    check_map(src, tmp_path / "b", [0, 1, 1, 2, 2, 0])
    logits(tmp_path / "b")


def test_qwen_sparse_step_becomes_explicit(tmp_path):
    from .conftest import build_model, save

    src = save(build_model("qwen2_moe", decoder_sparse_step=2, num_hidden_layers=4), tmp_path / "src")
    # layers 1 and 3 are MoE; interposition gives MoE at 2,3,6,7
    code, _, err = run("grow-depth", src, tmp_path / "o", "--layers", "2x", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["decoder_sparse_step"] == 1
    assert config["mlp_only_layers"] == [0, 1, 4, 5]
    logits(tmp_path / "o")
    assert run("verify", src, tmp_path / "o")[0] == 0


def test_qwen_mlp_only_layers_and_layer_types(tmp_path):
    from .conftest import build_model, save

    src = save(build_model("qwen2_moe", mlp_only_layers=[1]), tmp_path / "src")
    code, _, err = run("grow-depth", src, tmp_path / "o", "--layers", "2x", "--method", "stack", "--quiet")
    assert code == 0, err
    config = json.loads((tmp_path / "o" / "config.json").read_text())
    assert config["mlp_only_layers"] == [1, 4]
    assert len(config["layer_types"]) == 6
    logits(tmp_path / "o")


@pytest.mark.parametrize("args, message", [
    (["--layers", "2"], "fewer than the source"),
    (["--layer-map", "0,1,7"], "names layer 7"),
    (["--layers", "2x", "--method", "zigzag"], "--method"),
    ([], "--layers"),
])
def test_depth_bad_usage(args, message, checkpoints, tmp_path):
    code, _, err = run("grow-depth", checkpoints["olmoe"], tmp_path / "o", *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
