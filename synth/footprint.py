"""Rasterising a defect on its own pixels: the pixels near a stroke and their anti-aliased coverage,
roundish boundaries, the cut of opacity to an honest footprint, and the blend into the image.

A defect is drawn as a sparse list of pixels or on its local box, never on the whole image, so its cost grows
with its size, not with the image's.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .fields import clip


def radial_boundary(dx: np.ndarray, dy: np.ndarray, radius: float, amps: np.ndarray, phases: np.ndarray
                    ) -> np.ndarray:
    """Irregular roundish boundary r = radius * (1 + sum_k a_k cos(k theta + phi_k)), k = 2, 3, ..., at the
    angle of each offset (dx, dy): one arctan2 and a table lookup instead of the harmonics per pixel.

    The table holds the boundary at n angles (an inverse real FFT of the harmonics), with n such that
    neighbouring entries are under 0.2 px apart along the boundary.
    """
    n = 256
    while n < 4 * 2 * math.pi * radius * 1.6 and n < 1 << 16:
        n *= 2
    coef = np.zeros(n // 2 + 1, dtype=np.complex128)
    k = np.arange(2, 2 + len(amps))
    # entry j is the angle -pi + 2 pi j / n: the harmonics' phases shift by -k pi
    coef[k] = 0.5 * n * np.asarray(amps) * np.exp(1j * (np.asarray(phases) - k * math.pi))
    r = 1.0 + np.fft.irfft(coef, n)
    table = (radius * np.maximum(np.append(r, r[0]), 0.45)).astype(np.float32)
    ang = np.arctan2(dy, dx)
    ang *= np.float32(n / (2.0 * math.pi))
    ang += np.float32(n / 2.0 + 0.5)
    return np.take(table, ang.astype(np.uint16 if n < 1 << 16 else np.int64), mode="clip")


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


def stroke_pixels(points: np.ndarray, widths: np.ndarray, shape: tuple[int, int], starts=()):
    """Pixels near a polyline (xy vertices, about 1 px apart) with per-vertex widths.

    `starts` lists the vertex indices where a new path begins (no segment joins the paths). Returns
    (ys, xs, dist, seg, t): image pixels within max half-width + 1.5 px of the line, their exact distance to it,
    and the nearest point on it as segment index and fraction along that segment (None if nothing lands in
    the image). One compiled pass (`kernels.stroke_nearest`): every segment measures its distance to the
    pixels around it and keeps it where it is the nearest so far.
    """
    h, w = shape
    points = np.ascontiguousarray(points, dtype=np.float64)
    if len(points) < 2:
        return None
    reach = float(widths.max()) / 2.0 + 1.5
    valid = np.ones(len(points) - 1, dtype=np.bool_)
    valid[[s - 1 for s in starts if 0 < s < len(points)]] = False
    if not valid.any():
        return None
    used = np.zeros(len(points), dtype=bool)
    used[:-1] |= valid
    used[1:] |= valid
    lo = np.floor(points[used].min(axis=0) - reach)
    hi = np.ceil(points[used].max(axis=0) + reach)
    x0, y0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
    x1, y1 = min(int(hi[0]) + 1, w), min(int(hi[1]) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    ys, xs, seg, t, dist = kernels.stroke_nearest(points, valid, reach, y0, y1, x0, x1)
    if ys.size == 0:
        return None
    return ys, xs, dist, seg, t


def on_segment(values: np.ndarray, seg: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-vertex `values` interpolated at fraction t of segment seg (as returned by `stroke_pixels`)."""
    return values[seg] + t * (values[seg + 1] - values[seg])


def line_coverage(dist: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Anti-aliased opacity of a line of `width` px at distance `dist` from its centre (box filter).

    Lines thinner than 1 px fade in proportion to their width, so a 0.5 px tip never reaches opacity 0.5.
    """
    half = 0.5 * width
    return (clip(half + 0.5 - dist, 0.0, 1.0) * clip(width, 0.0, 1.0)).astype(np.float32)


_DISK_OFFSETS: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _disk_offsets(radius: int) -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) int64 of the offsets 0 < dy^2 + dx^2 <= radius^2."""
    if radius not in _DISK_OFFSETS:
        dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        keep = (dy * dy + dx * dx <= radius * radius) & ((dy != 0) | (dx != 0))
        _DISK_OFFSETS[radius] = (dy[keep].astype(np.int64), dx[keep].astype(np.int64))
    return _DISK_OFFSETS[radius]


def restrict_to_footprint(ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray, radius: float) -> np.ndarray:
    """Zero the opacity of pixels farther than `radius` px (Euclidean) from any pixel with opacity >= 0.5.

    This is what makes the footprint an honest mask: faint anti-aliasing and thin tips can only touch
    pixels next to the labelled region. Returns a new array.
    """
    out = np.array(alpha, dtype=np.float32)
    if radius <= 3:  # one compiled pass over the pixel list, testing the disk of offsets
        kernels.restrict_near(np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64), out,
                              *_disk_offsets(int(radius)))
        return out
    fp = out >= 0.5
    faint = ~fp & (out > 0)
    if not faint.any():
        return out
    pad = int(math.ceil(radius)) + 1
    y0, x0 = int(ys.min()) - pad, int(xs.min()) - pad
    canvas = np.zeros((int(ys.max()) - y0 + pad + 1, int(xs.max()) - x0 + pad + 1), dtype=bool)
    canvas[ys[fp] - y0, xs[fp] - x0] = True
    fy, fx = ys[faint] - y0, xs[faint] - x0
    # Chamfer (taxicab) distance never underestimates the Euclidean one, so this cut is conservative.
    dist = kernels.city_block(canvas)
    near = dist[fy, fx] <= radius
    out[np.flatnonzero(faint)[~near]] = 0.0
    return out


def restrict_dense(alpha: np.ndarray, radius: float) -> np.ndarray:
    """`restrict_to_footprint` for an opacity box that holds every pixel the defect touches (in place)."""
    fp = alpha >= 0.5
    faint = alpha > 0
    faint &= ~fp
    if not faint.any():
        return alpha
    if radius <= 3:
        pad = int(radius) + 1
        canvas = np.zeros((fp.shape[0] + 2 * pad, fp.shape[1] + 2 * pad), dtype=bool)
        canvas[pad:-pad, pad:-pad] = fp
        fy, fx = np.nonzero(faint)
        near = np.zeros(fy.size, dtype=bool)
        for dy, dx in zip(*_disk_offsets(int(radius)), strict=True):
            near |= canvas[fy + pad + dy, fx + pad + dx]
        alpha[fy[~near], fx[~near]] = 0.0
        return alpha
    # Chamfer (taxicab) distance never underestimates the Euclidean one, so this cut is conservative.
    dist = kernels.city_block(fp)
    faint &= dist > radius
    alpha[faint] = 0.0
    return alpha


def blend(img: np.ndarray, ys: np.ndarray, xs: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> None:
    """img[ys, xs] <- lerp(img, clip(target, 0, 255), alpha), in place (one compiled pass); pixels with
    alpha == 0 stay bit-identical. A blend of in-range colours stays in range."""
    kernels.blend_pixels(img, np.asarray(ys, dtype=np.int64), np.asarray(xs, dtype=np.int64),
                         np.asarray(alpha, dtype=np.float32), np.asarray(target, dtype=np.float32))
