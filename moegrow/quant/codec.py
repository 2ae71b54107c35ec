"""The interface a quantisation format implements, and the tensor groups it finds.

A quantised weight is a *group* of source tensors (its values and their scales) that together
stand for one float tensor, the weight transformers computes with once it dequantises. moegrow
plans on that dequantised view (a checkpoint index where each group is one float tensor) and
then lowers the plan back to the checkpoint's own tensors:

- kept as it is (``--dtype keep``, no noise): every member of a group is a byte copy;
- dequantised (``--dtype bfloat16|float16|float32``): the group is decoded to float32 and written
  in the target dtype, its scales dropped;
- requantised (``--dtype keep`` with noise): the group is decoded, noised in float32 and encoded
  again with `Codec.quantize`; each member of the copy is one output tensor, all computed from the
  same noised data (the noise is seeded by the dequantised output name).

A format implements `Codec` (one instance per checkpoint, built by `detect` from its config and
tensor index) and is registered in `moegrow.quant.CODECS`. It never reads files: the framework
hands it tensors and writes what it returns. Everything is float32 on the way in and out of
`dequantize`/`quantize`; both must be deterministic on the CPU (``verify`` recomputes them bit for
bit), and quantising must not mix values across axis 0 of a tensor with 3 or more dims (the expert
axis of fused experts: copies are requantised one slice of experts at a time, next to originals
that stay byte copies).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class TensorMeta(Protocol):
    dtype: str   # safetensors dtype name: F8_E4M3, U8, F32, ...
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Member:
    """One source tensor of a quantised weight: its role in the format (``values``, ``scales``...)."""

    role: str
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class QuantGroup:
    """One quantised weight: the source tensors it is stored as, and the float tensor it stands for.

    ``name`` is the dequantised tensor's name (the name a dequantised checkpoint stores it under,
    e.g. ``...down_proj.weight`` for fp8, ``...experts.down_proj`` for MXFP4 ``*_blocks``/``*_scales``)
    and ``shape`` its shape; ``members`` are in the codec's `Codec.roles` order, values first.
    """

    format: str
    name: str
    shape: tuple[int, ...]
    members: tuple[Member, ...]

    def member(self, role: str) -> Member:
        for m in self.members:
            if m.role == role:
                return m
        raise StopIteration(role)


class Codec(ABC):
    """A quantisation format as found in one checkpoint (block size and scale format included).

    Subclasses set `format` and `roles` and implement the five methods below; `detect` (a class
    method) builds the codec from a checkpoint's config and index, or returns None when the
    checkpoint is not in this format.
    """

    format: str = ""                     # short name, e.g. "fp8", "mxfp4", "mxfp8"
    roles: tuple[str, ...] = ("values", "scales")

    @classmethod
    @abstractmethod
    def detect(cls, config: Mapping[str, Any], tensors: Mapping[str, TensorMeta]) -> Codec | None:
        """This format's codec for a checkpoint (its `quantization_config` and index), or None."""

    @abstractmethod
    def groups(self, tensors: Mapping[str, TensorMeta]) -> list[QuantGroup]:
        """Every quantised weight of a checkpoint index (tensors of no group are left alone)."""

    @abstractmethod
    def member_name(self, name: str, role: str) -> str:
        """The name `role`'s tensor has for the weight whose dequantised name is `name` (used to name
        a copy's members: `member_name(group.name, m.role) == m.name` for every source group)."""

    @abstractmethod
    def dequantize(self, group: QuantGroup, data: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weight as float32 of `group.shape`, from its members' tensors (`data`: role -> tensor
        in the member's dtype and shape, or a slice of it along axis 0), exactly as transformers
        dequantises this format."""

    @abstractmethod
    def quantize(self, group: QuantGroup, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """float32 `x` (the weight's shape, or a slice of it along axis 0) encoded in this format
        with freshly computed scales: role -> tensor in the member's dtype (and the matching shape)."""

    def describe(self) -> dict[str, Any]:
        """For `inspect`: at least ``format``; ``block_size`` where there is one."""
        return {"format": self.format}

    def config_without(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config a dequantised checkpoint carries: `quantization_config` dropped."""
        return {k: v for k, v in config.items() if k != "quantization_config"}
