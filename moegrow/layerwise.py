"""`verify --forward`, one decoder layer at a time: bounded memory whatever the model's size.

Each model is built by transformers on the meta device from its config; everything outside the
decoder layers (embeddings, final norm, head, towers) is loaded with transformers' own
checkpoint-to-module conversion, and each decoder layer's tensors are loaded the same way just
before the model's own forward calls that layer, and dropped right after. The decoder's own loop
thus drives every layer (masks per layer type, position embeddings, state passed between layers),
and no family's forward is written here. Peak memory: the non-layer weights plus about two layers in
float32 (a layer and the copies its conversion makes), plus activations.

The source pass records each layer's inputs and output; the output pass runs output layer j once
more on the source's inputs of layer `layer_map[j]` and compares its output with the source's.
Both passes end in logits, compared where the vocabularies match.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import MoegrowError, UnsupportedModelError
from .layouts import layout_for
from .quant.dequantised import dequantised_view, drop_quantization_config
from .verify import IdentityWatch


@dataclass
class LayerDiff:
    layer: int          # output layer
    source_layer: int   # the source layer whose input it ran on (its layer-map entry)
    max_abs_diff: float  # against that source layer's output, or (identity) against its own input
    identity: bool = False  # an added copy under --depth-init identity: compared with its input

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "source_layer": self.source_layer, "max_abs_diff": self.max_abs_diff}
        if self.identity:
            d["identity"] = True
        return d


@dataclass
class LayerwiseResult:
    layers: list[LayerDiff] = field(default_factory=list)
    max_abs_logit_diff: float | None = None  # None where the vocabularies differ

    @property
    def max_abs_diff(self) -> float:
        return max((d.max_abs_diff for d in self.layers), default=0.0)


def layers_are_copies(record: dict[str, Any], layout: Any) -> bool:
    """Whether the growth a provenance record describes claims that every output layer computes its source
    layer's function on the same input: depth copies (unless the family's layers depend on their index) and
    width growth that is exact at zero noise; neither where --dtype rounded the weights."""
    g = record.get("growth") or {}
    if record.get("lossy"):  # --dtype rounded the weights: each layer is its source's only up to that rounding
        return False
    moved = g.get("layer_map") is not None and any(j != m for j, m in enumerate(g["layer_map"]))
    if moved and layout.depth.index_dependent_layers:
        return False
    if record.get("operation") == "upcycle":  # each MoE layer computes its dense layer's function, or not
        return bool(record.get("function_preserving"))
    if not g.get("factor"):
        return True
    return bool(layout.width.exact_width and (g.get("top_k") or "scale") == "scale" and not g.get("noise")
                and not g.get("router_noise"))


def _torch() -> Any:
    try:
        import torch
        import transformers
    except ImportError:
        raise MoegrowError("verify --forward needs transformers: pip install 'moegrow[forward]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def model_class(config: Any) -> tuple[Any, Any]:
    """The transformers class `verify --forward` runs and its config, chosen as the auto classes' from_pretrained
    chooses: the causal-LM class (with the text config where that class takes it), else (multimodal wrappers that
    AutoModelForCausalLM does not map) the image-text-to-text class, fed text-only input_ids."""
    import transformers
    from transformers.models.auto.auto_factory import _get_model_class

    autos = (transformers.AutoModelForCausalLM, transformers.AutoModelForImageTextToText,
             transformers.AutoModelForMultimodalLM)  # the last: qwen3_omni_moe, run through its text module
    for auto in autos:
        if type(config) in auto._model_mapping:
            cls = _get_model_class(config, auto._model_mapping)
            text = config.sub_configs.get("text_config")
            if text is not None and getattr(cls, "config_class", None) == text:
                config = config.get_text_config()
            return cls, config
    raise MoegrowError(f"verify --forward: transformers maps model_type {config.model_type!r} to no causal-LM, "
                       "image-text-to-text or multimodal-LM class")


def _clone(x: Any) -> Any:
    """A copy of a layer's inputs or output with every tensor cloned (containers rebuilt, other objects shared)."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_clone(v) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return x


def _tensors(x: Any) -> Iterator[Any]:
    import torch

    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def output_diff(a: Any, b: Any) -> float:
    """Max abs difference between two layer outputs, over the tensors they hold (integer tensors: 0 or inf);
    tensors whose shapes differ (router logits over more experts) are not comparable and skipped."""
    worst = 0.0
    for x, y in zip(_tensors(a), _tensors(b), strict=False):
        if x.shape != y.shape:
            continue
        if x.is_floating_point():
            if x.numel():
                worst = max(worst, float((x.float() - y.float()).abs().max()))
        elif not bool((x == y).all()):
            worst = float("inf")
    return worst


class StreamedModel:
    """A transformers model whose decoder layers stay on the meta device until the forward reaches them."""

    def __init__(self, folder: Path) -> None:
        torch = _torch()
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils.generic import ContextManagers

        self.folder = folder
        self._files = ExitStack()
        raw = json.loads((folder / "config.json").read_text())
        # a quantised checkpoint's weights, dequantised by moegrow's codecs as the loader reads them
        self.slices, self.quant = dequantised_view(raw, self._open_slices())
        config = transformers.AutoConfig.from_pretrained(folder)
        if self.quant is not None:  # plain float modules: no quantizer
            drop_quantization_config(config)
        cls, config = model_class(config)
        with ContextManagers(cls.get_init_context(torch.float32, False, False, None)):
            model = cls(config)
        self.model = model
        mapping = get_model_conversion_mapping(model, None, None)
        self.load_config = LoadStateDictConfig(pretrained_model_name_or_path=str(folder), dtype=torch.float32,
                                               dtype_plan=model._get_dtype_plan(torch.float32),
                                               weight_mapping=mapping, device_map={"": "cpu"})
        try:
            prefix = layout_for(raw, str(folder / "config.json"), self.slices).names.layer_prefix
        except UnsupportedModelError:  # a dense source of `upcycle`: its decoder layers where transformers saves them
            prefix = "model.layers."
        meta = model.state_dict()
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        # each checkpoint key under the name transformers loads it as (the loader renames the same way)
        renamed = {k: rename_source_key(k, renamings, converters, model.base_model_prefix, meta)[0]
                   for k in self.slices}
        self.path, self.layers = self._decoder_layers(prefix, renamed)
        n = len(self.layers)
        self.keys: list[list[str]] = [[] for _ in range(n)]
        rest = []
        for k, name in renamed.items():
            index = self._layer_of(name)
            (self.keys[index] if index is not None and index < n else rest).append(k)
        self._load(rest)
        info = self._last_info
        layer_prefix = f"{self.path}."
        info.missing_keys = {k for k in info.missing_keys if not k.startswith(layer_prefix)}
        cls._finalize_model_loading(model, self.load_config, info)
        model.eval()

    def _open_slices(self) -> dict[str, Any]:
        """Every tensor of the folder as a lazy safetensors slice, read when the loader materialises it."""
        from safetensors import safe_open

        slices = {}
        for f in sorted(self.folder.glob("*.safetensors")):
            try:  # pread, not mmap: the pages of layers already run do not stay in the process
                handle = self._files.enter_context(safe_open(f, framework="pt", device="cpu", backend="pread"))
            except TypeError:  # safetensors < 0.8 has no backend choice
                handle = self._files.enter_context(safe_open(f, framework="pt", device="cpu"))
            for k in handle.keys():  # noqa: SIM118
                slices[k] = handle.get_slice(k)
        return slices

    def _decoder_layers(self, prefix: str, renamed: dict[str, str]) -> tuple[str, Any]:
        """The ModuleList holding the decoder layers: the one the layout's layer tensors load into."""
        import torch

        lists = {name: m for name, m in self.model.named_modules() if isinstance(m, torch.nn.ModuleList)}
        votes: dict[str, int] = {}
        for k, name in renamed.items():
            if k.startswith(prefix):
                for path in lists:
                    if name.startswith(f"{path}."):
                        votes[path] = votes.get(path, 0) + 1
        if not votes:
            raise MoegrowError(f"{self.folder}: verify --forward found no decoder layers "
                               f"({prefix}N.*) in the transformers model")
        path = max(votes, key=lambda p: (votes[p], len(p)))
        return path, lists[path]

    def _layer_of(self, name: str) -> int | None:
        if not name.startswith(f"{self.path}."):
            return None
        index = name[len(self.path) + 1:].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def _load(self, keys: Sequence[str]) -> None:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model

        info, _ = convert_and_load_state_dict_in_model(self.model, {k: self.slices[k] for k in keys},
                                                       self.load_config)
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            raise MoegrowError(f"{self.folder}: {name} has shape {list(got)}, the model expects {list(want)}")
        self._last_info = info

    def load_layer(self, index: int) -> None:
        self._load(self.keys[index])
        layer = self.layers[index]
        missing = [n for n, t in layer.state_dict(keep_vars=True).items() if t.is_meta]
        if missing:
            raise MoegrowError(f"{self.folder}: {self.path}.{index}.{missing[0]} is missing from the checkpoint")

    def free_layer(self, index: int) -> None:
        """Put the layer's parameters and buffers back on the meta device (their memory is released)."""
        import torch

        layer = self.layers[index]
        for name, t in list(layer.state_dict(keep_vars=True).items()):
            path, _, attr = name.rpartition(".")
            module = layer.get_submodule(path)
            empty = torch.empty_like(t, device="meta")
            if isinstance(t, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(empty, requires_grad=False))
            else:
                module._buffers[attr] = empty

    @contextmanager
    def streaming(self, on_layer: Callable[[int, Any, Any, Any, Any], None]) -> Iterator[None]:
        """Within: each decoder layer is loaded when called, `on_layer(index, module, args, kwargs, output)`
        runs after it, and it is freed."""
        handles = []
        for i, layer in enumerate(self.layers):
            def pre(module: Any, args: Any, kwargs: Any, i: int = i) -> None:
                self.load_layer(i)

            def post(module: Any, args: Any, kwargs: Any, output: Any, i: int = i) -> None:
                try:
                    on_layer(i, module, args, kwargs, output)
                finally:
                    self.free_layer(i)
            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(layer.register_forward_hook(post, with_kwargs=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def logits(self, ids: Any) -> Any:
        import torch

        from .layouts import wrapper_of

        wrapper = wrapper_of(self.model.config.model_type)
        runner = getattr(self.model, wrapper.text_module) if wrapper and wrapper.text_module else self.model
        with torch.no_grad():
            return runner(input_ids=ids, use_cache=False).logits.float()

    def close(self) -> None:
        self._files.close()


def _return_freed_layers() -> None:
    """Make glibc give each large allocation its own mapping (a fixed 1 MiB mmap threshold), so that a freed
    layer's memory goes back to the system. Its default threshold grows after the first large free, and the
    next layers' tensors then fill the heap, which does not shrink: measured on a 2-layer, 64-expert model,
    peak RSS grew by about one layer per layer without this. No-op off glibc."""
    import ctypes

    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def layerwise_diff(source: Path, output: Path, layer_map: Sequence[int] | None = None, seed: int = 0,
                   tokens: int = 32, identity: Collection[int] = ()) -> LayerwiseResult:
    """Per-layer max abs difference of OUTPUT's layers against SOURCE's (see the module docstring).

    `identity`: output layers that are added copies under `--depth-init identity`: each is compared with
    its own input hidden states (it must add nothing to the residual stream) instead of its source layer's
    output."""
    torch = _torch()
    _return_freed_layers()
    recorded: dict[int, tuple[Any, Any, Any]] = {}
    src = StreamedModel(source)
    try:
        vocab = src.model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (2, tokens), generator=torch.Generator().manual_seed(seed))

        def record(i: int, module: Any, args: Any, kwargs: Any, out: Any) -> None:
            recorded[i] = (_clone(args), _clone(kwargs), _clone(out))

        with src.streaming(record):
            before = src.logits(ids)
    finally:
        src.close()
    del src
    out = StreamedModel(output)
    result = LayerwiseResult()
    try:
        n = len(out.layers)
        mapping = list(layer_map) if layer_map is not None else list(range(n))
        if len(mapping) != n or any(m not in recorded for m in mapping):
            raise MoegrowError(f"{output}: {n} decoder layers, but the layer map is {mapping}")

        def compare(j: int, module: Any, args: Any, kwargs: Any, got: Any) -> None:
            a, kw, want = recorded[mapping[j]]
            with torch.no_grad():
                again = module.forward(*_clone(a), **_clone(kw))
            if j in identity:
                hidden = a[0] if a else kw.get("hidden_states")
                first = again[0] if isinstance(again, (tuple, list)) else again
                result.layers.append(LayerDiff(j, mapping[j], output_diff(first, hidden), identity=True))
            else:
                result.layers.append(LayerDiff(j, mapping[j], output_diff(again, want)))

        with out.streaming(compare):
            after = out.logits(ids)
    finally:
        out.close()
    if before.shape == after.shape:
        result.max_abs_logit_diff = float((before - after).abs().max())
    return result


def forward_check(source: Path, output: Path, record: dict[str, Any], atol: float,
                  whole: bool = False, identity: IdentityWatch | None = None) -> tuple[dict[str, Any], list[str]]:
    """`verify --forward`: the report's `forward` object and the problems found.

    Layer-wise (the default): per-layer differences and the logits, in bounded memory; a layer beyond atol
    is a problem where the growth says the layer is a copy of its source (`layers_are_copies`), the logits
    where it says the whole model is. `whole`: both whole models loaded, logits only (small models).
    `identity`: the added copies of an identity depth init, each checked to return its input (both modes:
    reported as `identity_layers`, {layer: max |output - input|})."""
    exact = bool(record.get("function_preserving"))
    problems: list[str] = []
    if whole:
        from .verify import forward_diff

        diff = forward_diff(source, output, identity=identity)
        forward: dict[str, Any] = {"mode": "whole", "max_abs_logit_diff": diff}
        found = identity.found if identity is not None else {}
    else:
        from .source import read_config

        config = read_config(output)  # the grown checkpoint's family (an upcycled source is dense)
        copies = layers_are_copies(record, layout_for(config, str(output / "config.json")))
        try:
            result = layerwise_diff(source, output, (record.get("growth") or {}).get("layer_map"),
                                    identity=identity.positions if identity is not None else ())
        except MoegrowError:
            raise
        except Exception as e:  # a model whose forward the layer loop cannot drive: say so, name the way out
            raise MoegrowError(f"{output}: verify --forward could not run the models layer by layer "
                               f"({type(e).__name__}: {e}); --forward --whole compares the whole models "
                               "(memory: both in float32)") from e
        diff = result.max_abs_logit_diff
        forward = {"mode": "layerwise", "max_abs_diff": result.max_abs_diff,
                   "layers": [d.as_dict() for d in result.layers], "max_abs_logit_diff": diff,
                   "layers_are_copies": copies}
        found = {d.layer: d.max_abs_diff for d in result.layers if d.identity}
        for d in result.layers:
            if not d.identity and copies and not d.max_abs_diff <= atol:
                problems.append(f"decoder layer {d.layer} differs from source layer {d.source_layer} by "
                                f"{d.max_abs_diff:.3g} > {atol:g} on that layer's input, but the growth says it is "
                                "a copy computing the same function")
    forward.update(atol=atol, function_preserving=exact)
    if identity is not None:
        forward["identity_layers"] = {str(j): d for j, d in sorted(found.items())}
        for j in identity.positions:
            d = found.get(j)
            if d is None or not d <= atol:
                what = "did not run" if d is None else f"changes its input by {d:.3g} > {atol:g}"
                problems.append(f"new layer {j}: an added copy under --depth-init identity, but it {what}")
    if exact and not (diff is not None and diff <= atol):
        problems.append(f"logits differ by {diff:.3g} > {atol:g}, but the growth claims to preserve the function"
                        if diff is not None else "the vocabularies differ, but the growth claims to preserve "
                        "the function")
    return forward, problems
