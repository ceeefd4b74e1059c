"""A scene: a surface, some defects with their exact mask, then lighting and sensor noise.

Every sample is a pure function of `(config, global index)`: its random generator is seeded from
`(seed, index)`, so the same config gives the same bytes whichever worker or process renders it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .config import SynthConfig
from .defects import place_defect
from .labeled import LabeledSource, crop_labeled, keep_out, labeled_source, real_defects
from .surfaces import crop_background, draw_imaging, make_surface

# Defect counts are given for a 512x512 image and grow with the square root of the area, so a 4K scene
# (about 32x the area) carries several defects of different sizes instead of one or two.
REFERENCE_SIDE = 512


def sample_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def _pick(rng: np.random.Generator, weights: dict[str, float]) -> str:
    """A name drawn with probability proportional to its weight (what `rng.choice(n, p=...)` does, and the same
    draw: one uniform through the cumulative weights, without choice's argument checks)."""
    names = list(weights)
    cdf = np.cumsum([weights[n] for n in names], dtype=np.float64)
    cdf /= cdf[-1]
    return names[min(int(cdf.searchsorted(rng.random(), side="right")), len(names) - 1)]


def render_sample(cfg: SynthConfig, index: int, backgrounds: list[Path] | None = None,
                  labeled: LabeledSource | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Image (H, W, 3) uint8, class-index mask (H, W) uint8 and metadata of sample `index`.

    With `labeled_dir` (indexed once per process, or passed as `labeled`), a share `labeled_ratio` of the
    samples are crops of the user's labeled images: their labels are kept, the synthetic defects are drawn
    where they touch no labeled pixel (nor its `labeled_margin`), and every other pixel keeps the crop's value
    (no camera model on real photos).
    """
    if labeled is None and cfg.labeled_dir is not None:
        labeled = labeled_source(cfg.labeled_dir, cfg.labeled_split, list(cfg.defects))
    rng = sample_rng(cfg.seed, index)
    h, w = cfg.size
    scale = min(h, w) / REFERENCE_SIDE
    camera = {"gradient": cfg.gradient, "vignette": cfg.vignette, "noise": tuple(cfg.noise)}
    real = None  # the labeled crop's mask, in the generated classes
    classes = labeled.classes if labeled is not None else cfg.classes
    # Lighting is applied to the surface before the defects are drawn (a defect's shading is relative to the
    # lit surface around it): a procedural surface folds the gain into its smooth field, which saves an
    # (H, W, 3) pass at the end; the sensor noise is added by imaging.finish, with the quantisation.
    if labeled is not None and rng.random() < cfg.labeled_ratio:
        img, real, surface = crop_labeled(labeled, h, w, rng)
        imaging = None  # the target camera is already in the photo; its real pixels stay as they are
    elif backgrounds and rng.random() < cfg.background_ratio:
        path = backgrounds[int(rng.integers(len(backgrounds)))]
        img, surface = crop_background(path, h, w, rng)
        imaging = draw_imaging(rng, **camera)
        gain = imaging.gain(h, w)
        if gain is not None:
            for c in range(3):
                img[..., c] *= gain
    else:
        kind = _pick(rng, cfg.surfaces)
        imaging = draw_imaging(rng, **camera)
        img, surface = make_surface(kind, h, w, rng, imaging)

    avoid = keep_out(real, cfg.labeled_margin) if real is not None else None
    mask = np.zeros((h, w), dtype=np.uint8)
    drawn: list[tuple[int, np.ndarray, np.ndarray, dict]] = []
    skipped: list[str] = []
    if rng.random() >= cfg.empty_ratio:
        lo, hi = cfg.defects_per_image
        area_factor = math.sqrt(h * w) / REFERENCE_SIDE
        count = max(1, int(round(int(rng.integers(lo, hi + 1)) * max(1.0, area_factor)))) if hi > 0 else 0
        active = {k: v for k, v in cfg.defects.items() if v > 0}
        for _ in range(count):
            kind = _pick(rng, active)
            class_id = classes.index(kind)
            placed = place_defect(kind, img, rng, scale, avoid)  # the footprint as pixel lists
            if placed is None:  # no place away from the labeled defects
                skipped.append(kind)
                continue
            ys, xs, params = placed
            mask[ys, xs] = class_id  # a later defect covers an earlier one where they overlap
            drawn.append((class_id, ys, xs, params))

    if imaging is not None:
        image = imaging.finish(img, rng)
    else:  # pixels no defect touched are whole numbers: they come back unchanged
        image = np.floor(img + np.float32(0.5)).clip(0, 255).astype(np.uint8)
    defects = []
    if real is not None:
        # Real labels everywhere they are set; the synthetic ones lie outside them by construction (`avoid`),
        # so this only guards the promise that no real label is relabeled.
        np.copyto(mask, real, where=real > 0)
        defects = real_defects(real, classes)

    for class_id, ys, xs, params in drawn:
        visible = mask[ys, xs] == class_id
        area = int(np.count_nonzero(visible))
        if area == 0:  # fully covered by a later defect: the label shows nothing of it
            continue
        vy, vx = ys[visible], xs[visible]
        defects.append({
            "class": classes[class_id],
            "class_id": class_id,
            "bbox": [int(vx.min()), int(vy.min()), int(vx.max()) + 1, int(vy.max()) + 1],
            "area_px": area,
            "params": params,
        })
    meta = {
        "source": cfg.backend,
        "seed": [cfg.seed, index],
        "index": index,
        "size": [h, w],
        "surface": surface,
        "imaging": imaging.meta() if imaging is not None else None,
        "defects": defects,
    }
    if real is not None:
        meta["skipped_defects"] = skipped
    return image, mask, meta
