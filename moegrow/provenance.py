"""The provenance record, `moegrow.json`: what was grown from what, with which flags.

It holds everything needed to rebuild the plan (operation, layer map, factor, top-k, noise,
seed) plus the tensor mapping itself, so `verify` can check the output against both.
Timestamps are left out on purpose: the same growth twice gives byte-identical folders.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from . import __version__
from .plan import Encode, OutTensor, Part, Plan
from .source import Source

RECORD_NAME = "moegrow.json"


def part_record(p: Part, axis: int = 0, encode: Encode | None = None) -> list[Any]:
    """[source, noise] + [scale] where scaled + [{rows, add, axis, fill, init, decode, encode}] where a part has any."""
    extra: dict[str, Any] = {}
    if p.rows is not None:
        extra["rows"] = list(p.rows)
    if p.add:
        extra["add"] = p.add
    if p.fill is not None:
        extra["fill"] = p.fill
    if axis:
        extra["axis"] = axis
    if p.init:
        extra["init"] = p.init
    if p.decode:
        extra["decode"] = p.decode
    if encode is not None:
        extra["encode"] = encode.record()
    if p.relative:
        extra["noise_mode"] = "relative"
    if p.reinit is not None:
        extra["reinit"] = p.reinit.record()
    if p.slices != 1:
        extra["slices"] = p.slices
    record: list[Any] = [p.source, p.noise]
    if p.scale != 1.0 or extra:
        record.append(p.scale)
    if extra:
        record.append(extra)
    return record


def _part_json(p: Part, axis: int, encode: Encode | None, compact: Any) -> str:
    """`compact(part_record(p, axis, encode))`, without the list, for a part with no scale or extras (most)."""
    if (axis or encode is not None or p.scale != 1.0 or p.rows is not None or p.add or p.fill is not None or p.init
            or p.decode or p.relative or p.reinit is not None or p.slices != 1 or type(p.noise) is not float
            or not math.isfinite(p.noise)):
        return compact(part_record(p, axis, encode))
    return f"[{encode_basestring_ascii(p.source)},{float.__repr__(p.noise)}]"


def tensor_mapping(tensors: list[OutTensor]) -> dict[str, list[list[Any]]]:
    """{output tensor: [[source tensor, noise std(, scale(, extras))], ...]}, parts concatenated along
    axis 0 unless extras say `axis`.

    The scale appears only where a part is scaled (see layouts.TensorRule) or has extras: `rows`
    [start, stop, of] (a run of the source's rows), `add` (an integer added to an index table), `fill`
    (every value this constant instead of the source's: identity depth init's zeroed residual writers), `init`
    (a generated part, source "": zeros, or normal with the part's noise as std),
    `decode` (the source is a quantised weight, by its dequantised name, in this format), `encode`
    (`cast`: written in the tensor's float dtype; `FORMAT.MEMBER`: one member of a requantised weight)."""
    return {t.name: [part_record(p, t.axis, t.encode) for p in t.parts] for t in tensors}


class TensorMapping(Mapping[str, list[list[Any]]]):
    """`tensor_mapping(tensors)` computed entry by entry when read: a record of DeepSeek-V3's
    365,000 output tensors is written (execute.write_json streams it) without ever being held."""

    def __init__(self, tensors: list[OutTensor]) -> None:
        self._tensors = tensors
        self._index: dict[str, int] | None = None

    def __getitem__(self, name: str) -> list[list[Any]]:
        if self._index is None:
            self._index = {t.name: i for i, t in enumerate(self._tensors)}
        t = self._tensors[self._index[name]]
        return [part_record(p, t.axis, t.encode) for p in t.parts]

    def __iter__(self) -> Iterator[str]:
        return (t.name for t in self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def items(self) -> Iterator[tuple[str, list[list[Any]]]]:  # type: ignore[override]
        return ((t.name, [part_record(p, t.axis, t.encode) for p in t.parts]) for t in self._tensors)

    def json_items(self, compact: Any) -> Iterator[tuple[str, str]]:
        """(name, its entry's JSON as `compact` writes it) for each entry: `execute.write_json`'s fast path."""
        for t in self._tensors:
            yield t.name, f"[{','.join([_part_json(p, t.axis, t.encode, compact) for p in t.parts])}]"


def mapping_differs(tensors: list[OutTensor], recorded: Mapping[str, Any]) -> bool:
    """Whether a record's tensor mapping differs from `tensor_mapping(tensors)` (entry by entry, in one pass
    over `recorded`: a record streamed from its file, moegrow.json_stream, is read once)."""
    if len(tensors) != len(recorded):
        return True
    seen = bytearray(len(tensors))
    index: dict[str, int] | None = None  # only for a record in another order than the plan's (older records)
    for k, (name, value) in enumerate(recorded.items()):
        if k < len(tensors) and tensors[k].name == name:
            i = k
        else:
            if index is None:
                index = {t.name: j for j, t in enumerate(tensors)}
            i = index.get(name, -1)
            if i < 0:
                return True
        t = tensors[i]
        if seen[i] or value != [part_record(p, t.axis, t.encode) for p in t.parts]:
            return True
        seen[i] = 1
    return False


def build_record(plan: Plan, source: Source, device: str) -> dict[str, Any]:
    return {
        "moegrow_version": __version__,
        "operation": plan.operation,
        "model_type": plan.config.get("model_type"),
        "source": source.fingerprint(),
        "growth": {
            "layer_map": plan.layer_map,
            "factor": plan.factor,
            "experts": plan.experts,
            "top_k": plan.top_k,
            "noise": plan.noise,
            "router_noise": plan.router_noise,
            "seed": plan.seed,
            "noise_generator": plan.noise_generator,
            "allow_inexact": plan.allow_inexact,
            "depth_init": plan.depth_init,
            "dtype": plan.dtype,
            "noise_mode": plan.noise_mode,
            "reinit": plan.reinit,
            **({"select": plan.select, "selection": {str(k): v for k, v in plan.selection.items()}}
               if plan.selection is not None else {}),
            **({k: v for k, v in plan.upcycle.items() if k != "why_exact"} if plan.upcycle else {}),
        },
        "noise_device": device,
        "function_preserving": plan.function_preserving,
        **({"lossy": plan.lossy} if plan.lossy else {}),  # --dtype rounds weights: no layer is an exact copy
        "config_changes": plan.config_changes,
        "warnings": plan.warnings,
        **({"identity_init": plan.filled()} if plan.depth_init == "identity" else {}),
        "tensors": TensorMapping(plan.tensors),
    }
