# vfiod — build, test and measure. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: help venv test test-fast lint typecheck bench demo kernel-test clean

help:
	@echo "make test         create .venv if missing, then run the whole suite (all tiers)"
	@echo "make test-fast    every tier except the real-kernel QEMU tier"
	@echo "make kernel-test  the real-kernel tier: Linux 6.12 VFIO under QEMU"
	@echo "make bench        benchmarks as ratios against same-run baselines (.bench/results.json)"
	@echo "make demo         migrate a simulated 4 GiB guest with three devices over loopback"
	@echo "make lint         ruff"
	@echo "make typecheck    mypy"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests --ignore=tests/kernel

kernel-test: $(STAMP)
	$(PY) -m pytest -q tests/kernel

lint: $(STAMP)
	$(PY) -m ruff check vfiod tests

typecheck: $(STAMP)
	$(PY) -m mypy vfiod

bench: $(STAMP)
	$(PY) -m tests.bench.run

demo: $(STAMP)
	$(VENV)/bin/vfiod demo

clean:
	rm -rf $(VENV) .bench .cache .pytest_cache .mypy_cache .ruff_cache
