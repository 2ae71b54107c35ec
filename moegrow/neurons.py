"""Where an expert's intermediate neurons lie, for `--reinit` (Drop-Upcycling, arXiv 2502.19261).

A neuron j of an expert is row j of its gate and up projections and column j of its down projection
(nn.Linear weights: gate/up [F, H], down [H, F]). Per-expert tensors are recognised by the name after
the expert index (`w1` / `w3` / `gate_proj` / `up_proj` rows, `w2` / `down_proj` columns); fused tensors
[E, ...] need the family's `ExpertAxis.neurons` (the neuron axis of the fused tensor and how gate and up
share it: `interleaved` gate, up, gate, up...; `halves` all gates then all ups). A family whose expert
weight matrices are not all described is refused: a neuron must be re-initialised everywhere or nowhere.
Pure data and arithmetic: no torch here (see `noise_modes` for the tensors).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .errors import GrowthError

NOISE_MODES = ("absolute", "relative")
PAIRINGS = ("", "interleaved", "halves")
# per-expert weight names (the last two components of the name after the expert index) -> neuron axis
_ROWS = ("w1.weight", "w3.weight", "gate_proj.weight", "up_proj.weight")
_COLUMNS = ("w2.weight", "down_proj.weight")


@dataclass(frozen=True)
class Reinit:
    """Re-initialise `fraction` of the neurons of every expert slice of a part.

    ``shape``: one expert slice's shape (a fused part holds `Part.slices` of them, expert axis first);
    ``axis``: the neuron axis within a slice; ``pairing``: how gate and up share that axis (see module);
    ``layer``, ``expert``, ``copy``: the selection key of the part's first slice (slice s is expert
    `expert` + s), the same for a copy's gate, up and down tensors whatever their names.
    """

    fraction: float
    shape: tuple[int, ...]
    axis: int
    pairing: str
    layer: int
    expert: int
    copy: int

    @property
    def neurons(self) -> int:
        n = self.shape[self.axis]
        return n // 2 if self.pairing else n

    def record(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "shape": list(self.shape), "axis": self.axis, "pairing": self.pairing,
                "key": [self.layer, self.expert, self.copy]}


def neuron_axis(layout: Any, rel: str, fused: bool) -> tuple[int, str] | None:
    """(neuron axis within one expert slice, pairing) of an expert tensor, or None where it has none known."""
    found = dict((r, (axis, pairing)) for r, axis, pairing in layout.axes.neurons)
    if rel in found:
        axis, pairing = found[rel]
        return (axis - 1 if fused else axis), pairing
    if fused:
        return None
    tail = ".".join(rel.split(".")[-2:])
    if tail in _ROWS:
        return 0, ""
    if tail in _COLUMNS:
        return 1, ""
    return None


def check_reinit(fraction: float) -> float:
    if not (0.0 <= fraction < 1.0):
        raise GrowthError(f"--reinit: the fraction of neurons to re-initialise must be in [0, 1), not {fraction}")
    return fraction


def check_noise_mode(mode: str) -> str:
    if mode not in NOISE_MODES:
        raise GrowthError(f"--noise-mode must be absolute or relative, not {mode!r}")
    return mode


def refuse_unknown(layout_name: str, name: str) -> GrowthError:
    return GrowthError(f"--reinit: {layout_name}: where the intermediate neurons of {name} lie is not known "
                       f"(no neuron rule for this family's expert tensors); grow without --reinit")


def check_consistent(tensors: Any, layout_name: str) -> None:
    """Refuse a plan whose re-initialised tensors of one copy disagree on the neuron count (a weight stored
    transposed, or a name rule that does not fit the family): the same indices must fit gate, up and down."""
    seen: dict[tuple[int, int, int], tuple[int, str]] = {}
    for t in tensors:
        for p in t.parts:
            r = p.reinit
            if r is None:
                continue
            key = (r.layer, r.expert, r.copy)
            first = seen.setdefault(key, (r.neurons, t.name))
            if first[0] != r.neurons:
                raise GrowthError(f"--reinit: {layout_name}: {t.name} has {r.neurons} intermediate neurons by its "
                                  f"shape, {first[1]} {first[0]}: the neuron layout of this family is not known; "
                                  "grow without --reinit")


def selection_seed(seed: int, layer: int, expert: int, copy: int) -> int:
    """The seed of one copy's neuron selection: by layer, expert and copy, never by tensor name."""
    digest = hashlib.sha256(f"moegrow-reinit\0{seed}\0{layer}\0{expert}\0{copy}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


RECORD_KEYS = frozenset({"noise_mode", "slices", "reinit"})


def record_extra_ok(key: str, value: Any) -> bool:
    """Whether a part record's extra (see provenance.part_record) written by these recipes is well formed."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if key == "noise_mode":
        return value == "relative"
    if key == "slices":
        return is_int(value) and value >= 1
    if key == "reinit":
        return (isinstance(value, dict) and set(value) == {"fraction", "shape", "axis", "pairing", "key"}
                and isinstance(value["fraction"], (int, float)) and not isinstance(value["fraction"], bool)
                and isinstance(value["shape"], list) and all(map(is_int, value["shape"]))
                and is_int(value["axis"]) and value["pairing"] in PAIRINGS
                and isinstance(value["key"], list) and len(value["key"]) == 3 and all(map(is_int, value["key"])))
    return False
