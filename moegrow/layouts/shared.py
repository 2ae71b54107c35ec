"""Constants and rule builders that several lineages' entries share: config keys, routing descriptions,
the DeepSeek-V3 block's tensor names, group-limited routing's width rules, and residual writers."""

from __future__ import annotations

from .model import Counts, DepthKey, Names, Residual, WidthRule

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
# Parts several entries share, by alias (as transformers' conversion_mapping shares its rules): the count keys of
# Mixtral's lineage (num_local_experts first) and of Qwen's (num_experts first); experts and router by name alone
_LOCAL_COUNTS = Counts(experts_keys=("num_local_experts", "num_experts"), top_k_keys=("num_experts_per_tok",))
_NUM_COUNTS = Counts(experts_keys=("num_experts", "num_local_experts"), top_k_keys=("num_experts_per_tok",))
_BLOCK_SPARSE_NAMES = Names(experts_prefix="block_sparse_moe.experts.",
                            router_weights=("block_sparse_moe.gate.weight",))
_MLP_NAMES = Names(experts_prefix="mlp.experts.", router_weights=("mlp.gate.weight",))

# Tensor names and count keys shared by the DeepSeek-V3-style families (one entry each, differing in
# routing details and layer-indexed keys only).
_DEEPSEEK_NAMES = Names(
    shared_prefix="mlp.shared_experts.",
    experts_prefix="mlp.experts.",
    router_weights=("mlp.gate.weight",),
    router_biases=("mlp.gate.e_score_correction_bias",),
    buffers=("mlp.gate.e_score_correction_bias",),
)
_DEEPSEEK_COUNTS = Counts(experts_keys=_ROUTED, top_k_keys=("num_experts_per_tok",),
                          shared_experts_keys=("n_shared_experts",))
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


def _fused_neurons(prefix: str) -> tuple[tuple[str, int, str], ...]:
    """`ExpertAxis.neurons` of transformers' standard fused experts, saved as they are: gate_up_proj [E, 2F, H]
    (gate then up along dim 1: `.chunk(2, dim=-1)` of its output), down_proj [E, H, F]."""
    return ((f"{prefix}gate_up_proj", 1, "halves"), (f"{prefix}down_proj", 2, ""))


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
