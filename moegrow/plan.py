"""Growth plans: pure functions of a source's config and tensor index.

A plan lists every output tensor with the source tensors it is made of (concatenated along axis
0, the expert axis for fused experts and routers) and the noise added to each part, plus the new
config. Nothing is read or written here: the same plan drives `--dry-run`, execution (CPU or
CUDA), the provenance record and `verify`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import Any, Protocol

from .anatomy import Anatomy, analyse, expert_name, layer_name
from .configs import check_moe_layers, rewrite_depth, rewrite_width
from .errors import GrowthError
from .io import DTYPE_SIZES, FLOAT_DTYPES
from .layouts import Layout, lookup
from .neurons import Reinit, check_consistent, check_noise_mode, check_reinit, neuron_axis, refuse_unknown
from .noise import DEFAULT_GENERATOR


class TensorMeta(Protocol):
    dtype: str
    shape: tuple[int, ...]


# slots: a DeepSeek-V3 growth plans 365,000 tensors. Not frozen (but hashed by value, and never changed
# once built: `with_fields` makes changed copies): a frozen dataclass's __init__ is several times slower
# (one object.__setattr__ per field), which was a third of a DeepSeek-V3 plan's CPU time.
_PLAN_DATA = dict(slots=True, unsafe_hash=True)


@dataclass(**_PLAN_DATA)
class Meta:
    dtype: str
    shape: tuple[int, ...]


@dataclass(**_PLAN_DATA)
class Part:
    """A source tensor (or a run of its rows), times `scale`, plus Gaussian noise of std `noise`.

    ``rows`` = (start, stop, of): only rows start..stop of the source's `of` rows along its expert
    axis (every leading dim is 1, so they are one byte range); a segmented duplication takes the
    routed rows and the extra rows (zero or shared experts) of a router as separate parts.
    ``add``: an integer added to every value of an integer tensor (an expert-index table pointing
    at the copies: deepseek_v4's hash routing).
    ``fill``: every value is this constant instead of the source's (identity depth init: 0 for an added
    layer copy's residual writers, 1 for its stream scale); scale and noise then apply to it.
    ``init``: a generated part with no source bytes (`source` is ""): ``zeros``, or ``normal`` (std
    `noise`, drawn on the CPU from the seed and the output tensor's name: regenerated bit for bit by
    verify); it is the only part of its tensor (upcycling's new routers).
    ``decode``: a quantisation format (moegrow.quant): `source` names a quantised weight by its
    dequantised name, whose tensors (values, scales) are decoded to float32 first.
    """

    source: str
    noise: float = 0.0
    scale: float = 1.0
    rows: tuple[int, int, int] | None = None
    add: int = 0
    fill: float | None = None
    init: str = ""
    decode: str = ""
    # --noise-mode relative: the noise std is `noise` times the std of the values it is added to, per
    # expert slice; --reinit: neurons of every slice re-initialised (neurons.Reinit); `slices`: the
    # part's expert slices (a fused tensor's), equal contiguous runs of its bytes
    relative: bool = False
    slices: int = 1
    reinit: Reinit | None = None

    @property
    def is_copy(self) -> bool:
        return (self.noise == 0.0 and self.scale == 1.0 and self.add == 0 and self.fill is None and not self.init
                and not self.decode and self.reinit is None)

    @property
    def needs_device(self) -> bool:
        """Whether making this part is tensor math on a device (noise, scaling, decoding, re-initialising);
        copies, shifts of index tables and plain fills are not."""
        return self.noise != 0.0 or self.scale != 1.0 or bool(self.decode) or self.reinit is not None

    def span(self, nbytes: int) -> tuple[int, int]:
        """(offset, length) of this part's bytes within its source tensor of `nbytes` bytes."""
        if self.rows is None:
            return 0, nbytes
        start, stop, of = self.rows
        row = nbytes // of
        return start * row, (stop - start) * row


@dataclass(**_PLAN_DATA)
class Encode:
    """How an output tensor is written when not in its source's dtype (see moegrow.quant).

    ``format`` "": each part as float32 (decoded, scaled, noised) rounded to the tensor's float
    dtype; else a quantisation format: the tensor is member ``member`` (values, scales...) of a
    requantised weight whose dequantised output name is ``group`` (its noise is seeded by that name,
    so that every member of one copy comes from the same noised data).
    """

    format: str = ""
    member: str = ""
    group: str = ""

    def record(self) -> str:
        return f"{self.format}.{self.member}" if self.format else "cast"


@dataclass(**_PLAN_DATA)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: tuple[Part, ...]
    axis: int = 0  # the parts are concatenated along this axis
    encode: Encode | None = None  # None: the parts' bytes in their own dtype (copied or transformed)

    @property
    def flat(self) -> bool:
        """Concatenating the parts is concatenating their bytes (every dim before `axis` is 1)."""
        return self.axis == 0 or all(d == 1 for d in self.shape[:self.axis])

    @property
    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtype] * math.prod(self.shape)  # asked several times per tensor: in C

    @property
    def is_copy(self) -> bool:
        parts = self.parts  # asked for every tensor, most with one part: no generator for those
        return self.encode is None and (parts[0].is_copy if len(parts) == 1 else all(p.is_copy for p in parts))


@dataclass
class Plan:
    """Everything a growth will do, before it does it."""

    operation: str
    layout: Layout
    source_config: dict[str, Any]
    config: dict[str, Any]
    tensors: list[OutTensor]
    seed: int = 0
    layer_map: list[int] | None = None
    experts: int | None = None   # new routed expert count
    factor: int | None = None
    top_k: str | int | None = None
    noise: float = 0.0
    router_noise: float = 0.0
    config_changes: list[str] = field(default_factory=list)
    exact: bool = True           # claims the same function as the source (at zero noise)
    allow_inexact: bool = False  # --allow-inexact: a family whose width growth cannot be exact
    warnings: list[str] = field(default_factory=list)
    depth_init: str = "copy"     # --depth-init: copy, or identity (added copies' residual writers zeroed)
    upcycle: dict[str, Any] | None = None  # operation upcycle: the dense model_type and the router init
    why_inexact: str = ""                  # why not function-preserving, where a planner knows better
    dtype: str = "keep"          # --dtype: keep, or the float dtype every weight is written in
    quant: Any = None            # moegrow.quant.plan.Quantisation of a quantised source, else None
    lossy: str = ""              # why the --dtype conversion rounds weights, if it does
    # a quantised source: output tensor shapes with each quantised weight as one tensor (parameter counts)
    dequantised_shapes: dict[str, tuple[int, ...]] | None = None
    noise_mode: str = "absolute"  # --noise-mode: relative scales the noise std by each source tensor's std
    reinit: float = 0.0           # --reinit: the fraction of every copy's neurons re-initialised
    selection: dict[int, list[int]] | None = None  # --select: per MoE layer, the experts copied (moegrow.selection)
    select: str = ""                               # --select: load or first
    noise_generator: str = DEFAULT_GENERATOR  # --noise-generator: moegrow.noise.GENERATORS (`torch` for older records)

    @property
    def function_preserving(self) -> bool:
        return (self.exact and not self.lossy and self.noise == 0.0 and self.router_noise == 0.0
                and not self.reinit)

    def preservation(self) -> str:
        """Whether the grown model computes the source's function, and if not, why."""
        if self.function_preserving:
            return "yes (logits equal up to float rounding)"
        if self.why_inexact:
            return f"no ({self.why_inexact})"
        if self.lossy:
            return f"no ({self.lossy})"
        if self.reinit:
            return f"no (--reinit {self.reinit:g} re-initialises neurons of the copies)"
        if self.layer_map is not None and self.depth_init != "identity":
            return "no (depth growth adds layers)"
        if not self.exact:
            return "no (top-k not scaled)" if self.top_k != "scale" else f"no ({self.layout.name} routing)"
        return "no (noise on the copies; exact at --noise 0 --router-noise 0)"

    def sources(self) -> set[str]:
        """The source tensors the plan reads (a quantised weight's members for a decoded part; a filled
        part reads nothing)."""
        names = {p.source for t in self.tensors for p in t.parts if not p.init and p.fill is None}
        if self.quant is not None:  # `quant.members_of`, without a Member made for every tensor not quantised
            groups = self.quant.groups
            names = {m.name for n in names if n in groups for m in groups[n].members} | (names - groups.keys())
        return names

    def filled(self) -> dict[str, Any]:
        """Identity depth init: how many output tensors are set to a constant, and their names relative to
        the layer (expert indices as *), per constant: {"zeroed": {...}, "ones": {...}}."""
        out: dict[str, Any] = {}
        found: dict[float, dict[str, None]] = {0.0: {}, 1.0: {}}  # per constant, the names in plan order
        for t in self.tensors:  # one pass, parts without a fill passed over
            for p in t.parts:
                if p.fill is not None and p.fill in found:
                    # a requantised weight's members count once, by the weight's (dequantised) name
                    found[p.fill][t.encode.group if t.encode is not None else t.name] = None
        for key, value in (("zeroed", 0.0), ("ones", 1.0)):
            names = list(found[value])
            rels = sorted({_EXPERT_INDEX.sub(r"\1*\2", n.removeprefix(self.layout.names.layer_prefix).partition(".")[2])
                           for n in names})
            if names:
                out[key] = {"count": len(names), "tensors": rels}
        return out


_FIELDS: dict[type, Any] = {}


def with_fields(obj: Any, **changes: Any) -> Any:
    """`dataclasses.replace` for the plan's dataclasses, without its per-call introspection
    (a fifth of the time: a DeepSeek-V3 growth replaces 700,000 parts)."""
    cls = type(obj)
    values = _FIELDS.get(cls)
    if values is None:  # every field's value at once, as a tuple (operator.attrgetter: in C)
        values = _FIELDS[cls] = attrgetter(*(f.name for f in fields(cls)))
    new = cls(*values(obj))
    for n, v in changes.items():
        object.__setattr__(new, n, v)
    return new


_NUM = re.compile(r"(\d+)")
_EXPERT_INDEX = re.compile(r"(\.|^)\d+(\.)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort layers.10 after layers.9."""
    pieces: list[object] = _NUM.split(name)  # the digit runs at odd positions (the captured separators)
    pieces[1::2] = map(int, pieces[1::2])  # type: ignore[arg-type]
    return tuple(pieces)


# ---------------------------------------------------------------------------------------------
# Depth


def parse_layers(spec: str, n_old: int) -> int:
    """`2x` (a factor) or `N` (a layer count) -> the new layer count."""
    s = spec.strip().lower()
    try:
        n_new = n_old * int(s[:-1]) if s.endswith("x") else int(s)
    except ValueError:
        raise GrowthError(f"--layers must be a factor like 2x or a layer count, not {spec!r}") from None
    if n_new < n_old:
        raise GrowthError(f"--layers {spec} gives {n_new} layers, fewer than the source's {n_old}")
    return n_new


def layer_map_for(method: str, n_old: int, n_new: int) -> list[int]:
    """interpose: new layer i copies old floor(i * n_old / n_new) (0,0,1,1,...);
    stack: new layer i copies old i mod n_old (0,1,2,0,1,2)."""
    if method == "interpose":
        return [i * n_old // n_new for i in range(n_new)]
    if method == "stack":
        return [i % n_old for i in range(n_new)]
    raise GrowthError(f"--method must be 'interpose' or 'stack', not {method!r}")


def parse_layer_map(text: str, n_old: int) -> list[int]:
    try:
        layer_map = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise GrowthError(f"--layer-map must be comma-separated layer indices, not {text!r}") from None
    if not layer_map:
        raise GrowthError("--layer-map is empty")
    bad = [m for m in layer_map if not 0 <= m < n_old]
    if bad:
        raise GrowthError(f"--layer-map names layer {bad[0]}, but the source has layers 0..{n_old - 1}")
    if len(layer_map) < n_old:
        raise GrowthError(f"--layer-map has {len(layer_map)} layers, fewer than the source's {n_old}")
    return layer_map


_FIRST_NUMBER = re.compile(r"(\D*)(\d+)")


def natural_key_cached(name: str, tails: dict[str, tuple[object, ...]]) -> tuple[object, ...]:
    """`natural_key(name)`, the key of what follows its first number (a layer index) kept in `tails`."""
    m = _FIRST_NUMBER.match(name)
    if m is None:
        return natural_key(name)
    rest = name[m.end():]
    tail = tails.get(rest)
    if tail is None:
        tail = tails[rest] = natural_key(rest)
    return (m.group(1), int(m.group(2)), *tail)


def _ordered(tensors: list[OutTensor]) -> list[OutTensor]:
    """By `natural_key`, each name's key after its first number worked out once per text: a DeepSeek-V3 plan
    repeats the same 3,000 in every layer."""
    tails: dict[str, tuple[object, ...]] = {}
    return sorted(tensors, key=lambda t: natural_key_cached(t.name, tails))


def _check_first_layer(layout: Layout, layer_map: Sequence[int]) -> None:
    """Refuse a map that moves layer 0 (which lacks `not_in_first_layer` tensors) or moves another
    layer to position 0."""
    if not layout.depth.not_in_first_layer:
        return
    bad = next((j for j, m in enumerate(layer_map) if (m == 0) != (j == 0)), None)
    if bad is not None:
        what = "a copy of layer 0" if layer_map[bad] == 0 else f"a copy of layer {layer_map[bad]}"
        raise GrowthError(f"{layout.name}: layer 0 has no {', '.join(layout.depth.not_in_first_layer)} and every "
                          f"later layer has one, so this layer map (new layer {bad} = {what}) would load with "
                          f"a missing or unexpected tensor")


DEPTH_INITS = ("copy", "identity")


def added_copies(layer_map: Sequence[int]) -> list[int]:
    """New layers that are added copies: every occurrence of a source layer after its first (the original)."""
    seen: set[int] = set()
    added = []
    for j, m in enumerate(layer_map):
        if m in seen:
            added.append(j)
        seen.add(m)
    return added


def check_identity(config: Mapping[str, Any], layout: Layout, layer_map: Sequence[int], n_old: int) -> None:
    """Refuse `--depth-init identity` where zeroed copies cannot leave the source's function intact: a family
    whose layer is not x + f(x), a map that reorders the originals, or a layer reusing an added copy's state."""
    residual = layout.residual
    text = layout.text(config)
    if residual.refused:
        raise GrowthError(f"{layout.name}: --depth-init identity is not supported: {residual.refused}")
    for key, why in residual.refused_keys:
        if lookup(text, key):
            raise GrowthError(f"{layout.name}: --depth-init identity with {key}={lookup(text, key)!r} is not "
                              f"supported: {why}")
    firsts = [m for j, m in enumerate(layer_map) if j not in set(added_copies(layer_map))]
    if firsts != list(range(n_old)):
        raise GrowthError(f"--depth-init identity: the first occurrence of each source layer stays the original, "
                          f"so the map must hold every layer 0..{n_old - 1} first in order; this one's first "
                          f"occurrences are {','.join(map(str, firsts))}")
    added = set(added_copies(layer_map))
    for dk in layout.depth.depth_keys:
        values = lookup(text, dk.key)
        if dk.kind != "per_layer_reuse" or not isinstance(values, list):
            continue
        for j, m in enumerate(layer_map):
            if j in added or values[m] != dk.reuses:
                continue
            i = next((i for i in range(j - 1, -1, -1) if values[layer_map[i]] != dk.reuses), None)
            if i is not None and i in added:
                raise GrowthError(f"{layout.name}: --depth-init identity with {dk.key}: new layer {j} (layer {m}, "
                                  f"{dk.reuses!r}) would reuse new layer {i}, an added copy of layer "
                                  f"{layer_map[i]} that sees another input (stacking keeps the originals together)")


def _init_part(name: str, rel: str, t: TensorMeta, layout: Layout) -> Part:
    """An added copy's part under identity init: residual writers zeroed, stream scales set to 1."""
    if layout.residual.is_writer(rel):
        return Part(name, fill=0.0)
    if layout.residual.is_one(rel):
        if t.dtype not in FLOAT_DTYPES:
            raise GrowthError(f"{name}: --depth-init identity sets it to 1, which dtype {t.dtype} cannot hold")
        return Part(name, fill=1.0)
    return Part(name)


def plan_depth(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta], layout: Layout,
               layer_map: Sequence[int], init: str = "copy") -> Plan:
    if layout.depth.depth_refused:
        raise GrowthError(f"{layout.name}: depth growth is not supported: {layout.depth.depth_refused}")
    if init not in DEPTH_INITS:
        raise GrowthError(f"--depth-init must be 'copy' or 'identity', not {init!r}")
    anatomy = analyse({n: t.shape for n, t in tensors.items()}, config, layout)
    check_moe_layers(config, layout, anatomy.moe_layers)
    _check_first_layer(layout, layer_map)
    text = layout.text(config)
    for key, why in layout.depth.depth_refused_keys:
        if lookup(text, key):
            raise GrowthError(f"{layout.name}: depth growth with {key}={lookup(text, key)!r} is not supported: {why}")
    new_config, changed = rewrite_depth(config, layout, layer_map, anatomy.moe_layers)
    n_old, n_new = anatomy.num_layers, len(layer_map)
    identity = set(added_copies(layer_map)) if init == "identity" else set()
    if init == "identity":
        check_identity(config, layout, layer_map, n_old)
    targets: dict[int, list[int]] = {}
    for j, m in enumerate(layer_map):
        targets.setdefault(m, []).append(j)
    for x in anatomy.extra_layers:  # MTP layers: out of the interposition, renumbered after
        targets[x] = [n_new + (x - n_old)]
    out: list[OutTensor] = []
    for name, t in tensors.items():
        role = anatomy.roles[name]
        if role.layer is None or role.mtp:  # MTP layers under their own prefix stay as they are
            out.append(OutTensor(name, t.dtype, t.shape, (Part(name),)))
            continue
        rel = name[len(layout.names.layer_prefix):].partition(".")[2]
        for j in targets.get(role.layer, []):
            part = _init_part(name, rel, t, layout) if j in identity else Part(name)
            out.append(OutTensor(layer_name(layout, j, rel), t.dtype, t.shape, (part,)))
    changes = [f"{k}: {lookup(config, k)!r} -> {lookup(new_config, k)!r}" for k in changed]
    # Copied layers add to the residual stream: only identity init (zeroed residual writers) keeps the function.
    plan = Plan("grow-depth", layout, dict(config), new_config, _ordered(out),
                layer_map=list(layer_map), config_changes=changes, exact=init == "identity", depth_init=init)
    if identity:
        _check_zeroed(plan, sorted(identity))
    if layout.depth.index_dependent_layers and any(j != m for j, m in enumerate(layer_map)):
        plan.warnings.append(f"{layout.name}: {layout.depth.index_dependent_layers}: a layer copied to another index "
                             "does not compute its original's function")
    if anatomy.extra_layers:
        plan.warnings.append(
            f"layers {list(anatomy.extra_layers)} lie after the {n_old} decoder layers (MTP); "
            f"they are renumbered to start at {n_new}, and transformers ignores them on load")
    n_mtp = sum(r.mtp for r in anatomy.roles.values())
    if n_mtp:
        plan.warnings.append(
            f"{n_mtp} MTP tensors under {layout.names.mtp_prefix} are copied unchanged (they are not decoder layers: "
            f"not interposed, not renumbered); transformers ignores them on load")
    return plan


def _check_zeroed(plan: Plan, added: list[int]) -> None:
    """Every added copy must have a zeroed residual writer: none found means the layout's data misses this
    checkpoint's names (a copy left as it is would change the function)."""
    prefix = plan.layout.names.layer_prefix
    zeroed = {int(t.name[len(prefix):].partition(".")[0]) for t in plan.tensors
              if t.name.startswith(prefix) and any(p.fill == 0.0 for p in t.parts)}
    missing = [j for j in added if j not in zeroed]
    if missing:
        raise GrowthError(f"{plan.layout.name}: --depth-init identity found no residual writer to zero in new layer "
                          f"{missing[0]} (a copy of layer {plan.layer_map[missing[0]] if plan.layer_map else '?'}; "
                          f"looked for {', '.join(plan.layout.residual.writers)})")


# ---------------------------------------------------------------------------------------------
# Width


def parse_experts(spec: str, n_old: int) -> int:
    """`2x` (a factor) or `N` (an expert count, a multiple of the source's) -> the factor."""
    s = spec.strip().lower()
    try:
        if s.endswith("x"):
            factor = int(s[:-1])
        else:
            n_new = int(s)
            if n_new % n_old:
                raise GrowthError(f"--experts {n_new} is not a multiple of the source's {n_old} experts")
            factor = n_new // n_old
    except ValueError:
        raise GrowthError(f"--experts must be a factor like 2x or an expert count, not {spec!r}") from None
    if factor < 1:
        raise GrowthError(f"--experts {spec} would shrink the model; only growth is supported")
    return factor


_INT_MAX = {"I8": 2**7 - 1, "U8": 2**8 - 1, "I16": 2**15 - 1, "U16": 2**16 - 1, "I32": 2**31 - 1,
            "U32": 2**32 - 1, "I64": 2**63 - 1, "U64": 2**64 - 1}

# quantised checkpoints' per-expert scales (DeepSeek-V3 fp8 `weight_scale_inv`, MXFP4 `*_scales`)
_QUANT_SUFFIXES = ("_scale_inv", "_scales", "weight_scale", "input_scale", "_blocks")


def _check_noise(name: str, t: TensorMeta, std: float, what: str = "add noise to") -> None:
    """Noise (or scaling) needs float values: quantised weights and their scales are refused."""
    if not std:
        return
    if t.dtype not in FLOAT_DTYPES:
        quant = "quantised " if t.dtype.startswith(("F8", "F4", "U8", "I8")) else ""
        raise GrowthError(f"cannot {what} {name}: dtype {t.dtype} is not a float type ({quant}weights cannot "
                          f"take noise or scaling; grow with --noise 0, or dequantise first)")
    if name.endswith(_QUANT_SUFFIXES):
        raise GrowthError(f"cannot {what} {name}: it is a quantisation scale or block tensor (quantised "
                          f"weights cannot take noise or scaling; grow with --noise 0, or dequantise first)")


def _widened_table(name: str, t: TensorMeta, e_old: int, factor: int, k_old: int, k_new: int) -> OutTensor:
    """A token -> expert table [..., k] as [t, t + E, ...]: each token picks every copy of its experts."""
    if k_new != k_old * factor:
        raise GrowthError(f"{name}: an expert table {k_old} wide can follow top-k {k_old} -> "
                          f"{k_old * factor} (--top-k scale) or stay (--top-k keep), not -> {k_new}")
    if t.dtype not in _INT_MAX:
        raise GrowthError(f"{name}: an expert-index table must hold integers, not {t.dtype}")
    if e_old * factor - 1 > _INT_MAX[t.dtype]:
        raise GrowthError(f"{name}: {t.dtype} cannot hold expert index {e_old * factor - 1}")
    shape = (*t.shape[:-1], t.shape[-1] * factor)
    parts = tuple(Part(name, add=c * e_old) for c in range(factor))
    return OutTensor(name, t.dtype, shape, parts, axis=len(t.shape) - 1)


def plan_width(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta], layout: Layout,
               factor: int, *, noise: float = 0.0, router_noise: float = 0.0, seed: int = 0,
               top_k: str | int = "scale", allow_inexact: bool = False, noise_mode: str = "absolute",
               reinit: float = 0.0, origin: Mapping[str, str] | None = None) -> Plan:
    """`origin`: where each tensor of `tensors` really comes from (plan_grow's deepened index), so that
    parts name their source tensors directly."""
    relative = check_noise_mode(noise_mode) == "relative"
    check_reinit(reinit)
    if layout.width.width_refused:
        raise GrowthError(f"{layout.name}: width growth is not supported: {layout.width.width_refused}")
    if not layout.width.exact_width and not allow_inexact:
        raise GrowthError(f"{layout.name}: width growth cannot preserve this family's function "
                          f"({layout.width.inexact_reason}); pass --allow-inexact to grow it anyway")
    for flag, std in (("--noise", noise), ("--router-noise", router_noise)):
        if not (math.isfinite(std) and std >= 0):
            raise GrowthError(f"{flag}: the noise std must be a finite number >= 0, not {std}")
    anatomy = analyse({n: t.shape for n, t in tensors.items()}, config, layout)
    check_moe_layers(config, layout, anatomy.moe_layers)
    new_config, changes = rewrite_width(config, layout, factor, top_k)
    e_old = anatomy.num_experts
    # tensors scaled by 1/factor, originals included (only where exactness claims it)
    text = layout.text(config)  # a multimodal config: its text decoder's
    rules = [r for r in layout.width.tensor_rules if top_k == "scale" and r.applies(text)] if factor > 1 else []
    scaled = {r.rel: r.scale(text, factor) for r in rules}
    segments = layout.segment_counts(text)
    starts = [sum(segments[:s]) for s in range(len(segments))]
    k_old = layout.top_k(text)
    k_new = int(lookup(layout.text(new_config), layout.config_key(text, layout.counts.top_k_keys, "top-k")))

    segment_of = [max(i for i, start in enumerate(starts) if start <= e) for e in range(sum(segments))]

    def new_index(e: int, c: int) -> int:
        """Expert slot e's copy c: every segment keeps its slots together, copies after originals."""
        s = segment_of[e] if e < len(segment_of) else max(i for i, start in enumerate(starts) if start <= e)
        return starts[s] * factor + c * segments[s] + (e - starts[s])

    out: list[OutTensor] = []
    for name, t in tensors.items():
        role = anatomy.roles[name]
        src = origin[name] if origin is not None else name
        scale = scaled.get(role.rel, 1.0) if role.kind in ("expert", "fused", "router_bias") else 1.0
        if scale != 1.0:
            _check_noise(name, t, scale, f"scale by {scale:.6g}")
        if role.kind == "expert":
            assert role.layer is not None and role.expert is not None
            _check_noise(name, t, noise)
            for c in range(factor):
                new = expert_name(layout, role.layer, new_index(role.expert, c), role.rel, role.prefix)
                part = Part(src, noise if c else 0.0, scale)
                if c and (relative or reinit):  # else `_recipe` gives the part as it is
                    part = _recipe(part, name, t, layout, role, c, relative, reinit, 1, role.expert)
                out.append(OutTensor(new, t.dtype, t.shape, (part,)))
        elif role.kind in ("fused", "router", "router_bias"):
            std = {"fused": noise, "router": router_noise}.get(role.kind, 0.0)
            _check_noise(name, t, std)
            axis = layout.axis_of(role.rel)  # leading dims are 1 (checked) but for `inner_axis`: joined through torch
            n = t.shape[axis]
            per = layout.rows_per_expert(text, role.rel)  # rows per slot
            if layout.segment_of(role.rel) is None and n == sum(segments) * per != e_old * per:
                if any(d != 1 for d in t.shape[:axis]):
                    raise GrowthError(f"{name}: segments of expert slots along an inner axis cannot be duplicated")
                parts = tuple(_recipe(Part(src, std if c else 0.0, scale, (start * per, (start + count) * per, n)),
                                      name, t, layout, role, c, relative, reinit, count, start)
                              for start, count in zip(starts, segments) if count for c in range(factor))
            else:  # routed experts only, or one extra segment only: duplicated whole
                slots = n // per if all(d == 1 for d in t.shape[:axis]) else 1
                parts = tuple(_recipe(Part(src, std if c else 0.0, scale), name, t, layout, role, c, relative,
                                      reinit, slots, 0) for c in range(factor))
            shape = tuple(d * factor if i == axis else d for i, d in enumerate(t.shape))
            out.append(OutTensor(name, t.dtype, shape, parts, axis))
        elif role.rel in layout.axes.expert_tables and role.layer is not None and k_new != k_old:
            table = _widened_table(name, t, e_old, factor, k_old, k_new)
            out.append(table if src == name else
                       with_fields(table, parts=tuple(with_fields(p, source=src) for p in table.parts)))
        else:
            out.append(OutTensor(name, t.dtype, t.shape, (Part(src),)))
    if reinit:
        check_consistent(out, layout.name)
    exact = layout.width.exact_width and top_k == "scale"
    plan = Plan("grow-width", layout, dict(config), new_config, _ordered(out), seed=seed,
                experts=e_old * factor, factor=factor, top_k=top_k, noise=noise,
                router_noise=router_noise, config_changes=changes, exact=exact, allow_inexact=allow_inexact,
                noise_mode=noise_mode, reinit=reinit)
    if top_k != "scale":
        plan.warnings.append(f"--top-k {top_k}: the grown model does not compute the source's "
                             "function (only --top-k scale preserves it)")
    if not layout.width.exact_width:
        plan.warnings.append(f"--allow-inexact: the result is not function-preserving: {layout.name} "
                             f"{layout.width.inexact_reason}")
    for r in rules:
        by = f"1/{factor}" if scaled[r.rel] == 1.0 / factor else f"{scaled[r.rel]:.6g}"
        plan.config_changes.append(f"tensors *.{r.rel}: scaled by {by} ({r.why})")
        plan.warnings.append(f"originals are not byte-identical: every {r.rel} (originals and copies) is "
                             f"scaled by {by} because {r.why}")
    return plan


def _recipe(part: Part, name: str, t: TensorMeta, layout: Layout, role: Any, copy: int, relative: bool,
            reinit: float, slices: int, first: int) -> Part:
    """A copy's part under --noise-mode relative and --reinit (originals, copy 0, stay as they are).

    `slices`: the expert slots the part holds (a fused or router tensor's), `first` the first one's index."""
    if copy == 0:
        return part
    rein = _reinit_of(name, t, layout, role, copy, reinit, slices, first) if reinit else None
    rel = relative and part.noise > 0
    if not rel and rein is None:
        return part
    return with_fields(part, relative=rel, slices=slices, reinit=rein)


def _reinit_of(name: str, t: TensorMeta, layout: Layout, role: Any, copy: int, fraction: float, slices: int,
               first: int) -> Reinit | None:
    """Where --reinit re-initialises neurons of a copy of `name` (None: a bias or router, copied as it is)."""
    if role.kind not in ("expert", "fused") or len(t.shape) < 2 or "bias" in role.rel.rsplit(".", 1)[-1]:
        return None
    fused = role.kind == "fused"
    found = neuron_axis(layout, role.rel, fused)
    shape = tuple(t.shape[1:]) if fused else tuple(t.shape)
    if found is None or (fused and (layout.axis_of(role.rel) != 0 or t.shape[0] != slices)):
        raise refuse_unknown(layout.name, name)
    _check_noise(name, t, fraction, "re-initialise neurons of")
    axis, pairing = found
    return Reinit(fraction, shape, axis, pairing, role.layer, first, copy)


def plan_grow(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta], layout: Layout,
              layer_map: Sequence[int], factor: int, init: str = "copy", **width: Any) -> Plan:
    """Depth then width in one plan: the same bytes as grow-depth followed by grow-width."""
    depth = plan_depth(config, tensors, layout, layer_map, init)
    virtual = {t.name: Meta(t.dtype, t.shape) for t in depth.tensors}
    origin = {t.name: t.parts[0].source for t in depth.tensors}
    fill = {t.name: t.parts[0].fill for t in depth.tensors}  # identity init: the width copies of a zeroed tensor
    if all(f is None for f in fill.values()):  # parts name the origins directly (no second pass)
        plan = plan_width(depth.config, virtual, layout, factor, origin=origin, **width)
    else:
        plan = plan_width(depth.config, virtual, layout, factor, **width)
        plan.tensors = [
            OutTensor(t.name, t.dtype, t.shape,
                      tuple(with_fields(p, source=origin[p.source], fill=fill[p.source]) for p in t.parts), t.axis)
            for t in plan.tensors
        ]
    plan.operation = "grow"
    plan.depth_init = init
    # the width part is exact relative to the deepened model, which is the source's function with identity init
    plan.exact = depth.exact and plan.exact
    plan.source_config = dict(config)
    plan.layer_map = depth.layer_map
    plan.config_changes = depth.config_changes + plan.config_changes
    plan.warnings = depth.warnings + plan.warnings
    return plan


# ---------------------------------------------------------------------------------------------
# Parameter counts (as transformers counts them: parameters, not buffers; no MTP layers)


def param_counts(shapes: Mapping[str, tuple[int, ...]], anatomy: Anatomy, layout: Layout,
                 top_k: int) -> tuple[int, int]:
    """(total, active per token) parameters of a checkpoint."""
    total = 0
    inactive = 0.0
    frac = 1 - top_k / anatomy.num_experts
    for name, shape in shapes.items():
        role = anatomy.roles[name]
        if role.mtp or (role.layer is not None and role.layer >= anatomy.num_layers):
            continue
        if role.rel in layout.names.buffers:
            continue
        n = 1
        for d in shape:
            n *= d
        total += n
        if role.kind in ("expert", "fused"):
            inactive += n * frac
    return total, total - round(inactive)
