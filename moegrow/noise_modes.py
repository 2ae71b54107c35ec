"""The noise recipes beyond the paper's absolute noise: relative noise and Drop-Upcycling's re-initialisation.

`--noise-mode relative`: a copy's noise std is `--noise` times the std of the values it is added to
(after any exactness scaling), measured per expert slice (a per-expert tensor whole; a fused [E, ...]
tensor, a router's row, one expert at a time) in float64. The draws are the same blocks as absolute noise
(`noise.noise_block`, seeded by output tensor name, part and block), scaled per slice.

`--reinit R` (Drop-Upcycling, arXiv 2502.19261): in every copy, a seeded random R of each expert's
intermediate neurons (`neurons.Reinit`: the same indices in gate, up and down, keyed by layer, expert and
copy) are overwritten with draws from a normal with that expert slice's own mean and std (of the values
before noise). The draws are made on the CPU, so any device gives the same re-initialised values.

Both work on float values, so a quantised weight's copy is decoded, transformed and requantised
(moegrow.quant.transform). Memory: one tensor in float32 (float64 for float64) plus one noise block.
"""

from __future__ import annotations

from typing import Any

from .neurons import Reinit, selection_seed
from .noise import BLOCK, block_seed, noise_block, torch_dtype


def slice_stats(x: Any, slices: int) -> list[tuple[float, float]]:
    """(mean, std) of each of `slices` equal contiguous runs of flat `x`: two passes (mean, then squared
    deviations), block by block; each block summed by torch (cascade summation, in x's dtype), the block
    sums accumulated in float64."""
    per = x.numel() // slices
    stats = []
    for s in range(slices):
        seg = x[s * per:(s + 1) * per]
        mean = sum(float(seg[lo:lo + BLOCK].sum()) for lo in range(0, per, BLOCK)) / per if per else 0.0
        sq = sum(float((seg[lo:lo + BLOCK] - mean).square_().sum()) for lo in range(0, per, BLOCK))
        stats.append((mean, (sq / (per - 1)) ** 0.5 if per > 1 else 0.0))
    return stats


def chosen_neurons(r: Reinit, seed: int, slice_index: int) -> Any:
    """The sorted neuron indices of one slice to re-initialise (a CPU int64 tensor)."""
    import torch

    n = r.neurons
    g = torch.Generator().manual_seed(selection_seed(seed, r.layer, r.expert + slice_index, r.copy))
    count = round(r.fraction * n)
    return torch.randperm(n, generator=g)[:count].sort().values


def neuron_positions(r: Reinit, neurons: Any) -> Any:
    """The indices along `r.axis` that hold `neurons` (gate and up both, for a fused gate_up)."""
    import torch

    if r.pairing == "interleaved":
        return torch.stack([2 * neurons, 2 * neurons + 1], dim=1).reshape(-1)
    if r.pairing == "halves":
        return torch.cat([neurons, neurons + r.neurons])
    return neurons


def reinit_mask(r: Reinit, seed: int, slices: int) -> Any:
    """A flat bool tensor over a part's values: True where `--reinit` overwrote them."""
    import torch

    mask = torch.zeros((slices, *r.shape), dtype=torch.bool)
    for s in range(slices):
        idx = neuron_positions(r, chosen_neurons(r, seed, s))
        mask[s].index_fill_(r.axis, idx, True)
    return mask.reshape(-1)


def apply(x: Any, part: Any, seed: int, tensor: str, index: int, device: str, *, generator: str) -> Any:
    """Part `index` of output `tensor`: its source values `x` (float), scaled, noised (absolute or relative
    per slice), then re-initialised where `part.reinit` says. Returns a flat tensor on `device`."""
    import torch

    x = x.reshape(-1).to(device)
    x = x * part.scale if part.scale != 1.0 else x.clone()
    n, slices = x.numel(), part.slices
    if n % slices:
        raise ValueError(f"{tensor}: {n} values do not split into {slices} expert slices")
    per = n // slices
    stats = slice_stats(x, slices) if part.relative or part.reinit is not None else []
    if part.noise:
        stds = [part.noise * sd for _, sd in stats] if part.relative else [part.noise] * slices
        for b, lo in enumerate(range(0, n, BLOCK)):
            hi = min(n, lo + BLOCK)
            z = noise_block(seed, tensor, index, b, hi - lo, device, generator=generator).to(x.dtype)
            for s in range(lo // per, (hi - 1) // per + 1):
                a, e = max(lo, s * per), min(hi, (s + 1) * per)
                x[a:e].add_(z[a - lo:e - lo], alpha=stds[s])
    r = part.reinit
    if r is not None:
        for s in range(slices):
            mean, sd = stats[s]
            view = x[s * per:(s + 1) * per].view(r.shape)
            idx = neuron_positions(r, chosen_neurons(r, seed, s))
            shape = list(r.shape)
            shape[r.axis] = idx.numel()
            g = torch.Generator().manual_seed(block_seed(seed, f"reinit\0{tensor}", index, s))
            values = torch.randn(shape, generator=g, dtype=torch.float32).to(x.dtype) * sd + mean
            view.index_copy_(r.axis, idx.to(device), values.to(device))
    return x


def part_bytes(raw: bytearray, dtype: str, part: Any, seed: int, tensor: str, index: int,
               device: str, *, generator: str) -> memoryview:
    """`apply` on a float tensor's bytes, rounded back to its dtype (noise.transform for these recipes)."""
    import torch

    if not raw:
        return memoryview(raw)
    src = torch.frombuffer(raw, dtype=torch_dtype(dtype))
    compute = torch.float64 if dtype == "F64" else torch.float32
    out = apply(src.to(compute), part, seed, tensor, index, device, generator=generator).to(src.dtype).cpu()
    return memoryview(out.view(torch.uint8).numpy())


def relative_stds(got: Any, src: Any, reinit: Reinit | None, slices: int, seed: int) -> list[float]:
    """(noise std / the source slice's std) of each expert slice of a part (a zeroed slice has none),
    re-initialised neurons left out of the noise: what `--noise-mode relative` asked for, per slice."""
    import torch

    keep = (~reinit_mask(reinit, seed, slices) if reinit is not None
            else torch.ones(got.numel(), dtype=torch.bool)).reshape(slices, -1)
    diff = (got.double() - src.double()).reshape(slices, -1)
    base = src.double().reshape(slices, -1)
    return [float(d[k].std() / b.std()) for d, b, k in zip(diff, base, keep)
            if int(k.sum()) > 1 and float(b.std()) > 0]


def check_part(part: Any, got: bytes, want: bytes, dtype: str, seed: int, tensor: str, index: int,
               device: str, *, generator: str) -> tuple[list[str], float | None, list[float]]:
    """verify for a relative-noise or re-initialised part: (problems, measured noise std or None, and with
    `--noise-mode relative` the noise std over each expert slice's std, `relative_stds`).

    Drawn on the CPU: the bytes must equal a recomputation. Elsewhere (CUDA noise): the re-initialised
    values (CPU draws) must equal the recomputation's, and the noise std per slice be within 10% of the
    recorded one where a slice has 1000 values or more."""
    import torch

    want_bytes = bytes(part_bytes(bytearray(want), dtype, part, seed, tensor, index, "cpu", generator=generator))
    what = []
    if part.noise:
        what.append(f"{'relative ' if part.relative else ''}noise (seed {seed}, std {part.noise})")
    if part.reinit is not None:
        what.append(f"{part.reinit.fraction:g} of its neurons re-initialised (seed {seed})")
    desc = f"{tensor}: part {index} is not {part.source} plus the recorded " + " and ".join(what)
    if not part.noise and want_bytes != got:
        return [desc], None, []
    td = torch_dtype(dtype)
    out = torch.frombuffer(bytearray(got), dtype=td).to(torch.float64) if got else torch.zeros(0)
    src = torch.frombuffer(bytearray(want), dtype=td).to(torch.float64) * part.scale if want else torch.zeros(0)
    keep = (~reinit_mask(part.reinit, seed, part.slices) if part.reinit is not None
            else torch.ones(out.numel(), dtype=torch.bool))
    diff = (out - src)[keep]
    measured = (float(diff.std()) if diff.numel() > 1 else None) if part.noise else None
    relative = relative_stds(out, src, part.reinit, part.slices, seed) if part.noise and part.relative else []
    if device == "cpu" or not part.noise:
        return ([] if want_bytes == got else [desc]), measured, relative
    problems = []
    expect = torch.frombuffer(bytearray(want_bytes), dtype=td).to(torch.float64)
    if not torch.equal(out[~keep], expect[~keep]):
        problems.append(f"{tensor}: part {index}: re-initialised values differ from the recorded seed's")
    per = out.numel() // part.slices
    stats = slice_stats(src, part.slices)
    for s in range(part.slices):
        k = keep[s * per:(s + 1) * per]
        d = (out - src)[s * per:(s + 1) * per][k]
        want_std = part.noise * (stats[s][1] if part.relative else 1.0)
        if d.numel() >= 1000 and abs(float(d.std()) - want_std) > 0.1 * want_std:
            problems.append(f"{tensor}: part {index} slice {s}: noise std {float(d.std()):.3g} differs from "
                            f"the recorded {want_std:.3g}")
    return problems, measured, relative
