"""What each tensor of a checkpoint is, read off its name through the family's layout.

Roles: ``global`` (outside the decoder layers), ``layer`` (a layer's non-MoE tensor),
``expert`` (one expert's tensor, per-expert on disk), ``fused`` (all experts, expert axis 0),
``router`` (router weight, one row per expert), ``router_bias`` (one entry per expert).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .layouts import Layout


@dataclass(frozen=True)
class Role:
    kind: str
    layer: int | None = None
    expert: int | None = None
    rel: str = ""  # name relative to the layer prefix (for per-expert: after the expert index)


def classify(name: str, layout: Layout) -> Role:
    if not name.startswith(layout.layer_prefix):
        return Role("global", rel=name)
    rest = name[len(layout.layer_prefix):]
    idx, dot, rel = rest.partition(".")
    if not (dot and idx.isdigit()):
        return Role("global", rel=name)
    layer = int(idx)
    if rel.startswith(layout.experts_prefix):
        e, dot2, tail = rel[len(layout.experts_prefix):].partition(".")
        if dot2 and e.isdigit():
            return Role("expert", layer, int(e), tail)
    if rel in layout.fused_experts:
        return Role("fused", layer, rel=rel)
    if rel in layout.router_weights:
        return Role("router", layer, rel=rel)
    if rel in layout.router_biases:
        return Role("router_bias", layer, rel=rel)
    return Role("layer", layer, rel=rel)


def layer_name(layout: Layout, layer: int, rel: str) -> str:
    return f"{layout.layer_prefix}{layer}.{rel}"


def expert_name(layout: Layout, layer: int, expert: int, tail: str) -> str:
    return f"{layout.layer_prefix}{layer}.{layout.experts_prefix}{expert}.{tail}"


@dataclass(frozen=True)
class Anatomy:
    """A checkpoint's structure: layers, which of them are MoE, experts per MoE layer."""

    roles: dict[str, Role]
    num_layers: int               # decoder layers per config
    layer_ids: tuple[int, ...]    # every layer index with tensors (MTP layers included)
    moe_layers: tuple[int, ...]
    num_experts: int

    @property
    def extra_layers(self) -> tuple[int, ...]:
        """Layers stored after the decoder stack (multi-token-prediction layers)."""
        return tuple(i for i in self.layer_ids if i >= self.num_layers)


def _dim0(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 0


def analyse(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any], layout: Layout,
            where: str = "config.json") -> Anatomy:
    """Classify every tensor and check that config and tensors agree on layers and experts."""
    roles = {name: classify(name, layout) for name in shapes}
    num_layers = layout.num_layers(config)
    num_experts = layout.num_experts(config)
    layer_ids = sorted({r.layer for r in roles.values() if r.layer is not None})
    experts_in: dict[int, set[int]] = {}
    for name, r in roles.items():
        if r.kind == "expert":
            experts_in.setdefault(r.layer, set()).add(r.expert)  # type: ignore[arg-type]
        elif r.kind in ("fused", "router", "router_bias"):
            n = _dim0(shapes[name])
            if r.kind == "fused":
                experts_in.setdefault(r.layer, set()).update(range(n))  # type: ignore[arg-type]
            if n != num_experts:
                raise ConfigError(f"{where}: says {num_experts} experts but {name} has {n} rows")
    for layer, found in experts_in.items():
        if found != set(range(num_experts)):
            raise ConfigError(f"{where}: says {num_experts} experts but layer {layer} has "
                              f"{len(found)} (indices {min(found)}..{max(found)})")
    decoder = [i for i in layer_ids if i < num_layers]
    if decoder != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(decoder))
        raise ConfigError(f"{where}: says {num_layers} layers but the tensors "
                          f"{'lack layer ' + str(missing[0]) if missing else 'disagree'}")
    if not experts_in:
        raise ConfigError(f"{where}: no expert tensors found (expected names like "
                          f"{layout.layer_prefix}N.{layout.experts_prefix}E.*): not a "
                          f"{layout.name} MoE checkpoint")
    return Anatomy(roles, num_layers, tuple(layer_ids), tuple(sorted(experts_in)), num_experts)
