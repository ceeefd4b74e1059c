"""Import a real labeled folder (images + class-index masks) into shards that follow the generator's contract.

Every problem of the folder is collected and reported at once, by file name, so that a user fixes the folder
in one round instead of one error per run. The output is built in a temporary sibling folder and renamed only
when complete: a failed import leaves nothing behind, and `overwrite` replaces the old folder only at the end.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from defectforge.config import ConfigError
from defectforge.files import MARKER, claim_output, is_own_output
from defectforge.shards import Sample, ShardRecord, encode_sample, shard_name, write_info, write_shard

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")
MASK_MODES = ("index", "binary")
MAX_LISTED = 50
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
# Pillow raises these for truncated or corrupt files, depending on the format plugin.
_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImportFailed(ValueError):
    """A folder that cannot be imported; `errors` lists every problem found, one line each."""

    def __init__(self, errors: list[str], where: str = "import"):
        self.errors = list(errors)
        shown = self.errors[:MAX_LISTED]
        lines = [f"{where} failed with {len(self.errors)} error(s):", *(f"  - {e}" for e in shown)]
        if len(self.errors) > MAX_LISTED:
            lines.append(f"  ... and {len(self.errors) - MAX_LISTED} more")
        super().__init__("\n".join(lines))


def sanitize_key(stem: str) -> str:
    """A WebDataset key for `stem`: WebDataset splits a member name at its first '.', so dots become '_'."""
    return stem.replace(".", "_")


def _list_files(folder: Path, suffixes: tuple[str, ...], what: str, errors: list[str]) -> dict[str, Path]:
    """Files of `folder` by stem; two files with the same stem are ambiguous and reported."""
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if path.stem in found:
            errors.append(f"{path.name}: {what} '{found[path.stem].name}' has the same stem '{path.stem}'; "
                          f"expected one {what} per stem")
            continue
        found[path.stem] = path
    return found


def _read_split_file(path: Path, stems: set[str], errors: list[str]) -> dict[str, list[str]]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        errors.append(f"{path.name}: unreadable split file ({err}); expected JSON {{split: [id, ...]}}")
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        errors.append(f"{path.name}: expected a JSON object mapping split name -> list of ids")
        return {}
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split, ids in raw.items():
        if not split or "/" in split or split.startswith("."):
            errors.append(f"{path.name}: split name '{split}' cannot be used in a shard file name")
            continue
        chosen = []
        missing = []
        for item in map(str, ids):
            # Accept a file name ("001.jpg") as well as a stem ("001").
            stem = item if item in stems else Path(item).stem if Path(item).stem in stems else None
            if stem is None:
                missing.append(item)
            elif stem in owner:
                errors.append(f"{path.name}: id '{item}' is in both '{owner[stem]}' and '{split}'")
            else:
                owner[stem] = split
                chosen.append(stem)
        if missing:
            listed = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
            errors.append(f"{path.name}: split '{split}' names {len(missing)} id(s) with no image: {listed}")
        splits[split] = sorted(chosen)
    return splits


def _ratio_split(stems: list[str], val_ratio: float, seed: int) -> dict[str, list[str]]:
    ordered = sorted(stems)
    n_val = int(round(val_ratio * len(ordered)))
    if val_ratio > 0 and len(ordered) >= 2:
        n_val = min(max(n_val, 1), len(ordered) - 1)
    else:
        n_val = 0
    # Shuffle the sorted stems so that the split depends only on (stems, seed), not on directory order.
    perm = np.random.default_rng(seed).permutation(len(ordered))
    val = {ordered[i] for i in perm[:n_val]}
    splits = {"train": [s for s in ordered if s not in val]}
    if n_val:
        splits["val"] = [s for s in ordered if s in val]
    return splits


def _open(path: Path, errors: list[str], what: str) -> tuple[Image.Image, bytes] | None:
    try:
        data = path.read_bytes()
        img = Image.open(io.BytesIO(data))
        img.load()
    except _READ_ERRORS as err:
        errors.append(f"{path.name}: unreadable or corrupt {what} ({type(err).__name__}: {err}); "
                      f"expected a readable image file")
        return None
    return img, data


def _image_rgb(img: Image.Image, name: str, errors: list[str]) -> np.ndarray | None:
    if img.mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit full range: 65535 / 257 = 255 exactly, a linear map with no clipping of legal values.
        values = np.asarray(img).astype(np.float64)
        gray = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("RGB", "L", "LA", "RGBA", "P", "PA", "1", "CMYK", "YCbCr"):
        return np.asarray(img.convert("RGB"))
    errors.append(f"{name}: image mode '{img.mode}' is not supported; "
                  f"expected RGB, L, LA, RGBA, P or 16-bit gray")
    return None


def _mask_index(img: Image.Image, name: str, errors: list[str]) -> np.ndarray | None:
    if img.mode in ("L", "P", "1", "I;16", "I;16L", "I;16B", "I"):
        return np.asarray(img).astype(np.int64)  # palette images give their index values, not colors
    if img.mode in ("LA", "PA"):
        return np.asarray(img)[:, :, 0].astype(np.int64)
    if img.mode in ("RGB", "RGBA"):
        rgb = np.asarray(img)[:, :, :3]
        if not ((rgb[:, :, 0] == rgb[:, :, 1]).all() and (rgb[:, :, 0] == rgb[:, :, 2]).all()):
            colors = np.unique(rgb.reshape(-1, 3), axis=0)[:5].tolist()
            errors.append(f"{name}: colored RGB mask (colors such as {colors}); expected a class-index mask "
                          f"(one gray value per class: 0 = background, 1..K = classes), mode L or P")
            return None
        return rgb[:, :, 0].astype(np.int64)
    errors.append(f"{name}: mask mode '{img.mode}' is not supported; "
                  f"expected a class-index mask (L, P, 16-bit)")
    return None


def _check_values(values: np.ndarray, name: str, classes: list[str], errors: list[str]) -> np.ndarray | None:
    present = np.unique(values)
    bad = present[(present < 0) | (present >= len(classes))]
    if not len(bad):
        return values.astype(np.uint8)
    shown = ", ".join(str(v) for v in bad[:10]) + (", ..." if len(bad) > 10 else "")
    msg = (f"{name}: mask values {shown} are outside the class list; expected 0..{len(classes) - 1} "
           f"(0 = background, {', '.join(f'{i} = {c}' for i, c in enumerate(classes[1:], 1))})")
    if len(classes) == 2 and set(present.tolist()) <= {0, 255}:
        msg += "; this looks like a 0/255 binary mask: use --mask-mode binary"
    errors.append(msg)
    return None


def find_defects(mask: np.ndarray, classes: list[str]) -> list[dict]:
    """One entry per 8-connected component of each class, in class then raster order."""
    defects = []
    for class_id in range(1, len(classes)):
        labels, count = ndimage.label(mask == class_id, structure=_EIGHT_CONNECTED)
        if not count:
            continue
        areas = np.bincount(labels.ravel(), minlength=count + 1)
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            ys, xs = box
            defects.append({
                "class": classes[class_id],
                "class_id": class_id,
                "bbox": [int(xs.start), int(ys.start), int(xs.stop), int(ys.stop)],
                "area_px": int(areas[label]),
                "params": {},
            })
    return defects


def _load_pair(key: str, image_path: Path, mask_path: Path, split: str, source: str, classes: list[str],
               mask_mode: str, errors: list[str]) -> Sample | None:
    """Validate one pair; append its problems to `errors` and return the sample only when it is clean."""
    opened_image = _open(image_path, errors, "image")
    opened_mask = _open(mask_path, errors, "mask")
    if opened_image is None or opened_mask is None:
        return None
    img, data = opened_image
    mask_img, _ = opened_mask
    if img.size != mask_img.size:
        errors.append(f"{mask_path.name}: mask size {mask_img.size[0]}x{mask_img.size[1]} differs from image "
                      f"{image_path.name} size {img.size[0]}x{img.size[1]} (W x H); expected the same size")
        return None
    rgb = _image_rgb(img, image_path.name, errors)
    values = _mask_index(mask_img, mask_path.name, errors)
    if rgb is None or values is None:
        return None
    if mask_mode == "binary":
        mask = (values != 0).astype(np.uint8)
    else:
        mask = _check_values(values, mask_path.name, classes, errors)
        if mask is None:
            return None
    meta = {
        "source": source,
        "file": image_path.name,
        "mask_file": mask_path.name,
        "split": split,
        "size": [int(rgb.shape[0]), int(rgb.shape[1])],
        "original_mode": img.mode,
        "defects": find_defects(mask, classes),
    }
    if img.format == "JPEG" and img.mode == "RGB":
        # Keep the original bytes: re-encoding a JPEG would add a second round of compression loss.
        return encode_sample(key, rgb, mask, meta, image_format="jpg", image_bytes=data)
    return encode_sample(key, rgb, mask, meta, image_format="png")


def _check_options(classes: list[str], mask_mode: str, val_ratio: float, shard_size: int) -> None:
    if mask_mode not in MASK_MODES:
        raise ConfigError(f"mask_mode '{mask_mode}' is not known; expected one of {', '.join(MASK_MODES)}")
    if not 0 <= val_ratio < 1:
        raise ConfigError(f"val_ratio {val_ratio} is out of range; expected 0 <= val_ratio < 1")
    if shard_size < 1:
        raise ConfigError(f"shard_size {shard_size} is out of range; expected an integer >= 1")
    if not classes or len(set(classes)) != len(classes) or "background" in classes:
        raise ConfigError(f"classes {classes}: expected unique, non-empty names without 'background'")
    if len(classes) > 255:
        raise ConfigError(f"{len(classes)} classes do not fit a uint8 mask; expected at most 255")


def _is_nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def import_folder(images: str | Path, masks: str | Path, out: str | Path, *,
                  split_file: str | Path | None = None, classes: list[str] | None = None,
                  name: str | None = None, val_ratio: float = 0.0, seed: int = 0, shard_size: int = 256,
                  mask_mode: str = "index", overwrite: bool = False) -> dict:
    """Import `images` + `masks` (paired by file stem) into shards in `out`; returns the `_info.json` dict.

    Raises `ImportFailed` listing every problem of the folder (nothing is written then), `ConfigError` for a
    bad option.
    """
    images, masks, out = Path(images), Path(masks), Path(out)
    class_names = list(classes) if classes else ["defect"]
    _check_options(class_names, mask_mode, val_ratio, shard_size)
    all_classes = ["background", *class_names]
    name = name or out.name
    source = f"real:{name}"
    if _is_nonempty(out) and not overwrite:
        raise ImportFailed([f"{out}: output folder exists and is not empty; pass --overwrite to replace it"])
    if _is_nonempty(out) and not (out.is_dir() and is_own_output(out)):
        raise ImportFailed([f"{out}: --overwrite replaces only a folder this project wrote (it has a {MARKER} "
                            "file); this one holds other files, so it is left as it is"])
    for folder, what in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            raise ImportFailed([f"{folder}: {what} folder does not exist"])

    errors: list[str] = []
    image_files = _list_files(images, IMAGE_SUFFIXES, "image", errors)
    mask_files = _list_files(masks, MASK_SUFFIXES, "mask", errors)
    if not image_files:
        errors.append(f"{images}: no image found; expected files ending in {', '.join(IMAGE_SUFFIXES)}")

    if split_file is not None:
        splits = _read_split_file(Path(split_file), set(image_files), errors)
        assigned = {s for stems in splits.values() for s in stems}
        unassigned = len(image_files) - len(assigned)
        if unassigned and splits:
            log.warning("%d image(s) are in no split of %s and are not imported", unassigned, split_file)
        if val_ratio > 0 and splits:  # a validation split carved out of the file's train split (never its test)
            if "val" in splits:
                errors.append(f"{Path(split_file).name}: has a 'val' split already; drop --val-ratio, or remove "
                              "'val' from the file")
            elif not splits.get("train"):
                errors.append(f"{Path(split_file).name}: --val-ratio takes the 'val' images from the 'train' split, "
                              f"but the file has none (splits: {', '.join(splits)})")
            else:
                carved = _ratio_split(splits.pop("train"), val_ratio, seed)
                splits = {**carved, **splits}
    else:
        splits = _ratio_split(list(image_files), val_ratio, seed)
    for split in [s for s, stems in splits.items() if not stems]:
        log.warning("split '%s' has no image and is left out", split)
        del splits[split]

    orphans = sorted(set(mask_files) - set(image_files))
    if orphans:
        listed = ", ".join(mask_files[s].name for s in orphans[:20]) + (" ..." if len(orphans) > 20 else "")
        log.warning("%d mask(s) have no image and are ignored: %s", len(orphans), listed)

    keys: dict[str, str] = {}
    for stem in sorted(image_files):
        key = sanitize_key(stem)
        if key in keys:
            errors.append(f"{image_files[stem].name}: key '{key}' (dots become '_') collides with "
                          f"{image_files[keys[key]].name}; expected unique file stems")
        keys[key] = stem
        if stem not in mask_files and any(stem in s for s in splits.values()):
            errors.append(f"{image_files[stem].name}: no mask; expected a file named {stem} with one of "
                          f"{', '.join(MASK_SUFFIXES)} in {masks}")
    if errors:
        raise ImportFailed(errors, where=f"import of {images}")

    _remove_stale_partials(out)
    tmp = out.with_name(f"{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    claim_output(tmp, "shards")
    try:
        records = _write_splits(tmp, splits, image_files, mask_files, source, all_classes, mask_mode,
                                shard_size, errors)
        if errors:
            raise ImportFailed(errors, where=f"import of {images}")
        config = {"images": str(images), "masks": str(masks), "split_file": None if split_file is None
                  else str(split_file), "classes": class_names, "val_ratio": val_ratio, "seed": seed,
                  "shard_size": shard_size, "mask_mode": mask_mode}
        info = write_info(tmp, name, records, all_classes, config, source)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("imported %s into %s: %s", images, out,
             ", ".join(f"{s} {v['num_samples']}" for s, v in info["splits"].items()))
    return info


def _write_splits(tmp: Path, splits: dict[str, list[str]], image_files: dict[str, Path],
                  mask_files: dict[str, Path], source: str, classes: list[str], mask_mode: str,
                  shard_size: int, errors: list[str]) -> dict[str, list[ShardRecord]]:
    total = sum(len(s) for s in splits.values())
    records: dict[str, list[ShardRecord]] = {}
    with tqdm(total=total, desc="import", unit="img") as bar:
        for split, stems in splits.items():
            def samples(stems: list[str] = stems, split: str = split) -> Iterator[Sample]:
                for stem in sorted(stems, key=sanitize_key):
                    sample = _load_pair(sanitize_key(stem), image_files[stem], mask_files[stem], split,
                                        source, classes, mask_mode, errors)
                    bar.update(1)
                    # After the first error keep validating, to report everything, but stop writing.
                    if sample is not None and not errors:
                        yield sample

            stream = samples()
            records[split] = []
            for first in stream:
                path = tmp / shard_name(split, len(records[split]))
                records[split].append(write_shard(path, chain([first], islice(stream, shard_size - 1))))
    return records


def _remove_stale_partials(out: Path) -> None:
    """Remove `OUT.partial-PID` folders of imports whose process is gone (killed before it could clean up)."""
    for folder in out.parent.glob(f"{out.name}.partial-*"):
        pid = folder.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s, left by a killed import", folder)
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` to `out`, removing an old `out` only once the new one is in place."""
    if not out.exists():
        tmp.rename(out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        tmp.rename(out)
        return
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    out.rename(old)
    tmp.rename(out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()
