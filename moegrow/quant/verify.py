"""`verify` for encoded tensors (dequantised, converted, requantised): recomputed and compared.

Parts that are byte copies (an original's values and scales under --dtype keep) must equal their
source bytes; computed parts must equal a recomputation bit for bit (noise included where it was
drawn on the CPU); the noise std is measured in dequantised space: the output part decoded (for a
requantised weight, from all its members in OUTPUT) minus the source decoded and scaled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..io import TensorInfo
from ..plan import OutTensor, Plan
from .tensors import from_bytes
from .transform import encoded_part, part_nbytes, part_shape, source_values, verbatim


def _offsets(plan: Plan, t: OutTensor, tensors: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(offset, length) of each part within the output tensor's bytes."""
    spans, pos = [], 0
    for part in t.parts:
        copied = verbatim(t, part, tensors)
        n = part.span(tensors[part.source].nbytes)[1] if copied else part_nbytes(plan, t, part, tensors)
        spans.append((pos, n))
        pos += n
    return spans


def check_encoded(t: OutTensor, out: TensorInfo, plan: Plan, source: Any, device: str, reader: Any,
                  report: Any, planned: Mapping[str, OutTensor], outputs: Mapping[str, TensorInfo]) -> None:
    """Check one encoded output tensor; problems and measured noise std go into `report`."""
    import torch

    assert t.encode is not None
    tensors = source.tensors

    def read(name: str, offset: int, count: int) -> bytes:
        src = tensors[name]
        return reader.read(src.path, src.start + offset, count)

    measured = []
    for i, (part, (off, n)) in enumerate(zip(t.parts, _offsets(plan, t, tensors))):
        got = reader.read(out.path, out.start + off, n)
        if verbatim(t, part, tensors):
            src_off, _ = part.span(tensors[part.source].nbytes)
            if got != read(part.source, src_off, n):
                report.problems.append(f"{t.name}: part {i} differs from its source {part.source}")
            continue
        what = (f"{part.source} {'requantised' if t.encode.format else 'converted to ' + t.dtype}"
                + (f" with the recorded noise (seed {plan.seed}, std {part.noise})" if part.noise else ""))
        if (not part.noise or device == "cpu") and got != encoded_part(plan, t, i, tensors, read, "cpu"):
            report.problems.append(f"{t.name}: part {i} is not {what}")
        if not part.noise:
            continue
        values = _decoded_output(plan, t, i, got, planned, outputs, reader, tensors)
        if values is None:
            continue
        base = source_values(plan, part, tensors, read).to(torch.float64) * part.scale
        diff = values.to(torch.float64).reshape(-1) - base.reshape(-1)
        std = float(diff.std()) if diff.numel() > 1 else float(diff.abs().max())
        measured.append(std)
        drawn_elsewhere = (device != "cpu" and not t.encode.format and diff.numel() >= 1000
                           and not part.relative and part.reinit is None)
        if drawn_elsewhere and abs(std - part.noise) > 0.1 * part.noise:
            report.problems.append(f"{t.name}: noise std {std:.3g} differs from the recorded {part.noise}")
    if measured:
        report.noise_std[t.encode.group] = sum(measured) / len(measured)


def _decoded_output(plan: Plan, t: OutTensor, i: int, got: bytes, planned: Mapping[str, OutTensor],
                    outputs: Mapping[str, TensorInfo], reader: Any, tensors: Mapping[str, Any]) -> Any:
    """Part i of the output, as floats: the bytes themselves for a float tensor; for a requantised
    weight (measured once, on its first member) all its members' parts in OUTPUT, decoded."""
    assert t.encode is not None
    part = t.parts[i]
    if not t.encode.format:
        return from_bytes(got, t.dtype, part_shape(plan, t, part, tensors))
    codec = plan.quant.codec
    if t.encode.member != codec.roles[0]:
        return None
    group = plan.quant.groups[part.source]
    data = {}
    for role in codec.roles:
        member = planned.get(codec.member_name(t.encode.group, role))
        info = outputs.get(member.name) if member is not None else None
        if member is None or info is None or member.encode is None:
            return None
        off, n = _offsets(plan, member, tensors)[i]
        data[role] = from_bytes(reader.read(info.path, info.start + off, n), member.dtype,
                                part_shape(plan, member, member.parts[i], tensors))
    return codec.dequantize(group, data)
