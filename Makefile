# The commands the README names. `make test` installs first when .venv is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# torch comes from pip's default index: on Linux x86-64 that is the CUDA build (several GB).
# For the CPU build: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (the index serves torch and its dependencies; the rest comes from the default index).
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=
STAMP   := $(VENV)/.installed

# Tests never download and never log online.
TESTENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline
# `make demo BACKBONE=tiny` runs the demo offline on a tiny random model.
BACKBONE ?= sd14
RUNS    ?= outputs multirun

.PHONY: install test lint format demo tables bench clean clean-results

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") \
		2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, diffusers, transformers, hydra, cv2, scipy, wandb, diffseg, eval"
	touch $(STAMP)

test: $(STAMP)
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

# The environment and caches only; results are never touched here.
clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Every result: asks first, unless FORCE=1.
RESULTS := outputs multirun wandb experiments/tables
clean-results:
ifeq ($(FORCE),1)
	rm -rf $(RESULTS)
else
	@printf 'Delete all results (%s)? [y/N] ' "$(RESULTS)"; read answer; \
	if [ "$$answer" = y ] || [ "$$answer" = yes ]; then rm -rf $(RESULTS); echo deleted; \
	else echo "nothing deleted (make clean-results FORCE=1 deletes without asking)"; exit 1; fi
endif
