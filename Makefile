# Two entry points do all set-up on a fresh machine: `make demo` and `make test`.
# The virtual environment lives in .venv; the native extension (C++ always, CUDA for sm_90 when
# nvcc is found) is built by `pip install -e .` (see setup.py for CALRFT_BUILD_CUDA).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.calrft-installed
SOURCES := setup.py requirements.txt $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h csrc/*/*.cuh)

.PHONY: setup demo test bench

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -e . -v > $(VENV)/build.log 2>&1 || (tail -50 $(VENV)/build.log; exit 1)
	grep '^\[calrft\]' $(VENV)/build.log || true
	touch $(STAMP)

setup: $(STAMP)

# Each `make demo` writes a fresh folder runs/demo/<timestamp>: a later run never replaces an
# earlier one's results (calrft refuses a folder that already holds a run).
demo: $(STAMP)
	$(VENV)/bin/calrft demo --out runs/demo/$$(date +%Y%m%d-%H%M%S)

# The suite runs under a 16 GiB address-space cap (RLIMIT_AS, set by tests/conftest.py for pytest
# and every process it starts): an unbounded allocation fails as an error, not the machine.
# CALRFT_TEST_AS_LIMIT=8G make test sets another cap, =0 none.
test: $(STAMP)
	$(PY) -m pytest tests -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_contrastive.py --quick
