"""Training-stack checkpoints (Megatron-core torch_dist): `inspect` and the growths, for the CLI.

The command line sends a SOURCE here when it is such a checkpoint (`detect`); the output is written
in the same format as the source, atomically (a hidden partial folder renamed into place, as
execute.py does for safetensors), with the provenance record `moegrow.json` at its top.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import __version__
from .dcp_io import METADATA_NAME, write_dcp
from .errors import GrowthError, OutputError, SourceError
from .execute import (
    PARTIAL_MARK,
    _absolute,
    _remove,
    _replace,
    _signals_deferred,
    check_output,
    clean_stale_partials,
    write_json,
)
from .megatron import (
    COMMON_NAME,
    FORMAT,
    LATEST_NAME,
    MegatronCheckpoint,
    MegatronPlan,
    fingerprint,
    is_megatron,
    open_megatron,
    out_chunks,
    plan_megatron,
    updated_common,
    width_inexact_reason,
)
from .noise import DEFAULT_GENERATOR
from .olmo import OlmoCheckpoint, is_olmo, is_olmo_run
from .plan import layer_map_for, parse_experts, parse_layer_map, parse_layers

_RANK_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")
_CARRIED_NOT = {METADATA_NAME, COMMON_NAME, "moegrow.json"}


def detect(spec: str) -> bool:
    """Whether SOURCE is a training-stack checkpoint (a local folder moegrow must not read as safetensors)."""
    path = Path(spec)
    return path.is_dir() and (is_megatron(path) or is_olmo(path) or is_olmo_run(path))


def describe(ckpt: MegatronCheckpoint | OlmoCheckpoint) -> dict[str, Any]:
    """`inspect` of a Megatron checkpoint: architecture, keys, optimizer state, parallel layout."""
    if isinstance(ckpt, OlmoCheckpoint):
        return _describe_olmo(ckpt)
    reader = ckpt.reader
    args = ckpt.args
    ranks = {int(m[1]) for s in reader.metadata.storage_data.values() if (m := _RANK_FILE.match(s.relative_path))}
    model = {k: t for k, t in reader.tensors.items() if not k.startswith("optimizer.")}
    reason = width_inexact_reason(ckpt, ckpt.top_k)
    iterations = sorted(int(p.name[5:]) for p in ckpt.root.glob("iter_*") if p.name[5:].isdigit()) \
        if ckpt.is_run else None
    parallel = {"saved_by_ranks": len(ranks) or None}
    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                 "data_parallel_size", "world_size", "use_distributed_optimizer"):
        if args is not None and getattr(args, name, None) is not None:
            parallel[name] = getattr(args, name)
    numel = 0
    for t in model.values():
        n = 1
        for d in t.shape:
            n *= d
        numel += n
    return {
        "source": ckpt.spec,
        "format": FORMAT,
        "checkpoint": str(ckpt.folder),
        "iteration": ckpt.iteration,
        "iterations": iterations,
        "args_in_common_pt": args is not None,
        "num_layers": ckpt.num_layers,
        "num_experts": ckpt.num_experts,
        "top_k": ckpt.top_k,
        "routing": ckpt.router,
        "width_exact": reason is None,
        "width_inexact_reason": reason,
        "model_keys": sorted(model),
        "non_tensor_keys": len(reader.objects),
        "optimizer": ckpt.optimizer(),
        "parallel": parallel,
        "total_params": numel,
        "dtypes": dict(sorted(Counter(t.dtype for t in model.values()).items())),
        "total_bytes": sum(t.nbytes for t in reader.tensors.values()),
    }


def _describe_olmo(ckpt: OlmoCheckpoint) -> dict[str, Any]:
    from .olmo import DCP_DIR, run_steps
    from .olmo import FORMAT as OLMO_FORMAT
    from .olmo import width_inexact_reason as olmo_reason

    reader = ckpt.reader
    model = {k: t for k, t in reader.tensors.items() if not k.startswith("optim.")}
    ranks = {int(m[1]) for s in reader.metadata.storage_data.values() if (m := _RANK_FILE.match(s.relative_path))}
    reason = olmo_reason(ckpt)
    numel = 0
    for t in model.values():
        n = 1
        for d in t.shape:
            n *= d
        numel += n
    router = ckpt.moe.get("router") or {}
    return {
        "source": ckpt.spec, "format": OLMO_FORMAT, "checkpoint": str(ckpt.root / DCP_DIR),
        "iteration": ckpt.iteration, "iterations": run_steps(ckpt.run) if ckpt.run else None,
        "args_in_common_pt": False, "config_json": True, "moe_type": ckpt.moe.get("name"),
        "num_layers": ckpt.num_layers, "num_experts": ckpt.num_experts, "top_k": ckpt.top_k,
        "routing": {"score_function": router.get("gating_function", "softmax"),
                    "normalize_expert_weights": router.get("normalize_expert_weights"),
                    "bias_gamma": router.get("bias_gamma")},
        "width_exact": reason is None, "width_inexact_reason": reason, "model_keys": sorted(model),
        "non_tensor_keys": len(reader.objects), "optimizer": ckpt.optimizer(),
        "parallel": {"saved_by_ranks": len(ranks) or None}, "total_params": numel,
        "dtypes": dict(sorted(Counter(t.dtype for t in model.values()).items())),
        "total_bytes": sum(t.nbytes for t in reader.tensors.values()),
    }


def print_description(info: dict[str, Any], out: Any) -> None:
    it = f", iteration {info['iteration']} of {info['iterations']}" if info["iterations"] else ""
    out.print(f"{info['source']}  {info['format']} ({info['checkpoint']}{it})", markup=False, highlight=False)
    out.print(f"  layers: {info['num_layers']}, experts: {info['num_experts']}, top-k: "
              f"{info['top_k'] if info['top_k'] is not None else 'unknown (no Megatron-LM args in common.pt)'}",
              markup=False)
    r = info["routing"]
    if info.get("moe_type"):
        out.print(f"  MoE: {info['moe_type']}; gating: {r['score_function']}", markup=False)
    if info["args_in_common_pt"]:
        out.print(f"  routing: {r['score_function']}" + (" pre-softmax" if r["pre_softmax"] else "")
                  + (f", {r['num_groups']} groups (top-{r['group_topk']})" if r["num_groups"] else "")
                  + (", expert bias" if r["expert_bias"] else ""), markup=False)
    exact = "yes" if info["width_exact"] else f"no ({info['width_inexact_reason']})"
    out.print(f"  width growth function-preserving: {exact}", markup=False)
    o = info["optimizer"]
    if o["present"]:
        growable = "grows with its parameters" if o["growable"] else "cannot grow: use --optimizer drop"
        step = f", step {o['step']:g}" if o["step"] is not None else ""
        out.print(f"  optimizer: {o['kind']} ({', '.join(o['states']) or 'no moments'}{step}, {o['keys']} keys; "
                  f"{growable})", markup=False)
    else:
        out.print("  optimizer: none", markup=False)
    p = info["parallel"]
    out.print("  parallel layout: " + ", ".join(f"{k} {v}" for k, v in p.items() if v is not None), markup=False)
    out.print(f"  params: {info['total_params']:,}; {len(info['model_keys'])} model keys, "
              f"{info['non_tensor_keys']} non-tensor entries; dtypes "
              f"{', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}", markup=False)


def plan_training(ckpt: MegatronCheckpoint, operation: str, *, layers: str | None = None,
                  method: str = "interpose", layer_map: str | None = None, experts: str | None = None,
                  noise: float = 0.0, router_noise: float = 0.0, seed: int = 0, top_k: str | None = "scale",
                  allow_inexact: bool = False, optimizer: str = "keep", dtype: str = "keep",
                  depth_init: str = "copy", noise_mode: str = "absolute", reinit: float = 0.0,
                  select: str | None = None, calibration: str | None = None,
                  noise_generator: str = DEFAULT_GENERATOR) -> MegatronPlan:
    """The CLI's growth flags, read as for Hugging Face checkpoints, into a Megatron or OLMo-core plan."""
    from .configs import parse_top_k
    from .selection import parse_count
    from .training_recipes import check_select

    if dtype != "keep":
        raise GrowthError(f"--dtype {dtype}: training checkpoints are grown in their own dtypes (--dtype keep)")

    lmap = None
    if operation in ("grow-depth", "grow"):
        n = ckpt.num_layers
        if layer_map:
            lmap = parse_layer_map(layer_map, n)
        elif layers:
            lmap = layer_map_for(method, n, parse_layers(layers, n))
        else:
            raise GrowthError("give --layers (e.g. 2x) or --layer-map")
    factor, n_select = 1, None
    if operation in ("grow-width", "grow"):
        if not experts:
            raise GrowthError("give --experts (e.g. 2x)")
        n_select = parse_count(experts, ckpt.num_experts)
        if n_select is None:
            factor = parse_experts(experts, ckpt.num_experts)
    if n_select is None and (select or calibration):
        raise GrowthError("--select and --calibration apply to grow-width with --experts N, N not a multiple of "
                          "the source's experts")
    if n_select is not None:
        if operation != "grow-width":
            raise GrowthError(f"--experts {experts} is not a multiple of the source's experts: only grow-width "
                              "selects experts (run grow-depth, then grow-width)")
        check_select(select, n_select, ckpt.num_experts)
        if calibration:
            raise GrowthError("--calibration applies to --select load only")
        if noise_mode != "absolute" or reinit:  # as for Hugging Face checkpoints (grow.py)
            raise GrowthError("--noise-mode relative and --reinit do not yet apply to a selected expert count "
                              "(--experts N, N not a multiple of the source's)")
    if top_k is None:
        top_k = "keep" if n_select is not None else "scale"
    k = parse_top_k(top_k)
    if n_select is not None and k == "scale":
        raise GrowthError(f"--top-k scale: --experts {n_select} is not a multiple of the source's experts, and top-k "
                          "cannot be scaled by a fraction; give --top-k keep or an integer")
    plan = plan_from(ckpt, operation, lmap, factor, noise=noise, router_noise=router_noise, seed=seed, top_k=k,
                     optimizer=optimizer, allow_inexact=allow_inexact, depth_init=depth_init, noise_mode=noise_mode,
                     reinit=reinit, select=select if n_select is not None else None, experts=n_select)
    plan.noise_generator = noise_generator
    return plan


def plan_from(ckpt: MegatronCheckpoint | OlmoCheckpoint, operation: str, layer_map: list[int] | None, factor: int,
              *, noise: float = 0.0, router_noise: float = 0.0, seed: int = 0, top_k: str | int = "scale",
              optimizer: str = "keep", allow_inexact: bool = False, depth_init: str = "copy",
              noise_mode: str = "absolute", reinit: float = 0.0, select: str | None = None,
              experts: int | None = None) -> MegatronPlan:
    """The plan of parsed growth flags (the CLI's, or a provenance record's for verify): the format's planner,
    then the recipes (moegrow/training_recipes.py). `select` with `experts` N: the first N - E experts copied."""
    from .training_recipes import finish

    for flag, std in (("--noise", noise), ("--router-noise", router_noise)):
        if not std >= 0 or std == float("inf"):
            raise GrowthError(f"{flag}: the noise std must be a finite number >= 0, not {std}")
    if select is not None:  # a factor-2 plan cut to N experts: never exact, whatever the router
        factor, allow_inexact = 2, True
    kw = dict(layer_map=layer_map, factor=factor, noise=noise, router_noise=router_noise, seed=seed, top_k=top_k,
              optimizer=optimizer, allow_inexact=allow_inexact)
    if isinstance(ckpt, OlmoCheckpoint):
        from .olmo import plan_olmo

        plan = plan_olmo(ckpt, operation, **kw)  # type: ignore[arg-type]
    else:
        plan = plan_megatron(ckpt, operation, **kw)  # type: ignore[arg-type]
    if select is not None:
        plan.inexact_reason = None
    return finish(ckpt, plan, depth_init=depth_init, noise_mode=noise_mode, reinit=reinit, select=select,
                  experts=experts)


def summary(ckpt: MegatronCheckpoint, plan: MegatronPlan) -> dict[str, Any]:
    return {
        "operation": plan.operation,
        "format": getattr(ckpt, "format", FORMAT),
        "layers": [ckpt.num_layers, len(plan.layer_map) if plan.layer_map else ckpt.num_layers],
        "experts": [ckpt.num_experts, plan.experts or ckpt.num_experts * plan.factor],
        "top_k": [plan.k_old, plan.k_new],
        "layer_map": plan.layer_map,
        "keys": len(plan.shapes),
        "chunks": len(plan.pieces),
        "non_tensor_entries": len(plan.objects),
        "bytes_out": plan.bytes_out,
        "config_changes": [f"{'config.json: ' if isinstance(ckpt, OlmoCheckpoint) else 'args.'}{k}: {a!r} -> {b!r}"
                           for k, (a, b) in plan.args_changes.items()],
        "optimizer": plan.optimizer,
        "function_preserving": plan.function_preserving,
        "preservation": plan.preservation(),
        "noise": plan.noise,
        "router_noise": plan.router_noise,
        "seed": plan.seed,
        "depth_init": plan.depth_init,
        "noise_mode": plan.noise_mode,
        "reinit": plan.reinit,
        "select": plan.select,
        "warnings": plan.warnings,
    }


def record(ckpt: MegatronCheckpoint, plan: MegatronPlan) -> dict[str, Any]:
    """The provenance record: enough to rebuild the plan, and every output chunk's source."""
    from .megatron import noise_name
    from .olmo import fingerprint as olmo_fingerprint
    from .training_recipes import piece_record

    tensors: dict[str, Any] = {}
    for p in plan.pieces:
        entry = tensors.setdefault(p.key, {"shape": list(plan.shapes[p.key]), "chunks": []})
        extra = piece_record(p)
        entry["chunks"].append([list(p.offsets), p.source, list(p.source_offsets), p.noise]
                               + ([noise_name(p)] if p.noise else []) + ([extra] if extra else []))
    return {
        "moegrow_version": __version__,
        "operation": plan.operation,
        "format": getattr(ckpt, "format", FORMAT),
        "source": olmo_fingerprint(ckpt) if isinstance(ckpt, OlmoCheckpoint) else fingerprint(ckpt),
        "growth": {"layer_map": plan.layer_map, "factor": plan.factor,
                   "experts": plan.experts or ckpt.num_experts * plan.factor, "top_k": plan.top_k,
                   "noise": plan.noise, "router_noise": plan.router_noise, "seed": plan.seed,
                   "noise_generator": plan.noise_generator, "optimizer": plan.optimizer,
                   "allow_inexact": bool(plan.inexact_reason),
                   "depth_init": plan.depth_init, "noise_mode": plan.noise_mode, "reinit": plan.reinit,
                   "select": plan.select},
        "noise_device": "cpu" if any(p.noise or p.reinit is not None for p in plan.pieces) else "none",
        "function_preserving": plan.function_preserving,
        "config_changes": summary(ckpt, plan)["config_changes"],
        "warnings": plan.warnings,
        "non_tensor_entries": plan.objects,
        "tensors": tensors,
    }


def write_training(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, output: Path,
                   force: bool = False) -> float:
    """Write the grown checkpoint in the source's format and folder shape; return the seconds taken.

    A run folder gives a run folder (`latest_checkpointed_iteration.txt` and the grown iteration's
    folder); a checkpoint folder gives a checkpoint folder; an OLMo-core step folder gives a step folder.
    On any failure nothing is left behind.
    """
    start = time.perf_counter()
    target = _absolute(output)
    clean_stale_partials(target)
    check_output(output, getattr(ckpt, "run", None) or ckpt.root, force)
    tmp = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{target.parent}: cannot create the output there: {e.strerror or e}") from None
    try:
        if isinstance(ckpt, OlmoCheckpoint):
            _write_olmo(ckpt, plan, tmp)
        else:
            _write_megatron(ckpt, plan, tmp)
        write_json(tmp / "moegrow.json", record(ckpt, plan))
        check_unchanged(ckpt)
        with _signals_deferred():
            _replace(tmp, target, force)  # without --force, a run that finished first keeps OUTPUT
    except BaseException as e:
        with _signals_deferred():
            _remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"{output}: write failed: {e.strerror or e}") from None
        raise
    return time.perf_counter() - start


def _write_olmo(ckpt: OlmoCheckpoint, plan: MegatronPlan, tmp: Path) -> None:
    """model_and_optim/ grown, config.json updated, everything else in the step folder copied."""
    import json

    from .olmo import CONFIG_NAME, DCP_DIR, object_bytes, updated_config

    if ckpt.is_run:  # a save folder gives a save folder holding the grown step<N>/
        tmp = tmp / ckpt.root.name
        tmp.mkdir()
    objects = {new: (lambda src=src: object_bytes(ckpt, plan, src)) for new, src in plan.objects.items()}
    write_dcp(tmp / DCP_DIR, out_chunks(plan, ckpt.reader), objects)
    (tmp / CONFIG_NAME).write_text(json.dumps(updated_config(ckpt, plan)))
    for p in sorted(ckpt.root.iterdir()):
        if p.name in (DCP_DIR, CONFIG_NAME, "moegrow.json"):
            continue
        if p.is_dir():
            shutil.copytree(p, tmp / p.name)
        elif p.is_file():
            shutil.copyfile(p, tmp / p.name)


def _write_megatron(ckpt: MegatronCheckpoint, plan: MegatronPlan, tmp: Path) -> None:
    from .torch_pickle import save_record

    folder = tmp / ckpt.folder.name if ckpt.is_run else tmp
    folder.mkdir(exist_ok=True)
    reader = ckpt.reader
    objects = {new: (lambda src=src: reader.object_bytes(src)) for new, src in plan.objects.items()}
    write_dcp(folder, out_chunks(plan, reader), objects)
    save_record(updated_common(ckpt, plan), folder / COMMON_NAME)
    for p in sorted(ckpt.folder.iterdir()):  # metadata.json and whatever else the trainer put there
        if p.is_file() and p.name not in _CARRIED_NOT and not p.name.endswith(".distcp"):
            shutil.copyfile(p, folder / p.name)
    if ckpt.is_run:
        (tmp / LATEST_NAME).write_text(str(ckpt.iteration) if ckpt.iteration is not None else "release")


def open_training(spec: str, iteration: int | None) -> MegatronCheckpoint | OlmoCheckpoint:
    """Open a Megatron or OLMo-core checkpoint and stamp its files (`check_unchanged` compares them at the end)."""
    from .source import stamp, stat_tree

    before = stat_tree(Path(spec))  # before parsing: a change from now on moves the mtime compared at the end
    ckpt: MegatronCheckpoint | OlmoCheckpoint
    if is_olmo(Path(spec)) or is_olmo_run(Path(spec)):
        from .olmo import open_olmo

        ckpt = open_olmo(spec, iteration)
    else:
        ckpt = open_megatron(spec, iteration)
    try:
        ckpt.stamps = {p: stamp(p, before.get(p)) for p in source_files(ckpt)}
    except OSError as e:
        raise SourceError(f"{e.filename}: cannot read: {e.strerror or e}") from None
    return ckpt


def source_files(ckpt: MegatronCheckpoint | OlmoCheckpoint) -> list[Path]:
    """The files a growth reads or copies: every file of the checkpoint folder (Megatron: `.metadata`,
    `common.pt`, the `.distcp` files...; OLMo-core: the step folder, `model_and_optim/` and `config.json`
    included). A run or save folder's other iterations are not the source."""
    return sorted(p for p in ckpt.folder.rglob("*") if p.is_file())


def check_unchanged(ckpt: MegatronCheckpoint | OlmoCheckpoint) -> None:
    """Refuse (exit 2) when a source file differs from its stamp: the bytes read may mix old and new.
    Run once everything is written, before the rename."""
    from .source import check_unchanged as check

    check(ckpt.stamps)
