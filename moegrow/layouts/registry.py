"""The lookups: a config's model_type (or its wrapper's) to its `Layout`, with the names its checkpoint uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ConfigError, UnsupportedModelError
from . import families, wrappers
from .families import LAYOUTS
from .model import Layout, Residual, Wrapper, lookup
from .wrappers import WRAPPERS

# identity depth init: per family (and per wrapper with names of its own), what an added copy has zeroed
RESIDUAL: dict[str, Residual] = {**families.RESIDUAL, **wrappers.RESIDUAL}

_BY_TYPE: dict[str, Layout] = {t: lay for lay in LAYOUTS for t in lay.model_types}
_WRAPPER_BY_TYPE: dict[str, Wrapper] = {t: w for w in WRAPPERS for t in w.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_TYPE)


def wrapper_of(model_type: Any) -> Wrapper | None:
    """The multimodal wrapper entry of a model_type, if it is one."""
    return _WRAPPER_BY_TYPE.get(model_type) if isinstance(model_type, str) else None


def supported_wrapper_types() -> list[str]:
    return sorted(_WRAPPER_BY_TYPE)


def layout_for(config: Mapping[str, Any], where: str = "config.json", names: Iterable[str] | None = None) -> Layout:
    """The layout of a config's model_type, or a clear refusal; given the checkpoint's tensor
    `names`, with the layer prefix those names use (see `as_saved`)."""
    return as_saved(_layout_for(config, where), names)


def as_saved(layout: Layout, names: Iterable[str] | None) -> Layout:
    """The layout with the layer prefix the checkpoint's tensor names carry.

    transformers loads a base model's tensors with or without the base-model prefix, and some Hub
    releases omit it (DeepSeek-V4: `layers.N.ffn...`, `embed.weight`); a wrapper may list other
    prefixes its decoder is saved under (`Wrapper.alt_prefixes`). moegrow keeps the source's names."""
    if names is None:
        return layout
    names = list(names)
    bare = layout.names.layer_prefix.removeprefix("model.")
    alternatives = (*(layout.wrapper.alt_prefixes if layout.wrapper else ()), bare)
    for prefix in (layout.names.layer_prefix, *alternatives):
        if any(n.startswith(prefix) for n in names):
            break
    else:
        return layout
    if prefix == layout.names.layer_prefix:
        return layout
    mtp = layout.names.mtp_prefix.removeprefix("model.") if prefix == bare else layout.names.mtp_prefix
    return layout.with_(layer_prefix=prefix, mtp_prefix=mtp)


def _layout_for(config: Mapping[str, Any], where: str) -> Layout:
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise ConfigError(f"{where}: no model_type")
    wrapper = _WRAPPER_BY_TYPE.get(model_type)
    if wrapper is not None:
        text = lookup(config, wrapper.text_config_key)
        text_type = text.get("model_type") if isinstance(text, Mapping) else None
        if not isinstance(text_type, str):
            raise ConfigError(f"{where}: model_type {model_type!r} needs {wrapper.text_config_key} "
                              f"with a model_type (the text decoder's config)")
        own = wrapper.text_layout
        layout = own if own is not None and text_type in own.model_types else _BY_TYPE.get(text_type)
        if layout is None:
            raise UnsupportedModelError(
                f"{where}: {wrapper.text_config_key}.model_type {text_type!r} (the text decoder of "
                f"{model_type!r}) is not a supported MoE family (supported: {', '.join(supported_model_types())})")
        return layout.with_(layer_prefix=wrapper.layer_prefix, wrapper=wrapper, **dict(wrapper.layout_overrides))
    layout = _BY_TYPE.get(model_type)
    if layout is None:
        from ..siblings import BY_DENSE

        if model_type in BY_DENSE:
            moe = " or ".join(s.moe for s in BY_DENSE[model_type])
            raise UnsupportedModelError(f"{where}: model_type {model_type!r} is a dense model, not MoE; "
                                        f"`moegrow upcycle` turns it into its MoE sibling ({moe})")
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not a supported MoE family "
            f"(supported: {', '.join(supported_model_types())}; multimodal, with a supported text "
            f"decoder: {', '.join(supported_wrapper_types())})"
        )
    return layout
