"""One growth written by several processes (torchrun, srun): which shards each writes, and how they agree.

A launcher that sets WORLD_SIZE > 1 (and RANK, MASTER_ADDR, MASTER_PORT) starts W copies of the same
command. Every rank plans the same plan (it is a pure function of the source), so the shard split
is the same everywhere; `assign` gives each shard to one rank, balancing bytes. Rank 0 creates the
partial folder (named by its PID) and a token file in it; every rank must read that token back,
which proves OUTPUT's parent is one shared folder. Each rank writes its shards there; the ranks then
agree (an all-gather of every rank's outcome over torch.distributed, gloo): if any failed, every rank
exits non-zero and rank 0 removes the folder. Only rank 0 writes config, card, provenance and index
and renames, after every rank finished; the bytes are those of a single-process run.

Without WORLD_SIZE, or with 1, none of this runs and torch.distributed is not imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .errors import MoegrowError, OutputError
from .io import TensorInfo as SourceTensor
from .plan import Plan

TOKEN_NAME = ".moegrow-ranks-token"  # in the partial folder; removed before anything is published
# How long a rank waits for the others at a meeting point (the slowest rank's writing included).
# A rank that dies outright is noticed sooner: its launcher (torchrun, srun --kill-on-bad-exit)
# stops the others, and gloo fails a collective whose peer closed its connection.
TIMEOUT = timedelta(hours=24)


class RankError(MoegrowError):
    """Another rank of a multi-process growth failed, or the ranks cannot work together."""


def world_size() -> int:
    """WORLD_SIZE as the launcher set it (1 when unset)."""
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """RANK as the launcher set it (0 when unset)."""
    return _env_int("RANK", 0)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise RankError(f"environment variable {name}={text!r} is not a number") from None


def assign(sizes: Sequence[int], world: int) -> list[int]:
    """The rank that writes each shard: largest shards first, each to the least-loaded rank
    (ties to the lowest rank). Deterministic from the sizes, so every rank computes the same."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def shards_of(plan: Plan, max_shard_size: int, rank: int, world: int) -> list[int]:
    """Indices of the output shards that `rank` writes."""
    from .execute import split_shards

    sizes = [sum(t.nbytes for t in s) for s in split_shards(plan.tensors, max_shard_size)]
    return [i for i, r in enumerate(assign(sizes, world)) if r == rank]


def share(plan: Plan, max_shard_size: int, rank: int, world: int) -> int:
    """Bytes of tensors that `rank` writes (its progress bar's total)."""
    from .execute import split_shards

    shards = split_shards(plan.tensors, max_shard_size)
    return sum(t.nbytes for i in shards_of(plan, max_shard_size, rank, world) for t in shards[i])


@dataclass
class Ranks:
    """This process's place in a started process group."""

    rank: int
    size: int

    def gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: BaseException | None, payload: Any = None) -> list[Any]:
        """Meet every rank: return every rank's payload when none failed; else raise, on every
        rank: `error` itself where it is given, elsewhere a RankError naming the first failed rank."""
        mine = None if error is None else _describe(error)
        try:
            outcomes = self.gather((mine, payload))
        except BaseException as e:
            if error is not None:
                raise error from None
            if isinstance(e, RuntimeError):
                raise RankError(f"rank {self.rank}: lost contact with the other ranks ({e})") from None
            raise
        if error is not None:
            error.moegrow_agreed = True  # type: ignore[union-attr]
            raise error
        failed = [(r, o[0]) for r, o in enumerate(outcomes) if o[0] is not None]
        if failed:
            r, (host, code, message) = failed[0]
            exc = RankError(f"rank {r} (on {host}) failed: {message}")
            exc.exit_code = code
            exc.moegrow_agreed = True  # type: ignore[attr-defined]
            raise exc
        return [o[1] for o in outcomes]

    def fail(self, error: BaseException) -> None:
        """Raise `error` after telling the other ranks, unless an `agree` already did.

        Every meeting point is the same collective, so a rank that fails anywhere (planning, say)
        meets the others at whichever point they wait: they fail too instead of waiting forever."""
        if getattr(error, "moegrow_agreed", False):
            raise error
        self.agree(error)


def _describe(e: BaseException) -> tuple[str, int, str]:
    """(host, exit code, one-line message) of a rank's failure, for the others to report."""
    if isinstance(e, MoegrowError):
        code, message = e.exit_code, str(e)
    elif isinstance(e, KeyboardInterrupt):
        code, message = 130, "interrupted"
    elif type(e).__name__ == "Terminated":
        code, message = 143, "terminated"
    else:
        code, message = 2, f"{type(e).__name__}: {e}"
    return socket.gethostname(), code, message


@contextmanager
def joined(enabled: bool = True) -> Iterator[Ranks | None]:
    """Join the launcher's process group (gloo) when WORLD_SIZE > 1 (and `enabled`); None, importing
    nothing, else."""
    size = world_size()
    if size <= 1 or not enabled:
        yield None
        return
    me = rank()
    if not 0 <= me < size:
        raise RankError(f"RANK={me} is outside 0..WORLD_SIZE-1 ({size - 1})")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RankError(f"WORLD_SIZE={size} but {' and '.join(missing)} not set (set them, or run under "
                        "torchrun; see docs/usage.md)")
    import torch.distributed as dist

    if not dist.is_available():
        raise RankError("this torch build has no torch.distributed: run a single process")
    try:
        dist.init_process_group("gloo", rank=me, world_size=size, timeout=TIMEOUT)
    except (RuntimeError, ValueError) as e:
        raise RankError(f"rank {me}: cannot join the other ranks at {os.environ['MASTER_ADDR']}:"
                        f"{os.environ['MASTER_PORT']}: {e}") from None
    try:
        yield Ranks(me, size)
    finally:
        dist.destroy_process_group()


def execute_ranks(ranks: Ranks, plan: Plan, tensors: Mapping[str, SourceTensor], source_folder: Path,
                  output: Path, *, provenance: Mapping[str, Any], max_shard_size: int, device: str,
                  threads: int, force: bool, progress: Callable[[int], None] | None,
                  card: Callable[[str], str] | None, check_source: Callable[[], None] | None) -> Any:
    """`execute.execute` by every rank of the group together (same arguments, same result on rank 0)."""
    from . import execute as ex

    target = ex._absolute(output)
    start = time.perf_counter()
    lead = ranks.rank == 0
    tmp: Path | None = None  # rank 0's partial folder, until published
    live: Path | None = None
    try:
        setup: BaseException | None = None
        token = ""
        if lead:
            try:
                ex.clean_stale_partials(target)
                ex.check_output(output, source_folder, force)
                ex.check_space(plan, target.parent)
                tmp = target.parent / f".{target.name}{ex.PARTIAL_MARK}{os.getpid()}"
                try:
                    tmp.mkdir()
                except OSError as e:
                    raise OutputError(f"{target.parent}: cannot create the output there: {e.strerror or e}") from None
                ex._LIVE.add(tmp)
                live = tmp
                token = secrets.token_hex(16)
                (tmp / TOKEN_NAME).write_text(token)
            except BaseException as e:
                setup = e
        digests = ranks.agree(setup, fingerprint(plan, tensors, max_shard_size))
        if len(set(digests)) > 1:
            odd = next(r for r, d in enumerate(digests) if d != digests[0])
            exc = RankError(f"rank {odd} planned a different growth than rank 0 (its source, config or "
                            "flags differ): every rank must grow the same source with the same flags")
            exc.moegrow_agreed = True  # type: ignore[attr-defined]  # every rank saw the digests
            raise exc
        folder, token = ranks.broadcast((str(tmp), token))
        folder = Path(folder)
        ranks.agree(None if lead else _check_shared(folder, token, ranks.rank))
        mine = shards_of(plan, max_shard_size, ranks.rank, ranks.size)
        warnings: list[str] = []
        failure: BaseException | None = None
        used = "none"
        try:
            names, used = ex.write_shards(plan, tensors, folder, max_shard_size, device, threads, progress,
                                          warnings, select=set(mine), write_index=lead)
            if check_source is not None:  # this rank's copy of the source (node-local copies differ)
                check_source()
        except BaseException as e:
            failure = _as_output_error(e, output)
        results = ranks.agree(failure, (warnings, used))
        all_warnings = sorted(dict.fromkeys(w for ws, _ in results for w in ws))
        final: BaseException | None = None
        if lead:
            assert tmp is not None
            try:
                used = next((d for _, d in results if d != "none"), "none")
                (tmp / TOKEN_NAME).unlink()
                ex.write_metadata(tmp, plan, source_folder, {**provenance, "noise_device": used}, card, used)
                if check_source is not None:
                    check_source()
                with ex._signals_deferred():
                    ex._replace(tmp, target, force)
                tmp = None  # published: nothing to remove
            except BaseException as e:
                final = _as_output_error(e, output)
        ranks.agree(final)
    except BaseException:
        if tmp is not None:
            with ex._signals_deferred():
                ex._remove(tmp)
        raise
    finally:
        if live is not None:
            ex._LIVE.discard(live)
    total = sum(t.nbytes for t in plan.tensors)
    return ex.Written(output, names, total, time.perf_counter() - start, all_warnings)


def fingerprint(plan: Plan, tensors: Mapping[str, SourceTensor], max_shard_size: int) -> str:
    """sha256 of what decides the output bytes: every output tensor and how it is made, the new
    config, the seed, the shard limit, and where each source tensor lies in its shard file."""
    h = hashlib.sha256(json.dumps([plan.config, plan.seed, max_shard_size], sort_keys=True, default=str).encode())
    for t in plan.tensors:
        h.update(repr(t).encode())
    for name in sorted(plan.sources()):
        src = tensors[name]
        h.update(repr((name, src.path.name, src.dtype, src.shape, src.start, src.end)).encode())
    return h.hexdigest()


def _check_shared(folder: Path, token: str, me: int) -> RankError | None:
    """None when this rank sees rank 0's partial folder and token (OUTPUT's parent is shared)."""
    try:
        seen = (folder / TOKEN_NAME).read_text()
    except OSError:
        seen = None
    if seen == token:
        return None
    return RankError(f"{folder.parent}: rank {me} (on {socket.gethostname()}) does not see the folder rank 0 "
                     "created there: OUTPUT's parent must be one folder shared by every rank (a parallel "
                     "or network filesystem mounted at the same path on every node)")


def _as_output_error(e: BaseException, output: Path) -> BaseException:
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return OutputError(f"{output}: write failed: {e.strerror or e}{where}")
    return e
