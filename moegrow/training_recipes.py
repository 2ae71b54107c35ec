"""The growth recipes on training checkpoints (Megatron-core torch_dist, OLMo-core DCP), with their optimizer state.

The Megatron and OLMo-core planners map every stored chunk to the chunks it becomes (`megatron.Piece`);
each recipe is a pass over those pieces that marks the transform a piece gets, so the same plan drives the
writer, the provenance record and `verify`:

- `--depth-init identity`: in every added copy of a layer the tensors that write into the residual stream
  are zeroed (`Piece.zero`), so the layer adds nothing (LLaMA Pro block expansion). Megatron-core:
  `self_attention.linear_proj` and every `mlp.*linear_fc2` (routed experts, shared experts, a dense MLP),
  weights and biases. OLMo-core: `attention.w_out`, `feed_forward_moe.experts.mlp.w2`,
  `feed_forward_moe.shared_mlp.w2`, a hybrid block's dense `feed_forward.w2`. Their Adam moments are zeroed
  too: a zeroed tensor is a new parameter with no gradient history, and copied moments would move it along
  the source layer's momentum on the first steps, a direction no gradient of the grown model gave.
- `--noise-mode relative` and `--reinit R`: as for Hugging Face checkpoints (moegrow.noise_modes: the same
  noise blocks scaled by each expert slice's std; the same neuron selection, keyed by output layer, source
  expert and copy, and the same draws). A copy's chunk that holds part of an expert (Megatron saves gate and
  up halves apart) is re-cut into one chunk per whole expert, so statistics and neurons are per expert
  whatever the source's chunking; memory holds one expert. The Adam moments of re-initialised neurons are
  zeroed (`Piece.reinit_zero`), the rest of a copy's moments copied.
- `--select first`: the first N - E experts of every MoE layer copied (`select_first`: a factor-2 plan cut
  to N experts). `--select load` needs a forward pass over calibration text, which a training checkpoint
  cannot run without its trainer: refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import GrowthError
from .megatron import (
    EXPERT_PREFIXES,
    LAYER_PREFIX,
    OPTIM_STATE,
    SHARDED_OBJECT,
    MegatronCheckpoint,
    MegatronPlan,
    Piece,
    noise_name,
)
from .neurons import Reinit, check_noise_mode, check_reinit
from .olmo import _BLOCK, OlmoCheckpoint, _expert_rows

_MEGATRON_WRITER = re.compile(r"^(self_attention\.linear_proj|mlp\.(?:.+\.)?linear_fc2)\.(weight|bias)$")
_OLMO_WRITER = re.compile(r"^(attention\.w_out\.(weight|bias)|feed_forward_moe\.experts\.mlp\.w2"
                          r"|feed_forward_moe\.shared_mlp\.w2\.(weight|bias)|feed_forward\.w2\.(weight|bias))$")
# OLMo-core blocks that are x + f(x) (the reordered-norm ones apply a norm to f(x): zero stays zero without bias)
_OLMO_BLOCKS = ("moe", "moe_hybrid")
_OLMO_REORDERED = ("moe_reordered_norm", "moe_hybrid_reordered_norm")
# OLMo-core expert weights: (name, MoE implementation) -> neuron axis of one expert's slice (olmo_core.nn.moe.mlp:
# MoEMLP views w1, w3 as (E, d_model, hidden) and w2 as (E, hidden, d_model); DroplessMoEMLP all three as
# (E, hidden, d_model))
_OLMO_NEURON_AXIS = {("w1", "default"): 1, ("w3", "default"): 1, ("w2", "default"): 0,
                     ("w1", "dropless"): 0, ("w3", "dropless"): 0, ("w2", "dropless"): 0}


@dataclass(frozen=True)
class Where:
    """What a plan's output tensor is: its layer, its parameter within the layer, its expert layout."""

    layer: int | None         # the output layer (None: not a layer's tensor)
    rel: str                  # the parameter's name within its layer (the whole name outside layers)
    param: str                # the output key of the parameter (itself for a parameter)
    state: str | None         # the optimizer state's name (None: a parameter)
    axis: int | None          # the expert axis (None: not an expert tensor)
    rows: int                 # entries per expert along `axis`


def where(ckpt: MegatronCheckpoint | OlmoCheckpoint, p: Piece) -> Where:
    """A piece's tensor described for the recipes (by format: layer axis 0 for Megatron, blocks.N for OLMo)."""
    src = ckpt.reader.tensors[p.source]
    if isinstance(ckpt, OlmoCheckpoint):
        m = _BLOCK.match(p.key)
        if m is None:
            return Where(None, p.key, p.key, None, None, 1)
        rest, state = m["rest"], None
        if m["head"] == "optim.state.":
            rest, state = rest.rsplit(".", 1)
        param = f"model.blocks.{m['i']}.{rest}"
        e = ckpt.num_experts
        expert = _expert_rows(m["rest"], src.shape, e) and state != "step"
        return Where(int(m["i"]), rest, param, state, 0 if expert else None, src.shape[0] // e if expert else 1)
    om = OPTIM_STATE.match(p.key)
    param, state = (om["param"], om["state"]) if om else (p.key, None)
    if not (param.startswith(LAYER_PREFIX) and src.shape[:1] == (ckpt.num_layers,)):
        return Where(None, param, param, state, None, 1)
    expert = param.startswith(EXPERT_PREFIXES) and len(src.shape) > 1 and src.shape[1] == ckpt.num_experts
    return Where(p.offsets[0], param[len(LAYER_PREFIX):], param, state, 1 if expert else None, 1)


def finish(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, *, depth_init: str = "copy",
           noise_mode: str = "absolute", reinit: float = 0.0, select: str | None = None,
           experts: int | None = None) -> MegatronPlan:
    """The planner's plan with the recipes applied (see the module docstring); returns it."""
    if depth_init not in ("copy", "identity"):
        raise GrowthError(f"--depth-init must be 'copy' or 'identity', not {depth_init!r}")
    relative = check_noise_mode(noise_mode) == "relative"
    check_reinit(reinit)
    if select is not None:
        assert experts is not None
        select_first(ckpt, plan, experts)
    if depth_init == "identity":
        if plan.layer_map is None:
            raise GrowthError("--depth-init identity applies to a depth growth (give --layers or --layer-map)")
        _identity(ckpt, plan)
    if (relative or reinit) and plan.factor > 1:
        _copies(ckpt, plan, relative, reinit)
    plan.depth_init, plan.noise_mode, plan.reinit, plan.select, plan.experts = \
        depth_init, noise_mode, reinit, select, experts
    return plan


# ---------------------------------------------------------------------------------------------
# --select first


def check_select(select: str | None, n_new: int, e_old: int) -> None:
    if select == "load":
        raise GrowthError("--select load counts expert selections in a forward pass over calibration text, which "
                          "a training checkpoint cannot run without its trainer; use --select first")
    if select != "first":
        raise GrowthError(f"--experts {n_new} is not a multiple of the source's {e_old} experts: give --select first"
                          if select is None else f"--select must be load or first, not {select!r}")
    if n_new > 2 * e_old:
        raise GrowthError(f"--experts {n_new}: a selection copies at most the source's {e_old} experts once "
                          f"(N up to {2 * e_old}); grow by a factor first, then select")


def select_first(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, n_new: int) -> None:
    """Cut a factor-2 plan to `n_new` experts: copies of experts 0..N-E-1 kept (router rows, moments, names)."""
    e_old = ckpt.num_experts
    cut: dict[str, tuple[int, int]] = {}  # key -> (expert axis, entries kept along it)
    pieces = []
    for p in plan.pieces:
        w = where(ckpt, p)
        if w.axis is None:
            pieces.append(p)
            continue
        end = n_new * w.rows
        cut[p.key] = (w.axis, end)
        lo = p.offsets[w.axis]
        if lo >= end:
            continue
        if lo + p.sizes[w.axis] > end:
            sizes = list(p.sizes)
            sizes[w.axis] = end - lo
            p = replace(p, sizes=tuple(sizes))
        pieces.append(p)
    plan.pieces = pieces
    for key, (axis, end) in cut.items():
        shape = list(plan.shapes[key])
        shape[axis] = end
        plan.shapes[key] = tuple(shape)
    objects = {}
    for name, src in plan.objects.items():
        m = SHARDED_OBJECT.match(name)
        if m is not None and m["base"].startswith(EXPERT_PREFIXES):
            index = [int(x) for x in m["index"].split(".")]
            count = [int(x) for x in m["count"].split(".")]
            if len(index) > 1 and count[1] == 2 * e_old:
                if index[1] >= n_new:
                    continue
                count[1] = n_new
                name = f"{m['base']}/shard_{m['index']}_{'.'.join(map(str, count))}"
        objects[name] = src
    plan.objects = objects
    for k, (old, _) in list(plan.args_changes.items()):
        if k.endswith("num_experts"):
            plan.args_changes[k] = (old, n_new)
    plan.exact = False
    plan.warnings = [w.replace(f"{2 * e_old} experts", f"{n_new} experts") for w in plan.warnings
                     if not w.startswith(("--top-k", "--allow-inexact"))]
    plan.warnings.append(f"--select first: experts 0..{n_new - e_old - 1} of every MoE layer are copied; top-k "
                         f"stays {plan.k_new}, so the grown model does not compute the source's function")


# ---------------------------------------------------------------------------------------------
# --depth-init identity


def _identity(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan) -> None:
    from .plan import added_copies

    assert plan.layer_map is not None
    added = set(added_copies(plan.layer_map))
    firsts = [m for j, m in enumerate(plan.layer_map) if j not in added]
    if firsts != list(range(ckpt.num_layers)):
        raise GrowthError(f"--depth-init identity: the first occurrence of each source layer stays the original, "
                          f"so the map must hold every layer 0..{ckpt.num_layers - 1} first in order; this one's "
                          f"first occurrences are {','.join(map(str, firsts))}")
    writer = _check_residual(ckpt)
    pieces = []
    for p in plan.pieces:
        w = where(ckpt, p)
        zero = w.layer in added and bool(writer.match(w.rel))
        if zero and w.state is not None:  # moments shaped as the parameter; counters (OLMo's step) kept
            zero = plan.shapes.get(w.param) == plan.shapes[p.key]
        pieces.append(replace(p, zero=True) if zero else p)
    plan.pieces = pieces


def _check_residual(ckpt: MegatronCheckpoint | OlmoCheckpoint) -> re.Pattern[str]:
    """The residual-writer pattern of the checkpoint's layers; refuse layers that are not x + f(x) with them."""
    names = {where(ckpt, Piece(k, (0,) * len(t.shape), t.shape, k, (0,) * len(t.shape))).rel
             for k, t in ckpt.reader.tensors.items()}
    if isinstance(ckpt, OlmoCheckpoint):
        block = ckpt.config["model"]["block"]
        name = block.get("name", "default")
        if name in _OLMO_REORDERED and any(n.endswith("norm.bias") for n in names):
            raise GrowthError(f"{ckpt.root}: --depth-init identity with block {name!r} and a layer norm with bias: "
                              "the norm of a zeroed branch is its bias, not zero")
        if name not in _OLMO_BLOCKS + _OLMO_REORDERED:
            raise GrowthError(f"{ckpt.root}: --depth-init identity is not supported for OLMo-core block {name!r} "
                              f"(known to be x + f(x): {', '.join(_OLMO_BLOCKS + _OLMO_REORDERED)})")
        if ckpt.moe.get("latent_moe"):
            raise GrowthError(f"{ckpt.root}: --depth-init identity with latent_moe is not supported (the latent up "
                              "projection follows the experts)")
        need = ["attention.w_out.weight", "feed_forward_moe.experts.mlp.w2"]
        if ckpt.moe.get("shared_mlp"):
            need.append("feed_forward_moe.shared_mlp.w2.weight")
        writer = _OLMO_WRITER
    else:
        args = ckpt.args
        if getattr(args, "apply_residual_connection_post_layernorm", False):
            raise GrowthError(f"{ckpt.folder}: --depth-init identity with apply_residual_connection_post_layernorm: "
                              "the layer's residual is its normalised input, not x + f(x)")
        if any("latent_proj" in n for n in names):
            raise GrowthError(f"{ckpt.folder}: --depth-init identity with MoE latent projections is not supported "
                              "(fc2_latent_proj follows the experts)")
        need = ["self_attention.linear_proj.weight"]
        if not any(re.match(r"^mlp\.(?:.+\.)?linear_fc2\.weight$", n) for n in names):
            need.append("mlp.experts.experts.linear_fc2.weight")
        writer = _MEGATRON_WRITER
    missing = [n for n in need if n not in names]
    if missing:
        raise GrowthError(f"{ckpt.folder}: --depth-init identity: no {missing[0]} in the layers, so the tensor that "
                          "writes into the residual stream is not known; grow with --depth-init copy")
    return writer


# ---------------------------------------------------------------------------------------------
# --noise-mode relative, --reinit


def _copies(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan, relative: bool, reinit: float) -> None:
    """Mark every expert copy's pieces for relative noise and re-initialisation, re-cut to whole experts."""
    e_old = ckpt.num_experts
    pieces: list[Piece] = []
    done: set[tuple[str, tuple[int, ...]]] = set()
    for p in plan.pieces:
        w = where(ckpt, p)
        if w.axis is None or p.offsets[w.axis] // w.rows < e_old:
            pieces.append(p)
            continue
        rein = bool(reinit) and (w.state is None or plan.shapes.get(w.param) == plan.shapes[p.key])
        neurons = _neurons(ckpt, w, ckpt.reader.tensors[p.source].shape) if rein else None
        rel = relative and p.noise > 0 and w.state is None
        if neurons is None and not rel:
            pieces.append(p)
            continue
        for q in _whole_experts(plan, p, w):
            if (q.key, q.offsets) in done:
                continue
            done.add((q.key, q.offsets))
            slices = q.sizes[w.axis] // w.rows
            r = None
            if neurons is not None:
                shape, axis, pairing = neurons
                out_e = q.offsets[w.axis] // w.rows
                r = Reinit(reinit, shape, axis, pairing, w.layer if w.layer is not None else 0,
                           q.source_offsets[w.axis] // w.rows, out_e // e_old)
            pieces.append(replace(q, relative=rel, slices=slices, reinit=r, reinit_zero=r is not None and
                                  w.state is not None))
    plan.pieces = pieces
    if reinit:
        _check_neurons(ckpt, plan)


def _whole_experts(plan: MegatronPlan, p: Piece, w: Where) -> list[Piece]:
    """`p` as is where it holds whole experts, else one piece per expert it touches (each whole)."""
    assert w.axis is not None
    shape = plan.shapes[p.key]
    lead = 1 if w.layer is not None and w.axis == 1 else 0  # Megatron: axis 0 is the layer
    whole = all(p.offsets[i] == 0 and p.sizes[i] == shape[i] for i in range(lead, len(shape)) if i != w.axis) \
        and p.offsets[w.axis] % w.rows == 0 and p.sizes[w.axis] % w.rows == 0
    if whole:
        return [p]
    out = []
    first = p.offsets[w.axis] // w.rows
    last = (p.offsets[w.axis] + p.sizes[w.axis] - 1) // w.rows
    for e in range(first, last + 1):
        offsets = [p.offsets[i] if i < lead else 0 for i in range(len(shape))]
        sizes = [1 if i < lead else shape[i] for i in range(len(shape))]
        src = [p.source_offsets[i] if i < lead else 0 for i in range(len(shape))]
        offsets[w.axis], sizes[w.axis] = e * w.rows, w.rows
        src[w.axis] = p.source_offsets[w.axis] + e * w.rows - p.offsets[w.axis]
        out.append(replace(p, offsets=tuple(offsets), sizes=tuple(sizes), source_offsets=tuple(src)))
    return out


def _neurons(ckpt: MegatronCheckpoint | OlmoCheckpoint, w: Where,
             src_shape: tuple[int, ...]) -> tuple[tuple[int, ...], int, str] | None:
    """(one expert's slice shape, its neuron axis, gate/up pairing) of an expert weight; None for routers and
    biases (copied as they are); refused where the neuron layout is not known."""
    name = w.rel.rsplit(".", 1)[-1]
    if "router" in w.rel or name == "bias" or name.startswith("bias") or "expert_bias" in w.rel:
        return None
    if isinstance(ckpt, OlmoCheckpoint):
        axis = _OLMO_NEURON_AXIS.get((name, str(ckpt.moe.get("name", "default"))))
        if axis is None:
            raise GrowthError(f"--reinit: OLMo-core {ckpt.moe.get('name')!r} MoE: where the intermediate neurons of "
                              f"{w.param} lie is not known; grow without --reinit")
        return (src_shape[0] // ckpt.num_experts, *src_shape[1:]), axis, ""
    shape = tuple(src_shape[2:])
    if w.rel.endswith("linear_fc2.weight") and len(shape) == 2:
        return shape, 1, ""
    if w.rel.endswith("linear_fc1.weight") and len(shape) == 2:
        fc2 = ckpt.reader.tensors.get(w.param.replace("linear_fc1.weight", "linear_fc2.weight"))
        f = fc2.shape[-1] if fc2 is not None else shape[0]
        if shape[0] not in (f, 2 * f):
            raise GrowthError(f"--reinit: {w.param} has {shape[0]} rows for {f} intermediate neurons: its neuron "
                              "layout is not known; grow without --reinit")
        return shape, 0, "halves" if shape[0] == 2 * f else ""
    raise GrowthError(f"--reinit: Megatron-core: where the intermediate neurons of {w.param} lie is not known; "
                      "grow without --reinit")


def _check_neurons(ckpt: MegatronCheckpoint | OlmoCheckpoint, plan: MegatronPlan) -> None:
    """The same neuron indices must fit gate, up and down of a copy: refuse disagreeing counts."""
    seen: dict[tuple[int, int, int], tuple[int, str]] = {}
    for p in plan.pieces:
        r = p.reinit
        if r is None:
            continue
        first = seen.setdefault((r.layer, r.expert, r.copy), (r.neurons, p.key))
        if first[0] != r.neurons:
            raise GrowthError(f"--reinit: {p.key} has {r.neurons} intermediate neurons by its shape, {first[1]} "
                              f"{first[0]}: the neuron layout is not known; grow without --reinit")


# ---------------------------------------------------------------------------------------------
# Executing a piece (the writer and verify)


@dataclass(frozen=True)
class _PartView:
    """The fields of plan.Part that noise_modes.apply reads."""

    noise: float
    slices: int
    relative: bool
    reinit: Reinit | None
    scale: float = 1.0


def source_values(reader: Any, p: Piece) -> Any:
    """The piece's source slice (zeros for a zeroed piece, which reads nothing)."""
    import torch

    if p.zero:
        return torch.zeros(p.sizes, dtype=reader.tensors[p.source].torch_dtype)
    return reader.read_slice(p.source, p.source_offsets, p.sizes)


def apply_piece(t: Any, p: Piece, seed: int, generator: str) -> Any:
    """A piece's output from its source values `t` (see `source_values`): noise, relative noise, re-init."""
    import torch

    from .megatron import _noised
    from .noise_modes import apply, reinit_mask

    if p.reinit_zero:
        out = t.clone()
        out.view(-1)[reinit_mask(p.reinit, seed, p.slices)] = 0
        return out
    if p.relative or p.reinit is not None:
        compute = torch.float64 if t.dtype == torch.float64 else torch.float32
        part = _PartView(p.noise, p.slices, p.relative, p.reinit)
        return (apply(t.reshape(-1).to(compute), part, seed, noise_name(p), 0, "cpu", generator=generator)
                .to(t.dtype).view(t.shape))
    return _noised(t, p, seed, generator) if p.noise else t


def transformed(reader: Any, p: Piece, seed: int, generator: str) -> Any:
    """The output chunk of piece `p` (what the writer stores)."""
    return apply_piece(source_values(reader, p), p, seed, generator)


def piece_record(p: Piece) -> dict[str, Any] | None:
    """A piece's recipes in the provenance record (None: a copy, or plain absolute noise)."""
    out: dict[str, Any] = {}
    if p.zero:
        out["zero"] = True
    if p.relative:
        out["noise_mode"] = "relative"
    if p.reinit is not None:
        out["reinit"] = p.reinit.record()
        if p.reinit_zero:
            out["reinit_zero"] = True
    if out and p.slices != 1:
        out["slices"] = p.slices
    return out or None


def describe(p: Piece, seed: int) -> str:
    """What a piece should be, for verify's messages."""
    what = []
    if p.zero:
        what.append("zeros (--depth-init identity)")
    if p.noise:
        what.append(f"{'relative ' if p.relative else ''}noise (seed {seed}, std {p.noise})")
    if p.reinit is not None:
        done = "zeroed (moments of re-initialised neurons)" if p.reinit_zero else f"re-initialised (seed {seed})"
        what.append(f"{p.reinit.fraction:g} of its neurons {done}")
    return " plus ".join(what)
