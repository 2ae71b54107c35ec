# Set up and test on a fresh machine: `make install`, then `make test`.
# torch comes first, pinned to the CPU wheel, so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test test-training lint bench bench-verify clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

test:
	$(BIN)/ruff check moegrow tests benchmarks
	$(BIN)/pytest -n 2 -q

# The training-stack integration tests (grown checkpoints loaded into megatron-core and OLMo-core) in
# their own venv: megatron-core 0.16.1 installs only with --no-deps (its newer releases need Python
# 3.12, where pip pulls CUDA torch), which an extra cannot express, so it is not part of `make test`.
TRAIN_VENV ?= .venv-training
TBIN := $(TRAIN_VENV)/bin

test-training:
	test -x $(TBIN)/python || $(PYTHON) -m venv $(TRAIN_VENV)
	$(TBIN)/pip install --quiet torch==2.13.0
	$(TBIN)/pip install --quiet numpy "packaging>=24.2" psutil pytest typer rich safetensors huggingface_hub \
		transformers==5.23.0
	$(TBIN)/pip install --quiet megatron-core==0.16.1 --no-deps
	$(TBIN)/pip install --quiet ai2-olmo-core==3.0.0
	$(TBIN)/pip install --quiet --no-deps -e .
	$(TBIN)/pytest -p no:xdist -q tests/test_megatron_integration.py tests/test_olmo_integration.py

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
	rm -rf $(VENV) $(TRAIN_VENV) build *.egg-info .pytest_cache
