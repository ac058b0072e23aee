# Everything the project needs is installed here: a fresh machine needs only Python 3.11.
PYTHON ?= python3
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Exact versions of every package (torch 2.14.1, the CUDA build that also runs on the CPU, brings triton).
LOCK := requirements-lock.txt
LATEST := .venv-latest

.PHONY: demo test bench install clean gpu-check gpu-wheels test-latest lock

# The lock's torch is the CUDA build: the environment takes ~6 GB. Say so before pip fails halfway.
NEED_GB := 7

$(STAMP): setup.py $(LOCK)
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(NEED_GB) ] && ! test -x $(BIN)/python; then \
		echo "make: installing $(VENV) needs about $(NEED_GB) GB free here, only $$free GB is: free some space (old clones' .venv folders?) and rerun"; exit 2; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip setuptools
	$(BIN)/python -m pip install -q --no-build-isolation -c $(LOCK) -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dimap-fast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	# the static cost model's estimates, which the GPU check reports beside its measurements
	$(BIN)/dimap-fast bench --static --json docs/bench/static.json
	$(BIN)/python -m pytest -q -s bench --benchmark-columns=min,median,rounds

# On a GPU machine (Python, torch and triton already there, no network): the one prepared check.
# It installs nothing from the network; wheels in .whl/ (make gpu-wheels, here) are used if present.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	PYTHONUNBUFFERED=1 $(GPU_PYTHON) bench/gpu_check.py --out docs/gpu

# Here, with network: the wheels the GPU machine may lack (timm 1.0.x, pure Python) into .whl/.
gpu-wheels: $(STAMP)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp -d .whl 'timm>=1.0,<1.1'

# Does the newest release of every dependency still work? A fresh environment resolved without the
# lock, its differences from the lock, then the suite on it. `make lock` adopts it once it passed.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -q --no-build-isolation -e '.[dev]'
	$(LATEST)/bin/python -m pip freeze --all --exclude-editable | diff <(grep -v '^#' $(LOCK)) - || true
	$(LATEST)/bin/python -m pytest -q tests && touch $(LATEST)/.passed

lock:
	test -f $(LATEST)/.passed || { echo "make lock: run 'make test-latest' first; only an environment that passed is locked"; exit 2; }
	{ grep '^#' $(LOCK); $(LATEST)/bin/python -m pip freeze --all --exclude-editable; } > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info .pytest_cache .benchmarks
