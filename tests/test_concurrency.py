"""No run lost, none mixed (docs/errors.md, "Concurrent runs" and "A source that changes").

Real `python -m moegrow` children race for one OUTPUT, are killed with SIGKILL at random moments
and at chosen ones, and have their source shards rewritten under them. A child is held at a
chosen moment by watching its partial folder and sending SIGSTOP (no hook in moegrow): holding
two children mid-write, then letting both go, makes both reach the final rename after both
passed the early "OUTPUT exists" check, so the race is really run, round after round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from moegrow import execute
from moegrow.errors import OutputError, SourceError
from moegrow.grow import open_source, plan_for, write

from .conftest import build_model, run, save

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
# The same CLI with renameat2 taken away, as on a platform or filesystem without it: the lock fallback.
NO_RENAMEAT2 = """
import runpy, sys
from moegrow import execute
execute._RENAMEAT2 = None
sys.argv[0] = "moegrow"
runpy.run_module("moegrow", run_name="__main__", alter_sys=True)
"""
WIDTH = {"2x": ["--experts", "2x"], "4x": ["--experts", "4x"],
         "noise": ["--experts", "2x", "--noise", "0.01", "--router-noise", "0.01", "--device", "cpu"]}
COMMON = ["--max-shard-size", "2MB", "--quiet"]


def tree(folder: Path) -> dict[str, str]:
    """file -> sha256 of every file under `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".moegrow-" in p.name)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A mixtral of 2.5 MB in 1 MB shards: long enough to write that children can be caught at it."""
    return save(build_model("mixtral", hidden_size=64, intermediate_size=192),
                tmp_path_factory.mktemp("concurrency") / "src", max_shard_size="1MB")


@pytest.fixture(scope="module")
def refs(source, tmp_path_factory) -> dict[str, dict[str, str]]:
    """What an uninterrupted, unraced run writes, per growth (and `old`: a grow-depth OUTPUT)."""
    root = tmp_path_factory.mktemp("refs")
    out = {}
    for key, args in [*WIDTH.items(), ("old", None)]:
        folder = root / key
        cli = ["grow-width", source, folder, *args] if args else ["grow-depth", source, folder, "--layers", "2x"]
        code, _, err = run(*cli, *COMMON)
        assert code == 0, err
        out[key] = tree(folder)
    assert len({str(v) for v in out.values()}) == len(out)  # four different outputs
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A checkpoint of about 90 small shards, and what `grow-width --experts 2x` writes from it.

    Its end-of-run check (a stat and a header read per shard) holds a child between writing
    `moegrow.json` and renaming long enough to be caught there."""
    root = tmp_path_factory.mktemp("sharded")
    src = save(build_model("mixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=12),
               root / "src", max_shard_size="8KB")
    code, _, err = run("grow-width", src, root / "ref", *WIDTH["2x"], *COMMON)
    assert code == 0, err
    return src, tree(root / "ref")


def start(source: Path, out: Path, growth: str, *extra: str, fallback: bool = False) -> subprocess.Popen:
    head = [sys.executable, "-c", NO_RENAMEAT2] if fallback else [sys.executable, "-m", "moegrow"]
    cmd = [*head, "grow-width", str(source), str(out), *WIDTH[growth], *COMMON, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def partial(out: Path, pid: int) -> Path:
    return out.parent / f".{out.name}.moegrow-partial-{pid}"


def hold(procs: list[subprocess.Popen], out: Path, when: Callable[[Path], bool] = Path.exists,
         watch: Callable[[], None] = lambda: None) -> list[bool]:
    """SIGSTOP each child as soon as `when(its partial folder)` holds; per child, True when it was
    caught so, False when it exited first. `watch` runs at every poll (an invariant to check)."""
    caught: dict[int, bool] = {}
    deadline = time.monotonic() + 120
    while len(caught) < len(procs):
        for proc in procs:
            if proc.pid in caught:
                continue
            if when(partial(out, proc.pid)):
                os.kill(proc.pid, signal.SIGSTOP)
                caught[proc.pid] = True
            elif proc.poll() is not None:
                caught[proc.pid] = False
        watch()
        assert time.monotonic() < deadline, "the children never got going"
        time.sleep(0.002)
    return [caught[p.pid] for p in procs]


def finish(procs: list[subprocess.Popen], watch: Callable[[], None] = lambda: None) -> list[tuple[int, str]]:
    """SIGCONT every child, wait for all (running `watch` meanwhile); (exit code, stderr) each."""
    for proc in procs:
        if proc.poll() is None:  # one that exited before it was caught is already reaped
            os.kill(proc.pid, signal.SIGCONT)
    while any(proc.poll() is None for proc in procs):
        watch()
        time.sleep(0.002)
    return [(proc.returncode, proc.communicate()[1]) for proc in procs]


def lost(err: str, out: Path) -> bool:
    """The loser's whole stderr: one line naming OUTPUT."""
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith(f"moegrow: error: {out}: already exists") and "Traceback" not in err


def always_there(out: Path) -> Callable[[], None]:
    def check() -> None:
        assert out.is_dir(), "OUTPUT went missing while --force runs replaced it"
    return check


# -- two runs, one OUTPUT, no --force -------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock"])
def test_exactly_one_of_two_racing_runs_wins(fallback, source, refs, tmp_path):
    rounds = 10 if not fallback else 5
    late = 0
    for i in range(rounds):
        out = tmp_path / f"out{i}"
        procs = [start(source, out, "2x", fallback=fallback), start(source, out, "4x", fallback=fallback)]
        both_mid_write = all(hold(procs, out))  # both then passed the early check: the race is at the rename
        (code_a, err_a), (code_b, err_b) = finish(procs)
        assert sorted([code_a, code_b]) == [0, 2], (err_a, err_b)
        winner, loser_err = ("2x", err_b) if code_a == 0 else ("4x", err_a)
        assert lost(loser_err, out), loser_err
        assert tree(out) == refs[winner]  # complete, and the winner's, never the loser's
        assert leftovers(tmp_path) == []
        if both_mid_write:
            late += 1
            assert "another run wrote it" in loser_err, loser_err
    assert late >= rounds // 2, f"only {late} of {rounds} rounds raced at the rename"


def test_an_output_that_appears_during_the_run_is_never_replaced(source, tmp_path, monkeypatch):
    """rename(2) would replace an empty folder; the no-replace rename (and the fallback's
    check under the lock) refuses it, leaving it as it is."""
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(execute, "_RENAMEAT2", None)
        out = tmp_path / f"out-{fallback}"
        src = open_source(str(source))
        with pytest.raises(OutputError, match="another run wrote it") as e:
            write(plan_for(src, "grow-width", experts="2x"), src, out,
                  progress=lambda n, out=out: out.mkdir(exist_ok=True))
        assert str(e.value).startswith(f"{out}: already exists")
        assert out.is_dir() and list(out.iterdir()) == [] and leftovers(tmp_path) == []


# -- two runs, one OUTPUT, --force ----------------------------------------------------------------


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "lock"])
def test_racing_force_runs_the_last_to_finish_wins(fallback, source, refs, tmp_path):
    out = tmp_path / "out"
    assert run("grow-depth", source, out, "--layers", "2x", *COMMON)[0] == 0
    # the fallback's two renames leave OUTPUT missing for an instant (docs/errors.md); renameat2 never
    watch = always_there(out) if not fallback else lambda: None
    for i in range(6 if not fallback else 4):
        procs = [start(source, out, "2x", "--force", fallback=fallback),
                 start(source, out, "4x", "--force", fallback=fallback)]
        caught = hold(procs, out, watch=watch)
        if i % 2 and all(caught):  # one, then the other: the second is the last to finish
            first, second = procs if i % 4 == 1 else procs[::-1]
            results = finish([first], watch) + finish([second], watch)
            assert tree(out) == refs["2x" if second is procs[0] else "4x"]
        else:  # let go together: either may win, nothing is mixed
            results = finish(procs, watch)
            assert tree(out) in (refs["2x"], refs["4x"])
        assert [code for code, _ in results] == [0, 0], results
        assert leftovers(tmp_path) == []


# -- SIGKILL, then run again ----------------------------------------------------------------------


def after_kill(source: Path, out: Path, pid: int, growth: str, ref: dict[str, str],
               old: dict[str, str] | None) -> None:
    """What a SIGKILL may leave: OUTPUT absent or complete (or, for --force, the old one); at most
    the dead run's folders; then a rerun that writes exactly `ref` and cleans them up."""
    if old is None:
        assert not out.exists() or tree(out) == ref
    else:
        assert out.is_dir() and tree(out) in (old, ref)
    assert set(leftovers(out.parent)) <= {f".{out.name}.moegrow-partial-{pid}", f".{out.name}.moegrow-old-{pid}"}
    code, _, err = run("grow-width", source, out, *WIDTH[growth], *COMMON, *(["--force"] if out.exists() else []))
    assert code == 0, err
    assert tree(out) == ref and leftovers(out.parent) == []


def test_sigkill_at_random_moments_then_rerun_gives_the_same_bytes(source, refs, tmp_path):
    """With noise, so that kills land in the byte copies, the noised tensors and the renames; new
    OUTPUTs and --force over an older output or over the same growth."""
    rng = random.Random(0)
    whole = tmp_path / "whole"
    t0 = time.monotonic()
    proc = start(source, whole, "noise")
    assert proc.wait() == 0, proc.communicate()
    span = time.monotonic() - t0  # how long a whole run takes here: kills are drawn inside it
    assert tree(whole) == refs["noise"]  # the child writes what the in-process run does
    for i in range(4):
        out, force = tmp_path / f"out{i}", i % 2 == 1
        if i == 1:
            assert run("grow-depth", source, out, "--layers", "2x", *COMMON)[0] == 0
        elif i == 3:
            shutil.copytree(whole, out)
        old = tree(out) if force else None
        proc = start(source, out, "noise", *(["--force"] if force else []))
        time.sleep(rng.uniform(0.2, 1.0) * span)
        proc.kill()
        proc.wait()
        after_kill(source, out, proc.pid, "noise", refs["noise"], old)


def _has(suffix: str) -> Callable[[Path], bool]:
    return lambda folder: folder.is_dir() and any(p.name.endswith(suffix) for p in list(folder.iterdir()))


def _swapped(out: Path) -> Callable[[Path], bool]:
    """True once the folder at OUTPUT is another one than now (the new one renamed or swapped in)."""
    before = out.stat().st_ino if out.exists() else None

    def done(_: Path) -> bool:
        try:
            return out.stat().st_ino != before
        except FileNotFoundError:
            return False
    return done


POINTS = {"partial folder created": Path.exists, "first shard begun": _has(".safetensors"),
          "shards done": _has(".index.json"), "before the rename": _has("moegrow.json")}


@pytest.mark.parametrize("force", [False, True], ids=["new", "force"])
@pytest.mark.parametrize("point", [*POINTS, "after the rename"])
def test_sigkill_at_chosen_moments_then_rerun_gives_the_same_bytes(point, force, sharded, tmp_path):
    """The child is stopped (SIGSTOP) when its partial folder shows the point, then killed."""
    source, ref = sharded
    out = tmp_path / "out"
    for _ in range(10):  # a narrow point can be missed (the child then finishes): try again
        if force:
            assert run("grow-depth", source, out, "--layers", "2x", *COMMON)[0] == 0
        old = tree(out) if force else None
        when = POINTS.get(point) or _swapped(out)
        proc = start(source, out, "2x", *(["--force"] if force else []))
        if hold([proc], out, when, watch=always_there(out) if force else lambda: None) == [True]:
            break
        assert proc.wait() == 0 and tree(out) == ref, proc.communicate()
        shutil.rmtree(out)
    else:
        pytest.fail(f"the child always got past {point} before it was seen")
    proc.kill()
    proc.wait()
    if point == "after the rename":
        assert tree(out) == ref
    after_kill(source, out, proc.pid, "2x", ref, old)


# -- a source that changes during the run -------------------------------------------------------------


def _append(shard: Path) -> None:
    with open(shard, "ab") as f:
        f.write(b"\0" * 8)


def _rewrite_data(shard: Path) -> None:
    time.sleep(0.02)  # past the filesystem's timestamp tick
    with open(shard, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(bytes(range(16)))


def _rewrite_header(shard: Path) -> None:
    """Same size, same length header, mtime put back: only the header says so."""
    st = shard.stat()
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert b'"pt"' in raw[8:8 + n]
    with open(shard, "r+b") as f:
        f.seek(raw.index(b'"pt"', 8, 8 + n))
        f.write(b'"PT"')
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def _replace_file(shard: Path) -> None:
    """Another file with the same size, header and mtime moved into place: only the inode says so."""
    tmp = shard.with_name("new.tmp")
    shutil.copy2(shard, tmp)
    with open(tmp, "r+b") as f:
        f.seek(-16, os.SEEK_END)
        f.write(bytes(range(16)))
    shutil.copystat(shard, tmp)
    os.replace(tmp, shard)


CHANGES = {"size": _append, "mtime": _rewrite_data, "header": _rewrite_header, "inode": _replace_file}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_shard_changed_during_the_run_fails_it(change, source, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(source, src_dir)
    shard = sorted(src_dir.glob("*.safetensors"))[1]
    out = tmp_path / "out"
    src = open_source(str(src_dir))
    done: list[int] = []

    def midway(n: int) -> None:  # the first tensor written: change the shard under the run
        if not done:
            done.append(n)
            CHANGES[change](shard)

    with pytest.raises(SourceError) as e:
        write(plan_for(src, "grow-width", experts="2x"), src, out, progress=midway)
    msg = str(e.value)
    assert msg.startswith(f"{shard}: changed during the run (") and change in msg.split("(")[1], msg
    assert not out.exists() and leftovers(tmp_path) == []


def test_a_shard_changed_under_the_cli_fails_with_one_line_and_keeps_the_old_output(source, tmp_path):
    src_dir = tmp_path / "src"
    shutil.copytree(source, src_dir)
    shard = sorted(src_dir.glob("*.safetensors"))[-1]
    out = tmp_path / "out"
    assert run("grow-depth", src_dir, out, "--layers", "2x", *COMMON)[0] == 0
    old = tree(out)
    proc = start(src_dir, out, "2x", "--force")
    if hold([proc], out) != [True]:
        pytest.fail(f"the child finished before writing: {proc.communicate()}")
    _append(shard)
    [(code, err)] = finish([proc])
    assert code == 2, err
    assert err.strip() == f"moegrow: error: {shard}: changed during the run (size, mtime); nothing was written", err
    assert tree(out) == old and leftovers(tmp_path) == []


def test_a_stale_lock_file_is_removed(source, tmp_path):
    out = tmp_path / "out"
    lock = tmp_path / ".out.moegrow-lock"
    lock.write_bytes(b"")  # as a run of the lock fallback killed while holding it leaves it
    assert run("grow-width", source, out, "--experts", "2x", *COMMON)[0] == 0
    assert leftovers(tmp_path) == []


def test_training_run_that_finished_first_keeps_output(tmp_path, monkeypatch):
    """A training-checkpoint growth whose OUTPUT appears while it writes (another run finished first) loses:
    exit 2 naming OUTPUT, the other run's folder untouched, no partial folder left (as for Hugging Face)."""
    from moegrow import training

    src = Path(__file__).parent / "fixtures" / "training" / "megatron" / "bare"
    out = tmp_path / "out"
    write = training._write_megatron

    def other_run_finishes(ckpt, plan, tmp):
        write(ckpt, plan, tmp)
        out.mkdir()
        (out / "winner").write_text("kept")

    monkeypatch.setattr(training, "_write_megatron", other_run_finishes)
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--top-k", "keep", "--allow-inexact", "--quiet")
    assert code == 2 and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in out.iterdir()] == ["winner"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


# -- training checkpoints (Megatron torch_dist, OLMo-core DCP): a source file changed during the run ----------

TRAINING = Path(__file__).parent / "fixtures" / "training"
MEGATRON_RUN, OLMO_STEP = TRAINING / "megatron" / "run", TRAINING / "olmo" / "default"


def _rewrite_content(path: Path) -> None:
    """Same size, same inode, mtime put back: only the content's hash says so."""
    st = path.stat()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(raw)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


TRAINING_CHANGES = {"size": _append, "mtime": _rewrite_data, "inode": _replace_file, "content": _rewrite_content}


def change_midway(monkeypatch: pytest.MonkeyPatch, change: Callable[[], None]) -> None:
    """Run `change` once the first output chunk has read its source bytes (a hook in the writer's input,
    as the progress callback is for safetensors sources: the run itself is real)."""
    from moegrow import training

    real = training.write_dcp
    done: list[bool] = []

    def hooked(make: Callable[[], object]) -> Callable[[], object]:
        def made() -> object:
            value = make()
            if not done:
                done.append(True)
                change()
            return value
        return made

    def write_dcp(folder, chunks, objects):  # noqa: ANN001, ANN202 - write_dcp's own signature
        return real(folder, [dataclasses.replace(c, make=hooked(c.make)) for c in chunks], objects)

    monkeypatch.setattr(training, "write_dcp", write_dcp)


# (source, the file changed inside the grown checkpoint folder, how)
TRAINING_CASES = [
    (MEGATRON_RUN, "iter_0000020/__0_0.distcp", "size"),
    (MEGATRON_RUN, "iter_0000020/__0_1.distcp", "mtime"),
    (MEGATRON_RUN, "iter_0000020/__0_0.distcp", "inode"),
    (MEGATRON_RUN, "iter_0000020/.metadata", "content"),
    (MEGATRON_RUN, "iter_0000020/common.pt", "content"),
    (OLMO_STEP, "model_and_optim/__0_3.distcp", "size"),
    (OLMO_STEP, "model_and_optim/__0_0.distcp", "mtime"),
    (OLMO_STEP, "model_and_optim/__0_5.distcp", "inode"),
    (OLMO_STEP, "model_and_optim/.metadata", "content"),
    (OLMO_STEP, "config.json", "content"),
]


@pytest.mark.parametrize("fixture, name, change", TRAINING_CASES,
                         ids=[f"{f.parent.name}-{n}-{c}" for f, n, c in TRAINING_CASES])
def test_a_training_source_file_changed_during_the_run_fails_it(fixture, name, change, tmp_path, monkeypatch):
    from moegrow.training import open_training, plan_training, write_training

    src = tmp_path / "src"
    shutil.copytree(fixture, src)
    path, out = src / name, tmp_path / "out"
    ckpt = open_training(str(src), None)
    change_midway(monkeypatch, lambda: TRAINING_CHANGES[change](path))
    with pytest.raises(SourceError) as e:
        write_training(ckpt, plan_training(ckpt, "grow-width", experts="2x"), out)
    msg = str(e.value)
    assert msg.startswith(f"{path}: changed during the run (") and change in msg.split("(")[1], msg
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fixture", [MEGATRON_RUN, OLMO_STEP], ids=["megatron", "olmo"])
def test_a_training_file_changed_under_the_cli_fails_with_one_line_and_keeps_the_old_output(fixture, tmp_path,
                                                                                             monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(fixture, src)
    out = tmp_path / "out"
    assert run("grow-depth", src, out, "--layers", "2x", "--quiet")[0] == 0
    old = tree(out)
    chunk = sorted(src.rglob("__0_1.distcp"))[-1]
    change_midway(monkeypatch, lambda: _append(chunk))
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--force", "--quiet")
    assert code == 2, err
    assert err.strip() == f"moegrow: error: {chunk}: changed during the run (size, mtime); nothing was written", err
    assert tree(out) == old and leftovers(tmp_path) == []
    monkeypatch.undo()  # the same run, the source left alone: it succeeds (the check is not what fails)
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--force", "--quiet")
    assert code == 0, err
    assert tree(out) != old and leftovers(tmp_path) == []


def test_another_iteration_of_the_run_folder_may_change(tmp_path, monkeypatch):
    """Only the grown checkpoint's files are the source: a trainer writing another iteration meanwhile is fine."""
    src = tmp_path / "src"
    shutil.copytree(MEGATRON_RUN, src)
    other = src / "iter_0000010" / "__0_0.distcp"
    change_midway(monkeypatch, lambda: _append(other))
    code, _, err = run("grow-width", src, tmp_path / "out", "--experts", "2x", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "moegrow.json").read_text())["source"]["iteration"] == 20
