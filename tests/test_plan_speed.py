"""Issue 12, item 2 (CPU per tensor): the fast paths give what the general ones give, and the provenance
record is read as a stream (moegrow.json_stream) with the same meaning as `json.loads`."""

from __future__ import annotations

import gc
import json
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moegrow import json_stream
from moegrow.grow import plan_for
from moegrow.plan import OutTensor, Part, _ordered, natural_key, natural_key_cached
from moegrow.provenance import mapping_differs, tensor_mapping
from moegrow.quant.plan import _copied_weight, _lower_weight, quantisation
from moegrow.source import open_source

from .conftest import run
from .test_quant import fp8_source  # noqa: F401 - the fixture

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(head=st.dictionaries(st.text(max_size=8).filter(lambda k: k != "tensors"), _JSON, max_size=4),
       entries=st.dictionaries(st.text(max_size=10), _JSON, max_size=8),
       where=st.integers(0, 4), indent=st.sampled_from([None, 0, 2]), chunk=st.sampled_from([1, 3, 64]))
def test_streamed_object_reads_as_json_loads(tmp_path_factory, head, entries, where, indent, chunk):
    """Any object, indented or not, the streamed member anywhere among the others, read through a buffer as
    small as one character: the same values as json.loads."""
    keys = list(head)
    keys.insert(min(where, len(keys)), "tensors")
    obj = {k: entries if k == "tensors" else head[k] for k in keys}
    path = tmp_path_factory.mktemp("js") / "r.json"
    path.write_text(json.dumps(obj, indent=indent))
    old = json_stream._CHUNK
    json_stream._CHUNK = chunk
    try:
        got = json_stream.read_object(path, "tensors")
        streamed = got.pop("tensors")
        assert got == head
        assert len(streamed) == len(entries) and list(streamed.items()) == list(entries.items())
        assert list(streamed.items()) == list(streamed.items())  # every pass reads the file again
    finally:
        json_stream._CHUNK = old


@pytest.mark.parametrize("text", ['{"a": 1, "tensors": {"x": [1, 2]', '{"tensors": {"x": 1}} extra', '{"a": 1,}',
                                  '{"tensors": {"x" 1}}', '{"a": 1e}', '{"tensors": {"x": 1}, "b": [1,]}'])
def test_streamed_object_refuses_what_json_loads_refuses(tmp_path, text):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    with pytest.raises(json.JSONDecodeError):
        list(json_stream.read_object(tmp_path / "r.json", "tensors")["tensors"].items())


def test_old_record_layout_verifies(checkpoints, tmp_path):
    """A record written whole with sorted keys (moegrow before the streamed record: the mapping in name order,
    mid-file) verifies; a changed, missing or repeated entry in it is still found."""
    src, out = checkpoints["qwen2_moe"], tmp_path / "o"
    assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--quiet")[0] == 0
    rec = json.loads((out / "moegrow.json").read_text())
    (out / "moegrow.json").write_text(json.dumps(rec, indent=2, sort_keys=True))
    code, _, err = run("verify", src, out)
    assert code == 0, err
    names = sorted(rec["tensors"])
    changed = dict(rec["tensors"], **{names[3]: rec["tensors"][names[4]]})
    dropped = {k: v for k, v in rec["tensors"].items() if k != names[3]}
    for tensors in (changed, dropped):
        (out / "moegrow.json").write_text(json.dumps({**rec, "tensors": tensors}, indent=2, sort_keys=True))
        code, stdout, stderr = run("verify", src, out)
        assert code != 0 and "tensor mapping differs" in stdout + stderr
    # a repeated entry (the count right, one name missing): json.loads keeps the last; the stream sees both
    text = json.dumps({**rec, "tensors": dropped}, indent=2, sort_keys=True)
    first = f'"{names[0]}": ' + json.dumps(rec["tensors"][names[0]])
    (out / "moegrow.json").write_text(text.replace(f'"{names[0]}": ', first + f',\n"{names[0]}": ', 1))
    code, stdout, stderr = run("verify", src, out)
    assert code != 0 and "tensor mapping differs" in stdout + stderr


def test_mapping_differs_in_any_order(checkpoints):
    plan = plan_for(open_source(str(checkpoints["qwen2_moe"])), "grow", layers="2x", experts="2x")
    whole = tensor_mapping(plan.tensors)
    assert not mapping_differs(plan.tensors, dict(sorted(whole.items())))
    assert not mapping_differs(plan.tensors, dict(reversed(whole.items())))
    a, b = list(whole)[:2]
    assert mapping_differs(plan.tensors, {**whole, a: whole[b], b: whole[a]})


def test_copied_weight_equals_lower_weight(fp8_source):  # noqa: F811
    """The fast path for fp8 weights copied whole gives the general lowering's tensors, field for field, for
    every weight of a checkpoint, under its own name and as an expert copy's."""
    src = open_source(str(fp8_source("ragged")))
    quant = quantisation(src.config, src.tensors)
    members: dict = {}
    plain: dict = {}
    for g in quant.groups.values():
        for name in (g.name, g.name.replace(".experts.0.", ".experts.9.")):
            view = OutTensor(name, "F32", g.shape, (Part(g.name),))
            fast, general = _copied_weight(view, quant, members), _lower_weight(view, quant)
            assert fast == general and [t.parts for t in fast] == [t.parts for t in general]
            # members' parts made once per weight, where the part is the default one (repr: 0, -0.0 are not 0.0)
            for part in (Part(g.name), Part(g.name, 0, 1), Part(g.name, -0.0), Part(g.name, 0.0, 1.0)):
                view = OutTensor(name, "F32", g.shape, (part,))
                shared, general = _copied_weight(view, quant, members, plain), _lower_weight(view, quant)
                assert repr(shared) == repr(general)
    assert len(members) == len(quant.groups) > 10


def test_gc_state_restored(checkpoints):
    """Planning pauses the cyclic collector and gives it back as it found it."""
    src = open_source(str(checkpoints["qwen2_moe"]))
    for enabled in (True, False):
        gc.enable() if enabled else gc.disable()
        try:
            plan_for(src, "grow", layers="2x", experts="2x")
            assert gc.isenabled() == enabled
        finally:
            gc.enable()


@given(st.lists(st.text(alphabet="ab.0123456789_", max_size=30), max_size=12))
def test_natural_key_as_before(names):
    """The split-based key equals the former one (digits as ints, the rest as strings), and the plan's
    order (`_ordered`, keys after the first number cached) is the order by it."""
    for name in names:
        assert natural_key(name) == tuple(int(s) if s.isdigit() else s for s in re.split(r"(\d+)", name))
    tensors = [OutTensor(n, "F32", (1,), (Part(n),)) for n in names]
    assert [t.name for t in _ordered(tensors)] == sorted(names, key=natural_key)
    tails: dict = {}
    assert all(natural_key_cached(n, tails) == natural_key(n) for n in names)


def test_nan_in_record_streams(tmp_path):
    """NaN, as json writes it (a recorded fill or noise could be one), reads back as json.loads reads it."""
    (tmp_path / "r.json").write_text('{"tensors": {"a": [["x", NaN]]}, "b": Infinity}')
    got = json_stream.read_object(tmp_path / "r.json", "tensors")
    assert math.isinf(got["b"]) and math.isnan(dict(got["tensors"].items())["a"][0][1])


def _header_file(path, header: object, data: bytes, pad: bytes = b"") -> None:
    raw = (json.dumps(header) if not isinstance(header, str) else header).encode() + pad
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@settings(max_examples=120, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), max_size=6), meta=st.integers(0, 7), order=st.randoms(),
       indent=st.sampled_from([None, 0, 2]), pad=st.sampled_from([b"", b"  ", b"\n\t "]))
def test_streamed_header_reads_as_the_whole_parse(tmp_path_factory, sizes, meta, order, indent, pad):
    """Any valid header, entries in any order (zero-size tensors included), indented or not, __metadata__
    anywhere: the entry-by-entry parse gives what `json.loads` and the same checks give."""
    from moegrow import io as mio

    entries, pos = [], 0
    for i, n in enumerate(sizes):
        entries.append((f"t.{i}", {"dtype": "F32", "shape": [n], "data_offsets": [pos, pos + 4 * n]}))
        pos += 4 * n
    order.shuffle(entries)
    entries.insert(min(meta, len(entries)), ("__metadata__", {"format": "pt"}))
    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    _header_file(path, "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, indent=indent)}" for k, v in entries) + "}",
                 bytes(pos), pad)
    raw = path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")]
    base = 8 + len(raw)
    assert mio._streamed_header(path, raw, base, pos) == mio._whole_header(path, raw, base, pos)
    mio.STREAMED_HEADER, old = 0, mio.STREAMED_HEADER
    try:
        tensors, metadata = mio.read_header(path)
    finally:
        mio.STREAMED_HEADER = old
    assert metadata == {"format": "pt"} and set(tensors) == {n for n, _ in entries if n != "__metadata__"}


@pytest.mark.parametrize("header", [
    '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},}',  # a trailing comma
    '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}} x',  # extra data
    '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": [1]}',
    '{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "__metadata__": 5}',
    '{"a": 1, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',  # the last of a duplicate counts
    '[1, 2]', '{"a" {}}', '{"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}', '{1: 2}', ''])
def test_streamed_header_errors_are_the_whole_parse_s(tmp_path, header, monkeypatch):
    """A header the entry-by-entry parse does not take is parsed whole: the same result or the same error."""
    from moegrow import io as mio
    from moegrow.errors import SourceError

    monkeypatch.setattr(mio, "STREAMED_HEADER", 0)  # every header entry by entry first

    path = tmp_path / "x.safetensors"
    _header_file(path, header, bytes(4))
    raw = header.encode()
    try:
        want = mio._whole_header(path, raw, 8 + len(raw), 4)
    except SourceError as e:
        with pytest.raises(SourceError) as got:
            mio.read_header(path)
        assert str(got.value) == str(e)
    else:
        assert mio.read_header(path) == (want[0], {str(k): str(v) for k, v in want[1].items()})


def test_copy_runs_merge_adjacent_ranges(checkpoints, tmp_path, monkeypatch):
    """Byte copies go in runs into one file, ranges adjacent in source and output as one call: fewer calls than
    tensors, and the bytes of one call per tensor (the growth at --threads 1 and 3, against --max-shard-size 1
    tensor per call)."""
    import os

    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    from moegrow.io import read_index

    src = checkpoints["mixtral"]
    outs = {}
    for threads in (1, 3):
        calls.clear()
        out = tmp_path / f"t{threads}"
        assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--threads", threads, "--quiet")[0] == 0
        written = read_index(out)
        assert 0 < len(calls) < len(written) and sum(calls) == sum(t.nbytes for t in written.values())
        outs[threads] = (out / "model.safetensors").read_bytes()
    assert outs[1] == outs[3]
    # one call per tensor: each tensor alone in its file
    out = tmp_path / "one"
    assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--max-shard-size", "1B", "--quiet")[0] == 0
    mine, each = read_index(tmp_path / "t1"), read_index(out)
    assert set(mine) == set(each)
    with open(tmp_path / "t1" / "model.safetensors", "rb") as a:
        for name, t in mine.items():
            e = each[name]
            assert os.pread(a.fileno(), t.nbytes, t.start) == e.path.read_bytes()[e.start:e.end], name


@pytest.mark.parametrize("kind, args", [
    ("qwen2_moe", dict(layers="2x", experts="2x", noise=0.01, router_noise=0.02, seed=3)),
    ("qwen2_moe", dict(layers="2x", experts="2x", depth_init="identity")),
    ("qwen2_moe", dict(layers="2x", experts="2x", noise=0.01, noise_mode="relative", reinit=0.25)),
    ("deepseek_v3", dict(layers="2x", experts="2x", dtype="bfloat16")),
    ("deepseek_v3", dict(layers="2x", experts="2x", noise=1e-300)),
    ("mixtral", dict(layers="2x", experts="2x", noise=0, router_noise=1)),  # integers, as the API takes them
])
def test_record_text_fast_path_is_json_dumps(checkpoints, kind, args):
    """The record's entries as written (`TensorMapping.json_items`: plain parts by a shortcut) are the compact
    `json.dumps` of `tensor_mapping`'s, entry for entry, whatever the parts hold."""
    from moegrow.provenance import TensorMapping

    plan = plan_for(open_source(str(checkpoints[kind])), "grow", **args)
    compact = json.JSONEncoder(separators=(",", ":")).encode
    got = list(TensorMapping(plan.tensors).json_items(compact))
    want = [(n, json.dumps(v, separators=(",", ":"))) for n, v in tensor_mapping(plan.tensors).items()]
    assert got == want and len(got) == len(plan.tensors)


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(["F64", "F32", "F16", "BF16"]), data=st.binary(max_size=64),
       special=st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf"), 65504.0, 3.0e38, 1.0e308, -0.0,
                                         6.1e-5, 1e-45, 0.5]), max_size=3), where=st.integers(0, 7))
def test_finite_check_is_torchs(dtype, data, special, where):
    """verify's finiteness check on the bytes (torch only for values that may be NaN or Inf) says what
    `torch.isfinite` says, for random bytes and for values at the edges of each dtype."""
    import torch

    from moegrow.noise import torch_dtype
    from moegrow.verify import _finite

    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}[dtype]
    values = torch.frombuffer(bytearray(data[:len(data) // size * size]) or bytearray(size), dtype=torch_dtype(dtype))
    if special:
        extra = torch.tensor(special, dtype=torch.float64).to(torch_dtype(dtype))
        k = min(where, values.numel())
        values = torch.cat([values[:k], extra, values[k:]])
    raw = values.numpy().tobytes() if dtype != "BF16" else values.view(torch.int16).numpy().tobytes()
    assert _finite(raw, dtype) == bool(torch.isfinite(values).all())


def test_verify_reads_copies_in_runs_and_names_a_changed_one(checkpoints, tmp_path, monkeypatch):
    """verify reads neighbouring byte copies as one span (fewer reads than tensors); a byte changed in place
    inside a run is reported for its tensor alone, as a tensor-by-tensor check reports it."""
    import os

    from moegrow.io import read_index

    src, out = checkpoints["mixtral"], tmp_path / "o"
    assert run("grow", src, out, "--layers", "2x", "--experts", "2x", "--quiet")[0] == 0
    reads = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    code, _, err = run("verify", src, out)
    tensors = read_index(out)
    assert code == 0 and 0 < len(reads) < len(tensors), (len(reads), len(tensors), err)
    # a byte in the middle of the file: inside a run (neither first nor last tensor of the file)
    ordered = sorted(tensors.values(), key=lambda t: t.start)
    victim = next(t for t in ordered[len(ordered) // 2:] if t.nbytes > 4)
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(victim.start + 2)
        byte = f.read(1)
        f.seek(victim.start + 2)
        f.write(bytes([byte[0] ^ 0x01]))
    origin = json.loads((out / "moegrow.json").read_text())["tensors"][victim.name][0][0]
    code, stdout, _ = run("verify", src, out, "--json")
    assert code == 1 and json.loads(stdout)["problems"] == [f"{victim.name}: part 0 differs from its source {origin}"]
