# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := runs/demo

.PHONY: install demo test lint bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m synth generate --config configs/synth/quickstart.yaml --out $(DEMO)/shards
	$(BIN)/python -m synth stats $(DEMO)/shards --json $(DEMO)/stats.json
	$(BIN)/python -m synth preview $(DEMO)/shards --out $(DEMO)/preview.png
	$(BIN)/python -m pretrain --config configs/pretrain/quickstart.yaml --shards $(DEMO)/shards --out $(DEMO)/pretrain resume=latest
	$(BIN)/python -m finetune --config configs/finetune/quickstart.yaml --shards $(DEMO)/shards --out $(DEMO)/finetune init=$(DEMO)/pretrain resume=latest
	@echo "demo: shards in $(DEMO)/shards, contact sheet in $(DEMO)/preview.png, ViT runs in $(DEMO)/pretrain and $(DEMO)/finetune"

test: $(STAMP)
	WANDB_MODE=disabled $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check synth pretrain finetune evaluate tests bench

bench: $(STAMP)
	$(BIN)/python bench/synth_throughput.py

clean-demo:
	rm -rf $(DEMO)
