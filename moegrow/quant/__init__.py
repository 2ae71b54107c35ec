"""Quantised checkpoints: the format interface (`codec`), the formats, and their registry.

`CODECS` lists the formats in detection order: the first whose `detect` accepts a checkpoint is
its format. A new format is a `Codec` subclass added here.
"""

from __future__ import annotations

from .channel_fp8 import CompressedFp8, FbgemmFp8
from .codec import Codec, Member, QuantGroup
from .fp8 import BlockFp8
from .mx import Mxfp4, Mxfp8

# Mxfp8 after BlockFp8: an inkling2 release has no quantization_config, and its tensors decide
CODECS: list[type[Codec]] = [BlockFp8, Mxfp4, Mxfp8, FbgemmFp8, CompressedFp8]

__all__ = ["CODECS", "Codec", "Member", "QuantGroup"]
