"""Continue training a grown checkpoint with transformers, and watch the copies drift apart from their originals.

For each case this builds a tiny source (examples/make_tiny_moe.py), grows it with the moegrow CLI, loads source
and grown model with transformers in float32, prints both losses on the same fixed batch (equal for a
function-preserving growth), then trains the grown model a few steps (AdamW, CPU, a few seconds) and prints per
step the loss, the raw load-balancing loss (`aux`) and, per kind of copy, the mean cosine similarity between every
copy and its original (`_cos`), the mean cosine similarity of their updates since step 0 (`_dcos`: 1 while both
learn the same thing), the largest absolute difference (`_gap`) and the fraction of copies still within 1e-4 of
their original (`_same`):

  width       mixtral, `grow-width --experts 2x --top-k scale --noise N`: expert e+E against expert e (and the
              router rows e+E against e)
  depth       mixtral, `grow-depth --layers 2x --depth-init identity`: layer 2i+1 against layer 2i, on the
              tensors the identity init leaves as copies; the zeroed residual writers start at 0, so their norm
              (relative to the originals') is printed instead
  depth-copy  the same with the paper's `--depth-init copy` (not function-preserving: the step-0 losses differ)
  upcycle     dense llama, `upcycle --experts 4 --top-k 2 --noise N`: expert j against expert 0 (the dense MLP)

Usage (from the repository root, moegrow importable):
  python examples/continue_training.py [--case width|depth|depth-copy|upcycle|all] [--noise 0 0.01]
      [--steps 20] [--lr 1e-3] [--warmup 0] [--aux-coef C] [--workdir DIR] [--plot PNG]

A PNG of loss and cosine similarity per step (--plot, default continue_training.png; --plot '' for none) is
written when matplotlib is importable.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_moe import build  # noqa: E402

# case -> (source family, moegrow command and growth flags, whether --noise applies)
CASES: dict[str, tuple[str, list[str], bool]] = {
    "width": ("mixtral", ["grow-width", "--experts", "2x", "--top-k", "scale"], True),
    "depth": ("mixtral", ["grow-depth", "--layers", "2x", "--depth-init", "identity"], False),
    "depth-copy": ("mixtral", ["grow-depth", "--layers", "2x"], False),
    "upcycle": ("llama", ["upcycle", "--experts", "4", "--top-k", "2"], True),
}

SAME = 1e-4  # a copy within this of its original everywhere is still a duplicate (float rounding reaches ~1e-5)


@dataclass
class Pair:
    """A copy and its original: views into the grown model's parameters, so they follow the optimizer."""

    kind: str  # expert, router, layer (a copied tensor of a new layer) or zeroed (a residual writer set to 0)
    copy: torch.Tensor
    original: torch.Tensor


@dataclass
class Run:
    case: str
    noise: float
    source_loss: float
    grown_loss: float
    history: list[dict] = field(default_factory=list)  # per step: step, loss, aux, cos, router_cos, zeroed

    @property
    def step0_diff(self) -> float:
        return abs(self.grown_loss - self.source_loss)


def grow(case: str, source: Path, out: Path, noise: float, seed: int) -> None:
    """Grow with the CLI, as a user would (`python -m moegrow ...`)."""
    _, command, noisy = CASES[case]
    flags = ["--noise", str(noise), "--seed", str(seed)] if noisy else []
    subprocess.run([sys.executable, "-m", "moegrow", command[0], str(source), str(out), *command[1:], *flags,
                    "--force", "--quiet"], check=True)


def batch(vocab: int, rows: int = 4, period: int = 16, repeats: int = 4, seed: int = 0) -> torch.Tensor:
    """Tiny synthetic data: each row a random token sequence repeated, so that the loss can fall in a few steps."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, period), generator=g).repeat(1, repeats)


def load(path: Path, aux: bool):
    """float32: the step-0 comparison is exact there (in bf16, routing flips make exact duplicates differ)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if aux and hasattr(model.config, "router_aux_loss_coef"):
        model.config.output_router_logits = True  # adds router_aux_loss_coef * load-balancing loss to .loss
    return model


def expert_count(config) -> int:
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 1  # dense: its MLP is the one "expert" upcycling copies


def pairs(model, source_config, record: dict) -> list[Pair]:
    """Copies and originals, read off the provenance record: the layer map (depth) and the expert counts (width)."""
    params = dict(model.named_parameters())
    out: list[Pair] = []
    layer_map = record["growth"].get("layer_map")
    if layer_map:
        first = {}
        for j, m in enumerate(layer_map):
            first.setdefault(m, j)
        for j, m in enumerate(layer_map):
            if first[m] == j:
                continue
            for name, p in params.items():
                prefix = f"model.layers.{j}."
                if not name.startswith(prefix) or p.ndim < 2:  # norms stay near 1 in both: no signal
                    continue
                original = params[f"model.layers.{first[m]}." + name[len(prefix):]].detach()
                kind = "zeroed" if not p.detach().any() and original.any() else "layer"
                out.append(Pair(kind, p.detach(), original))
    e_src, e_new = expert_count(source_config), expert_count(model.config)
    if e_new > e_src:
        for name, p in params.items():
            if ".mlp." not in name or p.shape[0] != e_new or not p.detach()[:e_src].any():
                continue  # not an expert-indexed tensor, or a router made from zeros (upcycling's default)
            kind = "expert" if ".experts." in name else "router"
            out.extend(Pair(kind, p.detach()[e], p.detach()[e % e_src]) for e in range(e_src, e_new))
    return out


def similarity(ps: list[Pair], start: list[Pair]) -> dict:
    """Per kind of pair: the mean cosine similarity of copy and original (`cos`), the mean cosine similarity of
    their updates since step 0 (`dcos`: 1 while both learn the same thing), the largest difference (`gap`) and the
    fraction of copies still within SAME of their original everywhere (`same`); for zeroed writers, their norm
    relative to their originals' (`norm`)."""
    cos = torch.nn.functional.cosine_similarity
    out: dict = {}
    for kind in ("expert", "router", "layer"):
        now = [(p, p0) for p, p0 in zip(ps, start) if p.kind == kind]
        if not now:
            continue
        out[f"{kind}_cos"] = float(torch.stack([cos(p.copy.flatten(), p.original.flatten(), dim=0)
                                                for p, _ in now]).mean())
        moved = [(p.copy - p0.copy, p.original - p0.original) for p, p0 in now]
        if any(c.any() or o.any() for c, o in moved):
            out[f"{kind}_dcos"] = float(torch.stack([cos(c.flatten(), o.flatten(), dim=0) for c, o in moved]).mean())
        gaps = [float((p.copy - p.original).abs().max()) for p, _ in now]
        out[f"{kind}_gap"] = max(gaps)
        out[f"{kind}_same"] = sum(g < SAME for g in gaps) / len(gaps)
    zeroed = [p for p in ps if p.kind == "zeroed"]
    if zeroed:
        out["zeroed_norm"] = float(sum(p.copy.norm() ** 2 for p in zeroed).sqrt()
                                   / sum(p.original.norm() ** 2 for p in zeroed).sqrt())
    return out


def losses(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(next-token cross-entropy, the loss to train on, the raw load-balancing loss or nan for a dense model)."""
    out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    aux = getattr(out, "aux_loss", None)
    return ce, out.loss, float("nan") if aux is None else float(aux.detach())


def continue_training(case: str, workdir: Path, *, noise: float = 0.0, steps: int = 20, lr: float = 1e-3,
                      warmup: int = 0, aux_coef: float | None = None, seed: int = 0, sizes: dict | None = None,
                      log=print) -> Run:
    """Grow `case`, compare step-0 losses with the source, train the grown model `steps` steps; return the record."""
    family = CASES[case][0]
    source = workdir / f"source-{family}"
    if not (source / "config.json").exists():
        build(family, str(source), **(sizes or {}))
    grown = workdir / f"{case}-noise{noise}"
    grow(case, source, grown, noise, seed)
    record = json.loads((grown / "moegrow.json").read_text())

    src_model, model = load(source, aux=True), load(grown, aux=True)
    if aux_coef is not None:
        model.config.router_aux_loss_coef = model.router_aux_loss_coef = aux_coef
    ids = batch(model.config.vocab_size, seed=seed)
    with torch.no_grad():
        (src_ce, _, src_aux), (ce, _, aux) = losses(src_model.eval(), ids), losses(model.eval(), ids)
    run = Run(case, noise if CASES[case][2] else 0.0, float(src_ce), float(ce))
    kept = "function-preserving" if record["function_preserving"] else "not function-preserving"
    log(f"{case} (noise {run.noise}): step-0 loss source {run.source_loss:.6f} grown {run.grown_loss:.6f} "
        f"|diff| {run.step0_diff:.2e} ({kept}); load-balancing loss source {src_aux:.4f} grown {aux:.4f}")

    ps = pairs(model, src_model.config, record)
    start = [Pair(p.kind, p.copy.clone(), p.original.clone()) for p in ps]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    for step in range(steps + 1):
        ce, loss, aux = losses(model, ids)
        entry = {"step": step, "loss": ce.item(), "aux": aux, **similarity(ps, start)}
        run.history.append(entry)
        log(f"  step {step:3d}  loss {entry['loss']:.4f}  "
            + "  ".join(f"{k} {v:.6g}" for k, v in entry.items() if k not in ("step", "loss")))
        if step == steps:
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    return run


def plot(runs: list[Run], path: Path) -> bool:
    """Loss and copy/original cosine similarity per step, as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_loss, ax_cos) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        label = f"{run.case}, noise {run.noise}"
        steps = [h["step"] for h in run.history]
        ax_loss.plot(steps, [h["loss"] for h in run.history], label=label)
        kind = next((k for k in ("expert", "layer") if f"{k}_cos" in run.history[0]), None)
        if kind:
            ax_cos.plot(steps, [h[f"{kind}_cos"] for h in run.history], label=f"{label} ({kind}s)")
    ax_loss.set(xlabel="step", ylabel="loss (cross-entropy)", title="grown model, continued training")
    ax_cos.set(xlabel="step", ylabel="mean cosine similarity", title="copies against their originals")
    ax_loss.legend()
    ax_cos.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 0.01],
                        help="noise std on the copies (width, upcycle); several values compare them")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0, help="linear learning-rate warmup steps")
    parser.add_argument("--aux-coef", type=float, default=None,
                        help="router_aux_loss_coef for the grown model (default: its config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="keep sources and grown models here")
    parser.add_argument("--plot", default="continue_training.png",
                        help="PNG of the curves, written when matplotlib is installed ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: more threads only contend
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cases = list(CASES) if args.case == "all" else [args.case]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = [continue_training(case, workdir, noise=noise, steps=args.steps, lr=args.lr, warmup=args.warmup,
                                  aux_coef=args.aux_coef, seed=args.seed)
                for case in cases for noise in (args.noise if CASES[case][2] else [0.0])]
    if args.plot:
        print(f"wrote {args.plot}" if plot(runs, Path(args.plot)) else "matplotlib is not installed: no plot")


if __name__ == "__main__":
    main()
