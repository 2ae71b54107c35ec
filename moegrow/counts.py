"""Parameter counts of a growth, before and after, as transformers counts them.

One function for the CLI's summary and the model card, so that both say the same numbers: a quantised
weight counts once (as its dequantised tensor, not values plus scales), and an upcycled dense source
has every parameter active.
"""

from __future__ import annotations

from typing import Any

from .anatomy import analyse
from .gc_pause import gc_paused
from .plan import Plan, param_counts

Counts = tuple[int, int]  # (total, active per token)


_last: list[Any] = [None, None]  # (key, counts) of the last call: the summary and the card ask for the same


def growth_param_counts(plan: Plan, source: Any) -> tuple[Counts, Counts]:
    """((total, active) of the source, (total, active) of the output) for `plan` grown from `source`."""
    key = (id(plan), id(source), id(plan.tensors), len(plan.tensors), id(plan.config), id(plan.source_config))
    if _last[0] != key:
        with gc_paused():
            _last[:] = [key, _counts(plan, source)]
    return _last[1]


def _counts(plan: Plan, source: Any) -> tuple[Counts, Counts]:
    from .quant.plan import planning_index

    layout = plan.layout
    src_shapes = {n: t.shape for n, t in planning_index(source.tensors, plan.quant, "keep").items()}
    out_shapes = plan.dequantised_shapes or {t.name: t.shape for t in plan.tensors}
    if plan.upcycle:
        from .upcycle import dense_param_count

        before: Counts = (dense_param_count(src_shapes),) * 2  # type: ignore[assignment]
    else:
        before = param_counts(src_shapes, analyse(src_shapes, plan.source_config, layout), layout,
                              layout.top_k(plan.source_config))
    after = param_counts(out_shapes, analyse(out_shapes, plan.config, layout), layout, layout.top_k(plan.config))
    return before, after
