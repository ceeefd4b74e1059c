"""Look at a shard folder: a contact sheet of samples with their masks, and counts computed from the metadata.

Both work on any folder that follows the shard contract, made by the generator or by the importer.
"""

from __future__ import annotations

import io
import json
import logging
import math
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from defectforge.files import write_atomic
from defectforge.reader import verify_folder
from defectforge.shards import ShardError, decode_raw, iter_raw_samples, read_folder_info, split_files
from defectforge.tracking import class_colors

log = logging.getLogger(__name__)

THUMB_SIDE = 240  # pixels per panel, close to the rendered size so matplotlib does not resample thin lines
MAX_PNG_BYTES = 3 * 1024 * 1024
_CANDIDATES_PER_PICK = 4


def _thumbnail(image: np.ndarray, mask: np.ndarray, side: int = THUMB_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """Downscale by an integer factor; the mask keeps the largest class id of each block.

    Nearest-neighbour would drop a 1-2 px crack in most blocks; the block max keeps every defect visible.
    """
    h, w = mask.shape
    f = max(1, math.ceil(max(h, w) / side))
    if f == 1:
        return image, mask
    th, tw = math.ceil(h / f), math.ceil(w / f)
    padded = np.zeros((th * f, tw * f), dtype=mask.dtype)
    padded[:h, :w] = mask
    small_mask = padded.reshape(th, f, tw, f).max(axis=(1, 3))
    small_image = np.asarray(Image.fromarray(image).resize((tw, th), Image.Resampling.BOX))
    return small_image, small_mask


def _pick(info: dict, split: str, num: int, seed: int) -> set[int]:
    """Indices (in shard order) of the samples to show, among the first `4 * num` of the split."""
    total = int(info["splits"][split].get("num_samples", 0))
    pool = min(total, _CANDIDATES_PER_PICK * num)
    if pool == 0:
        raise ShardError(f"split '{split}' has no sample to preview")
    chosen = np.random.default_rng(seed).choice(pool, size=min(num, pool), replace=False)
    return {int(i) for i in chosen}


def _describe(meta: dict) -> tuple[str, str]:
    origin = meta.get("surface") or meta.get("source") or "?"
    if isinstance(origin, dict):
        if origin.get("kind") == "labeled":  # a crop of a labeled image (labeled_dir): which one
            origin = f"labeled {origin.get('file') or origin.get('key', '?')}"
        else:
            origin = origin.get("kind") or origin.get("name") or next(iter(origin.values()), "?")
    origin = str(origin)
    origin = origin if len(origin) <= 28 else "..." + origin[-25:]
    defects = meta.get("defects", [])
    counts = Counter(d.get("class", "?") for d in defects)
    real = Counter(d.get("class", "?") for d in defects if d.get("source") == "labeled")
    what = ", ".join(f"{c} x{n}" + (f" ({real[c]} labeled)" if real[c] else "")
                     for c, n in sorted(counts.items())) or "no defect"
    return origin, what


def preview(folder: str | Path, out_png: str | Path, split: str | None = None, num: int = 16,
            seed: int = 0) -> Path:
    """Write a contact sheet of `num` samples of `split` (default: the first split) to `out_png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if num < 1:
        raise ValueError(f"num {num} is out of range; expected an integer >= 1")
    info = read_folder_info(folder)
    split = split or next(iter(info["splits"]), None)
    if split is None:
        raise ShardError(f"'{folder}' has no split")
    files = split_files(folder, split, info)  # raises, naming the splits there are, for an unknown split
    chosen = _pick(info, split, num, seed)
    last = max(chosen)
    thumbs = []
    index = 0
    for shard in files:
        for raw in iter_raw_samples(shard):
            if index in chosen:
                image, mask, meta = decode_raw(raw)
                thumbs.append((raw["__key__"], *_thumbnail(image, mask), meta))
            index += 1
            if index > last:
                break
        if index > last:
            break

    if not thumbs:
        raise ShardError(f"split '{split}' of '{folder}': its shards hold fewer samples than _info.json declares")
    classes = list(info["classes"])
    colors = class_colors(classes)
    lut = np.zeros((256, 4), dtype=np.float32)
    for k in range(1, len(classes)):
        lut[k] = (*colors[k], 0.55)

    per_row = max(1, min(4, math.ceil(math.sqrt(len(thumbs)))))
    rows = math.ceil(len(thumbs) / per_row)
    panel = THUMB_SIDE / 100  # inches at dpi 100
    aspect = max(t[2].shape[0] / t[2].shape[1] for t in thumbs)
    size = (2 * per_row * panel, rows * (panel * aspect + 0.4) + 0.7)
    fig, axes = plt.subplots(rows, 2 * per_row, figsize=size, dpi=100, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, (key, image, mask, meta) in enumerate(thumbs):
        ax_img, ax_mask = axes[i // per_row, 2 * (i % per_row)], axes[i // per_row, 2 * (i % per_row) + 1]
        origin, what = _describe(meta)
        ax_img.imshow(image, interpolation="nearest")
        ax_img.set_title(f"{key}\n{origin}", fontsize=7)
        ax_mask.imshow(image, interpolation="nearest")
        ax_mask.imshow(lut[mask], interpolation="nearest")
        for k in np.unique(mask):
            if k and k < len(classes):
                # The outline keeps a crack visible where the translucent fill alone would vanish.
                ax_mask.contour(mask == k, levels=[0.5], colors=[colors[k]], linewidths=0.6)
        ax_mask.set_title(what, fontsize=7)
    handles = [Patch(color=colors[k], label=f"{k} {classes[k]}") for k in range(1, len(classes))]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8) or 1, fontsize=8, frameon=False)
    fig.suptitle(f"{info.get('name', Path(folder).name)} - {split} - {len(thumbs)} of "
                 f"{info['splits'][split].get('num_samples')} samples", fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return _write_png(buf.getvalue(), Path(out_png))


def _write_png(data: bytes, out_png: Path) -> Path:
    if len(data) > MAX_PNG_BYTES:
        # Photographic sheets can exceed the budget; a 256-color palette keeps masks and text readable.
        img = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        data = out.getvalue()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out_png, data)


def _iter_meta(path: Path) -> Iterator[dict]:
    """The `json` member of each sample of one shard; the tar reader seeks past images without decoding."""
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json") and "." not in member.name[:-5]:
                    try:
                        yield json.loads(tar.extractfile(member).read())
                    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
                        raise ShardError(f"shard {path}: member {member.name} is not valid UTF-8 JSON "
                                         f"({err})") from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"shard {path} cannot be read as a tar ({type(err).__name__}: {err})") from None


def _distribution(areas: list[int]) -> dict:
    a = np.asarray(areas, dtype=np.float64)
    p10, p50, p90 = np.percentile(a, [10, 50, 90])
    return {"count": len(areas), "min": int(a.min()), "p10": round(float(p10), 1),
            "median": round(float(p50), 1), "p90": round(float(p90), 1), "max": int(a.max())}


def stats(folder: str | Path) -> dict:
    """Counts per split and class, defect areas and image sizes, from the `json` members only."""
    info = read_folder_info(folder)
    classes = list(info["classes"])
    areas: dict[str, list[int]] = defaultdict(list)
    result: dict = {"name": info.get("name"), "source": info.get("source"), "classes": classes, "splits": {}}
    for split in info["splits"]:
        verify_folder(folder, split, info, allow=False)  # every listed shard present, with its recorded sha256
        files = split_files(folder, split, info)
        sizes = [f.stat().st_size for f in files]
        per_class = {c: {"images": 0, "instances": 0, "pixels": 0} for c in classes[1:]}
        image_sizes: Counter = Counter()
        samples = empty = 0
        labeled = {"images": 0, "instances": Counter()}  # crops of labeled images and their real defects
        for shard in tqdm(files, desc=f"stats {split}", unit="shard", leave=False):
            for meta in _iter_meta(shard):
                samples += 1
                defects = meta.get("defects", [])
                empty += not defects
                if isinstance(meta.get("surface"), dict) and meta["surface"].get("kind") == "labeled":
                    labeled["images"] += 1
                    labeled["instances"].update(d["class"] for d in defects if d.get("source") == "labeled")
                if "size" in meta:
                    image_sizes[f"{meta['size'][1]}x{meta['size'][0]}"] += 1
                for name in {d["class"] for d in defects}:
                    per_class.setdefault(name, {"images": 0, "instances": 0, "pixels": 0})["images"] += 1
                for d in defects:
                    entry = per_class[d["class"]]
                    entry["instances"] += 1
                    entry["pixels"] += int(d.get("area_px", 0))
                    areas[d["class"]].append(int(d.get("area_px", 0)))
        declared = info["splits"][split].get("num_samples")
        if declared is not None and declared != samples:
            log.warning("split '%s': _info.json declares %s samples, the shards hold %d",
                        split, declared, samples)
        result["splits"][split] = {
            "samples": samples,
            "shards": len(files),
            "shard_bytes": {"min": min(sizes), "mean": round(sum(sizes) / len(sizes)), "max": max(sizes)}
            if sizes else {"min": 0, "mean": 0, "max": 0},
            "empty_images": empty,
            "classes": per_class,
            "image_sizes": dict(sorted(image_sizes.items())),
            "labeled": {"images": labeled["images"], "instances": dict(sorted(labeled["instances"].items()))},
        }
    result["area_px"] = {c: _distribution(areas[c]) for c in classes[1:] if areas.get(c)}
    return result


def _table(header: list[str], rows: list[list]) -> list[str]:
    cells = [header, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def fmt(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *map(fmt, cells[1:])]


def format_stats(d: dict) -> str:
    """A readable text report of `stats(...)`."""
    lines = [f"{d.get('name')}  (source: {d.get('source')}; classes: {', '.join(d['classes'])})", ""]
    rows = []
    for split, s in d["splits"].items():
        b = s["shard_bytes"]
        rows.append([split, s["samples"], s["empty_images"], s["shards"], _mb(b["min"]), _mb(b["mean"]),
                     _mb(b["max"])])
    lines += _table(["split", "samples", "empty", "shards", "shard MB min", "mean", "max"], rows) + [""]
    rows = [[split, c, e["images"], e["instances"], e["pixels"]]
            for split, s in d["splits"].items() for c, e in s["classes"].items()]
    lines += _table(["split", "class", "images", "instances", "pixels"], rows) + [""]
    rows = [[split, s["labeled"]["images"], c, n] for split, s in d["splits"].items() if s.get("labeled")
            for c, n in (s["labeled"]["instances"] or {"-": 0}).items() if s["labeled"]["images"]]
    if rows:
        lines += ["crops of labeled images (labeled_dir) and the real defects they keep, counted above too:"]
        lines += _table(["split", "crops", "class", "real instances"], rows) + [""]
    if d.get("area_px"):
        rows = [[c, a["count"], a["min"], a["p10"], a["median"], a["p90"], a["max"]]
                for c, a in d["area_px"].items()]
        lines += ["defect area (px per defect instance):"]
        lines += _table(["class", "count", "min", "p10", "median", "p90", "max"], rows) + [""]
    rows = [[split, size, n] for split, s in d["splits"].items() for size, n in s["image_sizes"].items()]
    if rows:
        lines += _table(["split", "size (WxH)", "images"], rows)
    return "\n".join(lines).rstrip() + "\n"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"
