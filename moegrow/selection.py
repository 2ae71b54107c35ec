"""Width growth to any expert count: N - E chosen experts per MoE layer are copied (`--select`).

A selection is, per MoE layer, the list of source experts whose copies become experts E, E+1, ...,
N-1 of that layer. `first` copies experts 0..N-E-1 everywhere; `load` copies the experts the source
routes to most often on a calibration text (`calibrate`). The plan is the factor planner's, with
one copy per selected expert instead of one per expert: router rows (and router-bias entries) of
the selected experts appended, expert weights copied, noise on the copies as usual. Top-k stays (it
cannot be scaled by N/E), so such a growth never computes the source's function.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .anatomy import analyse, expert_name
from .configs import check_moe_layers
from .errors import GrowthError, MoegrowError, SourceError
from .layouts import Layout
from .plan import OutTensor, Part, Plan, TensorMeta, _check_noise, _ordered

SELECTS = ("load", "first")
CHUNK = 2048  # calibration tokens per sequence (at most the model's max_position_embeddings)
PASS = 8      # sequences per forward pass: each pass reads the checkpoint once, one layer at a time
WHY_INEXACT = "N is not a multiple of the source's experts: top-k cannot be scaled by N/E"


def parse_count(spec: str, n_old: int) -> int | None:
    """`--experts N` that is not a multiple of the source's E -> N; None for a factor or a multiple."""
    s = spec.strip().lower()
    if s.endswith("x"):
        return None
    try:
        n_new = int(s)
    except ValueError:
        return None  # parse_experts names the problem
    if n_new <= n_old or n_new % n_old == 0:
        return None
    if n_new > 2 * n_old:
        raise GrowthError(f"--experts {n_new}: a selection copies at most the source's {n_old} experts once "
                          f"(N up to {2 * n_old}); grow by a factor first, then select")
    return n_new


def rank(counts: Sequence[int], n: int) -> list[int]:
    """The n experts with the most selections, most first; ties to the lower index."""
    return sorted(range(len(counts)), key=lambda e: (-counts[e], e))[:n]


def first_selection(moe_layers: Sequence[int], n: int) -> dict[int, list[int]]:
    return {layer: list(range(n)) for layer in moe_layers}


def check_selection(selection: Mapping[Any, Any], moe_layers: Sequence[int], e_old: int,
                    n: int) -> dict[int, list[int]]:
    """A selection from a record or a calibration, as {layer: [experts]}, checked against the source."""
    try:
        out = {int(k): [int(e) for e in v] for k, v in selection.items()}
    except (TypeError, ValueError, AttributeError):
        raise GrowthError("the selection must map each MoE layer to a list of expert indices") from None
    if sorted(out) != sorted(moe_layers):
        raise GrowthError(f"the selection covers layers {sorted(out)}, the source's MoE layers are "
                          f"{sorted(moe_layers)}")
    for layer, experts in out.items():
        if len(experts) != n or len(set(experts)) != n or not all(0 <= e < e_old for e in experts):
            raise GrowthError(f"the selection of layer {layer} is {experts}: it must be {n} distinct experts "
                              f"in 0..{e_old - 1}")
    return out


def _new_config(config: Mapping[str, Any], layout: Layout, n_new: int,
                top_k: str | int) -> tuple[dict[str, Any], list[str]]:
    """The config with N experts; top-k kept (or set); width rules that a fraction cannot follow refused."""
    outer, text = config, layout.text(config)
    new = copy.deepcopy(dict(text))
    ekey = layout.config_key(text, layout.counts.experts_keys, "expert count")
    kkey = layout.config_key(text, layout.counts.top_k_keys, "top-k")
    e_old, k_old = layout.num_experts(text), layout.top_k(text)
    k_new = k_old if top_k == "keep" else int(top_k)
    if not 1 <= k_new <= n_new:
        raise GrowthError(f"top-k {k_new} is out of range for {n_new} experts")
    from .configs import _set

    _set(new, ekey, n_new)
    changes = [f"{layout.key_path(outer, ekey)}: {e_old} -> {n_new}"]
    if k_new != k_old:
        _set(new, kkey, k_new)
        changes.append(f"{layout.key_path(outer, kkey)}: {k_old} -> {k_new}")
    for rule in layout.width.width_rules:
        key = next((k for k in rule.keys if text.get(k) is not None), None)
        if key is None or any(text.get(k) for k in rule.unless_keys):
            continue
        # div rules follow a scaled top-k (kept here); mul rules hold where the value is 1 (one group of all)
        if (rule.op == "mul" and text[key] != 1) or (rule.op == "top_k" and k_new != k_old):
            raise GrowthError(f"{layout.name}: --experts {n_new} is not a multiple of {e_old}, and config key "
                              f"{key}={text[key]} ({rule.why}) cannot follow a growth by {n_new}/{e_old}")
    return layout.wrap(outer, new), changes


def plan_selected(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta], layout: Layout, n_new: int,
                  selection: Mapping[int, Sequence[int]], select: str, *, noise: float = 0.0,
                  router_noise: float = 0.0, seed: int = 0, top_k: str | int = "keep",
                  allow_inexact: bool = False) -> Plan:
    """Width growth to N experts: new expert E+i of layer l is a copy of expert selection[l][i]."""
    if layout.width.width_refused:
        raise GrowthError(f"{layout.name}: width growth is not supported: {layout.width.width_refused}")
    if top_k == "scale":
        raise GrowthError(f"--top-k scale: --experts {n_new} is not a multiple of the source's experts, and top-k "
                          "cannot be scaled by a fraction; give --top-k keep or an integer")
    for flag, std in (("--noise", noise), ("--router-noise", router_noise)):
        if not (math.isfinite(std) and std >= 0):
            raise GrowthError(f"{flag}: the noise std must be a finite number >= 0, not {std}")
    anatomy = analyse({n: t.shape for n, t in tensors.items()}, config, layout)
    check_moe_layers(config, layout, anatomy.moe_layers)
    e_old = anatomy.num_experts
    text = layout.text(config)
    segments = layout.segment_counts(text)
    if any(segments[1:]):
        raise GrowthError(f"{layout.name}: the routers hold {sum(segments[1:])} slots after the routed experts "
                          f"({', '.join(layout.axes.expert_segments)}); --select cannot append rows before them")
    sel = check_selection(selection, anatomy.moe_layers, e_old, n_new - e_old)
    new_config, changes = _new_config(config, layout, n_new, top_k)
    k_old = layout.top_k(text)
    k_new = layout.top_k(layout.text(new_config))
    out: list[OutTensor] = []
    for name, t in tensors.items():
        role = anatomy.roles[name]
        chosen = sel.get(role.layer, []) if role.layer is not None else []
        if role.kind == "expert":
            assert role.layer is not None and role.expert is not None
            _check_noise(name, t, noise)
            out.append(OutTensor(name, t.dtype, t.shape, (Part(name),)))
            for i, e in enumerate(chosen):
                if e == role.expert:
                    new = expert_name(layout, role.layer, e_old + i, role.rel, role.prefix)
                    out.append(OutTensor(new, t.dtype, t.shape, (Part(name, noise),)))
        elif role.kind in ("fused", "router", "router_bias"):
            std = {"fused": noise, "router": router_noise}.get(role.kind, 0.0)
            _check_noise(name, t, std)
            axis = layout.axis_of(role.rel)
            n = t.shape[axis]
            per = layout.rows_per_expert(text, role.rel)
            if any(d != 1 for d in t.shape[:axis]) or n != e_old * per:
                raise GrowthError(f"{name}: its experts are not whole runs of rows along the leading axis; "
                                  "--select cannot pick them")
            parts = (Part(name), *(Part(name, std, rows=(e * per, (e + 1) * per, n)) for e in chosen))
            shape = tuple(n_new * per if i == axis else d for i, d in enumerate(t.shape))
            out.append(OutTensor(name, t.dtype, shape, parts, axis))
        elif role.rel in layout.axes.expert_tables and role.layer is not None and k_new != k_old:
            raise GrowthError(f"{name}: an expert table cannot follow top-k {k_old} -> {k_new} with --select")
        else:
            out.append(OutTensor(name, t.dtype, t.shape, (Part(name),)))
    plan = Plan("grow-width", layout, dict(config), new_config, _ordered(out), seed=seed, experts=n_new,
                factor=None, top_k=top_k, noise=noise, router_noise=router_noise, config_changes=changes,
                exact=False, allow_inexact=allow_inexact, why_inexact=WHY_INEXACT)
    plan.selection = {layer: sel[layer] for layer in sorted(sel)}
    plan.select = select
    plan.warnings.append(f"--experts {n_new} from {e_old} (--select {select}): the grown model does not compute "
                         f"the source's function ({WHY_INEXACT})")
    if not layout.width.exact_width:
        plan.warnings.append(f"{layout.name} {layout.width.inexact_reason}")
    return plan


# ---------------------------------------------------------------------------------------------
# Calibration: counts of top-k selections, one decoder layer in memory at a time


def _read_text(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: cannot read the calibration file ({type(e).__name__}: {e})") from None
    if not text.strip():
        raise SourceError(f"{path}: the calibration file is empty")
    return text


def tokenise(folder: Path, calibration: Path) -> list[int]:
    """The calibration file's token ids by the checkpoint's own tokenizer (special tokens as it adds them)."""
    text = _read_text(calibration)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except ImportError:
        raise MoegrowError("--select load needs transformers: pip install 'moegrow[forward]'") from None
    except Exception as e:  # no tokenizer files, or ones that do not load
        raise SourceError(f"{folder}: --select load needs the checkpoint's tokenizer, which does not load "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise SourceError(f"{calibration}: the calibration file gives no tokens")
    return ids


def router_classes(model: Any) -> tuple[type, ...]:
    """The module classes transformers records as `router_logits` for this model (its routers)."""
    recorders = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")
    found = []
    for r in recorders if isinstance(recorders, (list, tuple)) else [recorders]:
        cls = getattr(r, "target_class", r)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


def _indices(output: Any) -> Any:
    """The integer tensor of a router's output (its top-k expert indices), or None."""
    import torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    return next((x for x in items if isinstance(x, torch.Tensor) and not x.is_floating_point()), None)


def count_load(folder: Path, ids: Sequence[int], moe_layers: Sequence[int], e_old: int) -> dict[int, list[int]]:
    """Per MoE layer, how often the source's routers pick each expert over `ids`, run in float32.

    The tokens are cut into sequences of CHUNK (or max_position_embeddings) tokens, run PASS full ones per
    forward pass and the rest in a last one; each pass loads one decoder layer at a time
    (layerwise.StreamedModel), so memory is one layer plus the pass's activations, and a file of T tokens
    reads the checkpoint about T / (PASS * CHUNK) times.
    Families whose transformers router (the module recorded as `router_logits`) returns the top-k
    indices are supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss and the like.
    """
    from .layerwise import StreamedModel, _return_freed_layers, _torch

    torch = _torch()
    _return_freed_layers()
    model = StreamedModel(folder)
    counts: dict[int, Any] = {}
    try:
        classes = router_classes(model.model)
        if not classes:
            raise MoegrowError(f"{folder}: --select load: transformers records no router module for "
                               f"{type(model.model).__name__} (no router_logits output to count); use --select first")
        handles = []
        for i, layer in enumerate(model.layers):
            routers = [m for m in layer.modules() if isinstance(m, classes)]

            def hook(module: Any, args: Any, output: Any, i: int = i) -> None:
                idx = _indices(output)
                if idx is None:
                    raise MoegrowError(f"{folder}: --select load: {type(module).__name__} returns no expert indices "
                                       "(only logits); use --select first")
                counts[i] = counts.get(i, 0) + torch.bincount(idx.reshape(-1).long(), minlength=e_old)[:e_old]
            handles += [r.register_forward_hook(hook) for r in routers[:1]]
        text = model.model.config.get_text_config()
        length = min(CHUNK, getattr(text, "max_position_embeddings", None) or CHUNK)
        full = len(ids) // length * length
        rows = torch.tensor(ids[:full], dtype=torch.long).view(-1, length)
        batches = list(rows.split(PASS)) if full else []
        if full < len(ids):
            batches.append(torch.tensor(ids[full:]).view(1, -1))
        try:
            for batch in batches:
                with model.streaming(lambda *a: None):
                    model.logits(batch)
        finally:
            for h in handles:
                h.remove()
    finally:
        model.close()
    return {layer: [int(c) for c in counts[layer]] if layer in counts else [0] * e_old for layer in moe_layers}


def calibrate(folder: Path, calibration: str | Path, moe_layers: Sequence[int], e_old: int,
              n: int) -> dict[int, list[int]]:
    """`--select load`: per MoE layer the n most-routed experts (ties to the lower index); a layer the
    forward does not run (a multi-token-prediction layer) counts nothing and gets experts 0..n-1."""
    counts = count_load(folder, tokenise(folder, Path(calibration)), moe_layers, e_old)
    return {layer: rank(c, n) for layer, c in counts.items()}


def selection_for(select: str | None, calibration: str | None, folder: Path, config: Mapping[str, Any],
                  layout: Layout, tensors: Mapping[str, TensorMeta], n_new: int,
                  quantised: str = "") -> dict[int, list[int]]:
    """The selection `--select` asks for (see the module docstring). `quantised`: the source's quantisation
    format, if any: the calibration forward loads float checkpoints only (no quantizer in the layer loop)."""
    if select not in SELECTS:
        raise GrowthError(f"--experts {n_new} is not a multiple of the source's {layout.num_experts(config)} "
                          "experts: give --select load --calibration FILE or --select first"
                          if select is None else f"--select must be load or first, not {select!r}")
    anatomy = analyse({k: t.shape for k, t in tensors.items()}, config, layout)
    n = n_new - anatomy.num_experts
    if select == "first":
        if calibration:
            raise GrowthError("--calibration applies to --select load only")
        return first_selection(anatomy.moe_layers, n)
    if not calibration:
        raise GrowthError("--select load needs --calibration FILE (a plain text file)")
    if quantised:
        raise GrowthError(f"{folder}: --select load runs the source layer by layer in float32, which moegrow does "
                          f"for float checkpoints only, and this one is quantised ({quantised}); use --select first")
    return calibrate(folder, calibration, anatomy.moe_layers, anatomy.num_experts, n)

