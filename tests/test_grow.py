"""One-pass growth, sharding, threads, inspect, provenance and side files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import transformers

from .conftest import FAMILIES, build_model, logits, run, save, weights


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}




@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_one_pass_equals_two_steps(family, checkpoints, tmp_path):
    src = checkpoints[family]
    width = ["--experts", "2x", "--noise", "0.02", "--seed", "3", "--quiet"]
    assert run("grow", src, tmp_path / "one", "--layers", "2x", *width)[0] == 0
    assert run("grow-depth", src, tmp_path / "d", "--layers", "2x", "--quiet")[0] == 0
    assert run("grow-width", tmp_path / "d", tmp_path / "two", *width)[0] == 0
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert (tmp_path / "one" / "config.json").read_text() == (tmp_path / "two" / "config.json").read_text()
    assert digest(tmp_path / "one")["model.safetensors"] == digest(tmp_path / "two")["model.safetensors"]
    assert run("verify", src, tmp_path / "one")[0] == 0
    logits(tmp_path / "one")


def test_one_pass_zero_noise_is_exact(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    assert run("grow", src, tmp_path / "o", "--layers", "2x", "--experts", "2x", "--quiet")[0] == 0
    # depth growth changes the function; compare with the depth-only model instead
    assert run("grow-depth", src, tmp_path / "d", "--layers", "2x", "--quiet")[0] == 0
    assert (logits(tmp_path / "d") - logits(tmp_path / "o")).abs().max().item() <= 1e-5


def test_bytes_do_not_depend_on_threads_or_shards(checkpoints, tmp_path):
    src = checkpoints["deepseek_v3"]
    args = ["--experts", "2x", "--noise", "0.01", "--seed", "5", "--quiet"]
    assert run("grow-width", src, tmp_path / "t1", "--threads", "1", *args)[0] == 0
    assert run("grow-width", src, tmp_path / "t4", "--threads", "4", *args)[0] == 0
    assert digest(tmp_path / "t1") == digest(tmp_path / "t4")
    # a single-file source gives a single-file output (transformers' 50GB default)
    assert (tmp_path / "t1" / "model.safetensors").exists()
    assert not (tmp_path / "t1" / "model.safetensors.index.json").exists()
    assert run("grow-width", src, tmp_path / "s", "--max-shard-size", "20KB", *args)[0] == 0
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "s" / "model.safetensors").exists()
    on_disk = sum(t.numel() * t.element_size() for t in weights(tmp_path / "s").values())
    assert index["metadata"]["total_size"] == on_disk
    a, b = weights(tmp_path / "t1"), weights(tmp_path / "s")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run("verify", src, tmp_path / "s")[0] == 0
    logits(tmp_path / "s")


def test_sharded_bf16_source(tmp_path):
    model = build_model("mixtral").to(torch.bfloat16)
    src = save(model, tmp_path / "src", max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").exists()
    before = digest(src)
    code, out, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--noise", "0.01", "--json", "--quiet")
    assert code == 0, err
    assert digest(src) == before  # the source is never modified
    w = weights(tmp_path / "o")
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    diff = (w["model.layers.0.block_sparse_moe.experts.5.w1.weight"].float()
            - w["model.layers.0.block_sparse_moe.experts.1.w1.weight"].float())
    assert 0.005 < diff.std().item() < 0.02
    assert run("verify", src, tmp_path / "o")[0] == 0
    # without --max-shard-size the output keeps the source's shard grain: several shards, none
    # holding more tensor bytes than the source's largest, and the dry run says how many
    largest = max(_shard_bytes(src).values())
    written = _shard_bytes(tmp_path / "o")
    assert len(written) > 2 and max(written.values()) <= largest
    code, out, _ = run("grow-width", src, tmp_path / "d", "--experts", "2x", "--dry-run", "--json")
    assert code == 0 and json.loads(out)["shards"] == len(written)
    assert "--max-shard-size" not in (tmp_path / "o" / "README.md").read_text()


def _shard_bytes(folder):
    """Tensor bytes per safetensors file, read with safetensors."""
    from safetensors import safe_open

    sizes = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            sizes[f.name] = sum(t.numel() * t.element_size() for t in map(h.get_tensor, h.keys()))
    return sizes


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inspect_matches_transformers(family, checkpoints):
    src = checkpoints[family]
    code, out, err = run("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    assert info["total_params"] == model.num_parameters()
    cfg = model.config
    assert info["num_layers"] == cfg.num_hidden_layers == 3
    expected_moe = [1, 2] if family == "deepseek_v3" else [0, 1, 2]
    assert info["moe_layers"] == expected_moe
    assert info["top_k"] == 2 and info["num_experts"] == (8 if family == "deepseek_v3" else 4)
    assert info["num_shared_experts"] == (1 if family in ("deepseek_v3", "qwen2_moe") else 0)
    assert info["dtypes"] == {"F32": len(weights(src))}
    assert info["files"] == ["model.safetensors"]
    assert info["total_bytes"] == sum(p.numel() * 4 for p in model.state_dict().values())
    assert info["active_params"] < info["total_params"]
    code, out, _ = run("inspect", src)
    assert code == 0 and family in out


def test_provenance_and_side_files(checkpoints, tmp_path):
    src = checkpoints["olmoe"]
    code, out, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--noise", "0.01", "--seed", "9",
                         "--json")
    assert code == 0, err
    rec = json.loads((tmp_path / "o" / "moegrow.json").read_text())
    assert rec["operation"] == "grow-width" and rec["growth"]["seed"] == 9 and rec["growth"]["noise"] == 0.01
    assert rec["source"]["files"]["model.safetensors"]["size"] == (src / "model.safetensors").stat().st_size
    assert rec["tensors"]["model.layers.0.mlp.experts.5.up_proj.weight"] == [
        ["model.layers.0.mlp.experts.1.up_proj.weight", 0.01]]
    assert rec["tensors"]["model.layers.0.mlp.gate.weight"] == [["model.layers.0.mlp.gate.weight", 0.0]] * 2
    assert (tmp_path / "o" / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert (tmp_path / "o" / "generation_config.json").exists()
    assert json.loads(out)["experts"] == [4, 8]


def test_dry_run_writes_nothing(checkpoints, tmp_path):
    code, out, err = run("grow", checkpoints["deepseek_v3"], tmp_path / "o", "--layers", "2x", "--experts", "2x",
                         "--dry-run")
    assert code == 0, err
    assert "n_group: 4 -> 8" in err and "layers 3 -> 6" in err and "first_k_dense_replace" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.iterdir())


def test_force_replaces_existing_output(checkpoints, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("x")
    code, _, err = run("grow-width", checkpoints["mixtral"], out, "--experts", "2x")
    assert code == 2 and "already exists" in err
    code, _, err = run("grow-width", checkpoints["mixtral"], out, "--experts", "2x", "--force", "--quiet")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["o"]


def test_cli_entry_points(checkpoints):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "moegrow", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "grow-width" in r.stdout and "grow-depth" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moegrow", "grow-width", "--help"], capture_output=True, text=True)
    assert "--noise" in r.stdout and "--top-k" in r.stdout
    r = subprocess.run([sys.executable, "-m", "moegrow", "inspect", str(checkpoints["mixtral"]) + "-nope"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_device_choice_is_recorded(checkpoints, tmp_path):
    src = checkpoints["olmoe"]
    assert run("grow-width", src, tmp_path / "cpu", "--experts", "2x", "--noise", "0.01", "--device", "cpu",
               "--quiet")[0] == 0
    assert json.loads((tmp_path / "cpu" / "moegrow.json").read_text())["noise_device"] == "cpu"
    assert run("grow-width", src, tmp_path / "copy", "--experts", "2x", "--quiet")[0] == 0
    assert json.loads((tmp_path / "copy" / "moegrow.json").read_text())["noise_device"] == "none"
    if not torch.cuda.is_available():
        code, _, err = run("grow-width", src, tmp_path / "cuda", "--experts", "2x", "--noise", "0.01",
                           "--device", "cuda")
        assert code == 2 and "CUDA" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "cuda").exists()


def test_progress_counts_every_output_byte(checkpoints, tmp_path):
    """grow and verify report progress in output bytes: the bar ends exactly at its total."""
    from moegrow.grow import open_source, plan_for, write
    from moegrow.io import read_index
    from moegrow.verify import verify

    src = open_source(str(checkpoints["qwen2_moe"]))
    plan = plan_for(src, "grow", layers="2x", experts="2x", noise=0.01)
    grown, checked = [], []
    write(plan, src, tmp_path / "out", progress=grown.append)
    total = sum(t.nbytes for t in read_index(tmp_path / "out").values())
    report = verify(src, tmp_path / "out", progress=checked.append)
    assert report.ok, report.problems
    assert sum(grown) == total and sum(checked) == total and len(checked) == len(plan.tensors)


def test_verify_of_noise_drawn_elsewhere_refuses_a_noise_free_copy(checkpoints, tmp_path):
    """`torch` noise drawn on CUDA is not regenerated here: verify measures its std where a tensor is large
    enough, and on any tensor refuses a noised copy that equals its original (the tiny experts here: 512
    values)."""
    from safetensors.torch import load_file, save_file

    src, out = checkpoints["mixtral"], tmp_path / "out"
    assert run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--noise-generator", "torch",
               "--quiet")[0] == 0
    record_path = out / "moegrow.json"
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "noise_device": "cuda"}))
    assert run("verify", src, out)[0] == 0
    f = out / "model.safetensors"
    tensors = load_file(f)
    name = next(n for n in sorted(tensors) if ".layers.1." in n and ".experts.5." in n)
    tensors[name] = tensors[name.replace("experts.5.", "experts.1.")].clone()
    save_file(tensors, f, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and name in err and "carries no noise" in err, err
