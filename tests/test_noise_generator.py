"""The noise generator (`--noise-generator`): recorded, honoured by verify, and torch-free on the CPU."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from .conftest import build_model, run, save


def _grow(src, out, *extra: str) -> None:
    code, _, err = run("grow-width", src, out, "--experts", "2x", "--noise", "0.01", "--seed", "4", "--quiet",
                       "--device", "cpu", *extra)
    assert code == 0, err


def _set_record(out, **growth) -> None:
    path = out / "moegrow.json"
    record = json.loads(path.read_text())
    record["growth"].update(growth)
    record["growth"] = {k: v for k, v in record["growth"].items() if v is not None}
    path.write_text(json.dumps(record))


def test_generator_is_recorded_and_verify_regenerates_with_it(checkpoints, tmp_path):
    src = checkpoints["mixtral"]
    _grow(src, tmp_path / "new")
    _grow(src, tmp_path / "old", "--noise-generator", "torch")
    assert json.loads((tmp_path / "new" / "moegrow.json").read_text())["growth"]["noise_generator"] == "pcg64"
    new, old = load_file(tmp_path / "new" / "model.safetensors"), load_file(tmp_path / "old" / "model.safetensors")
    copies = [n for n in new if ".experts.5." in n]
    assert copies and all(not torch.equal(new[n], old[n]) for n in copies)  # other bytes for the same seed
    for folder in ("new", "old"):
        assert run("verify", src, tmp_path / folder)[0] == 0
    # a record that names no generator was written before pcg64: its noise is torch's
    _set_record(tmp_path / "old", noise_generator=None)
    assert run("verify", src, tmp_path / "old")[0] == 0
    _set_record(tmp_path / "new", noise_generator=None)
    code, _, err = run("verify", src, tmp_path / "new")
    assert code == 1 and "plus the recorded noise (torch generator, seed 4, std 0.01)" in err, err
    _set_record(tmp_path / "new", noise_generator="philox")
    code, _, err = run("verify", src, tmp_path / "new")
    assert code == 2 and "growth.noise_generator is 'philox'" in err, err


def test_pcg64_noise_from_a_gpu_is_checked_byte_for_byte(checkpoints, tmp_path):
    """pcg64 writes the same bytes on every device, so verify regenerates noise recorded as drawn on CUDA
    instead of measuring its std: other noise of the right std fails."""
    src, out = checkpoints["mixtral"], tmp_path / "out"
    _grow(src, out)
    record = json.loads((out / "moegrow.json").read_text())
    (out / "moegrow.json").write_text(json.dumps({**record, "noise_device": "cuda"}))
    assert run("verify", src, out)[0] == 0
    _grow(src, tmp_path / "torch", "--noise-generator", "torch")
    f = out / "model.safetensors"
    tensors = load_file(f)
    name = next(n for n in sorted(tensors) if ".layers.1." in n and ".experts.5." in n)
    tensors[name] = load_file(tmp_path / "torch" / "model.safetensors")[name]
    save_file(tensors, f, metadata={"format": "pt"})
    code, _, err = run("verify", src, out)
    assert code == 1 and name in err and "pcg64 generator" in err, err


def test_unknown_generator_is_refused(checkpoints, tmp_path):
    code, _, err = run("grow-width", checkpoints["mixtral"], tmp_path / "o", "--experts", "2x", "--noise", "0.01",
                       "--noise-generator", "mt")
    assert code == 2 and "--noise-generator" in err and "pcg64 or torch" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cpu_noise_growth_does_not_import_torch(tmp_path):
    """A bf16 noised width growth on the CPU runs without torch (its import costs 1.3-1.6 s of CPU)."""
    model = build_model("mixtral").to(torch.bfloat16)
    src = save(model, tmp_path / "src")
    script = ("import sys\nfrom moegrow.cli import main\n"
              "sys.argv = ['moegrow', 'grow-width', sys.argv[1], sys.argv[2], '--experts', '2x', '--noise', '0.01',"
              " '--quiet']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
              "print('torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert run("verify", src, tmp_path / "out")[0] == 0


def test_a_damaged_table_is_refused_in_one_line(checkpoints, tmp_path, monkeypatch):
    from moegrow import quantile_noise

    bad = tmp_path / "normal_quantiles.f32"
    bad.write_bytes(quantile_noise.TABLE_FILE.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.setattr(quantile_noise, "TABLE_FILE", bad)
    quantile_noise.table.cache_clear()
    quantile_noise.scaled_table.cache_clear()
    try:
        code, _, err = run("grow-width", checkpoints["mixtral"], tmp_path / "o", "--experts", "2x", "--noise", "0.01",
                           "--device", "cpu")
    finally:
        quantile_noise.table.cache_clear()
        quantile_noise.scaled_table.cache_clear()
    assert code == 2 and "normal_quantiles.f32: not moegrow's normal quantile table" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32", "F64"])
@pytest.mark.parametrize("block", [1 << 22, 1024, 4100])
def test_pcg64_pieces_give_the_whole_tensors_bytes(dtype, block):
    """A tensor noised in pieces (each from its own start, its block's stream advanced to it) equals the
    tensor noised whole, also where a piece starts inside a block or crosses a block's end."""
    import numpy as np

    from moegrow import noise, quantile_noise

    rng = np.random.default_rng(3)
    n = 10_012
    values = rng.normal(0, 0.02, n).astype(np.float32)
    src = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" \
        else values.astype(quantile_noise.NUMPY_DTYPES[dtype])
    seeds = lambda b: noise.block_seed(7, "t", 0, b)  # noqa: E731
    whole = np.empty_like(src)
    quantile_noise.add_noise(src, whole, dtype, 0.01, 1.5, seeds, block)
    cuts = sorted({0, n, 1024, 4100, *(4 * int(c) for c in rng.integers(1, n // 4, 6))})
    pieces = np.empty_like(src)
    for a, b in zip(cuts, cuts[1:]):
        quantile_noise.add_noise(src[a:b], pieces[a:b], dtype, 0.01, 1.5, seeds, block, start=a)
    assert not np.array_equal(whole, src)
    assert whole.tobytes() == pieces.tobytes()


def test_growth_in_small_pieces_writes_the_same_bytes(checkpoints, tmp_path, monkeypatch):
    """Noised parts made `_PIECE` bytes at a time (1 MiB, more than any tensor here: forced down to 96
    bytes) give the bytes of parts made whole by `noise.transform`, and verify passes."""
    from moegrow import execute

    from .test_grow import digest

    src = checkpoints["qwen2_moe"]
    args = ["--experts", "2x", "--noise", "0.01", "--seed", "3", "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(execute._Job, "in_pieces", lambda self, part, dtype: False)
        assert run("grow-width", src, tmp_path / "whole", *args)[0] == 0
    made = []
    real = execute._Job._write_pieces

    def counted(self, *a):
        made.append(a[0].name)
        return real(self, *a)

    monkeypatch.setattr(execute, "_PIECE", 96)
    monkeypatch.setattr(execute._Job, "_write_pieces", counted)
    assert run("grow-width", src, tmp_path / "pieces", *args)[0] == 0
    assert made  # the noised experts went through the piece path
    assert digest(tmp_path / "whole") == digest(tmp_path / "pieces")
    assert run("verify", src, tmp_path / "pieces")[0] == 0
