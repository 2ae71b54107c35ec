"""--noise-mode relative and --reinit (Drop-Upcycling) on real tiny checkpoints, per-expert and fused.

Every figure is measured on the written safetensors against the source's: the noise std ratio per tensor
(per expert slice of a fused tensor), and for --reinit which neurons changed in gate, up and down.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from .conftest import COMMON, FAMILIES, logits, randomise, run, save, weights
from .test_families import FAMILY_CONFIGS, MODEL_CLASSES, family_logits
from .test_upcycle import DENSE

# wider than the shared tiny models, so that a per-tensor std is measured on thousands of values
WIDE = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=64)
FUSED = {  # per family: gate_up rel, down rel, pairing, and the neuron axis of one expert's gate_up and down
    "gpt_oss": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "interleaved", 1, 0),  # [H, 2F], [F, H]
    "llama4_text": ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj", "halves", 1, 0),
    "mistral4": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "halves", 0, 1),  # [2F, H], [H, F]
    "gemma4_text": ("experts.gate_up_proj", "experts.down_proj", "halves", 0, 1),
}
CONFIGS = {
    "mixtral": FAMILIES["mixtral"],
    "qwen3_moe": FAMILIES["qwen3_moe"],
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, head_dim=8, interleave_moe_layer_step=1,
                        intermediate_size_mlp=64),
    "mistral4": FAMILY_CONFIGS["mistral4"],
    "gemma4_text": FAMILY_CONFIGS["gemma4_text"],
}
FAMILY_LIST = ["mixtral", "qwen3_moe", "gpt_oss", "llama4_text", "mistral4", "gemma4_text"]
E = 4  # experts of every family above but mistral4's 8 (`experts`)


def experts(model_type: str) -> int:
    c = CONFIGS[model_type]
    return c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]


def build(model_type: str, scales: dict[int, float] | None = None):
    """A tiny model; the experts of layer i are multiplied by scales[i] (layers of very different spreads)."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **CONFIGS[model_type], **WIDE})
    torch.manual_seed(0)
    cls = getattr(transformers, MODEL_CLASSES[model_type]) if model_type in MODEL_CLASSES else None
    model = randomise(cls(config) if cls else transformers.AutoModelForCausalLM.from_config(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            for layer, k in (scales or {}).items():
                if f"layers.{layer}." in name and "experts" in name:
                    p.mul_(k)
    return model


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in made:
            made[model_type] = save(build(model_type, {1: 30.0, 2: 0.05}), tmp_path_factory.mktemp(model_type))
        return made[model_type]
    return get


def grow(src: Path, out: Path, *flags: object) -> dict[str, torch.Tensor]:
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--seed", "7", "--quiet", *flags)
    assert code == 0, err
    return weights(out)


def verify_ok(src: Path, out: Path) -> None:
    code, _, err = run("verify", src, out)
    assert code == 0, err


def expert_pairs(model_type: str, w: dict[str, torch.Tensor]):
    """(name of an original's tensor, name of its copy) for every per-expert tensor or fused tensor slice:
    yields (original values, copy values, label)."""
    E = experts(model_type)
    if model_type in FUSED:
        for name, t in w.items():
            if ".experts." in name and t.dim() == 3 and t.shape[0] == 2 * E:
                for e in range(E):
                    yield t[e], t[E + e], f"{name}[{e}]"
        return
    for name in w:
        if ".experts." in name:
            prefix, _, rest = name.partition(".experts.")
            e, _, rel = rest.partition(".")
            if int(e) < E:
                yield w[name], w[f"{prefix}.experts.{int(e) + E}.{rel}"], name


@pytest.mark.parametrize("model_type", FAMILY_LIST)
def test_relative_noise_is_a_fraction_of_each_tensors_std(model_type, sources, tmp_path):
    src = sources(model_type)
    w = grow(src, tmp_path / "out", "--noise", "0.01", "--noise-mode", "relative")
    ratios = {}
    for orig, copy, label in expert_pairs(model_type, w):
        if orig.dim() < 2:
            continue
        ratios[label] = float((copy.double() - orig.double()).std() / orig.double().std())
    assert len(ratios) >= 2 * E, ratios
    bad = {k: r for k, r in ratios.items() if abs(r - 0.01) > 0.001}
    assert not bad, bad
    # the layers' spreads differ 600-fold, so absolute noise would give ratios 600 apart: relative does not
    verify_ok(src, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "moegrow.json").read_text())
    assert record["growth"]["noise_mode"] == "relative"
    family_logits(tmp_path / "out", model_type)  # loads in transformers, no missing or unexpected keys


def test_verify_reports_relative_noise_apart(sources, tmp_path):
    """verify measures relative noise as a fraction of each expert slice's std (`<name> (relative)`, near
    --noise), beside the absolute std, and its summary keeps the two apart."""
    src = sources("mixtral")
    grow(src, tmp_path / "out", "--noise", "0.01", "--noise-mode", "relative")
    code, stdout, err = run("verify", src, tmp_path / "out", "--json")
    assert code == 0, err
    stds = json.loads(stdout)["noise_std"]
    relative = {k: v for k, v in stds.items() if k.endswith(" (relative)")}
    assert relative and all(abs(v - 0.01) < 0.001 for v in relative.values()), relative
    assert all(k.removesuffix(" (relative)") in stds for k in relative)
    absolute = [v for k, v in stds.items() if not k.endswith(" (relative)")]
    assert max(absolute) / min(absolute) > 10  # absolute stds follow each layer's spread
    code, _, err = run("verify", src, tmp_path / "out")
    assert code == 0 and "measured noise std relative to each source expert's, on" in err, err
    line = next(x for x in err.splitlines() if "relative to each source expert's" in x)
    low, high = (float(line.split(k)[1].split(",")[0]) for k in ("min ", "max "))
    assert 0.009 < low <= high < 0.011, line


def test_absolute_noise_is_unchanged(sources, tmp_path):
    """The default mode is the paper's: the same bytes with --noise-mode absolute as without it."""
    src = sources("mixtral")
    a = grow(src, tmp_path / "a", "--noise", "0.01")
    b = grow(src, tmp_path / "b", "--noise", "0.01", "--noise-mode", "absolute")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ratios = [float((c - o).std() / o.std()) for o, c, _ in expert_pairs("mixtral", a)]
    assert max(ratios) / min(ratios) > 100  # absolute noise ignores each layer's spread


def neuron_changes(model_type: str, w: dict[str, torch.Tensor], src: dict[str, torch.Tensor]):
    """{(layer, expert): {projection: set of changed neuron indices}} of every copy, and the changed /
    kept values per tensor (changed values, original values of the same tensor, kept values equal?)."""
    out: dict[tuple[str, int], dict[str, set[int]]] = {}
    stats = []
    E = experts(model_type)

    def along(changed: torch.Tensor, axis: int, like: torch.Tensor) -> torch.Tensor:
        return (changed[:, None] if axis == 0 else changed[None, :]).expand_as(like)

    if model_type in FUSED:
        gate_up, down, pairing, gu_axis, down_axis = FUSED[model_type]
        for name, t in w.items():
            if not name.endswith((gate_up, down)):
                continue
            layer = name.split(".experts.")[0]
            for e in range(E):
                orig, copy = t[e], t[E + e]
                if name.endswith(down):
                    rows = (orig != copy).any(dim=1 - down_axis)
                    out.setdefault((layer, e), {})["down"] = set(rows.nonzero().flatten().tolist())
                    mask = along(rows, down_axis, orig)
                else:
                    cols = (orig != copy).any(dim=1 - gu_axis)
                    f = cols.numel() // 2
                    gate, up = (cols[0::2], cols[1::2]) if pairing == "interleaved" else (cols[:f], cols[f:])
                    out.setdefault((layer, e), {})["gate"] = set(gate.nonzero().flatten().tolist())
                    out[layer, e]["up"] = set(up.nonzero().flatten().tolist())
                    mask = along(cols, gu_axis, orig)
                stats.append((copy[mask], orig, torch.equal(copy[~mask], orig[~mask]), f"{name}[{e}]"))
        return out, stats
    axes = {"w1": ("gate", 0), "w3": ("up", 0), "w2": ("down", 1),
            "gate_proj": ("gate", 0), "up_proj": ("up", 0), "down_proj": ("down", 1)}
    for name, orig, copy in ((n, src[n], w[n.replace(f".experts.{e}.", f".experts.{e + E}.")])
                             for n in src if ".experts." in n for e in [int(n.split(".experts.")[1].split(".")[0])]):
        proj, axis = axes[name.split(".")[-2]]
        changed = (orig != copy).any(dim=1 - axis)
        key = (name.split(".experts.")[0], int(name.split(".experts.")[1].split(".")[0]))
        out.setdefault(key, {})[proj] = set(changed.nonzero().flatten().tolist())
        mask = changed[:, None].expand_as(orig) if axis == 0 else changed[None, :].expand_as(orig)
        stats.append((copy[mask], orig, torch.equal(copy[~mask], orig[~mask]), name))
    return out, stats


@pytest.mark.parametrize("model_type", FAMILY_LIST)
def test_reinit_half_the_neurons(model_type, sources, tmp_path):
    src = sources(model_type)
    out = tmp_path / "out"
    w = grow(src, out, "--reinit", "0.5")
    changes, stats = neuron_changes(model_type, w, weights(src))
    assert len(changes) >= E
    selections = []
    for key, by_proj in changes.items():
        assert set(by_proj) == {"gate", "up", "down"}, key
        gate = by_proj["gate"]
        assert by_proj["up"] == gate and by_proj["down"] == gate, key  # the same neurons in all three
        f = 64
        assert len(gate) == f // 2, (key, len(gate))  # half of the 64 intermediate neurons
        selections.append(frozenset(gate))
    assert len(set(selections)) == len(selections)  # every copy draws its own neurons
    for changed, orig, kept_equal, label in stats:
        assert kept_equal, f"{label}: the neurons not re-initialised are not byte copies"
        o = orig.double()
        c = changed.double()
        assert abs(float(c.mean() - o.mean())) < 0.15 * float(o.std()), label
        assert abs(float(c.std() / o.std()) - 1) < 0.15, (label, float(c.std() / o.std()))
    verify_ok(src, out)
    family_logits(out, model_type)


def test_reinit_with_relative_noise_verifies_and_tampering_fails(sources, tmp_path):
    src = sources("gpt_oss")
    out = tmp_path / "out"
    grow(src, out, "--reinit", "0.25", "--noise", "0.02", "--noise-mode", "relative", "--router-noise", "0.01")
    verify_ok(src, out)
    # one value of one copy's slice changed in place: verify names it
    from safetensors.torch import load_file, save_file

    shard = out / "model.safetensors"
    data = load_file(shard)
    name = next(n for n in data if n.endswith("mlp.experts.gate_up_proj"))
    data[name][E + 1, 3, 5] += 0.5
    save_file(data, shard, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and name in err and "re-initialised" in err, err


def test_reinit_tampered_copy_fails_mixtral(sources, tmp_path):
    src = sources("mixtral")
    out = tmp_path / "out"
    grow(src, out, "--reinit", "0.5")
    from safetensors.torch import load_file, save_file

    shard = out / "model.safetensors"
    data = load_file(shard)
    name = "model.layers.0.block_sparse_moe.experts.5.w2.weight"
    data[name][0, 0] = data[name][0, 0] * 1.5 + 0.1
    save_file(data, shard, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and name in err, err


def test_reinit_is_deterministic_per_seed(sources, tmp_path):
    src = sources("mixtral")
    a = grow(src, tmp_path / "a", "--reinit", "0.5", "--noise", "0.01", "--noise-mode", "relative")
    b = grow(src, tmp_path / "b", "--reinit", "0.5", "--noise", "0.01", "--noise-mode", "relative")
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run("grow-width", src, tmp_path / "c", "--experts", "2x", "--seed", "8", "--quiet",
                       "--reinit", "0.5")
    assert code == 0, err
    c = weights(tmp_path / "c")
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_grow_depth_and_width_reinit(sources, tmp_path):
    """grow: the copies of a layer draw their own neurons (keyed by the new layer)."""
    src = sources("mixtral")
    out = tmp_path / "out"
    code, _, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--reinit", "0.5", "--quiet")
    assert code == 0, err
    w = weights(out)
    picked = []
    for layer in (0, 1):  # both copies of source layer 0
        ex = f"model.layers.{layer}.block_sparse_moe.experts."
        rows = (w[ex + "4.w1.weight"] != w[ex + "0.w1.weight"]).any(dim=1)
        assert int(rows.sum()) == 32
        picked.append(rows)
    assert not torch.equal(*picked)
    verify_ok(src, out)
    logits(out)


def test_reinit_refused_where_the_neurons_are_unknown(tmp_path):
    config = transformers.AutoConfig.for_model("granitemoe", **{**COMMON, "num_local_experts": 4,
                                                                "num_experts_per_tok": 2})
    src = save(transformers.AutoModelForCausalLM.from_config(config), tmp_path / "src")
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--reinit", "0.5")
    assert code == 2 and "--reinit" in err and "granitemoe" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flag", "value"), [("--reinit", "1.0"), ("--reinit", "-0.1"), ("--noise-mode", "wide")])
def test_bad_values_refused(flag, value, sources, tmp_path):
    code, _, err = run("grow-width", sources("mixtral"), tmp_path / "out", "--experts", "2x", flag, value)
    assert code == 2 and flag in err, err


def test_dry_run_json_and_card(sources, tmp_path):
    src = sources("mixtral")
    code, out, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--noise", "0.01", "--noise-mode",
                         "relative", "--reinit", "0.5", "--dry-run", "--json")
    assert code == 0, err
    s = json.loads(out)
    assert (s["noise_mode"], s["reinit"], s["function_preserving"]) == ("relative", 0.5, False)
    grow(src, tmp_path / "g", "--noise", "0.01", "--noise-mode", "relative", "--reinit", "0.5")
    card = (tmp_path / "g" / "README.md").read_text()
    assert "--noise-mode relative" in card and "--reinit 0.5" in card and "2502.19261" in card


def test_upcycle_relative_noise_and_reinit(tmp_path):
    config = transformers.AutoConfig.for_model("llama", **{**COMMON, **DENSE["llama"], **WIDE})
    torch.manual_seed(0)
    src = save(randomise(transformers.AutoModelForCausalLM.from_config(config)), tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run("upcycle", src, out, "--experts", E, "--top-k", 2, "--reinit", "0.5", "--quiet")
    assert code == 0, err
    w, d = weights(out), weights(src)
    for layer in range(COMMON["num_hidden_layers"]):
        base = f"model.layers.{layer}.mlp."
        picked = []
        for e in range(1, E):
            ex = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            gate = (w[ex + "w1.weight"] != d[base + "gate_proj.weight"]).any(dim=1)
            up = (w[ex + "w3.weight"] != d[base + "up_proj.weight"]).any(dim=1)
            down = (w[ex + "w2.weight"] != d[base + "down_proj.weight"]).any(dim=0)
            assert torch.equal(gate, up) and torch.equal(gate, down) and int(gate.sum()) == 32
            picked.append(tuple(gate.tolist()))
        assert len(set(picked)) == E - 1
        expert0 = w[f"model.layers.{layer}.block_sparse_moe.experts.0.w1.weight"]
        assert torch.equal(expert0, d[base + "gate_proj.weight"])
    verify_ok(src, out)
    logits(out)
    out2 = tmp_path / "out2"
    code, _, err = run("upcycle", src, out2, "--experts", E, "--top-k", 2, "--noise", "0.01", "--noise-mode",
                       "relative", "--quiet")
    assert code == 0, err
    w = weights(out2)
    for layer in range(COMMON["num_hidden_layers"]):
        o = d[f"model.layers.{layer}.mlp.down_proj.weight"].double()
        c = w[f"model.layers.{layer}.block_sparse_moe.experts.2.w2.weight"].double()
        assert abs(float((c - o).std() / o.std()) - 0.01) < 0.001
    verify_ok(src, out2)


@pytest.mark.parametrize("dtype", ["float32", "keep"])
def test_quantised_source_relative_noise_and_reinit(dtype, tmp_path):
    """An fp8 (block-scaled) source: the std and the neurons are taken in dequantised space; with --dtype keep
    the copies are requantised (verify recomputes them), with float32 they are measured exactly."""
    from .test_quant import dequantised, make_fp8

    src = make_fp8("divides", tmp_path / "fp8")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--dtype", dtype, "--reinit", "0.5", "--quiet")
    assert code == 0, err
    verify_ok(src, out)
    ref = dequantised(src)
    grown = dequantised(out) if dtype == "keep" else {n: t.float() for n, t in weights(out).items()}
    for layer in (1, 2):
        for e in range(8):
            ex = f"model.layers.{layer}.mlp.experts."
            rows = {}
            for proj, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                orig, copy = ref[f"{ex}{e}.{proj}.weight"], grown[f"{ex}{e + 8}.{proj}.weight"]
                changed = (orig != copy).any(dim=1 - axis)
                rows[proj] = changed
                if dtype == "float32":
                    kept = ~changed[:, None] if axis == 0 else ~changed[None, :]
                    assert torch.equal(copy[kept.expand_as(orig)], orig[kept.expand_as(orig)])
            if dtype == "float32":
                assert torch.equal(rows["gate_proj"], rows["up_proj"]) and torch.equal(rows["gate_proj"],
                                                                                      rows["down_proj"])
                assert int(rows["gate_proj"].sum()) == 4  # half of moe_intermediate_size 8
    if dtype == "keep":
        return
    out2 = tmp_path / "out2"
    code, _, err = run("grow-width", src, out2, "--experts", "2x", "--dtype", "float32", "--noise", "0.02",
                       "--noise-mode", "relative", "--quiet")
    assert code == 0, err
    verify_ok(src, out2)
    grown = {n: t.float() for n, t in weights(out2).items()}
    ratios = [float((grown[f"model.layers.{layer}.mlp.experts.{e + 8}.{p}.weight"].double()
                     - ref[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"].double()).std()
                    / ref[f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"].double().std())
              for layer in (1, 2) for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
    assert abs(sum(ratios) / len(ratios) - 0.02) < 0.002, ratios  # 128 values a tensor: pooled


def test_verify_noise_drawn_elsewhere_checks_statistics(sources, tmp_path):
    """A record saying the noise was drawn on CUDA (not recomputable here): verify checks each slice's noise
    std against the recorded relative std and the re-initialised values (CPU draws) bit for bit."""
    from safetensors.torch import load_file, save_file

    src = sources("gpt_oss")
    out = tmp_path / "out"
    grow(src, out, "--reinit", "0.25", "--noise", "0.02", "--noise-mode", "relative")
    record_path = out / "moegrow.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "noise_device": "cuda"}))
    verify_ok(src, out)
    shard = out / "model.safetensors"
    data = load_file(shard)
    name = next(n for n in data if n.endswith("mlp.experts.down_proj"))
    original = data[name].clone()
    data[name][E:] = data[name][:E] + 2 * (data[name][E:] - data[name][:E])  # every copy's noise doubled
    save_file(data, shard, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and "noise std" in err, err
    # a re-initialised row of the first copy (its values moved by far more than the 2% noise), nudged by less
    # than the noise: only the bit-for-bit check of the re-initialised values can see it
    diff = (original[E] - original[0]).abs()
    row = int((diff.amax(dim=1) > 20 * 0.02 * float(original[0].std())).nonzero()[0])
    data[name] = original.clone()
    data[name][E, row, 0] += 1e-4
    save_file(data, shard, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and "re-initialised values differ" in err, err


@pytest.mark.parametrize("edit", ["growth-mode", "growth-reinit", "part-pairing"])
def test_verify_refuses_a_malformed_record(edit, sources, tmp_path):
    src = sources("mixtral")
    out = tmp_path / "out"
    grow(src, out, "--reinit", "0.5", "--noise", "0.01", "--noise-mode", "relative")
    path = out / "moegrow.json"
    record = json.loads(path.read_text())
    if edit == "growth-mode":
        record["growth"]["noise_mode"] = "wide"
    elif edit == "growth-reinit":
        record["growth"]["reinit"] = 1.5
    else:
        part = record["tensors"]["model.layers.0.block_sparse_moe.experts.4.w1.weight"][0]
        part[3]["reinit"]["pairing"] = "sideways"
    path.write_text(json.dumps(record))
    code, _, err = run("verify", src, out)
    assert code == 2 and "not a valid moegrow provenance record" in err, err
