"""The `moegrow` command line: inspect, grow-depth, grow-width, grow, upcycle, verify.

Errors are one line on stderr (`moegrow: error: ...`) with exit 2; `verify` exits 1 when it
finds a problem; SIGINT exits 130 and SIGTERM 143. `--debug` shows the traceback instead.
`--json` prints one JSON object on stdout for scripts. Progress bars appear only on a terminal.
The whole contract is in docs/errors.md.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .errors import MoegrowError, VerificationFailed
from .execute import format_size, parse_size
from .io import read_index
from .noise import DEFAULT_GENERATOR, GENERATORS
from .plan import Plan

app = typer.Typer(
    name="moegrow",
    help="Grow Mixture-of-Experts checkpoints: depth by layer interposition, width by expert "
    "duplication with noise (arXiv 2510.08008). Reads safetensors from a folder or the Hugging "
    "Face Hub; writes a checkpoint transformers loads as it is.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _LazyConsole:
    """rich's stderr Console, made at first use: importing rich.console costs 30-40 ms of start-up,
    and a `--quiet` run that succeeds prints nothing."""

    def _console(self) -> Any:
        console = self.__dict__.get("console")
        if console is None:
            from rich.console import Console

            console = self.__dict__["console"] = Console(stderr=True, highlight=False, soft_wrap=True)
        return console

    def __getattr__(self, name: str) -> Any:
        return getattr(self._console(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._console(), name, value)


err: Any = _LazyConsole()
_state = {"debug": False}


class Terminated(BaseException):
    """SIGTERM, turned into an exception so that partial output is cleaned up."""


def _classes(*names: str) -> tuple[type[BaseException], ...]:
    """Exception classes by dotted name, those that import: typer >= 0.2x carries its own copy of
    click (`typer._click`), older typer uses click itself."""
    found: list[type[BaseException]] = []
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


_USAGE_ERRORS = _classes("typer._click.exceptions.ClickException", "click.exceptions.ClickException")
_NO_ARGS = _classes("typer._click.exceptions.NoArgsIsHelpError", "click.exceptions.NoArgsIsHelpError")
_EXITS = _classes("typer.Exit", "typer._click.exceptions.Exit", "click.exceptions.Exit")
_ABORTS = _classes("typer.Abort", "typer._click.exceptions.Abort", "click.exceptions.Abort")


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moegrow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


# -- shared options ------------------------------------------------------------------------------

Src = Annotated[str, typer.Argument(help="Source checkpoint: a local folder or a Hub repo id (org/name).")]
Out = Annotated[Path, typer.Argument(help="Output folder (must not exist unless --force).")]
Revision = Annotated[str | None, typer.Option(help="Hub branch, tag or commit (Hub sources only).")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")]
MaxShard = Annotated[str | None, typer.Option(
    help="Largest output shard, e.g. 5GB or 500MiB (default: a sharded source's largest shard, so the "
    "output keeps its file sizes; transformers' 50GB for a single-file source). Shards are written in "
    "parallel, one thread per file. Under torchrun or srun "
    "(WORLD_SIZE > 1) the shard is the unit each process writes: use at least as many shards as processes "
    "(see docs/usage.md).")]
Device = Annotated[str, typer.Option(help="Where noise is drawn and added: auto, cpu or cuda. "
                                          "Byte copies never touch a device.")]
Force = Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists (only once the "
                                                     "new one is complete).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no summary on stderr.")]
Threads = Annotated[int, typer.Option(help="Worker threads for copying and noise. A shard is written by one "
                                      "thread at a time (noise is computed in parallel): for byte copies, more threads "
                                      "than output shards do not help.", min=1)]
Strict = Annotated[bool, typer.Option(
    "--strict", help="Read every source tensor first and refuse NaN or Inf (exit 2). Without it, "
    "only tensors that get noise are checked, with a warning.")]
Layers = Annotated[str | None, typer.Option(help="New depth: a factor (2x) or a layer count (N).")]
Method = Annotated[str, typer.Option(
    help="interpose: new layer i copies old floor(i*L_old/L_new), so 2x gives 0,0,1,1,... "
    "(the paper's method); stack: new layer i copies old i mod L_old (0,1,..,0,1,..).")]
LayerMap = Annotated[str | None, typer.Option(
    help="Explicit source layer of every new layer, e.g. 0,0,1,1 (overrides --layers).")]
DepthInit = Annotated[str, typer.Option(
    help="copy: every new layer is a byte copy of its source layer (the paper's; not function-preserving); "
    "identity: the first occurrence of each source layer stays the original and every added copy has the "
    "tensors that write into the residual stream (attention / mixer output projections, expert, shared and "
    "dense down projections) zeroed, so the grown model computes the source's function (LLaMA Pro block "
    "expansion). Refused, with the reason, for families whose layer is not x + f(x).")]
Experts = Annotated[str | None, typer.Option(
    help="New expert count: a factor (2x) or a count that is a multiple of the source's; grow-width also "
    "takes any count N up to 2E with --select.")]
Select = Annotated[str | None, typer.Option(
    help="--experts N not a multiple of the source's E: which N - E experts of each MoE layer are copied "
    "(copies become experts E..N-1). load: those the source routes to most often on --calibration "
    "(top-k selections counted over its tokens, run in float32 one layer at a time; ties to the lower index); "
    "first: experts 0..N-E-1. Top-k stays; never function-preserving. Training checkpoints (Megatron-core, "
    "OLMo-core): first only (load needs the trainer's forward).")]
Calibration = Annotated[str | None, typer.Option(
    help="--select load: a plain text file, tokenised with the checkpoint's own tokenizer and run through "
    "the source to count each layer's expert selections. The chosen experts are recorded in moegrow.json, "
    "so verify does not need the file.")]
Noise = Annotated[float, typer.Option(help="Std of Gaussian noise added to the copied experts' "
                                           "weights (originals stay byte-identical). Paper: 0.01.")]
RouterNoise = Annotated[float, typer.Option(help="Std of Gaussian noise on the copies' router rows.")]
NoiseMode = Annotated[str, typer.Option(
    help="absolute: --noise (and --router-noise) is the std itself (the paper's); relative: it is a fraction "
    "of the std of each source expert tensor it is added to (per expert for fused [E, ...] tensors, per row "
    "for routers; in dequantised space for quantised weights), so --noise 0.01 perturbs every copy by 1% of "
    "its own spread whatever the layer's scale.")]
Reinit = Annotated[float, typer.Option(
    help="Drop-Upcycling (arXiv 2502.19261): in every copy, re-initialise a random fraction R (0 < R < 1) of "
    "the intermediate neurons (the same ones in the gate and up rows and the down columns) from a normal with "
    "the original expert tensor's mean and std; the rest stays a copy (plus any --noise). Seeded by --seed, "
    "layer, expert and copy. 0: off. Refused for a family whose neuron layout moegrow does not know.")]
Seed = Annotated[int, typer.Option(help="Noise seed; the same seed gives the same bytes.")]
NoiseGenerator = Annotated[str, typer.Option(
    help="pcg64: numpy's PCG64 bits through a table of 65,536 normal quantiles (bounded at 4.32 std), on "
    "the CPU without torch, the same bytes on every device; torch: torch.randn (mt19937 on the CPU, Philox on "
    "CUDA), the generator of moegrow before pcg64, to reproduce the bytes of an earlier run. Recorded in "
    "moegrow.json; verify regenerates with the recorded one.")]
TopK = Annotated[str, typer.Option(
    help="scale: top-k times the growth factor, so that at zero noise the grown model computes "
    "the source's function; keep: same top-k (same FLOPs per token, not function-preserving); "
    "or an integer.")]
WidthTopK = Annotated[str | None, typer.Option(
    help="scale (the default): top-k times the growth factor, so that at zero noise the grown model computes "
    "the source's function; keep (the default with --select, which cannot scale top-k by N/E): same top-k "
    "(same FLOPs per token, not function-preserving); or an integer.")]
DType = Annotated[str, typer.Option(
    "--dtype", help="keep: every tensor in its source dtype; a quantised source (fp8 with block scales...) "
    "stays quantised, and noised copies are requantised in its format with fresh scales (originals and "
    "their scales stay byte-identical). bfloat16, float16 or float32: quantised weights are dequantised "
    "as transformers does and written in that dtype (scales and quantization_config dropped), other float "
    "tensors converted too, except float32 ones of a bfloat16/float16 source (correction biases...).")]
Iteration = Annotated[int | None, typer.Option(
    help="Megatron-LM run folder: the iteration to read (default: latest_checkpointed_iteration.txt's); "
    "OLMo-core save folder: the step<N>/ to read (default: the latest complete one).")]
Optimizer = Annotated[str, typer.Option(
    help="Training checkpoints (Megatron torch_dist, OLMo-core): keep grows the Adam moments with their "
    "parameters (copies, no noise; the step carried); drop writes no optimizer state.")]
AllowInexact = Annotated[bool, typer.Option(
    "--allow-inexact", help="Grow the width of a family whose routing no duplication can preserve "
    "(phimoe), which is refused without it; the result is not function-preserving (a warning says so).")]


def _open(source: str, revision: str | None):  # noqa: ANN202 - Source, imported lazily
    from .source import open_source

    return open_source(source, revision)


def _interactive(quiet: bool) -> bool:
    return not quiet and err.is_terminal and not os.environ.get("CI")


@contextmanager
def _progress(total: int, label: str, show: bool) -> Iterator[Callable[[int], None] | None]:
    if not show:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def _summary(plan: Plan, source: Any) -> dict[str, Any]:
    """Plan facts for --dry-run and the run summary."""
    from .counts import growth_param_counts

    layout = plan.layout
    before, after = growth_param_counts(plan, source)
    used = plan.sources()
    return {
        "operation": plan.operation,
        "model_type": plan.config.get("model_type"),
        "tensors": len(plan.tensors),
        "bytes_in": sum(source.tensors[n].nbytes for n in used),
        "bytes_out": sum(t.nbytes for t in plan.tensors),
        "layers": [layout.num_layers(plan.source_config), layout.num_layers(plan.config)],
        "experts": [None if plan.upcycle else layout.num_experts(plan.source_config), layout.num_experts(plan.config)],
        "top_k": [None if plan.upcycle else layout.top_k(plan.source_config), layout.top_k(plan.config)],
        "layer_map": plan.layer_map,
        "total_params": [before[0], after[0]],
        "active_params": [before[1], after[1]],
        "config_changes": plan.config_changes,
        "function_preserving": plan.function_preserving,
        "preservation": plan.preservation(),
        "noise": plan.noise,
        "router_noise": plan.router_noise,
        "noise_mode": plan.noise_mode,
        "reinit": plan.reinit,
        "seed": plan.seed,
        "noise_generator": plan.noise_generator,
        "dtype": plan.dtype,
        "quantization": plan.quant.describe() if plan.quant is not None else None,
        "warnings": plan.warnings,
        **({"depth_init": plan.depth_init, "identity_init": plan.filled()} if plan.layer_map is not None else {}),
        **({"upcycle": plan.upcycle} if plan.upcycle else {}),
        **({"select": plan.select, "selection": {str(k): v for k, v in plan.selection.items()}}
           if plan.selection is not None else {}),
    }


def _print_summary(s: dict[str, Any], title: str) -> None:
    up = s.get("upcycle")
    source_type = f"{up['dense_model_type']} -> " if up else ""
    err.print(f"[bold]{title}[/bold] {s['operation']} ({source_type}{s['model_type']})")
    before = ("dense", "-") if up else (s["experts"][0], s["top_k"][0])
    err.print(f"  layers {s['layers'][0]} -> {s['layers'][1]}, experts {before[0]} -> "
              f"{s['experts'][1]}, top-k {before[1]} -> {s['top_k'][1]}")
    err.print(f"  params {s['total_params'][0]:,} -> {s['total_params'][1]:,} total, "
              f"{s['active_params'][0]:,} -> {s['active_params'][1]:,} active")
    err.print(f"  {s['tensors']} tensors, {format_size(s['bytes_in'])} read, {format_size(s['bytes_out'])} written")
    if title == "plan" and "shards" in s:  # a written growth names its shards on its last line
        err.print(f"  {s['shards']} output shard(s) of at most {format_size(s['max_shard_size'])}")
    if s.get("quantization") or s.get("dtype", "keep") != "keep":
        q = s.get("quantization")
        src = f"{q['format']} ({q['quantized_tensors']} quantised weights)" if q else "float"
        err.print(f"  source {src}, --dtype {s['dtype']}", markup=False)
    if s["layer_map"] is not None:
        err.print(f"  layer map: {','.join(map(str, s['layer_map']))}")
    if s.get("selection") is not None:
        err.print(f"  experts copied (--select {s['select']}), per MoE layer: "
                  + "; ".join(f"{k}: {','.join(map(str, v))}" for k, v in s["selection"].items()), markup=False)
    for c in s["config_changes"]:
        err.print(f"  config {c}", markup=False)
    for what, filled in (s.get("identity_init") or {}).items():
        verb = "zeroed" if what == "zeroed" else "set to 1"
        err.print(f"  depth init identity: {filled['count']} tensors of the added layers {verb}: "
                  f"{', '.join(filled['tensors'])}", markup=False)
    err.print(f"  function-preserving: {s['preservation']}")
    if up and s["function_preserving"]:
        err.print(f"  why: {up['why_exact']}", markup=False)
    for w in s["warnings"]:
        err.print(f"warning: {w}", style="yellow", markup=False)


def _run_growth(operation: str, source: str, output: Path | None, revision: str | None, json_out: bool,
                dry_run: bool, max_shard_size: str | None, device: str, force: bool, quiet: bool,
                threads: int, strict: bool = False, **kw: Any) -> None:
    """A growth; under torchrun / srun (WORLD_SIZE > 1) one rank of several (moegrow/ranks.py)."""
    from .ranks import joined

    with joined(enabled=not dry_run) as ranks:
        try:
            _run_growth_as(ranks, operation, source, output, revision, json_out, dry_run, max_shard_size,
                           device, force, quiet, threads, strict, **kw)
        except BaseException as e:
            if ranks is None:
                raise
            ranks.fail(e)


def _run_growth_as(ranks: Any, operation: str, source: str, output: Path | None, revision: str | None,
                   json_out: bool, dry_run: bool, max_shard_size: str | None, device: str, force: bool,
                   quiet: bool, threads: int, strict: bool = False, **kw: Any) -> None:
    from .execute import check_output, split_shards
    from .grow import check_finite, default_max_shard, plan_for, write

    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter("must be auto, cpu or cuda", param_hint="--device")
    if kw.get("noise_generator", DEFAULT_GENERATOR) not in GENERATORS:
        raise typer.BadParameter(f"must be {' or '.join(GENERATORS)}", param_hint="--noise-generator")
    iteration, optimizer = kw.pop("iteration", None), kw.pop("optimizer", "keep")
    from .training import detect

    if detect(source):
        if ranks is not None:
            from .ranks import RankError

            raise RankError(f"{source}: training checkpoints are written by one process (unset WORLD_SIZE)")
        return _run_training(operation, source, output, iteration, optimizer, json_out, dry_run, force, quiet, kw)
    if iteration is not None:
        raise typer.BadParameter("applies to Megatron-LM run folders and OLMo-core save folders only",
                                 param_hint="--iteration")
    shard = parse_size(max_shard_size) if max_shard_size else None  # checked before a Hub download
    src = _open(source, revision)
    shard = shard or default_max_shard(src)
    generator = kw.pop("noise_generator", DEFAULT_GENERATOR)
    if operation == "upcycle":
        from .upcycle import plan_upcycle_for

        plan = plan_upcycle_for(src, **kw)
    else:
        plan = plan_for(src, operation, **kw)
    plan.noise_generator = generator
    summary = _summary(plan, src)
    summary.update(shards=len(split_shards(plan.tensors, shard)), max_shard_size=shard)
    if not dry_run:
        assert output is not None
        check_output(output, src.folder, force)  # before a long --strict scan
    if strict:
        check_finite(plan, src)
    if dry_run:
        from .ranks import rank

        if rank() != 0:  # under torchrun every rank plans the same: one prints
            return
        if json_out:
            _emit({**summary, "dry_run": True})
        else:
            _print_summary(summary, "plan")
        return
    assert output is not None
    total = summary["bytes_out"]
    if ranks is not None:  # rank 0 shows its own share's progress and the summary; the others are quiet
        from .ranks import share

        total = share(plan, shard, ranks.rank, ranks.size)
        quiet, json_out = quiet or ranks.rank != 0, json_out and ranks.rank == 0
    with _progress(total, operation, _interactive(quiet)) as progress:
        written = write(plan, src, output, max_shard_size=shard, device=device, threads=threads,
                        force=force, progress=progress,
                        options={**kw, "noise_generator": generator, "max_shard_size": max_shard_size},
                        ranks=ranks)
    if ranks is not None and ranks.rank != 0:
        return
    for w in written.warnings:  # NaN / Inf in the source: shown even with --quiet
        err.print(f"warning: {w}", style="yellow", markup=False, emoji=False)
    summary.update(output=str(output), files=written.files, seconds=round(written.seconds, 3),
                   warnings=summary["warnings"] + written.warnings)
    if json_out:
        _emit(summary)
    if not quiet:
        summary["warnings"] = plan.warnings  # those of the writing are printed above
        _print_summary(summary, "grown")
        err.print(f"  wrote {output} ({len(written.files)} shard(s)) in {written.seconds:.1f} s")


def _run_training(operation: str, source: str, output: Path | None, iteration: int | None, optimizer: str,
                  json_out: bool, dry_run: bool, force: bool, quiet: bool, kw: dict[str, Any]) -> None:
    """A growth of a training-stack checkpoint (moegrow/training.py), written in its own format."""
    from .execute import check_output
    from .training import open_training, plan_training, summary, write_training

    ckpt = open_training(source, iteration)
    plan = plan_training(ckpt, operation, optimizer=optimizer, **kw)
    s = summary(ckpt, plan)
    if dry_run:
        if json_out:
            _emit({**s, "dry_run": True})
        else:
            _print_training(s, "plan")
        return
    assert output is not None
    check_output(output, ckpt.root, force)
    seconds = write_training(ckpt, plan, output, force)
    s.update(output=str(output), seconds=round(seconds, 3))
    if json_out:
        _emit(s)
    if not quiet:
        _print_training(s, "grown")
        err.print(f"  wrote {output} in {seconds:.1f} s", markup=False)


def _print_training(s: dict[str, Any], title: str) -> None:
    err.print(f"[bold]{title}[/bold] {s['operation']} ({s['format']})")
    err.print(f"  layers {s['layers'][0]} -> {s['layers'][1]}, experts {s['experts'][0]} -> {s['experts'][1]}, "
              f"top-k {s['top_k'][0]} -> {s['top_k'][1]}", markup=False)
    err.print(f"  {s['keys']} keys in {s['chunks']} chunks, {format_size(s['bytes_out'])} written; "
              f"optimizer {s['optimizer']}", markup=False)
    if s["layer_map"] is not None:
        err.print(f"  layer map: {','.join(map(str, s['layer_map']))}")
    for c in s["config_changes"]:
        err.print(f"  {'' if c.startswith('config.json') else 'common.pt '}{c}", markup=False)
    recipes = [f"--depth-init {s['depth_init']}" if s.get("depth_init", "copy") != "copy" else "",
               f"--noise-mode {s['noise_mode']}" if s.get("noise_mode", "absolute") != "absolute" else "",
               f"--reinit {s['reinit']:g}" if s.get("reinit") else "",
               f"--select {s['select']}" if s.get("select") else ""]
    if any(recipes):
        err.print(f"  recipes: {' '.join(r for r in recipes if r)}", markup=False)
    err.print(f"  function-preserving: {s['preservation']}", markup=False)
    for w in s["warnings"]:
        err.print(f"warning: {w}", style="yellow", markup=False)


# -- commands ------------------------------------------------------------------------------------


@app.command()
def inspect(source: Src, revision: Revision = None, json_out: Json = False, iteration: Iteration = None) -> None:
    """Describe a checkpoint: layers, MoE layers, experts, top-k, routing, parameter counts."""
    from rich.console import Console

    from .inspection import describe
    from .training import detect

    if detect(source):
        from .training import describe as describe_training
        from .training import open_training, print_description

        tinfo = describe_training(open_training(source, iteration))
        if json_out:
            _emit(tinfo)
        else:
            print_description(tinfo, Console(highlight=False, soft_wrap=True))
        return

    info = describe(_open(source, revision))
    if json_out:
        _emit(info)
        return
    out = Console(highlight=False, soft_wrap=True)
    out.print(f"[bold]{info['source']}[/bold]  model_type={info['model_type']}")
    if info["text_config"]:
        out.print(f"  multimodal: text decoder {info['family']} ({info['text_config']}, layers "
                  f"{info['layer_prefix']}N); other tensors are copied untouched", markup=False)
    dense = info["dense_layers"]
    extra = info["extra_layers"]
    out.print(f"  layers: {info['num_layers']} ({len(info['moe_layers'])} MoE, {len(dense)} dense"
              + (f": {dense}" if dense else "") + ")"
              + (f", extra (MTP) layers {extra}" if extra else ""), markup=False)
    if info["mtp_tensors"]:
        mtp = [f"{info['mtp_prefix']}{i}" + (" (MoE)" if i in info["mtp_moe_layers"] else "")
               for i in info["mtp_layers"]]
        out.print(f"  MTP: {info['mtp_tensors']} tensors outside the decoder"
                  + (f", layers {', '.join(mtp)}" if mtp else "")
                  + " (ignored by transformers; not counted below; widened with the decoder)", markup=False)
    out.print(f"  experts: {info['num_experts']} routed, top-{info['top_k']}, "
              f"{info['num_shared_experts']} shared"
              + "".join(f", {n} extra router slots ({k})" for k, n in info["expert_segments"].items() if n))
    out.print(f"  routing: {info['routing']}")
    exact = "yes" if info["width_exact"] else f"no ({info['width_inexact_reason']})"
    out.print(f"  width growth function-preserving: {exact}", markup=False)
    if info["width_refused"]:
        out.print(f"  width growth refused: {info['width_refused']}", markup=False)
    if info["depth_refused"]:
        out.print(f"  depth growth refused: {info['depth_refused']}", markup=False)
    elif info["identity_depth_refused"]:
        out.print(f"  --depth-init identity refused: {info['identity_depth_refused']}", markup=False)
    if info["text_config"]:
        out.print(f"  params (text decoder): {info['text_total_params']:,} total, "
                  f"{info['text_active_params']:,} active per token", markup=False)
        out.print(f"  params (whole checkpoint, towers and projectors included): {info['total_params']:,} total, "
                  f"{info['active_params']:,} active per token", markup=False)
    else:
        out.print(f"  params: {info['total_params']:,} total, {info['active_params']:,} active per token")
    out.print(f"  dtypes: {', '.join(f'{k} x{v}' for k, v in info['dtypes'].items())}")
    q = info["quantization"]
    if q:
        block = f", blocks {'x'.join(map(str, q['block_size']))}" if q.get("block_size") else ""
        out.print(f"  quantisation: {q['format']}{block}, {q['quantized_tensors']} quantised weights "
                  f"(+{q['scale_tensors']} scale tensors)", markup=False)
    out.print("  --dtype writes: " + ", ".join(f"{k} {format_size(v)}" for k, v in info["dtype_bytes"].items()),
              markup=False)
    out.print(f"  {info['num_tensors']} tensors, {format_size(info['total_bytes'])} in {len(info['files'])} file(s)")


@app.command("grow-depth")
def grow_depth(source: Src, output: Out, layers: Layers = None, method: Method = "interpose",
               layer_map: LayerMap = None, revision: Revision = None, dry_run: DryRun = False,
               max_shard_size: MaxShard = None, device: Device = "auto", force: Force = False,
               quiet: Quiet = False, json_out: Json = False, threads: Threads = 2,
               strict: Strict = False, depth_init: DepthInit = "copy", dtype: DType = "keep",
               iteration: Iteration = None, optimizer: Optimizer = "keep") -> None:
    """Grow depth: copy layers by interposition (default) or stacking; rewrite layer-indexed config."""
    _run_growth("grow-depth", source, output, revision, json_out, dry_run, max_shard_size, device,
                force, quiet, threads, strict, layers=layers, method=method, layer_map=layer_map,
                depth_init=depth_init, dtype=dtype, iteration=iteration, optimizer=optimizer)


@app.command("grow-width")
def grow_width(source: Src, output: Out, experts: Experts = None, noise: Noise = 0.0,
               router_noise: RouterNoise = 0.0, seed: Seed = 0, top_k: WidthTopK = None,
               noise_mode: NoiseMode = "absolute", reinit: Reinit = 0.0,
               revision: Revision = None, dry_run: DryRun = False, max_shard_size: MaxShard = None,
               device: Device = "auto", force: Force = False, quiet: Quiet = False,
               json_out: Json = False, threads: Threads = 2, strict: Strict = False,
               allow_inexact: AllowInexact = False, dtype: DType = "keep", iteration: Iteration = None,
               optimizer: Optimizer = "keep", select: Select = None, calibration: Calibration = None,
               noise_generator: NoiseGenerator = DEFAULT_GENERATOR) -> None:
    """Grow width: duplicate every expert (copies after originals) and its router rows; or, with
    --select, copy N - E chosen experts per layer (any count N)."""
    sel = {"select": select, "calibration": calibration} if select or calibration else {}
    top_k = top_k if top_k is not None else None if select else "scale"  # --select: keep unless given
    _run_growth("grow-width", source, output, revision, json_out, dry_run, max_shard_size, device,
                force, quiet, threads, strict, experts=experts, noise=noise, router_noise=router_noise,
                seed=seed, top_k=top_k, allow_inexact=allow_inexact, dtype=dtype, iteration=iteration,
                optimizer=optimizer, noise_mode=noise_mode, reinit=reinit, noise_generator=noise_generator, **sel)


@app.command("grow")
def grow(source: Src, output: Out, layers: Layers = None, method: Method = "interpose",
         layer_map: LayerMap = None, experts: Experts = None, noise: Noise = 0.0,
         router_noise: RouterNoise = 0.0, seed: Seed = 0, top_k: TopK = "scale",
         noise_mode: NoiseMode = "absolute", reinit: Reinit = 0.0,
         revision: Revision = None, dry_run: DryRun = False, max_shard_size: MaxShard = None,
         device: Device = "auto", force: Force = False, quiet: Quiet = False, json_out: Json = False,
         threads: Threads = 2, strict: Strict = False, allow_inexact: AllowInexact = False,
         depth_init: DepthInit = "copy", dtype: DType = "keep", iteration: Iteration = None,
         optimizer: Optimizer = "keep", noise_generator: NoiseGenerator = DEFAULT_GENERATOR) -> None:
    """Grow depth and width in one pass (same bytes as grow-depth then grow-width, half the I/O)."""
    _run_growth("grow", source, output, revision, json_out, dry_run, max_shard_size, device, force,
                quiet, threads, strict, layers=layers, method=method, layer_map=layer_map, experts=experts,
                noise=noise, router_noise=router_noise, seed=seed, top_k=top_k, allow_inexact=allow_inexact,
                depth_init=depth_init, dtype=dtype, iteration=iteration, optimizer=optimizer, noise_mode=noise_mode,
                reinit=reinit, noise_generator=noise_generator)


UpExperts = Annotated[str | None, typer.Option(
    "--experts", help="Experts per MoE layer, every one a copy of the dense MLP (e.g. 8).")]
UpTopK = Annotated[str | None, typer.Option(
    "--top-k", help="Experts each token is routed to (1..--experts): the active parameters per token.")]
UpNoise = Annotated[float, typer.Option(help="Std of Gaussian noise added to every expert but expert 0 "
                                             "(which stays byte-identical to the dense MLP). 0 keeps the "
                                             "dense function exactly.")]
RouterInit = Annotated[str, typer.Option(
    help="The new router: zeros (every expert scores the same) or normal (std --router-std, drawn from "
    "--seed). Either keeps the dense function at --noise 0 for every listed sibling, whose top-k weights "
    "sum to 1; normal breaks the ties between experts from the first step.")]
RouterStd = Annotated[float, typer.Option(help="Std of the router with --router-init normal.")]
To = Annotated[str | None, typer.Option(
    "--to", help="The MoE model_type to write, where a dense family has more than one sibling (default: "
    "the first, e.g. granite -> granitemoe; granitemoeshared adds a shared MLP).")]


@app.command()
def upcycle(source: Src, output: Out, experts: UpExperts = None, top_k: UpTopK = None, noise: UpNoise = 0.0,
            router_init: RouterInit = "zeros", router_std: RouterStd = 0.02, seed: Seed = 0, to: To = None,
            noise_mode: NoiseMode = "absolute", reinit: Reinit = 0.0,
            revision: Revision = None, dry_run: DryRun = False, max_shard_size: MaxShard = None,
            device: Device = "auto", force: Force = False, quiet: Quiet = False, json_out: Json = False,
            threads: Threads = 2, strict: Strict = False, noise_generator: NoiseGenerator = DEFAULT_GENERATOR) -> None:
    """Dense to MoE (sparse upcycling, arXiv 2212.05055): every MLP becomes E experts, copies of it.

    llama and mistral become mixtral, qwen2 qwen2_moe, qwen3 qwen3_moe, olmo2 flex_olmo, granite
    granitemoe (or granitemoeshared with --to), hunyuan_v1_dense hunyuan_v1_moe. At --noise 0 the MoE
    model computes the dense model's function (the sibling's routing is set so that the top-k weights
    sum to 1; a shared expert starts with a zero output projection). The summary gives parameters
    before and after, total and active per token. See docs/usage.md for costs and when to use it."""
    _run_growth("upcycle", source, output, revision, json_out, dry_run, max_shard_size, device, force, quiet,
                threads, strict, experts=experts, top_k=top_k, noise=noise, router_init=router_init,
                router_std=router_std, seed=seed, to=to, noise_mode=noise_mode, reinit=reinit,
                noise_generator=noise_generator)


@app.command()
def verify(source: Src, output: Annotated[Path, typer.Argument(help="The grown checkpoint folder.")],
           forward: Annotated[bool, typer.Option(
               "--forward", help="Also run both models with transformers (float32) on fixed random "
               "tokens, one decoder layer at a time (memory: the weights outside the layers plus about two "
               "layers in float32): each output layer on its source layer's input, and the logits; fails "
               "beyond --atol on a layer the growth says is a copy of its source, or on the logits when it "
               "claims exactness. After --depth-init identity, also that every added layer copy "
               "returns its input (within --atol). Quantised checkpoints (fp8 block, MXFP4, MXFP8) are "
               "dequantised by moegrow's codecs as each layer loads.")] = False,
           whole: Annotated[bool, typer.Option(
               "--whole", help="With --forward: load both whole models in float32 and compare logits only "
               "(small models; implies --forward).")] = False,
           atol: Annotated[float, typer.Option(help="Tolerance for --forward (per-layer outputs and logits).")] = 1e-4,
           revision: Revision = None, json_out: Json = False, quiet: Quiet = False) -> None:
    """Check that OUTPUT is a valid growth of SOURCE. Exit 0 pass, 1 problem found, 2 bad input."""
    from .layerwise import forward_check
    from .training import detect
    from .verify import _read_record
    from .verify import verify as run_verify

    if detect(source):  # a training-stack checkpoint (moegrow/training_verify.py)
        from .training_verify import output_bytes, verify_training

        if forward or whole:
            raise typer.BadParameter("runs transformers models; not for training checkpoints", param_hint="--forward")
        with _progress(output_bytes(output), "verify", _interactive(quiet or json_out)) as progress:
            report = verify_training(source, output, progress)
    else:
        src = _open(source, revision)
        record = _read_record(output)
        out_index = read_index(output)
        total = sum(t.nbytes for t in out_index.values())  # the bytes verify reads from OUTPUT
        with _progress(total, "verify", _interactive(quiet or json_out)) as progress:
            report = run_verify(src, output, progress, record=record, out_tensors=out_index)
        del out_index
    if forward or whole:
        report.forward, problems = forward_check(src.folder, output, record, atol, whole,
                                                 identity=_identity_watch(src, record))
        report.problems.extend(problems)
    if json_out:
        _emit(report.as_dict())
    elif not quiet:
        for p in report.problems:
            err.print(f"problem: {p}", style="red", markup=False)
        absolute = [v for k, v in report.noise_std.items() if not k.endswith(" (relative)")]
        relative = [v for k, v in report.noise_std.items() if k.endswith(" (relative)")]
        if absolute:
            err.print(f"  measured noise std on {len(absolute)} tensors: min {min(absolute):.4g}, "
                      f"max {max(absolute):.4g}")
        if relative:  # --noise-mode relative: as a fraction of each expert's std, comparable with --noise
            err.print(f"  measured noise std relative to each source expert's, on {len(relative)} tensors: "
                      f"min {min(relative):.4g}, max {max(relative):.4g}")
        if report.forward:
            for d in report.forward.get("layers", []):
                err.print(f"  layer {d['layer']} (source layer {d['source_layer']}): max abs difference "
                          f"{d['max_abs_diff']:.3g}")
            if report.forward.get("max_abs_logit_diff") is not None:
                err.print(f"  max abs logit difference: {report.forward['max_abs_logit_diff']:.3g}")
            if not report.forward.get("function_preserving") and not report.forward.get("layers_are_copies"):
                g = record.get("growth") or {}
                why = record.get("lossy") or ("noise on the copies" if g.get("noise") or g.get("router_noise") else "")
                why = f" ({why})" if why else ""
                err.print(f"  differences reported, not checked: the growth does not claim its source's function{why}")
        err.print(f"{'ok' if report.ok else 'FAILED'}: {report.checked} tensors checked")
    if not report.ok:
        raise VerificationFailed(f"{len(report.problems)} problem(s); first: {report.problems[0]}")


def _identity_watch(source: Any, record: dict[str, Any]) -> Any:
    """For `verify --forward` of an identity depth init: which output layers must be the identity."""
    from .layouts import layout_for
    from .plan import added_copies
    from .verify import IdentityWatch

    growth = record.get("growth") or {}
    layer_map = growth.get("layer_map")
    if growth.get("depth_init") != "identity" or not layer_map:
        return None
    layout = layout_for(source.config, names=source.tensors)
    return IdentityWatch(added_copies(layer_map), layout.names.layer_prefix, len(layer_map))


def _one_line(text: str) -> str:
    """A message as one line: line breaks (from a file name, say) shown as \\n."""
    return text.strip().replace("\r", "\\r").replace("\n", "\\n") or "(no message)"


def _fail(message: str) -> None:
    err.print(f"moegrow: error: {_one_line(message)}", markup=False, emoji=False, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, map every failure to one line and an exit code.

    0 success; 1 `verify` found a problem; 2 any other failure (usage, unreadable or unsupported
    source, OUTPUT not writable, disk full, an unexpected error); 130 SIGINT; 143 SIGTERM.
    `moegrow --debug ...` re-raises instead, with the traceback.
    """
    _state["debug"] = False
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    code = 0
    # The cyclic garbage collector, at its default threshold (a collection every 700 new objects), traverses
    # the plan's objects again and again: 21 full collections and a quarter of the CPU time of a
    # DeepSeek-V3-count growth, a tenth of a second in importing torch. Every 100,000 new objects still
    # bounds what reference cycles may leave.
    thresholds = gc.get_threshold()
    gc.set_threshold(max(thresholds[0], 100_000), *thresholds[1:])
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # typer returns Exit codes here
            code = rv
            if code == 130:
                err.print("moegrow: interrupted", markup=False)
    except _EXITS as e:
        code = int(getattr(e, "exit_code", 0) or 0)
    except _NO_ARGS as e:  # `moegrow` alone: the help, on stderr
        err.print(e.format_message(), markup=False, emoji=False, highlight=False)  # type: ignore[attr-defined]
        code = 2
    except _USAGE_ERRORS as e:
        _fail(e.format_message())  # type: ignore[attr-defined]
        code = 2
    except _ABORTS:
        err.print("moegrow: interrupted", markup=False)
        code = 130
    except VerificationFailed as e:
        if _state["debug"]:
            raise
        code = e.exit_code
    except MoegrowError as e:
        if _state["debug"]:
            raise
        _fail(str(e))
        code = e.exit_code
    except KeyboardInterrupt:
        err.print("moegrow: interrupted", markup=False)
        code = 130
    except Terminated:
        err.print("moegrow: terminated", markup=False)
        code = 143
    except OSError as e:
        if _state["debug"]:
            raise
        _fail(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}")
        code = 2
    except Exception as e:  # a bug: still one line and exit 2, the traceback with --debug
        if _state["debug"]:
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (run `moegrow --debug ...` for the traceback "
              "and please report it)")
        code = 2
    finally:
        if argv is None:  # the process's command line: it ends here, and the collector's last pass over every
            gc.freeze()  # object (torch's, after a noised growth) would add 0.3 s to it; frozen before the
        gc.set_threshold(*thresholds)  # threshold goes back to 700, which sets off a collection (7-10 ms)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.exit(code)
