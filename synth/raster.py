"""Shared rasterisation helpers for procedural surfaces and defects.

Everything here is vectorised: noise comes from upsampling small random grids (a resize pyramid, so a
fractal costs about one full-resolution resize), and defects are rasterised as sparse pixel lists on a
local bounding box, never on the whole image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.special import ndtri

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# Inverse-CDF table: 16-bit uniform integers -> Gaussian. About 3x cheaper than standard_normal for the
# multi-megapixel sensor-noise draws, and 65536 levels is far finer than the 8-bit output can resolve.
_GAUSS_TABLE = ndtri((np.arange(65536, dtype=np.float64) + 0.5) / 65536.0).astype(np.float32)


def gaussian_noise(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Standard-normal float32 noise of `shape` (table lookup; deterministic for the rng state)."""
    idx = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    return _GAUSS_TABLE[idx]


def resize(arr: np.ndarray, height: int, width: int, method: str = "bicubic") -> np.ndarray:
    """Resize a 2-D float array with PIL's mode "F" (fast C path); returns a writable float32 array."""
    if arr.shape == (height, width):
        return np.array(arr, dtype=np.float32)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.array(img.resize((width, height), _RESAMPLE[method]), dtype=np.float32)


def fractal_noise(
    height: int,
    width: int,
    rng: np.random.Generator,
    coarse: float,
    fine: float = 1.0,
    persistence: float = 0.55,
) -> np.ndarray:
    """Zero-mean, unit-std multi-octave noise with features from `coarse` down to `fine` pixels.

    Built as a pyramid: each octave upsamples the running sum by 2 and adds a new random grid, so only
    the last step touches the full resolution. A pixel-level octave (fine < 2) is added as white noise
    directly at full resolution instead of being resized.
    """
    fine = max(float(fine), 1.0)
    coarse = max(float(coarse), fine)
    levels = max(1, int(math.floor(math.log2(coarse / fine))) + 1)
    pixel_octave = levels > 1 and coarse / 2 ** (levels - 1) < 2.0
    if pixel_octave:
        levels -= 1
    cell = coarse
    acc = rng.random((math.ceil(height / cell) + 3, math.ceil(width / cell) + 3), dtype=np.float32) - 0.5
    amp = 1.0
    for _ in range(levels - 1):
        cell /= 2.0
        gh, gw = math.ceil(height / cell) + 3, math.ceil(width / cell) + 3
        acc = resize(acc, gh, gw)
        amp *= persistence
        acc += (rng.random((gh, gw), dtype=np.float32) - 0.5) * np.float32(amp)
    # Crop a one-cell margin so the grid edge (where bicubic clamps) stays outside the image.
    m = 1.0 / cell
    box = (1.0, 1.0, 1.0 + width * m, 1.0 + height * m)
    out = np.array(Image.fromarray(acc).resize((width, height), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    if pixel_octave:
        out += (rng.random((height, width), dtype=np.float32) - 0.5) * np.float32(amp * persistence)
    sub = out[:: max(1, height // 64), :: max(1, width // 64)]
    out -= sub.mean()
    out *= 1.0 / max(float(sub.std()), 1e-6)
    return out


def fractal_1d(
    n: int, rng: np.random.Generator, coarse: float, fine: float = 1.0, persistence: float = 0.5
) -> np.ndarray:
    """1-D zero-mean noise (length n) with features from `coarse` to `fine` samples, std about 1."""
    x = np.arange(n, dtype=np.float64)
    out = np.zeros(n, dtype=np.float64)
    cell, amp, total = max(coarse, fine, 1.0), 1.0, 0.0
    while True:
        knots = rng.standard_normal(int(n / cell) + 3)
        out += amp * np.interp(x / cell, np.arange(knots.size), knots)
        total += amp * amp
        cell /= 2.0
        amp *= persistence
        if cell < max(fine, 1.0):
            break
    return (out / math.sqrt(total)).astype(np.float32)


def smoothstep(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    t = np.clip((x - lo) * (1.0 / (hi - lo)), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def radial_boundary(
    cos_t: np.ndarray, sin_t: np.ndarray, radius: float, amps: np.ndarray, phases: np.ndarray
) -> np.ndarray:
    """Irregular roundish boundary r = radius * (1 + sum_k a_k cos(k theta + phi_k)), k = 2, 3, ...

    Takes cos/sin of the angle and builds cos(k theta), sin(k theta) by recurrence: no arctan2 or cos
    over the canvas.
    """
    r = np.ones_like(cos_t)
    ck, sk = cos_t, sin_t
    for a, p in zip(amps, phases, strict=True):
        ck, sk = ck * cos_t - sk * sin_t, sk * cos_t + ck * sin_t
        r += np.float32(a * math.cos(p)) * ck - np.float32(a * math.sin(p)) * sk
    return np.float32(radius) * np.maximum(r, np.float32(0.45))


def resample_polyline(points: np.ndarray, spacing: float, *attrs: np.ndarray):
    """Resample an (N, 2) xy polyline at `spacing` px along its length, interpolating per-vertex attrs.

    Returns (points, t, *attrs) where t in [0, 1] is the arc-length fraction.
    """
    seg = np.hypot(*np.diff(points, axis=0).T)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    total = max(float(s[-1]), 1e-6)
    q = np.linspace(0.0, total, max(2, int(total / spacing) + 2))
    pts = np.stack([np.interp(q, s, points[:, 0]), np.interp(q, s, points[:, 1])], axis=1)
    return (pts, q / total, *(np.interp(q, s, a) for a in attrs))


def stroke_pixels(points: np.ndarray, widths: np.ndarray, shape: tuple[int, int]):
    """Pixels near a densely sampled polyline (xy, px) with per-point widths.

    Returns (ys, xs, dist, nearest): image pixel coordinates within max half-width + 1.5 px of the line, their
    distance to the nearest sample point and that point's index (None if nothing lands in the image).
    """
    h, w = shape
    reach = float(widths.max()) / 2.0 + 1.5
    r = int(math.ceil(reach))
    # Candidate pixels: a square of offsets around every ~1 px sample, deduplicated on a bbox canvas.
    step = max(1, int(round(1.0 / max(np.median(np.hypot(*np.diff(points, axis=0).T)), 1e-3))))
    centres = np.rint(points[::step]).astype(np.int64)
    x0 = max(int(centres[:, 0].min()) - r, 0)
    y0 = max(int(centres[:, 1].min()) - r, 0)
    x1 = min(int(centres[:, 0].max()) + r + 1, w)
    y1 = min(int(centres[:, 1].max()) + r + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    canvas = np.zeros((y1 - y0 + 2 * r, x1 - x0 + 2 * r), dtype=bool)
    cx = centres[:, 0] - x0 + r
    cy = centres[:, 1] - y0 + r
    for dy in range(-r, r + 1):
        yy = cy + dy
        for dx in range(-r, r + 1):
            xx = cx + dx
            ok = (yy >= 0) & (xx >= 0) & (yy < canvas.shape[0]) & (xx < canvas.shape[1])
            canvas[yy[ok], xx[ok]] = True
    inner = canvas[r : r + y1 - y0, r : r + x1 - x0]
    ys, xs = np.nonzero(inner)
    if ys.size == 0:
        return None
    ys = ys + y0
    xs = xs + x0
    tree = cKDTree(points)
    dist, nearest = tree.query(np.stack([xs, ys], axis=1).astype(np.float64), k=1, distance_upper_bound=reach)
    ok = np.isfinite(dist)
    return ys[ok], xs[ok], dist[ok].astype(np.float32), nearest[ok]


def line_coverage(dist: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Anti-aliased opacity of a line of `width` px at distance `dist` from its centre (box filter).

    Lines thinner than 1 px fade in proportion to their width, so a 0.5 px tip never reaches opacity 0.5.
    """
    half = 0.5 * width
    return (np.clip(half + 0.5 - dist, 0.0, 1.0) * np.clip(width, 0.0, 1.0)).astype(np.float32)


_DISK_OFFSETS: dict[int, list[tuple[int, int]]] = {}


def _disk_offsets(radius: int) -> list[tuple[int, int]]:
    if radius not in _DISK_OFFSETS:
        _DISK_OFFSETS[radius] = [
            (dy, dx)
            for dy in range(-radius, radius + 1)
            for dx in range(-radius, radius + 1)
            if 0 < dy * dy + dx * dx <= radius * radius
        ]
    return _DISK_OFFSETS[radius]


def restrict_to_footprint(ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray, radius: float) -> np.ndarray:
    """Zero the opacity of pixels farther than `radius` px (Euclidean) from any pixel with opacity >= 0.5.

    This is what makes the footprint an honest mask: faint anti-aliasing and thin tips can only touch
    pixels next to the labelled region.
    """
    fp = alpha >= 0.5
    faint = ~fp & (alpha > 0)
    if not faint.any():
        return alpha
    pad = int(math.ceil(radius)) + 1
    y0, x0 = int(ys.min()) - pad, int(xs.min()) - pad
    canvas = np.zeros((int(ys.max()) - y0 + pad + 1, int(xs.max()) - x0 + pad + 1), dtype=bool)
    canvas[ys[fp] - y0, xs[fp] - x0] = True
    fy, fx = ys[faint] - y0, xs[faint] - x0
    if radius <= 3:
        near = np.zeros(fy.size, dtype=bool)
        for dy, dx in _disk_offsets(int(radius)):
            near |= canvas[fy + dy, fx + dx]
    else:
        # Chamfer (taxicab) distance never underestimates the Euclidean one, so this cut is conservative.
        dist = ndimage.distance_transform_cdt(~canvas, metric="taxicab")
        near = dist[fy, fx] <= radius
    out = alpha.copy()
    out[np.flatnonzero(faint)[~near]] = 0.0
    return out


def blend(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> None:
    """img[ys, xs] <- lerp(img, target, alpha), in place; pixels with alpha == 0 stay bit-identical."""
    live = alpha > 0
    ys, xs, a = ys[live], xs[live], alpha[live, None]
    cur = img[ys, xs]
    img[ys, xs] = cur + a * (target[live] - cur)
