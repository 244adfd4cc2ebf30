# vfiod — build, test and measure. `make help` lists the targets.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

#: a skipped test fails `make test`: every tier runs, or the run says what is missing
NO_SKIPS := -p tests.support.no_skips

.PHONY: help deps venv test test-fast lint typecheck bench demo demo-qemu kernel-test kernel-bench clean

help:
	@echo "make test         install missing system packages (as root; else say how), create"
	@echo "                  .venv if missing, run the whole suite (all tiers, no skips)"
	@echo "make deps         only the system packages (.ci/deps, the one list)"
	@echo "make test-fast    every tier except the real-kernel QEMU tier"
	@echo "make kernel-test  the real-kernel tier: Linux 6.12 VFIO under QEMU"
	@echo "make kernel-bench the downtime prediction's error on the real kernel and two"
	@echo "                  production daemons' RSS after a migration (boots the guest;"
	@echo "                  .bench/kernel-prediction.json)"
	@echo "make bench        benchmarks as ratios against same-run baselines (.bench/results.json)"
	@echo "make demo         two vfiod daemons on simulated hosts; vfiod ctl migrates a 4 GiB"
	@echo "                  guest with three devices between them (no VFIO or QEMU needed)"
	@echo "make demo-qemu    the same with a running Linux VM between two real QEMU 7.2"
	@echo "make fuzz         the hypothesis fuzz tests with a large budget (VFIOD_FUZZ_EXAMPLES)"
	@echo "make lint         ruff"
	@echo "make typecheck    mypy"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

deps:
	.ci/deps ensure

# deps first: creating the venv needs one of them, and nothing is tested before all are there
test: deps $(STAMP)
	$(PY) -m pytest -q -rs $(NO_SKIPS) tests

test-fast: deps $(STAMP)
	$(PY) -m pytest -q -rs tests --ignore=tests/kernel --ignore=tests/qemu

kernel-test: deps $(STAMP)
	$(PY) -m pytest -q -rs $(NO_SKIPS) tests/kernel

#: the fuzz tests, each with this many inputs instead of its small `make test` budget
VFIOD_FUZZ_EXAMPLES ?= 20000
.PHONY: fuzz
fuzz: $(STAMP)
	VFIOD_FUZZ_EXAMPLES=$(VFIOD_FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/unit/test_parsers_fuzz.py tests/unit/test_stream_fuzz.py

lint: $(STAMP)
	$(PY) -m ruff check vfiod tests

typecheck: $(STAMP)
	$(PY) -m mypy vfiod

bench: $(STAMP)
	$(PY) -m tests.bench.run

#: not part of `make test`: the guest runs only tests/kernel/guest/bench_*.py's matrix
kernel-bench: deps $(STAMP)
	$(PY) -m tests.kernel.bench

demo: $(STAMP)
	$(VENV)/bin/vfiod demo

#: the same through two real QEMU 7.2 running a Linux guest (docs/architecture.md §8.3)
demo-qemu: deps $(STAMP)
	$(PY) -m tests.qemu.demo

clean:
	rm -rf $(VENV) .bench .cache .pytest_cache .mypy_cache .ruff_cache
