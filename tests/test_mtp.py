"""Multi-token-prediction (MTP) weights stored under their own prefix (`mtp.`), as Hub qwen3_next,
qwen3_5_moe(_text), qwen4_exp_text and nemotron_h checkpoints store them.

transformers' save_pretrained writes no MTP weights (its models have no MTP modules, and every one
of these classes ignores `mtp.*` on load), so each test takes a tiny real checkpoint and adds a Hub
shaped MTP block to its safetensors file: `mtp.fc` and the pre-fc norms (nemotron_h: eh_proj,
enorm, hnorm), and MTP layers copied in shape from a decoder layer of the same kind (attention +
MoE with router, per-expert experts and a shared expert), filled with fresh random values.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from . import test_multimodal as mm
from .conftest import logits, run, save, weights
from .test_families import build

E = {"qwen3_next": 4, "qwen3_5_moe_text": 4, "qwen4_exp_text": 4, "nemotron_h": 8, "qwen3_5_moe": 4}
# family: decoder prefix, (decoder layer whose tensors an MTP layer copies in shape, per MTP layer), globals
MTP = {
    "qwen3_next": ("model.layers.", (1,), ("fc", "norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")),
    "qwen3_5_moe_text": ("model.layers.", (1,), ("fc", "norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")),
    "qwen3_5_moe": ("model.language_model.layers.", (1,),
                    ("fc", "norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden")),
    # Hub Qwen3.8-style: two input projections and a hyper-connection mixer (shapes here are illustrative)
    "qwen4_exp_text": ("model.layers.", (1,), ("fc_embedding", "fc_hidden", "norm", "pre_fc_norm_embedding",
                                               "pre_fc_norm_hidden")),
    # Hub nemotron_h: mtp.layers.0 an attention block (with eh_proj, enorm, hnorm), mtp.layers.1 the MoE block
    "nemotron_h": ("backbone.layers.", (2, 1), ()),
}


def add_mtp(folder, family: str, seed: int = 3) -> dict[str, torch.Tensor]:
    """Add a Hub-shaped MTP block to a single-file checkpoint; return the MTP tensors."""
    files = list(folder.glob("*.safetensors"))
    assert len(files) == 1 and not (folder / "model.safetensors.index.json").exists(), files
    tensors = load_file(files[0])
    prefix, copies, extra = MTP[family]
    config = json.loads((folder / "config.json").read_text())
    hidden = config.get("text_config", config)["hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).to(torch.float32)

    mtp = {f"mtp.{n}.weight": rand(hidden, 2 * hidden) if n.startswith("fc") else rand(hidden) for n in extra}
    if family == "nemotron_h":
        mtp.update({"mtp.layers.0.eh_proj.weight": rand(hidden, 2 * hidden), "mtp.layers.0.enorm.weight": rand(hidden),
                    "mtp.layers.0.hnorm.weight": rand(hidden), "mtp.layers.1.final_layernorm.weight": rand(hidden)})
    for i, layer in enumerate(copies):
        src = f"{prefix}{layer}."
        for name, t in tensors.items():
            if name.startswith(src):
                mtp[f"mtp.layers.{i}.{name[len(src):]}"] = rand(*t.shape).to(t.dtype)
    assert any(".mlp.experts." in n or ".mixer.experts." in n for n in mtp), sorted(mtp)
    save_file({**tensors, **mtp}, files[0], metadata={"format": "pt"})
    return mtp


def build_source(family: str, folder):
    if family == "qwen3_5_moe":
        return save(mm.build("qwen3_5_moe"), folder)
    return save(build(family), folder)


def family_logits(folder, family: str) -> torch.Tensor:
    return mm.mm_logits(folder, "qwen3_5_moe") if family == "qwen3_5_moe" else logits(folder)


_BUILT: dict[str, tuple] = {}


@pytest.fixture(scope="session")
def mtp_source(tmp_path_factory):
    """A saved float32 checkpoint with an MTP block, per family (built on first use in each worker)."""
    def get(family: str):
        if family not in _BUILT:
            folder = build_source(family, tmp_path_factory.mktemp(f"mtp-{family}"))
            _BUILT[family] = (folder, add_mtp(folder, family))
        return _BUILT[family]
    return get


def router_rel(family: str) -> tuple[str, str]:
    return ("mixer.gate.weight", "mixer.experts.") if family == "nemotron_h" else ("mlp.gate.weight", "mlp.experts.")


def moe_layer(family: str) -> str:
    return "mtp.layers.1." if family == "nemotron_h" else "mtp.layers.0."


FAMILIES = ["qwen3_next", "qwen3_5_moe_text", "qwen4_exp_text", "nemotron_h", "qwen3_5_moe"]


@pytest.mark.parametrize("family", FAMILIES)
def test_width_widens_mtp_experts_and_router(family, mtp_source, tmp_path, record_property):
    src, mtp = mtp_source(family)
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    e = E[family]
    got = weights(out)
    router, experts = router_rel(family)
    layer = moe_layer(family)
    expert_names = sorted(n for n in got if n.startswith(layer + experts))
    tails = sorted({n.split(".", 6)[-1] for n in mtp if n.startswith(layer + experts)})
    assert tails and len(expert_names) == 2 * e * len(tails)
    worst = 0.0
    for j in range(e):
        for tail in tails:
            orig = mtp[f"{layer}{experts}{j}.{tail}"]
            for c in (j, j + e):  # original kept, copy at j + E: byte-identical at noise 0
                new = got[f"{layer}{experts}{c}.{tail}"]
                assert torch.equal(new.view(torch.uint8), orig.view(torch.uint8)), (c, tail)
                worst = max(worst, (new - orig).abs().max().item())
    record_property("mtp_expert_max_abs_diff", worst)
    r_old, r_new = mtp[layer + router], got[layer + router]
    assert r_old.shape[0] == e and r_new.shape == (2 * e, r_old.shape[1])
    assert torch.equal(r_new, torch.cat([r_old, r_old]))
    bias = layer + "mixer.gate.e_score_correction_bias"
    if bias in mtp:
        assert torch.equal(got[bias], torch.cat([mtp[bias], mtp[bias]]))
    widened = {layer + router, bias}
    for name, t in mtp.items():  # everything else of the MTP block travels byte for byte
        if name not in widened and experts not in name:
            assert torch.equal(got[name], t), name
    assert not any(n.startswith("mtp.") and n not in mtp and experts not in n for n in got)
    # transformers ignores mtp.* on load: the output loads clean and computes the source's function
    diff = (family_logits(src, family) - family_logits(out, family)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    code, stdout, err = run("verify", src, out, "--forward", "--atol", "1e-5", "--json")
    assert code == 0, err
    record_property("verify_forward", json.loads(stdout)["forward"])


def _tamper(folder, name: str) -> None:
    f = next(folder.glob("*.safetensors"))
    tensors = load_file(f)
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, f, metadata={"format": "pt"})


def test_verify_catches_a_tampered_mtp_copy(mtp_source, tmp_path):
    src, _ = mtp_source("qwen3_next")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    name = "mtp.layers.0.mlp.experts.5.up_proj.weight"  # the copy of expert 1
    _tamper(out, name)
    code, stdout, err = run("verify", src, out)
    assert code != 0 and name in stdout + err, stdout + err


def test_verify_catches_a_tampered_mtp_router(mtp_source, tmp_path):
    src, _ = mtp_source("qwen3_next")
    out = tmp_path / "out"
    assert run("grow-width", src, out, "--experts", "2x", "--quiet")[0] == 0
    name = "mtp.layers.0.mlp.gate.weight"
    _tamper(out, name)
    code, stdout, err = run("verify", src, out)
    assert code != 0 and name in stdout + err, stdout + err


def test_width_noise_reaches_mtp_copies(mtp_source, tmp_path, record_property):
    """The same noise rules as decoder layers: originals untouched, copies noised, verify checks the noise."""
    src, mtp = mtp_source("qwen3_next")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--router-noise", "0.01",
                       "--seed", "7", "--quiet")
    assert code == 0, err
    got = weights(out)
    orig = mtp["mtp.layers.0.mlp.experts.1.down_proj.weight"]
    assert torch.equal(got["mtp.layers.0.mlp.experts.1.down_proj.weight"], orig)
    noised = got["mtp.layers.0.mlp.experts.5.down_proj.weight"] - orig
    record_property("mtp_copy_noise_std", noised.std().item())
    assert 0.005 < noised.std().item() < 0.02
    router = got["mtp.layers.0.mlp.gate.weight"]
    assert torch.equal(router[:4], mtp["mtp.layers.0.mlp.gate.weight"])
    assert not torch.equal(router[4:], router[:4])
    code, _, err = run("verify", src, out)
    assert code == 0, err


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h", "qwen3_5_moe"])
def test_depth_keeps_mtp_as_it_is(family, mtp_source, tmp_path):
    src, mtp = mtp_source(family)
    out = tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--dry-run", "--json")
    assert code == 0, err
    assert any(f"{len(mtp)} MTP tensors under mtp. are copied unchanged" in w for w in json.loads(stdout)["warnings"])
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--quiet")
    assert code == 0, err
    got = weights(out)
    assert {n for n in got if n.startswith("mtp.")} == set(mtp)  # named as before: not interposed, not renumbered
    for name, t in mtp.items():
        assert torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    family_logits(out, family)  # loads clean (mtp.* ignored) and runs
    code, _, err = run("verify", src, out)
    assert code == 0, err


def test_grow_depth_and_width(mtp_source, tmp_path):
    src, mtp = mtp_source("qwen3_next")
    out = tmp_path / "out"
    code, _, err = run("grow", src, out, "--layers", "2x", "--experts", "2x", "--quiet")
    assert code == 0, err
    got = weights(out)
    mtp_out = {n for n in got if n.startswith("mtp.")}
    assert not any(n.startswith("mtp.layers.1.") for n in mtp_out)
    assert {f"mtp.layers.0.mlp.experts.{e}.gate_proj.weight" for e in range(8)} <= mtp_out
    assert torch.equal(got["mtp.layers.0.mlp.experts.7.gate_proj.weight"],
                       mtp["mtp.layers.0.mlp.experts.3.gate_proj.weight"])
    assert got["mtp.layers.0.mlp.gate.weight"].shape[0] == 8
    logits(out)
    code, _, err = run("verify", src, out)
    assert code == 0, err


@pytest.mark.parametrize("family", ["qwen3_next", "nemotron_h"])
def test_inspect_reports_mtp_and_leaves_it_out_of_the_counts(family, mtp_source):
    import transformers

    src, mtp = mtp_source(family)
    code, stdout, err = run("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    moe = 1 if family == "nemotron_h" else 0
    assert info["mtp_prefix"] == "mtp.layers."
    assert info["mtp_layers"] == sorted({int(n.split(".")[2]) for n in mtp if n.startswith("mtp.layers.")})
    assert info["mtp_moe_layers"] == [moe]
    assert info["mtp_tensors"] == len(mtp)
    assert info["extra_layers"] == []
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    assert info["total_params"] == sum(p.numel() for p in model.parameters())  # as transformers counts: no MTP
    code, stdout, err = run("inspect", src)
    assert code == 0, err
    assert f"mtp.layers.{moe} (MoE)" in stdout and f"MTP: {len(mtp)} tensors" in stdout, stdout


def test_mtp_expert_count_must_match(mtp_source, ckpt_copy):
    src = ckpt_copy(mtp_source("qwen3_next")[0])
    f = next(src.glob("*.safetensors"))
    tensors = load_file(f)
    for tail in ("gate_proj", "up_proj", "down_proj"):
        del tensors[f"mtp.layers.0.mlp.experts.3.{tail}.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    code, _, err = run("inspect", src)
    assert code == 2 and "mtp.layers.0 has 3" in err, err
