# Everything the project needs is installed here: a fresh machine needs only Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench install clean gpu-check gpu-wheels

$(STAMP): setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# CUDA build of torch that also runs on the CPU; it brings triton
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dimap-fast demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
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

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
