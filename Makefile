# bigbatch: one-command set-up, tests and the main job.
#   make test   create .venv, install torch + bigbatch[dev], run ruff and pytest
#   make demo   install, fetch Fashion-MNIST (Debian package) if missing, run `bigbatch reproduce --preset demo`
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch is installed from a pinned version when no CUDA GPU is present: an unpinned
# `torch` would pull a multi-GB CUDA build that a CPU-only machine cannot use.
TORCH_SPEC ?= $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo 'torch>=2.3'; else echo 'torch==2.13.0'; fi)
FMNIST_DIR := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= runs/demo

.PHONY: install test lint demo fashion-mnist benchmarks clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples

test: lint
	$(VENV)/bin/pytest

# Fashion-MNIST, the embedded default dataset, comes from Debian's `dataset-fashion-mnist` package.
fashion-mnist:
	@if [ ! -d "$(FMNIST_DIR)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)); \
	  else \
	    echo "Fashion-MNIST not found at $(FMNIST_DIR): run 'sudo apt-get install dataset-fashion-mnist'," \
	         "or download it with 'bigbatch download fashion-mnist --data-dir DIR' and pass --data-dir DIR"; exit 1; \
	  fi; \
	fi

demo: install fashion-mnist
	$(VENV)/bin/bigbatch reproduce --preset demo --out $(DEMO_OUT)
	@echo "Report: $(DEMO_OUT)/report.html (and report.md)"

benchmarks: install
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
