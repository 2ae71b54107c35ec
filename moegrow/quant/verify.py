"""`verify` for encoded tensors (dequantised, converted, requantised): recomputed and compared.

Parts that are byte copies (an original's values and scales under --dtype keep) must equal their
source bytes; computed parts must equal a recomputation bit for bit (noise included where it was
drawn on the CPU); the noise std is measured in dequantised space: the output part decoded (for a
requantised weight, from all its members in OUTPUT) minus the source decoded and scaled. The members
of a requantised weight are checked together, chunk by chunk (`transform.chunks`), so that each
chunk is recomputed once and memory stays bounded by a chunk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..io import TensorInfo
from ..plan import OutTensor, Plan
from .tensors import from_bytes
from .transform import chunks, computed, part_nbytes, part_shape, source_values, verbatim


def _offsets(plan: Plan, t: OutTensor, tensors: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(offset, length) of each part within the output tensor's bytes."""
    spans, pos = [], 0
    for part in t.parts:
        copied = verbatim(t, part, tensors)
        n = part.span(tensors[part.source].nbytes)[1] if copied else part_nbytes(plan, t, part, tensors)
        spans.append((pos, n))
        pos += n
    return spans


class _Moments:
    """Count, mean and sum of squared deviations of values seen a chunk at a time (Chan et al.), so
    that a part's noise std is measured without holding the part."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.amax = 0, 0.0, 0.0, 0.0

    def add(self, x: Any) -> None:
        n = x.numel()
        if not n:
            return
        mean = float(x.mean())
        m2 = float(((x - mean) ** 2).sum())
        delta, total = mean - self.mean, self.n + n
        self.m2 += m2 + delta * delta * self.n * n / total
        self.mean += delta * n / total
        self.n = total
        self.amax = max(self.amax, float(x.abs().max()))

    def std(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1)) if self.n > 1 else self.amax


def _together(t: OutTensor, plan: Plan, planned: Mapping[str, OutTensor],
              outputs: Mapping[str, TensorInfo]) -> tuple[list[OutTensor], bool] | None:
    """The output tensors checked with `t`: itself, or every member of its requantised weight that
    OUTPUT holds as planned (and whether that is all of them); None when an earlier member checks `t`."""
    assert t.encode is not None
    if not t.encode.format:
        return [t], True
    codec = plan.quant.codec
    found = []
    for role in codec.roles:
        m = planned.get(codec.member_name(t.encode.group, role))
        info = outputs.get(m.name) if m is not None else None
        if m is not None and m.encode is not None and info is not None and (info.dtype, info.shape) == (
                m.dtype, m.shape):
            found.append(m)
    if found[0].name != t.name:
        return None
    return found, len(found) == len(codec.roles)


def check_encoded(t: OutTensor, out: TensorInfo, plan: Plan, source: Any, device: str, reader: Any,
                  report: Any, planned: Mapping[str, OutTensor], outputs: Mapping[str, TensorInfo]) -> None:
    """Check one encoded output tensor, or (on its first member) every member of a requantised weight;
    problems and measured noise std go into `report`."""
    import torch

    assert t.encode is not None
    together = _together(t, plan, planned, outputs)
    if together is None:
        return
    members, complete = together
    tensors = source.tensors
    infos = [outputs[m.name] for m in members]
    offsets = [_offsets(plan, m, tensors) for m in members]

    def read(name: str, offset: int, count: int) -> bytes:
        src = tensors[name]
        return reader.read(src.path, src.start + offset, count)

    measured = []
    for i, part in enumerate(t.parts):
        computing = []
        for k, m in enumerate(members):
            off, n = offsets[k][i]
            if not verbatim(m, m.parts[i], tensors):
                computing.append(k)
                continue
            src_off, _ = m.parts[i].span(tensors[m.parts[i].source].nbytes)
            if reader.read(infos[k].path, infos[k].start + off, n) != read(m.parts[i].source, src_off, n):
                report.problems.append(f"{m.name}: part {i} differs from its source {m.parts[i].source}")
        if not computing:
            continue
        what = (f"{part.source} {'requantised' if t.encode.format else 'converted to ' + t.dtype}"
                + (f" with the recorded noise (seed {plan.seed}, std {part.noise})" if part.noise else ""))
        recompute = not part.noise or device == "cpu"
        wanted = computed(plan, t, i, tensors, read, "cpu", sources=True) if recompute else None
        moments = _Moments() if part.noise and complete else None
        pos = {k: offsets[k][i][0] for k in computing}
        wrong: set[int] = set()
        for chunk in chunks(plan, part, tensors):
            _, want, src = next(wanted) if wanted is not None else (None, None, None)
            got = {}
            for k in computing:
                m = members[k]
                role = m.encode.member if t.encode.format else ""
                n = part_nbytes(plan, m, chunk.part, tensors)
                got[role] = reader.read(infos[k].path, infos[k].start + pos[k], n)
                pos[k] += n
                if want is not None and got[role] != want[role]:
                    wrong.add(k)
            if moments is not None:
                values = _decoded(plan, members, chunk.part, got, tensors)
                if src is None:
                    src = source_values(plan, chunk.part, tensors, read)
                base = src.to(torch.float64) * part.scale
                moments.add(values.to(torch.float64).reshape(-1) - base.reshape(-1))
        for k in sorted(wrong):
            report.problems.append(f"{members[k].name}: part {i} is not {what}")
        if moments is None:
            continue
        std = moments.std()
        measured.append(std)
        drawn_elsewhere = (device != "cpu" and not t.encode.format and moments.n >= 1000
                           and not part.relative and part.reinit is None)
        if drawn_elsewhere and abs(std - part.noise) > 0.1 * part.noise:
            report.problems.append(f"{t.name}: noise std {std:.3g} differs from the recorded {part.noise}")
    if measured:
        report.noise_std[t.encode.group] = sum(measured) / len(measured)


def _decoded(plan: Plan, members: list[OutTensor], part: Any, got: Mapping[str, bytes],
             tensors: Mapping[str, Any]) -> Any:
    """A chunk of the output as floats: the bytes themselves for a float tensor; for a requantised
    weight, its members' bytes decoded together."""
    t = members[0]
    assert t.encode is not None
    if not t.encode.format:
        return from_bytes(got[""], t.dtype, part_shape(plan, t, part, tensors))
    data = {m.encode.member: from_bytes(got[m.encode.member], m.dtype, part_shape(plan, m, part, tensors))
            for m in members if m.encode is not None}
    return plan.quant.codec.dequantize(plan.quant.groups[part.source], data)
