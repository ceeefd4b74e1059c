"""The user's own labeled images as surfaces: crops of a shard folder, each with its real mask.

`labeled_dir` names a shard folder (`python -m synth import` makes one from images + masks); its split
`labeled_split` (train by default; `val` and `test` are refused, they are for judging a model) is indexed once
per process: where each sample's image and mask lie in its tar, so a crop reads two members, not a shard.
A crop keeps the real labels, mapped by class name onto the generated classes (a real class that `defects`
does not name is appended after them), and the synthetic defects are drawn away from them (synth/compose.py).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from defectforge.config import ConfigError
from defectforge.shards import IMAGE_EXTS, INFO_NAME, ShardError, parse_info, sha256_file

from .surfaces import crop_window

EVAL_SPLITS = ("val", "test")  # never pretraining data: a model is chosen (val) and judged (test) on them
_EIGHT = np.ones((3, 3), dtype=bool)
_INFO_CACHE: dict[tuple, dict] = {}


def _fail(problem: str, key: str = "labeled_dir") -> ConfigError:
    return ConfigError(f"key '{key}': {problem}")


def read_labeled_info(folder: str | Path) -> dict:
    """The checked `_info.json` of the labeled folder (cached per process while the file is unchanged)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _fail(f"folder '{folder}' does not exist, expected a shard folder made by `python -m synth import`")
    path = folder / INFO_NAME
    if not path.is_file():
        raise _fail(f"folder '{folder}' is not a shard folder ({INFO_NAME} is missing); make one from images and "
                    "masks with `python -m synth import --images DIR --masks DIR --out DIR` (docs/import.md)")
    st = path.stat()
    stamp = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if stamp not in _INFO_CACHE:
        try:
            _INFO_CACHE[stamp] = parse_info(path.read_bytes(), str(path))
        except ShardError as err:
            raise _fail(str(err)) from None
    return _INFO_CACHE[stamp]


def merged_classes(defects: list[str], labeled: list[str]) -> list[str]:
    """The generated dataset's classes: background, the `defects` in order, then each class of the labeled
    folder that `defects` does not name (so no real label is dropped or relabeled)."""
    extra = [c for c in labeled[1:] if c not in defects]
    return ["background", *defects, *extra]


def labeled_classes(folder: str | Path, defects: list[str]) -> list[str]:
    return merged_classes(defects, read_labeled_info(folder)["classes"])


@dataclass(frozen=True)
class Entry:
    """Where one labeled sample lies: its shard, key, and (offset, size) of its image, mask and json members."""

    shard: str
    key: str
    image: tuple[int, int]
    mask: tuple[int, int]
    meta: tuple[int, int] | None


@dataclass(frozen=True)
class LabeledSource:
    """One split of a labeled shard folder, indexed: `read(i)` decodes sample i with its mask in the generated
    classes (`lut` maps the folder's class ids onto them)."""

    folder: str
    split: str
    name: str
    classes: list[str]  # the generated dataset's classes
    folder_classes: list[str]
    lut: np.ndarray
    entries: tuple[Entry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray, Entry, dict]:
        """Image (H, W, 3) uint8, mask (H, W) uint8 in the generated classes, the entry and the sample's json."""
        e = self.entries[i]
        with open(e.shard, "rb") as f:
            image_bytes, mask_bytes, meta_bytes = (_member(f, span) for span in (e.image, e.mask, e.meta))
        where = f"labeled sample '{e.key}' in {e.shard}"
        try:
            image = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
            mask = np.asarray(Image.open(io.BytesIO(mask_bytes)))
            meta = json.loads(meta_bytes) if meta_bytes else {}
        except (OSError, ValueError) as err:
            raise ShardError(f"{where} cannot be decoded: {err}") from None
        if mask.dtype != np.uint8 or mask.shape != image.shape[:2]:
            raise ShardError(f"{where}: mask {mask.dtype} {mask.shape} does not match the image {image.shape[:2]}")
        if int(mask.max()) >= len(self.folder_classes):
            raise ShardError(f"{where}: mask value {int(mask.max())} outside the folder's classes "
                             f"{self.folder_classes}")
        return image, self.lut[mask], e, meta

    def record(self) -> dict:
        """What `_info.json` records of the source."""
        return {"folder": self.folder, "split": self.split, "name": self.name, "num_samples": len(self),
                "classes": self.folder_classes,
                "class_ids": {c: int(self.lut[i]) for i, c in enumerate(self.folder_classes) if i},
                "sha256": dict(read_labeled_info(self.folder)["splits"][self.split].get("sha256") or {})}


_SOURCES: dict[tuple, LabeledSource] = {}


def labeled_source(folder: str | Path, split: str, defects: list[str]) -> LabeledSource:
    """`open_labeled`, once per process while the folder's `_info.json` is unchanged."""
    path = Path(folder) / INFO_NAME
    st = path.stat() if path.is_file() else None
    stamp = (str(Path(folder).resolve()), split, tuple(defects), st and (st.st_mtime_ns, st.st_size))
    if stamp not in _SOURCES:
        _SOURCES[stamp] = open_labeled(folder, split, defects)
    return _SOURCES[stamp]


def _member(f, span: tuple[int, int] | None) -> bytes:
    if span is None:
        return b""
    f.seek(span[0])
    return f.read(span[1])


def open_labeled(folder: str | Path, split: str, defects: list[str], verify: bool = False) -> LabeledSource:
    """Index `split` of the labeled shard `folder`. Every problem is a `ConfigError` naming the key and the
    folder; `verify` also compares each shard with the sha256 its `_info.json` records."""
    info = read_labeled_info(folder)
    if split in EVAL_SPLITS:
        raise _fail(f"value '{split}' is an evaluation split: pretraining on it would leak the data a model is "
                    "chosen or judged on; use the train split (default)", "labeled_split")
    if split not in info["splits"]:
        raise _fail(f"split '{split}' not found in '{folder}'; it has: {', '.join(info['splits']) or 'none'}",
                    "labeled_split")
    entry = info["splits"][split]
    names = list(entry.get("filenames") or [])
    lengths = list(entry.get("shard_lengths") or [None] * len(names))
    if len(lengths) != len(names):
        raise _fail(f"{Path(folder) / INFO_NAME}: split '{split}' lists {len(names)} shards but {len(lengths)} "
                    "shard_lengths")
    digests = entry.get("sha256") or {}
    entries: list[Entry] = []
    for name, length in zip(names, lengths, strict=True):
        path = Path(folder) / name
        if not path.is_file():
            raise _fail(f"shard '{path}' listed in {INFO_NAME} is missing")
        if verify and name in digests and sha256_file(path) != digests[name]:
            raise _fail(f"shard '{path}' differs from the sha256 recorded in {INFO_NAME} (damaged or changed)")
        found = _index_shard(path)
        if length is not None and len(found) != length:
            raise _fail(f"shard '{path}' holds {len(found)} samples, {INFO_NAME} records {length}")
        entries += found
    if not entries:
        raise _fail(f"split '{split}' of '{folder}' has no sample", "labeled_split")
    folder_classes = list(info["classes"])
    classes = merged_classes(list(defects), folder_classes)
    if len(classes) > 256:
        raise _fail(f"{len(classes)} classes do not fit the 8-bit mask")
    lut = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(folder_classes[1:], start=1):
        lut[i] = classes.index(c)
    return LabeledSource(str(folder), split, str(info.get("name")), classes, folder_classes, lut, tuple(entries))


def _index_shard(path: Path) -> list[Entry]:
    members: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError) as err:
        raise _fail(f"shard '{path}' cannot be read: {err}") from None
    out = []
    for key, found in members.items():
        image = next((found[e] for e in IMAGE_EXTS if e in found), None)
        if image is None or "mask.png" not in found:
            raise _fail(f"sample '{key}' of shard '{path}' lacks an image or a mask.png member: {sorted(found)}")
        out.append(Entry(str(path), key, image, found["mask.png"], found.get("json")))
    return out


def crop_labeled(source: LabeledSource, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """A random (height x width) crop of a random labeled image: float32 image, uint8 mask in the generated
    classes, and the surface metadata. A smaller image is upscaled (bicubic image, nearest-neighbour mask, the
    same window for both), as `crop_background` does with photos."""
    image, mask, entry, meta = source.read(int(rng.integers(len(source))))
    ih, iw = mask.shape
    box, scale = crop_window(iw, ih, height, width, rng)
    x0, y0, x1, y1 = box
    image, mask = image[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    if mask.shape != (height, width):
        image = np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.BICUBIC))
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    surface = {"kind": "labeled", "dataset": source.name, "split": source.split, "key": entry.key,
               "crop": list(box), "scale": round(float(scale), 4)}
    if "file" in meta:
        surface["file"] = meta["file"]
    return np.array(image, dtype=np.float32), np.ascontiguousarray(mask), surface


def keep_out(mask: np.ndarray, margin: int) -> np.ndarray | None:
    """The pixels a synthetic defect must not touch: every labeled pixel grown by `margin` px (a square of side
    2 * margin + 1), None when the crop holds no label."""
    labeled = (mask > 0).view(np.uint8)
    if not labeled.any():
        return None
    if margin > 0:
        size = 2 * margin + 1
        labeled = ndimage.maximum_filter1d(ndimage.maximum_filter1d(labeled, size, axis=0), size, axis=1)
    return labeled.astype(bool)


def real_defects(mask: np.ndarray, classes: list[str]) -> list[dict]:
    """One metadata entry per 8-connected component of each labeled class (as `synth import` writes them),
    marked `"source": "labeled"`."""
    out = []
    for class_id in np.flatnonzero(np.bincount(mask.ravel(), minlength=1)[1:]) + 1:
        labels, count = ndimage.label(mask == class_id, structure=_EIGHT)
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        for label, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
            out.append({"class": classes[class_id], "class_id": int(class_id), "source": "labeled",
                        "bbox": [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)],
                        "area_px": int(areas[label]), "params": {}})
    return out
