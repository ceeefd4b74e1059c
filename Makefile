# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := runs/study/quickstart

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m study configs/study/quickstart.yaml --out $(DEMO)
	$(BIN)/python -m synth preview $(DEMO)/data/target --out $(DEMO)/target_preview.png
	@echo "demo: report in $(DEMO)/report/report.html (and report.md), runs in $(DEMO)/pretrain and $(DEMO)/finetune"

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check defectforge synth pretrain finetune evaluate study tests bench

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	$(BIN)/python bench/synth_throughput.py
	$(BIN)/python bench/pretrain_throughput.py
	$(BIN)/python bench/finetune_models.py
	$(BIN)/python bench/tiled_inference.py

clean-demo:
	rm -rf $(DEMO)
