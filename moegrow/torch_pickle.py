"""Reading and rewriting a trainer's `torch.save` record (Megatron-LM's common.pt) without its classes.

Megatron-LM's common.pt pickles an `argparse.Namespace` of arguments that holds megatron's own enums
(`AttnBackend`...), which neither `torch.load(weights_only=True)` nor an environment without
megatron-core can load. Here every class outside a short safe list becomes an opaque stand-in that
only keeps its constructor arguments and state (nothing is imported or run) and is pickled back
under its original name, so the record round-trips with only the fields moegrow changes changed.
"""

from __future__ import annotations

import argparse
import collections
import pickle
import types
from pathlib import Path
from typing import Any

_SAFE = {
    ("argparse", "Namespace"): argparse.Namespace,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
}
_TORCH_SAFE = {"_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter", "_rebuild_parameter_with_state"}


class Opaque:
    """An object of a class that is not imported: its pickle arguments and state, kept to be written back."""

    _module = ""
    _name = ""

    def __init__(self, *args: Any) -> None:
        self._args = args
        self._state: Any = None

    def __setstate__(self, state: Any) -> None:
        self._state = state

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._args, self._state) if self._state is not None else (type(self), self._args)

    def __repr__(self) -> str:
        inner = ", ".join(map(repr, self._args))
        return f"{self._module}.{self._name}({inner})"


_opaque_classes: dict[tuple[str, str], type[Opaque]] = {}


def _opaque(module: str, name: str) -> type[Opaque]:
    key = (module, name)
    if key not in _opaque_classes:
        _opaque_classes[key] = type(name, (Opaque,), {"_module": module, "_name": name})
    return _opaque_classes[key]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch._utils" and name in _TORCH_SAFE:
            return getattr(torch._utils, name)
        if module == "torch" and (name in ("Size", "device") or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":
            return torch.serialization._get_layout
        return _opaque(module, name)


class _Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]  # the pure-Python pickler: save_global can be overridden
    def save_global(self, obj: Any, name: Any = None) -> None:
        if isinstance(obj, type) and issubclass(obj, Opaque) and obj is not Opaque:
            self.write(pickle.GLOBAL + f"{obj._module}\n{obj._name}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


PICKLE_MODULE = types.ModuleType("moegrow_restricted_pickle")
PICKLE_MODULE.Unpickler = _Unpickler  # type: ignore[attr-defined]
PICKLE_MODULE.Pickler = _Pickler  # type: ignore[attr-defined]
PICKLE_MODULE.load = lambda f, **kw: _Unpickler(f, **kw).load()  # type: ignore[attr-defined]
PICKLE_MODULE.HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL  # type: ignore[attr-defined]


def load_record(path: Path) -> Any:
    """A `torch.save` file, with unknown classes as `Opaque` stand-ins and nothing run."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=PICKLE_MODULE)


def save_record(obj: Any, path: Path) -> None:
    """Write back what `load_record` read (stand-ins under their original class names)."""
    import torch

    torch.save(obj, path, pickle_module=PICKLE_MODULE)
