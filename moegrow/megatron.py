"""Megatron-core `torch_dist` checkpoints: find, describe, plan and grow them where they are.

Megatron stores every decoder layer's tensor under one key with the layers stacked on axis 0
(`decoder.layers.mlp.router.weight` is (L, E, H)) and the experts of expert weights and routers on
axis 1 (`decoder.layers.mlp.experts.experts.linear_fc1.weight` is (L, E, 2F, H)), saved as one DCP
chunk per layer (and per expert, and per gate/up half). A growth maps every stored chunk to the
chunks it becomes: depth moves it along axis 0 (new layer j copies old layer_map[j]), width
repeats it along axis 1 (copy c of expert e is expert c*E + e, noise on the copies). Plain Adam
moments (`optimizer.state.exp_avg.<key>`) follow their parameter's mapping without noise.
Per-layer and per-expert non-tensor entries (`<key>/shard_<l>.<e>_<L>.<E>`, `_extra_state`) are
renamed for the new counts with their bytes carried; everything else is carried as it is.
The architecture comes from Megatron-LM's args in common.pt, or from the global shapes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .dcp_io import METADATA_NAME, Chunk, DcpReader, OutChunk, TensorEntry
from .errors import GrowthError, SourceError
from .noise import DEFAULT_GENERATOR

FORMAT = "megatron-torch_dist"
LATEST_NAME = "latest_checkpointed_iteration.txt"
COMMON_NAME = "common.pt"
LAYER_PREFIX = "decoder.layers."
EXPERT_PREFIXES = ("decoder.layers.mlp.experts.", "decoder.layers.mlp.router.")
ROUTER_WEIGHT = "decoder.layers.mlp.router.weight"
OPTIM_STATE = re.compile(r"^optimizer\.state\.(?P<state>[^.]+)\.(?P<param>.+)$")
SHARDED_OBJECT = re.compile(r"^(?P<base>.+)/shard_(?P<index>[\d.]+)_(?P<count>[\d.]+)$")
# Multi-token-prediction layers: one module each, not stacked with the decoder's; an MoE MTP layer's
# experts (`experts.experts.linear_fc{1,2}.weight`, (E, ...)) and router rows are on axis 0
MTP_MOE = re.compile(r"^mtp\.layers\.\d+\.transformer_layer\.mlp\.(?P<part>experts|router)\.")


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint


def is_megatron(folder: Path) -> bool:
    """A torch_dist checkpoint folder, or a Megatron-LM run folder holding iterations."""
    return (folder / LATEST_NAME).is_file() or _backend(folder) == "torch_dist"


def _backend(folder: Path) -> str | None:
    try:
        return json.loads((folder / "metadata.json").read_text()).get("sharded_backend")
    except (OSError, ValueError, AttributeError):
        return None


def resolve(folder: Path, iteration: int | None) -> tuple[Path, int | None]:
    """(the checkpoint folder, its iteration): a run folder's latest iteration unless `iteration`."""
    if not (folder / LATEST_NAME).is_file():
        if iteration is not None:
            raise SourceError(f"{folder}: --iteration applies to a Megatron-LM run folder (with {LATEST_NAME})")
        _check_checkpoint(folder)
        return folder, None
    if iteration is None:
        text = (folder / LATEST_NAME).read_text().strip()
        if text == "release":
            ckpt = folder / "release"
            _check_checkpoint(ckpt)
            return ckpt, None
        try:
            iteration = int(text)
        except ValueError:
            raise SourceError(f"{folder / LATEST_NAME}: not an iteration number ({text[:40]!r})") from None
    ckpt = folder / f"iter_{iteration:07d}"
    if not ckpt.is_dir():
        have = sorted(int(p.name[5:]) for p in folder.glob("iter_*") if p.name[5:].isdigit())
        raise SourceError(f"{ckpt}: no such iteration folder (the run has {have or 'none'})")
    _check_checkpoint(ckpt)
    return ckpt, iteration


def _check_checkpoint(folder: Path) -> None:
    backend = _backend(folder)
    if backend is None:
        raise SourceError(f"{folder}/metadata.json: missing or unreadable (not a Megatron dist checkpoint)")
    if backend != "torch_dist":
        raise SourceError(f"{folder}/metadata.json: sharded_backend {backend!r}; moegrow reads torch_dist only")
    if not (folder / METADATA_NAME).is_file():
        raise SourceError(f"{folder}/{METADATA_NAME}: missing (an interrupted save?)")


# ---------------------------------------------------------------------------------------------
# The architecture


@dataclass
class MegatronCheckpoint:
    """An opened torch_dist checkpoint: its DCP index, common.pt record and architecture."""

    spec: str
    root: Path                  # what the user named: a checkpoint or a run folder
    folder: Path                # the checkpoint folder itself
    iteration: int | None
    reader: DcpReader
    common: Any
    num_layers: int
    num_experts: int
    top_k: int | None
    router: dict[str, Any] = field(default_factory=dict)
    stamps: dict[Path, Any] = field(default_factory=dict)  # source files at opening (`training.open_training`)

    @property
    def args(self) -> Any:
        return self.common.get("args") if isinstance(self.common, dict) else None

    @property
    def is_run(self) -> bool:
        return self.folder != self.root

    def optimizer(self) -> dict[str, Any]:
        """What optimizer state the checkpoint holds and whether it can grow per parameter."""
        states = sorted({m["state"] for k in self.reader.tensors if (m := OPTIM_STATE.match(k))})
        keys = [k for k in [*self.reader.tensors, *self.reader.objects] if k.startswith("optimizer.")]
        opt = self.common.get("optimizer") if isinstance(self.common, dict) else None
        sharding = opt.get("param_state_sharding_type") if isinstance(opt, dict) else None
        step = None
        if isinstance(opt, dict) and isinstance(opt.get("state"), dict) and "common_step" in opt["state"]:
            step = float(opt["state"]["common_step"])
        mcore = getattr(self.reader.metadata, "mcore_data", None) or {}
        flat = bool(mcore) or any(k.startswith("optimizer.distributed.") for k in keys) or sharding is not None
        if not keys:
            return {"present": False, "kind": None, "states": [], "step": None, "growable": True}
        kind = f"distributed ({sharding or 'flattened buffers'})" if flat else "per parameter"
        return {"present": True, "kind": kind, "states": states, "step": step, "growable": not flat,
                "keys": len(keys)}


def _arg(args: Any, name: str) -> Any:
    return getattr(args, name, None) if args is not None else None


def open_megatron(spec: str, iteration: int | None = None) -> MegatronCheckpoint:
    from .torch_pickle import load_record

    root = Path(spec)
    folder, it = resolve(root, iteration)
    reader = DcpReader(folder)
    common_path = folder / COMMON_NAME
    try:
        common = load_record(common_path) if common_path.is_file() else {}
    except Exception as e:  # a damaged zip or pickle
        raise SourceError(f"{common_path}: cannot read: {type(e).__name__}: {e}".splitlines()[0]) from None
    layer_keys = [t for k, t in reader.tensors.items() if k.startswith(LAYER_PREFIX)]
    if not layer_keys:
        raise SourceError(f"{folder}: no decoder.layers.* tensors (not a Megatron GPT checkpoint)")
    router = reader.tensors.get(ROUTER_WEIGHT)
    if router is None:
        raise SourceError(f"{folder}: no {ROUTER_WEIGHT} (a dense model, or MoE layers moegrow does not know)")
    args = common.get("args") if isinstance(common, dict) else None
    n_layers, n_experts = router.shape[0], router.shape[1]
    for name, have in (("num_layers", n_layers), ("num_experts", n_experts)):
        if _arg(args, name) is not None and int(_arg(args, name)) != have:
            raise SourceError(f"{common_path}: args.{name} is {_arg(args, name)}, but {ROUTER_WEIGHT} has "
                              f"{have} ({'layers' if name == 'num_layers' else 'experts'})")
    k = _arg(args, "moe_router_topk")
    router_info = {name: _arg(args, f"moe_router_{name}") for name in
                   ("score_function", "pre_softmax", "num_groups", "group_topk", "enable_expert_bias",
                    "topk_scaling_factor")}
    if router_info["score_function"] is None and args is not None:
        router_info["score_function"] = "softmax"  # megatron-core's default
    router_info["expert_bias"] = f"{LAYER_PREFIX}mlp.router.expert_bias" in reader.tensors
    return MegatronCheckpoint(spec, root, folder, it, reader, common, n_layers, n_experts,
                              int(k) if k is not None else None, router_info)


def layer_targets(layer_map: Sequence[int] | None, l_old: int) -> tuple[dict[int, list[int]], int]:
    """({source layer: its new positions}, new layer count) of a layer map (None: layers unchanged)."""
    targets: dict[int, list[int]] = {}
    for j, m in enumerate(layer_map if layer_map is not None else range(l_old)):
        targets.setdefault(m, []).append(j)
    return targets, len(layer_map) if layer_map is not None else l_old


def new_top_k(k_old: int | None, factor: int, top_k: str | int, missing: str) -> int | None:
    """The grown model's top-k under --top-k scale / keep / N; `missing` names the record that lacks it."""
    if top_k == "scale":
        if k_old is None:
            raise GrowthError(f"{missing} to scale; pass --top-k N (the grown model's top-k) or --top-k keep")
        return k_old * factor
    return k_old if top_k == "keep" else int(top_k)


def width_inexact_reason(ckpt: MegatronCheckpoint, k_old: int | None) -> str | None:
    """Why Megatron's router cannot keep the function when every expert is duplicated (None: it can).

    softmax top-k (after or before the softmax, `pre_softmax`) and sigmoid top-k with k > 1 (whose
    scores are renormalised over the chosen experts) give each of f copies 1/f of the original's
    weight: exact. Sigmoid with k = 1 is not renormalised, so the copies would add up to f times the
    weight; group-limited routing puts the copies (after the originals) in other groups.
    """
    r = ckpt.router
    if r.get("num_groups"):
        return "group-limited routing (moe_router_num_groups): the copies land in other groups"
    if r.get("score_function") == "sigmoid" and k_old == 1:
        return "sigmoid routing with top-1 is not renormalised, so f copies weigh f times the original"
    return None


# ---------------------------------------------------------------------------------------------
# Planning


@dataclass(frozen=True)
class Piece:
    """One output chunk: a slice of a source tensor, plus noise of std `noise`."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    source: str
    source_offsets: tuple[int, ...]
    noise: float = 0.0
    # the recipes (moegrow/training_recipes.py): `zero` the source's values replaced by zeros (identity depth
    # init) before any noise; `relative`, `slices`, `reinit` as plan.Part's; `reinit_zero` (an Adam moment of a
    # re-initialised copy) the re-initialised positions set to zero instead of drawn
    zero: bool = False
    relative: bool = False
    slices: int = 1
    reinit: Any = None
    reinit_zero: bool = False


@dataclass
class MegatronPlan:
    operation: str
    layer_map: list[int] | None
    factor: int
    top_k: str | int
    k_old: int | None
    k_new: int | None
    noise: float
    router_noise: float
    seed: int
    optimizer: str
    shapes: dict[str, tuple[int, ...]]          # output key -> global shape
    dtypes: dict[str, Any]
    pieces: list[Piece]
    objects: dict[str, str]                     # output non-tensor key -> source key
    args_changes: dict[str, tuple[Any, Any]]
    exact: bool
    inexact_reason: str | None
    warnings: list[str] = field(default_factory=list)
    depth_init: str = "copy"          # the recipes (moegrow/training_recipes.py)
    noise_mode: str = "absolute"
    reinit: float = 0.0
    select: str | None = None         # --select first: the first N - E experts copied
    experts: int | None = None        # the grown expert count (None: num_experts * factor)
    noise_generator: str = DEFAULT_GENERATOR  # moegrow.noise.GENERATORS

    @property
    def function_preserving(self) -> bool:
        return (self.exact and (self.layer_map is None or self.depth_init == "identity") and self.noise == 0.0
                and self.router_noise == 0.0 and not self.reinit)

    def preservation(self) -> str:
        if self.function_preserving:
            return "yes (logits equal up to float rounding)"
        if self.reinit:
            return f"no (--reinit {self.reinit:g} re-initialises neurons of the copies)"
        if self.layer_map is not None and self.depth_init != "identity":
            return "no (depth growth adds layers)"
        if self.inexact_reason:
            return f"no ({self.inexact_reason})"
        if self.select:
            return "no (--select: N is not a multiple of the source's experts, top-k cannot be scaled by N/E)"
        if not self.exact:
            return "no (top-k not scaled)"
        return "no (noise on the copies; exact at --noise 0 --router-noise 0)"

    @property
    def bytes_out(self) -> int:
        import torch

        total = 0
        for p in self.pieces:
            n = torch.empty((), dtype=self.dtypes[p.key]).element_size()
            for d in p.sizes:
                n *= d
            total += n
        return total


def _param_of(key: str) -> tuple[str, bool]:
    """(the parameter key a tensor belongs to, whether it is optimizer state)."""
    m = OPTIM_STATE.match(key)
    return (m["param"], True) if m else (key, False)


def plan_megatron(ckpt: MegatronCheckpoint, operation: str, *, layer_map: list[int] | None = None,
                  factor: int = 1, noise: float = 0.0, router_noise: float = 0.0, seed: int = 0,
                  top_k: str | int = "scale", optimizer: str = "keep", allow_inexact: bool = False) -> MegatronPlan:
    """Every output chunk of a depth and/or width growth, from the DCP index alone."""
    if optimizer not in ("keep", "drop"):
        raise GrowthError(f"--optimizer must be keep or drop, not {optimizer!r}")
    opt = ckpt.optimizer()
    if optimizer == "keep" and opt["present"] and not opt["growable"]:
        raise GrowthError(f"{ckpt.folder}: the optimizer state is Megatron's {opt['kind']} format, which cannot "
                          "be grown per parameter; pass --optimizer drop (and load with --no-load-optim)")
    e_old, l_old = ckpt.num_experts, ckpt.num_layers
    targets, l_new = layer_targets(layer_map, l_old)
    k_old = ckpt.top_k
    k_new: int | None = k_old
    reason = None
    if factor > 1:
        k_new = new_top_k(k_old, factor, top_k, f"{ckpt.folder / COMMON_NAME}: no Megatron-LM args.moe_router_topk")
        reason = width_inexact_reason(ckpt, k_old)
        if reason and not allow_inexact:
            raise GrowthError(f"{ckpt.folder}: width growth cannot preserve this router's function ({reason}); "
                              "pass --allow-inexact to grow it anyway")
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, Any] = {}
    pieces: list[Piece] = []
    for key, t in ckpt.reader.tensors.items():
        param, is_opt = _param_of(key)
        if is_opt and optimizer == "drop":
            continue
        if key.startswith("optimizer.") and not is_opt:
            continue  # distributed-optimizer buffers: only reachable with --optimizer drop
        layered = param.startswith(LAYER_PREFIX) and t.shape[:1] == (l_old,)
        axis = _expert_axis(param, t.shape, layered, e_old)
        expert = axis is not None
        std = 0.0 if is_opt else (router_noise if param == ROUTER_WEIGHT else noise)
        if param.startswith(f"{LAYER_PREFIX}mlp.router.") and param != ROUTER_WEIGHT:
            std = 0.0  # expert bias and token counts: copies exact
        if (mtp := MTP_MOE.match(param)) and mtp["part"] == "router" and not is_opt:
            std = router_noise if param.endswith(".router.weight") else 0.0
        shape = list(t.shape)
        if layered:
            shape[0] = l_new
        if axis is not None:
            shape[axis] = e_old * factor
        shapes[key] = tuple(shape)
        dtypes[key] = t.torch_dtype
        for c in _unit_chunks(t, layered):
            for j in targets.get(c.offsets[0], []) if layered else [None]:
                for copy in range(factor if expert else 1):
                    off = list(c.offsets)
                    if j is not None:
                        off[0] = j
                    if axis is not None:
                        off[axis] += copy * e_old
                    pieces.append(Piece(key, tuple(off), c.sizes, key, c.offsets, std if copy else 0.0))
    objects: dict[str, str] = {}
    for key in ckpt.reader.objects:
        if key.startswith("optimizer.") and optimizer == "drop":
            continue
        objects.update(_object_targets(key, targets if layer_map is not None else None, e_old, factor, l_new))
    changes: dict[str, tuple[Any, Any]] = {}
    args = ckpt.args
    if args is not None:
        if layer_map is not None:
            changes["num_layers"] = (l_old, l_new)
            freq = _arg(args, "moe_layer_freq")
            if isinstance(freq, list):
                changes["moe_layer_freq"] = (freq, [freq[m] for m in layer_map])
            elif isinstance(freq, int) and freq != 1:
                changes["moe_layer_freq"] = (freq, [int(m % freq == 0) for m in layer_map])
        if factor > 1:
            changes["num_experts"] = (e_old, e_old * factor)
            if k_new != k_old:
                changes["moe_router_topk"] = (k_old, k_new)
    exact = factor == 1 or (top_k == "scale" and reason is None)
    plan = MegatronPlan(operation, list(layer_map) if layer_map is not None else None, factor, top_k, k_old, k_new,
                        noise, router_noise, seed, optimizer, shapes, dtypes, pieces, objects, changes, exact, reason)
    if factor > 1 and top_k != "scale":
        plan.warnings.append(f"--top-k {top_k}: the grown model does not compute the source's function "
                             "(only --top-k scale preserves it)")
    if reason:
        plan.warnings.append(f"--allow-inexact: the result is not function-preserving: {reason}")
    if optimizer == "drop" and opt["present"]:
        plan.warnings.append("--optimizer drop: the output has no optimizer state; load it with --no-load-optim")
    if args is None and (layer_map is not None or factor > 1):
        plan.warnings.append(f"{ckpt.folder / COMMON_NAME} has no Megatron-LM args: build the model with "
                             f"{l_new} layers, {e_old * factor} experts" + (f", top-{k_new}" if k_new else ""))
    return plan


def _expert_axis(param: str, shape: tuple[int, ...], layered: bool, e_old: int) -> int | None:
    """The experts' axis of a tensor that width growth widens: 1 for the decoder's stacked (L, E, ...)
    expert and router tensors, 0 for an MoE MTP layer's; None for any other tensor."""
    if layered and param.startswith(EXPERT_PREFIXES) and len(shape) > 1 and shape[1] == e_old:
        return 1
    if MTP_MOE.match(param) and len(shape) >= 1 and shape[0] == e_old:
        return 0
    return None


def _unit_chunks(t: TensorEntry, layered: bool) -> list[Chunk]:
    """The stored chunks, split into one layer each where one spans several (axis 0 is the layer)."""
    out = []
    for c in t.chunks:
        if not layered or c.sizes[0] == 1:
            out.append(c)
            continue
        for i in range(c.sizes[0]):
            out.append(Chunk((c.offsets[0] + i, *c.offsets[1:]), (1, *c.sizes[1:])))
    return out


def _object_targets(key: str, targets: dict[int, list[int]] | None, e_old: int, factor: int,
                    l_new: int) -> dict[str, str]:
    """A non-tensor entry's new names: `<key>/shard_<l>[.<e>]_<L>[.<E>]` moved with its layer and expert."""
    m = SHARDED_OBJECT.match(key)
    if m is not None and MTP_MOE.match(m["base"]) and m["count"] == str(e_old):  # an MTP expert's: shard_<e>_<E>
        e = int(m["index"])
        return {f"{m['base']}/shard_{e + c * e_old}_{e_old * factor}": key for c in range(factor)}
    if m is None or not m["base"].startswith(LAYER_PREFIX):
        return {key: key}
    index = [int(x) for x in m["index"].split(".")]
    count = [int(x) for x in m["count"].split(".")]
    layers = targets.get(index[0], []) if targets is not None else [index[0]]
    expert = len(index) > 1 and count[1] == e_old and m["base"].startswith(EXPERT_PREFIXES)
    out = {}
    for j in layers:
        for c in range(factor if expert else 1):
            new_index = [j, *index[1:]]
            new_count = [l_new, *count[1:]]
            if expert:
                new_index[1] += c * e_old
                new_count[1] = e_old * factor
            name = f"{m['base']}/shard_{'.'.join(map(str, new_index))}_{'.'.join(map(str, new_count))}"
            out[name] = key
    return out


# ---------------------------------------------------------------------------------------------
# Writing


def out_chunks(plan: MegatronPlan, reader: DcpReader) -> list[OutChunk]:
    """The plan's pieces as chunks for `dcp_io.write_dcp`, each made (read, noised) when written."""

    def maker(p: Piece) -> Callable[[], Any]:
        def make() -> Any:
            from .training_recipes import transformed

            return transformed(reader, p, plan.seed, plan.noise_generator)
        return make

    return [OutChunk(p.key, plan.shapes[p.key], plan.dtypes[p.key], p.offsets, p.sizes, maker(p)) for p in plan.pieces]


def noise_name(p: Piece) -> str:
    """The name moegrow.noise seeds a piece's noise with: the output key and chunk offsets."""
    return f"{p.key}@{','.join(map(str, p.offsets))}"


def _noised(t: Any, p: Piece, seed: int, generator: str) -> Any:
    import torch

    from .dcp_io import dtype_name
    from .noise import add_noise, resolve_device

    raw = bytearray(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    out = add_noise(raw, dtype_name(t.dtype), p.noise, seed, noise_name(p), 0, resolve_device("cpu"),
                    generator=generator)
    return torch.frombuffer(bytearray(out), dtype=t.dtype).view(t.shape)


def updated_common(ckpt: MegatronCheckpoint, plan: MegatronPlan) -> Any:
    """common.pt with the args moegrow changed (and no optimizer record under --optimizer drop)."""
    import copy

    common = copy.copy(ckpt.common) if isinstance(ckpt.common, dict) else ckpt.common
    if isinstance(common, dict) and common.get("args") is not None:
        args = copy.copy(common["args"])
        for name, (_, new) in plan.args_changes.items():
            setattr(args, name, new)
        common["args"] = args
    if isinstance(common, dict) and plan.optimizer == "drop":
        common.pop("optimizer", None)
    return common


def fingerprint(ckpt: MegatronCheckpoint) -> dict[str, Any]:
    """The source in a provenance record: path, iteration, and sha256 of its index and common.pt."""
    out: dict[str, Any] = {"spec": ckpt.spec, "path": str(ckpt.root.resolve()), "format": FORMAT,
                           "iteration": ckpt.iteration}
    for name in (METADATA_NAME, COMMON_NAME, "metadata.json"):
        p = ckpt.folder / name
        if p.is_file():
            out[f"{name.lstrip('.')}_sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out
