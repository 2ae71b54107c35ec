"""Tensors from and to safetensors bytes, for every dtype a quantised checkpoint holds."""

from __future__ import annotations

from typing import Any

# safetensors dtype name -> torch dtype name
TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
}
# --dtype values -> safetensors dtype names
TARGETS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def torch_dtype(dtype: str) -> Any:
    import torch

    return getattr(torch, TORCH_NAMES[dtype])


def from_bytes(raw: bytes | bytearray, dtype: str, shape: tuple[int, ...]) -> Any:
    """A tensor of `dtype` and `shape` over a copy of `raw` (empty tensors included)."""
    import torch

    if not raw:
        return torch.empty(shape, dtype=torch_dtype(dtype))
    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype)).reshape(shape)


def to_bytes(t: Any) -> bytes:
    """A tensor's bytes, C order."""
    import torch

    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()
