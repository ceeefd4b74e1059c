"""preview and stats on a tiny imported folder and a generator-style folder, against hand-computed counts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from defectforge.shards import encode_sample, shard_name, write_info, write_shard
from defectforge.tracking import class_colors
from synth.importer import import_folder
from synth.preview import MAX_PNG_BYTES, THUMB_SIDE, _pick, _thumbnail, format_stats, preview, stats


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """train: s1 (scratch 20 px + dent 20 px), s2 (scratch 3 px + 5 px), s3 (empty); val: v1 (dent 6 px)."""
    root = tmp_path_factory.mktemp("tiny")
    images, masks = root / "images", root / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    layout = {}
    m = np.zeros((48, 64), np.uint8)
    m[10, 5:25] = 1
    m[30:34, 40:45] = 2
    layout["s1"] = m
    m = np.zeros((48, 64), np.uint8)
    m[0, 0:3] = 1
    m[47, 50:55] = 1
    layout["s2"] = m
    layout["s3"] = np.zeros((48, 64), np.uint8)
    m = np.zeros((40, 32), np.uint8)
    m[5:7, 10:13] = 2
    layout["v1"] = m
    for key, mask in layout.items():
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(images / f"{key}.png")
        Image.fromarray(mask).save(masks / f"{key}.png")
    (root / "split.json").write_text(json.dumps({"train": ["s1", "s2", "s3"], "val": ["v1"]}))
    out = root / "shards"
    import_folder(images, masks, out, split_file=root / "split.json", classes=["scratch", "dent"],
                  name="tiny", shard_size=2)
    return out


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    """A folder shaped like the generator's output: source procedural, a surface, defects without class_id."""
    out = tmp_path_factory.mktemp("gen")
    samples = []
    for i in range(3):
        mask = np.zeros((32, 48), np.uint8)
        mask[4:6, 4 + i:10 + i] = 1
        defect = {"class": "crack", "bbox": [4 + i, 4, 10 + i, 6], "area_px": 12, "params": {"width": 2}}
        meta = {"source": "procedural", "seed": [7, i], "index": i, "size": [32, 48],
                "surface": "brushed_metal", "imaging": {}, "defects": [defect]}
        samples.append(encode_sample(f"{i:08d}", np.full((32, 48, 3), 120, np.uint8), mask, meta))
    record = write_shard(out / shard_name("train", 0), samples)
    write_info(out, "gen", {"train": [record]}, ["background", "crack"], {"seed": 7}, "procedural")
    return out


def test_stats_match_hand_counts(tiny):
    d = stats(tiny)
    assert d["classes"] == ["background", "scratch", "dent"] and d["source"] == "real:tiny"
    train, val = d["splits"]["train"], d["splits"]["val"]
    assert (train["samples"], train["shards"], train["empty_images"]) == (3, 2, 1)
    assert (val["samples"], val["shards"], val["empty_images"]) == (1, 1, 0)
    assert train["classes"] == {"scratch": {"images": 2, "instances": 3, "pixels": 28},
                                "dent": {"images": 1, "instances": 1, "pixels": 20}}
    assert val["classes"] == {"scratch": {"images": 0, "instances": 0, "pixels": 0},
                              "dent": {"images": 1, "instances": 1, "pixels": 6}}
    assert train["image_sizes"] == {"64x48": 3} and val["image_sizes"] == {"32x40": 1}
    sizes = [(tiny / f"train-00000{i}.tar").stat().st_size for i in range(2)]
    assert train["shard_bytes"] == {"min": min(sizes), "mean": round(sum(sizes) / 2), "max": max(sizes)}
    # areas scratch [20, 3, 5], dent [20, 6]; numpy's linear percentiles
    keys = ("count", "min", "p10", "median", "p90", "max")
    assert d["area_px"]["scratch"] == dict(zip(keys, (3, 3, 3.4, 5.0, 17.0, 20), strict=True))
    assert d["area_px"]["dent"] == dict(zip(keys, (2, 6, 7.4, 13.0, 18.6, 20), strict=True))
    text = format_stats(d)
    for word in ("tiny", "scratch", "dent", "64x48", "32x40", "p90"):
        assert word in text


def test_stats_on_generator_folder(generated):
    d = stats(generated)
    assert d["source"] == "procedural"
    assert d["splits"]["train"]["classes"] == {"crack": {"images": 3, "instances": 3, "pixels": 36}}
    assert d["area_px"]["crack"]["median"] == 12.0
    assert "crack" in format_stats(d)


def _sheet_size(samples: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) of a contact sheet of `samples` images of height x width: up to 4 samples a row, each an
    image panel and an overlay panel THUMB_SIDE px wide, a row as tall as a panel plus its 40 px title, and 70 px
    for the sheet's title and legend."""
    per_row = min(4, math.ceil(math.sqrt(samples)))
    rows = math.ceil(samples / per_row)
    return 2 * per_row * THUMB_SIDE, round(rows * (THUMB_SIDE * height / width + 40) + 70)


def test_preview_writes_a_contact_sheet(tiny, tmp_path):
    out = preview(tiny, tmp_path / "sheet.png", num=4, seed=1)
    assert out == tmp_path / "sheet.png" and not list(tmp_path.glob("*.tmp*"))
    with Image.open(out) as img:
        size = img.size
        pixels = np.asarray(img.convert("RGB"))
    assert size == _sheet_size(3, 48, 64) == (960, 510)  # the 3 train samples, 2 a row
    assert 10_000 < out.stat().st_size < MAX_PNG_BYTES
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000, "the sheet should show the images"
    preview(tiny, tmp_path / "val.png", split="val", num=16)
    with Image.open(tmp_path / "val.png") as img:
        assert img.size == _sheet_size(1, 40, 32) == (480, 410)  # one sample: an image and an overlay panel


def _shown_image(panel: np.ndarray, grey: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the largest flat `grey` area of a panel: where a uniform image is drawn."""
    labels, _ = ndimage.label((panel == grey).all(axis=2))
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    ys, xs = np.nonzero(labels == largest)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_preview_overlays_the_class_colour_on_the_defects(generated, tmp_path):
    """Uniform grey images, crack at rows 4:6, columns 4+i:10+i of 32x48: the overlay panel shows the crack's
    palette colour (55% over the grey) on exactly that box, the image panel nowhere."""
    info = json.loads((generated / "_info.json").read_text())
    shown = sorted(_pick(info, "train", 2, seed=0))
    with Image.open(preview(generated, tmp_path / "gen.png", num=2)) as img:
        sheet = np.asarray(img.convert("RGB")).astype(np.float64)
    assert sheet.shape[1::-1] == _sheet_size(2, 32, 48) == (960, 270)
    overlay = 0.55 * np.array(class_colors(["background", "crack"])[1]) * 255 + 0.45 * 120
    for slot in range(4):
        panel = sheet[:, slot * THUMB_SIDE : (slot + 1) * THUMB_SIDE]
        coloured = np.abs(panel - overlay).max(axis=2) <= 3
        if slot % 2 == 0:
            assert not coloured.any(), f"panel {slot} shows the image alone"
            continue
        i = shown[slot // 2]
        y0, y1, x0, x1 = _shown_image(panel, 120)
        sy, sx = (y1 - y0) / 32, (x1 - x0) / 48
        expected = np.array([y0 + 4 * sy, y0 + 6 * sy, x0 + (4 + i) * sx, x0 + (10 + i) * sx])
        ys, xs = np.nonzero(coloured)
        found = np.array([ys.min(), ys.max() + 1, xs.min(), xs.max() + 1])
        assert np.abs(found - expected).max() <= 1.5, (slot, found, expected)
        assert coloured.sum() > 0.6 * (expected[1] - expected[0]) * (expected[3] - expected[2])


def test_preview_rejects_unknown_split(tiny, tmp_path):
    with pytest.raises(ValueError, match="test"):
        preview(tiny, tmp_path / "x.png", split="test")
    assert not (tmp_path / "x.png").exists()


def test_thumbnail_keeps_thin_defects():
    image = np.zeros((2160, 3840, 3), np.uint8)
    mask = np.zeros((2160, 3840), np.uint8)
    mask[1001, 7:3000] = 1  # 1 px line, at an offset that nearest-neighbour sampling would miss
    mask[100:2000, 2001] = 2
    small_image, small_mask = _thumbnail(image, mask, side=240)
    assert small_mask.shape == small_image.shape[:2] == (135, 240)
    assert (small_mask == 1).sum() >= 185 and (small_mask == 2).sum() >= 115


def test_pick_is_deterministic_and_bounded():
    info = {"splits": {"train": {"num_samples": 1000}}}
    a = _pick(info, "train", 16, seed=5)
    assert a == _pick(info, "train", 16, seed=5) and len(a) == 16 and max(a) < 64
    assert _pick(info, "train", 16, seed=6) != a


def test_stats_on_damaged_shards_names_the_shard(tiny, tmp_path, caplog):
    """A truncated tar, a json member that is not UTF-8 and a missing shard: exit 2 with one line naming the
    shard (not a tarfile or Unicode traceback)."""
    import shutil
    import tarfile

    from synth.__main__ import main

    def damaged(name: str, change) -> Path:
        folder = tmp_path / name
        shutil.copytree(tiny, folder)
        info = json.loads((folder / "_info.json").read_text())
        info["splits"]["train"]["sha256"] = {}  # no digest: the reading itself must find the damage
        (folder / "_info.json").write_text(json.dumps(info))
        change(folder / "train-000000.tar")
        return folder

    def truncate(shard: Path) -> None:
        shard.write_bytes(shard.read_bytes()[:700])

    def bad_json(shard: Path) -> None:
        data = bytearray(shard.read_bytes())
        with tarfile.open(shard) as tar:
            member = next(m for m in tar if m.name.endswith(".json"))
        data[member.offset_data:member.offset_data + 2] = b"\xff\xfe"
        shard.write_bytes(bytes(data))

    for folder, expected in [(damaged("truncated", truncate), "cannot be read as a tar"),
                             (damaged("badjson", bad_json), "is not valid UTF-8 JSON"),
                             (damaged("missing", Path.unlink), "shard train-000000.tar is missing")]:
        caplog.clear()
        assert main(["stats", str(folder)]) == 2
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and not errors[0].exc_info, caplog.text  # one line, no traceback
        assert "train-000000.tar" in errors[0].getMessage() and expected in errors[0].getMessage()
