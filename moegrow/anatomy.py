"""What each tensor of a checkpoint is, read off its name through the family's layout.

Roles: ``global`` (outside the decoder layers), ``layer`` (a layer's non-MoE tensor),
``expert`` (one expert's tensor, per-expert on disk), ``fused`` (all experts, expert axis 0),
``router`` (router weight, one row per expert), ``router_bias`` (one entry per expert).

Multi-token-prediction (MTP) weights stored under a separate prefix (``Names.mtp_prefix``, e.g.
``mtp.``) are marked ``mtp``; the MTP layers under it (``mtp.layers.N.``) are classified relative to
that prefix exactly as decoder layers are (so width growth widens their experts and routers), while
their layer indices count MTP layers, not decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .layouts import Layout


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see plan._PLAN_DATA
class Role:
    kind: str
    layer: int | None = None
    expert: int | None = None
    rel: str = ""  # name relative to the layer prefix (for per-expert: after the expert index)
    prefix: str = ""  # the layer prefix the layer was found under ("" for global tensors)
    mtp: bool = False  # under the layout's mtp_prefix: an MTP weight, outside the decoder (not loaded)


def classify(name: str, layout: Layout) -> Role:
    return classifier(layout)(name)


def classifier(layout: Layout) -> Callable[[str], Role]:
    """`classify` for many names: the layout read once, and the role of each name relative to its layer
    worked out once (a DeepSeek-V3 index repeats the same 1,550 relative names in every layer)."""
    names = layout.names
    mtp_prefix, mtp_layer_prefix, layer_prefix = names.mtp_prefix, layout.mtp_layer_prefix, names.layer_prefix
    experts_prefix = names.experts_prefix
    fused, routers, biases = names.fused_experts, names.router_weights, names.router_biases
    rels: dict[str, tuple[str, int | None, str]] = {}

    def of_rel(rel: str) -> tuple[str, int | None, str]:
        if rel.startswith(experts_prefix):
            e, dot2, tail = rel[len(experts_prefix):].partition(".")
            if dot2 and e.isdigit():
                return "expert", int(e), tail
        kind = ("fused" if rel in fused else "router" if rel in routers else "router_bias" if rel in biases
                else "layer")
        return kind, None, rel

    def role(name: str) -> Role:
        mtp = bool(mtp_prefix) and name.startswith(mtp_prefix)
        prefix = mtp_layer_prefix if mtp else layer_prefix
        if not name.startswith(prefix):
            return Role("global", rel=name, mtp=mtp)
        idx, dot, rel = name[len(prefix):].partition(".")
        if not (dot and idx.isdigit()):
            return Role("global", rel=name, mtp=mtp)
        found = rels.get(rel)
        if found is None:
            found = rels[rel] = of_rel(rel)
        return Role(found[0], int(idx), found[1], found[2], prefix, mtp)

    return role


def layer_name(layout: Layout, layer: int, rel: str, prefix: str = "") -> str:
    """A layer tensor's name; `prefix` (a Role's) defaults to the decoder layers'."""
    return f"{prefix or layout.names.layer_prefix}{layer}.{rel}"


def expert_name(layout: Layout, layer: int, expert: int, tail: str, prefix: str = "") -> str:
    """An expert tensor's name; `prefix` (a Role's) defaults to the decoder layers'."""
    return f"{prefix or layout.names.layer_prefix}{layer}.{layout.names.experts_prefix}{expert}.{tail}"


@dataclass(frozen=True)
class Anatomy:
    """A checkpoint's structure: layers, which of them are MoE, experts per MoE layer."""

    roles: dict[str, Role]
    num_layers: int               # decoder layers per config
    layer_ids: tuple[int, ...]    # every decoder-prefix layer index with tensors (model.layers.{L} MTP included)
    moe_layers: tuple[int, ...]
    num_experts: int
    # MTP layers under the layout's mtp_prefix (indices count MTP layers), and those with experts
    mtp_layers: tuple[int, ...] = ()
    mtp_moe_layers: tuple[int, ...] = ()

    @property
    def extra_layers(self) -> tuple[int, ...]:
        """Layers stored after the decoder stack (multi-token-prediction layers)."""
        return tuple(i for i in self.layer_ids if i >= self.num_layers)


def _dim0(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 0


def _expert_dim(name: str, shape: tuple[int, ...], axis: int, where: str, inner: bool = False) -> int:
    """The size of a tensor's expert axis; an axis past 0 only where every leading dim is 1, unless
    the layout joins the tensor's copies through torch (`inner`: `ExpertAxis.inner_axis`)."""
    if axis == 0:
        return _dim0(shape)
    if inner and len(shape) > axis:
        return shape[axis]
    if len(shape) <= axis or any(d != 1 for d in shape[:axis]):
        raise ConfigError(f"{where}: {name} has shape {list(shape)}; its expert axis {axis} needs every "
                          f"dim before it to be 1 (moegrow concatenates copies as bytes)")
    return shape[axis]


def _lookup(config: Mapping[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):  # a dotted key reaches into nested dicts
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# What a layer-indexed config key of each kind must hold (kinds not listed are not checked here).
_DEPTH_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "count": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "prefix_count": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "suffix_count": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "per_layer_dict": ("a dict keyed by layer index", lambda v: isinstance(v, dict)),
    "dense_prefix": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "sparse_step": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "index_list": ("a list of layer indices", lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "index_list_1based": ("a list of layer indices",
                          lambda v: isinstance(v, list) and all(map(_is_int, v))),
    "per_layer": ("a list", lambda v: isinstance(v, list)),
    "per_layer_reuse": ("a list", lambda v: isinstance(v, list)),
    "moe_types": ("a list", lambda v: isinstance(v, list)),
    "moe_range": ("an integer layer index", _is_int),
    "period": ("a positive integer", lambda v: _is_int(v) and v >= 1),
}


def check_config(config: Mapping[str, Any], layout: Layout, where: str = "config.json") -> None:
    """Refuse config values of the wrong type before anything computes with them.

    The layer, expert and top-k counts must be positive integers (top-k at most the expert
    count; a layer count given by a per-layer list must not be empty), every layer-indexed key
    the layout rewrites must have its kind's type, and every width-rule key must be a number.
    """
    config = layout.text(config)  # a multimodal config: its text decoder's
    counts = {}
    checks = [(layout.counts.experts_keys, "expert count"), (layout.counts.top_k_keys, "top-k")]
    list_key = layout.layers_list_key(config) if hasattr(layout, "layers_list_key") else None
    if list_key is None:
        checks.insert(0, (layout.counts.layers_keys, "layer count"))
    elif not config[list_key]:
        raise ConfigError(f"{where}: {list_key} (one entry per layer) is empty")
    for aliases, what in checks:
        if what == "layer count" and layout.layers_list_key(config) is not None:
            continue  # the length of a per-layer list (see Counts.layers_list_keys)
        key = layout.config_key(config, aliases, what)
        value = _lookup(config, key)
        if not (_is_int(value) and value >= 1):
            raise ConfigError(f"{where}: {key} (the {what}) must be a positive integer, not {value!r}")
        counts[what] = (key, value)
    (kkey, k), (ekey, e) = counts["top-k"], counts["expert count"]
    if k > e:
        raise ConfigError(f"{where}: {kkey}={k} is more than the {e} experts ({ekey})")
    for dk in layout.depth.depth_keys:
        value = _lookup(config, dk.key)
        rule = _DEPTH_KINDS.get(dk.kind)
        if value is not None and rule is not None and not rule[1](value):
            raise ConfigError(f"{where}: {dk.key} must be {rule[0]}, not {value!r}")
    for wr in layout.width.width_rules:
        for key in getattr(wr, "keys", (wr.key,)):
            value = config.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{where}: {key} must be a number, not {value!r}")


def analyse(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], layout: Layout,
            where: str = "config.json") -> Anatomy:
    """Classify every tensor and check that config and tensors agree on layers and experts."""
    config = layout.text(config)  # a multimodal config: its text decoder's
    check_config(config, layout, where)
    role = classifier(layout)
    roles = {name: role(name) for name in shapes}
    num_layers = layout.num_layers(config)
    num_experts = layout.num_experts(config)
    layer_ids = sorted({r.layer for r in roles.values() if r.layer is not None and not r.mtp})
    mtp_layers = sorted({r.layer for r in roles.values() if r.layer is not None and r.mtp})
    segments = layout.segment_counts(config)  # [routed, *extra slots (zero / shared experts)]
    slots = sum(segments)
    experts_in: dict[tuple[bool, int], set[int]] = {}  # keyed by (mtp, layer)
    for name, r in roles.items():
        if r.kind == "expert":
            experts_in.setdefault((r.mtp, r.layer), set()).add(r.expert)  # type: ignore[arg-type]
        elif r.kind in ("fused", "router", "router_bias"):
            n = _expert_dim(name, shapes[name], layout.axis_of(r.rel), where, r.rel in layout.axes.inner_axis)
            rows = layout.rows_per_expert(config, r.rel)
            if n % rows:
                raise ConfigError(f"{where}: {name} has {n} rows, not a multiple of {layout.axes.rows_per_expert_key}"
                                  f"={rows} (the rows of one expert)")
            n //= rows
            segment = layout.segment_of(r.rel)
            if segment is not None:  # one extra segment only (fused shared experts)
                if n != segments[segment]:
                    key = layout.axes.expert_segments[segment - 1]
                    raise ConfigError(f"{where}: says {key}={segments[segment]} but {name} has {n} rows")
                continue
            if r.kind == "fused":
                experts_in.setdefault((r.mtp, r.layer), set()).update(range(n))  # type: ignore[arg-type]
            if n != num_experts and n != slots:
                extra = f" (or {slots} with {', '.join(layout.axes.expert_segments)})" if slots != num_experts else ""
                raise ConfigError(f"{where}: says {num_experts} experts{extra} but {name} has {n} rows")
    for (mtp, layer), found in sorted(experts_in.items()):
        if found != set(range(num_experts)) and found != set(range(slots)):
            label = f"{layout.mtp_layer_prefix}{layer}" if mtp else f"layer {layer}"
            raise ConfigError(f"{where}: says {num_experts} experts but {label} has "
                              f"{len(found)} (indices {min(found)}..{max(found)})")
    decoder = [i for i in layer_ids if i < num_layers]
    if len(decoder) != num_layers:  # decoder is sorted, unique and below num_layers
        missing = next(i for i in range(num_layers) if i >= len(decoder) or decoder[i] != i)
        raise ConfigError(f"{where}: says {num_layers} layers but the tensors lack layer {missing}")
    extra = [i for i in layer_ids if i >= num_layers]
    mtp = config.get("num_nextn_predict_layers", config.get("num_mtp_layers"))
    if extra and not (_is_int(mtp) and mtp >= len(extra)):
        raise ConfigError(f"{where}: says {num_layers} layers but the tensors also have layer "
                          f"{extra[0]}{' and more' if len(extra) > 1 else ''} (only "
                          f"num_nextn_predict_layers may declare layers after the decoder layers)")
    if not experts_in:
        raise ConfigError(f"{where}: no expert tensors found (expected names like "
                          f"{layout.names.layer_prefix}N.{layout.names.experts_prefix}E.*): not a "
                          f"{layout.name} MoE checkpoint")
    moe_layers = tuple(sorted(layer for mtp, layer in experts_in if not mtp))
    mtp_moe = tuple(sorted(layer for mtp, layer in experts_in if mtp))
    return Anatomy(roles, num_layers, tuple(layer_ids), moe_layers, num_experts, tuple(mtp_layers), mtp_moe)
