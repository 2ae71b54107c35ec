"""grow-width to any expert count: --select load picks what a count done here with transformers picks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from .conftest import build_model, logits, run, save, weights

TEXT = ("the router sends each token to a few experts and the experts that see the most tokens are the "
        "ones worth copying when the model grows wider so count them on real text before choosing")
FAMILIES = {"mixtral": "model.layers.{l}.block_sparse_moe.", "qwen3_moe": "model.layers.{l}.mlp."}  # as saved
EXPERT = {"mixtral": "w1.weight", "qwen3_moe": "gate_proj.weight"}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer trained here on TEXT (no network), ids within the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.WordLevelTrainer(vocab_size=60, special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("select")
    out = {}
    for family in FAMILIES:
        folder = save(build_model(family, seed=3), root / family)
        _tokenizer().save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calibration.txt"
    path.write_text(TEXT + "\n")
    return path


def _count(folder: Path, text: str, n: int) -> dict[str, list[int]]:
    """Per layer, the n experts transformers' own forward routes to most often (ties to the lower index)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    assert ids.shape[1] <= model.config.max_position_embeddings  # one sequence
    with torch.no_grad():
        routers = model(input_ids=ids, output_router_logits=True).router_logits
    k = model.config.num_experts_per_tok
    out = {}
    for layer, r in enumerate(routers):
        counts = torch.bincount(torch.topk(r.float().softmax(-1), k, dim=-1).indices.flatten(), minlength=r.shape[-1])
        out[str(layer)] = sorted(range(len(counts)), key=lambda e: (-int(counts[e]), e))[:n]
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_picks_the_most_routed_experts(family, sources, calibration, tmp_path):
    src = sources[family]
    want = _count(src, calibration.read_text(), 2)
    assert any(v != [0, 1] for v in want.values())  # a load selection that differs from --select first
    code, out, err = run("grow-width", src, tmp_path / "dry", "--experts", "6", "--select", "load",
                         "--calibration", calibration, "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["selection"] == want
    assert plan["experts"] == [4, 6] and plan["top_k"] == [2, 2] and not plan["function_preserving"]
    dest = tmp_path / "out"
    code, _, err = run("grow-width", src, dest, "--experts", "6", "--select", "load", "--calibration",
                       calibration, "--noise", "0.01", "--quiet")
    assert code == 0, err
    record = json.loads((dest / "moegrow.json").read_text())
    assert record["growth"]["selection"] == want and record["growth"]["select"] == "load"
    logits(dest)  # loads with no missing, unexpected or mismatched keys
    a, b = weights(src), weights(dest)
    for layer, chosen in want.items():
        moe = FAMILIES[family].format(l=layer)
        g = f"{moe}gate.weight"
        assert b[g].shape[0] == 6
        assert torch.equal(b[g][:4], a[g]) and torch.equal(b[g][4:], a[g][chosen])
        for i, e in enumerate(chosen):  # the copy of expert e, noised
            new, old = b[f"{moe}experts.{4 + i}.{EXPERT[family]}"], a[f"{moe}experts.{e}.{EXPERT[family]}"]
            assert 0 < (new - old).abs().max() < 0.1
    card = (dest / "README.md").read_text()
    assert f"--calibration {calibration}" in card and "--select load" in card
    code, _, err = run("verify", src, dest)
    assert code == 0, err


def test_first_copies_the_lowest_experts_and_verify_catches_a_tampered_selection(sources, tmp_path):
    src = sources["mixtral"]
    dest = tmp_path / "out"
    code, _, err = run("grow-width", src, dest, "--experts", "7", "--select", "first", "--quiet")
    assert code == 0, err
    record = json.loads((dest / "moegrow.json").read_text())
    assert record["growth"]["selection"] == {str(i): [0, 1, 2] for i in range(3)}
    assert record["function_preserving"] is False
    a, b = weights(src), weights(dest)
    for layer in range(3):
        moe = FAMILIES["mixtral"].format(l=layer)
        for i in range(3):
            assert torch.equal(b[f"{moe}experts.{4 + i}.w2.weight"], a[f"{moe}experts.{i}.w2.weight"])
        assert torch.equal(b[f"{moe}gate.weight"], torch.cat([a[f"{moe}gate.weight"], a[f"{moe}gate.weight"][:3]]))
    logits(dest)
    assert run("verify", src, dest)[0] == 0
    record["growth"]["selection"]["1"] = [0, 1, 3]
    (dest / "moegrow.json").write_text(json.dumps(record))
    code, _, err = run("verify", src, dest)
    assert code == 1 and "differs" in err


@pytest.mark.parametrize("args, message", [
    (["--experts", "6"], "--select load --calibration FILE or --select first"),
    (["--experts", "6", "--select", "first", "--top-k", "scale"], "cannot be scaled by a fraction"),
    (["--experts", "6", "--select", "load"], "needs --calibration"),
    (["--experts", "9", "--select", "first"], "grow by a factor first"),
    (["--experts", "8", "--select", "first"], "--select and --calibration apply"),
    (["--experts", "6", "--select", "best"], "--select must be load or first"),
    (["--experts", "6", "--select", "first", "--reinit", "0.5"], "do not yet apply to a selected expert count"),
    (["--experts", "6", "--select", "first", "--noise", "0.01", "--noise-mode", "relative"],
     "do not yet apply to a selected expert count"),
])
def test_refusals(args, message, sources, tmp_path):
    code, _, err = run("grow-width", sources["mixtral"], tmp_path / "out", *args)
    assert code == 2 and message in " ".join(err.split()), err
    assert not (tmp_path / "out").exists()


def test_grow_on_both_axes_refuses_a_selection(sources, tmp_path):
    code, _, err = run("grow", sources["mixtral"], tmp_path / "out", "--layers", "2x", "--experts", "6")
    assert code == 2 and "only grow-width selects experts" in " ".join(err.split()), err


def test_calibration_needs_a_tokenizer_and_text(sources, calibration, tmp_path):
    src = sources["mixtral"]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "6", "--select", "load",
                       "--calibration", empty)
    assert code == 2 and "calibration file is empty" in err
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "6", "--select", "load",
                       "--calibration", tmp_path / "missing.txt")
    assert code == 2 and "cannot read the calibration file" in err
    bare = save(build_model("mixtral"), tmp_path / "bare")
    (bare / "tokenizer_config.json").unlink()
    code, _, err = run("grow-width", bare, tmp_path / "out", "--experts", "6", "--select", "load",
                       "--calibration", calibration)
    assert code == 2 and "tokenizer" in err and len(err.strip().splitlines()) == 1, err


def test_fused_experts_and_a_quantised_source(calibration, tmp_path):
    """gpt_oss: fused experts [E, ...] and router biases take the selected rows; a float source is calibrated,
    an MXFP4 one takes --select first (its copies are byte copies of the blocks and scales) and refuses load."""
    from .mx_checkpoints import gpt_oss_float, gpt_oss_mxfp4, load_mxfp4

    src = save(gpt_oss_float(3), tmp_path / "float")
    _tokenizer().save_pretrained(src)
    want = _count(src, calibration.read_text(), 2)
    assert any(v != [0, 1] for v in want.values())
    dest = tmp_path / "out"
    code, _, err = run("grow-width", src, dest, "--experts", "6", "--select", "load", "--calibration", calibration,
                       "--quiet")
    assert code == 0, err
    a, b = weights(src), weights(dest)
    for layer, chosen in want.items():
        for rel in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj_bias", "mlp.router.weight", "mlp.router.bias"):
            name = f"model.layers.{layer}.{rel}"
            assert torch.equal(b[name], torch.cat([a[name], a[name][chosen]])), name
    logits(dest)
    assert run("verify", src, dest)[0] == 0
    q = gpt_oss_mxfp4(tmp_path / "mxfp4", 3)
    _tokenizer().save_pretrained(q)
    code, _, err = run("grow-width", q, tmp_path / "q-load", "--experts", "6", "--select", "load",
                       "--calibration", calibration)
    assert code == 2 and "quantised (mxfp4)" in err
    code, _, err = run("grow-width", q, tmp_path / "q", "--experts", "5", "--select", "first", "--quiet")
    assert code == 0, err
    a, b = weights(q), weights(tmp_path / "q")
    for name, t in a.items():
        if name.endswith(("_blocks", "_scales")):
            assert torch.equal(b[name], torch.cat([t, t[:1]])), name
    load_mxfp4(tmp_path / "q")
    assert run("verify", q, tmp_path / "q")[0] == 0


def test_deepseek_v3_load_and_grouped_routing(calibration, tmp_path):
    """deepseek_v3 (sigmoid scores, correction bias, a dense first layer): the selection equals a count of the
    indices transformers' own routers return in a whole-model forward; with n_group > 1 a selection is refused
    (the groups cannot follow N/E)."""
    src = save(build_model("deepseek_v3", 3, n_group=1, topk_group=1), tmp_path / "src")
    _tokenizer().save_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    counts: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None:
            gate.register_forward_hook(lambda m, a, out, i=i: counts.__setitem__(
                str(i), torch.bincount(out[2].flatten(), minlength=8)))
    ids = transformers.AutoTokenizer.from_pretrained(src)(calibration.read_text())["input_ids"]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    want = {k: sorted(range(8), key=lambda e: (-int(c[e]), e))[:4] for k, c in counts.items()}
    assert sorted(want) == ["1", "2"]
    code, out, err = run("grow-width", src, tmp_path / "dry", "--experts", "12", "--select", "load",
                         "--calibration", calibration, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["selection"] == want
    dest = tmp_path / "out"
    code, _, err = run("grow-width", src, dest, "--experts", "12", "--select", "load", "--calibration",
                       calibration, "--router-noise", "0.01", "--quiet")
    assert code == 0, err
    b, a = weights(dest), weights(src)
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert torch.equal(b[bias], torch.cat([a[bias], a[bias][want["1"]]]))
    logits(dest)
    assert run("verify", src, dest)[0] == 0
    grouped = save(build_model("deepseek_v3", 3), tmp_path / "grouped")
    code, _, err = run("grow-width", grouped, tmp_path / "g", "--experts", "12", "--select", "first")
    assert code == 2 and "n_group=4" in err, err


def test_long_calibration_runs_in_sequences(sources, tmp_path, monkeypatch):
    """A file longer than max_position_embeddings: sequences of that many tokens (one per pass here), the
    counts summed; equal to transformers' counts over the same sequences."""
    import moegrow.selection

    monkeypatch.setattr(moegrow.selection, "PASS", 1)
    src = sources["qwen3_moe"]
    long = tmp_path / "long.txt"
    long.write_text(" ".join([TEXT] * 5))
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = tokenizer(long.read_text())["input_ids"]
    assert len(ids) > 2 * 64
    total: dict[int, torch.Tensor] = {}
    for start in range(0, len(ids), 64):
        with torch.no_grad():
            routers = model(input_ids=torch.tensor([ids[start:start + 64]]), output_router_logits=True).router_logits
        for layer, r in enumerate(routers):
            c = torch.bincount(torch.topk(r.softmax(-1), 2, dim=-1).indices.flatten(), minlength=4)
            total[layer] = total.get(layer, 0) + c
    want = {str(k): sorted(range(4), key=lambda e: (-int(c[e]), e))[:3] for k, c in total.items()}
    code, out, err = run("grow-width", src, tmp_path / "dry", "--experts", "7", "--select", "load",
                         "--calibration", long, "--dry-run", "--json")
    assert code == 0, err
    assert json.loads(out)["selection"] == want
