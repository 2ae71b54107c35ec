"""`moegrow verify` for a grown training-stack checkpoint (Megatron-core torch_dist, OLMo-core DCP).

The provenance record holds the growth flags and every output chunk's source. The plan is rebuilt
from SOURCE and those flags and must give the record's mapping; then every output chunk is read
and compared with its source slice (a copy byte-identical, a noised copy equal to the recorded
seed's CPU noise, its std measured), the output's keys, shapes and dtypes against the plan, the
non-tensor entries byte for byte, common.pt (config.json for OLMo-core) against the source's with the
plan's changes, and the trainer's other files as copied. One chunk in memory at a time, as when growing.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .dcp_io import DcpReader
from .errors import SourceError
from .megatron import (
    COMMON_NAME,
    FORMAT,
    LATEST_NAME,
    MegatronCheckpoint,
    MegatronPlan,
    fingerprint,
    open_megatron,
    updated_common,
)
from .noise import RECORDED_BEFORE
from .olmo import DCP_DIR, OlmoCheckpoint, is_olmo, is_olmo_run
from .olmo import FORMAT as OLMO_FORMAT
from .provenance import RECORD_NAME
from .training_recipes import apply_piece, describe, source_values
from .verify import Report


def _read_record(output: Path) -> dict[str, Any]:
    path = output / RECORD_NAME
    if not path.is_file():
        raise SourceError(f"{path}: missing; OUTPUT was not written by moegrow")
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    ok = (isinstance(record, dict) and record.get("format") in (FORMAT, OLMO_FORMAT)
          and isinstance(record.get("growth"), dict) and isinstance(record.get("tensors"), dict)
          and isinstance(record.get("non_tensor_entries"), dict) and isinstance(record.get("source"), dict))
    if not ok:
        raise SourceError(f"{path}: not a valid moegrow record of a {FORMAT} or {OLMO_FORMAT} growth")
    return record


def rebuild(source: str, record: dict[str, Any]) -> tuple[MegatronCheckpoint | OlmoCheckpoint, MegatronPlan]:
    """The source (at the record's iteration) and the plan the record's flags give."""
    from .olmo import open_olmo
    from .training import plan_from

    g = record["growth"]
    it = record["source"].get("iteration")
    olmo = is_olmo(Path(source)) or is_olmo_run(Path(source))
    try:
        if olmo:  # a save folder is read at the step the record names
            ckpt = open_olmo(source, None if is_olmo(Path(source)) else it)
        else:
            ckpt = open_megatron(source, it if (Path(source) / LATEST_NAME).is_file() else None)
        factor = int(g["factor"])
        select = g.get("select")
        plan = plan_from(ckpt, record["operation"], g["layer_map"], factor, noise=float(g["noise"]),
                         router_noise=float(g["router_noise"]), seed=int(g["seed"]), top_k=g["top_k"],
                         optimizer=g["optimizer"], allow_inexact=bool(g["allow_inexact"]),
                         depth_init=g.get("depth_init", "copy"), noise_mode=g.get("noise_mode", "absolute"),
                         reinit=float(g.get("reinit") or 0.0), select=select,
                         experts=int(g["experts"]) if select is not None else None)
        plan.noise_generator = str(g.get("noise_generator") or RECORDED_BEFORE)
    except (KeyError, TypeError, ValueError) as e:
        raise SourceError(f"{RECORD_NAME}: growth flags are not valid ({type(e).__name__}: {e})") from None
    return ckpt, plan


def _canon(x: Any) -> Any:
    """A value of a torch.save record as plain comparable data (tensors by dtype, shape and bytes)."""
    import argparse

    import torch

    from .torch_pickle import Opaque

    if isinstance(x, torch.Tensor):
        return ("tensor", str(x.dtype), tuple(x.shape), _bytes(x))
    if isinstance(x, argparse.Namespace):
        return ("Namespace", _canon(vars(x)))
    if isinstance(x, Opaque):
        return (x._module, x._name, _canon(x._args), _canon(x._state))
    if isinstance(x, dict):
        return (type(x).__name__, tuple((repr(k), _canon(v)) for k, v in x.items()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(_canon(v) for v in x))
    if isinstance(x, float) and x != x:
        return ("nan",)
    return x


def _check_config(ckpt: OlmoCheckpoint, plan: MegatronPlan, out: Path, report: Report) -> None:
    """config.json: the source's with the plan's changes, every other field as it was."""
    from .olmo import CONFIG_NAME, updated_config

    path = out / CONFIG_NAME
    try:
        got = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        report.problems.append(f"{path}: missing or not JSON ({e})".splitlines()[0])
        return

    def walk(want: Any, have: Any, where: str) -> None:
        if isinstance(want, dict) and isinstance(have, dict):
            for k in sorted(set(want) | set(have)):
                walk(want.get(k), have.get(k), f"{where}.{k}" if where else k)
        elif want != have:
            report.problems.append(f"{path}: {where} is {have!r}, the growth gives {want!r}")

    walk(updated_config(ckpt, plan), got, "")


def _check_common(ckpt: MegatronCheckpoint, plan: MegatronPlan, out: Path, report: Report) -> None:
    from .torch_pickle import load_record

    path = out / COMMON_NAME
    want = updated_common(ckpt, plan)
    try:
        got = load_record(path) if path.is_file() else {}
    except Exception as e:  # a damaged zip or pickle
        report.problems.append(f"{path}: cannot read: {type(e).__name__}: {e}".splitlines()[0])
        return
    if _canon(got) == _canon(want):
        return
    wa, ga = (c.get("args") if isinstance(c, dict) else None for c in (want, got))
    if wa is not None and ga is not None:
        w, h = vars(wa), vars(ga)
        for name in sorted(set(w) | set(h)):
            if _canon(w.get(name)) != _canon(h.get(name)):
                report.problems.append(f"{path}: args.{name} is {h.get(name)!r}, the growth gives {w.get(name)!r}")
    others = [k for k in set(want) | set(got) if k != "args"] if isinstance(want, dict) and isinstance(got, dict) \
        else [None]
    for k in sorted(others, key=repr):
        if k is None or _canon(want.get(k)) != _canon(got.get(k)):
            report.problems.append(f"{path}: {'the record' if k is None else repr(k)} differs from the source's")


def _bytes(t: Any) -> bytes:
    import torch

    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _check_chunks(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, out: DcpReader, report: Report,
                  progress: Callable[[int], None] | None) -> None:
    import torch

    for key in sorted(set(out.tensors) - set(plan.shapes)):
        report.problems.append(f"{key}: in OUTPUT but not accounted for by the growth")
    bad: set[str] = set()
    for key, shape in plan.shapes.items():
        t = out.tensors.get(key)
        if t is None:
            report.problems.append(f"{key}: missing from OUTPUT")
        elif (t.shape, t.torch_dtype) != (shape, plan.dtypes[key]):
            report.problems.append(f"{key}: {t.dtype}{list(t.shape)}, expected "
                                   f"{ckpt.reader.tensors[key].dtype}{list(shape)}")
        else:
            continue
        bad.add(key)
    measured: dict[str, list[float]] = {}
    relative: dict[str, list[float]] = {}
    for p in plan.pieces:
        if p.key in bad:
            continue
        try:
            got = out.read_slice(p.key, p.offsets, p.sizes)
        except SourceError as e:
            report.problems.append(str(e))
            bad.add(p.key)
            continue
        src = source_values(ckpt.reader, p)
        where = f"{p.key} at {list(p.offsets)}"
        want = apply_piece(src, p, plan.seed, plan.noise_generator)
        if _bytes(got) != _bytes(want):
            if p.zero and not (p.noise or p.reinit is not None):
                report.problems.append(f"{where}: is not zero (an added copy's residual writer, --depth-init "
                                       "identity)")
            elif p.zero or p.noise or p.reinit is not None:
                report.problems.append(f"{where}: is not {'zeros' if p.zero else p.source} at "
                                       f"{list(p.source_offsets)} plus the recorded {describe(p, plan.seed)}"
                                       + _recipe_detail(got, want, p, plan.seed))
            else:
                report.problems.append(f"{where}: differs from its source {p.source} at {list(p.source_offsets)}")
        if p.noise:
            diff = got.double() - src.double()
            if p.reinit is not None:  # the noise std of the positions that were not re-initialised
                from .noise_modes import reinit_mask

                diff = diff.reshape(-1)[~reinit_mask(p.reinit, plan.seed, p.slices)]
            measured.setdefault(p.key, []).append(float(diff.std()) if diff.numel() > 1 else float(diff.abs().max()))
            if p.relative:
                from .noise_modes import relative_stds

                relative.setdefault(p.key, []).extend(relative_stds(got, src, p.reinit, p.slices, plan.seed))
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            report.problems.append(f"{where}: contains NaN or Inf")
        if progress:
            progress(got.numel() * got.element_size())
    for key, vals in measured.items():
        report.noise_std[key] = sum(vals) / len(vals)
    for key, vals in relative.items():  # --noise-mode relative: noise std over each source slice's std
        if vals:
            report.noise_std[f"{key} (relative)"] = sum(vals) / len(vals)
    report.checked = len(set(plan.shapes) - bad)


def _recipe_detail(got: Any, want: Any, p: Any, seed: int) -> str:
    """Where a recipe's piece differs: in its re-initialised neurons, or elsewhere."""
    if p.reinit is None:
        return ""
    from .noise_modes import reinit_mask

    mask = reinit_mask(p.reinit, seed, p.slices)
    g, w = got.reshape(-1), want.reshape(-1)
    if _bytes(g[mask]) != _bytes(w[mask]):
        return " (its re-initialised neurons differ from the record's)"
    return " (outside its re-initialised neurons)"


def _check_objects(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, record: dict[str, Any],
                   out: DcpReader, report: Report) -> None:
    if record["non_tensor_entries"] != plan.objects:
        report.problems.append(f"{RECORD_NAME}: non_tensor_entries differ from the plan that its flags describe")
    have = set(out.objects)
    for key in sorted(have - set(plan.objects)):
        report.problems.append(f"{key}: a non-tensor entry in OUTPUT not accounted for by the growth")
    for key, src in sorted(plan.objects.items()):
        if key not in have:
            report.problems.append(f"{key}: non-tensor entry missing from OUTPUT")
            continue
        try:
            if isinstance(ckpt, OlmoCheckpoint):  # param group names are rewritten for new blocks
                from .olmo import object_bytes

                same = out.object_bytes(key) == object_bytes(ckpt, plan, src)
            else:
                same = out.object_bytes(key) == ckpt.reader.object_bytes(src)
        except SourceError as e:
            report.problems.append(str(e))
            continue
        if not same:
            report.problems.append(f"{key}: not the bytes of {src} in SOURCE")


def verify_training(source: str, output: Path, progress: Callable[[int], None] | None = None) -> Report:
    """Check a grown Megatron checkpoint OUTPUT against SOURCE and its provenance record."""
    from .olmo import fingerprint as olmo_fingerprint
    from .training import _CARRIED_NOT
    from .training import record as make_record

    report = Report()
    record = _read_record(output)
    ckpt, plan = rebuild(source, record)
    expected = make_record(ckpt, plan)
    olmo = isinstance(ckpt, OlmoCheckpoint)
    for name, value in (olmo_fingerprint(ckpt) if olmo else fingerprint(ckpt)).items():
        if name.endswith("_sha256") and record["source"].get(name) not in (None, value):
            report.problems.append(f"{ckpt.folder}: {name.removesuffix('_sha256')} differs from the source "
                                   "the record names (SOURCE changed since the growth?)")
    if record["tensors"] != expected["tensors"]:
        report.problems.append(f"{output / RECORD_NAME}: tensor mapping differs from the plan that its flags describe")
    if olmo:
        step = output / ckpt.root.name if ckpt.is_run else output  # a save folder's grown step<N>/
        out = DcpReader(step / DCP_DIR)
        _check_chunks(ckpt, plan, out, report, progress)
        _check_objects(ckpt, plan, record, out, report)
        _check_config(ckpt, plan, step, report)
        _check_copied(ckpt.root, step, {DCP_DIR, "config.json", RECORD_NAME}, report)
        return report
    folder = output / ckpt.folder.name if ckpt.is_run else output
    if ckpt.is_run:
        latest = output / LATEST_NAME
        want = str(ckpt.iteration) if ckpt.iteration is not None else "release"
        if not latest.is_file() or latest.read_text().strip() != want:
            report.problems.append(f"{latest}: missing or not {want!r}")
    out = DcpReader(folder)
    _check_chunks(ckpt, plan, out, report, progress)
    _check_objects(ckpt, plan, record, out, report)
    _check_common(ckpt, plan, folder, report)
    for p in sorted(ckpt.folder.iterdir()):
        if p.is_file() and p.name not in _CARRIED_NOT and not p.name.endswith(".distcp"):
            q = folder / p.name
            if not q.is_file() or q.read_bytes() != p.read_bytes():
                report.problems.append(f"{q}: missing or not a copy of {p}")
    return report


def _check_copied(src: Path, out: Path, skip: set[str], report: Report) -> None:
    """Every other file of the source folder (and of its subfolders) copied as it is."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if rel.parts[0] in skip or not p.is_file():
            continue
        q = out / rel
        if not q.is_file() or q.read_bytes() != p.read_bytes():
            report.problems.append(f"{q}: missing or not a copy of {p}")


def output_bytes(output: Path) -> int:
    """The bytes of tensor data `verify_training` reads from OUTPUT (for the progress bar)."""
    folders = [p for p in output.iterdir() if p.is_dir()] if (output / LATEST_NAME).is_file() \
        else [output / DCP_DIR] if (output / DCP_DIR).is_dir() \
        else [p / DCP_DIR for p in output.iterdir() if (p / DCP_DIR).is_dir()] if is_olmo_run(output) else [output]
    total = 0
    for f in folders:
        with contextlib.suppress(SourceError):
            total += sum(t.nbytes for t in DcpReader(f).tensors.values())
    return total
