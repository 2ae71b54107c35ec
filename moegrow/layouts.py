"""Per-family knowledge, as data: one `Layout` entry per MoE model family.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
Adding a family is adding an entry here; no other module branches on model_type.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

from .errors import ConfigError, UnsupportedModelError


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
    # Layout fields (name, value) where the wrapper's checkpoints name the decoder's MoE tensors differently
    # from the text family's own checkpoints (minimax_m3_vl saves the published per-expert names)
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


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its MoE parts and how it routes."""

    name: str
    model_types: tuple[str, ...]
    experts_keys: tuple[str, ...]
    top_k_keys: tuple[str, ...]
    experts_prefix: str
    router_weights: tuple[str, ...]
    routing: str
    layers_keys: tuple[str, ...] = ("num_hidden_layers",)
    layer_prefix: str = "model.layers."
    fused_experts: tuple[str, ...] = ()
    router_biases: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    shared_experts_keys: tuple[str, ...] = ()
    shared_prefix: str | None = None
    moe_rule: str = "all"
    # the count of leading dense layers (rules first_k_dense, mlp_layer_types without the list),
    # and the count to assume when the config has neither that key nor mlp_layer_types
    dense_prefix_key: str = "first_k_dense_replace"
    default_dense: int = 0
    # per-layer lists (or strings, one character a layer) whose length is the layer count; the
    # first present wins over layers_keys (nemotron_h: layers_block_type, hybrid_override_pattern)
    layers_list_keys: tuple[str, ...] = ()
    # rule `block_types`: (key, value) pairs; layer i is MoE iff config[key][i] == value (first key present)
    moe_block_types: tuple[tuple[str, str], ...] = ()
    depth_keys: tuple[DepthKey, ...] = ()
    width_rules: tuple[WidthRule, ...] = ()
    tensor_rules: tuple[TensorRule, ...] = ()
    # False where no width growth can compute the source's function (refused without --allow-inexact);
    # inexact_reason says why (shown by inspect and in the refusal)
    exact_width: bool = True
    inexact_reason: str = ""
    # non-empty where duplication itself cannot be expressed: width growth is refused, flag or not
    width_refused: str = ""
    # non-empty where no layer copy can be loaded (layer-indexed tensors outside the layers): depth growth is refused
    depth_refused: str = ""
    # tensors every layer but layer 0 has (zaya's router_states_scale): depth maps that move a copy of
    # layer 0 elsewhere, or another layer to 0, are refused
    not_in_first_layer: tuple[str, ...] = ()
    # fused experts stored 2-D with this many rows per expert along axis 0 (dbrx: [E*F, H]); a config key
    rows_per_expert_key: str = ""
    # the expert axis of a router / router-bias / fused tensor where it is not 0, as (rel, axis) pairs:
    # only where every leading dim is 1 (so concatenating along it is concatenating bytes)
    expert_axis: tuple[tuple[str, int], ...] = ()
    # rule `layer_range`: (start key, default), (end key, default; -1 = last layer), (interval key, default);
    # layer i is MoE iff start <= i <= end and (i + 1) % interval == 0
    moe_range: tuple[tuple[str, int], ...] = ()
    # (config key, why): depth growth is refused while the key is truthy (non-layer tensors sized by the layer count)
    depth_refused_keys: tuple[tuple[str, str], ...] = ()
    # rule `period`: the key of the `period` DepthKey that selects the MoE layers (i % period == offset)
    moe_period_key: str = ""
    # router / router-bias / fused tensors (rels) whose `expert_axis` has leading dims other than 1 (ernie4_5_vl_moe's
    # transposed gates [H, E] and its [2, E] bias, one row per modality): their copies are joined through torch
    inner_axis: tuple[str, ...] = ()
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
    # multi-token-prediction weights stored outside the decoder under this prefix (Hub qwen3_next: `mtp.`),
    # which transformers ignores on load: its layers (`{mtp_prefix}layers.N.`) are widened like decoder
    # layers; depth growth copies them unchanged (not interposed, not renumbered); parameter counts skip them
    mtp_prefix: str = ""
    notes: tuple[str, ...] = field(default=())
    # non-empty where a decoder layer's function depends on its index (why): a depth copy placed at another
    # index computes another function, so `verify --forward` reports its difference without failing on it
    index_dependent_layers: str = ""
    # set by `layout_for` for a multimodal checkpoint: the text decoder's config is nested (see `Wrapper`)
    wrapper: Wrapper | None = None

    @property
    def residual(self) -> Residual:
        """What this family's layers write into the residual stream (identity depth init; see `RESIDUAL`).

        A wrapper's own entry (its checkpoints' names) wins over its text family's."""
        for t in self.wrapper.model_types if self.wrapper else ():
            if t in RESIDUAL:
                return RESIDUAL[t]
        return RESIDUAL.get(self.name) or Residual(refused="moegrow has no residual-writer data for this family")

    @property
    def mtp_layer_prefix(self) -> str:
        """Where the MTP layers under `mtp_prefix` sit (`mtp.layers.`); empty without one."""
        return f"{self.mtp_prefix}layers." if self.mtp_prefix else ""

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
        if not self.rows_per_expert_key or rel not in self.fused_experts:
            return 1
        config = self.text(config)
        value = lookup(config, self.rows_per_expert_key)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ConfigError(f"config.json: {self.rows_per_expert_key} must be a positive integer, not {value!r}")
        return value

    def axis_of(self, rel: str) -> int:
        """The expert axis of a router, router-bias or fused tensor (see `expert_axis`)."""
        return dict(self.expert_axis).get(rel, 0)

    def num_experts(self, config: Mapping[str, Any]) -> int:
        return self._int(config, self.experts_keys, "expert count")

    def segment_counts(self, config: Mapping[str, Any]) -> list[int]:
        """Slots per segment of the expert axis: [routed experts, *extra slots] (see `expert_segments`)."""
        config = self.text(config)
        counts = [self.num_experts(config)]
        for key in self.expert_segments:
            value = lookup(config, key)
            if value is None:
                value = 0
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"config.json: {key} must be an integer >= 0, not {value!r}")
            counts.append(value)
        return counts

    def segment_of(self, rel: str) -> int | None:
        """The one segment a tensor holds (see `segment_tensors`), or None."""
        return dict(self.segment_tensors).get(rel)

    def top_k(self, config: Mapping[str, Any]) -> int:
        return self._int(config, self.top_k_keys, "top-k")

    def layers_list_key(self, config: Mapping[str, Any]) -> str | None:
        """The per-layer list (or string) that gives the layer count, if the family has one."""
        config = self.text(config)
        return next((k for k in self.layers_list_keys if isinstance(config.get(k), (list, str))), None)

    def num_layers(self, config: Mapping[str, Any]) -> int:
        config = self.text(config)
        key = self.layers_list_key(config)
        if key is not None:
            return len(config[key])
        return self._int(config, self.layers_keys, "layer count")


_QWEN_DEPTH = (
    DepthKey("num_hidden_layers", "count"),
    DepthKey("layer_types", "per_layer"),
    DepthKey("max_window_layers", "prefix_count"),
    DepthKey("decoder_sparse_step", "sparse_step"),
    DepthKey("mlp_only_layers", "index_list"),
)
_SOFTMAX_TOPK = ("softmax over all experts, top-k, weights renormalised over the k when "
                 "norm_topk_prob (else raw probabilities)")
_COUNT = DepthKey("num_hidden_layers", "count")
_LAYER_TYPES = DepthKey("layer_types", "per_layer")
_MLP_TYPES = DepthKey("mlp_layer_types", "moe_types")
_FIRST_K = DepthKey("first_k_dense_replace", "prefix_count")
_FIRST_K_INFO = DepthKey("first_k_dense_replace", "dense_prefix")  # saved, but mlp_layer_types decides
_ROUTED = ("n_routed_experts", "num_local_experts", "num_experts")
_MOE_TYPES = DepthKey("mlp_layer_types", "moe_types")
_NUM_DENSE = DepthKey("num_dense_layers", "prefix_count")
_SIGMOID_BIAS = "sigmoid scores; top-k of score + expert bias; normalised"
_MTP_OUTSIDE = ("Hub checkpoints' MTP tensors (mtp.*) lie outside the decoder layers, and transformers ignores "
                "them on load (its _keys_to_ignore_on_load_unexpected): width growth widens the MTP layers "
                "(mtp.layers.N) as decoder layers; depth growth copies them unchanged (not interposed, nor "
                "renumbered: they are not decoder layers); parameter counts leave them out")
_RAW_SIGMOID = ("unnormalised sigmoid weights do not halve, so a selected pair (original and copy) would "
                "weigh twice, and no config key can absorb the factor")
_HALVED_WHEN_RAW = ("width growth with unnormalised weights (norm_topk_prob false) halves every expert's "
                    "down projection, originals included: originals are not byte-identical")
# Tensor names and count keys shared by the DeepSeek-V3-style families (one entry each, differing in
# routing details and layer-indexed keys only).
_DEEPSEEK_PARTS: dict[str, Any] = dict(
    experts_keys=_ROUTED,
    top_k_keys=("num_experts_per_tok",),
    shared_experts_keys=("n_shared_experts",),
    shared_prefix="mlp.shared_experts.",
    experts_prefix="mlp.experts.",
    router_weights=("mlp.gate.weight",),
    router_biases=("mlp.gate.e_score_correction_bias",),
    buffers=("mlp.gate.e_score_correction_bias",),
)
_SIGMOID_GROUPS = ("sigmoid scores; selection on score + e_score_correction_bias, limited to the "
                   "topk_group best of n_group groups (group score = sum of its top 2); top-k; "
                   "normalised when norm_topk_prob; times routed_scaling_factor")


def _group_rules(n_group: tuple[str, ...] = ("n_group",), norm: tuple[str, ...] = ("norm_topk_prob",),
                 scaling: bool = True) -> tuple[WidthRule, ...]:
    """Group-limited routing: double the groups (and the groups kept); for unnormalised sigmoid
    weights, halve the routed scaling factor."""
    rules = (
        WidthRule(n_group[0], "mul", "groups must be [originals | copies] so that a copy's group "
                  "scores like its original's", aliases=n_group[1:]),
        WidthRule("topk_group", "mul", "twice the groups are kept, the originals' and their copies'"),
    )
    if scaling:
        rules += (WidthRule("routed_scaling_factor", "div", "unnormalised sigmoid weights do not "
                            "halve, so a selected pair would weigh twice", unless=norm),)
    return rules


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="mixtral",
        model_types=("mixtral",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        router_weights=("block_sparse_moe.gate.weight",),
        routing="softmax over all experts, top-k, renormalised over the k",
        depth_keys=(DepthKey("num_hidden_layers", "count"), DepthKey("layer_types", "per_layer")),
    ),
    Layout(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_expert.",
        routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert",
        moe_rule="sparse_step",
        depth_keys=_QWEN_DEPTH,
    ),
    Layout(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        moe_rule="sparse_step",
        depth_keys=_QWEN_DEPTH,
    ),
    Layout(
        name="olmoe",
        model_types=("olmoe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        depth_keys=(DepthKey("num_hidden_layers", "count"),),
    ),
    Layout(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        experts_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        routing=("sigmoid scores; selection on score + e_score_correction_bias, limited to the "
                 "topk_group best of n_group groups (group score = sum of its top 2); top-k; "
                 "normalised when norm_topk_prob; times routed_scaling_factor; plus shared experts"),
        moe_rule="first_k_dense",
        depth_keys=(
            DepthKey("num_hidden_layers", "count"),
            DepthKey("first_k_dense_replace", "prefix_count"),
        ),
        width_rules=(
            WidthRule("n_group", "mul", "groups must be [originals | copies] so that a copy's "
                      "group scores like its original's"),
            WidthRule("topk_group", "mul", "twice the groups are kept, the originals' and their "
                      "copies'"),
            WidthRule("routed_scaling_factor", "div", "unnormalised sigmoid weights do not halve, "
                      "so a selected pair would weigh twice", unless="norm_topk_prob"),
        ),
        notes=("MTP layers stored after the decoder layers (model.layers.{L}) are widened, kept "
               "out of depth interposition and renumbered after the new last layer; transformers "
               "ignores them on load.",),
    ),
    Layout(
        name="flex_olmo",
        model_types=("flex_olmo",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        depth_keys=(_COUNT,),
    ),
    Layout(
        name="minimax",
        model_types=("minimax",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        router_weights=("block_sparse_moe.gate.weight",),
        routing="softmax over all experts, top-k, renormalised over the k",
        depth_keys=(_COUNT, _LAYER_TYPES),
    ),
    Layout(
        name="minimax_m2",
        model_types=("minimax_m2",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        router_weights=("block_sparse_moe.gate.weight",),
        router_biases=("block_sparse_moe.e_score_correction_bias",),
        buffers=("block_sparse_moe.e_score_correction_bias",),
        routing="sigmoid scores; top-k of score + e_score_correction_bias; always normalised",
        depth_keys=(_COUNT, _LAYER_TYPES),
    ),
    Layout(
        name="mellum",
        model_types=("mellum",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=_SOFTMAX_TOPK,
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES),
        notes=("MTP layers (num_nextn_predict_layers, mtp_layer_types) are not laid out by "
               "transformers' save_pretrained and are not handled.",),
    ),
    Layout(
        name="hunyuan_v1_moe",
        model_types=("hunyuan_v1_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.wg.weight",),
        shared_prefix="mlp.shared_mlp.",
        routing="softmax (float32 gate) over all experts, top-k, renormalised; plus a shared MLP",
        depth_keys=(_COUNT,),
        notes=("per-layer num_experts / moe_topk lists are refused",),
    ),
    Layout(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        experts_keys=_ROUTED,
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        routing=("softmax over all experts; greedy top-k, or group_limited_greedy (the topk_group "
                 "groups of n_group with the best max); never renormalised; times "
                 "routed_scaling_factor; plus shared experts"),
        moe_rule="first_k_dense",
        depth_keys=(_COUNT, _FIRST_K),
        width_rules=_group_rules(scaling=False),
    ),
    Layout(
        name="glm4_moe",
        model_types=("glm4_moe",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="first_k_dense",
        depth_keys=(_COUNT, _FIRST_K),
        width_rules=_group_rules(),
        notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
    ),
    Layout(
        name="dots1",
        model_types=("dots1",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="first_k_dense",
        depth_keys=(_COUNT, _FIRST_K, _LAYER_TYPES, DepthKey("max_window_layers", "prefix_count")),
        width_rules=_group_rules(),
    ),
    Layout(
        name="solar_open",
        model_types=("solar_open",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        depth_keys=(_COUNT,),
        width_rules=_group_rules(),
    ),
    Layout(
        name="exaone_moe",
        model_types=("exaone_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("num_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.e_score_correction_bias",),
        buffers=("mlp.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS + " (correction bias at block level); plus shared experts",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO),
        width_rules=_group_rules(),
    ),
    Layout(
        name="mimo_v2_flash",
        model_types=("mimo_v2_flash",),
        experts_keys=_ROUTED,
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS,
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES),
        width_rules=_group_rules(),
    ),
    Layout(
        name="kimi_linear",
        model_types=("kimi_linear",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
        shared_experts_keys=("num_shared_experts", "n_shared_experts"),
        shared_prefix="block_sparse_moe.shared_experts.",
        experts_prefix="block_sparse_moe.experts.",
        router_weights=("block_sparse_moe.gate.weight",),
        router_biases=("block_sparse_moe.gate.e_score_correction_bias",),
        buffers=("block_sparse_moe.gate.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS + " (num_expert_group, moe_renormalize); plus shared experts",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO,
                    DepthKey("linear_attn_config.full_attn_layers", "index_list_1based"),
                    DepthKey("linear_attn_config.kda_layers", "index_list_1based")),
        width_rules=_group_rules(n_group=("num_expert_group", "n_group"),
                                 norm=("moe_renormalize", "norm_topk_prob")),
    ),
    Layout(
        name="glm4_moe_lite",
        model_types=("glm4_moe_lite",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _MLP_TYPES, _FIRST_K_INFO),
        width_rules=_group_rules(),
    ),
    Layout(
        name="deepseek_v32",
        model_types=("deepseek_v32",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO),
        width_rules=_group_rules(),
        notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
    ),
    Layout(
        name="granitemoe",
        model_types=("granitemoe",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
        router_weights=("block_sparse_moe.router.layer.weight",),
        routing="top-k of the router logits, softmax over the k",
        depth_keys=(_COUNT,),
    ),
    Layout(
        name="granitemoeshared",
        model_types=("granitemoeshared",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
        router_weights=("block_sparse_moe.router.layer.weight",),
        shared_prefix="shared_mlp.",
        routing="top-k of the router logits, softmax over the k; plus a shared MLP",
        depth_keys=(_COUNT,),
    ),
    Layout(
        name="jetmoe",
        model_types=("jetmoe",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",  # no per-expert form: every expert tensor is fused, expert axis first
        # MoE MLP experts [E,2F,H] / [E,H,F], and attention experts (MoA: per expert, the query projection
        # [E,kv*d,H] and the output projection [E,H,kv*d]); mlp.bias and self_attention.experts.bias are
        # per-output [H] (added once after the experts), not per-expert
        fused_experts=("mlp.input_linear.weight", "mlp.output_linear.weight",
                       "self_attention.experts.input_linear.weight", "self_attention.experts.output_linear.weight"),
        router_weights=("mlp.router.layer.weight", "self_attention.experts.router.layer.weight"),
        routing=("top-k of the router logits, softmax over the k, for the MoE MLP and for the attention experts "
                 "(each selected one projects num_key_value_heads query heads and back), which share the expert "
                 "count and top-k"),
        depth_keys=(_COUNT,),
        width_rules=(WidthRule("num_attention_heads", "top_k", "the attention heads are num_key_value_heads x "
                               "top-k (one group of query heads per selected attention expert)"),),
        notes=("width growth duplicates the attention experts too; with top-k doubled each token runs twice the "
               "query heads (a pair of identical heads per original, each weighted half)",),
    ),
    Layout(
        name="gpt_oss",
        model_types=("gpt_oss",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        # gate/up interleaved in the last dim of gate_up_proj: duplication along axis 0 keeps it
        fused_experts=tuple(f"mlp.experts.{n}" for n in (
            "gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias",
            "gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales")),
        router_weights=("mlp.router.weight",),
        router_biases=("mlp.router.bias",),
        routing="router logits with a bias; top-k of the logits, softmax over the k",
        depth_keys=(_COUNT, _LAYER_TYPES),
        notes=("The Hub release's MXFP4 experts (*_blocks / *_scales, uint8, expert axis first) are "
               "duplicated byte for byte like the others but cannot take --noise (refused, naming the tensor).",),
    ),
    Layout(
        name="mistral4",
        model_types=("mistral4",),
        experts_keys=_ROUTED,
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router_weights=("mlp.gate.weight",),
        routing=("softmax over all experts; the topk_group best of n_group groups (group score = "
                 "sum of its top 2); top-k; normalised when norm_topk_prob; times "
                 "routed_scaling_factor; plus shared experts"),
        moe_rule="first_k_dense",
        depth_keys=(_COUNT, _FIRST_K),
        width_rules=_group_rules(scaling=False),
        notes=("transformers maps mistral4 to no AutoModelForCausalLM: verify --forward cannot load "
               "it; load with Mistral4ForCausalLM.",),
    ),
    Layout(
        name="afmoe",
        model_types=("afmoe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("num_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.router.gate.weight",),
        router_biases=("mlp.expert_bias",),
        routing=_SIGMOID_BIAS + " (block-level mlp.expert_bias); times route_scale; plus shared experts",
        moe_rule="first_k_dense",
        dense_prefix_key="num_dense_layers",
        depth_keys=(_COUNT, _NUM_DENSE, _LAYER_TYPES),
        notes=("a config without layer_types derives it from global_attn_every_n_layers, which a "
               "layer map does not follow",),
    ),
    Layout(
        name="lfm2_moe",
        model_types=("lfm2_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="feed_forward.experts.",
        router_weights=("feed_forward.gate.weight",),
        router_biases=("feed_forward.expert_bias",),
        buffers=("feed_forward.expert_bias",),
        routing=("sigmoid scores; top-k of score + expert_bias (when use_expert_bias); normalised "
                 "(sum + 1e-6) when norm_topk_prob; times routed_scaling_factor"),
        moe_rule="first_k_dense",
        dense_prefix_key="num_dense_layers",
        depth_keys=(_COUNT, _NUM_DENSE, _LAYER_TYPES),
        width_rules=(WidthRule("routed_scaling_factor", "div", "unnormalised sigmoid weights do not "
                               "halve, so a selected pair would weigh twice", unless="norm_topk_prob"),),
    ),
    Layout(
        name="hy_v3",
        model_types=("hy_v3",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("num_shared_experts",),
        shared_prefix="mlp.shared_mlp.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.router.gate.weight",),
        router_biases=("mlp.expert_bias",),
        buffers=("mlp.expert_bias",),
        routing=_SIGMOID_BIAS + " (float32); times router_scaling_factor; plus a shared MLP",
        moe_rule="mlp_layer_types",
        default_dense=1,
        depth_keys=(_COUNT, _MOE_TYPES),
        notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
    ),
    Layout(
        name="laguna",
        model_types=("laguna",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_prefix="mlp.shared_expert.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.experts.e_score_correction_bias",),  # saved under experts, not the gate
        routing=("optional tanh softcap of the logits; " + _SIGMOID_BIAS + "; times "
                 "moe_routed_scaling_factor; plus a shared expert"),
        moe_rule="mlp_layer_types",
        default_dense=1,
        depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES, DepthKey("num_attention_heads_per_layer", "per_layer")),
    ),
    Layout(
        name="aria_text",
        model_types=("aria_text",),
        experts_keys=("moe_num_experts", "num_experts", "num_local_experts"),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        shared_experts_keys=("moe_num_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        # stored in x out ([E,H,2F], [E,F,H]); the expert axis is still 0
        fused_experts=("mlp.experts.fc1.weight", "mlp.experts.fc2.weight"),
        router_weights=("mlp.router.weight",),
        routing="top-k of the router logits, softmax over the k; plus shared experts",
        depth_keys=(_COUNT,),
    ),
    Layout(
        name="granitemoe_swa",
        model_types=("granitemoe_swa",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        fused_experts=("block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"),
        router_weights=("block_sparse_moe.router.weight",),
        shared_prefix="shared_mlp.",
        routing="top-k of the router logits, softmax over the k; plus a shared MLP",
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("layer_rope_theta", "per_layer")),
    ),
    Layout(
        name="granitemoehybrid",
        model_types=("granitemoehybrid",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        fused_experts=("block_sparse_moe.input_linear.weight", "block_sparse_moe.output_linear.weight"),
        router_weights=("block_sparse_moe.router.layer.weight",),
        shared_prefix="shared_mlp.",
        routing="top-k of the router logits, softmax over the k; plus a shared MLP (mamba / attention layers)",
        depth_keys=(_COUNT, _LAYER_TYPES),
    ),
    Layout(
        name="minimax_m3_vl_text",
        model_types=("minimax_m3_vl_text",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        routing=_SIGMOID_BIAS + "; times routed_scaling_factor; plus a shared MLP",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES),
        notes=("a config that gives moe_layer_freq instead of mlp_layer_types is read as all-MoE and "
               "refused if its tensors disagree",),
    ),
    Layout(
        name="inkling2_text",
        model_types=("inkling2_text",),
        layer_prefix="model.llm.layers.",
        experts_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        # fused [E,2F,H] (gate and up interleaved along dim 1 on load) and [E,H,F]; the MXFP8 release's scales
        # (assumed expert axis first; tested on a hand-built checkpoint only)
        fused_experts=("mlp.experts.w13_weight", "mlp.experts.w2_weight",
                       "mlp.experts.w13_weight_scale", "mlp.experts.w2_weight_scale"),
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.bias",),  # the correction bias (e_score_correction_bias once loaded)
        buffers=("mlp.gate.bias",),
        routing=("scoring_func (sigmoid) of the router logits; top-k of score + correction bias (mlp.gate.bias); "
                 "normalised; times route_scale"),
        depth_keys=(_COUNT, _LAYER_TYPES),
        depth_refused=("the attention-residual queries are layer-indexed tensors outside the layers "
                       "(model.llm.attn_res.attn_queries.{i} belongs to layer i+1, so layer 0 has none, and "
                       "mlp_queries.{i}), which a layer copy cannot renumber or supply, and the attention-residual "
                       "blocks (n_layers_per_attn_res_block) follow each layer's position"),
    ),
    Layout(
        name="axk1",
        model_types=("axk1",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts; a post-MoE RMSNorm",
        moe_rule="mlp_layer_types",
        default_dense=1,  # the unsaved first_k_dense_replace kwarg's default
        depth_keys=(_COUNT, _MOE_TYPES),
        width_rules=_group_rules(),
    ),
    Layout(
        name="axk2",
        model_types=("axk2",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + " (n_group may be null: no groups); plus shared experts",
        moe_rule="mlp_layer_types",
        default_dense=1,
        depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES),
        width_rules=_group_rules(),
    ),
    Layout(
        name="beam",
        model_types=("beam",),
        experts_keys=("num_experts", "num_local_experts", "n_routed_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS + " (the scaling applied to the block output)",
        moe_rule="mlp_layer_types",
        default_dense=3,  # a config without mlp_layer_types has min(3, L) dense layers
        depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES),
        width_rules=_group_rules(),
        index_dependent_layers="residual adds are scaled by the layer's index (1/sqrt(2(l+1)))",
    ),
    Layout(
        name="glm_moe_dsa",
        model_types=("glm_moe_dsa",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="mlp_layer_types",
        default_dense=3,  # first_k_dense_replace's default
        depth_keys=(_COUNT, _MOE_TYPES, _FIRST_K_INFO, _LAYER_TYPES,
                    DepthKey("indexer_types", "per_layer_reuse", reuses="shared")),
        width_rules=_group_rules(),
        notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",
               "indexer_types 'shared' layers reuse the previous full layer's top-k: a depth map under which "
               "a copied shared layer would reuse a different full layer than its original did is refused",),
    ),
    Layout(
        name="bailing_hybrid",
        model_types=("bailing_hybrid",),
        experts_keys=("num_experts", "num_local_experts", "n_routed_experts"),
        top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
        shared_experts_keys=("num_shared_experts", "n_shared_experts"),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.expert_bias",),
        buffers=("mlp.gate.expert_bias",),
        routing=_SIGMOID_GROUPS + " (num_expert_group, moe_renormalize; bias saved as gate.expert_bias); "
                "plus shared experts",
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _MOE_TYPES, _FIRST_K_INFO, _LAYER_TYPES),
        width_rules=_group_rules(n_group=("num_expert_group", "n_group"),
                                 norm=("moe_renormalize", "norm_topk_prob")),
        notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",
               "a config without layer_types derives it from layer_group_size, which a layer map does "
               "not follow",),
    ),
    Layout(
        name="qwen3_next",
        model_types=("qwen3_next",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_expert.",
        routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert",
        moe_rule="sparse_step",
        depth_keys=_QWEN_DEPTH,
        mtp_prefix="mtp.",
        notes=(_MTP_OUTSIDE,),
    ),
    Layout(
        name="qwen3_5_moe_text",
        model_types=("qwen3_5_moe_text",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_expert.",
        routing="softmax over all experts, top-k, renormalised; plus a sigmoid-gated shared expert",
        depth_keys=(_COUNT, _LAYER_TYPES),
        mtp_prefix="mtp.",
        notes=(_MTP_OUTSIDE,),
    ),
    Layout(
        name="nemotron_h",
        model_types=("nemotron_h",),
        layer_prefix="backbone.layers.",
        layers_list_keys=("layers_block_type", "hybrid_override_pattern"),
        experts_keys=_ROUTED,
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mixer.shared_experts.",
        experts_prefix="mixer.experts.",
        router_weights=("mixer.gate.weight",),
        router_biases=("mixer.gate.e_score_correction_bias",),
        buffers=("mixer.gate.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS + "; non-gated (relu2) experts; plus shared experts",
        moe_rule="block_types",
        moe_block_types=(("layers_block_type", "moe"), ("hybrid_override_pattern", "E")),
        depth_keys=(_COUNT, DepthKey("layers_block_type", "per_layer"),
                    DepthKey("hybrid_override_pattern", "per_layer_chars")),
        width_rules=_group_rules(),
        notes=("one block per layer (mamba, attention, MoE or MLP) under mixer.; the layer count is the "
               "length of layers_block_type (or hybrid_override_pattern); num_hidden_layers, when "
               "present, is rewritten too",
               _MTP_OUTSIDE,),
        mtp_prefix="mtp.",
    ),
    Layout(
        name="qwen4_exp_text",
        model_types=("qwen4_exp_text",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_expert.",
        routing=_SOFTMAX_TOPK + "; plus a sigmoid-gated shared expert (with hyper-connections)",
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("ple_layer_ids", "ranked_index_list_1based")),
        mtp_prefix="mtp.",
        notes=(_MTP_OUTSIDE,
               "a PLE layer's n-gram table sizes and hashing derive from its rank in ple_layer_ids: depth "
               "maps that copy a PLE layer to another rank (any 2x map) are refused",),
    ),
    Layout(
        name="llama4_text",
        model_types=("llama4_text",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="feed_forward.experts.",
        fused_experts=("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"),
        router_weights=("feed_forward.router.weight",),
        shared_prefix="feed_forward.shared_expert.",
        routing=("top-k of the router logits; sigmoid of the k selected logits scales each expert's "
                 "input (not its output); plus an always-on shared expert"),
        moe_rule="moe_layer_list",
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("no_rope_layers", "per_layer"),
                    DepthKey("moe_layers", "index_list")),
        tensor_rules=(TensorRule("feed_forward.experts.down_proj",
                                 "a selected pair (original and copy) gets the same input scale each, so "
                                 "the pair's output would double, and no config key can absorb the factor"),),
        notes=("width growth halves every expert's down projection (originals included): originals are "
               "not byte-identical",),
    ),
    Layout(
        name="flint",
        model_types=("flint",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_expert.",
        routing=("sigmoid scores; top-k of the scores; normalised when norm_topk_prob (the default); "
                 "plus an ungated shared expert"),
        moe_rule="sparse_step",
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("decoder_sparse_step", "sparse_step"),
                    DepthKey("mlp_only_layers", "index_list")),
        tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID, when=(("norm_topk_prob", False),),
                                 defaults=(("norm_topk_prob", True),)),),
        notes=("a config without mlp_only_layers makes layers 0 and 1 dense (the config class's default)",
               _HALVED_WHEN_RAW),
    ),
    Layout(
        name="kolibri1",
        model_types=("kolibri1",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        # the correction bias is saved outside the MoE block (transformers renames it on load)
        router_biases=("moe.router.expert_bias",),
        buffers=("moe.router.expert_bias",),
        shared_prefix="mlp.shared_experts.",
        routing=("top-k of the raw router logits + expert_bias; weights = sigmoid of the selected "
                 "logits, normalised only when norm_topk_prob (default false); plus a shared expert"),
        depth_keys=(_COUNT, _LAYER_TYPES),
        tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID, when=(("norm_topk_prob", False),),
                                 defaults=(("norm_topk_prob", False),)),),
        notes=(_HALVED_WHEN_RAW + " (the default)",),
    ),
    Layout(
        name="cohere2_moe",
        model_types=("cohere2_moe",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("num_shared_experts",),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        shared_prefix="mlp.shared_experts.",
        routing=("top-k of the router logits; softmax over the k (expert_selection_fn softmax), or "
                 "sigmoid of the k, normalised when norm_topk_prob; plus shared experts, summed or "
                 "averaged with the routed output"),
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES),
        tensor_rules=(TensorRule("down_proj.weight", _RAW_SIGMOID,
                                 when=(("expert_selection_fn", "sigmoid"), ("norm_topk_prob", False)),
                                 defaults=(("expert_selection_fn", "softmax"), ("norm_topk_prob", True))),),
        notes=(_HALVED_WHEN_RAW + " with expert_selection_fn sigmoid",
               "a config without mlp_layer_types is read as all-MoE (the unsaved first_k_dense_replace "
               "kwarg defaults to 0) and refused if its tensors disagree"),
    ),
    Layout(
        name="ernie4_5_moe",
        model_types=("ernie4_5_moe",),
        experts_keys=("moe_num_experts", "num_experts"),
        top_k_keys=("moe_k", "num_experts_per_tok"),
        shared_experts_keys=("moe_num_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.moe_statics.e_score_correction_bias",),
        expert_axis=(("mlp.moe_statics.e_score_correction_bias", 1),),  # [1, E]
        routing=("softmax (float32) over all experts; top-k of probabilities + e_score_correction_bias; "
                 "weights = probabilities / clamp(sum, moe_norm_min); plus shared experts"),
        moe_rule="layer_range",
        moe_range=(("moe_layer_start_index", 1), ("moe_layer_end_index", -1), ("moe_layer_interval", 1)),
        depth_keys=(_COUNT, DepthKey("moe_layer_start_index", "moe_range")),
        tensor_rules=(TensorRule("mlp.moe_statics.e_score_correction_bias",
                                 "the correction bias is added to softmax probabilities, which halve with "
                                 "twice the experts; the bias must halve with them to keep the selection"),),
        notes=("width growth halves the correction bias (originals included): originals are not byte-identical",
               "the MoE layers are a range (start, end, interval): stacking a model with a dense first layer "
               "cannot be expressed and is refused"),
    ),
    Layout(
        name="longcat_flash",
        model_types=("longcat_flash",),
        layers_keys=("num_layers",),  # each layer holds two attention blocks and two dense MLPs
        mtp_prefix="model.mtp.",  # Hub MTP block (dense MLP): kept out of depth growth and parameter counts
        experts_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("moe_topk", "num_experts_per_tok"),
        experts_prefix="mlp.experts.",
        router_weights=("mlp.router.classifier.weight",),
        router_biases=("mlp.router.classifier.bias", "mlp.router.e_score_correction_bias"),
        buffers=("mlp.router.e_score_correction_bias",),
        # router rows and gate/up slots: n_routed_experts routed, then zero_expert_num identity experts
        expert_segments=("zero_expert_num",),
        routing=("softmax (float32) over routed + zero (identity) experts; top-k of probabilities + "
                 "e_score_correction_bias; weights = probabilities x routed_scaling_factor (not renormalised)"),
        depth_keys=(DepthKey("num_layers", "count"),),
        width_rules=(WidthRule("zero_expert_num", "mul", "zero (identity) experts are duplicated with the routed "
                               "ones: a selected pair of copies weighs as much as the original"),),
        tensor_rules=(TensorRule("mlp.router.e_score_correction_bias",
                                 "the correction bias is added to softmax probabilities, which halve with "
                                 "twice the experts; the bias must halve with them to keep the selection"),),
        notes=("router rows, correction bias and gate/up slots are [routed, zero] and grow segment by segment: "
               "[E, E copies, Z, Z copies]",
               "width growth halves the correction bias (originals included): originals are not byte-identical"),
    ),
    Layout(
        name="inkling_text",
        model_types=("inkling_text",),
        experts_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj",
                       "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        # the router scores routed then shared experts ([E+S] rows); the fused shared experts are [S, ...]
        expert_segments=("n_shared_experts",),
        segment_tensors=(("mlp.shared_experts.gate_proj", 1), ("mlp.shared_experts.up_proj", 1),
                         ("mlp.shared_experts.down_proj", 1)),
        routing=("sigmoid (float32); top-k of routed score + e_score_correction_bias; weights = sigmoid of the "
                 "k routed and S shared logits, normalised over all k + S, times route_scale and global_scale; "
                 "the shared experts' outputs are scaled by their weights"),
        moe_rule="mlp_layer_types",
        depth_keys=(_COUNT, _LAYER_TYPES, _MOE_TYPES, DepthKey("local_layer_ids", "index_list")),
        width_rules=(WidthRule("n_shared_experts", "mul", "the router normalises over routed and shared experts: "
                               "the shared experts are duplicated too, so every weight halves with its pair"),),
        notes=("the shared experts are duplicated (n_shared_experts x2) and take --noise like routed copies; "
               "router rows grow as [E, E copies, S, S copies]",),
    ),
    Layout(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        experts_keys=("n_routed_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="ffn.shared_experts.",
        experts_prefix="ffn.experts.",
        router_weights=("ffn.gate.weight",),
        router_biases=("ffn.gate.bias",),  # the correction bias (e_score_correction_bias in memory)
        buffers=("ffn.gate.bias", "ffn.gate.tid2eid"),
        # hash layers pick experts from a token -> expert table [vocab, top-k]
        expert_tables=("ffn.gate.tid2eid",),
        routing=("scoring_func (sqrtsoftplus) of the logits, elementwise; top-k of score + correction bias, or "
                 "tid2eid[token] in hash_moe layers; weights normalised over the k, times routed_scaling_factor; "
                 "plus a shared expert"),
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("mlp_layer_types", "per_layer")),
        notes=("hash_moe layers' token -> expert table tid2eid [vocab, k] grows to [vocab, 2k] = "
               "[tid2eid, tid2eid + E]: each token picks both copies of its experts, each at half the weight",
               "Hub names (layers.N.ffn..., embed.weight) and save_pretrained names (model.layers.N...) both "
               "work; MTP tensors (mtp.*) are copied unchanged (transformers ignores them on load)"),
    ),
    Layout(
        name="dbrx",
        model_types=("dbrx",),
        layer_prefix="transformer.blocks.",
        layers_keys=("n_layers", "num_hidden_layers"),
        experts_keys=("ffn_config.moe_num_experts",),
        top_k_keys=("ffn_config.moe_top_k",),
        experts_prefix="ffn.experts.mlp.",
        # 2-D [E*F, H] each (w2 transposed): expert e is rows e*F .. (e+1)*F - 1, F = ffn_hidden_size
        fused_experts=("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2"),
        rows_per_expert_key="ffn_config.ffn_hidden_size",
        router_weights=("ffn.router.layer.weight",),
        routing=("softmax over all experts; top-k; weights divided by their p-norm, p = "
                 "ffn_config.moe_normalize_expert_weights (default 1; null: not normalised)"),
        depth_keys=(DepthKey("n_layers", "count"),),
        tensor_rules=(TensorRule("ffn.experts.mlp.w2", "top-k weights divided by their p-norm with p != 1 make a "
                                 "selected pair weigh 2^(1-1/p) times the original",
                                 p_norm_key="ffn_config.moe_normalize_expert_weights"),),
        notes=("config keys nested in ffn_config (moe_num_experts, moe_top_k, ffn_hidden_size) are read and "
               "written there",
               "with moe_normalize_expert_weights p not 1 (nor null), width growth scales every expert's w2 by "
               "f^(1/p - 1), originals included"),
    ),
    Layout(
        name="phimoe",
        model_types=("phimoe",),
        experts_keys=("num_local_experts", "num_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="block_sparse_moe.experts.",
        router_weights=("block_sparse_moe.gate.weight",),
        routing=("sparsemixer, hard-wired top-2: the argmax expert, weighted by a softmax masked near the "
                 "max; then the argmax of the rest, likewise"),
        depth_keys=(_COUNT,),
        exact_width=False,
        inexact_reason=("sparsemixer routing always picks 2 experts (num_experts_per_tok is not read): after "
                        "duplication the second pick is the first pick's copy and the weights change"),
    ),
    Layout(
        name="zaya",
        model_types=("zaya",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        # mlp.gate.router_mlp.out_proj.weight and mlp.gate.balancing_biases have E+1 rows (the last is the
        # skip class): not router rows in moegrow's sense, so width growth is refused
        router_weights=(),
        routing=("a router MLP (fed the previous layer's router state) gives E+1 classes, the last a skip "
                 "class; softmax; top-1 of probabilities + balancing_biases; the skip class gets weight 0"),
        depth_keys=(_COUNT, _LAYER_TYPES),
        exact_width=False,
        inexact_reason=("top-k is validated == 1 (a copied pair cannot both be picked), and the skip class, "
                        "not duplicated, keeps its share of the softmax"),
        width_refused=("the router's last row (mlp.gate.router_mlp.out_proj.weight, mlp.gate.balancing_biases: "
                       "E+1 rows) is a skip class that must stay after the copies, and top-k must stay 1: "
                       "moegrow's duplication cannot express this"),
        not_in_first_layer=("mlp.gate.router_states_scale",),
    ),
    Layout(
        name="doge",
        model_types=("doge",),
        experts_keys=("num_experts",),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="mlp.experts.",
        # product-key experts: one row per expert in two embeddings; the router has 2*sqrt(E) rows
        fused_experts=("mlp.down_embed.weight", "mlp.up_embed.weight"),
        router_weights=(),
        routing=("product keys: 2 x sqrt(E) key logits, top sqrt(E) per axis, summed over pairs, top-k, "
                 "softmax over the k; a dense MLP runs beside the experts"),
        depth_keys=(_COUNT,),
        exact_width=False,
        inexact_reason="product-key routing: the router scores sqrt(E) keys per axis, not experts",
        width_refused=("product-key experts: the router (mlp.router_gate.weight) has 2*sqrt(E) rows, one per "
                       "key, not one per expert, and E must stay a square (2x cannot; 4x would need both key "
                       "sets duplicated and the experts re-indexed, which moegrow's duplication cannot express)"),
    ),
    Layout(
        name="jamba",
        model_types=("jamba",),
        experts_keys=("num_experts", "num_local_experts"),
        top_k_keys=("num_experts_per_tok",),
        experts_prefix="feed_forward.experts.",
        router_weights=("feed_forward.router.weight",),
        routing="softmax over all experts, top-k, weights not renormalised",
        moe_rule="period",
        moe_period_key="expert_layer_period",
        depth_keys=(_COUNT, DepthKey("expert_layer_period", "period", "expert_layer_offset", (2, 1)),
                    DepthKey("attn_layer_period", "period", "attn_layer_offset", (8, 4))),
        notes=("MoE layers are every expert_layer_period-th from expert_layer_offset and attention layers every "
               "attn_layer_period-th from attn_layer_offset: a depth map is refused unless one period / offset "
               "pair says each new set (stacking works when the layer count is a multiple of both periods; "
               "interposition only with period 1)",),
    ),
    Layout(
        name="hy_v4",
        model_types=("hy_v4",),
        experts_keys=_ROUTED,
        top_k_keys=("num_experts_per_tok",),
        shared_experts_keys=("n_shared_experts",),
        shared_prefix="mlp.shared_experts.",
        experts_prefix="mlp.experts.",
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        router_weights=("mlp.gate.weight",),
        router_biases=("mlp.gate.e_score_correction_bias",),
        buffers=("mlp.gate.e_score_correction_bias",),
        routing=_SIGMOID_GROUPS + "; plus shared experts (with hyper-connections)",
        moe_rule="mlp_layer_types",
        default_dense=1,  # the config class's default mlp_layer_types: one dense layer, then MoE
        depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES, DepthKey("indexer_types", "per_layer_reuse", reuses="shared")),
        width_rules=_group_rules(),
        notes=("indexer_types 'shared' layers reuse the top-k of the nearest earlier 'full' layer: a depth map "
               "is refused where a copied shared layer would reuse anything but a copy of its original's "
               "full layer (interposition and stacking keep the pattern)",),
    ),
    Layout(
        name="gemma4_text",
        model_types=("gemma4_text",),
        experts_keys=("num_experts",),
        top_k_keys=("top_k_experts",),
        experts_prefix="experts.",
        fused_experts=("experts.gate_up_proj", "experts.down_proj"),
        # the router sits at layer level beside a dense MLP; per_expert_scale [E] multiplies the selected weights
        router_weights=("router.proj.weight",),
        router_biases=("router.per_expert_scale",),
        routing=("softmax over all experts; top-k; renormalised over the k; times the selected experts' "
                 "per_expert_scale; added to a dense MLP's output"),
        depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("per_layer_config", "per_layer_dict"),
                    DepthKey("num_kv_shared_layers", "suffix_count")),
        depth_refused_keys=(("hidden_size_per_layer_input", "the per-layer input embeddings "
                             "(embed_tokens_per_layer, per_layer_model_projection) hold one slice per layer in "
                             "one tensor, which a layer copy cannot re-slice"),),
        notes=("per_layer_config (per-layer attention overrides, keyed by layer index) follows the layer map",
               "the last num_kv_shared_layers layers reuse earlier layers' keys and values (and have no k/v "
               "projections): a map must keep their copies last",
               "depth growth with per-layer input embeddings (hidden_size_per_layer_input > 0) is refused"),
    ),
    Layout(
        name="dots3_note_text",
        model_types=("dots3_note_text",),
        **_DEEPSEEK_PARTS,
        routing=_SIGMOID_GROUPS + "; plus shared experts",
        moe_rule="mlp_layer_types",
        default_dense=1,  # the unsaved first_k_dense_replace kwarg's default
        depth_keys=(_COUNT, _MOE_TYPES, _LAYER_TYPES, DepthKey("per_layer_config", "per_layer_dict")),
        width_rules=_group_rules(),
        notes=("per_layer_config (the sliding-attention layers' attention shapes, keyed by layer index) follows "
               "the layer map",),
    ),
)

# Multimodal checkpoints whose text decoder is one of the families above: the decoder grows, the rest is copied.
WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper(("llama4",), "text_config", "language_model.model.layers."),
    Wrapper(("qwen3_5_moe",), "text_config", "model.language_model.layers."),
    Wrapper(("aria",), "text_config", "language_model.model.layers."),
    # MiniMaxM3SparseForConditionalGeneration saves the Hub names (block_sparse_moe., experts per expert
    # w1/w2/w3), which its conversion mapping fuses into the text class's mlp.experts.gate_up_proj on load
    Wrapper(("minimax_m3_vl",), "text_config", "language_model.model.layers.", layout_overrides=(
        ("experts_prefix", "block_sparse_moe.experts."),
        ("fused_experts", ()),
        ("shared_prefix", "block_sparse_moe.shared_experts."),
        ("router_weights", ("block_sparse_moe.gate.weight",)),
        ("router_biases", ("block_sparse_moe.e_score_correction_bias",)),
        ("buffers", ("block_sparse_moe.e_score_correction_bias",)),
    )),
    Wrapper(("gemma4",), "text_config", "model.language_model.layers."),
    Wrapper(("qwen4_exp",), "text_config", "model.language_model.layers."),
    # save_pretrained writes the published layout: the decoder at the top (model.layers.), the towers beside it
    Wrapper(("dots3_note",), "text_config", "model.layers."),
    # the text model's own prefix; depth growth is refused as for inkling2_text (attention-residual queries)
    Wrapper(("inkling2",), "text_config", "model.llm.layers."),
    # the published (sglang) names: fused w13 / w2 experts and shared experts, correction bias `gate.bias`
    Wrapper(("inkling_mm_model",), "text_config", "model.llm.layers.", layout_overrides=(
        ("fused_experts", ("mlp.experts.w13_weight", "mlp.experts.w2_weight", "mlp.shared_experts.shared_w13_weight",
                           "mlp.shared_experts.shared_w2_weight")),
        ("segment_tensors", (("mlp.shared_experts.shared_w13_weight", 1), ("mlp.shared_experts.shared_w2_weight", 1))),
        ("router_biases", ("mlp.gate.bias",)),
        ("buffers", ("mlp.gate.bias",)),
    )),
    Wrapper(("kimi_k25",), "text_config", "language_model.model.layers.",
            alt_prefixes=("language_model.model.blocks.",)),
)

# -- Multimodal MoE releases whose text decoder has no causal-LM class of its own (issue 10, item 5) -----------
# Each decoder's layout lives in its wrapper (`Wrapper.text_layout`): it is not a standalone family.


def _family(name: str) -> Layout:
    return next(lay for lay in LAYOUTS if lay.name == name)


WRAPPERS += (
    # fused experts `mlp.experts.gate_up_proj` / `down_proj` (expert axis first; the Hub release stores the last two
    # dims transposed, which transformers' conversion reads back), `mlp.gate`; qwen3_moe routing, always normalised
    Wrapper(("qwen3_vl_moe",), "text_config", "model.language_model.layers.", text_layout=replace(
        _family("qwen3_moe"), name="qwen3_vl_moe_text", model_types=("qwen3_vl_moe_text",),
        fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
        routing="softmax over all experts, top-k, always renormalised over the k (no norm_topk_prob key)"),
        depth_keys=(DepthKey("vision_config.deepstack_visual_indexes", "positional_prefix"),)),
    # the thinker's decoder is qwen3_moe's (per-expert names, norm_topk_prob); the talker's MoE decoder (qwen2_moe-like,
    # under talker.model.layers.) is not grown: one layout grows one decoder, so it is copied untouched with code2wav
    Wrapper(("qwen3_omni_moe",), "thinker_config.text_config", "thinker.model.layers.", text_layout=replace(
        _family("qwen3_moe"), name="qwen3_omni_moe_text", model_types=("qwen3_omni_moe_text",)),
        depth_keys=(DepthKey("thinker_config.vision_config.deepstack_visual_indexes", "positional_prefix"),
                    DepthKey("talker_config.accept_hidden_layer", "hidden_index")),
        text_module="thinker"),
    # glm4_moe's decoder (per-expert, `mlp.gate` + correction bias, shared experts, first_k_dense_replace)
    Wrapper(("glm4v_moe",), "text_config", "model.language_model.layers.", text_layout=replace(
        _family("glm4_moe"), name="glm4v_moe_text", model_types=("glm4v_moe_text",), notes=())),
    # modality-isolated experts: per layer E text experts then E vision experts, saved per expert as experts.0..2E-1
    # (the text ones first; transformers splits them in half on load); transposed gates [H, E], text `gate.weight`
    # and vision `gate.weight_1`; the correction bias [2, E], a row per modality. Width growth keeps each half whole:
    # experts [text E, text copies, vision E, vision copies], gates and bias doubled along their expert axis 1
    Wrapper(("ernie4_5_vl_moe",), "text_config", "model.layers.", text_layout=replace(
        _family("ernie4_5_moe"), name="ernie4_5_vl_moe_text", model_types=("ernie4_5_vl_moe_text",),
        router_weights=("mlp.gate.weight", "mlp.gate.weight_1"),
        expert_axis=(("mlp.gate.weight", 1), ("mlp.gate.weight_1", 1), ("mlp.moe_statics.e_score_correction_bias", 1)),
        inner_axis=("mlp.gate.weight", "mlp.gate.weight_1", "mlp.moe_statics.e_score_correction_bias"),
        expert_segments=("moe_num_experts",),  # the vision experts: as many as the text ones
        routing=("per modality (text tokens: text experts; image / video tokens: vision experts): softmax (float32) "
                 "over the E experts; top-k of probabilities + that modality's e_score_correction_bias row; weights = "
                 "probabilities / clamp(sum, moe_norm_min); plus shared experts"),
        moe_rule="mlp_layer_types", moe_range=(), default_dense=1, depth_keys=(_COUNT, _MOE_TYPES),
        notes=("width growth halves the correction bias (originals included): originals are not byte-identical",)),
        tower_prefixes=("model.vision_model.", "model.resampler_model.")),
)
# -- end of issue 10, item 5 ---------------------------------------------------------------------------------------

# --- identity depth init (issue 11): per family, the tensors an added layer copy has zeroed (see `Residual`).
# Read off each family's decoder layer in transformers 5.23 (models/*/modeling_*.py). Every sublayer adds its
# output to the stream; where a norm follows the sublayer before the add (gemma / olmo2 / afmoe / kolibri1
# sandwich norms) it is an RMSNorm without bias, so norm(0) = 0. A wrapper's model_type may have its own entry
# (its checkpoints' names); otherwise it takes its text family's.
_ATTN = "self_attn.o_proj"
_MLP_DOWN = "mlp.down_proj"  # a dense layer's MLP
_EXPERT_DOWN = "mlp.experts.*.down_proj"  # per-expert on disk
_FUSED_DOWN = ("mlp.experts.down_proj", "mlp.experts.down_proj_bias", "mlp.experts.down_proj_blocks")
_SHARED_DOWN = "mlp.shared_experts.down_proj"
_SHARED1_DOWN = "mlp.shared_expert.down_proj"  # qwen-style gated shared expert: the gate then scales zero
_DEEPSEEK_WRITERS = Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, *_FUSED_DOWN, _SHARED_DOWN))
_QWEN_LINEAR_WRITERS = (_ATTN, "linear_attn.out_proj", _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)

RESIDUAL: dict[str, Residual] = {
    "mixtral": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
    "qwen2_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
    "qwen3_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN)),
    "olmoe": Residual((_ATTN, _EXPERT_DOWN)),
    "deepseek_v3": _DEEPSEEK_WRITERS,
    "flex_olmo": Residual((_ATTN, _EXPERT_DOWN)),  # olmo2 post-sublayer RMSNorms
    "minimax": Residual(refused=(
        "the residual is taken after the input norm (residual = input_layernorm(x)) and scaled by the alpha "
        "factors, so a layer with zeroed outputs still normalises the stream")),
    "minimax_m2": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
    "mellum": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN)),
    "hunyuan_v1_moe": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, "mlp.shared_mlp.down_proj")),
    "deepseek_v2": _DEEPSEEK_WRITERS,
    "glm4_moe": _DEEPSEEK_WRITERS,
    "dots1": _DEEPSEEK_WRITERS,
    "solar_open": _DEEPSEEK_WRITERS,
    "exaone_moe": _DEEPSEEK_WRITERS,
    "mimo_v2_flash": _DEEPSEEK_WRITERS,
    "kimi_linear": Residual((_ATTN, "block_sparse_moe.down_proj", "block_sparse_moe.experts.*.w2",
                             "block_sparse_moe.shared_experts.down_proj")),  # KDA and MLA layers: both o_proj
    "glm4_moe_lite": _DEEPSEEK_WRITERS,
    "deepseek_v32": _DEEPSEEK_WRITERS,
    # granite: the sublayer output times residual_multiplier is added (zero stays zero)
    "granitemoe": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj")),
    "granitemoeshared": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj",
                                  "shared_mlp.output_linear")),
    "jetmoe": Residual(("self_attention.experts.output_linear", "self_attention.experts.bias", "mlp.output_linear",
                        "mlp.bias")),  # attention experts and MoE MLP, each with an output bias
    "gpt_oss": Residual((_ATTN, *_FUSED_DOWN)),  # o_proj and down_proj biases too
    "mistral4": _DEEPSEEK_WRITERS,
    "afmoe": _DEEPSEEK_WRITERS,
    "lfm2_moe": Residual(("conv.out_proj", "self_attn.out_proj", "feed_forward.w2", "feed_forward.experts.*.w2",
                          "feed_forward.experts.down_proj")),
    "hy_v3": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, "mlp.shared_mlp.down_proj")),
    "laguna": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
    "aria_text": Residual((_ATTN, _MLP_DOWN, "mlp.experts.fc2", _SHARED_DOWN)),
    "granitemoe_swa": Residual((_ATTN, "block_sparse_moe.output_linear", "block_sparse_moe.experts.down_proj",
                                "shared_mlp.output_linear")),
    "granitemoehybrid": Residual((_ATTN, "mamba.out_proj", "block_sparse_moe.output_linear",
                                  "block_sparse_moe.experts.down_proj", "shared_mlp.output_linear")),
    "minimax_m3_vl_text": _DEEPSEEK_WRITERS,
    "axk1": _DEEPSEEK_WRITERS,
    "axk2": _DEEPSEEK_WRITERS,
    "beam": Residual(refused=(
        "the k-th residual add scales the stream by sqrt((k-1)/k) (depth-scaled residuals), so no layer is "
        "x + f(x), and moving the originals to new depths rescales them")),
    "glm_moe_dsa": _DEEPSEEK_WRITERS,
    "bailing_hybrid": Residual(("attention.dense", _MLP_DOWN, _EXPERT_DOWN, _SHARED_DOWN)),
    "qwen3_next": Residual(_QWEN_LINEAR_WRITERS),
    "qwen3_5_moe_text": Residual(_QWEN_LINEAR_WRITERS),
    # hyper-connections without stream mixing: out = input streams + injection of f (zero when f is)
    "qwen4_exp_text": Residual((*_QWEN_LINEAR_WRITERS, "ple.value_proj")),
    "nemotron_h": Residual(("mixer.o_proj", "mixer.out_proj", "mixer.down_proj", "mixer.experts.*.down_proj",
                            "mixer.shared_experts.down_proj")),  # one mixer a layer: attention, Mamba, MLP or MoE
    "llama4_text": Residual((_ATTN, "feed_forward.down_proj", "feed_forward.experts.down_proj",
                             "feed_forward.shared_expert.down_proj")),
    "flint": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED1_DOWN)),
    "kolibri1": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, _SHARED_DOWN)),  # post-sublayer RMSNorms
    "cohere2_moe": _DEEPSEEK_WRITERS,  # attention and MLP in parallel, both added
    "ernie4_5_moe": _DEEPSEEK_WRITERS,
    "longcat_flash": Residual(("self_attn.*.o_proj", "mlps.*.down_proj", _EXPERT_DOWN, *_FUSED_DOWN),
                              refused_keys=(("zero_expert_num", "zero-computation experts add their input, "
                                             "times its routing weight, to the stream; no zeroed tensor removes "
                                             "it"),)),
    # the short convolutions after each sublayer add nothing to zero (no bias)
    "inkling_text": Residual((_ATTN, _MLP_DOWN, *_FUSED_DOWN, _SHARED_DOWN)),
    "deepseek_v4": Residual(refused=(
        "manifold hyper-connections mix the residual streams through a learned doubly stochastic matrix, so a "
        "layer with zeroed outputs still mixes them")),
    "dbrx": Residual(("norm_attn_norm.attn.out_proj", "ffn.experts.mlp.w2")),
    "phimoe": Residual((_ATTN, "block_sparse_moe.experts.*.w2")),
    "zaya": Residual(refused=(
        "the residual is scaled and shifted (post_*_residual_scale) and each router takes the previous "
        "layer's router state, so a layer with zeroed outputs is not the identity")),
    "doge": Residual(refused=(
        "the residual is scaled by learned weights (input_residual, post_attention_residual), so a layer with "
        "zeroed outputs is not the identity")),
    "jamba": Residual((_ATTN, "mamba.out_proj", "feed_forward.down_proj", "feed_forward.experts.*.down_proj")),
    # hyper-connections without the comb mix: out = post * f + input streams
    "hy_v4": _DEEPSEEK_WRITERS,
    "gemma4_text": Residual(
        (_ATTN, _MLP_DOWN, "experts.down_proj"), ones=("layer_scalar",),
        refused_keys=(("num_kv_shared_layers", "the last layers reuse the keys and values of the last earlier "
                       "layer of their type, which would be an added copy that sees another input"),)),
    "dots3_note_text": _DEEPSEEK_WRITERS,
    # decoders that live only in their wrapper (`Wrapper.text_layout`)
    "qwen3_vl_moe_text": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, *_FUSED_DOWN)),
    "qwen3_omni_moe_text": Residual((_ATTN, _MLP_DOWN, _EXPERT_DOWN, *_FUSED_DOWN)),
    "glm4v_moe_text": _DEEPSEEK_WRITERS,
    "ernie4_5_vl_moe_text": _DEEPSEEK_WRITERS,  # text and vision experts alike
    # wrappers whose checkpoints name the decoder's tensors their own way (layouts.WRAPPERS' layout_overrides)
    "minimax_m3_vl": Residual((_ATTN, _MLP_DOWN, "block_sparse_moe.experts.*.w2",
                               "block_sparse_moe.shared_experts.down_proj")),
    "inkling_mm_model": Residual(("attn.wo_ud", "mlp.w2_md", "mlp.experts.w2_weight",
                                  "mlp.shared_experts.shared_w2_weight")),  # the published (sglang) names
}

_BY_TYPE: dict[str, Layout] = {t: lay for lay in LAYOUTS for t in lay.model_types}
_WRAPPER_BY_TYPE: dict[str, Wrapper] = {t: w for w in WRAPPERS for t in w.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def wrapper_of(model_type: Any) -> Wrapper | None:
    """The multimodal wrapper entry of a model_type, if it is one."""
    return _WRAPPER_BY_TYPE.get(model_type) if isinstance(model_type, str) else None


def supported_wrapper_types() -> list[str]:
    return sorted(_WRAPPER_BY_TYPE)


def layout_for(config: Mapping[str, Any], where: str = "config.json", names: Iterable[str] | None = None) -> Layout:
    """The layout of a config's model_type, or a clear refusal; given the checkpoint's tensor
    `names`, with the layer prefix those names use (see `as_saved`)."""
    return as_saved(_layout_for(config, where), names)


def as_saved(layout: Layout, names: Iterable[str] | None) -> Layout:
    """The layout with the layer prefix the checkpoint's tensor names carry.

    transformers loads a base model's tensors with or without the base-model prefix, and some Hub
    releases omit it (DeepSeek-V4: `layers.N.ffn...`, `embed.weight`); a wrapper may list other
    prefixes its decoder is saved under (`Wrapper.alt_prefixes`). moegrow keeps the source's names."""
    if names is None:
        return layout
    names = list(names)
    bare = layout.layer_prefix.removeprefix("model.")
    alternatives = (*(layout.wrapper.alt_prefixes if layout.wrapper else ()), bare)
    for prefix in (layout.layer_prefix, *alternatives):
        if any(n.startswith(prefix) for n in names):
            break
    else:
        return layout
    if prefix == layout.layer_prefix:
        return layout
    mtp = layout.mtp_prefix.removeprefix("model.") if prefix == bare else layout.mtp_prefix
    return replace(layout, layer_prefix=prefix, mtp_prefix=mtp)


def _layout_for(config: Mapping[str, Any], where: str) -> Layout:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: no model_type")
    wrapper = _WRAPPER_BY_TYPE.get(model_type)
    if wrapper is not None:
        text = lookup(config, wrapper.text_config_key)
        text_type = text.get("model_type") if isinstance(text, Mapping) else None
        if not isinstance(text_type, str):
            raise ConfigError(f"{where}: model_type {model_type!r} needs {wrapper.text_config_key} "
                              f"with a model_type (the text decoder's config)")
        own = wrapper.text_layout
        layout = own if own is not None and text_type in own.model_types else _BY_TYPE.get(text_type)
        if layout is None:
            raise UnsupportedModelError(
                f"{where}: {wrapper.text_config_key}.model_type {text_type!r} (the text decoder of "
                f"{model_type!r}) is not a supported MoE family (supported: {', '.join(supported_model_types())})")
        return replace(layout, layer_prefix=wrapper.layer_prefix, wrapper=wrapper, **dict(wrapper.layout_overrides))
    layout = _BY_TYPE.get(model_type)
    if layout is None:
        from .siblings import BY_DENSE

        if model_type in BY_DENSE:
            moe = " or ".join(s.moe for s in BY_DENSE[model_type])
            raise UnsupportedModelError(f"{where}: model_type {model_type!r} is a dense model, not MoE; "
                                        f"`moegrow upcycle` turns it into its MoE sibling ({moe})")
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not a supported MoE family "
            f"(supported: {', '.join(supported_model_types())}; multimodal, with a supported text "
            f"decoder: {', '.join(supported_wrapper_types())})"
        )
    return layout
