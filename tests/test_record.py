"""The streamed provenance record and safetensors headers written entry by entry (issue 12, item 2)."""

from __future__ import annotations

import json
import struct

from safetensors import safe_open

from moegrow.execute import write_json
from moegrow.io import header_bytes
from moegrow.provenance import TensorMapping, mapping_differs, tensor_mapping

from .conftest import run


def test_streamed_record_is_the_mapping(checkpoints, tmp_path):
    """The record written entry by entry is valid JSON holding the same mapping as the whole-dict form, one
    tensor per line; verify accepts it and refuses it once an entry is changed."""
    src, out = checkpoints["deepseek_v3"], tmp_path / "o"
    assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--noise", "0.01", "--quiet")[0] == 0
    text = (out / "moegrow.json").read_text()
    rec = json.loads(text)
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert set(rec["tensors"]) == names and rec["operation"] == "grow" and rec["noise_device"] == "cpu"
    assert sum(line.startswith(('    "model.', '    "lm_head.')) for line in text.splitlines()) == len(names)
    code, _, err = run("verify", src, out)
    assert code == 0, err
    first = next(iter(rec["tensors"]))
    rec["tensors"][first] = [["model.embed_tokens.weight", 0.5]]
    (out / "moegrow.json").write_text(json.dumps(rec))
    code, stdout, stderr = run("verify", src, out)
    assert code != 0 and "tensor mapping differs" in stdout + stderr


def test_lazy_mapping_equals_dict(checkpoints):
    from moegrow.grow import plan_for
    from moegrow.source import open_source

    plan = plan_for(open_source(str(checkpoints["qwen2_moe"])), "grow", layers="2x", experts="2x", noise=0.01)
    whole = tensor_mapping(plan.tensors)
    lazy = TensorMapping(plan.tensors)
    assert dict(lazy.items()) == whole and len(lazy) == len(whole) and list(lazy) == list(whole)
    name = next(iter(whole))
    assert lazy[name] == whole[name]
    assert not mapping_differs(plan.tensors, whole)
    assert mapping_differs(plan.tensors, {**whole, name: [["x", 0.0]]})
    assert mapping_differs(plan.tensors, {k: v for k, v in whole.items() if k != name})


def test_write_json_streams_mappings(tmp_path):

    from collections.abc import Mapping

    class View(Mapping):
        def __init__(self, d):
            self.d = d

        def __getitem__(self, k):
            return self.d[k]

        def __iter__(self):
            return iter(self.d)

        def __len__(self):
            return len(self.d)

    entries = {"b.w": [["a", 0.0, 1.0, {"rows": [0, 2, 4]}]], 'q"uote': [["x", 0.01]]}
    for obj in ({"z": 1, "t": View(entries), "a": [1, 2]}, {"t": View({})}, {"t": View(entries), "u": View(entries)}):
        write_json(tmp_path / "r.json", obj)
        assert json.loads((tmp_path / "r.json").read_text()) == {k: dict(v) if isinstance(v, Mapping) else v
                                                                for k, v in obj.items()}


def test_header_text_equals_json_dumps():
    """The header built as text is byte for byte json.dumps of the whole dict (as before), and safetensors
    reads it."""
    entries = [("a.weight", "BF16", (2, 3), 12), ('odd "name" é', "F32", (), 4), ("empty", "I64", (0, 5), 0)]
    for meta in (None, {"format": "pt", "x": "y"}):
        head, offsets = header_bytes(entries, meta)
        expected = {"__metadata__": meta or {"format": "pt"}}
        pos = 0
        for name, dtype, shape, nbytes in entries:
            expected[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            pos += nbytes
        raw = json.dumps(expected, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        assert head == struct.pack("<Q", len(raw)) + raw and offsets == [0, 12, 16]
