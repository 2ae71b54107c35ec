"""The safetensors index text moegrow writes is json.dumps(index, indent=2, sort_keys=True), as transformers'."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from moegrow.io import index_json

names = st.text(min_size=1, max_size=20)


@given(weight_map=st.dictionaries(names, names, max_size=40),
       metadata=st.dictionaries(st.sampled_from(["total_size", "format", "zzz"]),
                                st.integers(0, 10**13) | st.text(max_size=5), max_size=3),
       with_metadata=st.booleans())
def test_index_json_is_indented_sorted_json(weight_map, metadata, with_metadata):
    index = {"metadata": metadata, "weight_map": weight_map} if with_metadata else {"weight_map": weight_map}
    assert index_json(index) == json.dumps(index, indent=2, sort_keys=True) + "\n"
