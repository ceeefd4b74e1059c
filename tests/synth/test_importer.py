"""import_folder: mixed image modes round-trip, bad inputs are reported by file name, nothing half-written."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.shards import decode_raw, iter_raw_samples, read_folder_info
from synth.importer import ImportFailed, find_defects, import_folder

H, W = 53, 37  # odd sizes catch any width/height swap


def _mask(seed: int, classes: int = 2, shape: tuple[int, int] = (H, W)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[5:9, 3:20] = 1
    mask[30, 10:30] = classes  # a 1 px line of the last class
    mask[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5)] = 1
    return mask


def make_folder(root: Path) -> dict:
    """A tiny labeled folder with one file per awkward case; returns the expected arrays per key."""
    rng = np.random.default_rng(0)
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    expected = {}

    gray = rng.integers(0, 256, (H, W), dtype=np.uint8)
    Image.fromarray(gray).save(images / "gray.png")
    expected["gray"] = (np.repeat(gray[:, :, None], 3, axis=2), _mask(1), "png")
    Image.fromarray(_mask(1)).save(masks / "gray.png")  # mode L

    rgba = rng.integers(0, 256, (H, W, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(images / "rgba.png")
    expected["rgba"] = (rgba[:, :, :3], _mask(2), "png")
    pal = Image.fromarray(_mask(2), "P")
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # colors must not matter, only the index
    pal.save(masks / "rgba.png")

    deep = rng.integers(0, 65536, (H, W), dtype=np.uint16)
    deep[0, :3] = [0, 65535, 257 * 100]
    Image.fromarray(deep).save(images / "deep.png")
    deep8 = np.rint(deep / 257.0).astype(np.uint8)  # full-range linear: 65535 -> 255
    expected["deep"] = (np.repeat(deep8[:, :, None], 3, axis=2), _mask(3), "png")
    Image.fromarray(_mask(3).astype(np.uint16)).save(masks / "deep.png")  # 16-bit index mask

    photo = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(photo).save(images / "photo.JPG", format="JPEG", quality=80)
    expected["photo"] = (None, _mask(4), "jpg")
    Image.fromarray(_mask(4)).save(masks / "photo.bmp")

    dotted = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    Image.fromarray(dotted).save(images / "a.b.png")
    expected["a_b"] = (dotted, _mask(5), "png")
    Image.fromarray(np.repeat(_mask(5)[:, :, None], 3, axis=2)).save(masks / "a.b.png")  # gray RGB mask
    return expected


def read_all(out: Path) -> dict[str, dict]:
    info = read_folder_info(out)
    samples = {}
    for split, entry in info["splits"].items():
        for name in entry["filenames"]:
            for raw in iter_raw_samples(out / name):
                samples[raw["__key__"]] = {"split": split, "raw": raw, "shard": name}
    return samples


def assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob("*.partial-*")), "temporary folder left behind"


def test_mixed_folder_round_trips(tmp_path):
    expected = make_folder(tmp_path)
    out = tmp_path / "out"
    info = import_folder(tmp_path / "images", tmp_path / "masks", out, classes=["crack", "spot"], name="tiny",
                         shard_size=2)
    assert info["classes"] == ["background", "crack", "spot"]
    assert info["source"] == "real:tiny"
    assert list(info["splits"]) == ["train"]
    samples = read_all(out)
    assert sorted(samples) == sorted(expected)
    for key, (image, mask, ext) in expected.items():
        raw = samples[key]["raw"]
        assert ext in raw, f"{key}: expected a .{ext} member, got {sorted(raw)}"
        got_image, got_mask, meta = decode_raw(raw)
        np.testing.assert_array_equal(got_mask, mask, err_msg=key)
        if image is not None:
            np.testing.assert_array_equal(got_image, image, err_msg=key)
        assert meta["size"] == [H, W] and meta["split"] == "train" and meta["source"] == "real:tiny"
        assert int(raw["cls"]) == int(np.bincount(mask.ravel(), minlength=3)[1:].argmax()) + 1
        assert sum(d["area_px"] for d in meta["defects"]) == int((mask > 0).sum())
    assert samples["photo"]["raw"]["jpg"] == (tmp_path / "images" / "photo.JPG").read_bytes()
    assert decode_raw(samples["deep"]["raw"])[2]["original_mode"].startswith("I")
    assert decode_raw(samples["photo"]["raw"])[2]["mask_file"] == "photo.bmp"

    # _info.json agrees with the tars: counts, file names, shard lengths, and keys in order within a shard
    split = info["splits"]["train"]
    assert split["num_samples"] == len(expected) == sum(split["shard_lengths"])
    assert sorted(p.name for p in out.glob("*.tar")) == split["filenames"] == ["train-000000.tar",
                                                                                "train-000001.tar",
                                                                                "train-000002.tar"]
    for name, length in zip(split["filenames"], split["shard_lengths"], strict=True):
        with tarfile.open(out / name) as tar:
            keys = [m.name.split(".")[0] for m in tar.getmembers()]
        assert len(set(keys)) == length
        assert keys == sorted(keys)
    assert json.loads((out / "_info.json").read_text()) == info


def test_defects_are_8_connected_components():
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = 1  # diagonal chain: one component with 8-connectivity
    mask[4:6, 5:8] = 1
    mask[0, 7] = 2
    defects = find_defects(mask, ["background", "crack", "spot"])
    assert [(d["class"], d["class_id"], d["bbox"], d["area_px"]) for d in defects] == [
        ("crack", 1, [0, 0, 3, 3], 3),
        ("crack", 1, [5, 4, 8, 6], 6),
        ("spot", 2, [7, 0, 8, 1], 1),
    ]


def test_split_file_and_unassigned_warning(tmp_path, caplog):
    make_folder(tmp_path)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["gray", "deep"], "test": ["photo.JPG"]}))
    with caplog.at_level(logging.WARNING):
        info = import_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", split_file=split_file,
                             classes=["crack", "spot"])
    assert {s: v["num_samples"] for s, v in info["splits"].items()} == {"train": 2, "test": 1}
    assert "2 image(s) are in no split" in caplog.text
    samples = read_all(tmp_path / "out")
    assert {k: v["split"] for k, v in samples.items()} == {"gray": "train", "deep": "train", "photo": "test"}


def test_val_ratio_with_a_split_file_carves_val_out_of_train_only(tmp_path):
    make_folder(tmp_path)
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps({"train": ["gray", "deep", "rgba", "a.b"], "test": ["photo.JPG"]}))
    info = import_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", split_file=split_file,
                         classes=["crack", "spot"], val_ratio=0.25, seed=1)
    assert {s: v["num_samples"] for s, v in info["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    splits = {k: v["split"] for k, v in read_all(tmp_path / "out").items()}
    assert splits["photo"] == "test" and sorted(k for k, s in splits.items() if s != "test") == \
        sorted(["gray", "deep", "rgba", "a_b"])
    for bad, expected in (({"train": ["gray"], "val": ["deep"]}, "has a 'val' split already"),
                          ({"test": ["gray"]}, "takes the 'val' images from the 'train' split")):
        split_file.write_text(json.dumps(bad))
        with pytest.raises(ImportFailed, match=expected):
            import_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "bad", split_file=split_file,
                          classes=["crack", "spot"], val_ratio=0.25)
        assert not (tmp_path / "bad").exists()


def test_val_ratio_is_deterministic(tmp_path):
    make_folder(tmp_path)
    args = (tmp_path / "images", tmp_path / "masks")
    a = import_folder(*args, tmp_path / "a", classes=["crack", "spot"], val_ratio=0.4, seed=3, name="x")
    b = import_folder(*args, tmp_path / "b", classes=["crack", "spot"], val_ratio=0.4, seed=3, name="x")
    assert {s: v["num_samples"] for s, v in a["splits"].items()} == {"train": 3, "val": 2}
    assert a["splits"]["val"]["sha256"] == b["splits"]["val"]["sha256"]


def test_binary_mode_and_255_hint(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    Image.fromarray(np.full((H, W), 90, np.uint8)).save(images / "plate.png")
    binary = _mask(0, classes=1) * 255
    Image.fromarray(binary).save(masks / "plate.png")
    with pytest.raises(ImportFailed) as err:
        import_folder(images, masks, tmp_path / "out")
    for word in ("plate.png", "255", "0..1", "--mask-mode binary"):
        assert word in str(err.value)
    assert_nothing_written(tmp_path, tmp_path / "out")
    import_folder(images, masks, tmp_path / "out", mask_mode="binary")
    _, mask, meta = decode_raw(next(iter(read_all(tmp_path / "out").values()))["raw"])
    np.testing.assert_array_equal(mask, (binary > 0).astype(np.uint8))
    assert {d["class"] for d in meta["defects"]} == {"defect"}


def _size_mismatch(root: Path) -> None:
    Image.fromarray(np.zeros((H, W - 1), np.uint8)).save(root / "masks" / "gray.png")


def _missing_mask(root: Path) -> None:
    (root / "masks" / "photo.bmp").unlink()


def _corrupt_image(root: Path) -> None:
    (root / "images" / "rgba.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)


def _truncated_mask(root: Path) -> None:
    path = root / "masks" / "deep.png"
    path.write_bytes(path.read_bytes()[:60])


def _out_of_range(root: Path) -> None:
    Image.fromarray(_mask(7, classes=7)).save(root / "masks" / "gray.png")


def _colored(root: Path) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[5:9, 3:20] = [255, 0, 0]
    Image.fromarray(rgb).save(root / "masks" / "a.b.png")


def _ghost_id(root: Path) -> None:
    (root / "split.json").write_text(json.dumps({"train": ["gray", "ghost_17"], "test": ["photo"]}))


@pytest.mark.parametrize("damage, words", [
    (_size_mismatch, ["gray.png", "36x53", "37x53"]),
    (_missing_mask, ["photo.JPG", "no mask"]),
    (_corrupt_image, ["rgba.png", "unreadable"]),
    (_truncated_mask, ["deep.png", "unreadable"]),
    (_out_of_range, ["gray.png", "7", "0..2"]),
    (_colored, ["a.b.png", "colored", "class-index"]),
    (_ghost_id, ["split.json", "ghost_17", "no image"]),
])
def test_bad_input_names_file_and_writes_nothing(tmp_path, damage, words):
    make_folder(tmp_path)
    damage(tmp_path)
    split_file = tmp_path / "split.json" if (tmp_path / "split.json").exists() else None
    out = tmp_path / "out"
    with pytest.raises(ImportFailed) as err:
        import_folder(tmp_path / "images", tmp_path / "masks", out, classes=["crack", "spot"],
                      split_file=split_file)
    for word in words:
        assert word in str(err.value), f"'{word}' missing from: {err.value}"
    assert len(err.value.errors) == 1
    assert_nothing_written(tmp_path, out)


def test_all_errors_in_one_message(tmp_path):
    make_folder(tmp_path)
    for damage in (_size_mismatch, _corrupt_image, _colored, _truncated_mask):
        damage(tmp_path)
    with pytest.raises(ImportFailed) as err:
        import_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out", classes=["crack", "spot"])
    message = str(err.value)
    assert "4 error(s)" in message
    for name in ("gray.png", "rgba.png", "a.b.png", "deep.png"):
        assert name in message
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_long_error_list_is_capped(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(60):
        Image.new("L", (4, 4)).save(tmp_path / "images" / f"m{i:02d}.png")
    with pytest.raises(ImportFailed) as err:
        import_folder(tmp_path / "images", tmp_path / "masks", tmp_path / "out")
    assert len(err.value.errors) == 60
    assert "... and 10 more" in str(err.value)
    assert len(str(err.value).splitlines()) == 52


def test_existing_output_needs_overwrite_and_survives_failure(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "images" / "rgba.png").rename(tmp_path / "rgba.png")
    out = tmp_path / "out"
    args = (tmp_path / "images", tmp_path / "masks", out)
    import_folder(*args, classes=["crack", "spot"])  # an earlier import: a folder this project wrote
    (out / "keep.txt").write_text("old")
    (tmp_path / "rgba.png").rename(tmp_path / "images" / "rgba.png")
    with pytest.raises(ImportFailed, match="overwrite"):
        import_folder(*args, classes=["crack", "spot"])
    _corrupt_image(tmp_path)
    with pytest.raises(ImportFailed):
        import_folder(*args, classes=["crack", "spot"], overwrite=True)
    assert (out / "keep.txt").read_text() == "old", "a failed import must leave the old folder untouched"
    (tmp_path / "images" / "rgba.png").unlink()
    info = import_folder(*args, classes=["crack", "spot"], overwrite=True)
    assert not (out / "keep.txt").exists() and info["splits"]["train"]["num_samples"] == 4
    assert not list(tmp_path.glob("out.*"))


def test_crackforest(tmp_path, crackforest):
    out = tmp_path / "cfd"
    info = import_folder(crackforest / "images", crackforest / "masks", out,
                         split_file=crackforest / "split.json", classes=["crack"], name="crackforest")
    assert {s: v["num_samples"] for s, v in info["splits"].items()} == {"train": 70, "test": 48}
    assert info["classes"] == ["background", "crack"] and info["source"] == "real:crackforest"
    samples = read_all(out)
    assert len(samples) == 118
    for key, entry in samples.items():
        raw = entry["raw"]
        assert raw["jpg"] == (crackforest / "images" / f"{key}.jpg").read_bytes()
        mask = np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
        assert mask.shape == (320, 480) and set(np.unique(mask).tolist()) <= {0, 1}
