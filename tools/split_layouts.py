"""Regenerate the moegrow/layouts/ package from a single-file moegrow/layouts.py (a merge aid; delete after).

Branches cut before the package split edit moegrow/layouts.py. Simplest: merge those into main first, then
this branch; git reports a modify/delete conflict and leaves main's (merged) layouts.py in the tree:

    python tools/split_layouts.py moegrow/layouts.py           # rewrites the derived modules, `ruff check --fix`
    python tools/split_layouts.py moegrow/layouts.py --check   # same data? (repr of every Layout, Wrapper and
    git rm moegrow/layouts.py                                  # Residual, model_type lookups, each residual)

A branch merged after this one: run the script on `git merge-file` of its layouts.py, its merge base's and the
single file this package was generated from (while the package is still as this script writes it), or move
its hunks by hand: a family's to the module `LINEAGES` names, `Layout` fields to model.py, helpers to shared.py.

Derived modules: model.py (everything up to the end of `class Layout`, new fields included), shared.py (the
constants and helpers between `Layout` and `LAYOUTS`, and the residual constants), one module per lineage
(`LINEAGES` below: a family the table does not name stops the script, naming it), wrappers.py and registry.py.
__init__.py and families.py are written by hand and left as they are.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "moegrow" / "layouts"

LINEAGES: dict[str, tuple[str, list[str]]] = {
    "mixtral": ("Mixtral and its descendants: MiniMax, PhiMoE (experts under block_sparse_moe., w1/w2/w3).",
                ["mixtral", "minimax", "minimax_m2", "minimax_m3_vl_text", "phimoe"]),
    "qwen": ("Qwen's MoE families, and Qwen-style layouts.\n\ndecoder_sparse_step / mlp_only_layers pick the MoE "
             "layers; a sigmoid-gated shared expert under\nmlp.shared_expert.\n",
             ["qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe_text", "qwen4_exp_text", "flint"]),
    "deepseek": ("DeepSeek's releases, and families that reuse its architecture as is: Mistral 4, Kimi Linear, "
                 "GLM.\n\nMLA attention, group-limited routing with a correction bias, shared experts under "
                 "mlp.shared_experts.\n",
                 ["deepseek_v3", "deepseek_v2", "kimi_linear", "glm4_moe", "glm4_moe_lite", "deepseek_v32",
                  "mistral4", "glm_moe_dsa", "deepseek_v4"]),
    "deepseek_kin": ("Other vendors' families built on DeepSeek-V3's MoE block.\n\nIts tensor names "
                     "(`_DEEPSEEK_PARTS`) and group-limited sigmoid routing (`_group_rules`), with their own\n"
                     "layer-indexed keys.\n",
                     ["dots1", "solar_open", "exaone_moe", "mimo_v2_flash", "axk1", "axk2", "beam",
                      "bailing_hybrid", "dots3_note_text"]),
    "hunyuan": ("Tencent Hunyuan's MoE families.", ["hunyuan_v1_moe", "hy_v3", "hy_v4"]),
    "granite": ("IBM Granite's MoE families, and JetMoE, whose MoE block they derive from.\n\nFused input_linear / "
                "output_linear experts (expert axis first) and a router.layer gate.\n",
                ["granitemoe", "granitemoeshared", "jetmoe", "granitemoe_swa", "granitemoehybrid"]),
    "hybrid": ("Hybrid stacks: layers of several kinds (Mamba, convolution, attention, MoE), picked per layer by "
               "a\npattern or a period.\n", ["lfm2_moe", "nemotron_h", "zaya", "jamba"]),
    "olmo": ("AllenAI's OLMo MoE families.", ["olmoe", "flex_olmo"]),
    "inkling": ("Inkling's text decoders (published names under model.llm.).", ["inkling2_text", "inkling_text"]),
    "other": ("Families with no relatives among the others (one lineage each).",
              ["mellum", "gpt_oss", "afmoe", "laguna", "aria_text", "llama4_text", "kolibri1", "cohere2_moe",
               "ernie4_5_moe", "longcat_flash", "dbrx", "doge", "gemma4_text"]),
}
# shared constants used by one lineage only: moved into its module, after the imports
LOCAL = {"qwen": ("_QWEN_DEPTH", "_QWEN_LINEAR_WRITERS")}
MODEL_NAMES = "DepthKey, Layout, Residual, TensorRule, WidthRule, Wrapper"

MODEL_DOC = '''"""The shape of per-family knowledge: `Layout` and its parts (`DepthKey`, `WidthRule`, `TensorRule`,
`Residual`), `Wrapper` for multimodal checkpoints, and `lookup` for (dotted) config keys.

A layout says where layers, experts and routers live in the checkpoint's tensor names (the names
`save_pretrained` writes, which are the Hub's), which config keys count layers, experts, top-k
and shared experts (every alias a config may use), which config keys are layer-indexed and of
what kind, and which config changes keep a noise-free width growth function-preserving.
The entries themselves are data in the lineage modules beside this one.
"""
'''
SHARED_HEAD = '''"""Constants and rule builders that several lineages' entries share: config keys, routing descriptions,
the DeepSeek-V3 block's tensor names, group-limited routing's width rules, and residual writers."""

from __future__ import annotations

from typing import Any

from .model import {model}
'''
WRAPPERS_HEAD = '"""Multimodal checkpoints whose text decoder is a supported family (`Wrapper` entries): ' \
    '''the decoder grows,
the rest (vision towers, projectors, their config keys) is copied."""

from __future__ import annotations

from dataclasses import replace

from .families import LAYOUTS
from .model import {model}
from .shared import {shared}
'''
WRAPPERS_RESIDUAL = '''
# residual writers (see `Residual`) of the decoders that live only in a wrapper, and of wrappers whose
# checkpoints name the decoder's tensors their own way; other wrappers take their text family's entry
RESIDUAL: dict[str, Residual] = {
'''
REGISTRY_HEAD = '"""The lookups: a config\'s model_type (or its wrapper\'s) to its `Layout`, ' \
    '''with the names its checkpoint uses."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from ..errors import ConfigError, UnsupportedModelError
from . import families, wrappers
from .families import LAYOUTS
from .model import Layout, Residual, Wrapper, lookup
from .wrappers import WRAPPERS

# identity depth init: per family (and per wrapper with names of its own), what an added copy has zeroed
RESIDUAL: dict[str, Residual] = {**families.RESIDUAL, **wrappers.RESIDUAL}

'''
LAZY_RESIDUAL = ("        A wrapper's own entry (its checkpoints' names) wins over its text family's.\"\"\"\n",
                 "        from .registry import RESIDUAL  # the table is data built from these classes\n\n")


def _index(lines: list[str], pred, start: int = 0) -> int:
    for i in range(start, len(lines)):
        if pred(lines[i]):
            return i
    raise SystemExit(f"split_layouts: marker not found after line {start + 1}")


def _block(lines: list[str], name: str) -> tuple[int, int]:
    """[start, end) of a top-level assignment `name = (...)` or one-line `name = ...`."""
    start = _index(lines, lambda s: s.startswith(f"{name} = "))
    if lines[start].rstrip().endswith("("):
        return start, _index(lines, lambda s: s == ")", start) + 1
    return start, start + 1


def split(source: Path) -> None:
    lines = source.read_text().split("\n")
    future = _index(lines, lambda s: s == "from __future__ import annotations")
    layout_cls = _index(lines, lambda s: s.startswith("class Layout"))
    layout_end = _index(lines, lambda s: bool(s) and not s[0].isspace() and not s.startswith("#"), layout_cls + 1)
    lay_start = _index(lines, lambda s: s.startswith("LAYOUTS: tuple"))
    lay_end = _index(lines, lambda s: s == ")", lay_start)
    wr_start = _index(lines, lambda s: s.startswith("WRAPPERS: tuple"))
    while lines[wr_start - 1].startswith("#"):
        wr_start -= 1
    res_comment = _index(lines, lambda s: s.startswith("# --- identity depth init (issue 11)"), lay_end)
    res_start = _index(lines, lambda s: s.startswith("RESIDUAL: dict"), res_comment)
    res_end = _index(lines, lambda s: s == "}", res_start)
    by_type = _index(lines, lambda s: s.startswith("_BY_TYPE:"), res_end)

    # model.py
    model = "\n".join(lines[future:layout_end]).rstrip("\n") + "\n"
    model = model.replace("from .errors import", "from ..errors import")
    assert LAZY_RESIDUAL[0] in model, "Layout.residual's docstring changed: edit LAZY_RESIDUAL"
    model = model.replace(LAZY_RESIDUAL[0], LAZY_RESIDUAL[0] + LAZY_RESIDUAL[1])

    # shared.py (less the constants one lineage keeps)
    head = "\n".join(lines[layout_end:lay_start]).rstrip("\n").split("\n")
    shared_lines = [*head, "", "", *lines[res_comment:res_start]]
    local: dict[str, list[str]] = {}
    for mod, names in LOCAL.items():
        for name in names:
            a, b = _block(shared_lines, name)
            local.setdefault(mod, []).extend(shared_lines[a:b])
            del shared_lines[a:b]
    shared = SHARED_HEAD.format(model=MODEL_NAMES) + "\n".join(shared_lines).rstrip("\n") + "\n"
    shared_names = sorted(set(re.findall(r"^(_?[A-Za-z]\w*)(?:\s*[:=]|\()", "\n".join(shared_lines), re.M))
                          | set(re.findall(r"^def (\w+)", "\n".join(shared_lines), re.M)))

    # the families' entries and their residual writers
    entries: dict[str, list[str]] = {}
    order: list[str] = []
    i = lay_start + 1
    while i < lay_end:
        assert lines[i] == "    Layout(", f"line {i + 1}: {lines[i]!r}"
        j = _index(lines, lambda s: s == "    ),", i)
        name = re.search(r'name="([^"]+)"', "\n".join(lines[i:j])).group(1)
        entries[name] = lines[i:j + 1]
        order.append(name)
        i = j + 1
    residual: dict[str, list[str]] = {}
    pending: list[str] = []
    current = None
    for line in lines[res_start + 1:res_end]:
        m = re.match(r'    "([^"]+)": ', line)
        if m:
            current = m.group(1)
            residual[current] = [*pending, line]
            pending = []
        elif line.startswith("    #"):
            pending.append(line)
        else:
            residual[current].append(line)
    assigned = [n for _, names in LINEAGES.values() for n in names]
    if sorted(assigned) != sorted(order):
        raise SystemExit(f"split_layouts: assign these families to a lineage in LINEAGES: "
                         f"{sorted(set(order) - set(assigned))}; no longer in layouts.py: "
                         f"{sorted(set(assigned) - set(order))}")

    imports = ["from __future__ import annotations", "", f"from .model import {MODEL_NAMES}",
               "from .shared import " + ", ".join(shared_names), ""]
    out: dict[str, str] = {"model.py": MODEL_DOC + "\n" + model, "shared.py": shared}
    for mod, (doc, names) in LINEAGES.items():
        text = [f'"""{doc}"""', "", *imports]
        if mod in LOCAL:
            text += ["", *local[mod], ""]
        text += ["", "LAYOUTS: tuple[Layout, ...] = ("]
        for n in (n for n in order if n in names):
            text += entries[n]
        text += [")", "", "# what each family's decoder layer writes into the residual stream (see `Residual`)",
                 "RESIDUAL: dict[str, Residual] = {"]
        for n in (n for n in order if n in names):
            text += residual.pop(n, [])
        out[f"{mod}.py"] = "\n".join([*text, "}", ""])
    rest = [line for entry in residual.values() for line in entry]  # the wrappers' own
    wrappers = (WRAPPERS_HEAD.format(model=MODEL_NAMES, shared=", ".join(shared_names))
                + "\n" + "\n".join(lines[wr_start:res_comment]).rstrip("\n") + "\n"
                + "\n" + WRAPPERS_RESIDUAL + "\n".join(rest) + "\n}\n")
    out["wrappers.py"] = wrappers.replace("from .siblings import", "from ..siblings import")
    out["registry.py"] = (REGISTRY_HEAD + "\n".join(lines[by_type:]).rstrip("\n") + "\n").replace(
        "from .siblings import", "from ..siblings import")
    for name, text in out.items():
        (PKG / name).write_text(text)
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    paths = [str(PKG / n) for n in out]
    subprocess.run([ruff, "check", "--fix", "-q", *paths], check=False)
    for p in paths:  # no magic trailing comma: ruff joins the pruned import onto one line where it fits
        text = Path(p).read_text()
        Path(p).write_text(re.sub(r"(from \.shared import \((?:\n    [^\n]+,)*\n    [^\n]+),\n\)", r"\1\n)", text))
    subprocess.run([ruff, "check", "--fix", "-q", *paths], check=False)
    print(f"split_layouts: wrote {', '.join(sorted(out))} under {PKG}")


def _dump(layouts) -> dict:
    return {
        "layouts": {lay.name: repr(lay) for lay in layouts.LAYOUTS},
        "wrappers": [repr(w) for w in layouts.WRAPPERS],
        "residual": {k: repr(v) for k, v in layouts.RESIDUAL.items()},
        "types": {t: layouts.layout_for({"model_type": t}).name for t in layouts.supported_model_types()},
        "wrapper_types": layouts.supported_wrapper_types(),
        "residual_of": {lay.name: repr(lay.residual) for lay in layouts.LAYOUTS},
    }


def check(source: Path) -> None:
    """The package holds the same data as the single file (loaded as moegrow.layouts_single)."""
    sys.path.insert(0, str(PKG.parent.parent))
    import moegrow  # noqa: F401  (the single file's relative imports resolve in this package)
    import moegrow.layouts as package

    spec = importlib.util.spec_from_file_location("moegrow.layouts_single", source)
    single = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = single
    spec.loader.exec_module(single)
    a, b = _dump(single), _dump(package)
    diff = [k for k in a if a[k] != b[k]]
    if diff:
        for k in diff:
            if isinstance(a[k], dict):
                print(k, sorted(n for n in {*a[k], *b[k]} if a[k].get(n) != b[k].get(n)))
            else:
                print(k, "differs")
        raise SystemExit(1)
    print(f"split_layouts: same data ({len(a['layouts'])} layouts, {len(a['wrappers'])} wrappers, "
          f"{len(a['residual'])} residual entries)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a single-file moegrow/layouts.py")
    parser.add_argument("--check", action="store_true", help="compare only; write nothing")
    args = parser.parse_args()
    check(args.source) if args.check else split(args.source)
