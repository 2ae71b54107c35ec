"""The shape of per-family knowledge: `Layout` and its parts (`Names`, `Counts`, `ExpertAxis`, `MoeLayers`,
`DepthRules`, `WidthRules`, `Doc`), the rules they hold (`DepthKey`, `WidthRule`, `TensorRule`), `Residual`,
`Wrapper` for multimodal checkpoints, and `lookup` for (dotted) config keys.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
The entries themselves are data in the lineage modules beside this one.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from fnmatch import fnmatchcase
from typing import Any

from ..errors import ConfigError


def lookup(config: Mapping[str, Any], key: str) -> Any:
    """A config value; a dotted key reaches into nested dicts (dbrx's ``ffn_config.moe_num_experts``)."""
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


@dataclass(frozen=True)
class DepthKey:
    """A layer-indexed config key and how a layer map rewrites it.

    kinds: ``count`` (the layer count), ``per_layer`` (a list with one entry per layer),
    ``per_layer_chars`` (a string with one character per layer),
    ``index_list`` (a list of layer indices), ``index_list_1based`` (the same, counting from 1),
    ``ranked_index_list_1based`` (the same, where a listed layer's tensors depend on its rank in the
    list: a map that would change a copy's rank is refused),
    ``prefix_count`` (the first N layers are special), ``sparse_step`` (every Nth layer is MoE;
    rewritten to 1 plus an explicit index list, see `configs.py`), ``moe_types`` (a per-layer
    list of "sparse" / "dense"; written out from the tensors when the source config leaves it to
    a default), ``dense_prefix`` (a count of leading dense layers that another key overrides; set
    to the new leading dense run), ``moe_range`` (the start key of the layout's `moe_range`
    triple: start, end and interval are rewritten together to the new MoE layers, refused where
    no start / end / interval can say them), ``period`` (layer i is selected iff i % key == companion:
    the period and its offset key are rewritten together to the copies of the selected layers, refused
    where no period / offset can say them; ``default`` gives both when the config lacks them),
    ``per_layer_reuse`` (a per-layer list where the value ``reuses`` marks a layer that reuses the
    nearest earlier layer without it: copied like ``per_layer``, refused where a copy would reuse a
    layer other than a copy of its original's), ``suffix_count`` (the last N layers are special: the
    copies of the last N must be the new last layers), ``per_layer_dict`` (a dict keyed by layer
    index, a string in JSON: each new layer gets its original's entry, if any). A dotted key reaches
    into a nested dict.

    Two more kinds are for a multimodal wrapper's own keys (`Wrapper.depth_keys`, dotted from the top of its
    config): ``positional_prefix`` (a list whose length D counts the leading decoder layers that something
    outside the layers addresses by position: qwen3_vl's deepstack adds visual features after decoder layers
    0..D-1; kept as is, and a map is refused unless new layers 0..D-1 copy old layers 0..D-1 in order) and
    ``hidden_index`` (an index into the decoder's hidden states, the state after its first a layers:
    qwen3_omni_moe's talker reads the thinker's; rewritten to a where the new first a layers copy the old first
    a in order, so the state is the source's (stacking), else to the count of copies of the first a layers when
    they all come first (interposition: 2a), refused otherwise).
    """

    key: str
    kind: str
    companion: str = ""
    default: tuple[int, int] = (1, 0)
    reuses: str = ""


@dataclass(frozen=True)
class WidthRule:
    """A config change that keeps width growth by a factor f function-preserving.

    op ``mul`` multiplies the key by f, ``div`` divides it by f, ``top_k`` multiplies it like top-k
    (by new top-k / old top-k: a count proportional to the experts per token). ``unless`` names a boolean
    config key (or its aliases) that, when true, makes the rule unnecessary. ``aliases`` are other
    names of ``key``; the first present is rewritten.
    """

    key: str
    op: str
    why: str
    unless: str | tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)

    @property
    def unless_keys(self) -> tuple[str, ...]:
        if self.unless is None:
            return ()
        return (self.unless,) if isinstance(self.unless, str) else self.unless


@dataclass(frozen=True)
class TensorRule:
    """A tensor that width growth by f must scale by 1/f, originals included, to stay exact.

    For families whose expert weights are not halved by duplication and whose config has no key
    to absorb the factor (raw sigmoid weights, an expert-input score). ``rel`` is the name
    relative to the layer prefix (for per-expert tensors: the part after the expert index).
    ``when`` lists (config key, value) pairs that must all hold (a missing key reads as
    ``default``); ``unless`` names boolean config keys that make the rule unnecessary.
    Applies with ``--top-k scale`` only, the mode that claims function preservation.
    """

    rel: str
    why: str
    when: tuple[tuple[str, Any], ...] = ()
    unless: tuple[str, ...] = ()
    default: Any = None
    # per-key values assumed for keys the config lacks (the config class's defaults)
    defaults: tuple[tuple[str, Any], ...] = ()
    # top-k weights divided by their p-norm, p = this key (dbrx): a selected group of f copies weighs
    # f^(1 - 1/p) times the original, so the scale is f^(1/p - 1); no scaling when p is null or 1
    p_norm_key: str = ""

    def _get(self, config: Mapping[str, Any], key: str) -> Any:
        value = lookup(config, key)
        return value if value is not None else dict(self.defaults).get(key, self.default)

    def applies(self, config: Mapping[str, Any]) -> bool:
        if any(self._get(config, k) for k in self.unless):
            return False
        if self.p_norm_key and self._get(config, self.p_norm_key) in (None, 1):
            return False
        return all(self._get(config, k) == v for k, v in self.when)

    def scale(self, config: Mapping[str, Any], factor: int) -> float:
        """The factor every matching tensor is multiplied by (where `applies`)."""
        if not self.p_norm_key:
            return 1.0 / factor
        p = self._get(config, self.p_norm_key)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not p > 0:
            raise ConfigError(f"config.json: {self.p_norm_key}={p!r}: only a p-norm with p > 0 (or null) "
                              f"can be kept exact")
        return float(factor) ** (1.0 / p - 1.0)


@dataclass(frozen=True)
class Wrapper:
    """A multimodal checkpoint whose text decoder is a supported family.

    The decoder's config is nested under ``text_config_key`` (dotted where it sits deeper: qwen3_omni_moe's
    ``thinker_config.text_config``; its own model_type picks the layout, or `text_layout`)
    and its layers are saved under ``layer_prefix``; every other tensor (vision tower, projector)
    and every other config key is copied untouched.
    """

    model_types: tuple[str, ...]
    text_config_key: str
    layer_prefix: str
    # Layout fields by their flat names (name, value; see `Layout.with_`) where the wrapper's checkpoints name the
    # decoder's MoE tensors differently from the text family's own checkpoints (minimax_m3_vl: per-expert names)
    layout_overrides: tuple[tuple[str, Any], ...] = ()
    # other prefixes the decoder layers are saved under, used where the checkpoint's names carry one
    # (kimi_k25: Hub `language_model.model.layers.`, transformers 5.23's save_pretrained `...blocks.`)
    alt_prefixes: tuple[str, ...] = ()
    # the decoder's layout where its text model_type is no standalone family (no causal-LM class of its own:
    # qwen3_vl_moe_text, glm4v_moe_text...); it is used only inside this wrapper
    text_layout: Layout | None = None
    # keys of the wrapper's own config (dotted from its top) that index decoder layers (see `DepthKey`)
    depth_keys: tuple[DepthKey, ...] = ()
    # the submodule that computes the text logits where the model class has no forward (qwen3_omni_moe: thinker)
    text_module: str = ""
    # tower tensors saved under the decoder's own base prefix (ernie4_5_vl_moe: model.vision_model.): not the
    # language model's in parameter counts
    tower_prefixes: tuple[str, ...] = ()


# --- identity depth init (`--depth-init identity`, issue 11): what a layer writes into the residual stream ---


@dataclass(frozen=True)
class Residual:
    """What a family's decoder layer adds to the residual stream, so that an added layer copy can add nothing.

    ``writers``: the tensors whose zeroing makes the layer the identity (every sublayer's output projection:
    attention output, routed / shared / dense MLP down projections, Mamba and linear-attention out_proj),
    as glob patterns on the name relative to the layer (``*`` stands for an expert index); a pattern also
    covers the tensors under it as a module (``self_attn.o_proj`` covers ``.weight`` and ``.bias``).
    Quantisation scales under a writer stay as they are (zero bytes already dequantise to zero).
    ``ones``: tensors set to 1 so that the layer passes the stream on unscaled (gemma4's ``layer_scalar``).
    ``refused``: why no zeroing makes this family's layer the identity (its output is not x + f(x));
    ``refused_keys``: (config key, why) pairs refused while the key is truthy.
    """

    writers: tuple[str, ...] = ()
    ones: tuple[str, ...] = ()
    refused: str = ""
    refused_keys: tuple[tuple[str, str], ...] = ()

    def matches(self, rel: str, patterns: tuple[str, ...]) -> bool:
        if rel.endswith(_KEEP_SUFFIXES):
            return False
        return any(fnmatchcase(rel, p) or fnmatchcase(rel, p + ".*") for p in patterns)

    def is_writer(self, rel: str) -> bool:
        """Whether a layer tensor (name relative to the layer) is zeroed in an added copy."""
        return self.matches(rel, self.writers)

    def is_one(self, rel: str) -> bool:
        return self.matches(rel, self.ones)


# quantisation scales (fp8 `weight_scale_inv`, MXFP4 `_scales`, static `input_scale`): kept, never zeroed
_KEEP_SUFFIXES = ("_scale_inv", "_scales", "weight_scale", "input_scale")


# --- the parts of a `Layout`: each a frozen dataclass, shared between entries by alias (`_DEEPSEEK_NAMES`) ---


@dataclass(frozen=True)
class Names:
    """Where a family's tensors are: names relative to the layer prefix, as `save_pretrained` writes them."""

    experts_prefix: str
    router_weights: tuple[str, ...]
    layer_prefix: str = "model.layers."
    fused_experts: tuple[str, ...] = ()
    router_biases: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    shared_prefix: str | None = None
    # multi-token-prediction weights stored outside the decoder under this prefix (Hub qwen3_next: `mtp.`),
    # which transformers ignores on load: its layers (`{mtp_prefix}layers.N.`) are widened like decoder
    # layers; depth growth copies them unchanged (not interposed, not renumbered); parameter counts skip them
    mtp_prefix: str = ""


@dataclass(frozen=True)
class Counts:
    """The config keys that count experts, top-k, shared experts and layers (every alias; the first present wins)."""

    experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    shared_experts_keys: tuple[str, ...] = ()
    layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    # per-layer lists (or strings, one character a layer) whose length is the layer count; the
    # first present wins over layers_keys (nemotron_h: layers_block_type, hybrid_override_pattern)
    layers_list_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExpertAxis:
    """How each tensor lays out the expert axis (and, for `--reinit`, the neuron axis) where not the default:
    per-expert tensors, fused ones with experts along axis 0, one row per expert."""

    # the expert axis of a router / router-bias / fused tensor where it is not 0, as (rel, axis) pairs:
    # only where every leading dim is 1 (so concatenating along it is concatenating bytes)
    expert_axis: tuple[tuple[str, int], ...] = ()
    # router / router-bias / fused tensors (rels) whose `expert_axis` has leading dims other than 1 (ernie4_5_vl_moe's
    # transposed gates [H, E] and its [2, E] bias, one row per modality): their copies are joined through torch
    inner_axis: tuple[str, ...] = ()
    # fused experts stored 2-D with this many rows per expert along axis 0 (dbrx: [E*F, H]); a config key
    rows_per_expert_key: str = ""
    # config keys counting extra slots after the routed experts on a router's expert axis (longcat_flash's
    # zero experts, inkling_text's router-gated shared experts): a tensor spanning routed + extra slots
    # is duplicated segment by segment, [E, E copies, Z, Z copies], so that every segment stays whole
    expert_segments: tuple[str, ...] = ()
    # (rel, segment): tensors that hold one extra segment only (inkling's fused shared experts), duplicated
    # whole; segment 1 is the first key of `expert_segments`
    segment_tensors: tuple[tuple[str, int], ...] = ()
    # integer tables of expert indices, top-k wide in their last dim (deepseek_v4's hash routing
    # `tid2eid`): widened to cat(t, t + E, ...) so that each token picks every copy of its experts
    expert_tables: tuple[str, ...] = ()
    # (rel, neuron axis, pairing) of fused expert tensors [E, ...] for --reinit (moegrow/neurons.py): the axis of
    # the intermediate neurons, and how gate and up share it ("interleaved", "halves", or "" for one projection);
    # per-expert gate/up/down tensors are recognised by name; a family with fused experts and no entry is refused
    neurons: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True)
class MoeLayers:
    """Which decoder layers are MoE: `moe_rule` names the rule (see configs.py), the other fields are its keys."""

    moe_rule: str = "all"
    # the count of leading dense layers (rules first_k_dense, mlp_layer_types without the list),
    # and the count to assume when the config has neither that key nor mlp_layer_types
    dense_prefix_key: str = "first_k_dense_replace"
    default_dense: int = 0
    # rule `block_types`: (key, value) pairs; layer i is MoE iff config[key][i] == value (first key present)
    moe_block_types: tuple[tuple[str, str], ...] = ()
    # rule `layer_range`: (start key, default), (end key, default; -1 = last layer), (interval key, default);
    # layer i is MoE iff start <= i <= end and (i + 1) % interval == 0
    moe_range: tuple[tuple[str, int], ...] = ()
    # rule `period`: the key of the `period` DepthKey that selects the MoE layers (i % period == offset)
    moe_period_key: str = ""


@dataclass(frozen=True)
class DepthRules:
    """What depth growth rewrites (layer-indexed config keys) and what it refuses; the residual writers of
    `--depth-init identity` are the `RESIDUAL` table."""

    depth_keys: tuple[DepthKey, ...] = ()
    # non-empty where no layer copy can be loaded (layer-indexed tensors outside the layers): depth growth is refused
    depth_refused: str = ""
    # (config key, why): depth growth is refused while the key is truthy (non-layer tensors sized by the layer count)
    depth_refused_keys: tuple[tuple[str, str], ...] = ()
    # tensors every layer but layer 0 has (zaya's router_states_scale): depth maps that move a copy of
    # layer 0 elsewhere, or another layer to 0, are refused
    not_in_first_layer: tuple[str, ...] = ()
    # non-empty where a decoder layer's function depends on its index (why): a depth copy placed at another
    # index computes another function, so `verify --forward` reports its difference without failing on it
    index_dependent_layers: str = ""


@dataclass(frozen=True)
class WidthRules:
    """What keeps width growth function-preserving (config and tensor rules), and where it cannot be."""

    width_rules: tuple[WidthRule, ...] = ()
    tensor_rules: tuple[TensorRule, ...] = ()
    # False where no width growth can compute the source's function (refused without --allow-inexact);
    # inexact_reason says why (shown by inspect and in the refusal)
    exact_width: bool = True
    inexact_reason: str = ""
    # non-empty where duplication itself cannot be expressed: width growth is refused, flag or not
    width_refused: str = ""


@dataclass(frozen=True)
class Doc:
    """What `inspect` and docs/families.md tell a reader: how the family routes, and notes."""

    routing: str
    notes: tuple[str, ...] = field(default=())


# each flat name (the fields `Layout` had before its parts) -> the part that holds it; `Layout.with_` reads it
PARTS: dict[str, type] = {"names": Names, "counts": Counts, "axes": ExpertAxis, "moe": MoeLayers,
                          "depth": DepthRules, "width": WidthRules, "doc": Doc}
PART_OF: dict[str, str] = {f.name: part for part, cls in PARTS.items() for f in fields(cls)}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its MoE parts and how it routes: its identity and its parts (see above)."""

    name: str
    model_types: tuple[str, ...]
    names: Names
    counts: Counts
    doc: Doc
    axes: ExpertAxis = ExpertAxis()
    moe: MoeLayers = MoeLayers()
    depth: DepthRules = DepthRules()
    width: WidthRules = WidthRules()
    # set by `layout_for` for a multimodal checkpoint: the text decoder's config is nested (see `Wrapper`)
    wrapper: Wrapper | None = None

    def with_(self, **changes: Any) -> Layout:
        """`dataclasses.replace` that also takes the flat names of the parts' fields (``layer_prefix=...``):
        each goes to its part (`PART_OF`); a part's own name replaces the part whole."""
        top: dict[str, Any] = {}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if key in PART_OF:
                flat.setdefault(PART_OF[key], {})[key] = value
            else:
                top[key] = value
        for part, values in flat.items():
            top[part] = replace(top.get(part, getattr(self, part)), **values)
        return replace(self, **top)

    @property
    def residual(self) -> Residual:
        """What this family's layers write into the residual stream (identity depth init; see `RESIDUAL`).

        A wrapper's own entry (its checkpoints' names) wins over its text family's."""
        from .registry import RESIDUAL  # the table is data built from these classes

        for t in self.wrapper.model_types if self.wrapper else ():
            if t in RESIDUAL:
                return RESIDUAL[t]
        return RESIDUAL.get(self.name) or Residual(refused="moegrow has no residual-writer data for this family")

    @property
    def mtp_layer_prefix(self) -> str:
        """Where the MTP layers under `mtp_prefix` sit (`mtp.layers.`); empty without one."""
        return f"{self.names.mtp_prefix}layers." if self.names.mtp_prefix else ""

    # -- config access -------------------------------------------------------------------------

    def _wrapped(self, config: Mapping[str, Any]) -> bool:
        return self.wrapper is not None and config.get("model_type") in self.wrapper.model_types

    def text(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The decoder's config: the nested text config of a multimodal config, else config itself.

        Idempotent (a text config is returned as is), so every entry point may call it."""
        if not self._wrapped(config):
            return config
        assert self.wrapper is not None
        sub = lookup(config, self.wrapper.text_config_key)  # dotted: qwen3_omni_moe's thinker_config.text_config
        if not isinstance(sub, Mapping):
            raise ConfigError(f"config.json: no {self.wrapper.text_config_key} (the text decoder's config)")
        return sub

    def wrap(self, config: Mapping[str, Any], text: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of config with its decoder config replaced by `text` (config's own keys untouched)."""
        if not self._wrapped(config):
            return dict(text)
        assert self.wrapper is not None
        new = copy.deepcopy(dict(config))
        *path, last = self.wrapper.text_config_key.split(".")
        parent = new
        for part in path:
            parent = parent[part]
        parent[last] = dict(text)
        return new

    def key_path(self, config: Mapping[str, Any], key: str) -> str:
        """A decoder config key as a dotted path from the top of config (``text_config.num_experts``)."""
        return f"{self.wrapper.text_config_key}.{key}" if self._wrapped(config) and self.wrapper else key

    def config_key(self, config: Mapping[str, Any], aliases: tuple[str, ...], what: str) -> str:
        """The first alias present in the decoder config (the one to write back)."""
        config = self.text(config)
        for k in aliases:
            if lookup(config, k) is not None:
                return k
        raise ConfigError(f"config.json: no {what} key (looked for {', '.join(aliases)})")

    def _int(self, config: Mapping[str, Any], aliases: tuple[str, ...], what: str) -> int:
        config = self.text(config)
        key = self.config_key(config, aliases, what)
        value = lookup(config, key)
        if isinstance(value, (list, dict)):
            raise ConfigError(f"config.json: {key} is {value!r}; moegrow needs one integer "
                              f"{what} (per-layer values are not supported)")
        return int(value)

    def rows_per_expert(self, config: Mapping[str, Any], rel: str) -> int:
        """Rows per expert along a fused tensor's expert axis (1 unless `rows_per_expert_key`)."""
        if not self.axes.rows_per_expert_key or rel not in self.names.fused_experts:
            return 1
        config = self.text(config)
        value = lookup(config, self.axes.rows_per_expert_key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"config.json: {self.axes.rows_per_expert_key} must be a positive integer, not {value!r}")
        return value

    def axis_of(self, rel: str) -> int:
        """The expert axis of a router, router-bias or fused tensor (see `expert_axis`)."""
        return dict(self.axes.expert_axis).get(rel, 0)

    def num_experts(self, config: Mapping[str, Any]) -> int:
        return self._int(config, self.counts.experts_keys, "expert count")

    def segment_counts(self, config: Mapping[str, Any]) -> list[int]:
        """Slots per segment of the expert axis: [routed experts, *extra slots] (see `expert_segments`)."""
        config = self.text(config)
        counts = [self.num_experts(config)]
        for key in self.axes.expert_segments:
            value = lookup(config, key)
            if value is None:
                value = 0
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config.json: {key} must be an integer >= 0, not {value!r}")
            counts.append(value)
        return counts

    def segment_of(self, rel: str) -> int | None:
        """The one segment a tensor holds (see `segment_tensors`), or None."""
        return dict(self.axes.segment_tensors).get(rel)

    def top_k(self, config: Mapping[str, Any]) -> int:
        return self._int(config, self.counts.top_k_keys, "top-k")

    def layers_list_key(self, config: Mapping[str, Any]) -> str | None:
        """The per-layer list (or string) that gives the layer count, if the family has one."""
        config = self.text(config)
        return next((k for k in self.counts.layers_list_keys if isinstance(config.get(k), (list, str))), None)

    def num_layers(self, config: Mapping[str, Any]) -> int:
        config = self.text(config)
        key = self.layers_list_key(config)
        if key is not None:
            return len(config[key])
        return self._int(config, self.counts.layers_keys, "layer count")

