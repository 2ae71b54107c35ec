"""The layouts package's data is consistent: one layout per model_type, every table keyed by a known family,
every wrapper's text decoder resolved from transformers' own config class (no checkpoint built: cheap), and
every family's data as main had it before `Layout` had parts.

That the entries match real saved checkpoints is checked where the families are built (test_families.py,
test_multimodal.py, test_identity_depth.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import pkgutil
from collections import Counter
from pathlib import Path

import pytest
from transformers import CONFIG_MAPPING, AutoConfig

import moegrow.layouts as layouts
from moegrow.layouts import LAYOUTS, RESIDUAL, WRAPPERS, Layout, Names, Wrapper, layout_for, lookup
from moegrow.layouts import families as families_module
from moegrow.layouts.model import PART_OF

TEXT_LAYOUTS = [w.text_layout for w in WRAPPERS if w.text_layout is not None]
FAMILY_NAMES = {lay.name for lay in LAYOUTS} | {lay.name for lay in TEXT_LAYOUTS}
WRAPPER_TYPES = [t for w in WRAPPERS for t in w.model_types]


def test_every_model_type_maps_to_exactly_one_layout():
    counts = Counter(t for lay in (*LAYOUTS, *TEXT_LAYOUTS) for t in lay.model_types)
    assert [t for t, n in counts.items() if n > 1] == []
    assert [n for n, c in Counter(lay.name for lay in (*LAYOUTS, *TEXT_LAYOUTS)).items() if c > 1] == []
    assert set(counts).isdisjoint(WRAPPER_TYPES), "a model_type is both a family and a wrapper"
    assert Counter(WRAPPER_TYPES).most_common(1)[0][1] == 1
    for lay in LAYOUTS:  # the name keys RESIDUAL and the docs: it is the family's model_type
        assert lay.name in lay.model_types
        assert layout_for({"model_type": lay.name}) is lay


def test_every_model_type_is_one_transformers_knows():
    unknown = sorted({*(t for lay in (*LAYOUTS, *TEXT_LAYOUTS) for t in lay.model_types), *WRAPPER_TYPES}
                     - set(CONFIG_MAPPING))
    assert unknown == []


def test_every_lineage_module_is_gathered():
    """A lineage module left out of families.LINEAGES would drop its families silently."""
    with_layouts = set()
    for info in pkgutil.iter_modules(layouts.__path__):
        module = importlib.import_module(f"moegrow.layouts.{info.name}")
        own = getattr(module, "LAYOUTS", None)
        if isinstance(own, tuple) and own is not LAYOUTS:  # not one that imports the gathered tuple
            with_layouts.add(module.__name__)
    assert with_layouts == {m.__name__ for m in families_module.LINEAGES}
    assert sum(len(m.LAYOUTS) for m in families_module.LINEAGES) == len(LAYOUTS)


def test_every_residual_key_is_a_known_family_or_wrapper():
    assert sorted(set(RESIDUAL) - FAMILY_NAMES - set(WRAPPER_TYPES)) == []


def test_every_family_that_can_grow_in_depth_has_residual_data():
    missing = [lay.name for lay in (*LAYOUTS, *TEXT_LAYOUTS)
               if lay.name not in RESIDUAL and not lay.depth.depth_refused]
    assert missing == []


def test_a_wrapper_has_its_own_residual_entry_iff_it_renames_the_decoder_tensors():
    for w in WRAPPERS:
        own = [t for t in w.model_types if t in RESIDUAL]
        assert bool(own) == bool(w.layout_overrides), w.model_types


def test_wrapper_overrides_name_layout_fields():
    fields = set(PART_OF)
    for w in WRAPPERS:
        assert {name for name, _ in w.layout_overrides} <= fields, w.model_types


@pytest.mark.parametrize("model_type", WRAPPER_TYPES)
def test_every_wrapper_text_type_resolves(model_type):
    """The wrapper's config class (transformers' defaults) nests a text config whose model_type has a layout."""
    config = AutoConfig.for_model(model_type).to_dict()
    wrapper = layouts.wrapper_of(model_type)
    text = lookup(config, wrapper.text_config_key)
    assert isinstance(text, dict) and isinstance(text.get("model_type"), str)
    layout = layout_for(config)
    assert layout.wrapper is wrapper and text["model_type"] in layout.model_types
    assert layout.names.layer_prefix == wrapper.layer_prefix
    assert layout.text(config)["model_type"] == text["model_type"]


# -- the parts refactor kept every family's data ------------------------------------------------------------------

_FLAT_MAIN = Path(__file__).parent / "fixtures" / "layouts_flat_main.json"


def _enc(value):
    """JSON of a layout field: nested dataclasses by class and fields, a wrapper by its model_types."""
    if isinstance(value, Wrapper):
        return {"Wrapper": list(value.model_types)}
    if dataclasses.is_dataclass(value):
        return {type(value).__name__: {f.name: _enc(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (tuple, list)):
        return [_enc(v) for v in value]
    return value


def _flat_view(lay: Layout) -> str:
    """The 41 fields `Layout` had before its parts, read from the parts (not from the flat properties)."""
    view = {f: _enc(getattr(getattr(lay, part), f)) for f, part in PART_OF.items()}
    view |= {f: _enc(getattr(lay, f)) for f in ("name", "model_types", "wrapper")}
    return hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16]


def _views() -> dict[str, Layout]:
    views: dict[str, Layout] = {}
    for lay in LAYOUTS:
        views[f"layout:{lay.name}"] = lay
        views[f"bare:{lay.name}"] = layouts.as_saved(lay, [lay.names.layer_prefix.removeprefix("model.") + "0.x"])
    for w in WRAPPERS:
        if w.text_layout is not None:
            views[f"text_layout:{w.text_layout.name}"] = w.text_layout
        for t in w.model_types:
            lay = layout_for(AutoConfig.for_model(t).to_dict())
            views[f"wrapper:{t}"] = lay
            bare = [lay.names.layer_prefix.removeprefix("model.") + "0.x"]
            views[f"wrapper_bare:{t}"] = layout_for(AutoConfig.for_model(t).to_dict(), names=bare)
    return views


def test_parts_keep_every_family_s_data():
    """Every layout's flat view equals main's before the parts refactor (hashes dumped from main's package), so the
    entries' rewrite to parts (and `Layout.with_` in wrappers and `as_saved`) changed no value."""
    main = json.loads(_FLAT_MAIN.read_text())["views"]
    views = _views()
    assert set(main) <= set(views)
    assert [k for k in main if _flat_view(views[k]) != main[k]] == []


def test_with_takes_flat_names_and_parts():
    lay = layout_for({"model_type": "deepseek_v3"})
    moved = lay.with_(layer_prefix="layers.", moe_rule="all", name="x")
    assert (moved.names.layer_prefix, moved.moe.moe_rule, moved.name) == ("layers.", "all", "x")
    assert moved.names.experts_prefix == lay.names.experts_prefix and moved.counts is lay.counts
    assert lay.names.layer_prefix == "model.layers."  # frozen: the original is unchanged
    assert lay.with_(names=Names("e.", ("g",))).names.layer_prefix == "model.layers."
    with pytest.raises(TypeError):
        lay.with_(no_such_field=1)
