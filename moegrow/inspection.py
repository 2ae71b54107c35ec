"""`moegrow inspect`: what a checkpoint is, from its config and tensor index alone."""

from __future__ import annotations

from collections import Counter
from typing import Any

from .anatomy import analyse
from .configs import check_moe_layers
from .layouts import layout_for, lookup
from .plan import param_counts
from .quant.plan import output_bytes, planning_index, quantisation
from .source import Source


def in_text_decoder(name: str, layer_prefix: str, towers: tuple[str, ...] = ()) -> bool:
    """Whether a tensor belongs to a multimodal checkpoint's language model: its layers and what sits
    beside them (embeddings, final norm) and its lm_head (at the top, or beside the decoder's ``model.``);
    not the `towers` prefixes (towers saved beside the decoder: `Wrapper.tower_prefixes`)."""
    if name.startswith(towers):
        return False
    # the prefix without its last part (layers. / blocks.): language_model.model. / model.language_model. / model.
    base = layer_prefix.rstrip(".").rpartition(".")[0] + "."
    heads = ["lm_head."]
    if base.endswith(".model."):
        heads.append(base.removesuffix("model.") + "lm_head.")  # language_model.lm_head.
    return name.startswith(base) or name.startswith(tuple(heads))


def describe(source: Source) -> dict[str, Any]:
    """A JSON-ready description: layers, MoE layout, routing, parameter counts, files, bytes."""
    config = source.config
    layout = layout_for(config, f"{source.spec}/config.json", source.tensors)
    quant = quantisation(config, source.tensors)
    # a quantised weight counts once, as its dequantised tensor (not values + scales)
    shapes = {n: t.shape for n, t in planning_index(source.tensors, quant, "keep").items()}
    anatomy = analyse(shapes, config, layout, f"{source.spec}/config.json")
    check_moe_layers(config, layout, anatomy.moe_layers, f"{source.spec}/config.json")
    top_k = layout.top_k(config)
    total, active = param_counts(shapes, anatomy, layout, top_k)
    text_total, text_active = total, active
    if layout.wrapper is not None:  # the vision / audio towers and projectors left out
        towers = layout.wrapper.tower_prefixes
        text_shapes = {n: s for n, s in shapes.items() if in_text_decoder(n, layout.names.layer_prefix, towers)}
        text_total, text_active = param_counts(text_shapes, anatomy, layout, top_k)
    text = layout.text(config)  # a multimodal config: its text decoder's
    shared_keys = layout.counts.shared_experts_keys
    if shared_keys and any(lookup(text, k) is not None for k in shared_keys):
        shared = int(lookup(text, layout.config_key(text, shared_keys, "shared experts")))
    else:
        prefix = layout.names.shared_prefix
        shared = int(bool(prefix) and any(r.rel.startswith(prefix) for r in anatomy.roles.values()))
    dtypes = Counter(t.dtype for t in source.tensors.values())
    files = sorted({t.path.name for t in source.tensors.values()})
    return {
        "source": source.spec,
        "revision": source.commit or source.revision,
        "model_type": config["model_type"],
        "family": layout.name,
        # multimodal: the text decoder's config key and layer prefix (its other tensors are copied untouched)
        "text_config": layout.wrapper.text_config_key if layout.wrapper else None,
        "layer_prefix": layout.names.layer_prefix,
        "num_layers": anatomy.num_layers,
        "moe_layers": [i for i in anatomy.moe_layers if i < anatomy.num_layers],
        "dense_layers": [i for i in range(anatomy.num_layers) if i not in anatomy.moe_layers],
        "extra_layers": list(anatomy.extra_layers),
        # MTP layers under their own prefix (mtp.layers.N), outside the decoder; those with experts are widened
        "mtp_prefix": layout.mtp_layer_prefix or None,
        "mtp_layers": list(anatomy.mtp_layers),
        "mtp_moe_layers": list(anatomy.mtp_moe_layers),
        "mtp_tensors": sum(r.mtp for r in anatomy.roles.values()),
        "num_experts": anatomy.num_experts,
        "top_k": top_k,
        "num_shared_experts": shared,
        # slots after the routed experts on the router's axis (zero experts, router-gated shared experts)
        "expert_segments": dict(zip(layout.axes.expert_segments, layout.segment_counts(config)[1:])),
        "routing": layout.doc.routing,
        "width_exact": layout.width.exact_width,
        "width_inexact_reason": layout.width.inexact_reason or None,
        "width_refused": layout.width.width_refused or None,
        "depth_refused": layout.depth.depth_refused or None,
        # --depth-init identity: the tensors an added copy has zeroed, or why the family is refused
        "residual_writers": list(layout.residual.writers),
        "identity_depth_refused": layout.residual.refused or next(
            (f"{k}={lookup(layout.text(config), k)!r}: {why}" for k, why in layout.residual.refused_keys
             if lookup(layout.text(config), k)), None),
        "total_params": total,
        "active_params": active,
        # the text decoder's alone (equal to the above unless multimodal)
        "text_total_params": text_total,
        "text_active_params": text_active,
        "dtypes": dict(sorted(dtypes.items())),
        "num_tensors": len(source.tensors),
        "total_bytes": source.total_bytes,
        "files": files,
        # null for a float checkpoint; else format, block_size (where there is one), quantized_tensors
        "quantization": quant.describe() if quant is not None else None,
        # the bytes of tensors each --dtype writes for this checkpoint as it is (before any growth)
        "dtype_bytes": output_bytes(source.tensors, quant),
    }
