"""examples/continue_training.py: grown checkpoints start at the source's loss, and noise lets the copies drift apart.

The example grows real tiny checkpoints with the moegrow CLI (a subprocess) and trains them with transformers.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "continue_training.py"
SIZES = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("continue_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("training")


def train(example, workdir, case, noise, steps):
    return example.continue_training(case, workdir, noise=noise, steps=steps, sizes=SIZES, log=lambda _: None)


@pytest.mark.parametrize("case", ["upcycle", "depth"])
def test_function_preserving_growth_starts_at_the_source_loss(example, workdir, case):
    run = train(example, workdir, case, 0.0, 1)
    assert run.step0_diff <= 1e-5, run
    assert run.history[0]["loss"] == pytest.approx(run.grown_loss, abs=1e-6)  # training starts from that loss
    assert run.history[1]["loss"] < run.history[0]["loss"]
    if case == "depth":  # the added copies' residual writers start at zero and grow once trained
        assert run.history[0]["zeroed_norm"] == 0.0 < run.history[1]["zeroed_norm"]


def test_noise_free_width_copies_stay_identical(example, workdir):
    """Top-k scale selects a copy with its original, with equal weights: equal gradients, no specialisation."""
    run = train(example, workdir, "width", 0.0, 3)
    assert run.step0_diff <= 1e-5, run
    first, last = run.history[0], run.history[-1]
    assert first["expert_gap"] == 0.0 and first["router_gap"] == 0.0
    assert last["loss"] < first["loss"]
    assert last["expert_gap"] < 1e-4 and last["expert_dcos"] > 1 - 1e-6 and last["router_dcos"] > 1 - 1e-6
    assert last["expert_same"] == 1.0 and last["router_same"] == 1.0


def test_noise_lets_width_copies_drift_apart(example, workdir):
    run = train(example, workdir, "width", 0.01, 3)
    assert run.step0_diff > 1e-6  # noised copies: not the source's function any more
    first, last = run.history[0], run.history[-1]
    assert first["router_cos"] == pytest.approx(1.0, abs=1e-6)  # router rows copied exactly (--router-noise 0)
    assert last["router_cos"] < 1 - 1e-6 and last["router_same"] == 0.0
    assert last["expert_cos"] < first["expert_cos"] < 1
    assert last["expert_dcos"] < 0.99  # the copies' updates differ from their originals'
