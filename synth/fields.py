"""Smooth random fields and pointwise shaping, for surfaces and defects.

Sized for a few milliseconds per 512x512 image: smooth fields (features >= 4 px) come from a small resize
pyramid sampled on a lattice of every k-th pixel and interpolated bilinearly, never resized at full resolution
(`smooth_lattice`; the surface's RGB pass in synth/kernels.py interpolates the lattice as it goes);
`fractal_noise` gives a field at full resolution, `fractal_1d` a profile along a line.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from . import kernels

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def clip(a, lo, hi, out=None):
    """np.clip(a, lo, hi, out=out); on small arrays without np.clip's Python-level dispatch (a few microseconds
    a call, which adds up over the hundreds of small arrays a defect goes through)."""
    if np.size(a) > 4096:
        return np.clip(a, lo, hi, out=out)
    out = np.maximum(a, lo, out=out)
    return np.minimum(out, hi, out=out)


def resize(arr: np.ndarray, height: int, width: int, method: str = "bicubic") -> np.ndarray:
    """Resize a 2-D float array with PIL's mode "F" (fast C path); returns a writable float32 array."""
    if arr.shape == (height, width):
        return np.array(arr, dtype=np.float32)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
    return np.array(img.resize((width, height), _RESAMPLE[method]), dtype=np.float32)


def _pyramid(height: int, width: int, rng: np.random.Generator, coarse: float, fine: float, persistence: float):
    """Random grid of a fractal's octaves from `coarse` down to about `fine` px: (grid, last cell, amp, pixel).

    The grid holds the running sum at the last cell size, with a margin of one cell before the image and two
    after it (the image's pixel (y, x) centre is at grid coordinate 1 + (y + 0.5) / cell). `pixel` says a
    last, pixel-sized octave of amplitude `amp` is still to be added as white noise at full resolution.
    """
    fine = max(float(fine), 1.0)
    coarse = max(float(coarse), fine)
    levels = max(1, int(math.floor(math.log2(coarse / fine))) + 1)
    pixel = levels > 1 and coarse / 2 ** (levels - 1) < 2.0
    if pixel:
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
    return acc, cell, amp * persistence, pixel


def normalise(out: np.ndarray, sample: np.ndarray) -> np.ndarray:
    out -= np.float32(sample.mean())
    out *= np.float32(1.0 / max(float(sample.std()), 1e-6))
    return out


def _row_step(cell: float) -> int:
    """Row spacing at which a bicubic field of `cell`-px features can be interpolated linearly (1 = never)."""
    k = 1
    while k < 8 and 2 * k <= cell / 2.0:
        k *= 2
    return k


def smooth_lattice(height: int, width: int, rng: np.random.Generator, coarse: float, fine: float,
                   persistence: float = 0.55) -> tuple[np.ndarray, int]:
    """A smooth fractal (features from `coarse` down to `fine` >= 4 px) on a lattice of every k-th pixel: (lat, k).

    `lat[i, j]` is pixel (i * k, j * k) (lat has (height - 1) // k + 2 rows and (width - 1) // k + 2 columns),
    zero-mean and unit-std like `fractal_noise`. Anything else smooth can be added to it on the lattice
    (`lattice_coords`) before `expand_lattice` or a kernel of synth/kernels.py interpolates it bilinearly to
    every pixel; k is at most 8 and at most a quarter of the finest feature size.
    """
    acc, cell, _, _ = _pyramid(height, width, rng, coarse, max(float(fine), 1.0), persistence)
    k = _row_step(cell)
    hk = (height - 1) // k + 2
    wk = (width - 1) // k + 2
    # Bicubic from the grid to the lattice (tiny); the image pixels in between are bilinear.
    m = 1.0 / cell
    o = 1.0 + 0.5 * m - 0.5 * k * m  # source coordinate of pixel 0's centre, minus half a lattice step
    box = (o, o, o + wk * k * m, o + hk * k * m)
    lattice = np.array(Image.fromarray(acc).resize((wk, hk), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    return normalise(lattice, lattice), k


def lattice_coords(height: int, width: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates normalised to about [-1, 1] on the longer side (centred) at the lattice points of
    `smooth_lattice`: a column vector for the rows (every k-th) and a row vector for the columns (every k-th)."""
    s = 2.0 / max(height, width)
    hk = (height - 1) // k + 2
    wk = (width - 1) // k + 2
    y = ((np.arange(hk, dtype=np.float32) * k - (height - 1) / 2.0) * s)[:, None]
    x = ((np.arange(wk, dtype=np.float32) * k - (width - 1) / 2.0) * s)[None, :]
    return y, x


def check_lattice(lattice: np.ndarray, k: int, height: int, width: int) -> None:
    """Raise unless `lattice` has the shape `smooth_lattice` gives a (height, width) image at step k (k == 0:
    no lattice); the compiled kernels that read it do not check their indices."""
    if k > 0 and lattice.shape != ((height - 1) // k + 2, (width - 1) // k + 2):
        raise ValueError(f"lattice of shape {lattice.shape} does not sample a {height}x{width} image every {k} px; "
                         f"expected {((height - 1) // k + 2, (width - 1) // k + 2)}")


def expand_lattice(lattice: np.ndarray, k: int, height: int, width: int) -> np.ndarray:
    """The (height, width) float32 field that `lattice` (every k-th pixel) samples, interpolated bilinearly."""
    check_lattice(lattice, k, height, width)
    out = np.empty((height, width), dtype=np.float32)
    kernels.expand_lattice(np.ascontiguousarray(lattice, dtype=np.float32), k, out)
    return out


def upsample(field: np.ndarray, step: float, height: int, width: int) -> np.ndarray:
    """Bilinear interpolation of samples taken every `step` px (field[i, j] is pixel (i * step, j * step))."""
    if step == 1:
        return np.ascontiguousarray(field[:height, :width])
    m = 1.0 / step
    box = (0.5 - 0.5 * m, 0.5 - 0.5 * m, 0.5 - 0.5 * m + width * m, 0.5 - 0.5 * m + height * m)
    img = Image.fromarray(np.ascontiguousarray(field, dtype=np.float32))
    return np.array(img.resize((width, height), Image.Resampling.BILINEAR, box=box), dtype=np.float32)


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
    directly at full resolution instead of being resized. A smooth field (finest octave >= 4 px) is
    resized only to a lattice of every few pixels and interpolated in between (see `smooth_lattice`).
    """
    fine = max(float(fine), 1.0)
    if fine >= 4.0 and height > 16:
        return expand_lattice(*smooth_lattice(height, width, rng, coarse, fine, persistence), height, width)
    acc, cell, amp, pixel = _pyramid(height, width, rng, coarse, fine, persistence)
    # Crop a one-cell margin so the grid edge (where bicubic clamps) stays outside the image.
    m = 1.0 / cell
    box = (1.0, 1.0, 1.0 + width * m, 1.0 + height * m)
    out = np.array(Image.fromarray(acc).resize((width, height), Image.Resampling.BICUBIC, box=box), dtype=np.float32)
    if pixel:
        out += (rng.random((height, width), dtype=np.float32) - 0.5) * np.float32(amp)
    return normalise(out, out[:: max(1, height // 64), :: max(1, width // 64)])


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
    """Cubic step from 0 at `lo` to 1 at `hi` (a new array, of x's float type)."""
    dt = x.dtype.type if x.dtype.kind == "f" else np.float64
    t = np.subtract(x, dt(lo))
    t *= dt(1.0 / (hi - lo))
    clip(t, 0.0, 1.0, out=t)
    u = np.multiply(t, dt(-2.0))
    u += dt(3.0)
    t *= t
    t *= u
    return t
