"""Defect-free backgrounds: procedural surfaces, crops of real photos, and camera/lighting effects.

Texture sizes are in pixels scaled by `grain = sqrt(max(1, min(H, W) / 512))`: a 4K image of the same
material shows finer texture relative to the frame (more grains) but each grain still spans a few pixels,
as it would with a higher-resolution camera.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synth import kernels
from synth.fields import check_lattice, expand_lattice, fractal_1d, lattice_coords, smooth_lattice, smoothstep
from synth.noise_banks import add_noise_to_uint8, bank_side, sensor_noise, texture, texture_linear

SURFACE_KINDS: tuple[str, ...] = ("concrete", "asphalt", "metal", "ceramic", "painted", "woven")

# Texture scales drawn from a continuous range are snapped to these (times the grain factor), so that the
# fine textures can come from a few fixed noise banks (synth/noise_banks.py); the snapped value is reported.
_STONE_SIZES = (5.0, 5.9, 7.1, 8.4, 10.0)
_PEEL_SIZES = (5.0, 6.0, 7.2, 8.6, 10.2, 12.0)
_STREAK_LENGTHS = (40.0, 56.0, 80.0, 113.0, 160.0)


def _r(x: float) -> float:
    return round(float(x), 4)


def _snap(value: float, levels: tuple[float, ...]) -> float:
    return min(levels, key=lambda v: abs(math.log(v / value)))


def _tint(rng: np.random.Generator, spread: float) -> np.ndarray:
    t = 1.0 + rng.uniform(-spread, spread, 3)
    return t / t.mean()


def _smooth(h: int, w: int, rng: np.random.Generator, coarse: float, fine: float, persistence: float,
            amount: float, extra=None) -> tuple[np.ndarray, int]:
    """1 + amount * (smooth fractal) [+ extra(y, x)] on a lattice of every k-th pixel: (lattice, k) (see
    `smooth_lattice`)."""
    lattice, k = smooth_lattice(h, w, rng, coarse, max(fine, 4.0), persistence)
    lattice *= np.float32(amount)
    lattice += np.float32(1.0)
    if extra is not None:
        lattice += extra(*lattice_coords(h, w, k))
    return lattice, k


# Each maker returns (detail, low, color, params): the surface's luminance is detail * low, where `detail`
# (H, W) holds the fine texture around 1 and `low` is a smooth field around 1 given on a lattice of every
# k-th pixel as (lattice, k), or None. The lighting gain is smooth too: it is multiplied into the lattice, and
# the surface's one compiled RGB pass (synth/kernels.py) interpolates the product as it goes.


def _concrete(h: int, w: int, rng: np.random.Generator, g: float):
    base = rng.uniform(105.0, 175.0)
    color = base * _tint(rng, 0.015) * np.array([1.01, 1.0, 0.98])
    mottle = rng.uniform(0.04, 0.09)
    speck = rng.uniform(0.10, 0.22)
    pores = rng.uniform(0.25, 0.55)
    low = _smooth(h, w, rng, min(h, w) * rng.uniform(0.25, 0.6), 8.0, 0.6, mottle)
    grains = texture(h, w, rng, "fractal", 6.0 * g, g, 0.5)
    z = grains.z
    lum = grains.lookup(1.0 + speck * smoothstep(z, 1.4, 2.1) - 0.8 * speck * smoothstep(-z, 1.5, 2.2))
    pore = texture(h, w, rng, "fractal", 3.0 * g, g, 0.4)
    pore.lookup(-pores * smoothstep(pore.z, 2.3, 2.8), out=lum, mode=kernels.ADD)
    return lum, low, color, {
        "base": _r(base), "color": [_r(c) for c in color], "mottle": _r(mottle), "speckle": _r(speck),
        "pores": _r(pores),
    }  # fmt: skip


def _asphalt(h: int, w: int, rng: np.random.Generator, g: float):
    base = rng.uniform(42.0, 80.0)
    color = base * _tint(rng, 0.03)
    stone_size = _snap(rng.uniform(5.0, 10.0), _STONE_SIZES) * g
    stone_cover = rng.uniform(0.7, 1.1)  # threshold on unit-std noise: lower = more stones
    stone_gain = rng.uniform(0.5, 1.1)
    low = _smooth(h, w, rng, min(h, w) * 0.4, 16.0 * g, 0.6, 0.06)
    stones = texture(h, w, rng, "fractal", stone_size, g, 0.45)
    z = stones.z
    # Stones (bright) and the tar-filled voids between them, both shaded by a field coarser than a stone so
    # that each one is roughly uniform.
    lum = stones.lookup(stone_gain * smoothstep(z, stone_cover, stone_cover + 0.35) - 0.25 * smoothstep(-z, 0.8, 1.6))
    texture_linear(h, w, rng, "fractal", stone_size * 1.5, stone_size * 0.5, 0.5, scale=0.3, offset=0.7, out=lum,
                   mode=kernels.MUL)
    texture_linear(h, w, rng, "fractal", 2.0 * g, 1.0, 0.7, scale=0.16, offset=1.0, out=lum, mode=kernels.ADD)
    return lum, low, color, {
        "base": _r(base), "color": [_r(c) for c in color], "stone_size": _r(stone_size),
        "stone_cover": _r(stone_cover), "stone_gain": _r(stone_gain),
    }  # fmt: skip


def _streaks(h: int, w: int, rng: np.random.Generator, angle: float, across: float, along: float) -> np.ndarray:
    """Unit-ish noise stretched along `angle` (radians): cells of `across` x `along` px, via one affine warp."""
    diag = math.hypot(h, w)
    gh, gw = int(diag / across) + 4, int(diag / along) + 4
    grid = rng.random((gh, gw), dtype=np.float32) - 0.5
    ca, sa = math.cos(angle), math.sin(angle)
    cx, cy = w / 2.0, h / 2.0
    a, b = ca / along, sa / along
    d, e = -sa / across, ca / across
    data = (a, b, gw / 2.0 - a * cx - b * cy, d, e, gh / 2.0 - d * cx - e * cy)
    img = Image.fromarray(grid).transform((w, h), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) * np.float32(2.45)  # bilinear shrinks std to about 1/2.45


def _shift_rows(values: np.ndarray, shifts: np.ndarray, width: int) -> np.ndarray:
    """out[i, :] = values[i, shifts[i] : shifts[i] + width], linear between columns for fractional shifts.

    Rows with the same whole shift are done together, so a gentle shear costs a few dozen row-block slices.
    """
    s0 = np.floor(shifts).astype(np.int64)
    frac = (shifts - s0).astype(np.float32)[:, None]
    diff = values[:, 1:] - values[:, :-1]
    out = np.empty((values.shape[0], width), dtype=np.float32)
    edges = np.flatnonzero(np.diff(s0)) + 1
    for a, b in zip(np.concatenate([[0], edges]), np.concatenate([edges, [len(s0)]]), strict=True):
        s = int(s0[a])
        o = out[a:b]
        np.multiply(diff[a:b, s : s + width], frac[a:b], out=o)
        o += values[a:b, s : s + width]
    return out


def _brushed(h: int, w: int, rng: np.random.Generator, g: float, axis: float, length: float) -> np.ndarray | None:
    """1 + brushing streaks along `axis` degrees (near 0 or 90), from the streak bank (None: image too large).

    A streak at a small tilt from the axis is the bank's straight streaks with every line shifted in proportion
    to its position along the streak: rows shifted along x for vertical streaks, and the same on the
    transposed field for horizontal ones.
    """
    side = bank_side(h, w)
    vertical = abs(math.remainder(axis, 180.0)) > 45.0
    slope = math.tan(math.radians(math.remainder(axis - (90.0 if vertical else 0.0), 180.0)))
    if abs(slope) < 1e-4:  # straight: a window of the bank (streaks along x) or of the turned bank (along y)
        if side is None:
            return None
        return texture_linear(h, w, rng, "streak", length, 3.0 * g, offset=1.0, side=side, transpose=vertical)
    # Streak through (x0, 0) at axis 90 + d runs through (x0 - y tan d, y): field[y, x] = S[y, x + y tan d];
    # at axis d, field[y, x] = S[y - x tan d, x], i.e. the transposed field shifts along its rows by -x tan d.
    n, span = (h, w) if vertical else (w, h)
    shifts = np.arange(n, dtype=np.float64) * (slope if vertical else -slope)
    pad = int(math.ceil(max(0.0, -shifts.min()))) + 1
    need = span + int(math.ceil(shifts.max())) + pad + 2
    if side is None or max(n, need) > side:
        return None
    values = texture_linear(n, need, rng, "streak", length, 3.0 * g, offset=1.0, side=side, transpose=True)
    field = _shift_rows(values, shifts + pad, span)
    return field if vertical else np.ascontiguousarray(field.T)


def _metal(h: int, w: int, rng: np.random.Generator, g: float):
    base = rng.uniform(115.0, 195.0)
    blue = rng.uniform(0.0, 0.06)
    color = base * np.array([1.0 - blue, 1.0, 1.0 + blue * 0.8])
    axis = float(rng.choice([0.0, 90.0])) + (rng.normal(0.0, 4.0) if rng.random() < 0.4 else 0.0)
    ang = math.radians(axis)
    fine_len = _snap(rng.uniform(40.0, 160.0), _STREAK_LENGTHS) * g
    sheen = rng.uniform(0.05, 0.18)
    pos, width = rng.uniform(-0.6, 0.6), rng.uniform(0.15, 0.45)
    sa, ca = np.float32(math.sin(ang)), np.float32(math.cos(ang))

    def band(y, x):  # the sheen runs along the brushing direction, as a cylindrical highlight would
        across = y * ca - x * sa
        return np.float32(sheen) * np.exp(-(((across - np.float32(pos)) / np.float32(width)) ** 2))

    low = _smooth(h, w, rng, min(h, w) * 0.6, min(h, w) / 16.0, 0.55, 0.04, band)
    lum = _brushed(h, w, rng, g, axis, fine_len)
    if lum is None:  # large images: synthesise the streaks directly (no bank repetition)
        lum = 0.045 * _streaks(h, w, rng, ang, 1.0, fine_len)
        lum += 0.035 * _streaks(h, w, rng, ang, 3.0 * g, fine_len * 4.0)
        lum += np.float32(1.0)
    return lum, low, color, {
        "base": _r(base), "blue": _r(blue), "axis_deg": _r(axis), "streak_len": _r(fine_len), "sheen": _r(sheen),
        "sheen_pos": _r(pos), "sheen_width": _r(width),
    }  # fmt: skip


def _ceramic(h: int, w: int, rng: np.random.Generator, g: float):
    base = rng.uniform(55.0, 130.0)
    color = base * _tint(rng, 0.02)
    low = rng.uniform(0.03, 0.08)
    grain = rng.uniform(0.02, 0.045)
    glaze = rng.uniform(0.04, 0.15)
    gy, gx = rng.uniform(-0.7, 0.7, 2)
    spread = rng.uniform(0.3, 0.8)

    def pool(y, x):  # a glossy pool of glaze: a separable Gaussian
        inv = np.float32(1.0 / (spread * spread))
        return (np.float32(glaze) * np.exp(-((y - np.float32(gy)) ** 2) * inv)) * np.exp(
            -(((x - np.float32(gx)) * np.float32(0.6)) ** 2) * inv
        )

    low_lattice = _smooth(h, w, rng, min(h, w) * 0.7, min(h, w) / 24.0, 0.6, low, pool)
    lum = texture_linear(h, w, rng, "fractal", 2.0 * g, 1.0, 0.6, scale=grain, offset=1.0)
    return lum, low_lattice, color, {
        "base": _r(base), "low_freq": _r(low), "grain": _r(grain), "glaze": _r(glaze),
        "glaze_center": [_r(gx), _r(gy)], "glaze_spread": _r(spread),
    }  # fmt: skip


def _painted(h: int, w: int, rng: np.random.Generator, g: float):
    hue, sat, val = rng.random(), rng.uniform(0.15, 0.85), rng.uniform(0.3, 0.92)
    color = np.array(Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB"))
    color = color.reshape(3).astype(np.float64)
    peel = _snap(rng.uniform(5.0, 12.0), _PEEL_SIZES) * g
    depth = rng.uniform(0.03, 0.08)
    low = _smooth(h, w, rng, min(h, w) * 0.5, min(h, w) / 16.0, 0.55, 0.03)
    # Orange peel reads as shading of a bumpy film: a directional derivative of a height field.
    lum = texture_linear(h, w, rng, "slope", peel, peel / 4.0, 0.5, scale=2.0 * depth, offset=1.0)
    return lum, low, color, {
        "color": [_r(c) for c in color], "hue": _r(hue), "saturation": _r(sat), "value": _r(val),
        "peel_size": _r(peel), "peel_depth": _r(depth),
    }  # fmt: skip


_NO_LATTICE = np.ones((1, 1), dtype=np.float32)  # k == 0: no smooth field and no lighting
_PHASES = 64  # thread profile samples per period


@dataclass(frozen=True)
class _TwoColors:
    """The weave's colour: `first` (float32 RGB) where `top` is true, `second` elsewhere; `peak` their maximum."""

    top: np.ndarray
    first: np.ndarray
    second: np.ndarray

    @property
    def peak(self) -> float:
        return float(max(self.first.max(), self.second.max()))


_PROFILE = np.sqrt(np.sin(np.pi * (np.arange(_PHASES) + 0.5) / _PHASES))  # a thread across, at _PHASES points


def _thread_table(n: int, bright: np.ndarray, lo: int) -> np.ndarray:
    """A thread's across-profile (rounded, dark gaps), its brightness and the parity of its index (as the sign)
    in one float32 table over (thread index + lo, phase): one lookup per direction instead of trig per pixel."""
    thread = np.arange(-lo, n + lo)
    sign = np.where(thread % 2 == 0, 1.0, -1.0)
    return (_PROFILE[None, :] * (bright[thread % n] * sign)[:, None]).astype(np.float32).reshape(-1)


def _woven(h: int, w: int, rng: np.random.Generator, g: float):
    period = rng.uniform(6.0, 13.0) * g
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.7), rng.uniform(0.35, 0.9)
    warp_rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB"))
    warp_rgb = warp_rgb.reshape(3).astype(np.float32)
    weft_rgb = warp_rgb * _tint(rng, 0.08).astype(np.float32) * np.float32(rng.uniform(0.85, 1.1))
    wobble = rng.uniform(0.05, 0.2)
    # Threads wander slowly sideways; each thread also gets its own brightness.
    wy = fractal_1d(h, rng, coarse=period * 8, fine=period) * np.float32(wobble)
    wx = fractal_1d(w, rng, coarse=period * 8, fine=period) * np.float32(wobble)
    n_u, n_v = int(w / period) + 8, int(h / period) + 8
    bu = (1.0 + 0.08 * rng.standard_normal(n_u)).astype(np.float32)
    bv = (1.0 + 0.08 * rng.standard_normal(n_v)).astype(np.float32)
    lo = 4  # even offset so that u, v >= 0 (the wobble is a small fraction of a period)
    k = _PHASES
    xk = np.arange(w, dtype=np.float32) * np.float32(k / period)
    yk = np.arange(h, dtype=np.float32) * np.float32(k / period)
    lum = np.empty((h, w), dtype=np.float32)
    top = np.empty((h, w), dtype=np.bool_)  # same parity: the warp thread lies on top
    # Across a thread: rounded profile; along it: dips where it passes under the crossing thread.
    kernels.woven(xk, ((wy + lo) * k).astype(np.float32), yk, ((wx + lo) * k).astype(np.float32),
                  _thread_table(n_u, bu, lo), _thread_table(n_v, bv, lo), lum, top)
    texture_linear(h, w, rng, "fractal", 1.5 * g, 1.0, 0.6, scale=0.75 * 0.05, offset=0.75, out=lum, mode=kernels.MUL)
    lum += np.float32(0.3)
    color = _TwoColors(top, warp_rgb, weft_rgb)
    return lum, None, color, {
        "period": _r(period), "warp_color": [_r(c) for c in warp_rgb], "weft_color": [_r(c) for c in weft_rgb],
        "wobble": _r(wobble),
    }  # fmt: skip


_MAKERS = {
    "concrete": _concrete,
    "asphalt": _asphalt,
    "metal": _metal,
    "ceramic": _ceramic,
    "painted": _painted,
    "woven": _woven,
}


def make_surface(kind: str, height: int, width: int, rng: np.random.Generator,
                 imaging: Imaging | None = None) -> tuple[np.ndarray, dict]:
    """A procedural defect-free surface: float32 (H, W, 3) in [0, 255], and the parameters drawn.

    With `imaging`, its lighting gain (gradient and vignette) is applied to the surface before it is clipped.
    """
    if kind not in _MAKERS:
        raise ValueError(f"unknown surface kind '{kind}'; known kinds: {', '.join(SURFACE_KINDS)}")
    if height < 1 or width < 1:
        raise ValueError(f"surface size must be positive, got {height}x{width}")
    grain = math.sqrt(max(1.0, min(height, width) / 512.0))
    lum, low, color, params = _MAKERS[kind](height, width, rng, grain)
    lit = imaging is not None and imaging.lit
    lattice, k = _NO_LATTICE, 0
    if low is not None or lit:
        lattice, k = low if low is not None else (None, 8)
        if lit:
            gain = imaging.gain_lattice(height, width, k)
            lattice = gain if lattice is None else np.multiply(lattice, gain, out=lattice)
    peak = color.peak if isinstance(color, _TwoColors) else float(np.max(color))
    # Clip so that the brightest channel stays <= 255, which keeps the hue of overexposed pixels; the gain,
    # the clip and the colour are one compiled pass (synth/kernels.py).
    cap = np.float32(255.0 / max(peak, 1e-6))
    out = np.empty((height, width, 3), dtype=np.float32)
    lattice = np.ascontiguousarray(lattice, dtype=np.float32)
    lum = np.ascontiguousarray(lum, dtype=np.float32)
    check_lattice(lattice, k, height, width)
    if isinstance(color, _TwoColors):
        kernels.lit_rgb_two(lum, lattice, k, cap, color.top, color.first, color.second, out)
    else:
        kernels.lit_rgb_const(lum, lattice, k, cap, *(np.float32(c) for c in color), out)
    return out, {"kind": kind, **params}


def _load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"cannot read background image '{path}': {err}") from None
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if im.mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255.0:  # 16-bit data: map the full 16-bit range onto 8 bits
            arr = arr / 257.0
        im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, rgba)
    return im.convert("RGB")


def crop_window(iw: int, ih: int, height: int, width: int, rng: np.random.Generator
                ) -> tuple[tuple[int, int, int, int], float]:
    """A random box (x0, y0, x1, y1) of an iw x ih image that becomes a (height x width) crop, and the factor it
    is upscaled by (> 1 only when the image is smaller than the crop on a side; the aspect ratio is kept)."""
    scale = max(height / ih, width / iw, 1.0)
    cw = min(iw, max(1, round(width / scale)))
    ch = min(ih, max(1, round(height / scale)))
    x0 = int(rng.integers(0, iw - cw + 1))
    y0 = int(rng.integers(0, ih - ch + 1))
    return (x0, y0, x0 + cw, y0 + ch), scale


def crop_background(path: str | Path, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A random (height x width) crop of a real defect-free photo, upscaled keeping aspect if it is smaller."""
    path = Path(path)
    im = _load_rgb(path)
    iw, ih = im.size
    if iw < 1 or ih < 1:
        raise ValueError(f"background image '{path}' is empty")
    box, scale = crop_window(iw, ih, height, width, rng)
    crop = im.crop(box)
    if crop.size != (width, height):
        crop = crop.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(crop, dtype=np.float32).copy()
    return arr, {"kind": "photo", "file": path.name, "crop": list(box), "scale": _r(scale)}


@dataclass(frozen=True)
class Imaging:
    """The camera model of one image: lighting gradient, vignetting and sensor noise sigma."""

    gradient: float
    angle: float  # radians
    vignette: float
    center: tuple[float, float]
    sigma: float

    def meta(self) -> dict:
        return {
            "gradient": _r(self.gradient), "gradient_angle_deg": _r(math.degrees(self.angle)),
            "vignette": _r(self.vignette), "vignette_center": [_r(c) for c in self.center],
            "noise_sigma": _r(self.sigma),
        }  # fmt: skip

    @property
    def lit(self) -> bool:
        return self.gradient > 0 or self.vignette > 0

    def gain_lattice(self, height: int, width: int, k: int) -> np.ndarray:
        """The gain on a lattice of every k-th pixel (see `smooth_lattice`): a linear ramp across the frame in
        the drawn direction (mean brightness stays put) times a quadratic fall-off, both exact under bilinear
        interpolation between points a few px apart (the fall-off to well under 0.01 of a level)."""
        y, x = lattice_coords(height, width, k)
        gs = np.float32(self.gradient)
        gain = np.add(y * (gs * np.float32(math.sin(self.angle))), 1.0 + x * (gs * np.float32(math.cos(self.angle))))
        if self.vignette > 0:
            half = np.float32(self.vignette / 2.0)
            vx, vy = np.float32(self.center[0]), np.float32(self.center[1])
            gain *= np.subtract(1.0 - half * (x - vx) ** 2, half * (y - vy) ** 2)
        return gain

    def gain(self, height: int, width: int) -> np.ndarray | None:
        """(H, W) float32 gain of the gradient and vignette, or None when both are off."""
        return expand_lattice(self.gain_lattice(height, width, 8), 8, height, width) if self.lit else None

    def finish(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Add this camera's sensor noise to `img` (float32 (H, W, 3)) and quantise: uint8 (H, W, 3)."""
        return add_noise_to_uint8(img, self.sigma, rng)


def draw_imaging(rng: np.random.Generator, *, gradient: float, vignette: float, noise: tuple[float, float]) -> Imaging:
    # Always draw the scalars so the rng stream does not depend on which effects are enabled.
    g_strength = float(rng.uniform(0.0, gradient)) if gradient > 0 else 0.0
    g_angle = float(rng.uniform(0.0, 2.0 * math.pi))
    v_strength = float(rng.uniform(0.0, vignette)) if vignette > 0 else 0.0
    v_center = rng.uniform(-0.15, 0.15, 2)
    lo, hi = float(noise[0]), float(noise[1])
    sigma = float(rng.uniform(lo, hi)) if hi > lo else lo
    return Imaging(g_strength, g_angle, v_strength, (float(v_center[0]), float(v_center[1])), sigma)


def apply_imaging(
    img: np.ndarray, rng: np.random.Generator, *, gradient: float, vignette: float, noise: tuple[float, float]
) -> tuple[np.ndarray, dict]:
    """Lighting gradient, vignetting and Gaussian sensor noise; float32 (H, W, 3), not clipped."""
    h, w = img.shape[:2]
    imaging = draw_imaging(rng, gradient=gradient, vignette=vignette, noise=noise)
    out = np.array(img, dtype=np.float32)
    gain = imaging.gain(h, w)
    if gain is not None:
        out *= gain[..., None]
    if imaging.sigma > 0:
        out += sensor_noise(h, w, rng) * np.float32(imaging.sigma)
    return out, imaging.meta()
