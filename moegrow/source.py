"""Opening a source checkpoint: a local folder or a Hugging Face Hub repo id.

Hub sources are fetched with huggingface_hub's own `snapshot_download` into the normal cache
(HF_HOME, HF_ENDPOINT, HF_TOKEN and HF_HUB_OFFLINE honoured), and only the files a growth
needs: config, index, safetensors shards, tokenizer, generation and template files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, SourceError
from .io import INDEX_NAME, PICKLE_SUFFIXES, TensorInfo, read_index

HUB_PATTERNS = [
    "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md", "*.tiktoken", "*.py",
    "*.yaml", "LICENSE*", "tokenizer*", "merges.txt", "vocab*",
]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class FileStamp:
    """A source file as the run opened it: a later difference means the run read mixed bytes.

    size, mtime and inode catch rewrites and replacements; the header's hash (the whole file for
    config.json) catches a header edit whose mtime was put back. A stat and a header read per
    file: cheap even for a checkpoint of 163 shards.
    """

    size: int
    mtime_ns: int
    inode: tuple[int, int]  # (st_dev, st_ino)
    head_sha256: str


def _head(path: Path, whole: bool) -> bytes:
    """A safetensors file's 8-byte length and header JSON (at most 100 MB), or the whole file."""
    with open(path, "rb") as f:
        if whole:
            return f.read()
        head = f.read(8)
        return head + f.read(min(int.from_bytes(head, "little"), 100 * 1024 * 1024)) if len(head) == 8 else head


# Files stamped by size, mtime and inode alone: a DCP chunk file (`.distcp`, training checkpoints) has no
# header, and hashing its bytes would read the whole checkpoint a second time.
STAT_ONLY_SUFFIXES = (".distcp",)
_WHOLE_MAX = 16 * 1024 * 1024  # other files (config.json, .metadata, common.pt) are hashed whole up to this size


def _hashed(path: Path) -> bytes:
    """What a stamp hashes: a safetensors header, a small file's bytes, or nothing (stat-only files)."""
    if path.suffix == ".safetensors":
        return _head(path, whole=False)
    if path.suffix in STAT_ONLY_SUFFIXES or os.stat(path).st_size > _WHOLE_MAX:
        return b""
    return _head(path, whole=True)


def stamp(path: Path, st: os.stat_result | None = None) -> FileStamp:
    """Stamp `path`; `st`, a stat taken before the file was first parsed, dates the stamp from then."""
    st = st or os.stat(path)
    return FileStamp(st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino), hashlib.sha256(_hashed(path)).hexdigest())


def stamp_changes(path: Path, old: FileStamp) -> list[str]:
    """What differs between `path` now and its stamp: [] when nothing does."""
    try:
        new = stamp(path)
    except OSError:
        return ["removed or unreadable"]
    diff = [word for word, a, b in (("size", old.size, new.size), ("mtime", old.mtime_ns, new.mtime_ns),
                                    ("inode", old.inode, new.inode),
                                    ("header" if path.suffix == ".safetensors" else "content",
                                     old.head_sha256, new.head_sha256)) if a != b]
    return diff


def check_unchanged(stamps: dict[Path, FileStamp]) -> None:
    """Raise SourceError (exit 2) naming the first stamped file that differs from its stamp."""
    for path, old in stamps.items():
        diff = stamp_changes(path, old)
        if diff:
            raise SourceError(f"{path}: changed during the run ({', '.join(diff)}); "
                              "nothing was written")


def stat_tree(root: Path) -> dict[Path, os.stat_result]:
    """A stat of every file under `root` (a folder), taken before any is parsed (see `stamp`)."""
    found: dict[Path, os.stat_result] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            p = Path(folder) / name
            with contextlib.suppress(OSError):  # gone or unreadable: reported where it is read
                found[p] = os.stat(p)
    return found


@dataclass
class Source:
    """A checkpoint ready to plan from: its folder, config and tensor index."""

    spec: str
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: list[Path] = field(default_factory=list)
    stamps: dict[Path, FileStamp] = field(default_factory=dict)  # shards and config.json, at open

    def check_unchanged(self) -> None:
        """Refuse (exit 2) when a stamped file changed since the source was opened: the bytes read
        may then mix old and new. Run after the output is written, before it is renamed into place."""
        check_unchanged(self.stamps)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def largest_shard_bytes(self) -> int | None:
        """Tensor bytes of the source's largest shard, or None for a single-file source."""
        per_file: dict[Path, int] = {}
        for t in self.tensors.values():
            per_file[t.path] = per_file.get(t.path, 0) + t.nbytes
        return max(per_file.values()) if len(per_file) > 1 else None

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the source in a provenance record: Hub commit or per-file hashes.

        File hashes are sha256 of each shard's header and size (the header pins every tensor's
        name, dtype, shape and offsets; hashing all bytes would double the I/O of a growth).
        """
        shards = sorted({t.path for t in self.tensors.values()})
        files = {}
        for p in shards:
            s = self.stamps.get(p) or stamp(p)  # the stamp: the bytes the run checks it read
            files[p.name] = {"size": s.size, "header_sha256": s.head_sha256}
        cfg = (self.folder / "config.json").read_bytes()
        out: dict[str, Any] = {"spec": self.spec, "config_sha256": hashlib.sha256(cfg).hexdigest(),
                               "files": files}
        if self.repo_id:
            out.update(repo_id=self.repo_id, revision=self.revision, commit=self.commit)
        else:
            out["path"] = str(self.folder.resolve())
        return out


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: {'not a file' if path.exists() else 'missing'}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (not UTF-8: {e.reason} at byte {e.start})") from None
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{path}: not valid JSON ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def is_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and not Path(spec).exists()


def download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Fetch what a growth needs from the Hub; return (snapshot folder, commit hash)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RevisionNotFoundError:
        raise SourceError(f"{where}: revision {revision!r} not found on the Hub") from None
    except GatedRepoError:
        raise SourceError(f"{where}: gated repo; accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise SourceError(f"{where}: repository not found on the Hub (or private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{where}: not in the local Hub cache and the Hub cannot be reached "
                          "(offline: HF_HUB_OFFLINE or no network)") from None
    except OSError as e:
        raise SourceError(f"{where}: download failed: {e}") from None
    except Exception as e:  # huggingface_hub raises HTTP errors of several kinds
        raise SourceError(f"{where}: download failed: {type(e).__name__}: {e}".splitlines()[0]) from None
    commit = path.name if path.parent.name == "snapshots" else None
    return path, commit


def open_source(spec: str, revision: str | None = None) -> Source:
    """Open a local folder or Hub repo: read its config and validate its tensor index."""
    path = Path(spec)
    repo_id = commit = None
    if path.is_dir():
        folder = path
        if revision:
            raise SourceError(f"{spec}: --revision applies to Hub repos, not local folders")
    elif path.exists():
        raise SourceError(f"{spec}: not a folder (give the checkpoint's folder)")
    elif is_repo_id(spec):
        repo_id = spec
        folder, commit = download(spec, revision)
    else:
        raise SourceError(f"{spec}: no such folder, and not a Hub repo id (org/name)")
    # stat before parsing: a change from now on moves the mtime that the end of the run compares
    before = {}
    for p in [folder / "config.json", *folder.rglob("*.safetensors")]:
        with contextlib.suppress(OSError):  # missing or unreadable: reported by the reading below
            before[p] = os.stat(p)
    config = read_config(folder)
    if not any(folder.glob("*.safetensors")) and not (folder / INDEX_NAME).exists():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles or repo_id:
            only = f" (only {pickles[0]})" if pickles else ""
            raise SourceError(f"{spec}: no safetensors weights{only}; moegrow never loads pickle checkpoints")
    tensors = read_index(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    stamped = [folder / "config.json", *sorted({t.path for t in tensors.values()})]
    try:
        stamps = {p: stamp(p, before.get(p)) for p in stamped}
    except OSError as e:
        raise SourceError(f"{e.filename}: cannot read: {e.strerror or e}") from None
    return Source(spec, folder, config, tensors, repo_id, revision, commit, files, stamps)
