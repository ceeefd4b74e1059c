"""`labeled_dir`: synthetic defects drawn on crops of the user's labeled images keep the real labels and the
real pixels outside the synthetic footprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectforge.config import ConfigError
from defectforge.shards import decode_raw, iter_raw_samples, read_folder_info, write_info
from synth.compose import render_sample
from synth.defects import place_defect
from synth.importer import import_folder
from synth.preview import format_stats, stats

from .helpers import make_shards, tiny_config

STAIN_LIMIT = 8  # px: the farthest any defect changes a pixel beyond its footprint at these sizes (defects.py)
SYNTH = ["background", "crack", "scratch", "pit", "stain", "chip"]


def _texture(rng, h, w):
    noise = ndimage.gaussian_filter(rng.normal(0, 1, (h, w)), 2.0)
    gray = 120 + 25 * noise / noise.std()
    return np.clip(np.rint(gray[..., None] * [1.0, 0.97, 0.92]), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> tuple[Path, dict]:
    """An imported folder, classes crack and dent (dent has no synthetic counterpart): three train images (one
    smaller than the 64 px crops, so it is upscaled) and a test image that must never be used."""
    root = tmp_path_factory.mktemp("labeled")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(5)
    arrays = {}
    for key, (h, w) in {"a": (96, 120), "b": (80, 80), "small": (40, 48), "t": (96, 96)}.items():
        mask = np.zeros((h, w), np.uint8)
        mask[h // 3, 5 : w - 5] = 1  # a 1 px crack across the image
        mask[h // 3 + 1, w // 2 : w - 8] = 1
        mask[h - 20 : h - 12, 8:18] = 2  # a dent
        image = _texture(rng, h, w)
        image[mask == 1] //= 3
        Image.fromarray(image).save(images / f"{key}.png")
        Image.fromarray(mask).save(masks / f"{key}.png")
        arrays[key] = (image, mask)
    (root / "split.json").write_text(json.dumps({"train": ["a", "b", "small"], "test": ["t"]}))
    out = root / "shards"
    import_folder(images, masks, out, split_file=root / "split.json", classes=["crack", "dent"], name="mine",
                  shard_size=2)
    return out, arrays


def _real_crop(arrays, meta, shape, lut):
    """The crop the sample was drawn on, from the original arrays: image and mask (in the generated classes)."""
    s = meta["surface"]
    image, mask = arrays[s["key"]]
    x0, y0, x1, y1 = s["crop"]
    image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if mask.shape != shape:
        image = np.asarray(Image.fromarray(image).resize(shape[::-1], Image.Resampling.BICUBIC))
        mask = np.asarray(Image.fromarray(mask).resize(shape[::-1], Image.Resampling.NEAREST))
    return image, lut[mask]


def _grow(mask, r):
    return ndimage.maximum_filter(mask.astype(np.uint8), size=2 * r + 1) > 0


def _samples(folder):
    info = read_folder_info(folder)
    for entry in info["splits"].values():
        for name in entry["filenames"]:
            for raw in iter_raw_samples(Path(folder) / name):
                yield raw, decode_raw(raw)


def _config(folder, **over):
    base = {"labeled_dir": str(folder), "labeled_ratio": 1.0, "empty_ratio": 0.0, "defects_per_image": [2, 4],
            "num_samples": 12, "shard_size": 4}
    return base | over


def test_crops_keep_the_real_labels_and_the_pixels_outside_the_synthetic_footprint(tmp_path, labeled):
    folder, arrays = labeled
    info = make_shards(tmp_path / "out", **_config(folder))
    classes = info["classes"]
    assert classes == [*SYNTH, "dent"]  # crack is the synthetic crack; dent is appended, not dropped
    lut = np.array([0, classes.index("crack"), classes.index("dent")], np.uint8)
    assert info["labeled"] | {"sha256": None} == {
        "folder": str(folder), "split": "train", "name": "mine", "num_samples": 3, "classes": ["background", "crack",
        "dent"], "class_ids": {"crack": 1, "dent": 6}, "sha256": None}
    seen = {"keys": set(), "synthetic": 0, "upscaled": 0}
    for _raw, (image, mask, meta) in _samples(tmp_path / "out"):
        assert meta["surface"]["kind"] == "labeled" and meta["imaging"] is None
        assert meta["surface"]["key"] != "t"  # the test split is never read
        crop, real = _real_crop(arrays, meta, mask.shape, lut)
        seen["keys"].add(meta["surface"]["key"])
        seen["upscaled"] += meta["surface"]["scale"] > 1
        # every real label is kept exactly
        assert np.array_equal(mask[real > 0], real[real > 0])
        # the synthetic labels never meet the real ones grown by the margin
        synthetic = (mask > 0) & (real == 0)
        assert not (synthetic & _grow(real > 0, 4)).any()
        # pixels away from the synthetic footprint are the real crop's, and so is every labeled pixel and its margin
        changed = (image != crop).any(axis=2)
        assert not (changed & ~_grow(synthetic, STAIN_LIMIT)).any()
        assert not (changed & _grow(real > 0, 4)).any()
        # the metadata: real defects marked as such, with the generated class names and ids
        real_entries = [d for d in meta["defects"] if d.get("source") == "labeled"]
        synth_entries = [d for d in meta["defects"] if "source" not in d]
        assert sum(d["area_px"] for d in real_entries) == int((real > 0).sum())
        # (two synthetic defects of one class that overlap both count the shared pixels)
        assert sum(d["area_px"] for d in synth_entries) >= int(synthetic.sum())
        assert {classes[k] for k in np.unique(mask[synthetic])} == {d["class"] for d in synth_entries}
        for d in real_entries:
            x0, y0, x1, y1 = d["bbox"]
            assert classes[d["class_id"]] == d["class"] and (real[y0:y1, x0:x1] == d["class_id"]).any()
        seen["synthetic"] += len(synth_entries) + len(meta["skipped_defects"])
        assert len(synth_entries) + len(meta["skipped_defects"]) >= 2  # defects_per_image [2, 4]
    assert seen["keys"] == {"a", "b", "small"} and seen["upscaled"] and seen["synthetic"] >= 24


def test_a_fully_labeled_crop_skips_every_synthetic_defect_and_records_it(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    image = _texture(np.random.default_rng(0), 80, 80)
    Image.fromarray(image).save(images / "x.png")
    Image.fromarray(np.ones((80, 80), np.uint8)).save(masks / "x.png")  # every pixel is a scratch
    import_folder(images, masks, tmp_path / "src", classes=["scratch"])
    cfg = tiny_config(**_config(tmp_path / "src", image_size=64))
    out, mask, meta = render_sample(cfg, 0)
    assert meta["skipped_defects"] and not [d for d in meta["defects"] if "source" not in d]
    assert (mask == SYNTH.index("scratch")).all()
    x0, y0, x1, y1 = meta["surface"]["crop"]
    assert np.array_equal(out, image[y0:y1, x0:x1])


def test_place_defect_leaves_the_avoided_pixels_alone():
    rng = np.random.default_rng(3)
    base = np.full((64, 64, 3), 128.0, np.float32)
    avoid = np.zeros((64, 64), bool)
    avoid[:, 20:44] = True
    for kind in ("crack", "scratch", "pit", "stain", "chip"):
        for _ in range(4):
            img = base.copy()
            placed = place_defect(kind, img, rng, 64 / 512, avoid)
            changed = (img != base).any(axis=2)
            assert not (changed & avoid).any()
            assert (placed is None) == (not changed.any())
    img = base.copy()
    assert place_defect("stain", img, rng, 64 / 512, np.ones((64, 64), bool)) is None
    assert np.array_equal(img, base)
    # without `avoid` the draws are those of before: the same rng gives the same defect
    a, b = base.copy(), base.copy()
    ya, xa, pa = place_defect("crack", a, np.random.default_rng(9), 0.25)
    yb, xb, pb = place_defect("crack", b, np.random.default_rng(9), 0.25, np.zeros((64, 64), bool))
    assert pa == pb and np.array_equal(a, b) and np.array_equal(ya, yb) and np.array_equal(xa, xb)


def test_same_config_same_bytes_with_any_workers_and_a_labeled_share(tmp_path, labeled):
    folder, _ = labeled
    over = _config(folder, labeled_ratio=0.5, num_samples=10)
    one = make_shards(tmp_path / "w1", **over)
    two = make_shards(tmp_path / "w2", **over, workers=2)
    assert one["splits"] == two["splits"]
    kinds = {meta["surface"]["kind"] for _raw, (_i, _m, meta) in _samples(tmp_path / "w1")}
    assert "labeled" in kinds and len(kinds) > 1  # a mix of labeled crops and procedural surfaces
    report = format_stats(stats(tmp_path / "w1"))
    assert "crops of labeled images" in report


def test_without_labeled_dir_the_output_is_unchanged():
    plain = render_sample(tiny_config(image_size=64), 2)
    with_keys = render_sample(tiny_config(image_size=64, labeled_ratio=0.9, labeled_margin=9), 2)
    assert np.array_equal(plain[0], with_keys[0]) and plain[2] == with_keys[2]


def _error(**over) -> str:
    with pytest.raises(ConfigError) as err:
        tiny_config(**over)
    return str(err.value)


def test_bad_labeled_sources_fail_at_load_naming_key_and_folder(tmp_path, labeled):
    folder, _ = labeled
    msg = _error(labeled_dir=str(tmp_path / "nope"))
    assert "'labeled_dir'" in msg and "nope" in msg and "does not exist" in msg
    (tmp_path / "photos").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "photos" / "p.png")
    msg = _error(labeled_dir=str(tmp_path / "photos"))
    assert "'labeled_dir'" in msg and "not a shard folder" in msg and "synth import" in msg
    for split in ("test", "val"):
        assert "evaluation split" in _error(labeled_dir=str(folder), labeled_split=split)
    msg = _error(labeled_dir=str(folder), labeled_split="extra")
    assert "'labeled_split'" in msg and "it has: train, test" in msg
    assert "'labeled_ratio'" in _error(labeled_ratio=1.5)
    assert "'labeled_margin'" in _error(labeled_margin=-1)
    msg = _error(labeled_dir=str(folder), backend="inpaint", model_path=str(tmp_path))
    assert "'labeled_dir'" in msg and "backend=procedural" in msg

    empty = tmp_path / "empty"
    empty.mkdir()
    write_info(empty, "empty", {"train": []}, ["background", "crack"], {}, "real:empty")
    assert "has no sample" in _error(labeled_dir=str(empty))

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in folder.iterdir():
        (damaged / f.name).write_bytes(f.read_bytes())
    shard = damaged / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    msg = _error(labeled_dir=str(damaged))
    assert "train-000000.tar" in msg and "sha256" in msg


def test_the_labeled_folder_is_not_an_output(labeled):
    folder, _ = labeled
    with pytest.raises(ConfigError, match="is the output folder"):
        make_shards(folder, labeled_dir=str(folder))


def test_crackforest_cracks_stay_labeled_under_synthetic_defects(tmp_path, crackforest):
    import_folder(crackforest / "images", crackforest / "masks", tmp_path / "cf", split_file=crackforest / "split.json",
                  classes=["crack"], name="crackforest")
    info = make_shards(tmp_path / "out", **_config(tmp_path / "cf", num_samples=6, image_size=128))
    assert info["classes"] == SYNTH and info["labeled"]["num_samples"] == 70
    split = json.loads((crackforest / "split.json").read_text())
    lut = np.arange(256, dtype=np.uint8)
    for _raw, (image, mask, meta) in _samples(tmp_path / "out"):
        assert Path(meta["surface"]["file"]).stem in split["train"]
        key = meta["surface"]["key"]
        arrays = {key: (np.asarray(Image.open(crackforest / "images" / meta["surface"]["file"]).convert("RGB")),
                        np.asarray(Image.open(crackforest / "masks" / f"{key}.png")))}
        crop, real = _real_crop(arrays, meta, mask.shape, lut)
        assert np.array_equal(mask[real > 0], real[real > 0])
        synthetic = (mask > 0) & (real == 0)
        assert not (synthetic & _grow(real > 0, 4)).any()
        assert not ((image != crop).any(axis=2) & ~_grow(synthetic, STAIN_LIMIT)).any()
