"""Executing a plan: stream source bytes into new safetensors shards, atomically.

Output tensors that are byte copies (most of them) go file-to-file with the kernel's
`copy_file_range`; only noised parts pass through torch, one block at a time. Every tensor has a
fixed offset from the plan, so worker threads write in any order and the bytes never depend on
it. The output is built in a hidden sibling folder marked as partial and renamed into place
only when complete.

Failure handling (docs/errors.md): any error or interrupt removes the partial folder; an OUTPUT
replaced with --force is swapped out only once the new one is complete; a run killed outright
leaves at most `.NAME.moegrow-partial-PID`, which the next run for that OUTPUT removes. The final
rename never replaces an OUTPUT that appeared meanwhile (another run's) unless --force says so.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

from .errors import OutputError, SourceError
from .io import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    ByteCopier,
    header_bytes,
    index_json,
    pread_exact,
    pread_into,
    pwrite_all,
    start_writeback,
)
from .io import TensorInfo as SourceTensor
from .plan import OutTensor, Plan

PARTIAL_MARK = ".moegrow-partial-"
OLD_MARK = ".moegrow-old-"  # an OUTPUT being replaced (--force), for the instant of two renames
LOCK_MARK = ".moegrow-lock"  # serialises the final renames where renameat2 is missing
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
        n = t.nbytes
        if shards[-1] and size + n > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += n
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE_NAME]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _absolute(path: Path) -> Path:
    """`path` made absolute and normalised (`.`, `..`), symlinks left as they are."""
    return Path(os.path.abspath(path))


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def check_output(output: Path, source_folder: Path, force: bool) -> None:
    """Refuse an OUTPUT that is the source, inside it, contains it, or exists without --force."""
    try:
        out = output.resolve()
        src = source_folder.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL byte
        raise OutputError(f"{output}: cannot be resolved ({e})") from None
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{output}: OUTPUT must not be the source folder, inside it or contain it")
    if _exists(output) and not force:
        raise OutputError(f"{output}: already exists (use --force to replace it)")
    if _exists(output) and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a folder")
    parent = _absolute(output).parent
    if not parent.is_dir():
        raise OutputError(f"{parent}: parent folder of OUTPUT does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{parent}: not writable")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a folder of ours from before this run is stale (a PID reused after a crash)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False  # no such PID can exist
    except PermissionError:
        return True
    return pid > 0


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


_LIVE: set[Path] = set()  # partial folders this process is writing now (several threads may run growths)


def clean_stale_partials(output: Path) -> list[Path]:
    """Remove the folders that runs for this OUTPUT left when they died (SIGKILL, power loss).

    `.NAME.moegrow-partial-PID` is removed when process PID is gone. `.NAME.moegrow-old-PID` (an
    OUTPUT that a --force run was replacing when it died) is renamed back to OUTPUT when OUTPUT is
    missing, else removed. A lock file left by a dead run is removed when nobody holds it.
    """
    output = _absolute(output)
    removed: list[Path] = []
    try:
        entries = sorted(output.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        for mark in (PARTIAL_MARK, OLD_MARK):
            prefix = f".{output.name}{mark}"
            pid = p.name[len(prefix):]
            if not (p.name.startswith(prefix) and pid.isdigit()) or _alive(int(pid)) or p in _LIVE:
                continue
            if mark == OLD_MARK and _put_back(p, output):
                continue
            _remove(p)
            removed.append(p)
    if _exists(output.parent / f".{output.name}{LOCK_MARK}"):
        try:
            with _output_lock(output, wait=False):
                pass  # taken, so no run holds it; released, so it is removed
        except OSError:
            pass  # not ours to remove (permissions): check_output reports the folder
    return removed


def _put_back(old: Path, output: Path) -> bool:
    """Rename an orphaned old OUTPUT back to OUTPUT unless OUTPUT exists; True when done."""
    try:
        if _rename_flags(old, output, RENAME_NOREPLACE):
            return True
        with _output_lock(output):
            if _exists(output):
                return False
            os.rename(old, output)
            return True
    except OSError:  # OUTPUT exists (EEXIST), or another run put it back first (ENOENT)
        return False


# renameat2(2): atomic renames that never replace (NOREPLACE) or that swap (EXCHANGE) two paths.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})


def _load_renameat2() -> Any:
    """libc's renameat2 (glibc 2.28+, musl 1.2.5+), or None on a platform without it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def _rename_flags(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(src, dst, flags): True when done, False where the platform, kernel or
    filesystem lacks it (then the caller falls back to a lock). Other failures raise OSError
    (FileExistsError when NOREPLACE finds dst, FileNotFoundError when EXCHANGE misses it)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


@contextmanager
def _output_lock(output: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive flock on `.NAME.moegrow-lock` beside OUTPUT; the file is removed on release.

    Every run that cannot use renameat2 takes it for its final check-and-rename, so no two of them
    interleave. A waiter that wakes on a file its predecessor removed locks the new one. With
    `wait` False, yields False at once when another process holds the lock.
    """
    path = output.parent / f".{output.name}{LOCK_MARK}"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            yield False
            return
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield True
    finally:
        try:
            os.unlink(path)  # while still held: a waiter then sees it was removed and retries
        finally:
            os.close(fd)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during a step that must not be cut short (renames, clean-up);
    a signal that arrives meanwhile is raised again right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    saved: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue  # installed outside Python (cannot restore it) or ignored anyway
        saved[sig] = handler
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(pending):
            signal.raise_signal(sig)


_SCAN_CHUNK = 64 * 1024 * 1024  # a multiple of every dtype's size


def find_nonfinite(tensors: Iterable[SourceTensor]) -> list[tuple[SourceTensor, int]]:
    """(tensor, count) for every float tensor holding NaN or Inf, read in 64 MiB chunks."""
    from .noise import count_nonfinite

    found = []
    fds: dict[Path, int] = {}
    buf = bytearray()
    try:
        for t in tensors:
            if t.dtype not in FLOAT_DTYPES:
                continue
            if t.path not in fds:
                fds[t.path] = os.open(t.path, os.O_RDONLY)
            bad = 0
            for pos in range(t.start, t.end, _SCAN_CHUNK):
                n = min(_SCAN_CHUNK, t.end - pos)
                buf[:] = pread_exact(fds[t.path], n, pos, str(t.path))
                bad += count_nonfinite(buf, t.dtype)
            if bad:
                found.append((t, bad))
    except OSError as e:
        raise SourceError(f"{e.filename or 'source'}: cannot read: {e.strerror or e}") from None
    finally:
        for fd in fds.values():
            os.close(fd)
    return found


def nonfinite_message(t: SourceTensor, count: int) -> str:
    return f"{t.path}: tensor {t.name!r} has {count} NaN/Inf value(s)"


@dataclass
class Written:
    output: Path
    files: list[str]
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


_LOCKED_COPY = 64 * 1024 * 1024  # a copy holds its output file's lock (`_Job.writing`) this many bytes at a time
_WRITEBACK_EVERY = 64 * 1024 * 1024  # bytes written to one output file between two `start_writeback`s
_SMALL_CALL = 1024 * 1024  # a run of copies averaging less per call takes `_Job._small_copies`
_FSYNC_THREADS = 8  # output shards fsynced at once (`_fsync_all`)
_PIECE = 1024 * 1024  # bytes of a noised part made at a time (`_Job._write_pieces`), a multiple of 32


class _Job:
    """One plan's execution state: open source files, the byte copier, progress."""

    def __init__(self, plan: Plan, tensors: Mapping[str, SourceTensor], device: str,
                 progress: Callable[[int], None] | None) -> None:
        self.plan = plan
        self.tensors = tensors
        self._device = device
        self._device_lock = threading.Lock()
        self.progress = progress or (lambda n: None)
        self.copier = ByteCopier()
        self.fds: dict[Path, int] = {}
        # source tensor -> NaN/Inf count, of those noised whole (None: only a run of its rows was)
        self.nonfinite: dict[str, int | None] = {}
        self._local = threading.local()
        self.one_torch_thread = False  # set when several workers share the cores (`_one_torch_thread`)
        self.write_locks: dict[int, threading.Lock] = {}  # output file -> lock (`writing`)
        self._unflushed: dict[int, int] = {}  # output file -> bytes written since its last `start_writeback`
        self._small_copies = threading.Lock()  # held by a run of small copies (`copy_run`)
        self._left: dict[int, int] = {}  # output file -> tensor bytes still to write (`expect`, `wrote`)
        self._unflushed_lock = threading.Lock()

    @property
    def requested_device(self) -> str:
        """The device as asked for (auto, cpu or cuda), or as resolved once `device` was read."""
        return self._device

    @property
    def device(self) -> str:
        """The device for tensor math, resolved at the first transformed part (importing torch, where the
        machine has a GPU device node)."""
        with self._device_lock:
            if self._device == "auto":
                from .noise import resolve_device

                self._device = resolve_device("auto")
            return self._device

    @property
    def resolved_device(self) -> str:
        """Where tensor math ran: `none` when every tensor was a byte copy."""
        if not any(p.needs_device for t in self.plan.tensors for p in t.parts):
            return "none"
        return self.device

    def fd(self, path: Path) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return self.fds[path]

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def _part_bytes(self, t: OutTensor, i: int, raw: bytearray) -> bytearray | memoryview:
        """Part i of `t` from its source bytes `raw`: scaled, noised or shifted (see `Part`)."""
        from .noise import count_nonfinite, transform

        part = t.parts[i]
        src = self.tensors[part.source]
        if part.is_copy:
            return raw
        if part.fill is None and self.nonfinite.get(part.source) is None:  # these bytes pass through torch anyway
            self.nonfinite[part.source] = count_nonfinite(raw, src.dtype) if part.rows is None else None
        return transform(raw, src.dtype, part, self.plan.seed, t.name, i, self.device, out=raw,
                         generator=self.plan.noise_generator)

    def _one_torch_thread(self) -> None:
        """Run this worker's torch operations on its own thread: with workers on every core, torch's
        intra-op threads (OpenMP) only oversubscribe the cores and spin (measured: twice the CPU per
        noised tensor on 2 cores). With OpenMP the setting is the calling thread's; `restore_torch_threads`
        puts it back where it is not."""
        import torch

        self._local.torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def restore_torch_threads(self) -> None:
        """Undo `_one_torch_thread` in this worker thread, if it ran."""
        n = getattr(self._local, "torch_threads", None)
        if n is not None:
            import torch

            torch.set_num_threads(n)

    def writing(self, fd: int) -> Any:
        """Held while writing to output file `fd`: a write takes the file's inode lock, and a second
        thread waiting for it in the kernel spins (measured on tmpfs: twice the system time of one
        thread, at no gain); waiting here sleeps instead, leaving the core to the other work."""
        return self.write_locks.get(fd) or nullcontext()

    def _buffer(self, n: int) -> memoryview:
        """`n` bytes of this thread's read buffer (kept and grown, never shrunk: a fresh buffer per tensor
        costs a page fault per 4 KiB, as much system time as the copy)."""
        buf = getattr(self._local, "buffer", None)
        if buf is None or len(buf) < n:
            buf = self._local.buffer = bytearray(n)
        return memoryview(buf)[:n]

    def read(self, name: str, offset: int, count: int) -> bytes:
        """`count` bytes of source tensor `name` from `offset` within it."""
        src = self.tensors[name]
        return pread_exact(self.fd(src.path), count, src.start + offset, str(src.path))

    def write_tensor(self, t: OutTensor, dst_fd: int, pos: int) -> None:
        if t.encode is not None:
            return self._write_encoded([(t, dst_fd, pos)])
        if not t.flat:
            return self._write_joined(t, dst_fd, pos)
        for i, part in enumerate(t.parts):
            if part.init:  # generated, the tensor's only part (upcycling's router): no source bytes
                from .noise import generate

                pwrite_all(dst_fd, generate(part.init, part.noise, t.dtype, t.nbytes, self.plan.seed, t.name, i,
                                            generator=self.plan.noise_generator), pos)
                self.progress(t.nbytes)
                continue
            src = self.tensors[part.source]
            off, n = part.span(src.nbytes)
            if part.is_copy:
                for k in range(0, n, _LOCKED_COPY):
                    with self.writing(dst_fd):
                        self.copier.copy(self.fd(src.path), src.start + off + k, dst_fd, pos + k,
                                         min(_LOCKED_COPY, n - k), str(src.path))
            elif self.in_pieces(part, src.dtype):
                self._write_pieces(t, i, off, n, dst_fd, pos)
            elif part.fill is not None:  # filled: the source's bytes are not needed
                pwrite_all(dst_fd, self._part_bytes(t, i, bytearray(n)), pos)
            else:  # read into this thread's buffer, transformed there (noise, scale) or into a new one
                raw = self._buffer(n)
                pread_into(self.fd(src.path), raw, src.start + off, str(src.path))
                data = self._part_bytes(t, i, raw)
                with self.writing(dst_fd):
                    pwrite_all(dst_fd, data, pos)
            pos += n
            self.progress(n)

    def in_pieces(self, part: Any, dtype: str) -> bool:
        """Whether a part is made `_PIECE` bytes at a time (`_write_pieces`, `noise.in_pieces`)."""
        from .noise import in_pieces

        return in_pieces(part, dtype, self.plan.noise_generator, self.device)

    def _write_pieces(self, t: OutTensor, i: int, off: int, n: int, dst_fd: int, pos: int) -> None:
        """Part i of `t` (bytes off..off+n of its source) read, noised or scaled and written a piece at a
        time: each piece stays in the CPU's cache from its read to its write (reading and writing 4 MiB
        at once cost 1.3-1.6 times the system time of 1 MiB pieces for the same GiB on this machine)."""
        from .noise import count_nonfinite, noise_piece

        part = t.parts[i]
        src = self.tensors[part.source]
        fd, size = self.fd(src.path), DTYPE_SIZES[src.dtype]
        count = 0 if part.rows is None and self.nonfinite.get(part.source) is None else None
        for k in range(0, n, _PIECE):
            m = min(_PIECE, n - k)
            raw = self._buffer(m)
            pread_into(fd, raw, src.start + off + k, str(src.path))
            if count is not None:  # these bytes pass through the arithmetic anyway
                count += count_nonfinite(raw, src.dtype)
            data = noise_piece(raw, src.dtype, part, self.plan.seed, t.name, i, k // size,
                               generator=self.plan.noise_generator)
            with self.writing(dst_fd):
                pwrite_all(dst_fd, data, pos + k)
        if self.nonfinite.get(part.source) is None:
            self.nonfinite[part.source] = count

    def write_items(self, items: list[tuple[OutTensor, int, int]]) -> dict[int, int]:
        """One work item (`_work_items`): a tensor, the members of a requantised weight together, or a run of
        byte copies into one file (`_copy_runs`). Returns the bytes written per output file."""
        if len(items) > 1 and items[0][0].encode is None:
            return {items[0][1]: self.copy_run(items)}
        if (self.one_torch_thread and not hasattr(self._local, "torch_threads")
                and any(p.needs_device for t, _, _ in items for p in t.parts)):
            self._one_torch_thread()
        if len(items) == 1:
            self.write_tensor(*items[0])
        else:
            self._write_encoded(items)
        written: dict[int, int] = {}
        for t, fd, _ in items:
            written[fd] = written.get(fd, 0) + t.nbytes
        return written

    def expect(self, fd: int, nbytes: int) -> None:
        """Output file `fd` will get `nbytes` of tensors (`wrote` starts its writeback when they are in)."""
        self._left[fd] = nbytes

    def wrote(self, written: dict[int, int]) -> None:
        """After a work item (`written`: its bytes per output file): start the disk writing a file as soon
        as its last tensor is in, and every `_WRITEBACK_EVERY` bytes before (`io.start_writeback`), so
        that writeback overlaps the work still to do instead of waiting for the final fsync."""
        due = []
        with self._unflushed_lock:
            for fd, n in written.items():
                left = self._left[fd] = self._left.get(fd, 0) - n
                since = self._unflushed.get(fd, 0) + n
                if since >= _WRITEBACK_EVERY or left <= 0:
                    due.append(fd)
                    since = 0
                self._unflushed[fd] = since
        for fd in due:
            start_writeback(fd)

    def copy_run(self, items: list[tuple[OutTensor, int, int]]) -> int:
        """Byte-copied tensors into one output file, under one hold of its lock (`writing`), source ranges
        that follow each other in both files merged into one copy (a DeepSeek-V3 growth copies 362,000
        small tensors: one call and one lock each, with two threads passing the GIL and the lock back
        and forth, cost more CPU than the copies). Returns the bytes copied."""
        runs: list[list[Any]] = []  # [source fd, source offset, output offset, length, source path]
        fd, total = items[0][1], 0
        for t, _, pos in items:
            for part in t.parts:
                src = self.tensors[part.source]
                off, n = part.span(src.nbytes)
                sfd, start = self.fd(src.path), src.start + off
                last = runs[-1] if runs else None
                if last is not None and last[0] == sfd and last[1] + last[3] == start and last[2] + last[3] == pos:
                    last[3] += n
                else:
                    runs.append([sfd, start, pos, n, src.path])
                pos += n
                total += n
        # Small calls (DeepSeek-V3's tensors at small shapes: 13 KB on average) one thread at a time: each
        # call lets go of the GIL, and a second thread making small calls too takes it at every call
        small = self._small_copies if total < len(runs) * _SMALL_CALL else nullcontext()
        with self.writing(fd), small:
            for sfd, start, pos, n, path in runs:
                self.copier.copy(sfd, start, fd, pos, n, str(path))
        self.progress(total)
        return total

    def _write_encoded(self, items: list[tuple[OutTensor, int, int]]) -> None:
        """Dequantised, converted or requantised tensors (moegrow.quant), each given with its file and
        position: part by part and chunk by chunk, byte copies where a part is one (an original's values
        or scales kept as they are). The members of one requantised weight come together, so that each
        chunk of a copy is decoded, noised and encoded once for all of them."""
        from .quant.transform import computed, verbatim

        first = items[0][0]
        pos = [p for _, _, p in items]
        for i in range(len(first.parts)):
            computing = []
            for k, (t, fd, _) in enumerate(items):
                part = t.parts[i]
                if not verbatim(t, part, self.tensors):
                    computing.append(k)
                    continue
                src = self.tensors[part.source]
                off, n = part.span(src.nbytes)
                self.copier.copy(self.fd(src.path), src.start + off, fd, pos[k], n, str(src.path))
                pos[k] += n
                self.progress(n)
            if not computing:
                continue
            for _, out, _ in computed(self.plan, items[computing[0]][0], i, self.tensors, self.read, self.device):
                for k in computing:
                    t, fd, _ = items[k]
                    data = out[t.encode.member if t.encode and t.encode.format else ""]
                    pwrite_all(fd, data, pos[k])
                    pos[k] += len(data)
                    self.progress(len(data))

    def _write_joined(self, t: OutTensor, dst_fd: int, pos: int) -> None:
        """Parts concatenated along an inner axis (an expert-index table's top-k axis): through torch."""
        from .noise import join

        pieces = []
        for i, part in enumerate(t.parts):
            src = self.tensors[part.source]
            raw = bytearray(pread_exact(self.fd(src.path), src.nbytes, src.start, str(src.path)))
            pieces.append((bytearray(self._part_bytes(t, i, raw)), src.shape))
        data = join(pieces, t.dtype, t.axis)
        pwrite_all(dst_fd, data, pos)
        self.progress(len(data))


def _work_items(work: list[tuple[OutTensor, int, int]]) -> list[list[tuple[OutTensor, int, int]]]:
    """The tensors to write (each with its file and position) as work items: one per tensor, but the
    members of a requantised weight (one `Encode.group`) in one item."""
    items: list[list[tuple[OutTensor, int, int]]] = []
    groups: dict[str, list[tuple[OutTensor, int, int]]] = {}
    for w in work:
        encode = w[0].encode
        if encode is None or not encode.format:
            items.append([w])
        elif encode.group in groups:
            groups[encode.group].append(w)
        else:
            groups[encode.group] = [w]
            items.append(groups[encode.group])
    return items


def _copy_runs(items: list[list[tuple[OutTensor, int, int]]]) -> list[list[tuple[OutTensor, int, int]]]:
    """`items` with the byte-copied tensors smaller than `_LOCKED_COPY` gathered, in file order, into runs of
    at most `_LOCKED_COPY` bytes into one file (`_Job.copy_run`); every other item as it is."""
    out: list[list[tuple[OutTensor, int, int]]] = []
    run: list[tuple[OutTensor, int, int]] = []
    size = 0
    for item in items:
        t, fd, _ = item[0]
        if len(item) > 1 or t.encode is not None or not t.is_copy or not t.flat:
            out.append(item)
            continue
        n = t.nbytes
        if n >= _LOCKED_COPY:
            out.append(item)
            continue
        if run and (run[-1][1] != fd or size + n > _LOCKED_COPY):
            out.append(run)
            run, size = [], 0
        run.append(item[0])
        size += n
    if run:
        out.append(run)
    return out


def _order(item: list[tuple[OutTensor, int, int]]) -> tuple[bool, int]:
    """Sort key of a work item: byte copies first, then by size, largest first (a run of copies: by the span
    of the file it covers, its size or more, known without asking every tensor)."""
    if len(item) > 1 and item[0][0].encode is None:  # `_copy_runs`
        return False, item[0][2] - item[-1][2] - item[-1][0].nbytes
    return not all(t.is_copy for t, _, _ in item), -sum(t.nbytes for t, _, _ in item)


def write_shards(plan: Plan, tensors: Mapping[str, SourceTensor], folder: Path, max_shard_size: int,
                 device: str, threads: int, progress: Callable[[int], None] | None,
                 warnings: list[str] | None = None, select: Collection[int] | None = None,
                 write_index: bool = True, prefetch: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """Write the plan's tensors as safetensors shards (+ index when sharded) into `folder`.

    `select`: the indices of the shards to write (one rank's share, see moegrow.ranks), all by
    default; `write_index`: whether to write the index; `prefetch`: modules needed after the shards
    (the card's), imported in the background while the byte copies run.

    Source tensors that pass through torch (noised copies) are checked for NaN and Inf on the
    way; one warning per such tensor is appended to `warnings`. Returns the shard names and the
    device the tensor math ran on.
    """
    shards = split_shards(plan.tensors, max_shard_size)
    names = shard_names(len(shards))
    job = _Job(plan, tensors, device, progress)
    numpy_needed, torch_needed = _math_needed(plan, tensors, job)
    # numpy first (torch imports it too): `import_numpy` keeps its BLAS threads from spinning
    modules = (("numpy",) if numpy_needed else ()) + (("torch",) if torch_needed else ()) + prefetch
    work: list[tuple[OutTensor, int, int]] = []
    out_fds: list[int] = []
    try:
        for k, (shard, name) in enumerate(zip(shards, names)):
            if select is not None and k not in select:
                continue
            sizes = [t.nbytes for t in shard]
            head, offsets = header_bytes((t.name, t.dtype, t.shape, n) for t, n in zip(shard, sizes))
            fd = os.open(folder / name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
            out_fds.append(fd)
            job.write_locks[fd] = threading.Lock()
            job.expect(fd, sum(sizes))
            pwrite_all(fd, head, 0)
            os.ftruncate(fd, len(head) + offsets[-1] + sizes[-1] if shard else len(head))
            work.extend((t, fd, len(head) + off) for t, off in zip(shard, offsets))
        # Byte copies first (they need no torch, which imports meanwhile), then transformed
        # tensors; large ones first in each, so that one big tensor does not finish the job alone.
        items = _copy_runs(_work_items(work))
        items.sort(key=_order)
        if modules:
            # torch takes a second or more to import: do it while the byte copies run (first: the
            # transformed tensors wait for it), then what is needed after the shards. Started once the
            # work is listed, so that it does not hold the GIL while the first copy waits for the list.
            threading.Thread(target=_import_all, args=(modules,), daemon=True).start()
        if threads <= 1:
            for item in items:
                job.wrote(job.write_items(item))
        else:
            # `threads` workers pull from one queue (a future per tensor would cost about 1.4 KiB
            # each: 500 MiB at DeepSeek-V3's 365,000 output tensors)
            queue = iter(items)
            lock = threading.Lock()
            stop = threading.Event()

            job.one_torch_thread = torch_needed

            def worker() -> None:
                try:
                    while not stop.is_set():
                        with lock:
                            item = next(queue, None)
                        if item is None:
                            return
                        try:
                            job.wrote(job.write_items(item))
                        except BaseException:
                            stop.set()
                            raise
                finally:
                    job.restore_torch_threads()

            pool = ThreadPoolExecutor(threads)
            try:
                for f in [pool.submit(worker) for _ in range(threads)]:
                    f.result()
            finally:
                # On an error or an interrupt, drop the queued tensors and let the running ones
                # finish before their files are closed and removed.
                stop.set()
                with _signals_deferred():
                    pool.shutdown(wait=True, cancel_futures=True)
        _fsync_all(out_fds)
    finally:
        for fd in out_fds:
            os.close(fd)
        job.close()
    if warnings is not None:
        warnings.extend(nonfinite_message(tensors[name], n) + "; grown as it is (--strict refuses it)"
                        for name, n in sorted(job.nonfinite.items()) if n)
    if len(shards) > 1 and write_index:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in plan.tensors)},
            "weight_map": {t.name: n for shard, n in zip(shards, names) for t in shard},
        }
        (folder / INDEX_NAME).write_text(index_json(index))
    return names, job.resolved_device


def _fsync_all(fds: list[int]) -> None:
    """fsync every output shard, several at once: the filesystem commits concurrent fsyncs together
    (525 files of 64 KiB on ext4 here: 0.13 s one after the other, 0.07 s eight at once)."""
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    with ThreadPoolExecutor(min(_FSYNC_THREADS, len(fds))) as pool:
        for _ in pool.map(os.fsync, fds):  # an error (EIO, ENOSPC) is raised here
            pass


def _math_needed(plan: Plan, tensors: Mapping[str, SourceTensor], job: _Job) -> tuple[bool, bool]:
    """(numpy, torch): whether some tensor of the plan is more than a byte copy, and whether some is made
    with torch (`noise.needs_torch`), in one pass. Decided without importing torch: `auto` is the CPU
    where no GPU device node exists, else taken as CUDA."""
    from .noise import gpu_device_node, needs_torch

    device = job.requested_device
    if device == "auto":
        device = "cuda" if gpu_device_node() else "cpu"
    computed = False
    for t in plan.tensors:
        if t.is_copy:
            continue
        computed = True
        if t.encode is not None or not t.flat:
            return True, True
        for p in t.parts:
            dtype = t.dtype if p.init else tensors[p.source].dtype
            if needs_torch(p, dtype, plan.noise_generator, device):
                return True, True
    return computed, False


def _card_modules(source_folder: Path) -> tuple[str, ...]:
    from .card import card_modules

    return card_modules(source_folder)


def _import_all(modules: tuple[str, ...]) -> None:
    from .numpy_import import import_numpy

    for name in modules:
        import_numpy() if name == "numpy" else importlib.import_module(name)


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


def check_space(plan: Plan, folder: Path) -> None:
    """Refuse before writing anything when the output's filesystem cannot hold the tensors."""
    needed = sum(t.nbytes for t in plan.tensors)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # not knowable here (e.g. a network filesystem): the write reports ENOSPC
    if needed > free:
        raise OutputError(f"{folder}: not enough free space: the output needs {format_size(needed)}, "
                          f"the filesystem has {format_size(free)} free")


def format_size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON; a top-level value that is a Mapping but not a dict (the provenance
    record's tensor mapping, 365,000 entries for a grown DeepSeek-V3) is streamed last, one entry per
    line, never held as one string."""
    lazy = {k: v for k, v in obj.items() if isinstance(v, Mapping) and not isinstance(v, dict)} \
        if isinstance(obj, dict) else {}
    head = json.dumps({k: v for k, v in obj.items() if k not in lazy} if lazy else obj, indent=2, sort_keys=True)
    with open(path, "w", encoding="utf-8") as f:
        if not lazy:
            f.write(head + "\n")
            return
        f.write(head[:-2] + ",\n" if head != "{}" else "{\n")
        compact = json.JSONEncoder(separators=(",", ":")).encode  # json.dumps(..., separators=...), built once
        for n, (key, mapping) in enumerate(lazy.items()):
            f.write(f"  {json.dumps(key)}: {{")
            sep = "\n"
            fast = getattr(mapping, "json_items", None)  # provenance.TensorMapping: the same text, made faster
            for name, text in fast(compact) if fast else ((n, compact(v)) for n, v in mapping.items()):
                f.write(f"{sep}    {encode_basestring_ascii(name)}: {text}")  # json.dumps(name)
                sep = ",\n"
            f.write("\n  }" + (",\n" if n < len(lazy) - 1 else "\n}\n"))


def write_metadata(folder: Path, plan: Plan, source_folder: Path, provenance: Mapping[str, Any],
                   card: Callable[[str], str] | None, device: str) -> None:
    """Everything but the shards, written last and fsynced: config, the source's side files, the model
    card (README.md, in place of the source's) and the provenance record."""
    write_json(folder / "config.json", plan.config)
    written = [folder / "config.json", *(folder / f for f in copy_side_files(source_folder, folder))]
    if card is not None:
        (folder / "README.md").write_text(card(device), encoding="utf-8")
        written.append(folder / "README.md")
    write_json(folder / "moegrow.json", provenance)
    written.append(folder / "moegrow.json")
    for path in dict.fromkeys(written):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def execute(plan: Plan, tensors: Mapping[str, SourceTensor], source_folder: Path, output: Path, *,
            provenance: Mapping[str, Any], max_shard_size: int = DEFAULT_MAX_SHARD,
            device: str = "cpu", threads: int = 2, force: bool = False,
            progress: Callable[[int], None] | None = None, card: Callable[[str], str] | None = None,
            check_source: Callable[[], None] | None = None) -> Written:
    """Write the grown checkpoint to `output`; on any failure leave no output and no temp folder.

    `card(device)`: the model card (README.md, in place of the source's), given where tensor math ran.
    `check_source` runs once everything is written, before the rename: it raises when the source
    changed during the run (see `Source.check_unchanged`), so that mixed bytes are never published.
    """
    target = _absolute(output)
    clean_stale_partials(target)  # first: it may put back an OUTPUT that a killed --force run moved
    check_output(output, source_folder, force)
    check_space(plan, target.parent)
    start = time.perf_counter()
    tmp = target.parent / f".{target.name}{PARTIAL_MARK}{os.getpid()}"
    try:
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"{target.parent}: cannot create the output there: {e.strerror or e}") from None
    _LIVE.add(tmp)
    warnings: list[str] = []
    try:
        names, device = write_shards(plan, tensors, tmp, max_shard_size, device, threads, progress, warnings,
                                     prefetch=_card_modules(source_folder) if card is not None else ())
        write_metadata(tmp, plan, source_folder, {**provenance, "noise_device": device}, card, device)
        if check_source is not None:
            check_source()
        with _signals_deferred():
            _replace(tmp, target, force)
    except BaseException as e:
        with _signals_deferred():
            _remove(tmp)
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            raise OutputError(f"{output}: write failed: {e.strerror or e}{where}") from None
        raise
    finally:
        _LIVE.discard(tmp)
    total = sum(t.nbytes for t in plan.tensors)
    return Written(output, names, total, time.perf_counter() - start, warnings)


def _replace(tmp: Path, output: Path, force: bool = True) -> None:
    """Rename the finished folder to OUTPUT, atomically with respect to other runs.

    renameat2 RENAME_NOREPLACE fails when OUTPUT exists by now (another run finished first): without
    --force this run loses (exit 2); with it, RENAME_EXCHANGE swaps the new folder with the old
    OUTPUT in one step (OUTPUT is never missing, the last run to swap wins) and the old one, now
    at `tmp`, is deleted. Where renameat2 is missing, the same under a lock (`_replace_locked`).
    """
    while True:
        try:
            if not _rename_flags(tmp, output, RENAME_NOREPLACE):
                return _replace_locked(tmp, output, force)
        except FileExistsError:
            if not force:
                raise OutputError(_lost_race(output)) from None
            try:
                if not _rename_flags(tmp, output, RENAME_EXCHANGE):
                    return _replace_locked(tmp, output, force)
            except FileNotFoundError:
                continue  # OUTPUT was removed in between: try the plain rename again
            _fsync_dir(output.parent)
            _remove(tmp)  # the old OUTPUT
            return
        _fsync_dir(output.parent)
        return


def _replace_locked(tmp: Path, output: Path, force: bool) -> None:
    """`_replace` by plain renames, under the OUTPUT lock: check, then rename (or, for --force,
    move the old OUTPUT aside, rename, delete the old one)."""
    trash = output.parent / f".{output.name}{OLD_MARK}{os.getpid()}"
    with _output_lock(output):
        if not _exists(output):
            os.rename(tmp, output)
        elif not force:
            raise OutputError(_lost_race(output))
        else:
            _remove(trash)
            os.rename(output, trash)
            try:
                os.rename(tmp, output)
            except BaseException:
                os.rename(trash, output)  # put the old OUTPUT back
                raise
    _fsync_dir(output.parent)
    _remove(trash)


def _lost_race(output: Path) -> str:
    return f"{output}: already exists: another run wrote it while this one ran (use --force to replace it)"


def _fsync_dir(path: Path) -> None:
    """Make the renames durable (best effort: not every filesystem can fsync a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
