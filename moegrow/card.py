"""The grown checkpoint's model card, README.md: what was grown from what, and how to do it again.

YAML front matter for the Hub (`base_model`, the source's `license`, `library_name`, `tags`,
`pipeline_tag`), then the growth (operation, layer map, experts, top-k, noise, seed, parameters
before and after, whether the function is preserved), the command that reproduces it, and the
source's own card below its own heading. No timestamps and no output path: the same growth
gives the same bytes wherever it is written (the command names the output OUTPUT).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .counts import growth_param_counts
from .noise import DEFAULT_GENERATOR
from .plan import Plan
from .source import Source

if TYPE_CHECKING:  # huggingface_hub's card module takes 0.3 s to import: only when a card is written
    from huggingface_hub import ModelCardData

CARD_NAME = "README.md"
TAG = "moegrow"
# source metadata that still describes the grown model; datasets, metrics and eval results do not
_CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag")
# growth flags in the order the command writes them, with the defaults it leaves out
_FLAGS = ("layers", "method", "layer_map", "depth_init", "experts", "select", "calibration", "noise", "noise_mode",
          "reinit", "router_noise", "seed", "noise_generator", "top_k", "allow_inexact", "router_init", "router_std",
          "to", "revision", "max_shard_size", "device")
_DEFAULTS: dict[str, Any] = {"method": "interpose", "noise": 0.0, "router_noise": 0.0, "seed": 0,
                             "top_k": "scale", "allow_inexact": False, "router_init": "zeros", "router_std": 0.02,
                             "depth_init": "copy", "noise_mode": "absolute", "reinit": 0.0,
                             "noise_generator": DEFAULT_GENERATOR}
_WHAT = {"grow-depth": "layers copied", "grow-width": "experts duplicated with their router rows",
         "grow": "layers copied, then experts duplicated with their router rows",
         "upcycle": "every expert a copy of the dense MLP, new routers"}
_PAPER = {"upcycle": "sparse upcycling, arXiv 2212.05055"}  # others: checkpoint recycling, arXiv 2510.08008


def card_modules(source_folder: Path) -> tuple[str, ...]:
    """The huggingface_hub modules `render_card` will import for this source (imported in the
    background while the shards are written): the card parser only where the source has a card."""
    has_card = (source_folder / CARD_NAME).is_file()
    return ("huggingface_hub.repocard",) if has_card else ("huggingface_hub.repocard_data",)


def read_source_card(folder: Path) -> tuple[dict[str, Any], str] | None:
    """(front matter, body without it) of the source's README.md; None when it has none.

    Front matter that does not parse is dropped (nothing carried), never an error: a card is
    documentation, and a growth must not fail on it.
    """
    path = folder / CARD_NAME
    if not path.is_file():  # before the import: huggingface_hub.repocard costs 0.2 s of CPU, its data half 0.1 s
        return None
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    text = path.read_text(encoding="utf-8", errors="replace")
    match = REGEX_YAML_BLOCK.search(text)
    if not match:
        return {}, text
    try:
        meta = ModelCard(text, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # yaml's errors (pyyaml comes with huggingface_hub), or a block that is not a mapping
        meta = {}
    return meta, text[match.end():]


def card_data(source: Source, meta: Mapping[str, Any]) -> ModelCardData:
    """The grown card's metadata: the source as base_model, its license and pipeline tag, its tags + moegrow.

    `base_model_relation` is left out on purpose: the Hub's values (adapter, merge, quantized,
    finetune) do not describe a growth, and without it the Hub infers the relation itself.
    """
    from huggingface_hub import ModelCardData

    carried = {k: meta[k] for k in _CARRIED if meta.get(k) is not None}
    tags = meta.get("tags") or []
    tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
    return ModelCardData(base_model=source.repo_id or source.spec, library_name="transformers",
                         tags=list(dict.fromkeys([TAG, *tags])), **carried)


def plan_options(plan: Plan) -> dict[str, Any]:
    """The growth flags that rebuild `plan` (for a growth written from the Python API)."""
    if plan.upcycle:
        return {"experts": plan.experts, "top_k": plan.top_k, "noise": plan.noise, "seed": plan.seed,
                "router_init": plan.upcycle["router_init"], "router_std": plan.upcycle["router_std"] or None,
                "to": plan.config.get("model_type"), "noise_mode": plan.noise_mode, "reinit": plan.reinit,
                "noise_generator": plan.noise_generator}
    return {"layer_map": plan.layer_map,
            "experts": f"{plan.factor}x" if plan.factor else plan.experts if plan.selection is not None else None,
            **({"select": plan.select} if plan.select in ("load", "first") else {}),
            "noise": plan.noise, "router_noise": plan.router_noise, "seed": plan.seed,
            "top_k": plan.top_k, "allow_inexact": plan.allow_inexact, "depth_init": plan.depth_init,
            "noise_mode": plan.noise_mode, "reinit": plan.reinit, "noise_generator": plan.noise_generator}


def command(operation: str, source: str, options: Mapping[str, Any]) -> str:
    """`moegrow OPERATION SOURCE OUTPUT --flag value ...` quoted for a POSIX shell.

    Flags at their defaults are left out, except `--seed` and `--noise-generator` where noise is drawn; flags that do
    not change the output's bytes (threads, quiet, json, force, strict) are never passed here.
    """
    argv = ["moegrow", operation, source, "OUTPUT"]
    noised = bool(options.get("noise") or options.get("router_noise") or options.get("router_init") == "normal"
                  or options.get("reinit"))
    for key in _FLAGS:
        value = options.get(key)
        if value is None or (value == _DEFAULTS.get(key) and not (key in ("seed", "noise_generator") and noised)):
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return shlex.join(argv)


def _growth(plan: Plan, source: Source) -> list[str]:
    """The body's account of what was done, as markdown lines."""
    layout, old, new = plan.layout, plan.source_config, plan.config
    (total0, active0), (total1, active1) = growth_param_counts(plan, source)
    rows = [("layers", layout.num_layers(old), layout.num_layers(new)),
            ("routed experts", "dense" if plan.upcycle else layout.num_experts(old), layout.num_experts(new)),
            ("experts per token (top-k)", "-" if plan.upcycle else layout.top_k(old), layout.top_k(new)),
            ("parameters", f"{total0:,}", f"{total1:,}"),
            ("active parameters per token", f"{active0:,}", f"{active1:,}")]
    lines = ["| | source | grown |", "|---|---:|---:|", *(f"| {a} | {b} | {c} |" for a, b, c in rows), ""]
    lines.append(f"- operation: `{plan.operation}`")
    if plan.layer_map is not None:
        lines.append(f"- layer map (new layer i copies source layer map[i]): `{','.join(map(str, plan.layer_map))}`")
        for what, filled in plan.filled().items():  # --depth-init identity
            verb = "zeroed" if what == "zeroed" else "set to 1"
            lines.append(f"- depth init `identity` (LLaMA Pro block expansion): the first occurrence of each layer "
                         f"is the original; in the added copies {filled['count']} tensors are {verb}: "
                         + ", ".join(f"`{r}`" for r in filled["tensors"]))
    if plan.factor:
        lines += [f"- experts: {plan.factor}x (copy j of expert e is expert e + j*E), top-k: `{plan.top_k}`",
                  f"- noise: std {plan.noise:g} on the copies' expert weights, {plan.router_noise:g} on their "
                  f"router rows, seed {plan.seed}"]
        if plan.allow_inexact:
            lines.append("- `--allow-inexact`: this family's routing cannot be preserved by duplication")
    if plan.selection is not None:  # --select: N - E chosen experts copied
        e_old = layout.num_experts(old)
        how = ("the experts the source routes to most often on the calibration file (--calibration)"
               if plan.select == "load" else f"experts 0..{plan.experts - e_old - 1}" if plan.select == "first"
               else "a recorded selection")
        lines += [f"- experts: {e_old} -> {plan.experts}, --select `{plan.select}`: new expert E+i of a layer is "
                  f"a copy of its i-th selected expert, {how}; top-k: `{plan.top_k}`",
                  "- selected experts per MoE layer (also in `moegrow.json`, so `moegrow verify` needs no "
                  "calibration file): " + "; ".join(f"{k}: {','.join(map(str, v))}" for k, v in plan.selection.items()),
                  f"- noise: std {plan.noise:g} on the copies' expert weights, {plan.router_noise:g} on their "
                  f"router rows, seed {plan.seed}"]
    if plan.upcycle:
        up = plan.upcycle
        router = "zeros" if up["router_init"] == "zeros" else f"normal, std {up['router_std']:g}"
        lines += [f"- upcycled from `{up['dense_model_type']}`: {plan.experts} experts, each a copy of the dense "
                  f"MLP, top-{plan.top_k}; noise std {plan.noise:g} on every expert but expert 0, router "
                  f"{router}, seed {plan.seed}", f"- why the function can be kept: {up['why_exact']}"]
    if plan.noise_mode == "relative":
        lines.append("- noise mode: relative (each std above is a fraction of the source expert tensor's own std)")
    if plan.reinit:
        lines.append(f"- Drop-Upcycling (arXiv 2502.19261): {plan.reinit:g} of every copy's intermediate neurons "
                     "re-initialised from a normal with the original expert's mean and std")
    lines += [f"- config: {c}" for c in plan.config_changes]
    lines.append(f"- function-preserving: {plan.preservation()}")
    lines += [f"- warning: {w}" for w in plan.warnings]
    return lines


def render_card(plan: Plan, source: Source, options: Mapping[str, Any]) -> str:
    """README.md of the grown checkpoint. `options`: the growth flags as given (see `command`)."""
    found = read_source_card(source.folder)
    meta, body = found or ({}, "")
    base = source.repo_id or source.spec
    name = source.repo_id.rpartition("/")[2] if source.repo_id else Path(source.spec).name
    at = f" at commit `{source.commit}`" if source.repo_id and source.commit else ""
    below = "; the source's card follows below" if body.strip() else ""
    paper = _PAPER.get(plan.operation, "arXiv 2510.08008")
    lines = [f"# {name or source.folder.resolve().name}, grown with moegrow", "",
             f"This checkpoint was grown from `{base}`{at} by moegrow {__version__} with `{plan.operation}` "
             f"({_WHAT[plan.operation]}; {paper}). It loads with transformers as it is{below}.", "",
             "## Growth", "", *_growth(plan, source), "",
             "## Reproduce", "", "```sh", command(plan.operation, source.spec, options), "```", "",
             "OUTPUT is any new folder: run on the same source, the command writes the same tensors, config "
             "and card. "
             "`moegrow.json` beside this card records the source's fingerprint and which source tensors "
             "(and noise) every output tensor is made of; `moegrow verify SOURCE OUTPUT` checks the "
             "checkpoint against it."]
    if body.strip():
        lines += ["", "## Source model card", "", body.strip("\n")]
    text = "\n".join(lines).rstrip() + "\n"
    return f"---\n{card_data(source, meta).to_yaml()}\n---\n\n{text}"
