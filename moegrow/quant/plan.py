"""Plans for quantised checkpoints and `--dtype`: plan on the dequantised view, then lower.

The growth planners (moegrow.plan) see a checkpoint index in which every quantised weight is one
float tensor under its dequantised name (`planning_index`): they duplicate, noise and scale it
like any float weight. `lower` then turns their plan back into tensors to write:

- ``--dtype keep``: a weight without noise or scaling stays its members' byte copies (values and
  scales); one with noise becomes one output tensor per member, each part decoded, noised in
  float32 and encoded again (`Encode` names the format and the member); parts that are copies
  (originals) stay byte copies, so originals and their scales are byte-identical.
- ``--dtype bfloat16|float16|float32``: every quantised weight is decoded and written in the
  target dtype (its scales dropped), other float tensors are converted too, except float32 ones
  of a lower-precision source (router correction biases and the like stay float32); the config
  loses `quantization_config` and names the target dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import GrowthError
from ..io import DTYPE_SIZES, FLOAT_DTYPES
from ..plan import Encode, Meta, OutTensor, Part, Plan, TensorMeta, with_fields
from . import CODECS
from .codec import Codec, Member, QuantGroup
from .tensors import TARGETS

DTYPES = ("keep", *TARGETS)
_LOWER_PRECISION = ("BF16", "F16")
# conversions that round no value: source dtype -> targets
_WIDENING = {"BF16": {"F32", "F64"}, "F16": {"F32", "F64"}, "F32": {"F64"}}


@dataclass
class Quantisation:
    """A quantised source: its codec and weights (by dequantised name and by member name)."""

    codec: Codec
    groups: dict[str, QuantGroup]
    by_member: dict[str, QuantGroup] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_member = {m.name: g for g in self.groups.values() for m in g.members}

    def members_of(self, name: str) -> list[Member] | tuple[Member, ...]:
        """A planning-index name's source tensors: a weight's members, or the tensor itself."""
        g = self.groups.get(name)
        return g.members if g is not None else [Member("", name, "", ())]

    def describe(self) -> dict[str, Any]:
        return {**self.codec.describe(), "quantized_tensors": len(self.groups),
                "scale_tensors": sum(len(g.members) - 1 for g in self.groups.values())}


def quantisation(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> Quantisation | None:
    """The source's quantisation, found by the first codec of `CODECS` that accepts it; None if float."""
    for cls in CODECS:
        codec = cls.detect(config, tensors)
        if codec is not None:
            return Quantisation(codec, {g.name: g for g in codec.groups(tensors)})
    return None


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise GrowthError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    return dtype


def lower_precision(tensors: Mapping[str, TensorMeta], quant: Quantisation | None) -> bool:
    """Whether the source stores its float weights below float32 (so that its float32 tensors are
    deliberately float32: correction biases, router weights of some families)."""
    skip = quant.by_member if quant else {}
    return any(t.dtype in _LOWER_PRECISION for n, t in tensors.items() if n not in skip)


def target_of(t: TensorMeta, dtype: str, keep_f32: bool) -> str:
    """The dtype a float tensor (not quantised) is written in under --dtype `dtype`."""
    if dtype == "keep" or t.dtype not in FLOAT_DTYPES:
        return t.dtype
    if t.dtype == "F32" and keep_f32:
        return "F32"
    return TARGETS[dtype]


def planning_index(tensors: Mapping[str, TensorMeta], quant: Quantisation | None,
                   dtype: str) -> dict[str, TensorMeta]:
    """The index the planners see: each quantised weight one float tensor (F32 under --dtype keep, where it
    is never written as such), float tensors in the dtype they will be written in."""
    if quant is None and dtype == "keep":
        return dict(tensors)
    keep_f32 = lower_precision(tensors, quant)
    dropped = set(quant.codec.extras(tensors)) if quant else set()  # `_with_extras` brings them back
    index: dict[str, TensorMeta] = {}
    for name, t in tensors.items():
        g = quant.by_member.get(name) if quant else None
        if name in dropped:
            continue
        if g is None:
            index[name] = Meta(target_of(t, dtype, keep_f32), tuple(t.shape))
        elif name == g.members[0].name:
            index[g.name] = Meta("F32" if dtype == "keep" else TARGETS[dtype], g.shape)
    return index


def lower(plan: Plan, tensors: Mapping[str, TensorMeta], quant: Quantisation | None, dtype: str) -> Plan:
    """The planners' plan (on `planning_index`) as tensors to write; the config and records follow."""
    plan.dtype = dtype
    plan.quant = quant
    if quant is None and dtype == "keep":
        return plan
    if quant is not None:
        plan.dequantised_shapes = {t.name: t.shape for t in plan.tensors}
    out: list[OutTensor] = []
    members: dict[str, tuple[Member, ...]] = {}  # per weight, its members in the codec's role order
    groups = quant.groups if quant is not None else {}
    plain: dict[str, Part] = {}  # see `_copied_weight`
    for t in plan.tensors:
        one = t.parts[0] if len(t.parts) == 1 else None  # most tensors: no generator for them
        if one.source in groups if one is not None else any(p.source in groups for p in t.parts):
            if dtype != "keep":
                out.append(_decoded(t, quant))  # type: ignore[arg-type]
            elif one is not None and one.rows is None and one.is_copy:
                out.extend(_copied_weight(t, quant, members, plain))  # type: ignore[arg-type]
            else:
                out.extend(_lower_weight(t, quant))  # type: ignore[arg-type]
        elif (tensors[one.source].dtype != t.dtype if one is not None
              else any(tensors[p.source].dtype != t.dtype for p in t.parts)):
            out.append(replace(t, encode=Encode(group=t.name)))
        else:
            out.append(t)
    plan.tensors = _with_extras(out, tensors, quant) if quant is not None and dtype == "keep" else out
    if dtype != "keep":
        _rewrite_config(plan, dtype)
        rounded = _rounded(out, tensors, quant)
        if rounded:
            plan.lossy = f"--dtype {dtype} rounds {', '.join(rounded)} weights"
            plan.warnings.append(f"--dtype {dtype}: {', '.join(rounded)} weights are rounded to {dtype}; the "
                                 "output computes the source's function only up to that rounding")
    return plan


def _with_extras(out: list[OutTensor], tensors: Mapping[str, TensorMeta], quant: Quantisation) -> list[OutTensor]:
    """--dtype keep: each format extra (`Codec.extras`: an activation scale...) follows its weight, a byte
    copy of its original's beside every copy of a weight stored as one tensor (the planners never see
    them: an activation scale takes no noise)."""
    extras = quant.codec.extras(tensors)
    if not extras:
        return out
    by_module: dict[str, list[str]] = {}
    for name in extras:
        by_module.setdefault(name.rsplit(".", 1)[0], []).append(name)
    codec, result = quant.codec, []
    for t in out:
        result.append(t)
        values = t.encode is None or t.encode.member == codec.roles[0]
        source = t.parts[0].source if len(t.parts) == 1 and values else ""
        g = quant.groups.get(source) or quant.by_member.get(source)
        if g is None or (t.encode is None and source != g.members[0].name):
            continue
        module, out_module = g.name.rsplit(".", 1)[0], codec.member_name(t.name, "values").rsplit(".", 1)[0]
        if t.encode is None:
            out_module = t.name.rsplit(".", 1)[0]
        for name in by_module.get(module, []):
            new = out_module + name[len(module):]
            result.append(OutTensor(new, tensors[name].dtype, tuple(tensors[name].shape), (Part(name),)))
    return result


def _rounded(out: list[OutTensor], tensors: Mapping[str, TensorMeta], quant: Quantisation | None) -> list[str]:
    """The source dtypes (a quantised weight's: float32, as dequantised) that the conversions round."""
    found = set()
    for t in out:
        for p in t.parts if t.encode is not None and not t.encode.format else ():
            src = "F32" if quant is not None and p.source in quant.groups else tensors[p.source].dtype
            if src != t.dtype and t.dtype not in _WIDENING.get(src, ()):
                found.add(f"dequantised {quant.codec.format}" if p.decode and quant else src)
    return sorted(found)


def _check_axis(t: OutTensor, quant: Quantisation) -> None:
    """Quantised parts join along axis 0 (experts), whole or in runs of whole rows of every member."""
    for p in t.parts:
        g = quant.groups[p.source]
        rows_ok = p.rows is None or all(m.shape[0] == p.rows[2] for m in g.members)
        if t.axis != 0 or (len(t.parts) > 1 and len(g.shape) < 3) or not rows_ok:
            raise GrowthError(f"{g.members[0].name}: a {g.format} weight can only be duplicated whole or "
                              "along its leading (expert) axis")


def _lower_weight(t: OutTensor, quant: Quantisation) -> list[OutTensor]:
    """--dtype keep: one output tensor per member; noised parts requantised, the others byte copies."""
    _check_axis(t, quant)
    codec = quant.codec
    # per part: its group's members by role, whether it is a byte copy, and its decoded form
    # (computed once for every role: a DeepSeek-V3 growth lowers 180,000 weights)
    spec = [({m.role: m for m in quant.groups[p.source].members}, p.is_copy, p) for p in t.parts]
    decoded = [None if copy else with_fields(p, decode=codec.format) for _, copy, p in spec]
    all_copies = all(copy for _, copy, _ in spec)
    out = []
    for role in codec.roles:
        parts: list[Part] = []
        rows = 0
        for (members, is_copy, p), dec in zip(spec, decoded):
            m = members[role]
            rows += m.shape[0] if p.rows is None else p.rows[1] - p.rows[0]
            # a copy of the member stored under the weight's own name (fp8's values) is the part itself
            parts.append((p if m.name == p.source else with_fields(p, source=m.name)) if is_copy else dec)
        m0 = spec[0][0][role]
        shape = (rows, *m0.shape[1:]) if len(t.parts) > 1 or t.parts[0].rows else m0.shape
        encode = None if all_copies else Encode(codec.format, role, t.name)
        out.append(OutTensor(codec.member_name(t.name, role), m0.dtype, shape, tuple(parts), t.axis, encode))
    return out


def _default(p: Part) -> bool:
    """Whether a copied part (is_copy, no rows: the caller's) is `Part(p.source)` field for field, down to the type
    and sign of its noise and scale (which the record writes: 0 and -0.0 are not 0.0 there)."""
    return (not p.relative and p.slices == 1 and type(p.noise) is float and type(p.scale) is float
            and math.copysign(1.0, p.noise) > 0)


def _copied_weight(t: OutTensor, quant: Quantisation, members: dict[str, tuple[Member, ...]],
                   plain: dict[str, Part] | None = None) -> list[OutTensor]:
    """`_lower_weight` of a weight copied whole (the common case: 180,000 for a DeepSeek-V3 growth at noise 0),
    built with a part shared by its member under the weight's own name; `plain`: a plain copy's other members'
    parts (`Part(member)`), made once and shared by every copy of the weight."""
    p = t.parts[0]
    ordered = members.get(p.source)
    if ordered is None:
        by_role = {m.role: m for m in quant.groups[p.source].members}
        ordered = members[p.source] = tuple(by_role[role] for role in quant.codec.roles)
    if t.axis != 0:
        _check_axis(t, quant)
    name = quant.codec.member_name
    if plain is not None and _default(p):
        return [OutTensor(name(t.name, m.role), m.dtype, m.shape,
                          (p if m.name == p.source else plain.get(m.name) or plain.setdefault(m.name, Part(m.name)),),
                          t.axis) for m in ordered]
    return [OutTensor(name(t.name, m.role), m.dtype, m.shape,
                      (p if m.name == p.source else with_fields(p, source=m.name),), t.axis) for m in ordered]


def _decoded(t: OutTensor, quant: Quantisation) -> OutTensor:
    """--dtype float: the weight decoded, every part, and written in the target dtype."""
    _check_axis(t, quant)
    parts = tuple(replace(p, decode=quant.codec.format) for p in t.parts)
    return replace(t, parts=parts, encode=Encode(group=t.name))


def _rewrite_config(plan: Plan, dtype: str) -> None:
    """No `quantization_config`; `dtype` / `torch_dtype` (wherever the config has them) the target."""
    config = copy.deepcopy(plan.config)
    if "quantization_config" in config:
        config = {k: v for k, v in config.items() if k != "quantization_config"}
        plan.config_changes.append("quantization_config: removed (weights dequantised)")
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        if config.get(k) != dtype:
            plan.config_changes.append(f"{k}: {config.get(k)!r} -> {dtype!r}")
            config[k] = dtype
    for sub in config.values():  # a multimodal config's text / vision configs
        if isinstance(sub, dict):
            for k in ("dtype", "torch_dtype"):
                if k in sub:
                    sub[k] = dtype
    plan.config = config


def output_bytes(tensors: Mapping[str, TensorMeta], quant: Quantisation | None) -> dict[str, int]:
    """What each --dtype writes for this checkpoint as it is (no growth), in bytes."""
    sizes = {}
    for dtype in DTYPES:
        total = 0
        for name, t in planning_index(tensors, quant, dtype).items():
            g = quant.groups.get(name) if quant else None
            quantised = g is not None and dtype == "keep"
            metas = [(m.dtype, m.shape) for m in g.members] if quantised else [(t.dtype, t.shape)]
            for dt, shape in metas:
                n = DTYPE_SIZES[dt]
                for d in shape:
                    n *= d
                total += n
        if quant is not None and dtype == "keep":
            for name in quant.codec.extras(tensors):
                n = DTYPE_SIZES[tensors[name].dtype]
                for d in tensors[name].shape:
                    n *= d
                total += n
        sizes[dtype] = total
    return sizes
