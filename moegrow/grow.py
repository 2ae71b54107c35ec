"""The growth operations as a small Python API: plan from a source, then write.

Example:
    >>> from moegrow.grow import open_source, plan_for, write
    >>> src = open_source("ckpt/")
    >>> plan = plan_for(src, "grow-width", experts="2x", noise=0.01, seed=0)
    >>> write(plan, src, "out/")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .anatomy import analyse
from .card import plan_options, render_card
from .configs import parse_top_k
from .errors import GrowthError, SourceError
from .execute import DEFAULT_MAX_SHARD, Written, check_output, execute, find_nonfinite, nonfinite_message
from .gc_pause import gc_paused
from .layouts import layout_for
from .noise import RECORDED_BEFORE
from .plan import (
    Plan,
    layer_map_for,
    parse_experts,
    parse_layer_map,
    parse_layers,
    plan_depth,
    plan_grow,
    plan_width,
)
from .provenance import build_record
from .selection import parse_count, plan_selected, selection_for
from .source import Source, open_source

__all__ = ["check_finite", "open_source", "plan_for", "rebuild_plan", "write"]


def plan_for(source: Source, operation: str, *, layers: str | None = None, method: str = "interpose",
             layer_map: str | list[int] | None = None, experts: str | None = None,
             noise: float = 0.0, router_noise: float = 0.0, seed: int = 0,
             top_k: str | int | None = "scale", allow_inexact: bool = False, depth_init: str = "copy",
             dtype: str = "keep", noise_mode: str = "absolute", reinit: float = 0.0, select: str | None = None,
             calibration: str | None = None, selection: Mapping[Any, Any] | None = None) -> Plan:
    """Build the plan of `grow-depth`, `grow-width` or `grow` from command-line style arguments.

    `experts` N not a multiple of the source's E (grow-width only): `select` (--select load / first, with
    `calibration` for load) or a recorded `selection` ({layer: experts}) picks the N - E experts copied;
    `top_k` None: scale, or keep for such an N (moegrow.selection).

    `dtype` (--dtype): keep, or bfloat16 / float16 / float32. The planners see quantised weights as
    float tensors (their dequantised view); `quant.plan.lower` turns that plan into tensors to write.
    """
    with gc_paused():
        return _plan_for(source, operation, layers=layers, method=method, layer_map=layer_map, experts=experts,
                         noise=noise, router_noise=router_noise, seed=seed, top_k=top_k, allow_inexact=allow_inexact,
                         depth_init=depth_init, dtype=dtype, noise_mode=noise_mode, reinit=reinit, select=select,
                         calibration=calibration, selection=selection)


def _plan_for(source: Source, operation: str, *, layers: str | None, method: str,
              layer_map: str | list[int] | None, experts: str | None, noise: float, router_noise: float, seed: int,
              top_k: str | int | None, allow_inexact: bool, depth_init: str, dtype: str, noise_mode: str,
              reinit: float, select: str | None, calibration: str | None, selection: Mapping[Any, Any] | None) -> Plan:
    from .quant.plan import check_dtype, lower, planning_index, quantisation

    where = f"{source.spec}/config.json"
    layout = layout_for(source.config, where, source.tensors)
    config, tensors = source.config, source.tensors
    # config against tensors before any option is read against the config
    analyse({n: t.shape for n, t in tensors.items()}, config, layout, where)
    quant = quantisation(config, tensors)
    tensors = planning_index(tensors, quant, check_dtype(dtype))
    lmap: list[int] | None = None
    n_old = layout.num_layers(config)
    depth = 1.0
    if operation in ("grow-depth", "grow"):
        if isinstance(layer_map, list):  # from a provenance record: checked as --layer-map is
            lmap = parse_layer_map(",".join(map(str, layer_map)), n_old)
        elif layer_map:
            lmap = parse_layer_map(layer_map, n_old)
        elif layers:
            n_new = parse_layers(layers, n_old)
            check_plan_size(len(tensors) * n_new / n_old, f"--layers {layers}")
            lmap = layer_map_for(method, n_old, n_new)
        else:
            raise GrowthError("give --layers (e.g. 2x) or --layer-map")
        depth = len(lmap) / n_old
    factor = 1
    n_select = None
    if operation in ("grow-width", "grow"):
        if not experts:
            raise GrowthError("give --experts (e.g. 2x)")
        n_select = parse_count(experts, layout.num_experts(config))
        if n_select is None:
            factor = parse_experts(experts, layout.num_experts(config))
            check_plan_size(len(tensors) * depth * factor, f"--experts {experts}")
    if n_select is None and (select or calibration):
        raise GrowthError("--select and --calibration apply to grow-width with --experts N, N not a multiple of "
                          "the source's experts")
    if n_select is not None and operation != "grow-width":
        raise GrowthError(f"--experts {experts} is not a multiple of the source's experts: only grow-width "
                          "selects experts (run grow-depth, then grow-width)")
    if top_k is None:
        top_k = "keep" if n_select is not None else "scale"
    k = parse_top_k(top_k) if isinstance(top_k, str) else top_k
    width = dict(noise=noise, router_noise=router_noise, seed=seed, top_k=k, allow_inexact=allow_inexact,
                 noise_mode=noise_mode, reinit=reinit)
    if operation == "grow-depth":
        return lower(plan_depth(config, tensors, layout, lmap or [], depth_init), source.tensors, quant, dtype)
    if n_select is not None:
        if noise_mode != "absolute" or reinit:
            raise GrowthError("--noise-mode relative and --reinit do not yet apply to a selected expert count "
                              "(--experts N, N not a multiple of the source's)")
        width = {k: v for k, v in width.items() if k not in ("noise_mode", "reinit")}
        chosen = selection if selection is not None else selection_for(
            select, calibration, source.folder, config, layout, tensors, n_select,
            quant.describe()["format"] if quant is not None else "")
        return lower(plan_selected(config, tensors, layout, n_select, chosen, select or "recorded", **width),
                     source.tensors, quant, dtype)
    if operation == "grow-width":
        return lower(plan_width(config, tensors, layout, factor, **width), source.tensors, quant, dtype)
    if operation == "grow":
        return lower(plan_grow(config, tensors, layout, lmap or [], factor, depth_init, **width), source.tensors,
                     quant, dtype)
    raise GrowthError(f"unknown operation {operation!r}")


MAX_PLAN_TENSORS = 10_000_000  # DeepSeek-V3 grown 8x in width is about 0.4 million


def check_plan_size(estimate: float, flag: str) -> None:
    """Refuse a growth whose plan alone would exhaust memory (a factor typed with extra zeros)."""
    if estimate > MAX_PLAN_TENSORS:
        raise GrowthError(f"{flag}: the output would have about {estimate:,.0f} tensors; moegrow refuses more "
                          f"than {MAX_PLAN_TENSORS:,} (is the factor a typo?)")


def rebuild_plan(source: Source, record: Mapping[str, Any]) -> Plan:
    """The plan a provenance record describes, rebuilt from the source."""
    plan = _rebuilt(source, record)
    plan.noise_generator = str((record.get("growth") or {}).get("noise_generator") or RECORDED_BEFORE)
    return plan


def _rebuilt(source: Source, record: Mapping[str, Any]) -> Plan:
    g = record.get("growth") or {}
    op = record.get("operation")
    if op == "upcycle":
        from .upcycle import rebuild_upcycle

        return rebuild_upcycle(source, record)
    experts = f"{g['factor']}x" if g.get("factor") else None
    if g.get("selection") is not None:  # --select: the recorded choice, no calibration again
        experts = str(g.get("experts"))
    return plan_for(source, str(op), layer_map=g.get("layer_map"), experts=experts,
                    noise=float(g.get("noise") or 0.0), router_noise=float(g.get("router_noise") or 0.0),
                    seed=int(g.get("seed") or 0), top_k=g.get("top_k") or "scale",
                    allow_inexact=bool(g.get("allow_inexact")), depth_init=g.get("depth_init") or "copy",
                    dtype=str(g.get("dtype") or "keep"), noise_mode=str(g.get("noise_mode") or "absolute"),
                    reinit=float(g.get("reinit") or 0.0), selection=g.get("selection"), select=g.get("select"))


def check_finite(plan: Plan, source: Source) -> None:
    """Refuse a source whose tensors (those the plan reads) hold NaN or Inf: a full read."""
    found = find_nonfinite(source.tensors[n] for n in sorted(plan.sources()))
    if found:
        more = f" (and {len(found) - 1} more tensor(s))" if len(found) > 1 else ""
        raise SourceError(f"{nonfinite_message(*found[0])}{more}; --strict refuses such a source")


def default_max_shard(source: Source) -> int:
    """The output's largest shard when --max-shard-size is not given: a sharded source's grain (its
    largest shard's tensor bytes), else transformers' 50GB. A grown checkpoint then keeps the file
    sizes its source was published with (not 50 GB files, the Hub's per-file limit), and has
    several shards: the unit that threads and ranks write in parallel, one writer per file."""
    return source.largest_shard_bytes() or DEFAULT_MAX_SHARD


def write(plan: Plan, source: Source, output: str | Path, *, max_shard_size: int | None = None,
          device: str = "auto", threads: int = 2, force: bool = False,
          progress: Callable[[int], None] | None = None, strict: bool = False,
          options: Mapping[str, Any] | None = None, ranks: Any = None) -> Written:
    """Execute a plan into OUTPUT (atomically) with its provenance record and model card.

    `options`: the growth flags as the user gave them, for the card's reproduction command (the
    CLI passes its own); by default the plan's (`card.plan_options`).
    `strict` first reads every source tensor and refuses NaN or Inf (see `check_finite`);
    without it, only the tensors that pass through torch (noised copies) are checked, and
    `Written.warnings` names those holding NaN or Inf. A source shard (or config.json) that
    changed since `open_source` fails the run before OUTPUT appears (`Source.check_unchanged`).
    `ranks` (a `moegrow.ranks.Ranks`, from `ranks.joined()`): write together with the other
    processes of a torchrun / srun job, each its share of the shards (every rank calls `write`).
    """
    default_shard = default_max_shard(source)
    if max_shard_size is None:
        max_shard_size = default_shard
    if strict:
        check_output(Path(output), source.folder, force)  # fail fast, before a full read
        check_finite(plan, source)
    if device not in ("auto", "cpu", "cuda"):
        raise GrowthError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and any(not t.is_copy for t in plan.tensors):
        from .noise import resolve_device

        resolve_device(device)  # fail now, not after the byte copies
    # "auto" resolves when the first transformed tensor needs torch; execute records the result
    record = build_record(plan, source, device)
    flags = dict(plan_options(plan) if options is None else options)
    if source.repo_id:  # the commit, not a branch that may move
        flags["revision"] = source.commit or source.revision
    if max_shard_size != default_shard and not flags.get("max_shard_size"):
        flags["max_shard_size"] = max_shard_size

    def card(used: str) -> str:  # `used`: where noise was drawn (none: byte copies only)
        return render_card(plan, source, {**flags, "device": None if used == "none" else used})

    if ranks is not None:
        from .ranks import execute_ranks

        with gc_paused():
            return execute_ranks(ranks, plan, source.tensors, source.folder, Path(output), provenance=record,
                                 max_shard_size=max_shard_size, device=device, threads=threads, force=force,
                                 progress=progress, card=card, check_source=source.check_unchanged)
    with gc_paused():  # the run builds 4 objects per tensor (work items, record entries), none in a cycle
        return execute(plan, source.tensors, source.folder, Path(output), provenance=record,
                       max_shard_size=max_shard_size, device=device, threads=threads, force=force,
                       progress=progress, card=card, check_source=source.check_unchanged)
