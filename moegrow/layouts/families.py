"""Every standalone family, lineage by lineage: the `LAYOUTS` tuple and the `RESIDUAL` table they make up.

Adding a family is adding its `Layout` (and its `Residual`) to its lineage's module, or a new lineage
module listed here. The order of `LAYOUTS` carries no meaning: each model_type belongs to one entry.
"""

from __future__ import annotations

from . import deepseek, deepseek_kin, granite, hunyuan, hybrid, inkling, mixtral, olmo, other, qwen
from .model import Layout, Residual

LINEAGES = (mixtral, qwen, olmo, deepseek, deepseek_kin, hunyuan, granite, hybrid, inkling, other)

LAYOUTS: tuple[Layout, ...] = tuple(lay for lineage in LINEAGES for lay in lineage.LAYOUTS)
RESIDUAL: dict[str, Residual] = {name: r for lineage in LINEAGES for name, r in lineage.RESIDUAL.items()}
