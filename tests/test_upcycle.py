"""upcycle: every dense -> MoE pair from a real tiny dense checkpoint, loaded back with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from .conftest import COMMON, built_once, logits, randomise, run, weights
from .test_errors import fails

# the tiny dense models: config overrides of COMMON (granite's multipliers must all carry over)
DENSE: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=8),
    "qwen2": {},
    "qwen3": dict(head_dim=8),
    "olmo2": {},
    "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=3.0, attention_multiplier=0.2),
    "hunyuan_v1_dense": dict(head_dim=8),
}
# every (dense, MoE) pair upcycle lists
PAIRS = [("llama", "mixtral"), ("mistral", "mixtral"), ("qwen2", "qwen2_moe"), ("qwen3", "qwen3_moe"),
         ("olmo2", "flex_olmo"), ("granite", "granitemoe"), ("granite", "granitemoeshared"),
         ("hunyuan_v1_dense", "hunyuan_v1_moe")]
EXPERTS, TOP_K = 4, 2


def build_dense(model_type: str, **overrides):
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **DENSE[model_type], **overrides})
    torch.manual_seed(0)
    return randomise(transformers.AutoModelForCausalLM.from_config(config))


@pytest.fixture(scope="session")
def dense(tmp_path_factory):
    return built_once(tmp_path_factory, build_dense)


def upcycle(src: Path, out: Path, *extra: object) -> None:
    code, _, err = run("upcycle", src, out, "--experts", EXPERTS, "--top-k", TOP_K, "--quiet", *extra)
    assert code == 0, err


@pytest.mark.parametrize("router", ["zeros", "normal"])
@pytest.mark.parametrize(("model_type", "moe_type"), PAIRS)
def test_upcycle_preserves_logits(model_type, moe_type, router, dense, tmp_path, record_property):
    src, out = dense(model_type), tmp_path / "moe"
    upcycle(src, out, "--router-init", router, "--seed", "3", "--to", moe_type)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == moe_type
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == config["architectures"][0]
    moe = model.config
    top_k = getattr(moe, "num_experts_per_tok", None) or moe.moe_topk
    assert (top_k, getattr(moe, "num_local_experts", None) or moe.num_experts) == (TOP_K, EXPERTS)
    diff = (logits(src) - logits(out)).abs().max().item()  # logits() asserts no missing / unexpected keys
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    assert code == 0, err


@pytest.mark.parametrize(("model_type", "moe_type"), PAIRS)
def test_experts_are_the_dense_mlp(model_type, moe_type, dense, tmp_path):
    """Read back through transformers' own modules: every expert computes the dense MLP's output."""
    src, out = dense(model_type), tmp_path / "moe"
    upcycle(src, out, "--to", moe_type)
    d = transformers.AutoModelForCausalLM.from_pretrained(src).model.layers[1].mlp
    m = transformers.AutoModelForCausalLM.from_pretrained(out).model.layers[1]
    moe = getattr(m, "mlp", None) or m.block_sparse_moe
    x = torch.randn(5, COMMON["hidden_size"], generator=torch.Generator().manual_seed(0))
    experts = moe.experts
    with torch.no_grad():
        want = d(x)
        for e in range(EXPERTS):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            got = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            assert torch.allclose(got, want, atol=1e-6), (e, (got - want).abs().max())
    router = next(p for n, p in moe.named_parameters() if n.endswith("weight") and p.shape == (EXPERTS, 16)
                  and "experts" not in n)
    assert not router.any()  # --router-init zeros


def test_noise_on_experts_but_the_first(dense, tmp_path):
    src, out = dense("qwen3"), tmp_path / "moe"
    std = 0.02
    upcycle(src, out, "--noise", std, "--seed", "5")
    before, after = weights(src), weights(out)
    diffs = []
    for layer in range(COMMON["num_hidden_layers"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            dense_w = before[f"model.layers.{layer}.mlp.{proj}.weight"]
            assert torch.equal(after[f"model.layers.{layer}.mlp.experts.0.{proj}.weight"], dense_w)
            diffs += [(after[f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"] - dense_w).flatten()
                      for e in range(1, EXPERTS)]
    assert abs(torch.cat(diffs).std().item() - std) < 0.1 * std
    record = json.loads((out / "moegrow.json").read_text())
    assert record["operation"] == "upcycle" and record["function_preserving"] is False
    code, out_json, err = run("verify", src, out, "--json")
    assert code == 0, err
    assert json.loads(out_json)["noise_std"]
    assert (logits(src) - logits(out)).abs().max().item() > 1e-4


def test_normal_router_is_seeded_and_checked(dense, tmp_path):
    src = dense("llama")
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        upcycle(src, tmp_path / name, "--router-init", "normal", "--router-std", "0.1", "--seed", seed)
    a, b, c = (weights(tmp_path / n) for n in "abc")
    router = "model.layers.0.block_sparse_moe.gate.weight"
    assert torch.equal(a[router], b[router]) and not torch.equal(a[router], c[router])
    assert 0.07 < a[router].std().item() < 0.13
    assert not torch.equal(a[router], a["model.layers.1.block_sparse_moe.gate.weight"])
    record = json.loads((tmp_path / "a" / "moegrow.json").read_text())
    assert record["growth"]["router_init"] == "normal" and record["growth"]["router_std"] == 0.1
    assert record["tensors"][router] == [["", 0.1, 1.0, {"init": "normal"}]]


def _tamper(folder: Path, name: str) -> None:
    """Flip one byte of tensor `name` inside its safetensors file."""
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = 8 + n + json.loads(raw[8:8 + n])[name]["data_offsets"][0]
    raw[start] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(("router", "tensor"), [
    ("zeros", "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
    ("zeros", "model.layers.0.block_sparse_moe.gate.weight"),
    ("normal", "model.layers.0.block_sparse_moe.gate.weight"),
])
def test_tampered_output_fails_verify(router, tensor, dense, tmp_path):
    src, out = dense("llama"), tmp_path / "moe"
    upcycle(src, out, "--router-init", router)
    _tamper(out, tensor)
    code, _, err = run("verify", src, out)
    assert code == 1, err
    assert tensor in err


def test_tampered_fused_expert_fails_verify(dense, tmp_path):
    src, out = dense("granite"), tmp_path / "moe"
    upcycle(src, out)
    _tamper(out, "model.layers.1.block_sparse_moe.input_linear.weight")
    code, _, err = run("verify", src, out)
    assert code == 1 and "input_linear" in err, err


def test_record_with_other_flags_fails_verify(dense, tmp_path):
    src, out = dense("qwen2"), tmp_path / "moe"
    upcycle(src, out)
    path = out / "moegrow.json"
    record = json.loads(path.read_text())
    record["growth"]["router_init"] = "normal"
    record["growth"]["router_std"] = 0.5
    path.write_text(json.dumps(record))
    code, _, err = run("verify", src, out)
    assert code == 1 and "tensor mapping differs" in err, err


def test_dry_run_json_counts_parameters_as_transformers_does(dense, tmp_path):
    src, out = dense("qwen2"), tmp_path / "moe"
    code, stdout, err = run("upcycle", src, out, "--experts", 8, "--top-k", 2, "--dry-run", "--json")
    assert code == 0, err
    assert not out.exists()
    plan = json.loads(stdout)
    assert plan["operation"] == "upcycle" and plan["function_preserving"] is True
    assert plan["experts"] == [None, 8] and plan["top_k"] == [None, 2]
    upcycle(src, out)  # 4 experts: check the written model's counts too
    code, stdout, err = run("upcycle", src, tmp_path / "moe8", "--experts", 8, "--top-k", 2, "--json", "--quiet")
    assert code == 0, err
    written = json.loads(stdout)
    moe = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe8")
    dense_n = transformers.AutoModelForCausalLM.from_pretrained(src).num_parameters()
    total = moe.num_parameters()
    routed = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    assert written["total_params"] == [dense_n, total]
    assert written["active_params"] == [dense_n, total - routed * (8 - 2) // 8]


@pytest.mark.parametrize(("args", "needle"), [
    (["--to", "olmoe"], "cannot upcycle olmo2 into olmoe: olmoe normalises sublayer inputs"),
    (["--to", "mixtral"], "cannot upcycle olmo2 into mixtral: no known MoE sibling"),
    (["--top-k", "5"], "--top-k must be between 1 and --experts (4), not 5"),
    (["--router-init", "uniform"], "--router-init must be zeros or normal"),
    (["--noise", "-1"], "--noise: the std must be a finite number >= 0"),
])
def test_refused_options(args, needle, dense, tmp_path):
    src = dense("olmo2")
    base = ["upcycle", src, tmp_path / "out", "--experts", EXPERTS, "--top-k", TOP_K]
    fails(base + args, src, tmp_path / "out", needle)


def test_refused_sources(dense, tmp_path):
    moe = tmp_path / "moe"
    upcycle(dense("llama"), moe)
    fails(["upcycle", moe, tmp_path / "again", "--experts", 4, "--top-k", 2], moe, tmp_path / "again",
          "cannot upcycle model_type 'mixtral': no known MoE sibling (supported: llama -> mixtral")
    biased = tmp_path / "biased"
    build_dense("llama", mlp_bias=True).save_pretrained(biased)
    fails(["upcycle", biased, tmp_path / "out", "--experts", 4, "--top-k", 2], biased, tmp_path / "out",
          "cannot upcycle llama with mlp_bias=True into mixtral: mixtral's experts have no biases")


def test_missing_mlp_tensor_is_refused(dense, ckpt_copy, tmp_path):
    from safetensors.torch import load_file, save_file

    src = ckpt_copy(dense("llama"))
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    fails(["upcycle", src, tmp_path / "out", "--experts", 4, "--top-k", 2], src, tmp_path / "out",
          "layer 1 has no model.layers.1.mlp.up_proj.weight")


def test_card_reproduces_the_upcycling(dense, tmp_path):
    """The model card names the paper and the dense source, and its command writes the same bytes (CLI and API)."""
    from moegrow.grow import open_source, write
    from moegrow.upcycle import plan_upcycle_for

    from .test_card import card_command, digest, rerun

    src = dense("granite")
    upcycle(src, tmp_path / "a", "--to", "granitemoeshared", "--noise", "0.01", "--router-init", "normal",
            "--router-std", "0.05", "--seed", "4")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "arXiv 2212.05055" in card and "upcycled from `granite`" in card
    argv = card_command(tmp_path / "a")
    assert argv[1] == "upcycle" and "--router-init" in argv and "--seed" in argv
    rerun(argv, tmp_path / "b")
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    source = open_source(str(src))
    write(plan_upcycle_for(source, experts=4, top_k=2, router_init="normal", router_std=0.05, seed=4,
                           to="granitemoeshared", noise=0.01), source, tmp_path / "c")
    rerun(card_command(tmp_path / "c"), tmp_path / "d")
    assert digest(tmp_path / "c") == digest(tmp_path / "d") == digest(tmp_path / "a")
