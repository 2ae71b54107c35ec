"""A quantised checkpoint seen as float32 tensors, for `verify --forward`.

transformers 5.23 cannot be trusted to load the quantised checkpoints moegrow reads and writes on
the CPU: its fp8 loader needs accelerate, its load-time fp8 dequantisation infers the block size
from the scale grid (wrong for ragged edge blocks), and it does not apply Inkling-2's MXFP8 scales.
`verify --forward` therefore builds plain float modules (no quantizer) and hands transformers'
own checkpoint-to-module conversion, instead of each group's members, one lazy float32 tensor under
the dequantised name, decoded by moegrow's codecs (bit-equal to transformers' own dequantisation:
tests/test_quant.py, tests/test_mx.py) only when the loader reads it: memory stays per layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..plan import Meta
from .codec import Codec, QuantGroup
from .plan import Quantisation, quantisation

if TYPE_CHECKING:
    import torch


class DequantisedSlice:
    """One quantised weight as a lazy float32 tensor: its members read and decoded when it is sliced
    (the loader materialises a safetensors slice with `slice[...]`)."""

    def __init__(self, codec: Codec, group: QuantGroup, members: Mapping[str, Any]) -> None:
        self.codec = codec
        self.group = group
        self.members = dict(members)  # role -> safetensors slice

    def __getitem__(self, key: Any) -> torch.Tensor:
        data = {role: s[...] for role, s in self.members.items()}
        return self.codec.dequantize(self.group, data)[key]

    def get_shape(self) -> list[int]:
        return list(self.group.shape)

    def get_dtype(self) -> str:
        return "F32"


def slice_meta(s: Any) -> Meta:
    """A safetensors slice's dtype name and shape, as the quantisation planners read an index."""
    return Meta(s.get_dtype(), tuple(s.get_shape()))


def dequantised_view(config: Mapping[str, Any], slices: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                                    Quantisation | None]:
    """`slices` (name -> safetensors slice) with each quantised weight's members replaced by one
    `DequantisedSlice` under its dequantised name, and the checkpoint's quantisation (None: unchanged)."""
    quant = quantisation(config, {k: slice_meta(s) for k, s in slices.items()})
    if quant is None:
        return dict(slices), None
    view: dict[str, Any] = {}
    for name, s in slices.items():
        g = quant.by_member.get(name)
        if g is None:
            view[name] = s
        elif name == g.members[0].name:
            view[g.name] = DequantisedSlice(quant.codec, g, {m.role: slices[m.name] for m in g.members})
    return view, quant


def is_quantised(folder: Path) -> bool:
    """Whether a checkpoint folder stores quantised weights (any format moegrow reads)."""
    from ..io import read_index
    from ..source import read_config

    return quantisation(read_config(folder), read_index(folder)) is not None


def drop_quantization_config(config: Any) -> None:
    """A transformers config without `quantization_config` (top level and text config), so that the model
    built from it has plain float modules."""
    for c in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        if "quantization_config" in c.__dict__:
            del c.quantization_config
