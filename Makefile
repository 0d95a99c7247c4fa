# The commands the README names. `make test` installs first when .venv is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# What `make install` puts in .venv: torch $(TORCH) (pinned), then this package editable with its
# test extras (diffusers, transformers, hydra, ... from pip's default index, at the versions
# pyproject.toml allows). torch comes from pip's default index unless TORCH_INDEX names another:
#   make install                                                  # PyPI's torch: on Linux x86-64
#                                                                 # the CUDA build (several GB)
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu # the CPU-only build
# (the index serves torch and its dependencies; the rest comes from the default index). If a pip
# step fails the install stops there with an error (exit status 2 from make): the package step,
# which would pull torch from the default index, never runs after a failed torch install.
TORCH   ?= torch==2.13.0
TORCH_INDEX ?=
STAMP   := $(VENV)/.installed

# Tests never download and never log online.
TESTENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline
# `make demo BACKBONE=tiny` runs the demo offline on a tiny random model.
BACKBONE ?= sd14
RUNS    ?= outputs multirun

.PHONY: install install-browser test lint format demo app tables bench clean clean-results

install: $(STAMP)

# pip's output without its "... is ignored" notices; a failed step prints one error line and
# stops make (the notices are filtered from a log, so pip's own exit status is kept).
PIP_LOG := $(VENV)/pip-install.log
# The package's extras (a variable: a comma inside $(call ...) would split its arguments).
EXTRAS  := test,app
define pip_step
@echo '$(BIN)/pip install -q $(1)'
@status=0; $(BIN)/pip install -q $(1) >$(PIP_LOG) 2>&1 || status=$$?; \
	grep -v "is ignored" $(PIP_LOG); rm -f $(PIP_LOG); \
	if [ $$status -ne 0 ]; then \
		echo "error: make install: 'pip install $(2)' failed (exit status $$status; pip's messages are above); the later steps were skipped: fix the cause and run make install again" >&2; \
		exit 1; fi
endef

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo '$(BIN)/pip install -q --upgrade pip'
	@status=0; $(BIN)/pip install -q --upgrade pip >$(PIP_LOG) 2>&1 || status=$$?; rm -f $(PIP_LOG); \
		if [ $$status -ne 0 ]; then echo "warning: could not upgrade pip; going on with the venv's own pip" >&2; fi
	$(call pip_step,"$(TORCH)" $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)"),$(TORCH)$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX)))
	$(call pip_step,-e ".[$(EXTRAS)]",-e .[$(EXTRAS)])
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

# The demo page (app.py, Gradio) on http://127.0.0.1:7860; BACKBONE=tiny: offline, random weights.
# More options: make app APP_ARGS="--host 0.0.0.0 --port 8080 --share".
APP_ARGS ?=
app: $(STAMP)
	$(BIN)/python app.py --backbone $(BACKBONE) $(APP_ARGS)

# Chromium for the browser test, from the system's package manager (Debian/Ubuntu) when missing;
# Playwright's own browser download is not used (and not reachable on offline machines).
SUDO := $(shell [ "$$(id -u)" = 0 ] || command -v sudo)
install-browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium || command -v chromium-browser)"; \
	else \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# Markdown + LaTeX tables of every run under $(RUNS), the paper's numbers side by side.
tables: $(STAMP)
	$(BIN)/python experiments/make_tables.py $(RUNS) --out experiments/tables

# Speed and memory figures of every script in benchmarks/ at full size (long on a CPU: the
# backbone's sd14 pass alone takes minutes; see benchmarks/README.md). tests/test_benchmarks.py
# runs each of them at tiny sizes.
bench: $(STAMP)
	$(BIN)/python benchmarks/segmentor.py
	$(BIN)/python benchmarks/metrics.py
	$(BIN)/python benchmarks/diffcut.py
	$(BIN)/python benchmarks/backbone.py
	$(BIN)/python benchmarks/seediff.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/mmdit.py

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
