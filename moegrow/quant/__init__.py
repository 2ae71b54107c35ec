"""Quantised checkpoints: the format interface (`codec`), the formats, and their registry.

`CODECS` lists the formats in detection order: the first whose `detect` accepts a checkpoint is
its format. A new format is a `Codec` subclass added here.
"""

from __future__ import annotations

from .codec import Codec, Member, QuantGroup

CODECS: list[type[Codec]] = []

__all__ = ["CODECS", "Codec", "Member", "QuantGroup"]
