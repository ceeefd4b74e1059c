"""Repeat-factor sampling of rare classes (defectforge/reader.py `repeat_factors`, the `repeat_threshold` key)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from defectforge.config import ConfigError
from defectforge.reader import make_dataset, repeat_factors
from defectforge.shards import encode_sample, shard_name, write_info, write_shard
from finetune.config import FinetuneConfig


def _folder(tmp_path, masks: dict[str, list[int]], classes=("background", "crack", "chip")):
    """One train shard of 16 px images whose masks hold the listed class ids (a 2x2 patch each)."""
    samples = []
    for key, ids in masks.items():
        mask = np.zeros((16, 16), np.uint8)
        for i, c in enumerate(ids):
            mask[2 * i:2 * i + 2, :2] = c
        samples.append(encode_sample(key, np.zeros((16, 16, 3), np.uint8), mask, {}))
    record = write_shard(tmp_path / shard_name("train", 0), samples)
    write_info(tmp_path, "t", {"train": [record]}, list(classes), {}, "test")
    return tmp_path


def test_factors_follow_the_share_of_images_holding_each_class(tmp_path):
    # crack in 8 of 10 images, chip in 1 of 10 (f = 0.1), two images without defect
    masks = {f"c{i}": [1] for i in range(7)} | {"both": [1, 2], "e0": [], "e1": []}
    folder = _folder(tmp_path, masks)
    r = repeat_factors(folder, "train", 0.4)
    assert r["both"] == pytest.approx(2.0)  # sqrt(0.4 / 0.1), the larger of its classes' factors
    assert all(r[f"c{i}"] == 1.0 for i in range(7))  # crack in 80% of the images: above the threshold
    assert r["e0"] == r["e1"] == 1.0
    # the subset changes the shares: chip in 1 of 2 images is not rare there
    assert repeat_factors(folder, "train", 0.4, keys=["both", "c0"]) == {"both": 1.0, "c0": 1.0}


def test_a_class_in_every_image_is_read_unchanged(tmp_path):
    folder = _folder(tmp_path, {f"k{i}": [1] for i in range(5)})
    assert set(repeat_factors(folder, "train", 0.9).values()) == {1.0}


def test_the_stream_shows_a_rare_image_as_often_as_its_factor(tmp_path):
    masks = {f"c{i}": [1] for i in range(9)} | {"rare": [2]}
    folder = _folder(tmp_path, masks)
    repeats = repeat_factors(folder, "train", 0.25)  # chip in 10% of the images: sqrt(2.5) = 1.58
    assert repeats["rare"] == pytest.approx(2.5 ** 0.5)
    n = 4000

    def counts(rep):
        ds = make_dataset(folder, "train", resampled=True, epoch_samples=n, seed=3, repeats=rep)
        return Counter(s["key"] for s in ds)

    plain, repeated = counts(None), counts(repeats)
    assert sum(plain.values()) == sum(repeated.values()) == n  # the epoch length does not change
    assert plain["rare"] / n == pytest.approx(0.1, abs=0.02)
    # per pass: 9 common images once, the rare one 1.58 times on average -> share 1.58 / 10.58
    assert repeated["rare"] / n == pytest.approx(repeats["rare"] / (9 + repeats["rare"]), abs=0.02)
    assert counts(repeats) == repeated  # the coin is seeded: the same stream again


def test_repeat_threshold_is_validated():
    cfg = FinetuneConfig(repeat_threshold=1.5)
    with pytest.raises(ConfigError, match="repeat_threshold"):
        cfg.validate()
