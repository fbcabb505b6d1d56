# make demo : set up, build shapes-v1, train the default small model, write samples
# make test : set up and run the fast test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA_DIR ?= $(CURDIR)/.cache/data
# Trained shapes-v1 evaluators (the scorer) are cached here and shared by demo and tests.
export JAXT2I_CACHE_DIR ?= $(CURDIR)/.cache/jaxt2i
WORKDIR ?= runs/demo
PYTEST_ARGS ?=
# Test files run in parallel (pytest-xdist), each file on one worker so its fixtures are
# built once; CI machines have 2 cores.
PYTEST_WORKERS ?= 2

.PHONY: setup test test-slow demo bench clean

setup: $(VENV)/.installed

# OpenAI's `dall_e` package (the dVAE parity reference) goes in without its dependencies: its
# metadata asks for torchvision (a CUDA build of torch here), though its modules import only
# torch, attrs and requests.
$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps 'DALL-E==0.1'
	touch $@

test: setup
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # 5: no slow test collected

# The demo: shapes-v1 at 64x64, the autoencoder, then the latent diffusion model on its latents,
# then samples for the test prompts, scored. About 20 minutes on a 2-core CPU.
demo: setup
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i data build shapes --variant 64
	$(VENV)/bin/jaxt2i eval train-evaluator --image_size 64
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i train --config configs/autoencoder_shapes.py:demo \
	  --workdir $(WORKDIR)/autoencoder
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i train --config configs/ldm_shapes.py:demo \
	  --workdir $(WORKDIR)/ldm --config.model.autoencoder_workdir=$(WORKDIR)/autoencoder
	JAXT2I_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jaxt2i eval --workdir $(WORKDIR)/ldm
	@echo "report: $(WORKDIR)/ldm/index.html  samples: $(WORKDIR)/ldm/samples  grid: $(WORKDIR)/ldm/grid_test.png  metrics: $(WORKDIR)/ldm/eval.json"
	@echo "sample more: $(VENV)/bin/jaxt2i sample --workdir $(WORKDIR)/ldm --prompt 'a red circle above a blue square' --out grid.png"

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .cache workdirs runs .pytest_cache
