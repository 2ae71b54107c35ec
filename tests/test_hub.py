"""Hub sources with no network: a fake Hub on 127.0.0.1 serves tiny checkpoints to huggingface_hub.

The server implements just what `snapshot_download` calls (huggingface_hub 2.x):
  GET  /api/models/{repo}/revision/{rev}      model info: sha (the commit) and siblings
  GET  /api/models/{repo}/tree/{rev}          the file listing (oid, size, lfs)
  HEAD /{repo}/resolve/{rev}/{file}           X-Repo-Commit, ETag, Content-Length (X-Linked-* for LFS)
  GET  /{repo}/resolve/{rev}/{file}           the bytes
with the Hub's X-Error-Code headers (RepoNotFound, RevisionNotFound, EntryNotFound) on errors.
huggingface_hub reads its endpoint, cache and offline flag once at import, so the fixture patches
those module constants as well as the environment; a socket guard fails any connection that is
not to the loopback address.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from .conftest import run

REPO = "tiny-org/tiny-mixtral"
PICKLE_ONLY = "tiny-org/pickle-only"
LFS_SUFFIXES = (".safetensors", ".bin")
# what a growth needs from the tiny checkpoints (HUB_PATTERNS), and what it must never fetch
WANTED = {"config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json", "README.md"}
PICKLE = "pytorch_model.bin"


def _commit_id(files: dict[str, bytes]) -> str:
    h = hashlib.sha1()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
    return h.hexdigest()


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}

    def add(self, branch: str, files: dict[str, bytes]) -> str:
        commit = _commit_id(files)
        self.commits[commit] = files
        self.refs[branch] = commit
        return commit

    def resolve(self, rev: str) -> str | None:
        return self.refs.get(rev) or (rev if rev in self.commits else None)


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _send(self, status: int, data: bytes, body: bool, headers: dict[str, str] | None = None,
              ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, body: bool, **headers: str) -> None:
        self._send(status, json.dumps({"error": message}).encode(), body,
                   {"X-Error-Code": code, "X-Error-Message": message, **headers})

    def _serve(self, body: bool) -> None:
        raw = urlsplit(self.path).path
        self.server.requests.append((self.command, unquote(raw)))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", raw):
            kind, repo_id, rev, path = "info", unquote(m[1]), unquote(m[2] or "main"), ""
        elif m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", raw):
            kind, repo_id, rev, path = "tree", unquote(m[1]), unquote(m[2]), unquote(m[3] or "")
        elif m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", raw):
            kind, repo_id, rev, path = "file", unquote(m[1]), unquote(m[2]), unquote(m[3])
        else:
            return self._send(404, b'{"error": "not found"}', body)
        repo = self.server.repos.get(repo_id)
        if repo is None:  # the Hub answers 401 for missing (or private) repos
            return self._error(401, "RepoNotFound", "Repository not found", body)
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id: " + rev, body)
        files = repo.commits[commit]
        if kind == "info":
            info = {"id": repo_id, "sha": commit, "private": False,
                    "siblings": [{"rfilename": n} for n in sorted(files)]}
            return self._send(200, json.dumps(info).encode(), body)
        if kind == "tree":
            entries = []
            for name in sorted(n for n in files if n.startswith(path)):
                data = files[name]
                entry = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                entries.append(entry)
            return self._send(200, json.dumps(entries).encode(), body)
        if path not in files:
            return self._error(404, "EntryNotFound", path + " does not exist", body, **{"X-Repo-Commit": commit})
        data = files[path]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_git_oid(data)}"', "Accept-Ranges": "bytes"}
        if path.endswith(LFS_SUFFIXES):
            headers.update({"X-Linked-Etag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Linked-Size": str(len(data))})
        self.server.downloads.append((self.command, repo_id, path))
        return self._send(200, data, body, headers, ctype="application/octet-stream")


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, repos: dict[str, FakeRepo]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        self.downloads: list[tuple[str, str, str]] = []  # (method, repo, file) for each resolve answered
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
            self.server_close()

    def fetched(self, repo_id: str = REPO) -> set[str]:
        return {f for m, r, f in self.downloads if r == repo_id and m == "GET"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="session")
def repos_content(checkpoints) -> dict[str, list[tuple[str, dict[str, bytes]]]]:
    """{repo: [(branch, files)]}: mixtral on main (with a pickle beside it), olmoe on 'dev'."""
    extra = {PICKLE: pickle.dumps({"weights": "never loaded"}), "README.md": b"# tiny\n"}
    main = {**_files(checkpoints["mixtral"]), **extra}
    dev = {**_files(checkpoints["olmoe"]), **extra}
    assert WANTED | {PICKLE} == set(main)
    pickle_only = {"config.json": main["config.json"], PICKLE: main[PICKLE]}
    return {REPO: [("main", main), ("dev", dev)], PICKLE_ONLY: [("main", pickle_only)]}


def _point_hub_at(monkeypatch: pytest.MonkeyPatch, url: str, home: Path) -> None:
    """Environment and huggingface_hub's import-time constants: endpoint, cache, no token, online."""
    from huggingface_hub import constants

    cache = home / "hub"
    env = {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_DISABLE_XET": "1",
           "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    patches = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
               "HF_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": False,
               "HF_HUB_DISABLE_XET": True, "HF_TOKEN_PATH": str(home / "token"),
               "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for k, v in patches.items():
        monkeypatch.setattr(constants, k, v)
    # newer releases only: a registry fetched from the endpoint and cached under HF_HOME
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"), raising=False)


def _set_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _close_session() -> None:
    """Drop huggingface_hub's shared HTTP client (no pooled connections to a server of another test)."""
    from huggingface_hub.utils import _http

    close = getattr(_http, "close_session", None) or getattr(_http, "reset_sessions", None)
    if close:
        close()


@pytest.fixture
def hub(repos_content, tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """A fake Hub on 127.0.0.1 for this test, with HF_HOME in tmp_path; stopped at teardown."""
    real_connect = socket.socket.connect

    def loopback_only(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise OSError(f"test_hub: refused a connection to {address} (only 127.0.0.1 may be reached)")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", loopback_only)
    repos = {}
    for repo_id, branches in repos_content.items():
        repos[repo_id] = FakeRepo()
        for branch, files in branches:
            repos[repo_id].add(branch, files)
    server = FakeHub(repos)
    _point_hub_at(monkeypatch, server.url, tmp_path / "hf-home")
    _close_session()
    try:
        yield server
    finally:
        server.stop()
        _close_session()


def _commit(hub: FakeHub, branch: str = "main", repo_id: str = REPO) -> str:
    return hub.repos[repo_id].refs[branch]


def _snapshot(hub: FakeHub, commit: str, repo_id: str = REPO) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moegrow: error: "), err
    return lines[0]


def test_inspect_through_hub_fetches_only_safe_files(hub, checkpoints):
    code, out, err = run("inspect", REPO, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["source"] == REPO
    assert info["revision"] == _commit(hub)
    assert info["model_type"] == "mixtral"
    # same description as the local folder it was served from, but for where it came from
    code, local_out, err = run("inspect", checkpoints["mixtral"], "--json")
    assert code == 0, err
    local = json.loads(local_out)
    assert {k: v for k, v in info.items() if k not in ("source", "revision")} == \
           {k: v for k, v in local.items() if k not in ("source", "revision")}
    # the pickle was listed by the Hub but never requested; everything a growth needs was
    assert PICKLE in hub.repos[REPO].commits[_commit(hub)]
    assert hub.fetched() == WANTED
    assert not [p for _, p in hub.requests if p.endswith(PICKLE)]
    snapshot = _snapshot(hub, _commit(hub))
    assert {p.name for p in snapshot.iterdir()} == WANTED
    assert all((snapshot / n).read_bytes() == b for n, b in _files(checkpoints["mixtral"]).items())


def test_grow_width_from_hub_records_repo_and_commit(hub, checkpoints, tmp_path):
    out = tmp_path / "grown"
    code, _, err = run("grow-width", REPO, out, "--experts", "2x", "--quiet")
    assert code == 0, err
    source = json.loads((out / "moegrow.json").read_text())["source"]
    assert source["repo_id"] == REPO
    assert source["commit"] == _commit(hub)
    assert source.get("revision") in (None, "main")
    assert "path" not in source
    assert not (out / PICKLE).exists()
    # the same growth from the local folder writes the same weights
    code, _, err = run("grow-width", checkpoints["mixtral"], tmp_path / "local", "--experts", "2x", "--quiet")
    assert code == 0, err
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in (tmp_path / "local").glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    assert (out / "config.json").read_bytes() == (tmp_path / "local" / "config.json").read_bytes()


def test_revision_branch_and_commit(hub, tmp_path):
    dev = _commit(hub, "dev")
    code, out, err = run("inspect", REPO, "--revision", "dev", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["model_type"], info["revision"]) == ("olmoe", dev)
    assert hub.fetched() == WANTED
    # a full commit hash needs no branch lookup
    main = _commit(hub)
    code, out, err = run("inspect", REPO, "--revision", main, "--json")
    assert code == 0, err
    assert (json.loads(out)["model_type"], json.loads(out)["revision"]) == ("mixtral", main)
    # a growth from a branch records the branch asked for and the commit it resolved to
    code, _, err = run("grow-width", REPO, tmp_path / "o", "--revision", "dev", "--experts", "2x", "--quiet")
    assert code == 0, err
    source = json.loads((tmp_path / "o" / "moegrow.json").read_text())["source"]
    assert (source["repo_id"], source["revision"], source["commit"]) == (REPO, "dev", dev)


def test_unknown_revision_is_one_line_exit_2(hub, tmp_path):
    code, out, err = run("inspect", REPO, "--revision", "no-such-branch")
    line = _one_line_error(code, err)
    assert "no-such-branch" in line and "revision" in line, line
    assert out == ""
    code, _, err = run("grow-width", REPO, tmp_path / "o", "--revision", "no-such-branch", "--experts", "2x")
    assert "no-such-branch" in _one_line_error(code, err)
    assert not (tmp_path / "o").exists()
    assert not hub.downloads


def test_unknown_repo_is_one_line_exit_2(hub):
    code, out, err = run("inspect", "tiny-org/no-such-model")
    line = _one_line_error(code, err)
    assert "tiny-org/no-such-model" in line and "not found" in line, line
    assert out == ""
    assert ("GET", "/api/models/tiny-org/no-such-model/revision/main") in hub.requests


def test_pickle_only_repo_is_refused_without_downloading_the_pickle(hub):
    code, _, err = run("inspect", PICKLE_ONLY)
    line = _one_line_error(code, err)
    assert "no safetensors" in line and "pickle" in line, line
    assert hub.fetched(PICKLE_ONLY) == {"config.json"}


def test_cache_serves_when_hub_is_down_and_offline(hub, monkeypatch, tmp_path):
    main, dev = _commit(hub), _commit(hub, "dev")
    assert run("inspect", REPO)[0] == 0
    assert run("inspect", REPO, "--revision", "dev")[0] == 0
    hub.stop()
    _close_session()
    # server gone, not offline: the connection is refused and the cache answers
    code, out, err = run("inspect", REPO, "--json")
    assert code == 0, err
    assert json.loads(out)["revision"] == main
    # offline: no request is even tried
    _set_offline(monkeypatch)
    code, out, err = run("inspect", REPO, "--json")
    assert code == 0, err
    assert json.loads(out)["revision"] == main
    code, out, err = run("inspect", REPO, "--revision", "dev", "--json")
    assert code == 0, err
    assert (json.loads(out)["model_type"], json.loads(out)["revision"]) == ("olmoe", dev)
    code, _, err = run("grow-width", REPO, tmp_path / "o", "--experts", "2x", "--quiet")
    assert code == 0, err
    source = json.loads((tmp_path / "o" / "moegrow.json").read_text())["source"]
    assert (source["repo_id"], source["commit"]) == (REPO, main)
    # a revision that was never fetched is not in the cache
    code, _, err = run("inspect", REPO, "--revision", "v9")
    line = _one_line_error(code, err)
    assert "offline" in line.lower() and "cache" in line.lower(), line


def test_offline_with_empty_cache_is_one_line_exit_2(hub, monkeypatch):
    hub.stop()
    _set_offline(monkeypatch)
    code, out, err = run("inspect", REPO)
    line = _one_line_error(code, err)
    assert REPO in line and "offline" in line.lower() and "cache" in line.lower(), line
    assert out == ""
    assert not hub.requests


def test_hub_down_with_empty_cache_is_one_line_exit_2(hub):
    hub.stop()
    _close_session()
    code, _, err = run("inspect", REPO)
    line = _one_line_error(code, err)
    assert REPO in line and "cache" in line.lower(), line


def test_card_of_a_hub_growth_names_the_repo_and_pins_the_commit(hub, tmp_path):
    from huggingface_hub import ModelCard

    from .test_card import card_command, digest, rerun

    code, _, err = run("grow-width", REPO, tmp_path / "o", "--experts", "2x", "--noise", "0.01", "--device", "cpu",
                       "--quiet")
    assert code == 0, err
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert card.data.base_model == REPO and card.data.tags == ["moegrow"]
    assert card.text.endswith("## Source model card\n\n# tiny\n")
    argv = card_command(tmp_path / "o")
    assert argv == ["moegrow", "grow-width", REPO, "OUTPUT", "--experts", "2x", "--noise", "0.01", "--seed", "0",
                    "--noise-generator", "pcg64", "--revision", _commit(hub), "--device", "cpu"]
    rerun(argv, tmp_path / "again")
    first, again = digest(tmp_path / "o"), digest(tmp_path / "again")
    for d in (first, again):  # the record keeps the revision as given (none, then the commit)
        del d["moegrow.json"]
    assert first == again
