"""Reading and writing torch Distributed Checkpoints (DCP) chunk by chunk, with torch alone.

A DCP folder holds `.metadata` (a pickle: every key's global shape, dtype and stored chunks, and
where each chunk's bytes lie) and `*.distcp` files (each tensor chunk a `torch.save` blob, each
non-tensor entry a byte blob). Megatron-core's `torch_dist` and OLMo-core both write it.

Nothing here unpickles arbitrary objects: `.metadata` goes through an unpickler that admits only
DCP's own metadata classes (and OLMo-core's copy of its storage-info class), tensor chunks load
with `weights_only=True`, and non-tensor entries (Megatron's `_extra_state`, `rng_state`) are
carried as bytes, never loaded. Memory holds one stored chunk at a time, however large the
tensor (Megatron stores one chunk per layer, and per expert for expert weights).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SourceError

METADATA_NAME = ".metadata"
_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
           "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
# OLMo-core pickles its own storage-info class; it has the fields of torch's _StorageInfo
_STORAGE_INFO_ALIASES = {("olmo_core.distributed.checkpoint.filesystem", "_StorageInfo")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admit DCP's metadata dataclasses, torch dtypes and sizes; nothing that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        import torch

        if (module, name) in _STORAGE_INFO_ALIASES:
            from torch.distributed.checkpoint.filesystem import _StorageInfo

            return _StorageInfo
        if module.startswith("torch.distributed.checkpoint.") and not name.startswith("__"):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None),
                                            (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        if (module, name) in {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"),
                              ("builtins", "frozenset"),
                              ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                              ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class")


def is_dcp(folder: Path) -> bool:
    return (folder / METADATA_NAME).is_file()


def dtype_name(dtype: Any) -> str:
    """A torch dtype as moegrow's (safetensors) dtype name: torch.float32 -> F32."""
    return _DTYPES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class Chunk:
    """One stored chunk of a tensor: where it sits in the global tensor."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class TensorEntry:
    key: str
    shape: tuple[int, ...]
    dtype: str           # moegrow's name (F32, BF16...)
    torch_dtype: Any
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        from .io import DTYPE_SIZES

        n = DTYPE_SIZES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n


class DcpReader:
    """A DCP folder's index and its chunks, read one at a time."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        path = folder / METADATA_NAME
        try:
            with open(path, "rb") as f:
                self.metadata = _MetadataUnpickler(f).load()
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as e:
            raise SourceError(f"{path}: not a readable DCP metadata file ({e})") from None
        if not hasattr(self.metadata, "state_dict_metadata") or not hasattr(self.metadata, "storage_data"):
            raise SourceError(f"{path}: not a DCP metadata file")
        self.tensors: dict[str, TensorEntry] = {}
        self.objects: list[str] = []  # non-tensor entries, carried as bytes
        for key, md in self.metadata.state_dict_metadata.items():
            if hasattr(md, "chunks"):
                chunks = tuple(Chunk(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks)
                self.tensors[key] = TensorEntry(key, tuple(md.size), dtype_name(md.properties.dtype),
                                                md.properties.dtype, chunks)
            else:
                self.objects.append(key)
        self._where = {(i.fqn, tuple(i.offset) if i.offset is not None else None): s
                       for i, s in self.metadata.storage_data.items()}

    def _blob(self, key: str, offsets: tuple[int, ...] | None) -> bytes:
        info = self._where.get((key, offsets))
        if info is None:
            raise SourceError(f"{self.folder}/{METADATA_NAME}: no stored bytes for {key} at {offsets}")
        if getattr(info, "transform_descriptors", None):
            raise SourceError(f"{self.folder}: {key} is stored with transforms {info.transform_descriptors} "
                              "(compressed or encrypted DCP); moegrow reads plain DCP only")
        path = self.folder / info.relative_path
        try:
            with open(path, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except OSError as e:
            raise SourceError(f"{path}: cannot read: {e.strerror or e}") from None
        if len(data) != info.length:
            raise SourceError(f"{path}: truncated (the chunk of {key} at byte {info.offset} is cut short)")
        return data

    def object_bytes(self, key: str) -> bytes:
        """A non-tensor entry's stored bytes, as they are (never unpickled)."""
        return self._blob(key, None)

    def read_chunk(self, key: str, chunk: Chunk) -> Any:
        """One stored chunk as a tensor (a `torch.save` blob, loaded with weights_only)."""
        import torch

        data = self._blob(key, chunk.offsets)
        try:
            t = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged zip, or a pickle that is not a tensor
            raise SourceError(f"{self.folder}: the chunk of {key} at {chunk.offsets} does not load: "
                              f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != chunk.sizes:
            raise SourceError(f"{self.folder}: the chunk of {key} at {chunk.offsets} is not a tensor of "
                              f"shape {chunk.sizes}")
        return t

    def read_slice(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> Any:
        """The part [offsets, offsets + sizes) of a tensor, assembled from the chunks it overlaps."""
        import torch

        entry = self.tensors[key]
        out = torch.empty(sizes, dtype=entry.torch_dtype)
        covered = 0
        for c in entry.chunks:
            lo = [max(a, b) for a, b in zip(offsets, c.offsets)]
            hi = [min(a + n, b + m) for a, n, b, m in zip(offsets, sizes, c.offsets, c.sizes)]
            if any(h <= low for low, h in zip(lo, hi)) and sizes:
                continue
            src = self.read_chunk(key, c)
            dst = out
            for axis, (low, h, b, a) in enumerate(zip(lo, hi, c.offsets, offsets)):
                src = src.narrow(axis, low - b, h - low)
                dst = dst.narrow(axis, low - a, h - low)
            dst.copy_(src)
            covered += src.numel()
        if covered != out.numel():
            raise SourceError(f"{self.folder}: the stored chunks of {key} do not cover {offsets}+{sizes}")
        return out


@dataclass(frozen=True)
class OutChunk:
    """A chunk to write: `make()` returns its tensor (called once, when the writer reaches it)."""

    key: str
    shape: tuple[int, ...]   # the global shape
    torch_dtype: Any
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    make: Callable[[], Any]


def write_dcp(folder: Path, chunks: Iterable[OutChunk], objects: dict[str, Callable[[], bytes]]) -> None:
    """Write a DCP folder (one `__0_0.distcp` and `.metadata`) with torch's own writer, without a
    process group. Each chunk's tensor is made only when the writer reaches it and dropped after, so
    memory holds one chunk; non-tensor entries are written from their bytes as they are."""
    import torch
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
    from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

    makers: dict[tuple[str, tuple[int, ...] | None], Callable[[], Any]] = {}
    items = []
    for c in chunks:
        index = MetadataIndex(c.key, torch.Size(c.offsets))
        items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
            properties=TensorProperties(dtype=c.torch_dtype), size=torch.Size(c.shape))))
        makers[(c.key, tuple(c.offsets))] = c.make
    for key, make in objects.items():
        items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        makers[(key, None)] = make

    class Planner(DefaultSavePlanner):
        def set_up_planner(self, state_dict: Any, storage_meta: Any = None, is_coordinator: bool = False) -> None:
            self.state_dict = {}
            self.is_coordinator = is_coordinator

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            i = write_item.index
            make = makers.pop((i.fqn, tuple(i.offset) if i.offset is not None else None))
            try:
                return io.BytesIO(make()) if write_item.type == WriteItemType.BYTE_IO else make().contiguous()
            except BaseException as e:
                failed.append(e)
                raise

    writer = FileSystemWriter(str(folder), single_file_per_rank=True, thread_count=1, sync_files=True,
                              per_thread_copy_ahead=0)
    failed: list[BaseException] = []  # DCP wraps errors in its own exception: the first one is re-raised
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled...": no process group is the intent
            warnings.simplefilter("ignore", UserWarning)
            dcp_save({}, storage_writer=writer, no_dist=True,
                     planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False))
    except BaseException:  # torch's CheckpointException is a BaseException
        if failed:
            raise failed[0] from None
        raise


def fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
