"""Safetensors at the byte level: a strict header reader, a sharded checkpoint index, a byte copier.

moegrow never needs whole tensors in memory: most output tensors are byte copies of source
tensors, so the reader exposes each tensor as (file, byte range) and the writer copies ranges
with the kernel (`os.copy_file_range`) where it can.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from .errors import SourceError
from .gc_pause import gc_paused

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
_DTYPE_NAMES = {d: d for d in DTYPE_SIZES}  # one str per dtype name, not one per tensor
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(slots=True, unsafe_hash=True)  # not frozen: see plan._PLAN_DATA
class TensorInfo:
    """Where one tensor's bytes lie: `path`, absolute byte offsets [start, end)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; return (tensors, metadata).

    Strict like safetensors itself: header inside the file, JSON object, known dtypes, byte
    lengths that match shape x dtype, data ranges in bounds, not overlapping, and filling the data
    section exactly.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SourceError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise SourceError(f"{path}: header length {n} exceeds the file size ({size} bytes)")
            if n > MAX_HEADER:
                raise SourceError(f"{path}: header length {n} exceeds safetensors' limit of {MAX_HEADER} bytes")
            raw = f.read(n)
    except OSError as e:
        raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
    base = 8 + n
    data_len = size - base
    parsed = None
    if n >= STREAMED_HEADER:  # a large header entry by entry, in bounded memory; whatever is wrong with it
        with contextlib.suppress(SourceError, ValueError, RecursionError, IndexError):  # said as the whole parse says
            parsed = _streamed_header(path, raw, base, data_len)
    tensors, metadata = parsed or _whole_header(path, raw, base, data_len)
    del raw
    if _in_order(tensors):  # the tensors as sorted already (the common case): no sorted copy of them all
        spans: Iterable[tuple[int, int, str]] = ((t.start, t.end, t.name) for t in tensors.values())
    else:
        spans = sorted((t.start, t.end, t.name) for t in tensors.values())
    if isinstance(spans, list):
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise SourceError(f"{path}: tensors {a!r} and {b!r} overlap")
    # As safetensors: the tensors fill the data section exactly, with no gap and nothing after.
    pos = base
    for start, end, name in spans:
        if start > pos:
            raise SourceError(f"{path}: {start - pos} bytes before tensor {name!r} belong to no tensor "
                              "(safetensors data must be contiguous)")
        pos = end
    if pos != size:
        raise SourceError(f"{path}: {size - pos} bytes after the last tensor belong to no tensor "
                          "(a corrupt or padded file?)")
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _in_order(tensors: Mapping[str, TensorInfo]) -> bool:
    """Whether the tensors are listed in their (start, end, name) order, none overlapping the next."""
    pairs = zip(tensors.values(), itertools.islice(tensors.values(), 1, None))
    return all(a.end <= b.start and (a.start, a.end, a.name) < (b.start, b.end, b.name) for a, b in pairs)


def _whole_header(path: Path, raw: bytes, base: int, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The header parsed whole by `json.loads`, then checked entry by entry: the reference for every error."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        raise SourceError(f"{path}: header is not valid JSON ({_first_line(e)})") from None
    if not isinstance(header, dict):
        raise SourceError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SourceError(f"{path}: __metadata__ is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_entry(path, name, entry, base, data_len)
    return tensors, metadata


STREAMED_HEADER = 4 * 1024 * 1024  # headers this long or longer are parsed entry by entry (36,000 tensors or so)
_SPACES = re.compile(r"[ \t\n\r]*")
_HEADER_DECODER = json.JSONDecoder()


def _streamed_header(path: Path, raw: bytes, base: int, data_len: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """`_whole_header` entry by entry: `json.loads` of the 362,000 entries of a grown DeepSeek-V3's header holds a
    dict per entry (over 250 MiB at once, and the memory stays fragmented after); here one entry at a time is
    parsed and checked. Raises (ValueError, SourceError...) on anything unusual, for `_whole_header` to report."""
    text = raw.decode("utf-8")
    decode, space = _HEADER_DECODER.raw_decode, _SPACES.match
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    tensors: dict[str, TensorInfo] = {}
    metadata: object = None
    pos = space(text, 0).end()
    if text[pos] != "{":
        raise ValueError("not an object")
    pos = space(text, pos + 1).end()
    while text[pos] != "}":
        name, pos = decode(text, pos)
        pos = space(text, pos).end()
        if not isinstance(name, str) or text[pos] != ":":
            raise ValueError("expected a key")
        entry, pos = decode(text, space(text, pos + 1).end())
        if name == "__metadata__":
            metadata = entry
        else:
            t = _tensor_entry(path, name, entry, base, data_len)
            t.shape = shapes.setdefault(t.shape, t.shape)
            tensors[name] = t
        pos = space(text, pos).end()
        if text[pos] == ",":
            pos = space(text, pos + 1).end()
            if text[pos] == "}":
                raise ValueError("a trailing comma")
        elif text[pos] != "}":
            raise ValueError("expected , or }")
    if text[pos + 1:].strip(" \t\n\r") or not isinstance(metadata or {}, dict):
        raise ValueError("extra data, or metadata not an object")
    return tensors, dict(metadata or {})  # type: ignore[call-overload]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_int(x: object) -> bool:
    return type(x) is int  # not bool: JSON true is no size


def _tensor_entry(path: Path, name: str, entry: object, base: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SourceError(f"{path}: tensor {name!r}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise SourceError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(_is_int(d) and d >= 0 for d in shape)):
        raise SourceError(f"{path}: tensor {name!r}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise SourceError(f"{path}: tensor {name!r}: invalid data_offsets {offsets!r}")
    lo, hi = offsets
    if not 0 <= lo <= hi <= data_len:
        hint = ": truncated file?" if 0 <= lo <= hi else ""
        raise SourceError(
            f"{path}: tensor {name!r}: data_offsets {offsets} out of bounds (data is {data_len} bytes{hint})"
        )
    numel = 1
    for d in shape:
        numel *= d
    want = numel * DTYPE_SIZES[dtype]
    if hi - lo != want:
        raise SourceError(
            f"{path}: tensor {name!r}: {hi - lo} bytes do not match dtype {dtype} and shape {shape}"
            f" ({want} bytes)"
        )
    return TensorInfo(name, _DTYPE_NAMES[dtype], tuple(shape), path, base + lo, base + hi)


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte
        raise SourceError(f"{path}: cannot be resolved ({_first_line(e)})") from None


def _inside(folder: Path, path: Path) -> bool:
    try:
        _resolve(path).relative_to(_resolve(folder))
        return True
    except ValueError:
        return False


def _is_hub_blob(folder: Path, path: Path) -> bool:
    """True for a Hub cache snapshot link into the same repo's blobs/ folder."""
    snapshots = folder.parent
    if snapshots.name != "snapshots":
        return False
    return _inside(snapshots.parent / "blobs", path)


def shard_path(folder: Path, rel: str) -> Path:
    """Resolve a shard name from an index, refusing anything that escapes the folder."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise SourceError(f"{folder / INDEX_NAME}: invalid shard name {rel!r}")
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise SourceError(f"{folder / INDEX_NAME}: shard path {rel!r} escapes the checkpoint folder")
    path = folder / rel
    if not (_inside(folder, path) or _is_hub_blob(folder, path)):
        raise SourceError(f"{folder / INDEX_NAME}: shard {rel!r} links outside the checkpoint folder")
    if not path.is_file():
        raise SourceError(f"{folder / INDEX_NAME}: names shard {rel!r}, which does not exist")
    return path


def read_index(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a checkpoint folder (single file or sharded), validated against the index."""
    with gc_paused():  # 92,000 TensorInfo for DeepSeek-V3, 362,000 for its grown output
        return _read_index(folder)


def _read_index(folder: Path) -> dict[str, TensorInfo]:
    index_path = folder / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
        except OSError as e:
            raise SourceError(f"{index_path}: cannot read: {e.strerror or e}") from None
        except (ValueError, RecursionError) as e:
            raise SourceError(f"{index_path}: not valid JSON ({_first_line(e)})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict):
            raise SourceError(f"{index_path}: not a valid safetensors index (no \"weight_map\" object)")
        for name, rel in weight_map.items():
            if not isinstance(rel, str):
                raise SourceError(f"{index_path}: tensor {name!r}: shard name {rel!r} is not a string")
        files = sorted(set(weight_map.values()))
        tensors: dict[str, TensorInfo] = {}
        for rel in files:
            path = shard_path(folder, rel)
            shard, _ = read_header(path)
            for name, info in shard.items():
                if name in tensors:
                    raise SourceError(f"{path}: tensor {name!r} is also in {tensors[name].path.name}")
                tensors[name] = info
        shard_names = {rel: Path(rel).name for rel in files}
        for name, rel in weight_map.items():
            info = tensors.get(name)
            if info is None:
                raise SourceError(f"{index_path}: tensor {name!r} is not in its shard {rel!r}")
            if info.path.name != shard_names[rel]:
                raise SourceError(f"{index_path}: tensor {name!r} is listed in {rel!r} but stored in "
                                  f"{info.path.name!r}")
        extra = sorted(set(tensors) - set(weight_map))
        if extra:
            raise SourceError(f"{index_path}: tensor {extra[0]!r} is in a shard but not in the index")
        return tensors
    single = folder / SINGLE_NAME
    if single.is_file() or single.is_symlink():
        if not (_inside(folder, single) or _is_hub_blob(folder, single)):
            raise SourceError(f"{single}: links outside the checkpoint folder")
        return read_header(single)[0]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(f"{folder}: only pickle weights ({pickles[0]}); moegrow never loads pickle "
                          "files, convert them to safetensors first")
    raise SourceError(f"{folder}: no {SINGLE_NAME} or {INDEX_NAME} found")


PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl"})


# ---------------------------------------------------------------------------------------------
# Writing


def header_bytes(entries: Iterable[tuple[str, str, tuple[int, ...], int]],
                 metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Build a safetensors header for (name, dtype, shape, nbytes) in file order.

    Returns the 8-byte length plus the JSON (padded with spaces to 8-byte alignment, as
    safetensors does) and each tensor's offset within the data section.
    """
    # Written as text entry by entry (the same bytes as json.dumps of the whole dict): a dict per
    # tensor would hold 180 MiB for a shard of 365,000 tensors.
    text = io.StringIO()
    text.write('{"__metadata__":' + json.dumps(dict(metadata or {"format": "pt"}), separators=(",", ":")))
    offsets: list[int] = []
    pos = 0
    quote = encode_basestring_ascii  # json.dumps of a str, without its two calls around it
    kinds: dict[tuple[str, tuple[int, ...]], str] = {}  # the text of each (dtype, shape), made once
    for name, dtype, shape, nbytes in entries:
        kind = kinds.get((dtype, shape))
        if kind is None:
            kind = kinds[(dtype, shape)] = f'{{"dtype":{quote(dtype)},"shape":[{",".join(map(str, shape))}],'
        text.write(f',{quote(name)}:{kind}"data_offsets":[{pos},{pos + nbytes}]}}')
        offsets.append(pos)
        pos += nbytes
    text.write("}")
    raw = text.getvalue().encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


_COPY_CHUNK = 64 * 1024 * 1024


class ByteCopier:
    """Copy byte ranges between open files: `copy_file_range` first, `pread`/`pwrite` fallback.

    The kernel copy never touches user space (and shares extents on reflink filesystems); it is
    refused across filesystems on older kernels (EXDEV) or on some filesystems (EINVAL, ENOSYS),
    after which this copier uses the fallback for good.
    """

    def __init__(self) -> None:
        self.kernel = hasattr(os, "copy_file_range")

    def copy(self, src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int,
             name: str = "source") -> None:
        while count > 0:
            if self.kernel:
                try:
                    n = os.copy_file_range(src_fd, dst_fd, min(count, 1 << 30), src_off, dst_off)
                except OSError as e:
                    if e.errno in (18, 22, 38, 95, 1):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, EPERM
                        self.kernel = False
                        continue
                    raise
                if n == 0:
                    raise SourceError(f"{name}: unexpected end of file while copying {count} bytes")
            else:
                buf = _pread(src_fd, min(count, _COPY_CHUNK), src_off, name)
                if not buf:
                    raise SourceError(f"{name}: unexpected end of file while copying {count} bytes")
                n = os.pwrite(dst_fd, buf, dst_off)
            src_off += n
            dst_off += n
            count -= n


def _pread(fd: int, count: int, offset: int, name: str) -> bytes:
    """os.pread, with a read error reported against the source file (not the output being written)."""
    try:
        return os.pread(fd, count, offset)
    except OSError as e:
        raise SourceError(f"{name}: cannot read: {e.strerror or e}") from None


def pread_exact(fd: int, count: int, offset: int, name: str) -> bytes:
    """Read exactly `count` bytes at `offset` (a short read is a truncated file)."""
    parts = []
    while count > 0:
        b = _pread(fd, min(count, _COPY_CHUNK), offset, name)
        if not b:
            raise SourceError(f"{name}: unexpected end of file")
        parts.append(b)
        offset += len(b)
        count -= len(b)
    return b"".join(parts) if len(parts) != 1 else parts[0]


def pread_into(fd: int, buf: memoryview, offset: int, name: str) -> None:
    """Fill `buf` with the bytes at `offset` (no new buffer: `os.preadv` reads in place)."""
    view = buf.cast("B") if buf.format != "B" else buf
    while view:
        try:
            n = os.preadv(fd, [view[:_COPY_CHUNK]], offset)
        except OSError as e:
            raise SourceError(f"{name}: cannot read: {e.strerror or e}") from None
        if n == 0:
            raise SourceError(f"{name}: unexpected end of file")
        view = view[n:]
        offset += n


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, do not wait
_sync_file_range: Any = None


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing `fd`'s dirty pages to disk now, without waiting for them
    (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; Python's os module lacks it). Called as a run
    goes, so that the disk writes while the CPU makes the next tensors instead of all at the final
    fsync (cp + sync leaves it all to the sync). A no-op where unsupported (other systems; tmpfs,
    where there is nothing to write back); errors are ignored: the final fsync still decides."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            fn = ctypes.CDLL(None, use_errno=True).sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _sync_file_range = fn
    if _sync_file_range:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def index_json(index: Mapping[str, Any]) -> str:
    """`json.dumps(index, indent=2, sort_keys=True) + "\\n"` for a safetensors index (as transformers writes
    it), the weight map's lines made with json's C string encoder: json's indented encoder is pure Python,
    1.5 s of CPU for the 362,127 entries of a grown DeepSeek-V3."""
    weight_map = index.get("weight_map")
    rest = {k: v for k, v in index.items() if k != "weight_map"}
    if not isinstance(weight_map, dict) or not weight_map or any(k > "weight_map" for k in rest):
        return json.dumps(index, indent=2, sort_keys=True) + "\n"
    head = json.dumps(rest, indent=2, sort_keys=True)[:-2] + ",\n" if rest else "{\n"
    files = {v: encode_basestring_ascii(v) for v in set(weight_map.values())}  # a few hundred shard names
    lines = ",\n".join(f"    {encode_basestring_ascii(k)}: {files[weight_map[k]]}" for k in sorted(weight_map))
    return f'{head}  "weight_map": {{\n{lines}\n  }}\n}}\n'
