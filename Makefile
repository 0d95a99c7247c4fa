# The commands the README names. `make test` installs first when .venv is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# CPU wheel of torch for development machines and CI; GPU users take environment.yml instead.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed

# Tests never download and never log online.
TESTENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline
# `make demo BACKBONE=tiny` runs the demo offline on a tiny random model.
BACKBONE ?= sd14
RUNS    ?= outputs multirun

.PHONY: install test test-all lint format demo tables bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q "$(TORCH)" 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, diffusers, transformers, hydra, cv2, scipy, wandb, diffseg, eval"
	touch $(STAMP)

test: $(STAMP)
	$(TESTENV) $(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(TESTENV) $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Segment the sample photos in assets/samples (downloads SD v1.4 once; BACKBONE=tiny: offline).
demo: $(STAMP)
	$(BIN)/python run.py dataset=folder dataset.path=assets/samples backbone=$(BACKBONE) \
		logger=none hydra.run.dir=outputs/demo_$(BACKBONE)

# Markdown + LaTeX tables of every run under $(RUNS), the paper's numbers side by side.
tables: $(STAMP)
	$(BIN)/python experiments/make_tables.py $(RUNS) --out experiments/tables

# Speed and memory figures (by hand; see benchmarks/README.md).
bench: $(STAMP)
	$(BIN)/python benchmarks/segmentor.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/backbone.py

clean:
	rm -rf $(VENV) outputs multirun wandb .pytest_cache
