"""Dense families and their MoE siblings in transformers, as data: what `moegrow upcycle` knows.

A `Sibling` says how a dense checkpoint becomes its MoE sibling's: which config keys change, where
each expert's tensors come from in the dense MLP (as save_pretrained names them), which tensors are
new (the router, and any part the sibling has that the dense model lacks) and how they start, and
why the result computes the dense model's function. Where an MoE family stores and routes experts
comes from its `layouts.Layout`; nothing here is read by any other module than `upcycle.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# the dense MLP of every sibling below, as save_pretrained names it (relative to model.layers.N.)
_GATE, _UP, _DOWN = "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"
_SWIGLU_EXPERT = (("gate_proj.weight", (_GATE,)), ("up_proj.weight", (_UP,)), ("down_proj.weight", (_DOWN,)))
_NORMALISED = ("with a zero router every expert scores the same, the top-k weights are renormalised to sum "
               "to 1, and every expert is the dense MLP: any selection gives the dense output")


@dataclass(frozen=True)
class NewTensor:
    """A tensor the sibling has and the dense model lacks, made from nothing (`init` zeros) or a copy.

    ``shape``: ints or config keys of the dense config; or ``like``: the shape of a dense tensor
    (relative to the layer). ``copy``: dense tensors (relative to the layer) copied, concatenated along
    axis 0, instead of drawn.
    """

    rel: str
    init: str = "zeros"
    shape: tuple[int | str, ...] = ()
    like: str = ""
    copy: tuple[str, ...] = ()
    why: str = ""


@dataclass(frozen=True)
class Sibling:
    dense: str                  # the dense model_type
    moe: str                    # the MoE model_type (a moegrow.layouts family)
    architecture: str           # config.json `architectures` of the MoE model
    # per-expert tensor (after `{experts_prefix}{e}.`), or a fused one (a `fused_experts` name, relative to
    # the layer, expert axis first), from the dense MLP tensors concatenated along axis 0 (gate then up)
    experts: tuple[tuple[str, tuple[str, ...]], ...]
    experts_key: str
    top_k_key: str
    why_exact: str              # why a zero router and identical experts compute the dense function
    mlp_prefix: str = "mlp."    # every dense layer tensor under it must be mapped (else it would be lost)
    set_keys: tuple[tuple[str, Any], ...] = ()        # fixed values the sibling's routing needs
    copy_keys: tuple[tuple[str, str], ...] = ()       # (MoE key, dense key): the value carried over
    drop_keys: tuple[str, ...] = ()                   # dense-only keys the MoE config has no use for
    # the dense config class's defaults where the MoE class's differ: written when the dense config lacks
    # the key (and every alias listed); a value "@key" copies the dense config's `key`
    defaults: tuple[tuple[str, Any, tuple[str, ...]], ...] = ()
    refuse: tuple[tuple[str, str], ...] = ()          # (dense key, why): refused while the key is truthy
    extra: tuple[NewTensor, ...] = ()                 # per-layer tensors besides experts and router
    notes: tuple[str, ...] = ()
    # the sibling's top-k weights always sum to 1 (renormalised, or a softmax over the k): then identical
    # experts give the dense output whatever the router picks, so --router-init normal keeps the function too
    weights_sum_to_one: bool = True


_LLAMA_DEFAULTS: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("rms_norm_eps", 1e-6, ()),
    ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"}, ("rope_theta", "rope_scaling")),
    ("num_key_value_heads", "@num_attention_heads", ()),
    ("max_position_embeddings", 2048, ()),
)

SIBLINGS: tuple[Sibling, ...] = (
    Sibling(
        dense="llama", moe="mixtral", architecture="MixtralForCausalLM",
        experts=(("w1.weight", (_GATE,)), ("w3.weight", (_UP,)), ("w2.weight", (_DOWN,))),
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        why_exact="mixtral always renormalises the top-k softmax weights: " + _NORMALISED,
        drop_keys=("pretraining_tp", "attention_bias", "mlp_bias"),
        defaults=(*_LLAMA_DEFAULTS, ("sliding_window", None, ())),
        refuse=(("attention_bias", "mixtral's attention has no biases"),
                ("mlp_bias", "mixtral's experts have no biases")),
    ),
    Sibling(
        dense="mistral", moe="mixtral", architecture="MixtralForCausalLM",
        experts=(("w1.weight", (_GATE,)), ("w3.weight", (_UP,)), ("w2.weight", (_DOWN,))),
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        why_exact="mixtral always renormalises the top-k softmax weights: " + _NORMALISED,
        defaults=(("rms_norm_eps", 1e-6, ()), ("sliding_window", 4096, ()),
                  ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"}, ("rope_theta", "rope_scaling"))),
    ),
    Sibling(
        dense="qwen2", moe="qwen2_moe", architecture="Qwen2MoeForCausalLM",
        experts=_SWIGLU_EXPERT, experts_key="num_experts", top_k_key="num_experts_per_tok",
        why_exact=("norm_topk_prob is set true: " + _NORMALISED + "; the shared expert starts as the dense MLP "
                   "with a zero down projection, so it adds exactly 0 until training moves it"),
        set_keys=(("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", []),
                  ("qkv_bias", True)),
        copy_keys=(("moe_intermediate_size", "intermediate_size"),
                   ("shared_expert_intermediate_size", "intermediate_size")),
        extra=(NewTensor("mlp.shared_expert.gate_proj.weight", "copy", copy=(_GATE,)),
               NewTensor("mlp.shared_expert.up_proj.weight", "copy", copy=(_UP,)),
               NewTensor("mlp.shared_expert.down_proj.weight", "zeros", like=_DOWN,
                         why="the shared expert adds 0 (sigmoid gate times a zero projection)"),
               NewTensor("mlp.shared_expert_gate.weight", "zeros", shape=(1, "hidden_size"))),
        notes=("qwen2_moe always has a shared expert; it starts as the dense MLP with its down projection "
               "zeroed (exact), so the dense function is carried by the routed experts",),
    ),
    Sibling(
        dense="qwen3", moe="qwen3_moe", architecture="Qwen3MoeForCausalLM",
        experts=_SWIGLU_EXPERT, experts_key="num_experts", top_k_key="num_experts_per_tok",
        why_exact="norm_topk_prob is set true: " + _NORMALISED,
        set_keys=(("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", [])),
        copy_keys=(("moe_intermediate_size", "intermediate_size"),),
        drop_keys=("layer_types", "max_window_layers"),
        refuse=(("use_sliding_window", "qwen3_moe applies one sliding window to every layer, where qwen3 "
                 "chooses per layer (layer_types, max_window_layers)"),),
    ),
    Sibling(
        dense="olmo2", moe="flex_olmo", architecture="FlexOlmoForCausalLM",
        experts=_SWIGLU_EXPERT, experts_key="num_experts", top_k_key="num_experts_per_tok",
        why_exact=("norm_topk_prob is set true: " + _NORMALISED + "; flex_olmo normalises sublayer outputs "
                   "as olmo2 does"),
        set_keys=(("norm_topk_prob", True),),
        defaults=(("rms_norm_eps", 1e-5, ()),
                  ("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"}, ("rope_theta", "rope_scaling")),
                  ("max_position_embeddings", 2048, ()), ("vocab_size", 50304, ()), ("pad_token_id", 1, ()),
                  ("eos_token_id", 50279, ())),
        notes=("olmoe is not a sibling of olmo2: olmoe normalises sublayer inputs where olmo2 normalises "
               "their outputs, so no mapping keeps the function",),
    ),
    Sibling(
        dense="granite", moe="granitemoe", architecture="GraniteMoeForCausalLM",
        experts=(("block_sparse_moe.input_linear.weight", (_GATE, _UP)),
                 ("block_sparse_moe.output_linear.weight", (_DOWN,))),
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        why_exact=("granitemoe takes the softmax over the top-k router logits, which always sums to 1; with a "
                   "zero router and identical experts any selection gives the dense output"),
        drop_keys=("mlp_bias",),
        refuse=(("mlp_bias", "granitemoe's experts have no biases"),),
        notes=("granitemoe fuses each expert's gate and up projections as input_linear [E, 2F, H] (gate "
               "first) and its down projections as output_linear [E, H, F]",),
    ),
    Sibling(
        dense="granite", moe="granitemoeshared", architecture="GraniteMoeSharedForCausalLM",
        experts=(("block_sparse_moe.input_linear.weight", (_GATE, _UP)),
                 ("block_sparse_moe.output_linear.weight", (_DOWN,))),
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        why_exact=("granitemoeshared takes the softmax over the top-k router logits, which always sums to 1; "
                   "with a zero router and identical experts any selection gives the dense output; the shared "
                   "MLP starts as the dense MLP with a zero output projection, so it adds exactly 0"),
        copy_keys=(("shared_intermediate_size", "intermediate_size"),),
        drop_keys=("mlp_bias",),
        refuse=(("mlp_bias", "granitemoeshared's experts have no biases"),),
        extra=(NewTensor("shared_mlp.input_linear.weight", "copy", copy=(_GATE, _UP)),
               NewTensor("shared_mlp.output_linear.weight", "zeros", like=_DOWN)),
    ),
    Sibling(
        dense="hunyuan_v1_dense", moe="hunyuan_v1_moe", architecture="HunYuanMoEV1ForCausalLM",
        experts=_SWIGLU_EXPERT, experts_key="num_experts", top_k_key="moe_topk",
        why_exact=("hunyuan_v1_moe always renormalises the top-k softmax weights: " + _NORMALISED + "; the "
                   "shared MLP (always added, ungated) starts as the dense MLP with a zero down projection, so "
                   "it adds exactly 0"),
        extra=(NewTensor("mlp.shared_mlp.gate_proj.weight", "copy", copy=(_GATE,)),
               NewTensor("mlp.shared_mlp.up_proj.weight", "copy", copy=(_UP,)),
               NewTensor("mlp.shared_mlp.down_proj.weight", "zeros", like=_DOWN)),
        notes=("hunyuan_v1_moe's shared MLP and experts share intermediate_size",),
    ),
)

# dense model_type -> MoE model_type pairs that do not work, and why (named in the refusal)
REFUSED: dict[tuple[str, str], str] = {
    ("olmo2", "olmoe"): "olmoe normalises sublayer inputs where olmo2 normalises their outputs, so no "
                        "mapping keeps the dense function; upcycle olmo2 into flex_olmo instead",
}

BY_DENSE: dict[str, tuple[Sibling, ...]] = {}
for _s in SIBLINGS:
    BY_DENSE[_s.dense] = (*BY_DENSE.get(_s.dense, ()), _s)
