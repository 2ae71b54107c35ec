"""DeepSeek's releases, and families that reuse its architecture as is: Mistral 4, Kimi Linear, GLM.

MLA attention, group-limited routing with a correction bias, shared experts under mlp.shared_experts.
"""

from __future__ import annotations

from .model import (
    Counts,
    DepthKey,
    DepthRules,
    Doc,
    ExpertAxis,
    Layout,
    MoeLayers,
    Names,
    Residual,
    WidthRule,
    WidthRules,
)
from .shared import (
    _ATTN,
    _COUNT,
    _DEEPSEEK_COUNTS,
    _DEEPSEEK_NAMES,
    _DEEPSEEK_WRITERS,
    _FIRST_K,
    _FIRST_K_INFO,
    _LAYER_TYPES,
    _MLP_TYPES,
    _MOE_TYPES,
    _ROUTED,
    _SIGMOID_GROUPS,
    _fused_neurons,
    _group_rules,
)

LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="deepseek_v3",
        model_types=("deepseek_v3",),
        names=_DEEPSEEK_NAMES,
        counts=Counts(
            experts_keys=("n_routed_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="first_k_dense"),
        depth=DepthRules(
            depth_keys=(
                DepthKey("num_hidden_layers", "count"),
                DepthKey("first_k_dense_replace", "prefix_count"),
            ),
        ),
        width=WidthRules(
            width_rules=(
                WidthRule("n_group", "mul", "groups must be [originals | copies] so that a copy's "
                          "group scores like its original's"),
                WidthRule("topk_group", "mul", "twice the groups are kept, the originals' and their "
                          "copies'"),
                WidthRule("routed_scaling_factor", "div", "unnormalised sigmoid weights do not halve, "
                          "so a selected pair would weigh twice", unless="norm_topk_prob"),
            ),
        ),
        doc=Doc(
            routing=("sigmoid scores; selection on score + e_score_correction_bias, limited to the "
                     "topk_group best of n_group groups (group score = sum of its top 2); top-k; "
                     "normalised when norm_topk_prob; times routed_scaling_factor; plus shared experts"),
            notes=("MTP layers stored after the decoder layers (model.layers.{L}) are widened, kept "
                   "out of depth interposition and renumbered after the new last layer; transformers "
                   "ignores them on load.",),
        ),
    ),
    Layout(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            router_weights=("mlp.gate.weight",),
        ),
        counts=Counts(
            experts_keys=_ROUTED,
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        moe=MoeLayers(moe_rule="first_k_dense"),
        depth=DepthRules(depth_keys=(_COUNT, _FIRST_K)),
        width=WidthRules(width_rules=_group_rules(scaling=False)),
        doc=Doc(
            routing=("softmax over all experts; greedy top-k, or group_limited_greedy (the topk_group "
                     "groups of n_group with the best max); never renormalised; times "
                     "routed_scaling_factor; plus shared experts"),
        ),
    ),
    Layout(
        name="glm4_moe",
        model_types=("glm4_moe",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(moe_rule="first_k_dense"),
        depth=DepthRules(depth_keys=(_COUNT, _FIRST_K)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; plus shared experts",
            notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
        ),
    ),
    Layout(
        name="kimi_linear",
        model_types=("kimi_linear",),
        names=Names(
            shared_prefix="block_sparse_moe.shared_experts.",
            experts_prefix="block_sparse_moe.experts.",
            router_weights=("block_sparse_moe.gate.weight",),
            router_biases=("block_sparse_moe.gate.e_score_correction_bias",),
            buffers=("block_sparse_moe.gate.e_score_correction_bias",),
        ),
        counts=Counts(
            experts_keys=("num_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_token", "num_experts_per_tok"),
            shared_experts_keys=("num_shared_experts", "n_shared_experts"),
        ),
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(
            depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO,
                        DepthKey("linear_attn_config.full_attn_layers", "index_list_1based"),
                        DepthKey("linear_attn_config.kda_layers", "index_list_1based")),
        ),
        width=WidthRules(
            width_rules=_group_rules(n_group=("num_expert_group", "n_group"),
                                     norm=("moe_renormalize", "norm_topk_prob")),
        ),
        doc=Doc(routing=_SIGMOID_GROUPS + " (num_expert_group, moe_renormalize); plus shared experts"),
    ),
    Layout(
        name="glm4_moe_lite",
        model_types=("glm4_moe_lite",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _MLP_TYPES, _FIRST_K_INFO)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(routing=_SIGMOID_GROUPS + "; plus shared experts"),
    ),
    Layout(
        name="deepseek_v32",
        model_types=("deepseek_v32",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(moe_rule="mlp_layer_types"),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, _MLP_TYPES, _FIRST_K_INFO)),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; plus shared experts",
            notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",),
        ),
    ),
    Layout(
        name="mistral4",
        model_types=("mistral4",),
        names=Names(
            shared_prefix="mlp.shared_experts.",
            experts_prefix="mlp.experts.",
            fused_experts=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
            router_weights=("mlp.gate.weight",),
        ),
        counts=Counts(
            experts_keys=_ROUTED,
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        axes=ExpertAxis(neurons=_fused_neurons("mlp.experts.")),
        moe=MoeLayers(moe_rule="first_k_dense"),
        depth=DepthRules(depth_keys=(_COUNT, _FIRST_K)),
        width=WidthRules(width_rules=_group_rules(scaling=False)),
        doc=Doc(
            routing=("softmax over all experts; the topk_group best of n_group groups (group score = "
                     "sum of its top 2); top-k; normalised when norm_topk_prob; times "
                     "routed_scaling_factor; plus shared experts"),
            notes=("transformers maps mistral4 to no AutoModelForCausalLM: verify --forward cannot load "
                   "it; load with Mistral4ForCausalLM.",),
        ),
    ),
    Layout(
        name="glm_moe_dsa",
        model_types=("glm_moe_dsa",),
        names=_DEEPSEEK_NAMES,
        counts=_DEEPSEEK_COUNTS,
        moe=MoeLayers(
            moe_rule="mlp_layer_types",
            default_dense=3,  # first_k_dense_replace's default
        ),
        depth=DepthRules(
            depth_keys=(_COUNT, _MOE_TYPES, _FIRST_K_INFO, _LAYER_TYPES,
                        DepthKey("indexer_types", "per_layer_reuse", reuses="shared")),
        ),
        width=WidthRules(width_rules=_group_rules()),
        doc=Doc(
            routing=_SIGMOID_GROUPS + "; plus shared experts",
            notes=("MTP layers (model.layers.{L}...) are widened and renumbered as for deepseek_v3.",
                   "indexer_types 'shared' layers reuse the previous full layer's top-k: a depth map under which "
                   "a copied shared layer would reuse a different full layer than its original did is refused",),
        ),
    ),
    Layout(
        name="deepseek_v4",
        model_types=("deepseek_v4",),
        names=Names(
            shared_prefix="ffn.shared_experts.",
            experts_prefix="ffn.experts.",
            router_weights=("ffn.gate.weight",),
            router_biases=("ffn.gate.bias",),  # the correction bias (e_score_correction_bias in memory)
            buffers=("ffn.gate.bias", "ffn.gate.tid2eid"),
        ),
        counts=Counts(
            experts_keys=("n_routed_experts", "num_local_experts"),
            top_k_keys=("num_experts_per_tok",),
            shared_experts_keys=("n_shared_experts",),
        ),
        axes=ExpertAxis(
            # hash layers pick experts from a token -> expert table [vocab, top-k]
            expert_tables=("ffn.gate.tid2eid",),
        ),
        depth=DepthRules(depth_keys=(_COUNT, _LAYER_TYPES, DepthKey("mlp_layer_types", "per_layer"))),
        doc=Doc(
            routing=("scoring_func (sqrtsoftplus) of the logits, elementwise; top-k of score + correction bias, or "
                     "tid2eid[token] in hash_moe layers; weights normalised over the k, times routed_scaling_factor; "
                     "plus a shared expert"),
            notes=("hash_moe layers' token -> expert table tid2eid [vocab, k] grows to [vocab, 2k] = "
                   "[tid2eid, tid2eid + E]: each token picks both copies of its experts, each at half the weight",
                   "Hub names (layers.N.ffn..., embed.weight) and save_pretrained names (model.layers.N...) both "
                   "work; MTP tensors (mtp.*) are copied unchanged (transformers ignores them on load)"),
        ),
    ),
)

# what each family's decoder layer writes into the residual stream (see `Residual`)
RESIDUAL: dict[str, Residual] = {
    "deepseek_v3": _DEEPSEEK_WRITERS,
    "deepseek_v2": _DEEPSEEK_WRITERS,
    "glm4_moe": _DEEPSEEK_WRITERS,
    "kimi_linear": Residual((_ATTN, "block_sparse_moe.down_proj", "block_sparse_moe.experts.*.w2",
                             "block_sparse_moe.shared_experts.down_proj")),  # KDA and MLA layers: both o_proj
    "glm4_moe_lite": _DEEPSEEK_WRITERS,
    "deepseek_v32": _DEEPSEEK_WRITERS,
    "mistral4": _DEEPSEEK_WRITERS,
    "glm_moe_dsa": _DEEPSEEK_WRITERS,
    "deepseek_v4": Residual(refused=(
        "manifold hyper-connections mix the residual streams through a learned doubly stochastic matrix, so a "
        "layer with zeroed outputs still mixes them")),
}
