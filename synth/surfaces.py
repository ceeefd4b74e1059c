"""Defect-free backgrounds: procedural surfaces, crops of real photos, and camera/lighting effects.

Texture sizes are in pixels scaled by `grain = sqrt(max(1, min(H, W) / 512))`: a 4K image of the same
material shows finer texture relative to the frame (more grains) but each grain still spans a few pixels,
as it would with a higher-resolution camera.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from synth.raster import fractal_1d, fractal_noise, gaussian_noise, smoothstep

SURFACE_KINDS: tuple[str, ...] = ("concrete", "asphalt", "metal", "ceramic", "painted", "woven")


def _r(x: float) -> float:
    return round(float(x), 4)


def _to_rgb(lum: np.ndarray, color: np.ndarray) -> np.ndarray:
    """(H, W) relative luminance times an RGB colour, clipped to [0, 255]."""
    out = np.empty((*lum.shape, 3), dtype=np.float32)
    for c in range(3):
        np.multiply(lum, np.float32(color[c]), out=out[..., c])
    np.clip(out, 0.0, 255.0, out=out)
    return out


def _tint(rng: np.random.Generator, spread: float) -> np.ndarray:
    t = 1.0 + rng.uniform(-spread, spread, 3)
    return t / t.mean()


def _coords(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates normalised to about [-1, 1] on the longer side, as broadcastable column/row."""
    s = 2.0 / max(height, width)
    y = ((np.arange(height, dtype=np.float32) - (height - 1) / 2.0) * s)[:, None]
    x = ((np.arange(width, dtype=np.float32) - (width - 1) / 2.0) * s)[None, :]
    return y, x


def _concrete(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    base = rng.uniform(105.0, 175.0)
    color = base * _tint(rng, 0.015) * np.array([1.01, 1.0, 0.98])
    mottle = rng.uniform(0.04, 0.09)
    speck = rng.uniform(0.10, 0.22)
    pores = rng.uniform(0.25, 0.55)
    lum = fractal_noise(h, w, rng, coarse=min(h, w) * rng.uniform(0.25, 0.6), fine=1.0, persistence=0.6)
    lum *= mottle
    grains = fractal_noise(h, w, rng, coarse=6.0 * g, fine=g, persistence=0.5)
    lum += speck * smoothstep(grains, 1.4, 2.1) - 0.8 * speck * smoothstep(-grains, 1.5, 2.2)
    pore = fractal_noise(h, w, rng, coarse=3.0 * g, fine=g, persistence=0.4)
    lum -= pores * smoothstep(pore, 2.3, 2.8)
    lum += 1.0
    return _to_rgb(lum, color), {
        "base": _r(base), "color": [_r(c) for c in color], "mottle": _r(mottle), "speckle": _r(speck),
        "pores": _r(pores),
    }  # fmt: skip


def _asphalt(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    base = rng.uniform(42.0, 80.0)
    color = base * _tint(rng, 0.03)
    stone_size = rng.uniform(5.0, 10.0) * g
    stone_cover = rng.uniform(0.7, 1.1)  # threshold on unit-std noise: lower = more stones
    stone_gain = rng.uniform(0.5, 1.1)
    lum = 1.0 + 0.06 * fractal_noise(h, w, rng, coarse=min(h, w) * 0.4, fine=4.0 * g, persistence=0.6)
    stones = fractal_noise(h, w, rng, coarse=stone_size, fine=g, persistence=0.45)
    shape = smoothstep(stones, stone_cover, stone_cover + 0.35)
    # Stones differ in brightness; this field is coarser than a stone so each one is roughly uniform.
    shade = fractal_noise(h, w, rng, coarse=stone_size * 1.5, fine=stone_size * 0.5, persistence=0.5)
    lum += shape * stone_gain * (0.7 + 0.3 * shade)
    lum -= 0.25 * smoothstep(-stones, 0.8, 1.6)  # tar-filled voids between aggregate
    lum += 0.16 * fractal_noise(h, w, rng, coarse=2.0 * g, fine=1.0, persistence=0.7)
    return _to_rgb(lum, color), {
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


def _metal(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    base = rng.uniform(115.0, 195.0)
    blue = rng.uniform(0.0, 0.06)
    color = base * np.array([1.0 - blue, 1.0, 1.0 + blue * 0.8])
    axis = float(rng.choice([0.0, 90.0])) + (rng.normal(0.0, 4.0) if rng.random() < 0.4 else 0.0)
    ang = math.radians(axis)
    fine_len = rng.uniform(40.0, 160.0) * g
    lum = 1.0 + 0.045 * _streaks(h, w, rng, ang, 1.0, fine_len)
    lum += 0.035 * _streaks(h, w, rng, ang, 3.0 * g, fine_len * 4.0)
    lum += 0.04 * fractal_noise(h, w, rng, coarse=min(h, w) * 0.6, fine=min(h, w) / 16.0)
    sheen = rng.uniform(0.05, 0.18)
    pos, width = rng.uniform(-0.6, 0.6), rng.uniform(0.15, 0.45)
    y, x = _coords(h, w)
    # The sheen band runs along the brushing direction, as a cylindrical highlight would.
    across = -x * math.sin(ang) + y * math.cos(ang)
    lum += sheen * np.exp(-(((across - pos) / width) ** 2))
    return _to_rgb(lum, color), {
        "base": _r(base), "blue": _r(blue), "axis_deg": _r(axis), "streak_len": _r(fine_len), "sheen": _r(sheen),
        "sheen_pos": _r(pos), "sheen_width": _r(width),
    }  # fmt: skip


def _ceramic(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    base = rng.uniform(55.0, 130.0)
    color = base * _tint(rng, 0.02)
    low = rng.uniform(0.03, 0.08)
    grain = rng.uniform(0.02, 0.045)
    glaze = rng.uniform(0.04, 0.15)
    lum = low * fractal_noise(h, w, rng, coarse=min(h, w) * 0.7, fine=min(h, w) / 24.0, persistence=0.6)
    lum += grain * fractal_noise(h, w, rng, coarse=2.0 * g, fine=1.0, persistence=0.6)
    y, x = _coords(h, w)
    gy, gx = rng.uniform(-0.7, 0.7, 2)
    spread = rng.uniform(0.3, 0.8)
    lum += glaze * np.exp(-((y - gy) ** 2 + ((x - gx) * 0.6) ** 2) / (spread * spread)) + 1.0
    return _to_rgb(lum, color), {
        "base": _r(base), "low_freq": _r(low), "grain": _r(grain), "glaze": _r(glaze),
        "glaze_center": [_r(gx), _r(gy)], "glaze_spread": _r(spread),
    }  # fmt: skip


def _painted(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    hue, sat, val = rng.random(), rng.uniform(0.15, 0.85), rng.uniform(0.3, 0.92)
    color = np.array(Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB"))
    color = color.reshape(3).astype(np.float64)
    peel = rng.uniform(5.0, 12.0) * g
    depth = rng.uniform(0.03, 0.08)
    height = fractal_noise(h, w, rng, coarse=peel, fine=peel / 4.0, persistence=0.5)
    # Orange peel reads as shading of a bumpy film: a directional derivative of the height field.
    lum = np.empty_like(height)
    lum[1:, 1:] = height[1:, 1:] - height[:-1, :-1]
    lum[0, :] = 0.0
    lum[:, 0] = 0.0
    lum *= depth * 2.0
    lum += 1.0 + 0.03 * fractal_noise(h, w, rng, coarse=min(h, w) * 0.5, fine=min(h, w) / 16.0)
    return _to_rgb(lum, color), {
        "color": [_r(c) for c in color], "hue": _r(hue), "saturation": _r(sat), "value": _r(val),
        "peel_size": _r(peel), "peel_depth": _r(depth),
    }  # fmt: skip


def _woven(h: int, w: int, rng: np.random.Generator, g: float) -> tuple[np.ndarray, dict]:
    period = rng.uniform(6.0, 13.0) * g
    hue, sat, val = rng.random(), rng.uniform(0.05, 0.7), rng.uniform(0.35, 0.9)
    warp_rgb = np.array(Image.new("HSV", (1, 1), (int(hue * 255), int(sat * 255), int(val * 255))).convert("RGB"))
    warp_rgb = warp_rgb.reshape(3).astype(np.float32)
    weft_rgb = warp_rgb * _tint(rng, 0.08).astype(np.float32) * np.float32(rng.uniform(0.85, 1.1))
    wobble = rng.uniform(0.05, 0.2)
    # Threads wander slowly sideways; each thread also gets its own brightness.
    wy = fractal_1d(h, rng, coarse=period * 8, fine=period) * np.float32(wobble)
    wx = fractal_1d(w, rng, coarse=period * 8, fine=period) * np.float32(wobble)
    u = np.arange(w, dtype=np.float32)[None, :] / np.float32(period) + wy[:, None]
    v = np.arange(h, dtype=np.float32)[:, None] / np.float32(period) + wx[None, :]
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    n_u, n_v = int(w / period) + 8, int(h / period) + 8
    bu = (1.0 + 0.08 * rng.standard_normal(n_u)).astype(np.float32)
    bv = (1.0 + 0.08 * rng.standard_normal(n_v)).astype(np.float32)
    iu_i = iu.astype(np.int64) % n_u
    iv_i = iv.astype(np.int64) % n_v
    warp_top = ((iu_i + iv_i) & 1) == 0
    su, sv = np.sin(np.pi * fu), np.sin(np.pi * fv)
    # Across a thread: rounded profile with dark gaps; along it: dips where it passes under the crossing thread.
    warp = np.sqrt(su) * (0.7 + 0.3 * sv) * bu[iu_i]
    weft = np.sqrt(sv) * (0.7 + 0.3 * su) * bv[iv_i]
    lum = np.where(warp_top, warp, weft)
    lum *= 1.0 + 0.05 * fractal_noise(h, w, rng, coarse=1.5 * g, fine=1.0, persistence=0.6)
    lum = 0.3 + 0.75 * lum
    out = np.empty((h, w, 3), dtype=np.float32)
    for c in range(3):
        np.multiply(lum, np.where(warp_top, warp_rgb[c], weft_rgb[c]), out=out[..., c])
    np.clip(out, 0.0, 255.0, out=out)
    return out, {
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


def make_surface(kind: str, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A procedural defect-free surface: float32 (H, W, 3) in [0, 255], and the parameters drawn."""
    if kind not in _MAKERS:
        raise ValueError(f"unknown surface kind '{kind}'; known kinds: {', '.join(SURFACE_KINDS)}")
    if height < 1 or width < 1:
        raise ValueError(f"surface size must be positive, got {height}x{width}")
    grain = math.sqrt(max(1.0, min(height, width) / 512.0))
    img, params = _MAKERS[kind](height, width, rng, grain)
    return img, {"kind": kind, **params}


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


def crop_background(path: str | Path, height: int, width: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A random (height x width) crop of a real defect-free photo, upscaled keeping aspect if it is smaller."""
    path = Path(path)
    im = _load_rgb(path)
    iw, ih = im.size
    if iw < 1 or ih < 1:
        raise ValueError(f"background image '{path}' is empty")
    scale = max(height / ih, width / iw, 1.0)
    cw = min(iw, max(1, round(width / scale)))
    ch = min(ih, max(1, round(height / scale)))
    x0 = int(rng.integers(0, iw - cw + 1))
    y0 = int(rng.integers(0, ih - ch + 1))
    box = (x0, y0, x0 + cw, y0 + ch)
    crop = im.crop(box)
    if crop.size != (width, height):
        crop = crop.resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(crop, dtype=np.float32).copy()
    return arr, {"kind": "photo", "file": path.name, "crop": list(box), "scale": _r(scale)}


def apply_imaging(
    img: np.ndarray, rng: np.random.Generator, *, gradient: float, vignette: float, noise: tuple[float, float]
) -> tuple[np.ndarray, dict]:
    """Lighting gradient, vignetting and Gaussian sensor noise; float32 (H, W, 3), not clipped."""
    h, w = img.shape[:2]
    # Always draw the scalars so the rng stream does not depend on which effects are enabled.
    g_strength = float(rng.uniform(0.0, gradient)) if gradient > 0 else 0.0
    g_angle = float(rng.uniform(0.0, 2.0 * math.pi))
    v_strength = float(rng.uniform(0.0, vignette)) if vignette > 0 else 0.0
    v_center = rng.uniform(-0.15, 0.15, 2)
    lo, hi = float(noise[0]), float(noise[1])
    sigma = float(rng.uniform(lo, hi)) if hi > lo else lo
    out = np.array(img, dtype=np.float32)
    if g_strength > 0 or v_strength > 0:
        y, x = _coords(h, w)
        gain = np.ones((h, w), dtype=np.float32)
        if g_strength > 0:
            # Linear ramp across the frame in the drawn direction; mean brightness stays put.
            gain += np.float32(g_strength) * (x * np.float32(math.cos(g_angle)) + y * np.float32(math.sin(g_angle)))
        if v_strength > 0:
            r2 = (x - np.float32(v_center[0])) ** 2 + (y - np.float32(v_center[1])) ** 2
            gain *= 1.0 - np.float32(v_strength) * r2 / np.float32(2.0)
        out *= gain[..., None]
    if sigma > 0:
        out += gaussian_noise(out.shape, rng) * np.float32(sigma)
    return out, {
        "gradient": _r(g_strength), "gradient_angle_deg": _r(math.degrees(g_angle)), "vignette": _r(v_strength),
        "vignette_center": [_r(c) for c in v_center], "noise_sigma": _r(sigma),
    }  # fmt: skip
