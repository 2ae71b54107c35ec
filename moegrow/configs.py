"""Config rewriting: which layers a config makes MoE, and the new config after a growth.

Everything family-specific comes from the layout's `DepthKey` and `WidthRule` entries; this
module only knows the kinds of key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import ConfigError, GrowthError
from .layouts import DepthKey, Layout, lookup


def _all(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    return set(range(n))


def _dense_prefix(config: Mapping[str, Any], n: int, layout: Layout) -> int:
    """The count of leading dense layers: the layout's dense-prefix key, else its default."""
    value = config.get(layout.moe.dense_prefix_key)
    return min(int(value if value is not None else layout.moe.default_dense), n)


def _first_k_dense(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    return set(range(_dense_prefix(config, n, layout), n))


def _sparse_step(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    step = int(config.get("decoder_sparse_step") or 1)
    dense = set(config.get("mlp_only_layers") or [])
    return {i for i in range(n) if i not in dense and (i + 1) % step == 0}


MOE_TYPE, DENSE_TYPE = "sparse", "dense"  # the values of an `mlp_layer_types` list


def _mlp_layer_types(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    """`mlp_layer_types[i] == "sparse"`; without the list, a dense prefix (see `_dense_prefix`)."""
    types = config.get("mlp_layer_types")
    if types is None:
        return _first_k_dense(config, n, layout)
    if not isinstance(types, list) or len(types) != n:
        raise ConfigError(f"config.json: mlp_layer_types should list {n} layers, has "
                          f"{len(types) if isinstance(types, list) else types!r}")
    return {i for i, t in enumerate(types) if t == MOE_TYPE}


def _block_types(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    """One block kind per layer: MoE where the first present per-layer key holds the MoE value."""
    for key, moe in layout.moe.moe_block_types:
        types = config.get(key)
        if types is not None:
            if not isinstance(types, (list, str)) or len(types) != n:
                raise ConfigError(f"config.json: {key} should give {n} layers, has {types!r}")
            return {i for i, t in enumerate(types) if t == moe}
    raise ConfigError(f"config.json: no per-layer block types (looked for "
                      f"{', '.join(k for k, _ in layout.moe.moe_block_types)})")


def _moe_layer_list(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    """An explicit list of MoE layer indices (llama4_text `moe_layers`); else every
    `interleave_moe_layer_step`-th layer, as the config class derives it."""
    listed = config.get("moe_layers")
    if listed is None:
        step = int(config.get("interleave_moe_layer_step") or 1)
        return set(range(step - 1, n, step))
    if not isinstance(listed, list) or not all(isinstance(i, int) for i in listed):
        raise ConfigError(f"config.json: moe_layers should be a list of layer indices, not {listed!r}")
    return {i for i in listed if 0 <= i < n}


def _range_values(config: Mapping[str, Any], n: int, layout: Layout) -> tuple[int, int, int]:
    (skey, sdef), (ekey, edef), (ikey, idef) = layout.moe.moe_range
    values = []
    for key, default in ((skey, sdef), (ekey, edef), (ikey, idef)):
        v = config.get(key)
        v = default if v is None else v
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"config.json: {key} must be an integer layer index, not {v!r}")
        values.append(v)
    start, end, interval = values
    if interval < 1:
        raise ConfigError(f"config.json: {ikey} must be a positive integer, not {interval!r}")
    return start, n - 1 if end == -1 else end, interval


def _layer_range(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    """ernie4_5_moe: MoE iff start <= i <= end and (i + 1) % interval == 0."""
    start, end, interval = _range_values(config, n, layout)
    return {i for i in range(n) if start <= i <= end and (i + 1) % interval == 0}


def _express_range(want: set[int], n_new: int, interval: int) -> tuple[int, int, int] | None:
    """A (start, end, interval) that gives exactly `want`, trying the source's interval first."""
    if not want:
        return None
    lo, hi = min(want), max(want)
    for iv in dict.fromkeys((interval, *range(1, n_new + 1))):
        if {i for i in range(lo, hi + 1) if (i + 1) % iv == 0} == want:
            return lo, hi, iv
    return None


def _period_values(config: Mapping[str, Any], dk: DepthKey) -> tuple[int, int]:
    values = []
    for key, default in ((dk.key, dk.default[0]), (dk.companion, dk.default[1])):
        v = lookup(config, key)
        v = default if v is None else v
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"config.json: {key} must be a non-negative integer, not {v!r}")
        values.append(v)
    period, offset = values
    if period < 1:
        raise ConfigError(f"config.json: {dk.key} must be a positive integer, not {period!r}")
    return period, offset


def _periodic(config: Mapping[str, Any], n: int, dk: DepthKey) -> set[int]:
    period, offset = _period_values(config, dk)
    return {i for i in range(n) if i % period == offset}


def _moe_period(config: Mapping[str, Any], n: int, layout: Layout) -> set[int]:
    """jamba: MoE iff i % period == offset (the layout's `moe_period_key` and its companion)."""
    return _periodic(config, n, next(d for d in layout.depth.depth_keys if d.key == layout.moe.moe_period_key))


def _express_period(want: set[int], n_new: int, period: int) -> tuple[int, int] | None:
    """A (period, offset) that selects exactly `want` of n_new layers, trying the source's period first."""
    for p in dict.fromkeys((period, *range(1, n_new + 1))):
        for o in range(p):
            if {i for i in range(n_new) if i % p == o} == want:
                return p, o
    return None


# How a family's config says which decoder layers are MoE (named by MoeLayers.moe_rule).
MOE_RULES: dict[str, Callable[[Mapping[str, Any], int, Layout], set[int]]] = {
    "all": _all,
    "first_k_dense": _first_k_dense,
    "sparse_step": _sparse_step,
    "mlp_layer_types": _mlp_layer_types,
    "block_types": _block_types,
    "moe_layer_list": _moe_layer_list,
    "layer_range": _layer_range,
    "period": _moe_period,
}


def config_moe_layers(config: Mapping[str, Any], layout: Layout) -> set[int]:
    config = layout.text(config)
    return MOE_RULES[layout.moe.moe_rule](config, layout.num_layers(config), layout)


def check_moe_layers(config: Mapping[str, Any], layout: Layout, moe_layers: Sequence[int],
                     where: str = "config.json") -> None:
    """Refuse a config whose MoE layers differ from the layers that hold expert tensors."""
    config = layout.text(config)
    n = layout.num_layers(config)
    said = config_moe_layers(config, layout)
    found = {i for i in moe_layers if i < n}
    if said != found:
        diff = sorted(said ^ found)[0]
        raise ConfigError(f"{where}: layer {diff} is {'MoE' if diff in said else 'dense'} per the "
                          f"config but {'MoE' if diff in found else 'dense'} in the tensors")


def _prefix_count(key: str, k: int, layer_map: Sequence[int], n_old: int) -> int:
    if k >= n_old:  # the prefix covers every layer: keep covering every layer
        return max(k, len(layer_map))
    new_k = sum(1 for m in layer_map if m < k)
    if not all(m < k for m in layer_map[:new_k]) or any(m < k for m in layer_map[new_k:]):
        raise GrowthError(f"config key {key}={k} (the first {k} layers differ) cannot express this "
                          f"layer map: layers copied from the first {k} are not all at the front")
    return new_k


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        config = config[part]
    config[last] = value


def _reused(types: Sequence[Any], j: int, reuses: str) -> int | None:
    """The nearest layer before j that does not reuse (the one layer j reuses), if any."""
    return next((i for i in range(j - 1, -1, -1) if types[i] != reuses), None)


def _check_reuse(dk: DepthKey, value: Sequence[Any], layer_map: Sequence[int]) -> None:
    """Refuse a map where a copied reusing layer would reuse a layer other than a copy of its original's."""
    new = [value[m] for m in layer_map]
    for j, m in enumerate(layer_map):
        if new[j] != dk.reuses:
            continue
        was, now = _reused(value, m, dk.reuses), _reused(new, j, dk.reuses)
        if now is None or layer_map[now] != was:
            got = "no earlier layer" if now is None else f"a copy of layer {layer_map[now]}"
            raise GrowthError(f"config key {dk.key} cannot express this layer map: new layer {j} (a copy of "
                              f"'{dk.reuses}' layer {m}, which reuses layer {was}) would reuse {got}")


def rewrite_depth(config: Mapping[str, Any], layout: Layout, layer_map: Sequence[int],
                  moe_layers: Sequence[int]) -> tuple[dict[str, Any], list[str]]:
    """The config after depth growth by `layer_map` (new layer j copies old layer layer_map[j]).

    Returns the new config and the keys changed (dotted paths from the top: a multimodal config's
    decoder keys as ``text_config.KEY``). Refuses a map the config cannot express.
    """
    outer, config = config, layout.text(config)
    n_old = layout.num_layers(config)
    new = copy.deepcopy(dict(config))
    changed: list[str] = []
    source_moe = {i for i in moe_layers if i < n_old}
    want = {j for j, m in enumerate(layer_map) if m in source_moe}
    # sparse_step last: it overrides its companion index list
    for dk in sorted(layout.depth.depth_keys, key=lambda d: d.kind == "sparse_step"):
        value = lookup(new, dk.key)
        if value is None and dk.kind == "moe_types" and "." not in dk.key:
            # a default derived from other keys cannot follow every map: write the list out
            new[dk.key] = [MOE_TYPE if j in want else DENSE_TYPE for j in range(len(layer_map))]
            changed.append(dk.key)
            continue
        if value is None and dk.kind != "period":  # a period pair has defaults
            continue
        if dk.kind == "count":
            _set(new, dk.key, len(layer_map))
        elif dk.kind in ("per_layer", "moe_types"):
            if not isinstance(value, list) or len(value) != n_old:
                raise ConfigError(f"config.json: {dk.key} should list {n_old} layers, has "
                                  f"{len(value) if isinstance(value, list) else value!r}")
            _set(new, dk.key, [value[m] for m in layer_map])
        elif dk.kind == "per_layer_reuse":
            if not isinstance(value, list) or len(value) != n_old:
                raise ConfigError(f"config.json: {dk.key} should list {n_old} layers, has "
                                  f"{len(value) if isinstance(value, list) else value!r}")
            _check_reuse(dk, value, layer_map)
            _set(new, dk.key, [value[m] for m in layer_map])
        elif dk.kind == "per_layer_dict":
            if not isinstance(value, dict) or not all(str(k).isdigit() for k in value):
                raise ConfigError(f"config.json: {dk.key} must be a dict keyed by layer index, not {value!r}")
            entries = {int(k): v for k, v in value.items()}
            _set(new, dk.key, {str(j): copy.deepcopy(entries[m]) for j, m in enumerate(layer_map) if m in entries})
        elif dk.kind == "suffix_count":
            k = int(value)
            new_k = sum(1 for m in layer_map if m >= n_old - k)
            if any(m < n_old - k for m in layer_map[len(layer_map) - new_k:]):
                raise GrowthError(f"config key {dk.key}={k} (the last {k} layers differ) cannot express this "
                                  f"layer map: layers copied from the last {k} are not all at the end")
            _set(new, dk.key, new_k)
        elif dk.kind == "per_layer_chars":
            if not isinstance(value, str) or len(value) != n_old:
                raise ConfigError(f"config.json: {dk.key} should have one character for each of "
                                  f"{n_old} layers, is {value!r}")
            _set(new, dk.key, "".join(value[m] for m in layer_map))
        elif dk.kind in ("index_list", "index_list_1based", "ranked_index_list_1based"):
            base = 0 if dk.kind == "index_list" else 1
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ConfigError(f"config.json: {dk.key} must be a list of layer indices, not {value!r}")
            listed = sorted({i - base for i in value})
            new_list = [j for j, m in enumerate(layer_map) if m in listed]
            ranks = [listed.index(layer_map[j]) for j in new_list]
            if dk.kind == "ranked_index_list_1based" and ranks != list(range(len(new_list))):
                # a listed layer's module is built from its rank in the list: a copy must keep it
                raise GrowthError(f"config key {dk.key}={value} cannot express this layer map: a copied "
                                  f"listed layer would change its rank in the list (its tensors depend on it)")
            _set(new, dk.key, [j + base for j in new_list])
        elif dk.kind == "prefix_count":
            _set(new, dk.key, _prefix_count(dk.key, int(value), layer_map, n_old))
        elif dk.kind == "dense_prefix":
            # informational only (another key decides): the new run of leading dense layers
            _set(new, dk.key, next((j for j in range(len(layer_map)) if j in want), len(layer_map)))
        elif dk.kind == "moe_range":
            _, _, interval = _range_values(config, n_old, layout)
            found = _express_range(want, len(layer_map), interval)
            if found is None:
                keys = ", ".join(k for k, _ in layout.moe.moe_range)
                raise GrowthError(f"config keys {keys} (one range of MoE layers) cannot express this layer "
                                  f"map: the new MoE layers would be {sorted(want)}")
            for (key, _), v in zip(layout.moe.moe_range, found, strict=True):
                if lookup(new, key) != v:
                    _set(new, key, v)
                    changed.append(key)
        elif dk.kind == "period":
            period, offset = _period_values(config, dk)
            chosen = {j for j, m in enumerate(layer_map) if m < n_old and m % period == offset}
            found = _express_period(chosen, len(layer_map), period)
            if found is None:
                raise GrowthError(f"config keys {dk.key}, {dk.companion} (every {period}th layer from layer "
                                  f"{offset}) cannot express this layer map: the selected layers would be "
                                  f"{sorted(chosen)}")
            for key, v in zip((dk.key, dk.companion), found, strict=True):
                if lookup(new, key) != v:
                    _set(new, key, v)
                    changed.append(key)
        elif dk.kind == "sparse_step":
            if int(value) != 1:
                # Every-Nth-layer cannot survive a layer map: make the dense layers explicit.
                new[dk.key] = 1
                companion = next(d.key for d in layout.depth.depth_keys if d.kind == "index_list")
                new[companion] = [j for j, m in enumerate(layer_map) if m not in source_moe]
                changed.append(companion)
        else:  # pragma: no cover - layouts are checked by tests
            raise AssertionError(dk.kind)
        if lookup(new, dk.key) != lookup(config, dk.key):
            changed.append(dk.key)
    got = config_moe_layers(new, layout)
    if want != got:
        keys = ", ".join(d.key for d in layout.depth.depth_keys if d.kind != "count")
        raise GrowthError(f"the config ({keys}) cannot express this layer map: new layer "
                          f"{sorted(want ^ got)[0]} would change between dense and MoE")
    grown = layout.wrap(outer, new)
    outer_changed = _rewrite_wrapper_keys(grown, layout, layer_map, n_old)
    return grown, sorted({layout.key_path(outer, k) for k in changed} | set(outer_changed))


def _hidden_index(dk: DepthKey, a: Any, layer_map: Sequence[int], n_old: int) -> int:
    """Where the state after the old first `a` layers is in the new stack (see `DepthKey` ``hidden_index``)."""
    if not (isinstance(a, int) and not isinstance(a, bool) and 0 <= a <= n_old):
        raise ConfigError(f"config.json: {dk.key} must be a hidden-state index 0..{n_old}, not {a!r}")
    if a == n_old:  # the last (normed) state stays the last
        return len(layer_map)
    if list(layer_map[:a]) == list(range(a)):  # the same first a layers: the source's state itself
        return a
    copies = sum(1 for m in layer_map if m < a)
    if all(m < a for m in layer_map[:copies]):  # every copy of the first a layers comes first
        return copies
    raise GrowthError(f"config key {dk.key}={a} (a decoder hidden state read by index) cannot express this layer "
                      f"map: the new layers neither start with layers 0..{a - 1} in order nor keep every copy of "
                      f"them first")


def _rewrite_wrapper_keys(config: dict[str, Any], layout: Layout, layer_map: Sequence[int], n_old: int) -> list[str]:
    """Rewrite (in place) or refuse the wrapper's own layer-indexed keys (`Wrapper.depth_keys`); the keys changed."""
    changed = []
    for dk in layout.wrapper.depth_keys if layout.wrapper else ():
        value = lookup(config, dk.key)
        if value is None:
            continue
        if dk.kind == "positional_prefix":
            if not isinstance(value, list):
                raise ConfigError(f"config.json: {dk.key} must be a list, not {value!r}")
            d = len(value)
            if list(layer_map[:d]) != list(range(d)):
                raise GrowthError(f"config key {dk.key} (features added after decoder layers 0..{d - 1}, by position) "
                                  f"cannot express this layer map: new layers 0..{d - 1} must copy old layers "
                                  f"0..{d - 1} in order, not {list(layer_map[:d])}")
        elif dk.kind == "hidden_index":
            new = _hidden_index(dk, value, layer_map, n_old)
            if new != value:
                _set(config, dk.key, new)
                changed.append(dk.key)
        else:  # pragma: no cover - layouts are checked by tests
            raise AssertionError(dk.kind)
    return changed


def parse_top_k(value: str) -> str | int:
    """`scale`, `keep`, or a positive integer."""
    v = value.strip().lower()
    if v in ("scale", "keep"):
        return v
    if v.isdigit() and int(v) > 0:
        return int(v)
    raise GrowthError(f"--top-k must be 'scale', 'keep' or a positive integer, not {value!r}")


def rewrite_width(config: Mapping[str, Any], layout: Layout, factor: int,
                  top_k: str | int) -> tuple[dict[str, Any], list[str]]:
    """The config after width growth by `factor`; returns (config, descriptions of changes)."""
    outer, config = config, layout.text(config)

    def path(key: str) -> str:
        return layout.key_path(outer, key)

    new = copy.deepcopy(dict(config))
    changes: list[str] = []
    ekey = layout.config_key(config, layout.counts.experts_keys, "expert count")
    kkey = layout.config_key(config, layout.counts.top_k_keys, "top-k")
    e_old, k_old = layout.num_experts(config), layout.top_k(config)
    _set(new, ekey, e_old * factor)
    changes.append(f"{path(ekey)}: {e_old} -> {e_old * factor}")
    k_new = k_old * factor if top_k == "scale" else k_old if top_k == "keep" else int(top_k)
    if not 1 <= k_new <= e_old * factor:
        raise GrowthError(f"top-k {k_new} is out of range for {e_old * factor} experts")
    if k_new != k_old:
        _set(new, kkey, k_new)
        changes.append(f"{path(kkey)}: {k_old} -> {k_new}")
    for rule in layout.width.width_rules:
        key = next((k for k in rule.keys if config.get(k) is not None), None)
        if key is None or any(config.get(k) for k in rule.unless_keys):
            continue
        value = config[key]
        if rule.op == "mul":
            new[key] = value * factor
        elif rule.op == "div":
            new[key] = value / factor
        elif rule.op == "top_k":
            if k_new == k_old:
                continue
            if (value * k_new) % k_old:
                raise GrowthError(f"config key {key}={value} ({rule.why}) cannot follow top-k {k_old} -> {k_new}: "
                                  f"{value} x {k_new} / {k_old} is not a whole number")
            new[key] = value * k_new // k_old
        else:  # pragma: no cover
            raise AssertionError(rule.op)
        changes.append(f"{path(key)}: {value} -> {new[key]} ({rule.why})")
    return layout.wrap(outer, new), changes
