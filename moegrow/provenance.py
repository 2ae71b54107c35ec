"""The provenance record, `moegrow.json`: what was grown from what, with which flags.

It holds everything needed to rebuild the plan (operation, layer map, factor, top-k, noise,
seed) plus the tensor mapping itself, so `verify` can check the output against both.
Timestamps are left out on purpose: the same growth twice gives byte-identical folders.
"""

from __future__ import annotations

from typing import Any

from . import __version__
from .plan import OutTensor, Plan
from .source import Source

RECORD_NAME = "moegrow.json"


def tensor_mapping(tensors: list[OutTensor]) -> dict[str, list[list[Any]]]:
    """{output tensor: [[source tensor, noise std(, scale)], ...]} (parts concatenated along axis 0).

    The scale appears only where a part is scaled (see layouts.TensorRule)."""
    return {t.name: [[p.source, p.noise, *([p.scale] if p.scale != 1.0 else [])] for p in t.parts]
            for t in tensors}


def build_record(plan: Plan, source: Source, device: str) -> dict[str, Any]:
    return {
        "moegrow_version": __version__,
        "operation": plan.operation,
        "model_type": plan.config.get("model_type"),
        "source": source.fingerprint(),
        "growth": {
            "layer_map": plan.layer_map,
            "factor": plan.factor,
            "experts": plan.experts,
            "top_k": plan.top_k,
            "noise": plan.noise,
            "router_noise": plan.router_noise,
            "seed": plan.seed,
            "allow_inexact": plan.allow_inexact,
        },
        "noise_device": device,
        "function_preserving": plan.function_preserving,
        "config_changes": plan.config_changes,
        "warnings": plan.warnings,
        "tensors": tensor_mapping(plan.tensors),
    }
