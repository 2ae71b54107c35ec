"""The failure-handling contract (docs/errors.md).

Every failure ends with one line on stderr (`moegrow: error: ...`) naming the file and the
problem, exit code 2, no traceback, the source byte-identical, and neither OUTPUT nor a
temporary folder left behind.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import shutil
import struct
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moegrow.errors import SourceError

from .conftest import build_model, run, save

# -- helpers ------------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`: file -> sha256, link -> target, folder -> 'dir'."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moegrow-" in p.name)


def fails(args: list, source: Path | None, output: Path | None, *needles: str) -> str:
    """Run the CLI, check the whole contract for a failure, return the error line."""
    before = snapshot(source) if source is not None and source.is_dir() else None
    out_before = snapshot(output) if output is not None and output.is_dir() else None
    code, stdout, err = run(*args)
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("moegrow: error: "), err
    assert "Traceback" not in err and "internal error" not in line, err
    for needle in needles:
        assert needle in line, (needle, line)
    assert stdout == ""
    if before is not None:
        assert snapshot(source) == before, "the source changed"
    if output is not None:
        if out_before is None:
            assert not output.exists() and not output.is_symlink(), "OUTPUT was created"
        else:
            assert snapshot(output) == out_before, "an existing OUTPUT changed"
        assert leftovers(output.parent) == [], leftovers(output.parent)
    return line


COMMANDS = {
    "inspect": lambda src, out: ["inspect", src],
    "grow-width": lambda src, out: ["grow-width", src, out, "--experts", "2x", "--quiet"],
    "grow": lambda src, out: ["grow", src, out, "--layers", "2x", "--experts", "2x", "--noise", "0.01",
                              "--quiet"],
}


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_st(path: Path, header: dict | bytes, data: bytes) -> None:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


def edit_header(path: Path, edit) -> None:
    header, data = read_st(path)
    edit(header)
    write_st(path, header, data)


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


def first_expert(header: dict) -> str:
    return next(k for k in tensor_names(header) if ".experts." in k)


def _overlap(h: dict) -> None:
    a, b = [k for k in tensor_names(h) if ".experts." in k][:2]  # same shape, same size
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


def _out_of_bounds(h: dict) -> None:
    name = first_expert(h)
    lo, hi = h[name]["data_offsets"]
    end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
    h[name]["data_offsets"] = [end + 8, end + 8 + hi - lo]


def _set(field: str, value):
    def edit(h: dict) -> None:
        h[first_expert(h)][field] = value
    return edit


def _shape_plus_one(h: dict) -> None:
    name = first_expert(h)
    h[name]["shape"] = [h[name]["shape"][0] + 1, *h[name]["shape"][1:]]


def _raw(transform):
    def apply(path: Path) -> None:
        path.write_bytes(transform(path.read_bytes()))
    return apply


def _header_len(raw: bytes) -> int:
    return struct.unpack("<Q", raw[:8])[0]


def _not_json(raw: bytes) -> bytes:
    n = _header_len(raw)
    return raw[:8] + b"{" + b"x" * (n - 1) + raw[8 + n:]


def _not_utf8(raw: bytes) -> bytes:
    n = _header_len(raw)
    return raw[:8] + b'{"\xff\xfe' + raw[12:8 + n] + raw[8 + n:]


SAFETENSORS_CASES = {
    "truncated-to-5-bytes": (_raw(lambda r: r[:5]), "truncated safetensors file"),
    "truncated-in-header": (_raw(lambda r: r[:100]), "exceeds the file size"),
    "truncated-data": (_raw(lambda r: r[:-100]), "out of bounds"),
    "header-length-huge": (_raw(lambda r: struct.pack("<Q", 2**63) + r[8:]), "exceeds the file size"),
    "header-length-past-eof": (_raw(lambda r: struct.pack("<Q", len(r)) + r[8:]), "exceeds the file size"),
    "header-not-json": (_raw(_not_json), "not valid JSON"),
    "header-not-utf8": (_raw(_not_utf8), "not valid JSON"),
    "header-not-object": (lambda p: write_st(p, b"[1, 2]", b""), "not a JSON object"),
    "offsets-out-of-bounds": (lambda p: edit_header(p, _out_of_bounds), "out of bounds"),
    "offsets-overlap": (lambda p: edit_header(p, _overlap), "overlap"),
    "offsets-leave-a-gap": (lambda p: edit_header(p, lambda h: h.pop(first_expert(h))), "belong to no tensor"),
    "trailing-bytes": (_raw(lambda r: r + bytes(8)), "8 bytes after the last tensor belong to no tensor"),
    "offsets-not-integers": (lambda p: edit_header(p, _set("data_offsets", [True, 4])), "invalid data_offsets"),
    "shape-mismatch": (lambda p: edit_header(p, _shape_plus_one), "do not match dtype"),
    "dtype-mismatch": (lambda p: edit_header(p, _set("dtype", "F16")), "do not match dtype F16"),
    "dtype-unknown": (lambda p: edit_header(p, _set("dtype", "Q9")), "unknown dtype"),
    "dtype-not-a-string": (lambda p: edit_header(p, _set("dtype", ["F32"])), "unknown dtype"),
    "shape-not-a-list": (lambda p: edit_header(p, _set("shape", "4x4")), "invalid shape"),
    "entry-not-an-object": (lambda p: edit_header(p, lambda h: h.update({first_expert(h): 3})),
                            "not a JSON object"),
}


@pytest.fixture(scope="session")
def sharded(tmp_path_factory) -> Path:
    """The tiny mixtral saved in five shards with an index."""
    return save(build_model("mixtral"), tmp_path_factory.mktemp("sharded") / "mixtral", max_shard_size="20KB")


@pytest.fixture
def mixtral(checkpoints, ckpt_copy) -> Path:
    return ckpt_copy(checkpoints["mixtral"])


# -- safetensors files ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_corrupt_safetensors(case, command, mixtral, tmp_path):
    corrupt, needle = SAFETENSORS_CASES[case]
    corrupt(mixtral / "model.safetensors")
    out = tmp_path / "out"
    fails(COMMANDS[command](mixtral, out), mixtral, out, str(mixtral / "model.safetensors"), needle)


def test_corrupt_shard_of_sharded_checkpoint(sharded, ckpt_copy, tmp_path):
    src = ckpt_copy(sharded)
    shard = src / "model-00003-of-00005.safetensors"
    shard.write_bytes(shard.read_bytes()[:-50])
    fails(["grow-width", src, tmp_path / "out", "--experts", "2x"], src, tmp_path / "out",
          str(shard), "out of bounds")


# -- the index of a sharded checkpoint -----------------------------------------------------------

SHARD2 = "model-00002-of-00005.safetensors"


def _edit_index(src: Path, edit) -> None:
    path = src / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"], index)
    path.write_text(json.dumps(index))


def _remap(src: Path, old: str, new: str) -> None:
    _edit_index(src, lambda wm, _: wm.update({k: new for k, v in wm.items() if v == old}))


def _missing_shard(src: Path, tmp: Path) -> None:
    (src / SHARD2).unlink()


def _dotdot(src: Path, tmp: Path) -> None:
    shutil.copy(src / SHARD2, src.parent / SHARD2)
    _remap(src, SHARD2, "../" + SHARD2)


def _absolute(src: Path, tmp: Path) -> None:
    outside = tmp / "elsewhere"
    outside.mkdir()
    shutil.copy(src / SHARD2, outside / SHARD2)
    _remap(src, SHARD2, str(outside / SHARD2))


def _symlink_outside(src: Path, tmp: Path) -> None:
    outside = tmp / "elsewhere"
    outside.mkdir()
    shutil.move(src / SHARD2, outside / SHARD2)
    (src / SHARD2).symlink_to(outside / SHARD2)


def _symlink_loop(src: Path, tmp: Path) -> None:
    (src / SHARD2).unlink()
    (src / SHARD2).symlink_to(src / "loop")
    (src / "loop").symlink_to(src / SHARD2)


def _not_in_shard(src: Path, tmp: Path) -> None:
    _edit_index(src, lambda wm, _: wm.update({"model.layers.0.ghost.weight": SHARD2}))


def _in_two_shards(src: Path, tmp: Path) -> None:
    shutil.copy(src / SHARD2, src / "model-extra.safetensors")
    header, _ = read_st(src / SHARD2)
    name = tensor_names(header)[0]
    _edit_index(src, lambda wm, _: wm.update({name: "model-extra.safetensors"}))


def _listed_in_other_shard(src: Path, tmp: Path) -> None:
    header, _ = read_st(src / SHARD2)
    name = tensor_names(header)[0]
    _edit_index(src, lambda wm, _: wm.update({name: "model-00001-of-00005.safetensors"}))


def _not_in_index(src: Path, tmp: Path) -> None:
    header, _ = read_st(src / SHARD2)
    name = tensor_names(header)[0]
    _edit_index(src, lambda wm, _: wm.pop(name))


def _shard_name_not_a_string(src: Path, tmp: Path) -> None:
    _edit_index(src, lambda wm, _: wm.update({next(iter(wm)): ["model.safetensors"]}))


def _shard_name_nul(src: Path, tmp: Path) -> None:
    _edit_index(src, lambda wm, _: wm.update({next(iter(wm)): "model\0.safetensors"}))


def _index_not_json(src: Path, tmp: Path) -> None:
    (src / "model.safetensors.index.json").write_text('{"weight_map": {')


def _index_without_weight_map(src: Path, tmp: Path) -> None:
    (src / "model.safetensors.index.json").write_text('{"metadata": {}}')


INDEX_CASES = {
    "missing-shard": (_missing_shard, [SHARD2, "does not exist"]),
    "dotdot-path": (_dotdot, ["../" + SHARD2, "escapes the checkpoint folder"]),
    "absolute-path": (_absolute, ["escapes the checkpoint folder"]),
    "symlink-outside": (_symlink_outside, [SHARD2, "links outside the checkpoint folder"]),
    "symlink-loop": (_symlink_loop, [SHARD2, "cannot be resolved"]),
    "tensor-not-in-its-shard": (_not_in_shard, ["model.layers.0.ghost.weight", "is not in its shard"]),
    "tensor-in-two-shards": (_in_two_shards, ["model-extra.safetensors", "is also in", SHARD2]),
    "tensor-listed-in-another-shard": (_listed_in_other_shard, ["but stored in", SHARD2]),
    "tensor-not-in-index": (_not_in_index, ["not in the index"]),
    "shard-name-not-a-string": (_shard_name_not_a_string, ["is not a string"]),
    "shard-name-with-nul": (_shard_name_nul, ["invalid shard name"]),
    "index-not-json": (_index_not_json, ["model.safetensors.index.json", "not valid JSON"]),
    "index-without-weight-map": (_index_without_weight_map, ["model.safetensors.index.json",
                                                             "weight_map"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_broken_index(case, command, sharded, ckpt_copy, tmp_path):
    src = ckpt_copy(sharded)
    corrupt, needles = INDEX_CASES[case]
    corrupt(src, tmp_path)
    out = tmp_path / "out"
    fails(COMMANDS[command](src, out), src, out, *needles)


def test_sharded_checkpoint_grows(sharded, tmp_path):
    """The fixture itself is valid: the failures above come from the corruption."""
    code, _, err = run("grow-width", sharded, tmp_path / "out", "--experts", "2x", "--quiet")
    assert code == 0, err


# -- config.json and the model's family ----------------------------------------------------------


def _config(edit):
    def apply(src: Path) -> None:
        path = src / "config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config))
    return apply


def _text(text: str):
    return lambda src: (src / "config.json").write_text(text)


CONFIG_CASES = {
    "missing": (lambda src: (src / "config.json").unlink(), ["config.json", "missing"]),
    "not-json": (_text('{"model_type": "mixtral",'), ["config.json", "not valid JSON"]),
    "not-utf8": (lambda src: (src / "config.json").write_bytes(b'{"a": "\xff"}'), ["not valid JSON"]),
    "not-an-object": (_text("[1, 2]"), ["config.json", "not a JSON object"]),
    "deeply-nested": (_text("[" * 100000), ["config.json", "not valid JSON"]),
    "a-folder": (lambda src: ((src / "config.json").unlink(), (src / "config.json").mkdir()),
                 ["config.json", "not a file"]),
    "more-experts-than-tensors": (_config(lambda c: c.update(num_local_experts=8)),
                                  ["config.json", "says 8 experts"]),
    "fewer-experts-than-tensors": (_config(lambda c: c.update(num_local_experts=2)),
                                   ["config.json", "says 2 experts"]),
    "more-layers-than-tensors": (_config(lambda c: c.update(num_hidden_layers=4)),
                                 ["config.json", "says 4 layers", "lack layer 3"]),
    "fewer-layers-than-tensors": (_config(lambda c: c.update(num_hidden_layers=2)),
                                  ["config.json", "says 2 layers", "also have layer 2"]),
    "huge-layer-count": (_config(lambda c: c.update(num_hidden_layers=10**15)), ["says 1000000000000000 layers"]),
    "expert-count-not-an-integer": (_config(lambda c: c.update(num_local_experts="four")),
                                    ["num_local_experts", "must be a positive integer"]),
    "layer-count-zero": (_config(lambda c: c.update(num_hidden_layers=0)),
                         ["num_hidden_layers", "must be a positive integer"]),
    "top-k-above-experts": (_config(lambda c: c.update(num_experts_per_tok=5)), ["num_experts_per_tok=5"]),
    "no-expert-count": (_config(lambda c: c.pop("num_local_experts")), ["no expert count key"]),
    "no-model-type": (_config(lambda c: c.pop("model_type")), ["config.json", "no model_type"]),
    "unknown-model-type": (_config(lambda c: c.update(model_type="frobnicator_moe")),
                           ["'frobnicator_moe' is not a supported MoE family"]),
    "dense-model-type": (_config(lambda c: c.update(model_type="llama")),
                         ["'llama' is a dense model, not MoE", "moegrow upcycle", "mixtral"]),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(case, command, mixtral, tmp_path):
    corrupt, needles = CONFIG_CASES[case]
    corrupt(mixtral)
    out = tmp_path / "out"
    fails(COMMANDS[command](mixtral, out), mixtral, out, *needles)


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return save(model, tmp_path_factory.mktemp("dense") / "llama")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_dense_checkpoint_is_refused(command, llama, tmp_path):
    out = tmp_path / "out"
    fails(COMMANDS[command](llama, out), llama, out, str(llama), "'llama' is a dense model, not MoE", "moegrow upcycle")


def test_dense_tensors_under_a_moe_model_type(llama, ckpt_copy, tmp_path):
    src = ckpt_copy(llama)
    _config(lambda c: c.update(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2))(src)
    fails(["grow-width", src, tmp_path / "out", "--experts", "2x"], src, tmp_path / "out",
          "no expert tensors found")


def test_pickle_only_checkpoint(checkpoints, tmp_path):
    import torch

    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(checkpoints["mixtral"] / "config.json", src / "config.json")
    torch.save({"w": torch.zeros(2)}, src / "pytorch_model.bin")
    for command in sorted(COMMANDS):
        fails(COMMANDS[command](src, tmp_path / "out"), src, tmp_path / "out", "pytorch_model.bin",
              "never loads pickle")


def test_missing_source_and_file_source(tmp_path):
    fails(["grow-width", tmp_path / "nope", tmp_path / "out", "--experts", "2x"], None, tmp_path / "out",
          "no such folder")
    (tmp_path / "file").write_text("x")
    fails(["inspect", tmp_path / "file"], None, None, str(tmp_path / "file"), "not a folder")
    fails(["inspect", tmp_path / "empty"], None, None, "no such folder")
    (tmp_path / "empty").mkdir()
    fails(["inspect", tmp_path / "empty"], tmp_path / "empty", None, "config.json", "missing")


# -- options ---------------------------------------------------------------------------------------

OPTION_CASES = {
    "experts-not-a-multiple": (["grow-width", "--experts", "6"], ["not a multiple of the source's 4"]),
    "experts-not-a-number": (["grow-width", "--experts", "lots"], ["--experts must be"]),
    "experts-zero": (["grow-width", "--experts", "0x"], ["only growth is supported"]),
    "experts-missing": (["grow-width"], ["give --experts"]),
    "layers-fewer": (["grow-depth", "--layers", "2"], ["fewer than the source's 3"]),
    "layers-not-a-number": (["grow-depth", "--layers", "deep"], ["--layers must be"]),
    "layer-map-nonexistent-layer": (["grow-depth", "--layer-map", "0,1,2,7"], ["names layer 7",
                                                                               "layers 0..2"]),
    "layer-map-negative-layer": (["grow", "--layer-map=0,-1,2", "--experts", "2x"], ["names layer -1"]),
    "layer-map-not-numbers": (["grow-depth", "--layer-map", "a,b,c"], ["--layer-map must be"]),
    "layer-map-too-short": (["grow-depth", "--layer-map", "0,1"], ["fewer than the source's 3"]),
    "method-unknown": (["grow-depth", "--layers", "2x", "--method", "zigzag"], ["--method"]),
    "noise-nan": (["grow-width", "--experts", "2x", "--noise", "nan"], ["--noise", "finite"]),
    "noise-negative": (["grow-width", "--experts", "2x", "--noise=-0.1"], ["--noise", ">= 0"]),
    "router-noise-inf": (["grow-width", "--experts", "2x", "--router-noise", "inf"], ["--router-noise"]),
    "top-k-zero": (["grow-width", "--experts", "2x", "--top-k", "0"], ["--top-k must be"]),
    "top-k-too-large": (["grow-width", "--experts", "2x", "--top-k", "9"], ["out of range for 8 experts"]),
    "max-shard-size-unreadable": (["grow-width", "--experts", "2x", "--max-shard-size", "big"],
                                  ["--max-shard-size"]),
    "device-unknown": (["grow-width", "--experts", "2x", "--device", "tpu"], ["--device"]),
    "threads-zero": (["grow-width", "--experts", "2x", "--threads", "0"], ["--threads"]),
    "unknown-option": (["grow-width", "--experts", "2x", "--frobnicate"], ["--frobnicate"]),
    "revision-on-a-folder": (["grow-width", "--experts", "2x", "--revision", "main"], ["--revision"]),
    "strict-not-a-flag-value": (["grow-width", "--experts", "2x", "--strict=yes"], ["--strict"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_options(case, checkpoints, tmp_path):
    (command, *options), needles = OPTION_CASES[case]
    src, out = checkpoints["mixtral"], tmp_path / "out"
    fails([command, src, out, *options], src, out, *needles)


def test_missing_arguments_and_commands(checkpoints):
    fails(["grow-width"], None, None, "Missing argument")
    fails(["frobnicate"], None, None, "frobnicate")
    code, _, err = run()  # no command at all: the help, exit 2, no traceback
    assert code == 2 and "Usage:" in err and "Traceback" not in err


# -- OUTPUT ----------------------------------------------------------------------------------------


def test_output_equal_inside_or_containing_source(mixtral, tmp_path):
    for output in (mixtral, mixtral / "grown", tmp_path, mixtral / "sub" / ".." / "x"):
        args = ["grow-width", mixtral, output, "--experts", "2x"]
        fails(args, mixtral, None, "must not be the source folder, inside it or contain it")
        fails([*args, "--force"], mixtral, None, "must not be the source folder")
        assert leftovers(mixtral) == [] and leftovers(tmp_path) == []
    link = tmp_path / "alias"
    link.symlink_to(mixtral)
    fails(["grow-width", mixtral, link, "--experts", "2x", "--force"], mixtral, None, "must not be the source")
    assert link.is_symlink()


def test_output_exists_without_force(checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    fails(["grow-width", src, out, "--experts", "2x"], src, out, str(out), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("mine")
    fails(["grow-width", src, file, "--experts", "2x"], src, None, "already exists")
    fails(["grow-width", src, file, "--experts", "2x", "--force"], src, None, "is not a folder")
    assert file.read_text() == "mine"
    # --force replaces it, and only it
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--force", "--quiet")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "moegrow.json").is_file()
    assert leftovers(tmp_path) == []


def test_output_parent_missing(checkpoints, tmp_path):
    out = tmp_path / "no" / "such" / "out"
    fails(["grow-width", checkpoints["mixtral"], out, "--experts", "2x"], checkpoints["mixtral"], None,
          "parent folder of OUTPUT does not exist")
    assert not (tmp_path / "no").exists()


def test_output_parent_not_writable(checkpoints, tmp_path, monkeypatch):
    # The tests run as root, for whom every folder is writable: inject the refusal.
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == tmp_path else real(p, mode))
    out = tmp_path / "out"
    fails(["grow-width", checkpoints["mixtral"], out, "--experts", "2x"], checkpoints["mixtral"], out,
          str(tmp_path), "not writable")


def test_output_folder_cannot_be_created(checkpoints, tmp_path, monkeypatch):
    real = Path.mkdir

    def mkdir(self, *args, **kw):
        if self.parent == tmp_path and ".moegrow-partial-" in self.name:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *args, **kw)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    out = tmp_path / "out"
    fails(["grow-width", checkpoints["mixtral"], out, "--experts", "2x"], checkpoints["mixtral"], out,
          str(tmp_path), "cannot create", "Read-only file system")


def _fail_after(real, after: int, err: int = errno.ENOSPC):
    """`real`, raising OSError(err) from its (after + 1)-th call on (thread-safe)."""
    lock = threading.Lock()
    calls = [0]

    def fake(*args, **kw):
        with lock:
            calls[0] += 1
            n = calls[0]
        if n > after:
            raise OSError(err, os.strerror(err))
        return real(*args, **kw)
    return fake


@pytest.mark.parametrize("noise", [0.0, 0.01])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("after", [0, 5, 15])  # 5 headers, then 20 copies (adjacent ranges merged) at noise 0
def test_disk_full_while_writing_shards(after, threads, noise, checkpoints, tmp_path, monkeypatch):
    # Both write paths: the kernel copy, and pwrite (headers, noised tensors, the fallback copy).
    monkeypatch.setattr(os, "copy_file_range", _fail_after(os.copy_file_range, after))
    monkeypatch.setattr(os, "pwrite", _fail_after(os.pwrite, after))
    src, out = checkpoints["qwen2_moe"], tmp_path / "out"
    fails(["grow", src, out, "--layers", "2x", "--experts", "2x", "--noise", noise, "--threads", threads,
           "--max-shard-size", "30KB"], src, out, str(out), "write failed", "No space left on device")


@pytest.mark.parametrize("target", ["write_json", "copyfile", "fsync", "rename"])
def test_disk_full_after_the_shards(target, checkpoints, tmp_path, monkeypatch):
    from moegrow import execute

    owner = {"write_json": execute, "copyfile": shutil, "fsync": os, "rename": os}[target]
    monkeypatch.setattr(owner, target, _fail_after(getattr(owner, target), 0))
    if target == "rename":  # the final rename is renameat2 where the platform has it
        monkeypatch.setattr(execute, "_rename_flags", _fail_after(execute._rename_flags, 0))
    src, out = checkpoints["mixtral"], tmp_path / "out"
    fails(["grow-width", src, out, "--experts", "2x"], src, out, str(out), "No space left on device")


def test_failed_force_keeps_the_old_output(checkpoints, tmp_path, monkeypatch):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--quiet")[0] == 0
    monkeypatch.setattr(os, "copy_file_range", _fail_after(os.copy_file_range, 3))
    monkeypatch.setattr(os, "pwrite", _fail_after(os.pwrite, 3))
    fails(["grow-width", src, out, "--experts", "2x", "--force"], src, out, "No space left on device")
    assert json.loads((out / "moegrow.json").read_text())["operation"] == "grow-depth"


def test_unexpected_error_is_one_line_and_cleaned_up(checkpoints, tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("something\nunexpected")

    monkeypatch.setattr("moegrow.execute.write_json", boom)
    src, out = checkpoints["mixtral"], tmp_path / "out"
    code, _, err = run("grow-width", src, out, "--experts", "2x")
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("moegrow: error: internal error: RuntimeError: something\\nunexpected"), err
    assert "--debug" in err and not out.exists() and leftovers(tmp_path) == []


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(SourceError, match="no such folder"):
        run("--debug", "inspect", tmp_path / "nope")
    fails(["inspect", tmp_path / "nope"], None, None, "no such folder")  # and not sticky


def test_stale_partials_are_cleaned(checkpoints, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    out = tmp_path / "out"
    stale = tmp_path / f".out.moegrow-partial-{dead}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    alive = tmp_path / f".out.moegrow-partial-{os.getppid()}"  # a live process: left alone
    alive.mkdir()
    other = tmp_path / f".other.moegrow-partial-{dead}"  # another OUTPUT's: left alone
    other.mkdir()
    code, _, err = run("grow-width", checkpoints["mixtral"], out, "--experts", "2x", "--quiet")
    assert code == 0, err
    assert not stale.exists() and alive.exists() and other.exists()


def test_killed_force_run_gets_its_old_output_back(checkpoints, tmp_path):
    """A --force run killed between its two renames left OUTPUT moved aside: the next run puts it
    back (and so refuses to replace it without --force)."""
    src, out = checkpoints["mixtral"], tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--quiet")[0] == 0
    moved = tmp_path / ".out.moegrow-old-999999999"
    out.rename(moved)
    (tmp_path / ".out.moegrow-partial-999999999").mkdir()
    fails(["grow-width", src, out, "--experts", "2x"], src, None, "already exists")
    assert json.loads((out / "moegrow.json").read_text())["operation"] == "grow-depth"
    assert leftovers(tmp_path) == []


# -- NaN and Inf in the source --------------------------------------------------------------------


@pytest.fixture
def poisoned(mixtral) -> tuple[Path, str]:
    """The mixtral copy with a NaN and an Inf in one expert tensor (a valid file otherwise)."""
    path = mixtral / "model.safetensors"
    header, data = read_st(path)
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    lo, _ = header[name]["data_offsets"]
    data = bytearray(data)
    data[lo:lo + 8] = struct.pack("<ff", float("nan"), float("-inf"))
    write_st(path, header, bytes(data))
    return mixtral, name


def test_nonfinite_source_warns_by_default(poisoned, tmp_path):
    src, name = poisoned
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--noise", "0.01", "--quiet")
    assert code == 0, err
    assert f"warning: {src / 'model.safetensors'}: tensor {name!r} has 2 NaN/Inf value(s)" in err, err
    assert "--strict" in err
    code, out, err = run("grow-width", src, tmp_path / "out2", "--experts", "2x", "--noise", "0.01",
                         "--quiet", "--json")
    assert code == 0 and any("NaN/Inf" in w for w in json.loads(out)["warnings"]), err
    # zero noise copies bytes without reading them into Python: no check, no warning
    code, _, err = run("grow-width", src, tmp_path / "out3", "--experts", "2x", "--quiet")
    assert code == 0 and err == "", err
    assert run("verify", src, tmp_path / "out3")[0] == 1  # verify always looks


@pytest.mark.parametrize("args", [
    ["grow-width", "--experts", "2x"],
    ["grow-width", "--experts", "2x", "--noise", "0.01"],
    ["grow-depth", "--layers", "2x"],
    ["grow", "--layers", "4", "--experts", "2x"],
    ["grow-width", "--experts", "2x", "--dry-run"],
])
def test_nonfinite_source_fails_with_strict(args, poisoned, tmp_path):
    src, name = poisoned
    command, *options = args
    fails([command, src, tmp_path / "out", *options, "--strict"], src, tmp_path / "out",
          str(src / "model.safetensors"), repr(name), "2 NaN/Inf", "--strict")


def test_strict_passes_a_clean_source(checkpoints, tmp_path):
    code, _, err = run("grow", checkpoints["deepseek_v3"], tmp_path / "out", "--layers", "2x", "--experts", "2x",
                       "--strict", "--quiet")
    assert code == 0, err
    assert run("verify", checkpoints["deepseek_v3"], tmp_path / "out")[0] == 0


def test_strict_checks_output_before_reading(checkpoints, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    fails(["grow-width", checkpoints["mixtral"], out, "--experts", "2x", "--strict"], checkpoints["mixtral"],
          out, "already exists")


# -- verify's own inputs ---------------------------------------------------------------------------


def test_verify_bad_inputs(checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    fails(["verify", src, out], src, None, "moegrow.json", "missing")
    assert run("grow-width", src, out, "--experts", "2x", "--quiet")[0] == 0
    record = json.loads((out / "moegrow.json").read_text())
    record["growth"]["seed"] = "seven"
    (out / "moegrow.json").write_text(json.dumps(record))
    fails(["verify", src, out], src, None, "moegrow.json", "not a valid moegrow provenance record", "seed")
    (out / "moegrow.json").write_text("{")
    fails(["verify", src, out], src, None, "moegrow.json", "not valid JSON")
    record["growth"]["seed"] = 0
    record["tensors"]["lm_head.weight"] = None
    (out / "moegrow.json").write_text(json.dumps(record))
    fails(["verify", src, out], src, None, "moegrow.json", '"tensors" is not a mapping')
    depth = tmp_path / "depth"
    assert run("grow-depth", src, depth, "--layers", "2x", "--quiet")[0] == 0
    record = json.loads((depth / "moegrow.json").read_text())
    record["growth"]["layer_map"] = [0, 0, 1, 1, 2, 9]
    (depth / "moegrow.json").write_text(json.dumps(record))
    fails(["verify", src, depth], src, None, "names layer 9")


# -- property: random corruption never breaks the contract ------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 12) | st.integers() | st.floats() | st.text(max_size=6)
    | st.sampled_from(["F32", "F16", "I64", "mixtral", "llama", "../model.safetensors", "/etc/hostname",
                       "model-00001-of-00005.safetensors", "model.safetensors"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=4,
)


def _slots(value, depth: int = 0):
    """(container, key) for every element of a JSON value, nested ones included."""
    if depth > 3:
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield value, key
        yield from _slots(child, depth + 1)


def mutate_json(data, value):
    """One random edit somewhere in a JSON value: replace an element, delete it, or add one."""
    slots = list(_slots(value))
    op = data.draw(st.sampled_from(["replace", "delete", "add"] if slots else ["add"]))
    if op == "add":
        containers = [value] + [c for c, k in slots if isinstance(c[k], (dict, list))]
        container = data.draw(st.sampled_from(containers))
        new = data.draw(JSON_VALUES)
        if isinstance(container, dict):
            container[data.draw(st.text(max_size=6) | st.sampled_from(sorted(container) or ["x"]))] = new
        else:
            container.insert(data.draw(st.integers(0, len(container))), new)
        return value
    container, key = data.draw(st.sampled_from(slots))
    if op == "delete":
        del container[key]
    else:
        container[key] = copy.deepcopy(data.draw(JSON_VALUES | st.sampled_from([c[k] for c, k in slots])))
    return value


def mutate_bytes(data, raw: bytes, end: int | None = None) -> bytes:
    """Flip, insert, delete or truncate at a random position (before `end` if given)."""
    end = len(raw) if end is None else end
    pos = data.draw(st.integers(0, max(end - 1, 0)))
    op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
    byte = bytes([data.draw(st.integers(0, 255))])
    if op == "flip":
        return raw[:pos] + byte + raw[pos + 1:]
    if op == "insert":
        return raw[:pos] + byte + raw[pos:]
    if op == "delete":
        return raw[:pos] + raw[pos + 1:]
    return raw[:pos]


def mutate_file(data, path: Path) -> None:
    raw = path.read_bytes()
    structural = data.draw(st.booleans())
    if path.suffix == ".safetensors":
        header, body = read_st(path)
        if structural:
            write_st(path, mutate_json(data, header), body)
        else:
            path.write_bytes(mutate_bytes(data, raw, 8 + _header_len(raw)))
    elif structural:
        path.write_text(json.dumps(mutate_json(data, json.loads(raw))))
    else:
        path.write_bytes(mutate_bytes(data, raw))


def expect(args: list, allowed: set[int], output: Path | None = None) -> int:
    """Run; the exit code must be allowed, and a failure must keep the contract."""
    code, _, err = run(*args)
    assert code in allowed, (args, code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("moegrow: error: "), err
        assert "internal error" not in lines[0] and "Traceback" not in err, err
    if output is not None:
        assert output.exists() == (code == 0), (code, err)
        assert leftovers(output.parent) == []
    return code


@pytest.fixture(scope="module")
def fuzz_bases(checkpoints, sharded, tmp_path_factory) -> dict[str, Path]:
    grown = tmp_path_factory.mktemp("fuzz") / "grown"
    assert run("grow-width", checkpoints["mixtral"], grown, "--experts", "2x", "--noise", "0.01",
               "--quiet")[0] == 0
    return {"single": checkpoints["mixtral"], "sharded": sharded, "grown": grown}


TARGETS = [("single", "model.safetensors"), ("single", "config.json"),
           ("sharded", "model-00002-of-00005.safetensors"), ("sharded", "model.safetensors.index.json"),
           ("sharded", "config.json"), ("grown", "model.safetensors"), ("grown", "config.json"),
           ("grown", "moegrow.json")]


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_corruption_keeps_the_contract(data, fuzz_bases, tmp_path_factory):
    """inspect, grow-width and verify on a randomly corrupted checkpoint either succeed (and a
    grown OUTPUT verifies) or fail with exit 2 and one line, leaving no OUTPUT; the source never
    changes."""
    base, name = data.draw(st.sampled_from(TARGETS))
    work = tmp_path_factory.mktemp("case")
    victim = work / base
    shutil.copytree(fuzz_bases[base], victim)
    mutate_file(data, victim / name)
    before = snapshot(victim)
    if base == "grown":  # a corrupted OUTPUT: verify says 0 (harmless edit), 1 or 2
        expect(["verify", fuzz_bases["single"], victim], {0, 1, 2})
    else:
        expect(["inspect", victim], {0, 2})
        out = work / "out"
        if expect(["grow-width", victim, out, "--experts", "2x", "--noise", "0.01", "--quiet"], {0, 2}, out) == 0:
            expect(["verify", victim, out], {0})
        expect(["verify", victim, fuzz_bases["grown"]], {0, 1, 2})
    assert snapshot(victim) == before
    shutil.rmtree(work)


def test_not_enough_space_is_refused_before_writing(checkpoints, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    src, out = checkpoints["mixtral"], tmp_path / "out"
    fails(["grow-width", src, out, "--experts", "2x"], src, out, str(tmp_path), "not enough free space",
          "the filesystem has")


@pytest.mark.parametrize("flag, spec", [("--experts", "1000000000x"), ("--layers", "1000000000x")])
def test_absurd_factors_are_refused_before_planning(flag, spec, checkpoints, tmp_path):
    src, out = checkpoints["mixtral"], tmp_path / "out"
    command = "grow-width" if flag == "--experts" else "grow-depth"
    fails([command, src, out, flag, spec], src, out, flag, "is the factor a typo")
    fails([command, src, out, flag, spec, "--dry-run"], src, out, flag, "is the factor a typo")


def test_source_read_error_names_the_source(checkpoints, tmp_path, monkeypatch):
    """An I/O error reading the source is the source's problem, not a failed write to OUTPUT."""
    monkeypatch.setattr(os, "pread", _fail_after(os.pread, 0, errno.EIO))
    monkeypatch.setattr(os, "preadv", _fail_after(os.preadv, 0, errno.EIO))  # noised tensors: read in place
    src, out = checkpoints["mixtral"], tmp_path / "out"
    line = fails(["grow-width", src, out, "--experts", "2x", "--noise", "0.01"], src, out,
                 "cannot read", "Input/output error")
    assert str(src) in line and "write failed" not in line


def test_verify_finds_nonfinite_values(poisoned, tmp_path):
    """A byte-copied growth of a source holding NaN and Inf verifies its copies (byte-identical) but reports
    the values, in each copy of the tensor."""
    src, name = poisoned
    assert run("grow-width", src, tmp_path / "out", "--experts", "2x", "--quiet")[0] == 0
    code, stdout, err = run("verify", src, tmp_path / "out", "--json")
    problems = json.loads(stdout)["problems"]
    assert code == 1, problems
    experts = json.loads((src / "config.json").read_text())["num_local_experts"]
    copy = name.replace(".experts.2.", f".experts.{2 + experts}.")
    assert problems == [f"{name}: contains NaN or Inf", f"{copy}: contains NaN or Inf"], problems
