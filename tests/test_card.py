"""The grown checkpoint's model card: Hub metadata, the growth, a command that reproduces it, the source's card."""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
from pathlib import Path

import pytest
import transformers
from huggingface_hub import ModelCard

from moegrow.grow import open_source, plan_for, write

from .conftest import build_model, run, save

SOURCE_CARD = """---
license: apache-2.0
tags:
- moe
- chat
pipeline_tag: text-generation
---

# Tiny Mixtral

A tiny random mixtral, body text of the source card.
"""


@pytest.fixture(scope="module")
def carded(tmp_path_factory) -> Path:
    """A tiny mixtral whose README.md has front matter and a body."""
    src = save(build_model("mixtral"), tmp_path_factory.mktemp("carded") / "tiny mixtral")  # a space: quoting
    (src / "README.md").write_text(SOURCE_CARD)
    return src


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def card_command(folder: Path) -> list[str]:
    """The reproduction command of a grown folder's card, as argv."""
    blocks = re.findall(r"```sh\n(.*?)\n```", (folder / "README.md").read_text(), re.S)
    assert len(blocks) == 1, blocks
    return shlex.split(blocks[0])


def rerun(argv: list[str], output: Path) -> None:
    """Run a card's command through the CLI, OUTPUT replaced by `output`."""
    assert argv[0] == "moegrow" and argv.count("OUTPUT") == 1
    code, _, err = run(*[str(output) if a == "OUTPUT" else a for a in argv[1:]])
    assert code == 0, err


def expert_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def test_card_metadata_body_and_command(carded, tmp_path):
    out = tmp_path / "grown"
    code, _, err = run("grow", carded, out, "--layers", "2x", "--experts", "2x", "--noise", "0.01", "--seed", "7",
                       "--device", "cpu", "--threads", "1", "--quiet", "--json")
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert card.data.to_dict() == {"base_model": str(carded), "license": "apache-2.0", "library_name": "transformers",
                                   "pipeline_tag": "text-generation", "tags": ["moegrow", "moe", "chat"]}
    text = card.text
    # the source's card below its own heading, without its front matter
    assert "## Source model card\n\n# Tiny Mixtral\n\nA tiny random mixtral, body text of the source card.\n" in text
    assert "license" not in text and "pipeline_tag" not in text
    # what was done, with parameter counts as transformers counts them
    before = transformers.AutoModelForCausalLM.from_pretrained(carded)
    after = transformers.AutoModelForCausalLM.from_pretrained(out)
    active = [m.num_parameters() - expert_params(m) * (1 - m.config.num_experts_per_tok / m.config.num_local_experts)
              for m in (before, after)]
    assert f"| parameters | {before.num_parameters():,} | {after.num_parameters():,} |" in text
    assert f"| active parameters per token | {round(active[0]):,} | {round(active[1]):,} |" in text
    assert "| layers | 3 | 6 |" in text and "| routed experts | 4 | 8 |" in text
    assert "- layer map (new layer i copies source layer map[i]): `0,0,1,1,2,2`" in text
    assert "seed 7" in text and "std 0.01" in text
    assert "- function-preserving: no (depth growth adds layers)" in text
    assert "moegrow.json" in text
    # the command: as typed, minus what does not change the bytes, the output as OUTPUT
    argv = card_command(out)
    assert argv == ["moegrow", "grow", str(carded), "OUTPUT", "--layers", "2x", "--experts", "2x", "--noise", "0.01",
                    "--seed", "7", "--noise-generator", "pcg64", "--device", "cpu"]
    rerun(argv, tmp_path / "again")
    assert digest(tmp_path / "again") == digest(out)  # every file, this card and moegrow.json included
    assert run("verify", carded, out)[0] == 0
    # grown again: the card of a grown source is carried like any other
    code, _, err = run("grow-width", out, tmp_path / "twice", "--experts", "2x", "--quiet")
    assert code == 0, err
    twice = ModelCard.load(tmp_path / "twice" / "README.md")
    assert twice.data.tags == ["moegrow", "moe", "chat"] and twice.data.license == "apache-2.0"
    assert "## Source model card\n\n# tiny mixtral, grown with moegrow" in twice.text


def test_python_api_card_reproduces_through_the_cli(carded, tmp_path):
    src = open_source(str(carded))
    write(plan_for(src, "grow-width", experts="2x", noise=0.02, router_noise=0.01, seed=3, top_k="keep"), src,
          tmp_path / "api", device="cpu", max_shard_size=20_000)
    argv = card_command(tmp_path / "api")
    assert argv == ["moegrow", "grow-width", str(carded), "OUTPUT", "--experts", "2x", "--noise", "0.02",
                    "--router-noise", "0.01", "--seed", "3", "--noise-generator", "pcg64", "--top-k", "keep",
                    "--max-shard-size", "20000",
                    "--device", "cpu"]
    assert "- function-preserving: no (top-k not scaled)" in (tmp_path / "api" / "README.md").read_text()
    rerun(argv, tmp_path / "cli")
    assert len(list((tmp_path / "cli").glob("*.safetensors"))) > 1
    assert digest(tmp_path / "cli") == digest(tmp_path / "api")


def test_source_without_card(checkpoints, tmp_path):
    src = checkpoints["olmoe"]
    assert not (src / "README.md").exists()
    code, _, err = run("grow-width", src, tmp_path / "o", "--experts", "2x", "--quiet")
    assert code == 0, err
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert card.data.to_dict() == {"base_model": str(src), "library_name": "transformers", "tags": ["moegrow"]}
    assert "Source model card" not in card.text
    assert "- function-preserving: yes (logits equal up to float rounding)" in card.text
    # byte copies only: no device to name
    assert card_command(tmp_path / "o") == ["moegrow", "grow-width", str(src), "OUTPUT", "--experts", "2x"]


@pytest.mark.parametrize("front, carried", [
    ("license: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n",
     {"license": "other", "license_name": "tiny-license", "license_link": "LICENSE"}),
    ("license: [apache-2.0\n", {}),  # not YAML: nothing carried, the growth goes on
    ("- a list, not a mapping\n", {}),
])
def test_source_front_matter(front, carried, checkpoints, ckpt_copy, tmp_path):
    src = ckpt_copy(checkpoints["mixtral"])
    (src / "README.md").write_text(f"---\n{front}---\nThe body.\n")
    code, _, err = run("grow-depth", src, tmp_path / "o", "--layers", "4", "--quiet")
    assert code == 0, err
    card = ModelCard.load(tmp_path / "o" / "README.md")
    assert card.data.to_dict() == {"base_model": str(src), "library_name": "transformers", "tags": ["moegrow"],
                                   **carried}
    assert card.text.endswith("## Source model card\n\nThe body.\n") and front not in card.text


# What a byte-copy growth imports: start-up is most of its time above `cp` on a fast disk
# (docs/performance.md, "Start-up to the first byte"). A fresh process, as the command line runs.
_IMPORTS = """
import json, runpy, sys
sys.argv = ["moegrow", *sys.argv[1:]]
try:
    runpy.run_module("moegrow", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "loaded": [m for m in ("rich.console", "huggingface_hub.repocard", "torch")
                                           if m in sys.modules]}))
"""


def _imports(*args: object) -> dict:
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", _IMPORTS, *map(str, args)], env=env, capture_output=True,
                          text=True, check=False, cwd=root)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_quiet_byte_copy_growth_imports_neither_rich_nor_the_card_parser_nor_torch(carded, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(carded, plain)
    (plain / "README.md").unlink()
    got = _imports("grow-width", plain, tmp_path / "out", "--experts", "2x", "--quiet")
    assert got == {"code": 0, "loaded": []}, got
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == str(plain)
    # a source with a card: its parser is needed, and imported (rich with it, by huggingface_hub's httpx)
    got = _imports("grow-width", carded, tmp_path / "out2", "--experts", "2x", "--quiet")
    assert got["code"] == 0 and "huggingface_hub.repocard" in got["loaded"] and "torch" not in got["loaded"], got
