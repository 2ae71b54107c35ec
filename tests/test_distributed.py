"""Many processes, one growth (moegrow/ranks.py): real `torchrun --nproc-per-node 2` runs of the CLI.

Each rank writes its share of the shards into rank 0's partial folder over torch.distributed (gloo);
the output must be byte for byte a single-process run's, a failure on one rank must leave nothing
and fail every rank, and --dry-run must print once.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moegrow.ranks import RankError, _check_shared, assign

from .conftest import build_model, run, save

pytest.importorskip("torch.distributed")

ROOT = Path(__file__).resolve().parents[1]
GROW = ["grow-width", "--experts", "2x", "--noise", "0.01", "--router-noise", "0.01", "--device", "cpu",
        "--max-shard-size", "40KB"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 -m moegrow ARGS` (a free port each time); with
    `script`, every rank runs `sh -c SCRIPT` instead (it sees RANK)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*launch, "--no-python", "sh", "-c", script] if script else [*launch, "-m", "moegrow", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A mixtral of about 180 KB in 40 KB source shards: 7 output shards at --max-shard-size 40KB."""
    return save(build_model("mixtral", hidden_size=32, intermediate_size=48), tmp_path_factory.mktemp("dist") / "src",
                max_shard_size="40KB")


def test_two_ranks_write_the_bytes_of_one(source, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert run(*GROW[:1], str(source), str(one), *GROW[1:], "--quiet")[0] == 0
    p = torchrun(*GROW[:1], str(source), str(two), *GROW[1:])
    assert p.returncode == 0, p.stderr
    assert len(list(one.glob("*.safetensors"))) > 2  # both ranks had shards to write
    assert tree(two) == tree(one)
    assert p.stderr.count("wrote ") == 1  # the summary from rank 0 only
    assert sorted(x.name for x in tmp_path.iterdir()) == ["one", "two"]  # no partial folder left


def test_a_failure_on_rank_1_fails_both_and_leaves_nothing(source, tmp_path):
    """Rank 1 reads its own copy of the source (node-local copies), whose one shard is truncated:
    rank 1 fails while rank 0, which already created the partial folder, waits for it."""
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in source.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    args = " ".join(GROW[1:])
    script = (f'if [ "$RANK" = 1 ]; then s={bad}; else s={source}; fi; '
              f"exec {sys.executable} -m moegrow {GROW[0]} $s {out} {args}")
    p = torchrun(script=script)
    assert p.returncode != 0
    assert "rank 1" in p.stderr and "truncated" in p.stderr, p.stderr
    assert p.stderr.count("moegrow: error:") == 2, p.stderr  # both ranks failed, each said so
    assert sorted(x.name for x in tmp_path.iterdir()) == ["bad"]  # no OUTPUT, no partial folder


def test_ranks_that_plan_differently_are_refused(source, tmp_path):
    """Rank 1 with another --seed would write other noise: refused before any byte is written."""
    out = tmp_path / "out"
    args = " ".join(GROW[1:])
    script = (f'exec {sys.executable} -m moegrow {GROW[0]} {source} {out} {args} --seed "$RANK"')
    p = torchrun(script=script)
    assert p.returncode != 0
    assert "rank 1 planned a different growth" in p.stderr, p.stderr
    assert list(tmp_path.iterdir()) == []


def test_dry_run_prints_once(source, tmp_path):
    p = torchrun(*GROW[:1], str(source), str(tmp_path / "out"), *GROW[1:], "--dry-run", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('"dry_run": true') == 1
    assert list(tmp_path.iterdir()) == []


def test_assign_balances_bytes():
    assert assign([10, 10, 10, 10], 2) == [0, 1, 0, 1]
    assert assign([100, 10, 10, 10, 10], 2) == [0, 1, 1, 1, 1]  # the big shard alone on rank 0
    assert assign([5], 3) == [0]  # more ranks than shards: the others write none


def test_an_unshared_output_parent_is_named(tmp_path):
    """A rank that does not see rank 0's token (another node's local disk) gets a clear error."""
    (tmp_path / ".moegrow-ranks-token").write_text("abc")
    assert _check_shared(tmp_path, "abc", 1) is None
    e = _check_shared(tmp_path / "elsewhere", "abc", 1)
    assert isinstance(e, RankError) and "shared by every rank" in str(e)
