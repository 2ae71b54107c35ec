"""Executing a plan: stream source bytes into new safetensors shards, atomically.

Output tensors that are byte copies (most of them) go file-to-file with the kernel's
`copy_file_range`; only noised parts pass through torch, one block at a time. Every tensor has a
fixed offset from the plan, so worker threads write in any order and the bytes never depend on
it. The output is built in a hidden sibling folder marked as partial and renamed into place
only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError, SourceError
from .io import INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME, ByteCopier, header_bytes, pread_exact, pwrite_all
from .io import TensorInfo as SourceTensor
from .plan import OutTensor, Plan

PARTIAL_MARK = ".moegrow-partial-"
DEFAULT_MAX_SHARD = 50 * 1000**3  # transformers' save_pretrained default ("50GB")
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
# Files never copied to the output: weights (rewritten) and pickle weights (never loaded).
_SKIP_SUFFIXES = PICKLE_SUFFIXES | {".safetensors", ".h5", ".msgpack", ".gguf", ".onnx"}
_SKIP_NAMES = {INDEX_NAME, "config.json", "moegrow.json"}


def parse_size(text: str) -> int:
    """`5GB`, `500MiB`, `1000000` -> bytes (decimal and binary units, as transformers)."""
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise OutputError(f"--max-shard-size: cannot read {text!r} (use e.g. 5GB or 500MiB)") from None
    if value <= 0:
        raise OutputError(f"--max-shard-size must be positive, not {text!r}")
    return int(value)


def split_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy, in plan order, as transformers does; a tensor larger than the limit gets its own."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def check_output(output: Path, source_folder: Path, force: bool) -> None:
    """Refuse an OUTPUT that is the source, inside it, contains it, or exists without --force."""
    out = output.resolve()
    src = source_folder.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{output}: OUTPUT must not be the source folder, inside it or contain it")
    if output.exists() and not force:
        raise OutputError(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent folder of OUTPUT does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(output: Path) -> list[Path]:
    """Remove partial folders left for this OUTPUT by runs that died (SIGKILL, power loss)."""
    removed = []
    for p in output.parent.glob(f".{output.name}{PARTIAL_MARK}*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@dataclass
class Written:
    output: Path
    files: list[str]
    bytes_written: int
    seconds: float


class _Job:
    """One plan's execution state: open source files, the byte copier, progress."""

    def __init__(self, plan: Plan, tensors: Mapping[str, SourceTensor], device: str,
                 progress: Callable[[int], None] | None) -> None:
        self.plan = plan
        self.tensors = tensors
        self.device = device
        self.progress = progress or (lambda n: None)
        self.copier = ByteCopier()
        self.fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def write_tensor(self, t: OutTensor, dst_fd: int, pos: int) -> None:
        from .noise import add_noise

        for i, part in enumerate(t.parts):
            src = self.tensors[part.source]
            if part.noise == 0.0:
                self.copier.copy(self.fd(src.path), src.start, dst_fd, pos, src.nbytes)
            else:
                raw = bytearray(pread_exact(self.fd(src.path), src.nbytes, src.start, str(src.path)))
                data = add_noise(raw, src.dtype, part.noise, self.plan.seed, t.name, i, self.device)
                pwrite_all(dst_fd, data, pos)
            pos += src.nbytes
            self.progress(src.nbytes)


def write_shards(plan: Plan, tensors: Mapping[str, SourceTensor], folder: Path, max_shard_size: int,
                 device: str, threads: int, progress: Callable[[int], None] | None) -> list[str]:
    """Write the plan's tensors as safetensors shards (+ index when sharded) into `folder`."""
    shards = split_shards(plan.tensors, max_shard_size)
    names = shard_names(len(shards))
    job = _Job(plan, tensors, device, progress)
    work: list[tuple[OutTensor, int, int]] = []
    out_fds: list[int] = []
    try:
        for shard, name in zip(shards, names):
            head, offsets = header_bytes((t.name, t.dtype, t.shape, t.nbytes) for t in shard)
            fd = os.open(folder / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            out_fds.append(fd)
            pwrite_all(fd, head, 0)
            os.ftruncate(fd, len(head) + sum(t.nbytes for t in shard))
            work.extend((t, fd, len(head) + off) for t, off in zip(shard, offsets))
        # Large tensors first, so that one big tensor does not finish the job alone.
        work.sort(key=lambda w: -w[0].nbytes)
        if threads <= 1:
            for t, fd, pos in work:
                job.write_tensor(t, fd, pos)
        else:
            with ThreadPoolExecutor(threads) as pool:
                for f in [pool.submit(job.write_tensor, t, fd, pos) for t, fd, pos in work]:
                    f.result()
        for fd in out_fds:
            os.fsync(fd)
    finally:
        for fd in out_fds:
            os.close(fd)
        job.close()
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan.tensors)},
            "weight_map": {t.name: n for shard, n in zip(shards, names) for t in shard},
        }
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def copy_side_files(source_folder: Path, folder: Path) -> list[str]:
    """Copy every non-weight file of the source (tokenizer, templates, generation config...)."""
    copied = []
    for p in sorted(source_folder.rglob("*")):
        rel = p.relative_to(source_folder)
        if (not p.is_file() or p.suffix in _SKIP_SUFFIXES or str(rel) in _SKIP_NAMES
                or any(part.startswith(".") for part in rel.parts)):
            continue
        dest = folder / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
        copied.append(str(rel))
    return copied


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def execute(plan: Plan, tensors: Mapping[str, SourceTensor], source_folder: Path, output: Path, *,
            provenance: Mapping[str, Any], max_shard_size: int = DEFAULT_MAX_SHARD,
            device: str = "cpu", threads: int = 2, force: bool = False,
            progress: Callable[[int], None] | None = None) -> Written:
    """Write the grown checkpoint to `output`; on any failure leave no output and no temp folder."""
    check_output(output, source_folder, force)
    clean_stale_partials(output)
    start = time.perf_counter()
    tmp = output.parent / f".{output.name}{PARTIAL_MARK}{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{tmp}: cannot create: {e.strerror}") from None
    try:
        names = write_shards(plan, tensors, tmp, max_shard_size, device, threads, progress)
        write_json(tmp / "config.json", plan.config)
        copy_side_files(source_folder, tmp)
        write_json(tmp / "moegrow.json", provenance)
        _replace(tmp, output)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, (SourceError, OutputError)):
            raise OutputError(f"{output}: write failed: {e.strerror or e}") from None
        raise
    total = sum(t.nbytes for t in plan.tensors)
    return Written(output, names, total, time.perf_counter() - start)


def _replace(tmp: Path, output: Path) -> None:
    """Rename the finished folder into place (replacing an old OUTPUT only now, for --force)."""
    if output.exists():
        trash = output.parent / f".{output.name}.moegrow-old-{os.getpid()}"
        os.rename(output, trash)
        os.rename(tmp, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, output)
