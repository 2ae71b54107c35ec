"""More MoE families: tiny random checkpoints, width growth exact at noise 0, depth growth loads.

Each family gets a tiny random checkpoint with non-trivial routers (correction biases non-zero),
a dense layer and shared experts where the family has them, and group-limited routing where it
has it. Run with ``--junitxml`` to collect the measured logit differences (record_property).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import transformers

from moegrow.layouts import layout_for

from .conftest import COMMON, TOKENS, built_once, logits, randomise, run, save

MLA = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, head_dim=8)
GROUPS = dict(n_group=4, topk_group=2)
QWEN_LINEAR = dict(linear_num_key_heads=2, linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
                   layer_types=["linear_attention", "full_attention", "linear_attention"])
DEEPSEEK_LIKE = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, n_shared_experts=1)

FAMILY_CONFIGS: dict[str, dict] = {
    "flex_olmo": dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    "minimax": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, block_size=4,
                    layer_types=["linear_attention", "full_attention", "full_attention"]),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "mellum": dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                   mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=8,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "hunyuan_v1_moe": dict(num_experts=4, moe_topk=2, head_dim=8),
    "deepseek_v2": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, topk_method="group_limited_greedy",
                        **GROUPS, **MLA),
    "glm4_moe": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, head_dim=8, norm_topk_prob=True, **GROUPS),
    "dots1": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, head_dim=8, norm_topk_prob=False, **GROUPS),
    "solar_open": dict(**DEEPSEEK_LIKE, head_dim=8, norm_topk_prob=True, **GROUPS),
    "exaone_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, num_shared_experts=1,
                       first_k_dense_replace=1, head_dim=8, norm_topk_prob=True, **GROUPS),
    "mimo_v2_flash": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                          v_head_dim=8, num_attention_heads=4, num_key_value_heads=1, norm_topk_prob=True,
                          **GROUPS),
    "kimi_linear": dict(num_experts=8, num_experts_per_token=2, moe_intermediate_size=8, num_shared_experts=1,
                        num_expert_group=4, topk_group=2, moe_renormalize=True, linear_num_heads=2,
                        linear_head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
                        **MLA),
    "glm4_moe_lite": dict(**DEEPSEEK_LIKE, norm_topk_prob=True, **GROUPS, **MLA),
    "deepseek_v32": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, norm_topk_prob=True, index_n_heads=2,
                         index_head_dim=16, **GROUPS, **MLA),
    # experts fused on disk, expert axis first
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=12),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "mistral4": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, norm_topk_prob=False, **GROUPS,
                     **{**MLA, "head_dim": 16}),  # rotary dim = head_dim * partial_rotary_factor 0.5
    "afmoe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, num_shared_experts=1,
                  num_dense_layers=1, head_dim=8, global_attn_every_n_layers=2, sliding_window=8),
    "lfm2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, num_dense_layers=1,
                     layer_types=["conv", "full_attention", "conv"]),
    "hy_v3": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                  mlp_layer_types=["dense", "sparse", "sparse"]),
    "laguna": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                   shared_expert_intermediate_size=12, moe_routed_scaling_factor=1.5,
                   mlp_layer_types=["dense", "sparse", "sparse"], num_attention_heads_per_layer=[2, 4, 2],
                   layer_types=["full_attention", "sliding_attention", "full_attention"], sliding_window=8),
    "aria_text": dict(moe_num_experts=4, moe_topk=2, moe_intermediate_size=8, moe_num_shared_experts=1,
                      head_dim=8),
    "granitemoe_swa": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=12,
                           sliding_window=8, layer_rope_theta=[10000.0, 500.0, 10000.0]),
    "granitemoehybrid": dict(num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=12,
                             mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1,
                             layer_types=["mamba", "attention", "mamba"]),
    "minimax_m3_vl_text": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, shared_intermediate_size=12,
                               dense_intermediate_size=20, mlp_layer_types=["dense", "sparse", "sparse"]),
    "axk1": dict(**DEEPSEEK_LIKE, norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"], **GROUPS, **MLA),
    "axk2": dict(**DEEPSEEK_LIKE, norm_topk_prob=True, mlp_layer_types=["dense", "sparse", "sparse"], index_n_heads=2,
                 index_head_dim=16, **GROUPS, **MLA),
    "beam": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8, norm_topk_prob=False,
                 mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=8, **GROUPS),
    "glm_moe_dsa": dict(**DEEPSEEK_LIKE, first_k_dense_replace=1, norm_topk_prob=True, index_n_heads=2,
                        index_head_dim=16, indexer_types=["full", "shared", "full"], **GROUPS, **MLA),
    "bailing_hybrid": dict(num_experts=8, num_experts_per_token=2, moe_intermediate_size=8, num_shared_experts=1,
                           num_expert_group=4, topk_group=2, first_k_dense_replace=1, layer_group_size=2, **MLA),
    # linear-attention (gated delta net) + full-attention layers, softmax routing, gated shared expert
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                       shared_expert_intermediate_size=12, decoder_sparse_step=1, mlp_only_layers=[0], **QWEN_LINEAR),
    "qwen3_5_moe_text": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                             shared_expert_intermediate_size=12, head_dim=8, **QWEN_LINEAR),
    "qwen4_exp_text": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                           shared_expert_intermediate_size=12, hc_count=2, hc_lowrank=4, indexer_n_heads=2,
                           indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=2,
                           ple_layer_ids=[1, 3], ple_embed_dim=16, heads_per_ngram=2, ngram_vocab_size_base=256,
                           split_ngram_parts=4,
                           **{**QWEN_LINEAR, "layer_types": ["linear_attention", "indexed_attention",
                                                             "linear_attention"]}),
    # layer count = len(layers_block_type); prefix backbone.layers.; MoE block under mixer.; relu2 experts
    "nemotron_h": dict(**DEEPSEEK_LIKE, moe_shared_expert_intermediate_size=8, head_dim=8, norm_topk_prob=True,
                       layers_block_type=["mamba", "moe", "attention"], mamba_num_heads=4, mamba_head_dim=8,
                       ssm_state_size=8, n_groups=2, **GROUPS),
    # sigmoid weights: exact unnormalised only with every expert's down projection halved (TensorRule)
    "flint": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                  shared_expert_intermediate_size=12, mlp_only_layers=[0], sliding_window=8),
    "kolibri1": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=8,
                     shared_expert_intermediate_size=12, sliding_window=8),  # raw sigmoid: the default
    "cohere2_moe": dict(num_experts=4, num_experts_per_tok=2, head_dim=8, num_shared_experts=1, sliding_window=8,
                        logit_scale=1.0,  # the default 0.0625 shrinks the logits the test compares
                        mlp_layer_types=["dense", "sparse", "sparse"]),
    # correction bias [1,E] added to softmax probabilities: halved; MoE layers a start/end/interval range
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=8, moe_num_shared_experts=1,
                         moe_layer_start_index=1, head_dim=8),
    # fused experts, group routing, hyper-connections; 'shared' indexer layers reuse the last 'full' one's top-k
    "hy_v4": dict(**DEEPSEEK_LIKE, norm_topk_prob=True, **GROUPS, **MLA, index_n_heads=2, index_head_dim=16,
                  index_topk=8, hc_mult=2, mlp_layer_types=["dense", "sparse", "sparse"],
                  indexer_types=["full", "shared", "full"]),
    # router at layer level (router.proj, per_expert_scale [E]) beside a dense MLP; per_layer_config by layer index
    "gemma4_text": dict(num_experts=4, top_k_experts=2, moe_intermediate_size=8, enable_moe_block=True, head_dim=8,
                        global_head_dim=16, hidden_size_per_layer_input=0, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "full_attention"]),
    # MLA with sliding-attention layers of other shapes: per_layer_config {"1": {...}} keyed by layer index
    "dots3_note_text": dict(**DEEPSEEK_LIKE, norm_topk_prob=True, **GROUPS, **{**MLA, "head_dim": 16},
                            shared_experts_intermediate_size=8, index_n_heads=2, index_head_dim=16, index_topk=8,
                            mlp_layer_types=["dense", "sparse", "sparse"], sliding_window=8,
                            layer_types=["indexed_attention", "sliding_attention", "indexed_attention"],
                            swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_q_lora_rank=8, swa_kv_lora_rank=8,
                            swa_head_dim=16, swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    # MoE / attention layers every Nth from an offset: stacking keeps them, interposition cannot
    "jamba": dict(num_experts=4, num_experts_per_tok=2, expert_layer_period=3, expert_layer_offset=1,
                  attn_layer_period=3, attn_layer_offset=2, mamba_d_state=8, mamba_dt_rank=4,
                  use_mamba_kernels=False),
    # zero (identity) experts after the routed ones: router rows [E+Z] grow as [E, E copies, Z, Z copies]
    "longcat_flash": dict(num_hidden_layers=6,  # = 2 x num_layers (a property)
                          n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=8,
                          ffn_hidden_size=16, **MLA),
    # router rows [E+S]: routed then router-gated shared experts, normalised together; the shared grow too
    "inkling_text": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=8,
                         head_dim=8, swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_head_dim=8,
                         sliding_window_size=8, rel_extent=16, d_rel=4, local_layer_ids=[0, 2],
                         mlp_layer_types=["dense", "sparse", "sparse"]),
    # hash layers: token -> expert table tid2eid [vocab, k] grows to [vocab, 2k] = [t, t + E]
    "deepseek_v4": dict(n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=8,
                        num_key_value_heads=1, head_dim=16, q_lora_rank=8, o_groups=2, o_lora_rank=8,
                        index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2, sliding_window=8,
                        mlp_layer_types=["hash_moe", "moe", "moe"],
                        layer_types=["sliding_attention", "compressed_sparse_attention",
                                     "heavily_compressed_attention"]),
    # no width growth can be exact: refused without --allow-inexact (phimoe) or always (zaya, doge)
    "phimoe": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8),
    "zaya": dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=8, head_dim=8, router_hidden_size=16),
    "doge": dict(num_experts=4, num_experts_per_tok=2, is_moe=True),
    # MoE MLP + attention experts (MoA) sharing the expert count and top-k; heads = kv heads x top-k
    "jetmoe": dict(num_local_experts=4, num_experts_per_tok=2, kv_channels=8, num_attention_heads=4),
    # prefix model.llm.layers.; fused w13/w2; correction bias mlp.gate.bias; attention residuals over blocks of 2
    "inkling2_text": dict(n_routed_experts=4, num_experts_per_tok=2, intermediate_size=8, head_dim=8,
                          swa_num_attention_heads=2, swa_num_key_value_heads=2, swa_head_dim=8, unpadded_vocab_size=64,
                          sliding_window_size=8, d_rel=4, rel_extent=16, n_layers_per_attn_res_block=2,
                          layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"]),
}
INEXACT = {"phimoe": "sparsemixer", "zaya": "skip class", "doge": "product-key"}
# families that AutoModelForCausalLM does not map (so `verify --forward` cannot load them either)
MODEL_CLASSES = {"mistral4": "Mistral4ForCausalLM"}

# stacking (0,1,2,0,1,2) puts a copy of dense layer 0 after MoE layers: a dense-prefix count cannot say so
STACK_REFUSED = {"deepseek_v2": "first_k_dense_replace", "glm4_moe": "first_k_dense_replace",
                 "dots1": "first_k_dense_replace", "mistral4": "first_k_dense_replace",
                 "afmoe": "num_dense_layers", "lfm2_moe": "num_dense_layers", "qwen4_exp_text": "ple_layer_ids",
                 "zaya": "router_states_scale", "ernie4_5_moe": "moe_layer_start_index"}
# a PLE layer's tensor shapes follow its rank in ple_layer_ids: no 2x map keeps every copy's rank;
# zaya's layer 0 has no router_states_scale (every later layer has one): no 2x map keeps layer 0 alone at 0
INTERPOSE_REFUSED = {"qwen4_exp_text": "ple_layer_ids", "zaya": "router_states_scale",
                     "jamba": "expert_layer_period"}
# attention-residual queries: layer-indexed tensors outside the layers (layer 0 has none), refused for every map
DEPTH_REFUSED = {"inkling2_text": "n_layers_per_attn_res_block"}
STACK_REFUSED.update(DEPTH_REFUSED)
INTERPOSE_REFUSED.update(DEPTH_REFUSED)
EXPERT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k_experts")
GROUP_KEYS = ("n_group", "num_expert_group", "topk_group")


def build(model_type: str, seed: int = 0, **overrides):
    """A tiny random model with non-trivial routers and correction biases."""
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **FAMILY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    if model_type in MODEL_CLASSES:
        model = getattr(transformers, MODEL_CLASSES[model_type])(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return randomise(model)


def family_logits(folder, family: str) -> torch.Tensor:
    """conftest.logits (clean load, then a forward pass), through the family's own class if needed."""
    if family not in MODEL_CLASSES:
        return logits(folder)
    model, info = getattr(transformers, MODEL_CLASSES[family]).from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[kind], (kind, info[kind])
    with torch.no_grad():
        return model.eval()(input_ids=TOKENS).logits


@pytest.fixture(scope="session")
def family_source(tmp_path_factory):
    """A saved float32 checkpoint per family, built on first use in each worker."""
    return built_once(tmp_path_factory, build)


def first(config: dict, keys: tuple[str, ...]) -> str:
    return next(k for k in keys if config.get(k) is not None)


def read_config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


@pytest.mark.parametrize("family", sorted(set(FAMILY_CONFIGS) - set(INEXACT)))
def test_width_2x_exact(family, family_source, tmp_path, record_property):
    src = family_source(family)
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    before = family_logits(src, family)
    assert before.abs().max() > 0
    diff = (before - family_logits(out, family)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    old, new = read_config(src), read_config(out)
    ekey, kkey = first(old, EXPERT_KEYS), first(old, TOP_K_KEYS)
    assert new[ekey] == 2 * old[ekey] and new[kkey] == 2 * old[kkey]  # written back under the source's key
    for key in GROUP_KEYS:
        if old.get(key) is not None:
            assert new[key] == 2 * old[key], key
    forward = () if family in MODEL_CLASSES else ("--forward", "--atol", "1e-5")
    code, _, err = run("verify", src, out, *forward)
    assert code == 0, err
    # and fails once one expert copy is changed
    from safetensors.torch import load_file, save_file

    mapping = json.loads((out / "moegrow.json").read_text())["tensors"]
    copy = next(n for n, parts in sorted(mapping.items()) if len(parts) > 1 or n != parts[0][0])
    tensors = load_file(out / "model.safetensors")
    tensors[copy].view(-1)[0] += 1
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and copy in stdout + err, (copy, err)


@pytest.mark.parametrize("family, overrides, key", [
    ("glm4_moe", {"norm_topk_prob": False}, "routed_scaling_factor"),
    ("kimi_linear", {"moe_renormalize": False}, "routed_scaling_factor"),  # the alias decides
    ("lfm2_moe", {"norm_topk_prob": False}, "routed_scaling_factor"),
    ("bailing_hybrid", {"moe_renormalize": False}, "routed_scaling_factor"),
    ("deepseek_v2", {"topk_method": "greedy", "n_group": None, "topk_group": None}, None),
])
def test_width_variants(family, overrides, key, tmp_path, record_property):
    src = save(build(family, routed_scaling_factor=2.0, **overrides), tmp_path / "src")
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--quiet")
    assert code == 0, err
    if key:
        assert read_config(tmp_path / "out")[key] == pytest.approx(1.0)
    diff = (logits(src) - logits(tmp_path / "out")).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff


@pytest.mark.parametrize("method", ["interpose", "stack"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_depth_2x(family, method, family_source, tmp_path):
    src = family_source(family)
    out = tmp_path / "out"
    code, stdout, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--json", "--quiet")
    refused = (STACK_REFUSED if method == "stack" else INTERPOSE_REFUSED).get(family)
    if refused:
        assert code == 2 and refused in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
        return
    assert code == 0, err
    layer_map = [0, 0, 1, 1, 2, 2] if method == "interpose" else [0, 1, 2, 0, 1, 2]
    assert json.loads(stdout)["layer_map"] == layer_map
    old, new = read_config(src), read_config(out)
    assert layout_for(new).num_layers(new) == 6
    for key in ("layer_types", "mlp_layer_types", "layers_block_type"):
        if old.get(key) is not None:
            assert new[key] == [old[key][m] for m in layer_map], key
    family_logits(out, family)  # loads with no missing / unexpected / mismatched keys, and runs
    code, _, err = run("verify", src, out)
    assert code == 0, err


def test_mlp_layer_types_written_out_when_left_to_a_default(tmp_path):
    """A Hub-style kimi_linear config: no layer_types / mlp_layer_types, layer kinds as 1-based
    index lists in linear_attn_config, the dense prefix as first_k_dense_replace."""
    src = save(build("kimi_linear"), tmp_path / "src")
    config = read_config(src)
    del config["layer_types"], config["mlp_layer_types"]
    config.update(first_k_dense_replace=1, linear_attn_config={
        "full_attn_layers": [2], "kda_layers": [1, 3], "head_dim": 8, "num_heads": 2, "short_conv_kernel_size": 4})
    (src / "config.json").write_text(json.dumps(config))
    loaded = transformers.AutoConfig.from_pretrained(src)
    assert loaded.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    assert loaded.mlp_layer_types == ["dense", "sparse", "sparse"]
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", "stack", "--quiet")
    assert code == 0, err
    new = read_config(out)
    assert new["mlp_layer_types"] == ["dense", "sparse", "sparse"] * 2
    assert new["first_k_dense_replace"] == 1
    assert new["linear_attn_config"]["full_attn_layers"] == [2, 5]
    assert new["linear_attn_config"]["kda_layers"] == [1, 3, 4, 6]
    assert transformers.AutoConfig.from_pretrained(out).layer_types == [
        "linear_attention", "full_attention", "linear_attention"] * 2
    logits(out)
    assert run("verify", src, out)[0] == 0


@pytest.mark.parametrize("method", ["interpose", "stack"])
def test_depth_qwen4_exp_without_ple(method, tmp_path):
    src = save(build("qwen4_exp_text", ple_layer_ids=[]), tmp_path / "src")
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--method", method, "--quiet")
    assert code == 0, err
    logits(tmp_path / "out")
    assert run("verify", src, tmp_path / "out")[0] == 0


def test_nemotron_h_hub_style_pattern(tmp_path):
    """A Hub-style nemotron_h config: the layer kinds as hybrid_override_pattern, plus num_hidden_layers."""
    src = save(build("nemotron_h", layers_block_type=["moe", "mamba", "attention"]), tmp_path / "src")
    config = read_config(src)
    del config["layers_block_type"]
    config.update(hybrid_override_pattern="EM*", num_hidden_layers=3)
    (src / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", "interpose", "--quiet")
    assert code == 0, err
    new = read_config(out)
    assert new["hybrid_override_pattern"] == "EEMM**" and new["num_hidden_layers"] == 6
    logits(out)
    code, _, err = run("grow-width", out, tmp_path / "wide", "--experts", "2x", "--quiet")
    assert code == 0, err
    assert (logits(out) - logits(tmp_path / "wide")).abs().max().item() <= 1e-5


def test_per_layer_top_k_is_refused(tmp_path):
    src = save(build("hunyuan_v1_moe", moe_topk=[2, 2, 2]), tmp_path / "src")
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "moe_topk" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


LLAMA4 = dict(vocab_size=64, hidden_size=16, intermediate_size=8, intermediate_size_mlp=24, num_hidden_layers=3,
              num_attention_heads=2, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)


def _llama4(tmp_path):
    config = transformers.AutoConfig.for_model("llama4_text", **LLAMA4)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.5 if "router" in name else 0.2)
    return save(model.eval(), tmp_path / "src")


def test_llama4_text_width_halves_down_projections(tmp_path):
    """Expert-input scaling: exact only with every down projection halved, originals included."""
    from safetensors.torch import load_file

    src = _llama4(tmp_path)
    code, out, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--json")
    assert code == 0, err
    assert "not byte-identical" in err and "feed_forward.experts.down_proj" in err
    diff = (logits(src) - logits(tmp_path / "out")).abs().max().item()
    assert diff <= 1e-5, diff
    before, after = load_file(src / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    down = "model.layers.1.feed_forward.experts.down_proj"
    assert torch.equal(after[down], torch.cat([before[down] / 2] * 2))
    gate_up = "model.layers.1.feed_forward.experts.gate_up_proj"
    assert torch.equal(after[gate_up], torch.cat([before[gate_up]] * 2))
    record = json.loads((tmp_path / "out" / "moegrow.json").read_text())
    assert record["tensors"][down] == [[down, 0.0, 0.5], [down, 0.0, 0.5]]
    assert run("verify", src, tmp_path / "out", "--forward", "--atol", "1e-5")[0] == 0
    # without the halving (keep top-k: no exactness claimed) the originals stay byte-identical
    assert run("grow-width", src, tmp_path / "keep", "--experts", "2x", "--top-k", "keep", "--quiet")[0] == 0
    assert torch.equal(load_file(tmp_path / "keep" / "model.safetensors")[down][:4], before[down])


@pytest.mark.parametrize("method", ["interpose", "stack"])
def test_llama4_text_depth(method, tmp_path):
    src = _llama4(tmp_path)
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--method", method, "--quiet")
    assert code == 0, err
    config = read_config(tmp_path / "out")
    assert config["moe_layers"] == ([2, 3] if method == "interpose" else [1, 4])
    assert len(config["no_rope_layers"]) == 6
    logits(tmp_path / "out")
    assert run("verify", src, tmp_path / "out")[0] == 0


@pytest.mark.parametrize("family, overrides, scaled", [
    ("flint", {"norm_topk_prob": True}, False),
    ("flint", {"norm_topk_prob": False}, True),
    ("kolibri1", {"norm_topk_prob": True}, False),
    ("kolibri1", {"norm_topk_prob": False}, True),
    ("cohere2_moe", {"expert_selection_fn": "softmax", "norm_topk_prob": False}, False),
    ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": True}, False),
    ("cohere2_moe", {"expert_selection_fn": "sigmoid", "norm_topk_prob": False}, True),
])
def test_raw_sigmoid_halves_down_projections(family, overrides, scaled, tmp_path, record_property):
    """Unnormalised sigmoid weights: every expert's down projection is halved (originals included);
    otherwise the originals stay byte-identical."""
    from safetensors.torch import load_file

    src = save(build(family, **overrides), tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x")
    assert code == 0, err
    assert ("not byte-identical" in err) == scaled, err
    diff = (logits(src) - logits(out)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for name, t in before.items():
        if ".experts." in name:
            copy = re.sub(r"\.experts\.(\d+)\.", lambda m: f".experts.{int(m[1]) + 4}.", name)
            want = t / 2 if scaled and "down_proj" in name else t
            assert torch.equal(after[name], want) and torch.equal(after[copy], want), name
    assert run("verify", src, out, "--forward", "--atol", "1e-5")[0] == 0


@pytest.mark.parametrize("command", ["grow-width", "grow"])
def test_inexact_family_needs_allow_inexact(command, family_source, tmp_path, record_property):
    """phimoe: no duplication preserves its routing; refused unless --allow-inexact, then grown with a warning."""
    src = family_source("phimoe")
    depth = ("--layers", "2x") if command == "grow" else ()
    code, stdout, err = run(command, src, tmp_path / "refused", "--experts", "2x", *depth)
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1, err
    assert "--allow-inexact" in err and "sparsemixer" in err, err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "out"
    code, _, err = run(command, src, out, "--experts", "2x", *depth, "--allow-inexact")
    assert code == 0, err
    assert "not function-preserving" in err and "sparsemixer" in err, err
    diff = (logits(src) - logits(out)).abs().max().item()  # loads clean; differs
    record_property("max_logit_diff", diff)
    record = json.loads((out / "moegrow.json").read_text())
    assert record["growth"]["allow_inexact"] is True and record["function_preserving"] is False
    code, _, err = run("verify", src, out, *(("--forward",) if command == "grow-width" else ()))
    assert code == 0, err


@pytest.mark.parametrize("family", ["zaya", "doge"])
@pytest.mark.parametrize("flag", [(), ("--allow-inexact",)])
def test_width_refused_where_duplication_cannot_be_expressed(family, flag, family_source, tmp_path):
    src = family_source(family)
    code, stdout, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", *flag)
    assert code == 2 and not stdout and len(err.strip().splitlines()) == 1, err
    assert INEXACT[family] in err and "not supported" in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", sorted(INEXACT))
def test_inspect_gives_the_reason(family, family_source):
    code, stdout, err = run("inspect", family_source(family), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["width_exact"] is False and INEXACT[family] in (info["width_inexact_reason"] or "")
    assert (info["width_refused"] is not None) == (family != "phimoe")
    code, stdout, err = run("inspect", family_source(family))
    assert code == 0 and "function-preserving: no (" in stdout, err


def test_zaya_depth_map_keeping_layer_0_in_place(tmp_path, family_source):
    src = family_source("zaya")
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layer-map", "0,1,1,2,2", "--quiet")
    assert code == 0, err
    logits(out)
    assert run("verify", src, out)[0] == 0


def test_ernie_correction_bias_halved_along_expert_axis_1(family_source, tmp_path):
    """ernie4_5_moe's bias is [1, E]: the plan says [1, 2E] (expert axis 1), values halved."""
    from safetensors.torch import load_file

    src = family_source("ernie4_5_moe")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    bias = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    assert before[bias].shape == (1, 4) and after[bias].shape == (1, 8)
    assert torch.equal(after[bias], torch.cat([before[bias] / 2] * 2, dim=1))
    gate = "model.layers.1.mlp.gate.weight"
    assert torch.equal(after[gate], torch.cat([before[gate]] * 2))
    # without the halving the grown model selects differently
    config = read_config(out)
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"]) == (1, 2)


def _grown(src, out, *flags: str) -> tuple[dict, dict]:
    """Width 2x of src into out; (source tensors, grown tensors)."""
    from safetensors.torch import load_file

    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet", *flags)
    assert code == 0, err
    return load_file(src / "model.safetensors"), load_file(out / "model.safetensors")


def _verify_passes_then_catches(src, out, after: dict, name: str, edit) -> None:
    """verify passes on out, then fails naming `name` once `edit(after[name])` is saved over it."""
    from safetensors.torch import save_file

    code, _, err = run("verify", src, out)
    assert code == 0, err
    edit(after[name])
    save_file(after, out / "model.safetensors", metadata={"format": "pt"})
    code, stdout, err = run("verify", src, out)
    assert code == 1 and name in stdout + err


def test_longcat_router_rows_grow_segment_by_segment(family_source, tmp_path):
    """Routed rows then zero-expert rows, each followed by its copies; noised copies verify, tampering fails."""
    src = family_source("longcat_flash")
    out = tmp_path / "out"
    before, after = _grown(src, out, "--noise", "0.01", "--router-noise", "0.01")
    gate, bias = "model.layers.1.mlp.router.classifier.weight", "model.layers.1.mlp.router.e_score_correction_bias"
    assert before[gate].shape[0] == 6 and after[gate].shape[0] == 12
    assert torch.equal(after[gate][:4], before[gate][:4]) and torch.equal(after[gate][8:10], before[gate][4:6])
    for copy, orig in ((slice(4, 8), slice(0, 4)), (slice(10, 12), slice(4, 6))):
        noise = after[gate][copy] - before[gate][orig]
        assert 0.005 < noise.std() < 0.02
    assert torch.equal(after[bias], torch.cat([before[bias][:4]] * 2 + [before[bias][4:]] * 2) / 2)
    # zero-expert slots 4, 5 carry gate/up weights: they move to 8, 9 (and copies to 10, 11)
    up = "model.layers.1.mlp.experts.{}.up_proj.weight"
    assert torch.equal(after[up.format(8)], before[up.format(4)])
    assert "model.layers.1.mlp.experts.8.down_proj.weight" not in after
    _verify_passes_then_catches(src, out, after, gate, lambda t: t[10, 0].add_(1.0))  # a zero-expert copy's row


def test_inkling_shared_experts_grow_with_the_routed(family_source, tmp_path):
    """inkling_text's router normalises over routed + shared: both double, rows [E, E copies, S, S copies]."""
    src = family_source("inkling_text")
    out = tmp_path / "out"
    before, after = _grown(src, out)
    assert read_config(out)["n_shared_experts"] == 2
    gate = before["model.layers.1.mlp.gate.weight"]  # [4 routed + 1 shared, H]
    assert torch.equal(after["model.layers.1.mlp.gate.weight"], torch.cat([gate[:4], gate[:4], gate[4:], gate[4:]]))
    shared = "model.layers.1.mlp.shared_experts.up_proj"
    assert torch.equal(after[shared], torch.cat([before[shared]] * 2))


def test_deepseek_v4_hash_table_points_at_the_copies(family_source, tmp_path):
    """tid2eid [vocab, k] -> [vocab, 2k] = [t, t + E]; verify rebuilds it and catches a wrong entry."""
    src = family_source("deepseek_v4")
    out = tmp_path / "out"
    before, after = _grown(src, out, "--noise", "0.01")
    table = "model.layers.0.ffn.gate.tid2eid"
    assert after[table].dtype == torch.int64
    assert torch.equal(after[table], torch.cat([before[table], before[table] + 4], dim=1))
    assert "model.layers.1.ffn.gate.tid2eid" not in after  # an ordinary MoE layer
    _verify_passes_then_catches(src, out, after, table, lambda t: t[5, 3].copy_(t[5, 1]))  # the original twice


def test_deepseek_v4_hash_table_follows_top_k(family_source, tmp_path):
    """--top-k keep leaves the table as it is; a top-k the table cannot follow is refused, naming it."""
    src = family_source("deepseek_v4")
    before, after = _grown(src, tmp_path / "keep", "--top-k", "keep")
    table = "model.layers.0.ffn.gate.tid2eid"
    assert torch.equal(after[table], before[table])
    code, _, err = run("grow-width", src, tmp_path / "three", "--experts", "2x", "--top-k", "3")
    assert code == 2 and table in err and "--top-k keep" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "three").exists()


@pytest.mark.parametrize("command", [("grow-width", "--experts", "2x"), ("grow-depth", "--layers", "2x")])
def test_hub_names_without_the_model_prefix(command, family_source, tmp_path):
    """DeepSeek-V4's Hub release names tensors `layers.N...`, `embed.weight` (transformers adds `model.`
    on load): moegrow grows them under the names the source uses."""
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hub"
    shutil.copytree(family_source("deepseek_v4"), src)
    tensors = load_file(src / "model.safetensors")
    hub = {k.removeprefix("model.").replace("embed_tokens.", "embed."): v for k, v in tensors.items()}
    assert "layers.0.ffn.gate.tid2eid" in hub and "embed.weight" in hub
    save_file(hub, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, _, err = run(command[0], src, out, *command[1:], "--quiet")
    assert code == 0, err
    grown = load_file(out / "model.safetensors")
    assert not any(k.startswith("model.") for k in grown)
    if command[0] == "grow-width":
        assert grown["layers.0.ffn.gate.tid2eid"].shape[1] == 2 * hub["layers.0.ffn.gate.tid2eid"].shape[1]
        assert "layers.2.ffn.experts.7.w1.weight" in grown
        code, _, err = run("verify", src, out, "--forward", "--atol", "1e-5")
    else:
        assert "layers.5.ffn.experts.0.w1.weight" in grown
        family_logits(out, "deepseek_v4")  # loads with no missing / unexpected keys
        code, _, err = run("verify", src, out)
    assert code == 0, err


def test_ernie_depth_rewrites_the_moe_range(family_source, tmp_path):
    src = family_source("ernie4_5_moe")
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--quiet")
    assert code == 0, err
    config = read_config(out)
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == (2, 5, 1)
    # layers 0,1 copied from dense layer 0; 3 of 4 layers then 1 dense: every other layer MoE -> interval 2
    code, _, err = run("grow-depth", src, tmp_path / "alt", "--layer-map", "0,1,0,1,0,2", "--quiet")
    assert code == 0, err
    config = read_config(tmp_path / "alt")
    assert (config["moe_layer_start_index"], config["moe_layer_end_index"], config["moe_layer_interval"]) == (1, 5, 2)
    logits(tmp_path / "alt")
    assert run("verify", src, tmp_path / "alt")[0] == 0


def test_expert_axis_past_0_needs_leading_dims_of_1(family_source, ckpt_copy):
    from safetensors.torch import load_file, save_file

    src = ckpt_copy(family_source("ernie4_5_moe"))
    tensors = load_file(src / "model.safetensors")
    bias = "model.layers.1.mlp.moe_statics.e_score_correction_bias"
    tensors[bias] = torch.zeros(2, 4)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run("grow-width", src, src.parent / "out", "--experts", "2x")
    assert code == 2 and bias in err and "expert axis 1" in err and len(err.strip().splitlines()) == 1, err


def _requantise(folder, replace) -> dict:
    """Rewrite a checkpoint's tensors through `replace(name, tensor) -> {name: tensor}`; returns them."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for name, t in load_file(folder / "model.safetensors").items():
        tensors.update(replace(name, t))
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return tensors


def test_gpt_oss_mxfp4_blocks_and_scales_are_duplicated(family_source, ckpt_copy):
    """A Hub-style gpt_oss release: experts as MXFP4 uint8 *_blocks / *_scales (expert axis first)."""
    from safetensors.torch import load_file

    src = ckpt_copy(family_source("gpt_oss"))
    gen = torch.Generator().manual_seed(0)

    def mxfp4(name, t):
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: t}
        e, rows = t.shape[0], t.shape[2]  # stored [E, in, out]; MXFP4 rows are the outputs
        groups = max(1, t.shape[1] // 32)
        return {f"{name}_blocks": torch.randint(0, 256, (e, rows, groups, 16), dtype=torch.uint8, generator=gen),
                f"{name}_scales": torch.randint(118, 130, (e, rows, groups), dtype=torch.uint8, generator=gen)}

    before = _requantise(src, mxfp4)
    config = read_config(src)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (src / "config.json").write_text(json.dumps(config))
    out = src.parent / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    after = load_file(out / "model.safetensors")
    quantised = [n for n in before if n.endswith(("_blocks", "_scales"))]
    assert len(quantised) == 4 * 3
    for name in quantised:
        assert after[name].dtype == torch.uint8 and torch.equal(after[name], torch.cat([before[name]] * 2)), name
    assert read_config(out)["quantization_config"] == config["quantization_config"]
    assert run("verify", src, out)[0] == 0
    # noise: the copies are dequantised, noised and requantised as MXFP4; the originals stay byte copies
    noisy = src.parent / "noisy"
    code, _, err = run("grow-width", src, noisy, "--experts", "2x", "--noise", "0.01", "--quiet")
    assert code == 0, err
    after = load_file(noisy / "model.safetensors")
    for name in quantised:
        e = before[name].shape[0]
        assert torch.equal(after[name][:e], before[name]), name
        assert not torch.equal(after[name][e:], before[name]), name
    assert run("verify", src, noisy)[0] == 0


def test_deepseek_fp8_scales_travel_with_their_experts(checkpoints, ckpt_copy):
    """A DeepSeek-V3 style fp8 checkpoint: float8_e4m3fn expert weights, one weight_scale_inv per weight."""
    from safetensors.torch import load_file

    src = ckpt_copy(checkpoints["deepseek_v3"])
    gen = torch.Generator().manual_seed(0)

    def fp8(name, t):
        if ".mlp.experts." not in name:
            return {name: t}
        blocks = [-(-d // 128) for d in t.shape]
        return {name: t.to(torch.float8_e4m3fn), f"{name}_scale_inv": torch.rand(blocks, generator=gen) + 0.5}

    before = _requantise(src, fp8)
    config = read_config(src)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128]}
    (src / "config.json").write_text(json.dumps(config))
    out = src.parent / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    after = load_file(out / "model.safetensors")
    e_old = config["n_routed_experts"]
    moved = 0
    for name, t in before.items():
        m = re.search(r"\.experts\.(\d+)\.", name)
        if m:
            copy = name.replace(m[0], f".experts.{int(m[1]) + e_old}.")
            for grown in (after[name], after[copy]):
                assert grown.dtype == t.dtype and torch.equal(grown.view(torch.uint8), t.view(torch.uint8)), name
            moved += name.endswith("_scale_inv")
    assert moved == 2 * e_old * 3  # two MoE layers, three projections per expert
    assert run("verify", src, out)[0] == 0
    # noise on fp8 copies: requantised with fresh scales (tests/test_quant.py), originals untouched
    code, stdout, err = run("grow-width", src, src.parent / "noisy", "--experts", "2x", "--noise", "0.01", "--quiet")
    assert code == 0, err
    assert run("verify", src, src.parent / "noisy")[0] == 0


def _dbrx(folder, p=1.0):
    config = transformers.AutoConfig.for_model(
        "dbrx", vocab_size=64, d_model=16, n_layers=3, n_heads=2, max_seq_len=64, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=8, moe_num_experts=4, moe_top_k=2, moe_normalize_expert_weights=p))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, w in model.named_parameters():
            w.normal_(0, 0.5 if "router" in name else 0.2)
    return save(model.eval(), folder)


@pytest.mark.parametrize("p", [1.0, None, 2.0])
def test_dbrx_width(p, tmp_path, record_property):
    """Nested ffn_config keys; 2-D fused [E*F, H] experts; p-norm normalisation (p=2 scales w2 by 2^-1/2)."""
    from safetensors.torch import load_file

    src = _dbrx(tmp_path / "src", p)
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x")
    assert code == 0, err
    assert ("not byte-identical" in err) == (p == 2.0), err
    diff = (logits(src) - logits(out)).abs().max().item()
    record_property("max_logit_diff", diff)
    assert diff <= 1e-5, diff
    ffn = read_config(out)["ffn_config"]
    assert (ffn["moe_num_experts"], ffn["moe_top_k"], ffn["ffn_hidden_size"]) == (8, 4, 8)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    w1, w2 = "transformer.blocks.1.ffn.experts.mlp.w1", "transformer.blocks.1.ffn.experts.mlp.w2"
    assert after[w1].shape == (64, 16) and torch.equal(after[w1], torch.cat([before[w1]] * 2))
    scale = 2 ** -0.5 if p == 2.0 else 1.0
    assert torch.allclose(after[w2], torch.cat([before[w2] * scale] * 2))
    assert run("verify", src, out, "--forward", "--atol", "1e-5")[0] == 0


@pytest.mark.parametrize("method", ["interpose", "stack"])
def test_dbrx_depth(method, tmp_path):
    src = _dbrx(tmp_path / "src")
    out = tmp_path / "out"
    code, _, err = run("grow-depth", src, out, "--layers", "2x", "--method", method, "--quiet")
    assert code == 0, err
    assert read_config(out)["n_layers"] == 6
    logits(out)
    assert run("verify", src, out)[0] == 0


def test_dbrx_rows_must_divide_into_experts(tmp_path):
    src = _dbrx(tmp_path / "src")
    config = read_config(src)
    config["ffn_config"]["ffn_hidden_size"] = 5
    (src / "config.json").write_text(json.dumps(config))
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x")
    assert code == 2 and "ffn_hidden_size" in err and len(err.strip().splitlines()) == 1, err


def test_jamba_periods(tmp_path):
    """Every layer MoE (period 1): interposition keeps period 1; a map that breaks the attention period is refused."""
    src = save(build("jamba", expert_layer_period=1, expert_layer_offset=0), tmp_path / "src")
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--method", "interpose", "--quiet")
    assert code == 2 and "attn_layer_period" in err and len(err.strip().splitlines()) == 1, err
    src = save(build("jamba", expert_layer_period=1, expert_layer_offset=0, attn_layer_period=1, attn_layer_offset=0),
               tmp_path / "src1")
    code, _, err = run("grow-depth", src, tmp_path / "out1", "--layers", "2x", "--method", "interpose", "--quiet")
    assert code == 0, err
    new = read_config(tmp_path / "out1")
    assert (new["expert_layer_period"], new["expert_layer_offset"], new["num_hidden_layers"]) == (1, 0, 6)
    logits(tmp_path / "out1")
    stacked = tmp_path / "stacked"
    code, _, err = run("grow-depth", save(build("jamba"), tmp_path / "src3"), stacked,
                       "--layers", "2x", "--method", "stack", "--quiet")
    assert code == 0, err
    new = read_config(stacked)
    assert (new["expert_layer_period"], new["expert_layer_offset"]) == (3, 1)
    assert (new["attn_layer_period"], new["attn_layer_offset"]) == (3, 2)


def test_hy_v4_indexer_reuse(family_source, tmp_path):
    """A copied 'shared' indexer layer must reuse a copy of its original's 'full' layer."""
    src = family_source("hy_v4")  # indexer_types full, shared, full
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layer-map", "0,1,2,1", "--quiet")
    assert code == 2 and "indexer_types" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run("grow-depth", src, tmp_path / "ok", "--layer-map", "0,1,1,2", "--quiet")
    assert code == 0, err
    assert read_config(tmp_path / "ok")["indexer_types"] == ["full", "shared", "shared", "full"]
    logits(tmp_path / "ok")


def test_gemma4_text_depth_keys(family_source, tmp_path):
    """per_layer_config follows the map; kv-shared layers must stay last; per-layer input embeddings refuse depth."""
    src = family_source("gemma4_text")  # per_layer_config {"1": ..., "2": ...}: the full-attention layers
    out = tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--method", "stack", "--quiet")[0] == 0
    assert sorted(read_config(out)["per_layer_config"], key=int) == ["1", "2", "4", "5"]
    shared = save(build("gemma4_text", num_kv_shared_layers=1), tmp_path / "shared")
    code, _, err = run("grow-depth", shared, tmp_path / "s1", "--layers", "2x", "--method", "interpose", "--quiet")
    assert code == 0, err
    assert read_config(tmp_path / "s1")["num_kv_shared_layers"] == 2
    # loads cleanly (transformers' forward with kv-shared layers needs per-layer inputs, so it is not run)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "s1", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    code, _, err = run("grow-depth", shared, tmp_path / "s2", "--layers", "2x", "--method", "stack", "--quiet")
    assert code == 2 and "num_kv_shared_layers" in err and len(err.strip().splitlines()) == 1, err
    ple = save(build("gemma4_text", hidden_size_per_layer_input=4, vocab_size_per_layer_input=64), tmp_path / "ple")
    code, _, err = run("grow-depth", ple, tmp_path / "p1", "--layers", "2x", "--quiet")
    assert code == 2 and "hidden_size_per_layer_input" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run("grow-width", ple, tmp_path / "p2", "--experts", "2x", "--quiet")
    assert code == 0, err
    assert (logits(ple) - logits(tmp_path / "p2")).abs().max().item() <= 1e-5


@pytest.mark.parametrize("method, keys", [("interpose", ["2", "3"]), ("stack", ["1", "4"])])
def test_dots3_note_per_layer_config(method, keys, family_source, tmp_path):
    """The sliding layer's other attention shapes (per_layer_config, keyed by layer index) follow the map."""
    src = family_source("dots3_note_text")
    assert list(read_config(src)["per_layer_config"]) == ["1"]
    code, _, err = run("grow-depth", src, tmp_path / "out", "--layers", "2x", "--method", method, "--quiet")
    assert code == 0, err
    new = read_config(tmp_path / "out")["per_layer_config"]
    assert sorted(new, key=int) == keys and all(v == read_config(src)["per_layer_config"]["1"] for v in new.values())


def test_jetmoe_attention_experts_widen_with_the_heads(family_source, tmp_path):
    """Both expert sets (MLP and attention) duplicate; num_attention_heads follows top-k (kv heads x top-k)."""
    from safetensors.torch import load_file

    src = family_source("jetmoe")
    out = tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    assert (read_config(src)["num_attention_heads"], read_config(out)["num_attention_heads"]) == (4, 8)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    for rel in ("mlp.input_linear.weight", "mlp.output_linear.weight", "mlp.router.layer.weight",
                "self_attention.experts.input_linear.weight", "self_attention.experts.output_linear.weight",
                "self_attention.experts.router.layer.weight"):
        name = f"model.layers.1.{rel}"
        assert torch.equal(after[name], torch.cat([before[name]] * 2)), name
    for rel in ("mlp.bias", "self_attention.experts.bias"):  # per output, not per expert
        assert torch.equal(after[f"model.layers.1.{rel}"], before[f"model.layers.1.{rel}"]), rel
    keep = tmp_path / "keep"
    assert run("grow-width", src, keep, "--experts", "2x", "--top-k", "keep", "--quiet")[0] == 0
    assert read_config(keep)["num_attention_heads"] == 4
    logits(keep)


def test_inkling2_text_depth_refused(family_source, tmp_path):
    """Any depth map (interposition, stacking, explicit, depth + width) is refused; inspect says why."""
    src = family_source("inkling2_text")
    for args in (("grow-depth", "--layer-map", "0,1,1,2,2"), ("grow", "--layers", "2x", "--experts", "2x")):
        code, stdout, err = run(args[0], src, tmp_path / "out", *args[1:])
        assert code == 2 and not stdout and len(err.strip().splitlines()) == 1, err
        assert "n_layers_per_attn_res_block" in err and "not supported" in err, err
        assert not (tmp_path / "out").exists()
    code, stdout, err = run("inspect", src, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["layer_prefix"] == "model.llm.layers." and info["moe_layers"] == [0, 1, 2]
    assert "attn_res" in info["depth_refused"] and info["width_refused"] is None
    assert "depth growth refused" in run("inspect", src)[1]


def test_inkling2_mxfp8_scales_travel_with_their_experts(family_source, ckpt_copy):
    """An MXFP8-style inkling2_text release: float8 w13/w2 weights with uint8 *_weight_scale, expert axis first."""
    from safetensors.torch import load_file

    src = ckpt_copy(family_source("inkling2_text"))

    def mxfp8(name, t):
        if not name.endswith(("experts.w13_weight", "experts.w2_weight")):
            return {name: t}
        blocks = t.shape[0] * t.shape[1] * -(-t.shape[2] // 32)  # one scale per 32 inputs
        scale = (torch.arange(blocks) % 256).to(torch.uint8).reshape(*t.shape[:2], -1)
        return {name: t.to(torch.float8_e4m3fn), f"{name}_scale": scale}

    before = _requantise(src, mxfp8)
    out = src.parent / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    after = load_file(out / "model.safetensors")
    quantised = [n for n in before if ".experts.w" in n]
    assert len(quantised) == 3 * 4
    for name in quantised:
        assert torch.equal(after[name].view(torch.uint8), torch.cat([before[name].view(torch.uint8)] * 2)), name
    assert run("verify", src, out)[0] == 0
    code, _, err = run("grow-width", src, src.parent / "noisy", "--experts", "2x", "--noise", "0.01")
    assert code == 2 and "quantis" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("family", ["longcat_flash", "inkling_text", "deepseek_v4"])
def test_one_pass_equals_two_steps_for_segments_and_tables(family, family_source, tmp_path):
    """grow composes depth with segmented router rows and widened expert tables as the two steps do."""
    from safetensors.torch import load_file

    src = family_source(family)
    width = ["--experts", "2x", "--noise", "0.02", "--router-noise", "0.02", "--seed", "3", "--quiet"]
    assert run("grow", src, tmp_path / "one", "--layers", "2x", *width)[0] == 0
    assert run("grow-depth", src, tmp_path / "d", "--layers", "2x", "--quiet")[0] == 0
    assert run("grow-width", tmp_path / "d", tmp_path / "two", *width)[0] == 0
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    code, _, err = run("verify", src, tmp_path / "one")
    assert code == 0, err
