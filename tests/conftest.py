"""Shared test settings: W&B never reaches a server, a cache of its own, the real data is found next to the repo."""

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the CPU precision measurement (defectforge/precision.py) is made once per test session, not read from the user's
os.environ.setdefault("DEFECTFORGE_CACHE", tempfile.mkdtemp(prefix="defectforge-cache-"))

REPO = Path(__file__).resolve().parents[1]
CRACKFOREST = REPO.parent / "shared" / "data" / "crackforest"


@pytest.fixture
def crackforest() -> Path:
    """The real CrackForest folder (images/, masks/, split.json); the test is skipped, saying so, without it."""
    missing = [name for name in ("images", "masks", "split.json") if not (CRACKFOREST / name).exists()]
    if missing:
        pytest.skip(f"real data absent: {CRACKFOREST} lacks {', '.join(missing)} "
                    "(tests that need it expect ../shared/data/crackforest next to the repository)")
    return CRACKFOREST
