# Set up and test on a fresh machine: `make install`, then `make test`.
# torch comes first, pinned to the CPU wheel, so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-training lint bench bench-verify clean

# The extras: dev (tests, ruff) and training (megatron-core, OLMo-core: the integration tests). pip's
# plan is checked first: if it would install torch, triton or nvidia-* over the CPU torch, nothing is installed.
EXTRAS := .[dev,training]
KEEP_TORCH := import json, sys; plan = json.load(open(sys.argv[1]))["install"]; \
	bad = [p["metadata"]["name"] for p in plan if p["metadata"]["name"].lower() in ("torch", "triton") \
	or p["metadata"]["name"].lower().startswith("nvidia-")]; \
	sys.exit(f"make install: pip would install {bad} over torch 2.13.0; nothing installed") if bad else None

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet --dry-run --report $(VENV)/pip-plan.json -e '$(EXTRAS)'
	$(BIN)/python -c '$(KEEP_TORCH)' $(VENV)/pip-plan.json
	$(BIN)/pip install --quiet -e '$(EXTRAS)'

test:
	$(BIN)/ruff check moegrow tests benchmarks
	$(BIN)/pytest -n 2 -q

# The training-stack integration tests alone (grown checkpoints loaded into megatron-core and OLMo-core;
# `make test` runs them too): they skip where `make install` could not install the training extra.
test-training:
	$(BIN)/pytest -p no:xdist -q -rs tests/test_megatron_integration.py tests/test_olmo_integration.py

lint:
	$(BIN)/ruff check moegrow tests benchmarks

bench:
	$(BIN)/python benchmarks/bench.py --size 1 --deepseek
	$(BIN)/python benchmarks/bench.py --size 1 --disk fast --work /dev/shm/moegrow-bench
	$(BIN)/python benchmarks/bench.py --size 4
	$(BIN)/python benchmarks/bench_ranks.py --size 1 --procs 2

# verify --forward's peak RSS on a Qwen3-30B-A3B-width checkpoint (16 GiB of disk while it runs)
bench-verify:
	$(BIN)/python benchmarks/bench_verify.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
