"""Per-family knowledge, as data: one `Layout` entry per MoE model family.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
Adding a family is adding an entry here; no other module branches on model_type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, UnsupportedModelError


@dataclass(frozen=True)
class DepthKey:
    """A layer-indexed config key and how a layer map rewrites it.

    kinds: ``count`` (the layer count), ``per_layer`` (a list with one entry per layer),
    ``index_list`` (a list of layer indices), ``prefix_count`` (the first N layers are special),
    ``sparse_step`` (every Nth layer is MoE; rewritten to 1 plus an explicit index list, see
    `configs.py`).
    """

    key: str
    kind: str


@dataclass(frozen=True)
class WidthRule:
    """A config change that keeps width growth by a factor f function-preserving.

    op ``mul`` multiplies the key by f, ``div`` divides it by f. ``unless`` names a boolean
    config key that, when true, makes the rule unnecessary.
    """

    key: str
    op: str
    why: str
    unless: str | None = None


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
    depth_keys: tuple[DepthKey, ...] = ()
    width_rules: tuple[WidthRule, ...] = ()
    exact_width: bool = True
    notes: tuple[str, ...] = field(default=())

    # -- config access -------------------------------------------------------------------------

    def config_key(self, config: Mapping[str, Any], aliases: tuple[str, ...], what: str) -> str:
        """The first alias present in config (the one to write back)."""
        for k in aliases:
            if config.get(k) is not None:
                return k
        raise ConfigError(f"config.json: no {what} key (looked for {', '.join(aliases)})")

    def num_experts(self, config: Mapping[str, Any]) -> int:
        return int(config[self.config_key(config, self.experts_keys, "expert count")])

    def top_k(self, config: Mapping[str, Any]) -> int:
        return int(config[self.config_key(config, self.top_k_keys, "top-k")])

    def num_layers(self, config: Mapping[str, Any]) -> int:
        return int(config[self.config_key(config, self.layers_keys, "layer count")])


_QWEN_DEPTH = (
    DepthKey("num_hidden_layers", "count"),
    DepthKey("layer_types", "per_layer"),
    DepthKey("max_window_layers", "prefix_count"),
    DepthKey("decoder_sparse_step", "sparse_step"),
    DepthKey("mlp_only_layers", "index_list"),
)
_SOFTMAX_TOPK = ("softmax over all experts, top-k, weights renormalised over the k when "
                 "norm_topk_prob (else raw probabilities)")

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
)

_BY_TYPE: dict[str, Layout] = {t: lay for lay in LAYOUTS for t in lay.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def layout_for(config: Mapping[str, Any], where: str = "config.json") -> Layout:
    """The layout of a config's model_type, or a clear refusal."""
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: no model_type")
    layout = _BY_TYPE.get(model_type)
    if layout is None:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not a supported MoE family "
            f"(supported: {', '.join(supported_model_types())})"
        )
    return layout
