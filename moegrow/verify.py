"""`moegrow verify`: is OUTPUT a valid growth of SOURCE?

Checks, in order: the provenance record; the plan rebuilt from SOURCE and the record's flags
against the record's tensor mapping and OUTPUT's config; every output tensor's presence, dtype
and shape; its bytes (copies byte-identical to their source, noised parts equal to the recorded
seed's noise where it was drawn on the CPU, and their measured std); no NaN or Inf; config
against tensors. `--forward` then compares logits with transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .anatomy import analyse
from .configs import check_moe_layers
from .errors import MoegrowError, SourceError
from .grow import rebuild_plan
from .io import FLOAT_DTYPES, TensorInfo, pread_exact, read_index
from .json_stream import read_object
from .layouts import wrapper_of
from .neurons import NOISE_MODES, RECORD_KEYS, record_extra_ok
from .noise import GENERATORS
from .plan import OutTensor, Plan
from .provenance import RECORD_NAME, mapping_differs
from .quant.dequantised import is_quantised
from .quant.verify import check_encoded
from .source import Source, read_config


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    checked: int = 0
    noise_std: dict[str, float] = field(default_factory=dict)
    forward: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "tensors_checked": self.checked,
                "noise_std": self.noise_std, "forward": self.forward}


def _read_record(output: Path) -> dict[str, Any]:
    path = output / RECORD_NAME
    if not path.is_file():
        raise SourceError(f"{path}: missing; OUTPUT was not written by moegrow")
    try:  # the tensor mapping streamed from the file each time it is read (362,000 entries for DeepSeek-V3 2x2x)
        record = read_object(path, "tensors")
        problem = _record_problem(record)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from None
    if problem:
        raise SourceError(f"{path}: not a valid moegrow provenance record ({problem})")
    return record


def _record_problem(record: Any) -> str | None:
    """What is wrong with a provenance record's shape, if anything (see provenance.py)."""

    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    def is_num(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if not isinstance(record, dict):
        return "not a JSON object"
    if record.get("operation") not in ("grow-depth", "grow-width", "grow", "upcycle"):
        return f"unknown operation {record.get('operation')!r}"
    tensors = record.get("tensors")
    def is_extra(x: Any) -> bool:  # see provenance.part_record
        recipes = {k: v for k, v in x.items() if k in RECORD_KEYS} if isinstance(x, dict) else {}
        if not all(record_extra_ok(k, v) for k, v in recipes.items()):  # --noise-mode relative, --reinit
            return False
        x = {k: v for k, v in x.items() if k not in RECORD_KEYS} if isinstance(x, dict) else x
        return isinstance(x, dict) and set(x) <= {"rows", "add", "axis", "fill", "init", "decode", "encode"} and all(
            (isinstance(v, list) and len(v) == 3 and all(map(is_int, v))) if k == "rows"
            else is_num(v) if k == "fill" else v in ("zeros", "normal") if k == "init"
            else isinstance(v, str) if k in ("decode", "encode") else is_int(v)
            for k, v in x.items())

    def is_part(p: Any) -> bool:
        return (isinstance(p, list) and len(p) in (2, 3, 4) and isinstance(p[0], str)
                and all(is_num(x) for x in p[1:3]) and (len(p) < 4 or is_extra(p[3])))

    if not (isinstance(tensors, Mapping) and all(isinstance(parts, list) and all(map(is_part, parts))
                                                 for parts in tensors.values())):
        return '"tensors" is not a mapping of output tensors to [source, noise(, scale(, extras))] parts'
    g = record.get("growth")
    if not isinstance(g, dict):
        return '"growth" is not an object'
    checks = {
        "layer_map": lambda v: isinstance(v, list) and all(is_int(x) for x in v),
        "factor": lambda v: is_int(v) and v >= 1,
        "noise": is_num,
        "router_noise": is_num,
        "seed": is_int,
        "noise_generator": lambda v: v in GENERATORS,
        "top_k": lambda v: v in ("scale", "keep") or (is_int(v) and v >= 1),
        "allow_inexact": lambda v: isinstance(v, bool),
        "depth_init": lambda v: v in ("copy", "identity"),
        "experts": lambda v: is_int(v) and v >= 1,
        "router_init": lambda v: v in ("zeros", "normal"),  # upcycle
        "router_std": lambda v: is_num(v) and v >= 0,
        "dense_model_type": lambda v: isinstance(v, str),
        "dtype": lambda v: v in ("keep", "bfloat16", "float16", "float32"),
        "noise_mode": lambda v: v in NOISE_MODES,
        "reinit": lambda v: is_num(v) and 0 <= v < 1,
    }
    for key, ok in checks.items():
        if g.get(key) is not None and not ok(g[key]):
            return f"growth.{key} is {g[key]!r}"
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON values (NaN equals NaN: both are written `NaN`)."""
    return bool(a == b) or json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _decode(raw: bytes, dtype: str) -> Any:
    import torch

    from .noise import torch_dtype

    return torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype)).to(torch.float64)


# Per float dtype: the byte of each value that holds its exponent's high bits (little-endian), and a table
# mapping that byte to 1 where its exponent bits are all ones (the value may be NaN or Inf), else to 0.
_HIGH_BYTE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_ALL_ONES = {"F64": 0x7F, "F32": 0x7F, "F16": 0x7C, "BF16": 0x7F}
_MAY_BE_NONFINITE = {d: bytes(int(b & m == m) for b in range(256)) for d, m in _ALL_ONES.items()}


def _finite(raw: bytes, dtype: str) -> bool:
    """Whether a float tensor's bytes hold no NaN or Inf. Only values whose high byte has every exponent bit it
    holds set can be either: looked for in the bytes (no torch, nothing decoded: most of a DeepSeek-V3
    verify's tensors are small scales, whose decoding cost more than their reads); torch decides the rest."""
    size = _HIGH_BYTE.get(dtype)
    if size is None or 1 not in raw[size - 1::size].translate(_MAY_BE_NONFINITE[dtype]):
        return True
    import torch

    return bool(torch.isfinite(_decode(raw, dtype)).all())


def _check_joined(t: OutTensor, out: TensorInfo, plan: Plan, source: Source, reader: _Reader,
                  report: Report) -> None:
    """A tensor whose parts join along an inner axis (an expert-index table): rebuilt and compared whole."""
    from .noise import join, transform

    pieces = []
    for i, part in enumerate(t.parts):
        src = source.tensors[part.source]
        raw = bytearray(reader.read(src.path, src.start, src.nbytes))
        data = raw if part.is_copy else transform(raw, src.dtype, part, plan.seed, t.name, i, "cpu",
                                                  generator=plan.noise_generator)
        pieces.append((bytearray(data), src.shape))
    if reader.read(out.path, out.start, out.nbytes) != bytes(join(pieces, t.dtype, t.axis)):
        sources = ", ".join(sorted({p.source for p in t.parts}))
        report.problems.append(f"{t.name}: differs from {sources} joined along axis {t.axis} as the plan says")


class _Reader:
    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}

    def read(self, path: Path, start: int, count: int) -> bytes:
        if path not in self.fds:
            self.fds[path] = os.open(path, os.O_RDONLY)
        return pread_exact(self.fds[path], count, start, str(path))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def _check_tensor(t: OutTensor, out: TensorInfo, plan: Plan, source: Source, device: str,
                  reader: _Reader, report: Report) -> None:
    from .noise import add_noise, filled, generate, shift

    if not t.flat:
        _check_joined(t, out, plan, source, reader, report)
        return
    pos = out.start
    measured: list[float] = []
    relative: list[float] = []  # --noise-mode relative: per expert slice, noise std / source std
    whole = None  # the output tensor's bytes, where one part read them all
    for i, part in enumerate(t.parts):
        if part.init:  # generated (the tensor's only part): zeros, or normal regenerated from the seed
            got = reader.read(out.path, pos, t.nbytes)
            pos += t.nbytes
            if got != bytes(generate(part.init, part.noise, t.dtype, t.nbytes, plan.seed, t.name, i,
                                     generator=plan.noise_generator)):
                what = "zeros" if part.init == "zeros" else f"normal(std {part.noise}) drawn from seed {plan.seed}"
                report.problems.append(f"{t.name}: part {i} is not {what}")
            continue
        src = source.tensors[part.source]
        off, n = part.span(src.nbytes)
        got = reader.read(out.path, pos, n)
        if pos == out.start and n == out.nbytes:
            whole = got
        pos += n
        want = reader.read(src.path, src.start + off, n)
        if part.fill is not None:  # identity depth init: the source's bytes are replaced by a constant
            want = bytes(filled(n, src.dtype, part.fill))
            if part.noise == 0.0 and part.scale == 1.0:
                if got != want:
                    report.problems.append(f"{t.name}: part {i} is not all {part.fill:g} (--depth-init identity "
                                           f"sets it so that the added layer is the identity)")
                continue
        if part.add:
            if got != bytes(shift(bytearray(want), src.dtype, part.add)):
                report.problems.append(f"{t.name}: part {i} is not {part.source} plus {part.add}")
            continue
        if part.is_copy:
            if got != want:
                report.problems.append(f"{t.name}: part {i} differs from its source {part.source}")
            continue
        if part.relative or part.reinit is not None:  # --noise-mode relative, --reinit (noise_modes.py)
            from .noise_modes import check_part

            problems, std, ratios = check_part(part, got, want, src.dtype, plan.seed, t.name, i, device,
                                               generator=plan.noise_generator)
            report.problems += problems
            if std is not None:
                measured.append(std)
            relative += ratios
            continue
        if part.noise == 0.0:  # scaled only: deterministic on any device
            if got != bytes(add_noise(bytearray(want), src.dtype, 0.0, plan.seed, t.name, i, "cpu", part.scale,
                                      generator=plan.noise_generator)):
                report.problems.append(f"{t.name}: part {i} is not {part.source} scaled by {part.scale:g}")
            continue
        diff = _decode(got, src.dtype) - _decode(want, src.dtype) * part.scale
        std = float(diff.std()) if diff.numel() > 1 else float(diff.abs().max())
        measured.append(std)
        if device == "cpu" or plan.noise_generator == "pcg64":  # pcg64: every device writes the CPU's bytes
            expect = bytes(add_noise(bytearray(want), src.dtype, part.noise, plan.seed, t.name, i, "cpu",
                                     part.scale, generator=plan.noise_generator))
            if got != expect:
                report.problems.append(f"{t.name}: part {i} is not {part.source} plus the recorded "
                                       f"noise ({plan.noise_generator} generator, seed {plan.seed}, "
                                       f"std {part.noise})")
        elif not bool(diff.any()):  # drawn on another device: too small to measure, but not noise-free
            report.problems.append(f"{t.name}: part {i} carries no noise (recorded std {part.noise})")
        elif diff.numel() >= 1000 and abs(std - part.noise) > 0.1 * part.noise:
            report.problems.append(f"{t.name}: noise std {std:.3g} differs from the recorded {part.noise}")
    if measured:
        report.noise_std[t.name] = sum(measured) / len(measured)
    if relative:  # --noise-mode relative: noise std over each source slice's std, as training checkpoints
        report.noise_std[f"{t.name} (relative)"] = sum(relative) / len(relative)
    if out.dtype in FLOAT_DTYPES:
        raw = whole if whole is not None else reader.read(out.path, out.start, out.nbytes)
        if not _finite(raw, out.dtype):
            report.problems.append(f"{t.name}: contains NaN or Inf")


def verify(source: Source, output: Path, progress: Callable[[int], None] | None = None, *,
           record: dict[str, Any] | None = None, out_tensors: Mapping[str, TensorInfo] | None = None) -> Report:
    """Check OUTPUT against SOURCE and its provenance record (see the module docstring).

    `record` (`_read_record`'s) and `out_tensors` (OUTPUT's `read_index`): where the caller has read them."""
    report = Report()
    record = _read_record(output) if record is None else record
    out_config = read_config(output)
    out_tensors = read_index(output) if out_tensors is None else out_tensors
    try:
        plan = rebuild_plan(source, record)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SourceError(f"{output / RECORD_NAME}: growth flags are not valid ({type(e).__name__}: "
                          f"{e})") from None
    if not isinstance(record["tensors"], Mapping) or mapping_differs(plan.tensors, record["tensors"]):
        report.problems.append(f"{output / RECORD_NAME}: tensor mapping differs from the plan that "
                               "its flags describe")
    for key in sorted(set(plan.config) | set(out_config)):
        if key != "transformers_version" and not _same(plan.config.get(key), out_config.get(key)):
            report.problems.append(f"{output / 'config.json'}: {key} is {out_config.get(key)!r}, "
                                   f"the growth gives {plan.config.get(key)!r}")
    try:
        moe_layers = analyse({n: t.shape for n, t in out_tensors.items()}, out_config, plan.layout,
                             str(output / "config.json")).moe_layers  # not its roles: one per output tensor
        check_moe_layers(out_config, plan.layout, moe_layers, str(output / "config.json"))
    except MoegrowError as e:
        report.problems.append(str(e))
    by_name = {t.name: t for t in plan.tensors}
    for name in sorted(n for n in out_tensors if n not in by_name):
        report.problems.append(f"{name}: in OUTPUT but not accounted for by the growth")
    reader = _Reader()
    device = str(record.get("noise_device"))
    run = _CopyRun(lambda t, out: _check_tensor(t, out, plan, source, device, reader, report), reader, report,
                   progress)
    try:
        for t in plan.tensors:
            out = out_tensors.get(t.name)
            src = _copied_from(t, out, source)
            if src is not None and out is not None:  # checked with its neighbours, two reads for them all
                if not run.fits(out, src):
                    run.flush()
                run.add(t, out, src)
                continue
            run.flush()
            if out is None:
                report.problems.append(f"{t.name}: missing from OUTPUT")
                continue
            if (out.dtype, out.shape) != (t.dtype, t.shape):
                report.problems.append(f"{t.name}: {out.dtype}{list(out.shape)}, expected "
                                       f"{t.dtype}{list(t.shape)}")
                continue
            if t.encode is not None:  # dequantised, converted or requantised (moegrow.quant)
                check_encoded(t, out, plan, source, device, reader, report, by_name, out_tensors)
            else:
                _check_tensor(t, out, plan, source, device, reader, report)
            report.checked += 1
            if progress:
                progress(t.nbytes)
        run.flush()
    finally:
        reader.close()
    return report


def _copied_from(t: OutTensor, out: TensorInfo | None, source: Source) -> TensorInfo | None:
    """The source tensor of an output tensor that is its byte copy, as OUTPUT's index says it should be (its
    dtype and shape, the source's size); None for anything else (checked by `_check_tensor`, or reported)."""
    if out is None or t.encode is not None or len(t.parts) != 1 or (out.dtype, out.shape) != (t.dtype, t.shape):
        return None
    p = t.parts[0]
    if not p.is_copy or p.rows is not None or not t.flat:
        return None
    src = source.tensors.get(p.source)
    return src if src is not None and src.nbytes == out.nbytes else None


class _CopyRun:
    """Byte-copied tensors that follow each other in one OUTPUT file and in one source file (most of a growth),
    read and compared as one span each: two reads for up to `LIMIT` bytes, not two per tensor (362,000 tensors
    for a DeepSeek-V3 2x2x). Where the spans differ, each tensor is checked alone (`check`), for its message."""

    LIMIT = 16 * 1024 * 1024

    def __init__(self, check: Callable[[OutTensor, TensorInfo], None], reader: _Reader, report: Report,
                 progress: Callable[[int], None] | None) -> None:
        self.check, self.reader, self.report, self.progress = check, reader, report, progress
        self.items: list[tuple[OutTensor, TensorInfo, TensorInfo]] = []

    def fits(self, out: TensorInfo, src: TensorInfo) -> bool:
        if not self.items:
            return True
        first, (_, o, s) = self.items[0][1], self.items[-1]
        return (o.path == out.path and o.end == out.start and s.path == src.path and s.end == src.start
                and out.end - first.start <= self.LIMIT)

    def add(self, t: OutTensor, out: TensorInfo, src: TensorInfo) -> None:
        self.items.append((t, out, src))

    def flush(self) -> None:
        items, self.items = self.items, []
        if not items:
            return
        (_, o0, s0), (_, o1, s1) = items[0], items[-1]
        got = self.reader.read(o0.path, o0.start, o1.end - o0.start)
        if got != self.reader.read(s0.path, s0.start, s1.end - s0.start):
            for t, out, _ in items:
                self.check(t, out)
        else:
            for t, out, _ in items:
                if out.dtype in FLOAT_DTYPES and not _finite(got[out.start - o0.start:out.end - o0.start], out.dtype):
                    self.report.problems.append(f"{t.name}: contains NaN or Inf")
        for t, _, _ in items:
            self.report.checked += 1
            if self.progress:
                self.progress(t.nbytes)


def _decoder_layers(model: Any, n: int, prefix: str) -> Any:
    """The model's list of `n` decoder layers: the module saved under `prefix` (model.layers.), else the
    one list of n modules named like layers (a wrapper's text decoder: `language_model` in its path)."""
    import torch

    lists = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n}
    if prefix.rstrip(".") in lists:
        return lists[prefix.rstrip(".")]
    named = sorted((name for name in lists if name.rsplit(".", 1)[-1] in ("layers", "blocks")),
                   key=lambda name: ("language" not in name and "text" not in name, len(name)))
    if not named:
        raise MoegrowError(f"verify --forward: found no list of {n} decoder layers in the model")
    return lists[named[0]]


@dataclass
class IdentityWatch:
    """`verify --forward` of an identity depth init: the added copies (new layer indices) among the output's
    `num_layers` decoder layers saved under `prefix`; `found` gets max |output - input| of each."""

    positions: Sequence[int]
    prefix: str
    num_layers: int
    found: dict[int, float] = field(default_factory=dict)


def _watch_identity(model: Any, layers: Any, watch: IdentityWatch) -> None:
    """Hooks recording, for each watched layer, max |output - input| of its hidden states."""
    found = watch.found

    def hook(j: int) -> Callable[..., None]:
        def record(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x = args[0] if args else kwargs.get("hidden_states")
            y = output[0] if isinstance(output, tuple) else output
            found[j] = max(found.get(j, 0.0), float((y.float() - x.float()).abs().max()))
        return record

    for j in watch.positions:
        layers[j].register_forward_hook(hook(j), with_kwargs=True)


def _dequantised_whole(path: Path) -> Any:
    """A quantised checkpoint as a whole float32 model: built without a quantizer and loaded through
    transformers' conversion with every weight dequantised by moegrow's codecs (see moegrow.quant.dequantised)."""
    from .layerwise import StreamedModel

    streamed = StreamedModel(path)
    try:
        for i in range(len(streamed.layers)):
            streamed.load_layer(i)
    finally:
        streamed.close()
    return streamed.model


def forward_diff(source: Path, output: Path, seed: int = 0, tokens: int = 32,
                 identity: IdentityWatch | None = None) -> float:
    """Max abs logit difference of the two checkpoints on fixed random tokens, in float32.

    With `identity`, the output's added layer copies are watched too (see `IdentityWatch`)."""
    try:
        import torch
        import transformers
    except ImportError:
        raise MoegrowError("verify --forward needs transformers: pip install 'moegrow[forward]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logits = []
    for path in (source, output):
        config = transformers.AutoConfig.from_pretrained(path)
        # multimodal wrappers that AutoModelForCausalLM does not map (aria, minimax_m3_vl, inkling_mm_model,
        # inkling2, kimi_k25, ...) run text-only input_ids through their image-text-to-text class, else (qwen3_omni_moe)
        # their multimodal-LM class's text module (`Wrapper.text_module`)
        autos = (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText)
        auto = next((a for a in autos if type(config) in a._model_mapping), transformers.AutoModelForMultimodalLM)
        model = _dequantised_whole(path) if is_quantised(path) else auto.from_pretrained(path, dtype=torch.float32)
        wrapper = wrapper_of(config.model_type)
        if wrapper is not None and wrapper.text_module:
            model = getattr(model, wrapper.text_module)
        model.eval()
        if identity is not None and path == output:
            _watch_identity(model, _decoder_layers(model, identity.num_layers, identity.prefix), identity)
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits.float())
        del model
    return float((logits[0] - logits[1]).abs().max())
