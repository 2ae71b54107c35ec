"""OLMo-core DCP checkpoints: find, describe, plan and grow them where they are.

An OLMo-core checkpoint folder (`step<N>/`) holds `model_and_optim/` (a DCP folder) and the
trainer's `config.json` (the experiment config; `model` is the TransformerConfig). Keys are per
block (`model.blocks.{i}.…`, `optim.state.blocks.{i}.….{step,exp_avg,exp_avg_sq}`), and an MoE
block's experts are flattened along axis 0: `feed_forward_moe.experts.mlp.w1` is (E*rows, cols),
the router weight (E*d_model,). Depth renumbers `blocks.{i}`; width appends the E*rows of each copy
(copy c of expert e is expert c*E + e), noise on the copies' weights, never on moments. The
optimizer's `param_groups.N.params` (the parameter names) is rewritten for the new blocks.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dcp_io import METADATA_NAME, DcpReader
from .errors import GrowthError, SourceError
from .megatron import MegatronPlan, Piece, layer_targets, new_top_k

FORMAT = "olmo-core-dcp"
DCP_DIR = "model_and_optim"
CONFIG_NAME = "config.json"
_BLOCK = re.compile(r"^(?P<head>model\.|optim\.state\.)blocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_PARAMS = re.compile(r"^optim\.param_groups\.\d+\.params$")
# the trainer's train module flattens the optimizer state: param group fields per parameter name
_GROUP_BLOCK = re.compile(r"^optim\.param_groups\.blocks\.(?P<i>\d+)\.(?P<rest>.+)$")
_STEP_DIR = re.compile(r"^step(\d+)$")
TRAINER_METADATA = ".metadata.json"  # written last by OLMo-core's Checkpointer.save
_OPT_SUFFIX = (".step", ".exp_avg", ".exp_avg_sq")


def is_olmo(folder: Path) -> bool:
    return (folder / DCP_DIR / METADATA_NAME).is_file()


def is_olmo_run(folder: Path) -> bool:
    """An OLMo-core save folder: the trainer's `step<N>/` checkpoint folders inside."""
    try:
        return folder.is_dir() and any(_STEP_DIR.match(p.name) and p.is_dir() for p in folder.iterdir())
    except OSError:
        return False


def run_steps(folder: Path) -> list[int]:
    """The steps of a save folder whose checkpoint is complete (`model_and_optim/.metadata` and the
    trainer's `.metadata.json`, which OLMo-core's Checkpointer writes last and requires to load), ascending."""
    steps = [int(m[1]) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(n for n in steps if is_olmo(folder / f"step{n}") and (folder / f"step{n}" / TRAINER_METADATA)
                  .is_file())


def resolve_step(folder: Path, step: int | None) -> tuple[Path, int]:
    """(the step folder, its step) of a save folder: the latest complete one unless `step` (--iteration)."""
    have = run_steps(folder)
    if step is None:
        if not have:
            raise SourceError(f"{folder}: no complete OLMo-core checkpoint in its step<N>/ folders "
                              f"(model_and_optim/{METADATA_NAME} and {TRAINER_METADATA}); name a step folder")
        return folder / f"step{have[-1]}", have[-1]
    path = folder / f"step{step}"
    if not is_olmo(path):
        raise SourceError(f"{path}: no such OLMo-core checkpoint (the save folder has steps {have or 'none'})")
    return path, step


@dataclass
class OlmoCheckpoint:
    spec: str
    root: Path
    reader: DcpReader
    config: dict[str, Any]
    num_layers: int
    num_experts: int
    top_k: int | None
    moe: dict[str, Any]
    iteration: int | None = None   # the step, when SOURCE is a save folder
    format: str = FORMAT
    run: Path | None = None         # the save folder SOURCE named (root is then its step<N>/)
    stamps: dict[Path, Any] = field(default_factory=dict)  # source files at opening (`training.open_training`)

    @property
    def folder(self) -> Path:
        return self.root

    @property
    def is_run(self) -> bool:
        return self.run is not None

    def optimizer(self) -> dict[str, Any]:
        opt = [k for k in self.reader.tensors if k.startswith("optim.state.")]
        states = sorted({k.rsplit(".", 1)[1] for k in opt})
        if not opt:
            return {"present": False, "kind": None, "states": [], "step": None, "growable": True}
        step_key = next((k for k in opt if k.endswith(".step")), None)
        step = None
        if step_key:
            t = self.reader.tensors[step_key]
            step = float(self.reader.read_slice(step_key, (0,) * len(t.shape), t.shape).reshape(-1)[0])
        return {"present": True, "kind": "per parameter", "states": states, "step": step, "growable": True,
                "keys": len(opt) + sum(k.startswith("optim.") for k in self.reader.objects)}


def open_olmo(spec: str, step: int | None = None) -> OlmoCheckpoint:
    """A step folder, or a save folder's latest complete step (or `step`)."""
    root, run = Path(spec), None
    if not is_olmo(root) and is_olmo_run(root):
        run = root
        root, step = resolve_step(run, step)
    elif step is not None:
        raise SourceError(f"{root}: --iteration applies to a save folder (of step<N>/ folders); this is a "
                          "step folder")
    reader = DcpReader(root / DCP_DIR)
    path = root / CONFIG_NAME
    try:
        config = json.loads(path.read_text())
    except OSError:
        raise SourceError(f"{path}: missing; moegrow reads the architecture from the OLMo-core trainer's "
                          "config.json beside model_and_optim/") from None
    except ValueError as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    model = config.get("model") if isinstance(config, dict) else None
    moe = (model or {}).get("block", {}).get("feed_forward_moe") if isinstance(model, dict) else None
    if not isinstance(moe, dict) or not isinstance(moe.get("num_experts"), int):
        raise SourceError(f"{path}: no model.block.feed_forward_moe.num_experts (not an OLMo-core MoE config)")
    if model.get("block_overrides"):
        raise SourceError(f"{path}: model.block_overrides (per-block configs) is not supported")
    layers = {int(m["i"]) for k in reader.tensors if (m := _BLOCK.match(k))}
    n_layers = model.get("n_layers")
    if layers != set(range(n_layers if isinstance(n_layers, int) else -1)):
        raise SourceError(f"{path}: model.n_layers is {n_layers!r}, but {root / DCP_DIR} has blocks "
                          f"{sorted(layers)[:8]}")
    k = (moe.get("router") or {}).get("top_k")
    return OlmoCheckpoint(spec, root, reader, config, n_layers, moe["num_experts"], k, moe,
                          step if run is not None else None, run=run)


def width_inexact_reason(ckpt: OlmoCheckpoint) -> str | None:
    """Why OLMo-core's router cannot keep the function when every expert is duplicated (None: it can).

    softmax over all experts (not renormalised) gives each of f copies 1/f of the original's weight,
    topk_softmax renormalises over the chosen: both exact. sigmoid scores are not shared out: f copies
    weigh f times the original; an L2 (or other non-L1) normalisation changes the weights' norm.
    """
    r = ckpt.moe.get("router") or {}
    norm = r.get("normalize_expert_weights")
    if r.get("gating_function", "softmax") == "sigmoid" and norm != 1.0:
        return "sigmoid gating is not renormalised, so f copies weigh f times the original"
    if norm not in (None, 1.0) and r.get("gating_function", "softmax") != "topk_softmax":
        return f"normalize_expert_weights {norm} rescales the chosen weights differently with copies"
    if r.get("uniform_expert_assignment") or r.get("random_expert_assignment"):
        return "uniform or random expert assignment"
    return None


def _expert_rows(rest: str, shape: tuple[int, ...], e: int) -> bool:
    return ("feed_forward_moe.experts." in rest or "feed_forward_moe.router." in rest) and len(shape) >= 1 \
        and shape[0] % e == 0 and shape[0] > 0


def plan_olmo(ckpt: OlmoCheckpoint, operation: str, *, layer_map: list[int] | None = None, factor: int = 1,
              noise: float = 0.0, router_noise: float = 0.0, seed: int = 0, top_k: str | int = "scale",
              optimizer: str = "keep", allow_inexact: bool = False) -> MegatronPlan:
    """Every output chunk of a depth and/or width growth of an OLMo-core checkpoint."""
    if optimizer not in ("keep", "drop"):
        raise GrowthError(f"--optimizer must be keep or drop, not {optimizer!r}")
    e_old, l_old = ckpt.num_experts, ckpt.num_layers
    targets, l_new = layer_targets(layer_map, l_old)
    k_old, k_new, reason = ckpt.top_k, ckpt.top_k, None
    if factor > 1:
        k_new = new_top_k(k_old, factor, top_k,
                          f"{ckpt.root / CONFIG_NAME}: no model.block.feed_forward_moe.router.top_k")
        reason = width_inexact_reason(ckpt)
        if reason and not allow_inexact:
            raise GrowthError(f"{ckpt.root}: width growth cannot preserve this router's function ({reason}); "
                              "pass --allow-inexact to grow it anyway")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, Any] = {}
    pieces: list[Piece] = []
    for key, t in ckpt.reader.tensors.items():
        is_opt = key.startswith("optim.")
        if is_opt and optimizer == "drop":
            continue
        m = _BLOCK.match(key)
        names = [(f"{m['head']}blocks.{j}.{m['rest']}", None) for j in targets.get(int(m["i"]), [])] if m \
            else [(key, None)]
        expert = m is not None and factor > 1 and _expert_rows(m["rest"], t.shape, e_old) \
            and not key.endswith(".step")
        router_w = m is not None and m["rest"].startswith("feed_forward_moe.router.weight")
        std = 0.0 if is_opt else (router_noise if router_w else noise if "feed_forward_moe.experts." in key
                                  else 0.0)
        for out_key, _ in names:
            shape = (t.shape[0] * factor, *t.shape[1:]) if expert else t.shape
            shapes[out_key], dtypes[out_key] = shape, t.torch_dtype
            if not expert:
                pieces.append(Piece(out_key, (0,) * len(shape), t.shape, key, (0,) * len(shape)))
                continue
            rows = t.shape[0] // e_old
            rest0 = (0,) * (len(shape) - 1)
            for c in range(factor):
                for e in range(e_old):
                    pieces.append(Piece(out_key, ((c * e_old + e) * rows, *rest0), (rows, *t.shape[1:]), key,
                                        (e * rows, *rest0), std if c else 0.0))
    objects: dict[str, str] = {}
    for k in ckpt.reader.objects:
        if not (k.startswith("optim.") and optimizer == "drop"):
            g = _GROUP_BLOCK.match(k)
            objects.update({f"optim.param_groups.blocks.{j}.{g['rest']}": k for j in targets.get(int(g["i"]), [])}
                           if g else {k: k})
    changes: dict[str, tuple[Any, Any]] = {}
    if layer_map is not None:
        changes["model.n_layers"] = (l_old, l_new)
    if factor > 1:
        changes["model.block.feed_forward_moe.num_experts"] = (e_old, e_old * factor)
        if k_new != k_old:
            changes["model.block.feed_forward_moe.router.top_k"] = (k_old, k_new)
    exact = factor == 1 or (top_k == "scale" and reason is None)
    plan = MegatronPlan(operation, list(layer_map) if layer_map is not None else None, factor, top_k, k_old, k_new,
                        noise, router_noise, seed, optimizer, shapes, dtypes, pieces, objects, changes, exact, reason)
    if factor > 1 and top_k != "scale":
        plan.warnings.append(f"--top-k {top_k}: the grown model does not compute the source's function")
    if reason:
        plan.warnings.append(f"--allow-inexact: the result is not function-preserving: {reason}")
    return plan


def updated_config(ckpt: OlmoCheckpoint, plan: MegatronPlan) -> dict[str, Any]:
    config = copy.deepcopy(ckpt.config)
    for dotted, (_, new) in plan.args_changes.items():
        node = config
        *path, last = dotted.split(".")
        for p in path:
            node = node[p]
        node[last] = new
    return config


def object_bytes(ckpt: OlmoCheckpoint, plan: MegatronPlan, key: str) -> bytes:
    """A non-tensor entry's bytes: carried, except a param group's parameter names (new blocks added)."""
    import torch

    data = ckpt.reader.object_bytes(key)
    if not _PARAMS.match(key) or plan.layer_map is None:
        return data
    try:
        names = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as e:  # not a list of names: an optimizer layout moegrow does not know
        raise SourceError(f"{ckpt.root / DCP_DIR}: {key} does not load as a list of names ({type(e).__name__})") \
            from None
    targets: dict[int, list[int]] = {}
    for j, m in enumerate(plan.layer_map):
        targets.setdefault(m, []).append(j)
    out = []
    for name in names:
        m = re.match(r"^blocks\.(\d+)\.(.+)$", name) if isinstance(name, str) else None
        out.extend([f"blocks.{j}.{m[2]}" for j in targets.get(int(m[1]), [])] if m else [name])
    buf = io.BytesIO()
    torch.save(out, buf)
    return buf.getvalue()


def fingerprint(ckpt: OlmoCheckpoint) -> dict[str, Any]:
    out: dict[str, Any] = {"spec": ckpt.spec, "path": str(ckpt.root.resolve()), "format": FORMAT}
    if ckpt.is_run:
        out["iteration"] = ckpt.iteration
    for p in (ckpt.root / DCP_DIR / METADATA_NAME, ckpt.root / CONFIG_NAME):
        out[f"{p.name.lstrip('.')}_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
