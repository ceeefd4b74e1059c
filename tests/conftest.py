"""Shared test settings: W&B never reaches a server, the real data is found relative to the repository."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CRACKFOREST = REPO.parent / "shared" / "data" / "crackforest"


@pytest.fixture
def crackforest() -> Path:
    if not (CRACKFOREST / "split.json").is_file():
        pytest.skip(f"real data not found at {CRACKFOREST} (see DESIGN.md: ../shared/data/crackforest)")
    return CRACKFOREST
