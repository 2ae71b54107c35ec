# Set up and test on a fresh machine: `make install`, then `make test`.
# torch comes first, pinned to the CPU wheel, so that nothing pulls a CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench bench-verify clean

install:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'

test:
	$(BIN)/ruff check moegrow tests benchmarks
	$(BIN)/pytest -n 2 -q

lint:
	$(BIN)/ruff check moegrow tests benchmarks

bench:
	$(BIN)/python benchmarks/bench.py --size 1
	$(BIN)/python benchmarks/bench.py --size 4

# verify --forward's peak RSS on a Qwen3-30B-A3B-width checkpoint (16 GiB of disk while it runs)
bench-verify:
	$(BIN)/python benchmarks/bench_verify.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
