# Two commands on a fresh machine: `make run` and `make test`.
# Each creates .venv when it is missing and installs the project with its dev extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch where there is no GPU (pip finds torch==2.13.0 as a CPU wheel on our machines);
# the regular wheel (CUDA) where nvidia-smi sees a GPU. Override with `make TORCH_SPEC=... test`.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_ARGS ?=

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

run: $(STAMP)
	DO_NOT_TRACK=1 $(VENV)/bin/attention-pipeline run $(ARGS)

test: $(STAMP)
	DO_NOT_TRACK=1 $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	DO_NOT_TRACK=1 $(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/train_step.py --preset nanogpt-cpu

clean:
	rm -rf workdir .pytest_cache build *.egg-info
