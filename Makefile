# make demo : set up, build shapes-v1, train the default small model, write samples
# make test : set up and run the fast test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(CURDIR)/.cache/data
# Trained shapes-v1 evaluators (the scorer) are cached here and shared by demo and tests.
export JAXT2I_CACHE_DIR ?= $(CURDIR)/.cache/jaxt2i
DEMO_DIR ?= workdirs/demo
DEMO_CONFIG ?= configs/baseline_shapes.py
PYTEST_ARGS ?=

.PHONY: setup test test-slow demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: no slow test collected

demo: setup
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i data build shapes --variant 64
	$(VENV)/bin/jaxt2i eval train-evaluator --image_size 64
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i train --config $(DEMO_CONFIG) --workdir $(DEMO_DIR)
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i eval --workdir $(DEMO_DIR)
	@echo "report: $(DEMO_DIR)/index.html  samples: $(DEMO_DIR)/samples  metrics: $(DEMO_DIR)/metrics.jsonl  tensorboard --logdir $(DEMO_DIR)"

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .cache workdirs .pytest_cache
