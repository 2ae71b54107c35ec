"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv 2212.05055): a dense checkpoint into its MoE sibling.

Every MoE layer's experts are copies of the dense layer's MLP (Gaussian noise on all but expert 0 with
`--noise`), the router is new: zeros (every expert scores the same, so with the sibling's routing set
to give weights that sum to 1 the MoE model computes the dense function) or normal(std) drawn from the
seed. The plan is the same `Plan` growths make: the executor, provenance, `--dry-run` and `verify` use it
as they are. Which dense family has which sibling, and how names and config map, is data in
`siblings.py`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .anatomy import expert_name, layer_name
from .errors import ConfigError, GrowthError, UnsupportedModelError
from .io import FLOAT_DTYPES
from .layouts import Layout, layout_for, lookup
from .neurons import Reinit, check_consistent, check_noise_mode, check_reinit, neuron_axis, refuse_unknown
from .plan import OutTensor, Part, Plan, TensorMeta, _check_noise, _ordered
from .siblings import BY_DENSE, REFUSED, SIBLINGS, NewTensor, Sibling

ROUTER_INITS = ("zeros", "normal")
DEFAULT_ROUTER_STD = 0.02  # transformers' usual initializer_range


def sibling_for(config: Mapping[str, Any], to: str | None, where: str = "config.json") -> Sibling:
    """The sibling of the dense config's model_type (`to` picks one by MoE model_type), or a refusal."""
    dense = config.get("model_type")
    if not isinstance(dense, str):
        raise ConfigError(f"{where}: no model_type")
    if to is not None and (dense, to) in REFUSED:
        raise UnsupportedModelError(f"{where}: cannot upcycle {dense} into {to}: {REFUSED[dense, to]}")
    pairs = ", ".join(f"{s.dense} -> {s.moe}" for s in SIBLINGS)
    found = [s for s in BY_DENSE.get(dense, ()) if to is None or s.moe == to]
    if not found:
        what = f"{dense} into {to}" if to else f"model_type {dense!r}"
        raise UnsupportedModelError(f"{where}: cannot upcycle {what}: no known MoE sibling (supported: {pairs})")
    return found[0]


def _int_key(config: Mapping[str, Any], key: str, where: str) -> int:
    value = lookup(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}: {key} must be a positive integer, not {value!r}")
    return value


def upcycle_config(config: Mapping[str, Any], sib: Sibling, experts: int, top_k: int,
                   where: str = "config.json") -> tuple[dict[str, Any], list[str]]:
    """The MoE sibling's config from the dense one, and the changes as `key: old -> new` lines."""
    for key, why in sib.refuse:
        if lookup(config, key):
            raise UnsupportedModelError(f"{where}: cannot upcycle {sib.dense} with {key}={lookup(config, key)!r} "
                                        f"into {sib.moe}: {why}")
    new = {k: v for k, v in config.items() if k not in sib.drop_keys}
    for key, value, aliases in sib.defaults:  # the dense class's defaults the MoE class does not share
        if key not in config and not any(a in config for a in aliases):
            new[key] = config.get(value[1:]) if isinstance(value, str) and value.startswith("@") else value
    for moe_key, dense_key in sib.copy_keys:
        new[moe_key] = _int_key(config, dense_key, where)
    new.update({k: v for k, v in sib.set_keys})
    new["model_type"] = sib.moe
    new["architectures"] = [sib.architecture]
    new[sib.experts_key] = experts
    new[sib.top_k_key] = top_k
    changes = [f"{k}: {config[k]!r} removed" if k not in new else f"{k}: {new[k]!r} (added)" if k not in config
               else f"{k}: {config[k]!r} -> {new[k]!r}"
               for k in sorted(set(config) | set(new)) if config.get(k) != new.get(k) or (k in config) != (k in new)]
    return new, changes


def _dense_layers(tensors: Mapping[str, TensorMeta], prefix: str, n: int) -> dict[int, dict[str, str]]:
    """{layer: {name relative to the layer: full name}} for the decoder layers 0..n-1."""
    layers: dict[int, dict[str, str]] = {i: {} for i in range(n)}
    for name in tensors:
        if not name.startswith(prefix):
            continue
        idx, dot, rel = name[len(prefix):].partition(".")
        if dot and idx.isdigit() and int(idx) < n:
            layers[int(idx)][rel] = name
    return layers


def _needed(sib: Sibling) -> set[str]:
    """The dense layer tensors the sibling's experts and extra tensors are made of."""
    used = {s for _, sources in sib.experts for s in sources}
    return used | {r for x in sib.extra for r in (*x.copy, x.like) if r}


def _shape(x: NewTensor, config: Mapping[str, Any], layer: Mapping[str, str],
           tensors: Mapping[str, TensorMeta], where: str) -> tuple[int, ...]:
    if x.copy:
        first = tuple(tensors[layer[x.copy[0]]].shape)
        return (sum(tensors[layer[r]].shape[0] for r in x.copy), *first[1:])
    if x.like:
        return tuple(tensors[layer[x.like]].shape)
    return tuple(d if isinstance(d, int) else _int_key(config, d, where) for d in x.shape)


def plan_upcycle(config: Mapping[str, Any], tensors: Mapping[str, TensorMeta], experts: int, top_k: int, *,
                 noise: float = 0.0, seed: int = 0, router_init: str = "zeros",
                 router_std: float = DEFAULT_ROUTER_STD, to: str | None = None, where: str = "config.json",
                 source: str = "SOURCE", noise_mode: str = "absolute", reinit: float = 0.0) -> Plan:
    """The plan that turns a dense checkpoint into its MoE sibling with `experts` experts, top-`top_k`."""
    sib = sibling_for(config, to, where)
    if experts < 1:
        raise GrowthError(f"--experts must be at least 1, not {experts}")
    if not 1 <= top_k <= experts:
        raise GrowthError(f"--top-k must be between 1 and --experts ({experts}), not {top_k}")
    if router_init not in ROUTER_INITS:
        raise GrowthError(f"--router-init must be zeros or normal, not {router_init!r}")
    for flag, std in (("--noise", noise), ("--router-std", router_std)):
        if not (math.isfinite(std) and std >= 0):
            raise GrowthError(f"{flag}: the std must be a finite number >= 0, not {std}")
    relative = check_noise_mode(noise_mode) == "relative"
    check_reinit(reinit)
    new_config, changes = upcycle_config(config, sib, experts, top_k, where)
    layout = layout_for(new_config, where, tensors)
    n = _int_key(config, "num_hidden_layers", where)
    layers = _dense_layers(tensors, layout.names.layer_prefix, n)
    needed = _needed(sib)
    out: list[OutTensor] = []
    in_layers = {name for rels in layers.values() for name in rels.values()}
    out += [OutTensor(name, t.dtype, t.shape, (Part(name),)) for name, t in tensors.items() if name not in in_layers]
    for i, rels in layers.items():
        missing = sorted(needed - set(rels))
        if missing:
            raise ConfigError(f"{source}: layer {i} has no {layout.names.layer_prefix}{i}.{missing[0]} (the dense "
                              f"MLP a {sib.dense} checkpoint has; {n} layers per {where})")
        lost = sorted(r for r in rels if r.startswith(sib.mlp_prefix) and r not in needed)
        if lost:
            raise UnsupportedModelError(f"{source}: {rels[lost[0]]} has no place in {sib.moe}'s experts (a bias "
                                        f"or quantisation tensor?); upcycling would drop it")
        out += [OutTensor(name, tensors[name].dtype, tensors[name].shape, (Part(name),))
                for rel, name in rels.items() if not rel.startswith(sib.mlp_prefix)]
        out += _experts(sib, layout, i, rels, tensors, experts, noise, relative, reinit)
        out += _new_tensors(sib, layout, config, i, rels, tensors, experts, noise=router_std,
                            router_init=router_init, where=where)
    if reinit:
        check_consistent(out, sib.dense)
    # identical experts whose weights sum to 1 give the dense output whatever the router picks
    exact = router_init == "zeros" or sib.weights_sum_to_one
    plan = Plan("upcycle", layout, dict(config), new_config, _ordered(out), seed=seed, experts=experts,
                top_k=top_k, noise=noise, config_changes=changes, exact=exact, noise_mode=noise_mode, reinit=reinit)
    plan.upcycle = {"dense_model_type": sib.dense, "router_init": router_init,
                    "router_std": router_std if router_init == "normal" else 0.0,
                    "why_exact": "; ".join((sib.why_exact, *sib.notes))}
    plan.why_inexact = ("noise on the expert copies; exact at --noise 0" if exact and not reinit else
                        "--reinit re-initialises neurons of experts 1.."
                        if exact else
                        f"--router-init normal: {sib.moe}'s top-k weights do not sum to 1; exact at --router-init "
                        "zeros --noise 0")
    plan.config_changes.append(f"every layer's MLP -> {experts} experts (copies of it), top-{top_k}, router "
                               f"{router_init}" + (f" (std {router_std:g})" if router_init == "normal" else ""))
    return plan


def _experts(sib: Sibling, layout: Layout, layer: int, rels: Mapping[str, str], tensors: Mapping[str, TensorMeta],
             experts: int, noise: float, relative: bool = False, reinit: float = 0.0) -> list[OutTensor]:
    """Every expert of one layer from its dense MLP: per-expert tensors, or fused ones [E, ...].

    Expert e > 0 is copy e of the dense MLP: --noise-mode relative and --reinit (key: layer, 0, e) apply."""
    def part(s: str, e: int) -> Part:
        p = Part(rels[s], noise if e else 0.0)
        if not e:
            return p
        rein = None
        if reinit and len(tensors[rels[s]].shape) == 2:  # weights; biases stay copies
            found = neuron_axis(layout, s, False)
            if found is None:
                raise refuse_unknown(sib.dense, rels[s])
            _check_noise(rels[s], tensors[rels[s]], reinit, "re-initialise neurons of")
            rein = Reinit(reinit, tuple(tensors[rels[s]].shape), found[0], found[1], layer, 0, e)
        return replace(p, relative=relative and bool(noise), reinit=rein)

    out = []
    for rel, sources in sib.experts:
        metas = [tensors[rels[s]] for s in sources]
        dtype, rest = metas[0].dtype, tuple(metas[0].shape[1:])
        for s, m in zip(sources, metas):
            _check_noise(rels[s], m, noise)
            if (m.dtype, tuple(m.shape[1:])) != (dtype, rest):
                raise ConfigError(f"{rels[s]}: {m.dtype}{list(m.shape)} cannot be fused with "
                                  f"{rels[sources[0]]} ({dtype}{list(metas[0].shape)})")
        rows = sum(m.shape[0] for m in metas)
        if rel in layout.names.fused_experts:
            parts = tuple(part(s, e) for e in range(experts) for s in sources)
            out.append(OutTensor(layer_name(layout, layer, rel), dtype, (experts, rows, *rest), parts))
        else:
            for e in range(experts):
                parts = tuple(part(s, e) for s in sources)
                out.append(OutTensor(expert_name(layout, layer, e, rel), dtype, (rows, *rest), parts))
    return out


def _new_tensors(sib: Sibling, layout: Layout, config: Mapping[str, Any], layer: int, rels: Mapping[str, str],
                 tensors: Mapping[str, TensorMeta], experts: int, *, noise: float, router_init: str,
                 where: str) -> list[OutTensor]:
    """The router [E, hidden] (zeros or normal) and the sibling's extra tensors of one layer."""
    dtype = tensors[rels[sib.experts[0][1][0]]].dtype
    if dtype not in FLOAT_DTYPES:
        raise UnsupportedModelError(f"{rels[sib.experts[0][1][0]]}: dtype {dtype} is not a float type; a "
                                    f"quantised dense checkpoint cannot be upcycled (dequantise it first)")
    hidden = _int_key(config, "hidden_size", where)
    router = Part("", noise if router_init == "normal" else 0.0, init=router_init)
    out = [OutTensor(layer_name(layout, layer, layout.names.router_weights[0]), dtype, (experts, hidden), (router,))]
    for x in sib.extra:
        shape = _shape(x, config, rels, tensors, where)
        parts = tuple(Part(rels[r]) for r in x.copy) if x.copy else (Part("", init=x.init),)
        out.append(OutTensor(layer_name(layout, layer, x.rel), dtype, shape, parts))
    return out


def parse_count(spec: str | int, flag: str) -> int:
    try:
        return int(spec)
    except (TypeError, ValueError):
        raise GrowthError(f"{flag} must be an integer, not {spec!r}") from None


def plan_upcycle_for(source: Any, *, experts: str | int | None = None, top_k: str | int | None = None,
                     noise: float = 0.0, seed: int = 0, router_init: str = "zeros",
                     router_std: float = DEFAULT_ROUTER_STD, to: str | None = None, noise_mode: str = "absolute",
                     reinit: float = 0.0) -> Plan:
    """`plan_upcycle` from command-line style arguments and an opened `Source`."""
    if experts is None or top_k is None:
        raise GrowthError("give --experts (e.g. 8) and --top-k (e.g. 2)")
    return plan_upcycle(source.config, source.tensors, parse_count(experts, "--experts"), parse_count(top_k, "--top-k"),
                        noise=noise, seed=seed, router_init=router_init, router_std=router_std, to=to,
                        where=f"{source.spec}/config.json", source=str(source.spec), noise_mode=noise_mode,
                        reinit=reinit)


def rebuild_upcycle(source: Any, record: Mapping[str, Any]) -> Plan:
    """The upcycling plan a provenance record describes, rebuilt from the (dense) source."""
    g = record.get("growth") or {}
    return plan_upcycle_for(source, experts=g.get("experts"), top_k=g.get("top_k"),
                            noise=float(g.get("noise") or 0.0), seed=int(g.get("seed") or 0),
                            router_init=str(g.get("router_init") or "zeros"),
                            router_std=float(g.get("router_std") or 0.0), to=record.get("model_type"),
                            noise_mode=str(g.get("noise_mode") or "absolute"), reinit=float(g.get("reinit") or 0.0))


def dense_param_count(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Parameters of a dense checkpoint (all of them active per token)."""
    return sum(math.prod(s) for s in shapes.values())


__all__ = ["DEFAULT_ROUTER_STD", "ROUTER_INITS", "dense_param_count", "plan_upcycle", "plan_upcycle_for",
           "rebuild_upcycle", "sibling_for", "upcycle_config"]
