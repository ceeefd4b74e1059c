"""Procedural defects drawn into a surface, each returning its pixel-exact footprint.

Every defect is an opacity field `alpha` over a sparse list of pixels in a local bounding box plus a
target colour per pixel; the image becomes lerp(img, target, alpha). The footprint is alpha >= 0.5, and
opacity farther than 2 px from it is cut (8 * max(1, scale) px for the soft-edged stain), so the mask is
honest about every pixel the defect changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from synth import kernels
from synth.fields import clip, fractal_1d, fractal_noise, smoothstep, upsample
from synth.footprint import (
    blend,
    line_coverage,
    on_segment,
    radial_boundary,
    resample_polyline,
    restrict_dense,
    restrict_to_footprint,
    stroke_pixels,
)
from synth.noise_banks import texture_linear

DEFECT_KINDS: tuple[str, ...] = ("crack", "scratch", "pit", "stain", "chip")


@dataclass
class Dense:
    """A defect drawn on a box of the image: opacity (bh, bw) at (y0, x0), and `apply(window, alpha)`, which
    blends the defect into that window of the image in place (leaving pixels with alpha == 0 bit-identical)."""

    y0: int
    x0: int
    alpha: np.ndarray
    apply: Callable[[np.ndarray, np.ndarray], None]


_MAX_TRIES = 25


def _r(x: float) -> float:
    return round(float(x), 4)


def _walk(start: np.ndarray, heading: float, length: float, step: float, rng: np.random.Generator, wander: float):
    """Jagged random-walk polyline: a slowly drifting heading plus per-step zigzag."""
    n = max(3, int(length / step))
    drift = heading + np.cumsum(rng.normal(0.0, wander, n))
    angles = drift + rng.normal(0.0, 0.45, n)
    steps = step * rng.uniform(0.6, 1.4, n)
    d = np.stack([np.cos(angles) * steps, np.sin(angles) * steps], axis=1)
    return np.concatenate([start[None, :], start + np.cumsum(d, axis=0)]), drift


def _crack(img: np.ndarray, rng: np.random.Generator, scale: float):
    h, w = img.shape[:2]
    m = min(h, w)
    length = rng.uniform(0.25, 0.8) * m
    start = rng.uniform([0.1 * w, 0.1 * h], [0.9 * w, 0.9 * h])
    heading = rng.uniform(0.0, 2.0 * math.pi)
    step = max(1.5, 3.0 * math.sqrt(max(scale, 0.25)))
    w_max = rng.uniform(1.6, 5.0) * max(1.0, scale) ** 0.3
    depth = rng.uniform(0.55, 0.95)
    main, drift = _walk(start, heading, length, step, rng, 0.09)
    n = len(main)
    t = np.linspace(0.0, 1.0, n)
    mod = 1.0 + 0.3 * fractal_1d(n, rng, coarse=n / 4, fine=4) + 0.2 * fractal_1d(n, rng, coarse=3, fine=1)
    mod = clip(mod, 0.35, 1.8)
    # Thickest mid-path, tapering to half a pixel at both tips.
    widths = [0.5 + (w_max - 0.5) * np.sin(np.pi * t) ** 0.6 * mod]
    paths = [main]
    n_branch = int(rng.integers(0, 4))
    branches = []
    for _ in range(n_branch):
        k = int(rng.integers(int(0.2 * n), max(int(0.2 * n) + 1, int(0.8 * n))))
        b_len = rng.uniform(0.15, 0.5) * length
        b_head = float(drift[min(k, n - 1)]) + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 1.0)
        pts, _ = _walk(main[k], b_head, b_len, step, rng, 0.08)
        tb = np.linspace(0.0, 1.0, len(pts))
        w0 = float(widths[0][k]) * rng.uniform(0.5, 0.85)
        widths.append(0.5 + max(w0 - 0.5, 0.0) * (1.0 - tb) ** 0.8)
        paths.append(pts)
        branches.append({"length": _r(b_len), "width": _r(w0), "angle": _r(b_head)})
    samples, wsamp, dsamp, starts = [], [], [], []
    for pts, wd in zip(paths, widths, strict=True):
        dmod = clip(1.0 + 0.15 * fractal_1d(len(pts), rng, coarse=len(pts) / 3, fine=2), 0.6, 1.2)
        p, _, ws, ds = resample_polyline(pts, _SPACING, wd, dmod)
        starts.append(sum(len(s) for s in samples))
        samples.append(p)
        wsamp.append(ws)
        dsamp.append(ds)
    pts, ws, ds = np.concatenate(samples), np.concatenate(wsamp), np.concatenate(dsamp)
    stroke = _stroke(pts, ws, h, w, starts)
    if stroke is None:
        return None
    ys, xs, dist, near, wid, alpha = stroke
    core = clip(1.0 - dist / np.maximum(0.5 * wid, 0.5), 0.0, 1.0)
    dark = clip(depth * on_segment(ds, *near) * (0.6 + 0.4 * core), 0.0, 0.97).astype(np.float32)
    target = img[ys, xs] * (1.0 - dark)[:, None]
    params = {
        "length": _r(length), "max_width": _r(w_max), "depth": _r(depth), "start": [_r(v) for v in start],
        "heading": _r(heading), "branches": branches,
    }  # fmt: skip
    return ys, xs, alpha, target, params, 2.0


def _bezier(p: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def _scratch(img: np.ndarray, rng: np.random.Generator, scale: float):
    h, w = img.shape[:2]
    m = min(h, w)
    length = rng.uniform(0.3, 1.0) * m
    start = rng.uniform([0.05 * w, 0.05 * h], [0.95 * w, 0.95 * h])
    heading = rng.uniform(0.0, 2.0 * math.pi)
    shape = "arc" if rng.random() < 0.5 else "bezier"
    n = max(8, int(length / 2.0))
    if shape == "arc":
        bend = rng.uniform(-1.0, 1.0)  # total turn in radians; radius = length / |bend|
        ang = heading + bend * np.linspace(0.0, 1.0, n)
        d = np.stack([np.cos(ang), np.sin(ang)], axis=1) * (length / n)
        pts = np.concatenate([start[None, :], start + np.cumsum(d, axis=0)])
    else:
        along = np.array([math.cos(heading), math.sin(heading)])
        perp = np.array([-along[1], along[0]])
        ctrl = np.stack([start + along * length * f + perp * length * rng.normal(0.0, 0.12) for f in (0, 1 / 3, 2 / 3)])
        ctrl = np.concatenate([ctrl, (start + along * length)[None, :]])
        pts = _bezier(ctrl, n + 1)
    width = rng.uniform(1.0, 2.6) * max(1.0, scale) ** 0.15
    polarity = "bright" if rng.random() < 0.55 else "dark"
    strength = rng.uniform(0.35, 0.8)
    k = len(pts)
    t = np.linspace(0.0, 1.0, k)
    ends = clip(np.minimum(t, 1.0 - t) / 0.06, 0.0, 1.0)
    wk = np.maximum(width * (0.75 + 0.25 * clip(fractal_1d(k, rng, coarse=k / 3, fine=2), -1, 1)), 1.0)
    wk = 0.5 + (wk - 0.5) * ends
    inten = clip(0.6 + 0.4 * fractal_1d(k, rng, coarse=k / 5, fine=1), 0.2, 1.0) * (0.4 + 0.6 * ends)
    p, _, ws, iv = resample_polyline(pts, _SPACING, wk, inten)
    stroke = _stroke(p, ws, h, w)
    if stroke is None:
        return None
    ys, xs, dist, near, wid, alpha = stroke
    core = clip(1.2 - dist / np.maximum(0.5 * wid, 0.5), 0.5, 1.0)
    amount = (strength * on_segment(iv, *near) * core).astype(np.float32)[:, None]
    cur = img[ys, xs]
    target = cur + (255.0 - cur) * amount if polarity == "bright" else cur * (1.0 - amount)
    params = {
        "shape": shape, "length": _r(length), "width": _r(width), "polarity": polarity, "strength": _r(strength),
        "start": [_r(v) for v in start], "heading": _r(heading),
    }  # fmt: skip
    if shape == "arc":
        params["bend"] = _r(bend)
    return ys, xs, alpha, target, params, 2.0


_SPACING = 1.0  # px between the vertices of a stroke's polyline (distances are to its segments, so exact)


def _stroke(pts: np.ndarray, widths: np.ndarray, h: int, w: int, starts=()):
    """Pixels of a polyline stroke and their anti-aliased coverage, or None when it covers no pixel by half.

    Returns (ys, xs, dist, near, wid, alpha) with near = (segment, fraction) for `on_segment`.
    """
    hit = stroke_pixels(pts, widths, (h, w), starts)
    if hit is None:
        return None
    ys, xs, dist, seg, t = hit
    near = (seg, t)
    wid = on_segment(widths, seg, t)
    alpha = line_coverage(dist, wid)
    if not (alpha >= 0.5).any():
        return None
    return ys, xs, dist, near, wid, alpha


def _window(cx: float, cy: float, rx: float, ry: float, h: int, w: int):
    """Pixel box cx +- rx, cy +- ry clipped to the image: (y0, y1, x0, x1, dy column, dx row), None if outside.

    dy, dx are float32 pixel offsets from the centre (pixel index minus cx, cy), to broadcast over the box.
    """
    x0, x1 = max(int(cx - rx), 0), min(int(cx + rx) + 2, w)
    y0, y1 = max(int(cy - ry), 0), min(int(cy + ry) + 2, h)
    if x1 <= x0 or y1 <= y0:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) - np.float32(cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) - np.float32(cy))[:, None]
    return y0, y1, x0, x1, dy, dx


def _pit(img: np.ndarray, rng: np.random.Generator, scale: float):
    h, w = img.shape[:2]
    r_hi = max(3.5, 40.0 * scale)
    radius = math.exp(rng.uniform(math.log(3.0), math.log(r_hi)))
    radius = min(radius, 0.45 * min(h, w))
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    amps = rng.normal(0.0, 1.0, 6) * 0.1 / np.arange(2, 8) ** 0.8
    phases = rng.uniform(0.0, 2.0 * math.pi, 6)
    depth = rng.uniform(0.45, 0.85)
    light = rng.uniform(0.0, 2.0 * math.pi)
    rim_gain = rng.uniform(0.15, 0.45)
    slope = rng.uniform(0.5, 0.9)
    reach = radius * 1.6 + 3
    box = _window(cx, cy, reach, reach, h, w)
    if box is None:
        return None
    y0, y1, x0, x1, dy, dx = box
    dx, dy = np.broadcast_arrays(dx, dy)
    rho = np.hypot(dx, dy)
    bound = radial_boundary(dx, dy, radius, amps, phases)
    alpha = bound - rho
    alpha += np.float32(0.5)
    clip(alpha, 0.0, 1.0, out=alpha)
    live = alpha > 0
    if not (alpha >= 0.5).any():
        return None
    rough = None
    if radius > 6:
        # (the roughness scale snapped to half-octaves, so that it comes from a few noise banks)
        coarse = 2.0 ** (round(2.0 * math.log2(max(radius / 3.0, 2.0))) / 2.0)
        rough = texture_linear(y1 - y0, x1 - x0, rng, "fractal", coarse, 1.0, 0.55)[live]
    vi, ui = np.nonzero(live)
    alpha, rho, bound, dx, dy = alpha[vi, ui], rho[vi, ui], bound[vi, ui], dx[vi, ui], dy[vi, ui]
    ys, xs = vi + y0, ui + x0
    inv = 1.0 / bound
    u = rho * inv
    bowl = np.sqrt(clip(1.0 - u * u, 0.0, 1.0))
    # s > 0 on the wall nearest the light: that wall faces away from it and is in shadow, while the far
    # wall faces the light and can be brighter than the flat surface around the pit.
    s = (dx * np.float32(math.cos(light)) + dy * np.float32(math.sin(light))) * inv
    occlusion = 1.0 - np.float32(depth) * (0.25 + 0.75 * bowl)
    shade = clip(occlusion * (1.0 - np.float32(slope) * s * (0.4 + 0.6 * u)), 0.03, 1.6)
    rim = np.exp(-(((u - 0.88) * np.float32(1 / 0.12)) ** 2)) * clip(-s, 0.0, 1.0) * np.float32(rim_gain)
    if rough is not None:
        shade *= 1.0 + 0.12 * rough
    cur = img[ys, xs]
    target = cur * shade[:, None]
    target += (255.0 - clip(target, 0.0, 255.0)) * rim[:, None]
    params = {
        "center": [_r(cx), _r(cy)], "radius": _r(radius), "depth": _r(depth), "light_angle": _r(light),
        "rim": _r(rim_gain), "slope": _r(slope), "irregularity": [_r(a) for a in amps],
    }  # fmt: skip
    return ys, xs, alpha.astype(np.float32), target.astype(np.float32), params, 2.0


def _stain(img: np.ndarray, rng: np.random.Generator, scale: float):
    h, w = img.shape[:2]
    m = min(h, w)
    radius = rng.uniform(0.06, 0.25) * m
    cx, cy = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    aspect = rng.uniform(0.5, 1.0)
    rot = rng.uniform(0.0, math.pi)
    amps = rng.normal(0.0, 1.0, 6) * 0.18 / np.arange(2, 8) ** 0.9
    phases = rng.uniform(0.0, 2.0 * math.pi, 6)
    soft = rng.uniform(1.5, 4.0) * max(1.0, scale)
    polarity = "dark" if rng.random() < 0.65 else "light"
    strength = rng.uniform(0.15, 0.45) if polarity == "dark" else rng.uniform(0.08, 0.25)
    # Per-channel strength: rust/water (blue absorbed most), neutral grime, or oily (red absorbed most).
    palette = np.array([[0.8, 1.0, 1.3], [1.0, 1.0, 1.0], [1.15, 1.0, 0.9]])
    tint = palette[int(rng.integers(0, 3))] * (1.0 + rng.uniform(-0.06, 0.06, 3))
    if polarity == "light":  # efflorescence / bleaching is close to white, not tinted
        tint = 1.0 + (tint - 1.0) * 0.2
    c, s = math.cos(rot), math.sin(rot)
    # Box of the rotated ellipse that holds every pixel the stain can reach: semi-axes `reach` along the
    # major axis and sqrt(aspect) * reach across it (the boundary noise is scaled by 1 / sqrt(aspect)).
    reach = radius * 1.5 + 2 * soft + 2
    minor = reach * math.sqrt(aspect)
    box = _window(cx, cy, math.hypot(reach * c, minor * s), math.hypot(reach * s, minor * c), h, w)
    if box is None:
        return None
    y0, y1, x0, x1, _, _ = box
    bh, bw = y1 - y0, x1 - x0
    # Everything but the final smoothstep is smooth at the scale of a few pixels, so it is computed on a grid of
    # every `step`-th pixel (about 24 steps per radius) and interpolated (bilinear) to the box. On that grid
    # the noise scales are fixed, so the noise comes from the banks.
    step = max(1.0, radius / 24.0)
    gh, gw = int(math.ceil((bh - 1) / step)) + 2, int(math.ceil((bw - 1) / step)) + 2
    dy = (np.arange(gh, dtype=np.float32) * np.float32(step) + np.float32(y0 - cy))[:, None]
    dx = (np.arange(gw, dtype=np.float32) * np.float32(step) + np.float32(x0 - cx))[None, :]
    ex = np.add(dy * np.float32(s), dx * np.float32(c))
    ey = np.add(dy * np.float32(c / aspect), dx * np.float32(-s / aspect))
    rho = np.hypot(ex, ey)
    sa = np.float32(aspect**0.5)
    sd = radial_boundary(ex, ey, radius * aspect**0.5, amps, phases)  # the signed distance to the edge
    rho *= sa
    sd -= rho
    if step > 1.0:  # edge and inner noise: features from radius / 2 (/ 1.5) down to 2 grid steps
        sd += texture_linear(gh, gw, rng, "fractal", 12.0, 2.0, 0.55, scale=0.08 * radius)
        if not (sd >= -step).any():  # nothing reaches opacity 0.5
            return None
        inner = texture_linear(gh, gw, rng, "fractal", 16.0, 2.0, 0.55)
    else:
        edge_noise = fractal_noise(gh, gw, rng, coarse=max(radius / 2.0, 2.0), fine=max(radius / 24.0, 1.0))
        edge_noise *= np.float32(0.08 * radius)
        sd += edge_noise
        if not (sd >= -step).any():
            return None
        inner = fractal_noise(gh, gw, rng, coarse=max(radius / 1.5, 2.0), fine=max(radius / 30.0, 1.0))
    ring = sd * np.float32(1.0 / (0.08 * radius + soft))
    np.square(ring, out=ring)
    np.negative(ring, out=ring)
    np.exp(ring, out=ring)
    amount = inner
    amount *= np.float32(0.25 * strength)
    ring *= np.float32(0.35 * strength)
    amount += ring
    amount += np.float32(0.75 * strength)
    clip(amount, 0.0, 0.9, out=amount)
    sd = upsample(sd, step, bh, bw)
    amount = upsample(amount, step, bh, bw)
    alpha = smoothstep(sd, -soft, soft)
    if not (alpha >= 0.5).any():
        return None
    tint32 = tint.astype(np.float32)

    def apply(window: np.ndarray, alpha: np.ndarray) -> None:
        # dark: towards cur * (1 - shift); light: towards cur + (255 - cur) * shift (one compiled pass)
        kernels.stain(window, alpha, amount, tint32, polarity == "dark")

    params = {
        "center": [_r(cx), _r(cy)], "radius": _r(radius), "aspect": _r(aspect), "rotation": _r(rot),
        "softness": _r(soft), "polarity": polarity, "strength": _r(strength), "tint": [_r(t) for t in tint],
    }  # fmt: skip
    return Dense(y0, x0, alpha, apply), params, 8.0 * max(1.0, scale)


def _chip(img: np.ndarray, rng: np.random.Generator, scale: float):
    h, w = img.shape[:2]
    edge = str(rng.choice(["top", "bottom", "left", "right"]))
    span, perp = (w, h) if edge in ("top", "bottom") else (h, w)
    half = max(4.0, rng.uniform(0.04, 0.18) * span)
    depth = min(half * rng.uniform(0.3, 0.9), 0.45 * perp)
    center = rng.uniform(0.1 * span, 0.9 * span)
    # Fracture outline: a few straight facets between random vertices, roughened at pixel scale.
    n_v = int(rng.integers(4, 9))
    uv = np.sort(rng.uniform(-1.0, 1.0, n_v))
    env = np.sqrt(clip(1.0 - uv**2, 0.0, 1.0))
    vv = depth * env * rng.uniform(0.6, 1.15, n_v)
    u_knots = np.concatenate([[-1.0], uv, [1.0]]) * half + center
    v_knots = np.concatenate([[-0.05 * depth], vv, [-0.05 * depth]])
    u0, u1 = max(int(center - half) - 1, 0), min(int(center + half) + 2, span)
    vmax = int(math.ceil(float(v_knots.max()) + 3 * max(1.0, scale) + 2))
    if u1 <= u0 or vmax < 1:
        return None
    vmax = min(vmax, perp)
    u = np.arange(u0, u1, dtype=np.float64) + 0.5
    prof = np.interp(u, u_knots, v_knots)
    prof += fractal_1d(u.size, rng, coarse=8 * max(1.0, scale), fine=1) * 0.7 * max(1.0, scale) ** 0.5
    prof = prof.astype(np.float32)
    v = np.arange(vmax, dtype=np.float32)[:, None] + 0.5
    inside = prof[None, :] - v  # px from the fracture line, positive inside the chip
    alpha = clip(inside + 0.5, 0.0, 1.0)
    live = alpha > 0
    if not (alpha >= 0.5).any():
        return None
    vi, ui = np.nonzero(live)
    ui = ui + u0
    if edge == "top":
        ys, xs = vi, ui
    elif edge == "bottom":
        ys, xs = h - 1 - vi, ui
    elif edge == "left":
        ys, xs = ui, vi
    else:
        ys, xs = ui, w - 1 - vi
    mode = "void" if rng.random() < 0.6 else "exposed"
    level = rng.uniform(12.0, 45.0) if mode == "void" else rng.uniform(0.45, 0.75)
    rough = texture_linear(vmax, u1 - u0, rng, "fractal", 6.0 * max(1.0, scale) ** 0.5, 1.0, 0.55)[live]
    cur = img[ys, xs]
    fr = inside[live]
    lip = np.exp(-fr / np.float32(1.2 * max(1.0, scale) ** 0.5))  # thin band right at the fracture line
    if mode == "void":
        target = np.empty_like(cur)
        target[:] = (level * (1.0 + 0.25 * rough))[:, None]
        target += (clip(cur, 0, 255) - target) * (0.55 * lip)[:, None]  # lit broken edge
    else:
        target = cur * (level * (1.0 + 0.2 * rough))[:, None]
        target *= (1.0 - 0.5 * lip)[:, None]  # shadowed fracture face
    params = {
        "edge": edge, "center": _r(center), "half_length": _r(half), "depth": _r(depth), "mode": mode,
        "level": _r(level), "vertices": n_v,
    }  # fmt: skip
    return ys.astype(np.int64), xs.astype(np.int64), alpha[live], target.astype(np.float32), params, 2.0


_DRAWERS = {"crack": _crack, "scratch": _scratch, "pit": _pit, "stain": _stain, "chip": _chip}


def place_defect(kind: str, img: np.ndarray, rng: np.random.Generator, scale: float,
                 avoid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict] | None:
    """Draw one defect of `kind` into `img` (float32 (H, W, 3), in place): (ys, xs, params).

    `ys, xs` list the footprint's pixels, each once: exactly those where the defect's opacity is >= 0.5,
    never empty. Every pixel the defect changed lies within the kind's limit of them.

    `avoid` (bool (H, W)): pixels the defect must leave untouched. A draw whose opacity (> 0, the faint edge
    included) reaches one is discarded before the image changes and drawn anew; after `_MAX_TRIES` draws none
    of which fitted, nothing is drawn and the result is None. Without `avoid` the result is never None.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown defect kind '{kind}'; known kinds: {', '.join(DEFECT_KINDS)}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"draw_defect expects an (H, W, 3) image, got shape {img.shape}")
    if avoid is not None and avoid.shape != img.shape[:2]:
        raise ValueError(f"avoid mask {avoid.shape} does not match the image {img.shape[:2]}")
    h, w = img.shape[:2]
    placed = None
    blocked = 0
    for _ in range(_MAX_TRIES):
        drawn = _DRAWERS[kind](img, rng, scale)
        if drawn is None:
            continue
        placed = _restricted(drawn)
        if avoid is not None and _touches(placed, avoid):
            placed = None
            blocked += 1
            continue
        break
    if placed is None:
        if blocked:
            return None
        # 25 misses in a row does not happen for images >= 8 px; fail loudly rather than lie
        raise RuntimeError(f"could not place a {kind} in a {h}x{w} image")
    if isinstance(placed[0], Dense):
        patch, alpha, params = placed
        bh, bw = alpha.shape
        patch.apply(img[patch.y0 : patch.y0 + bh, patch.x0 : patch.x0 + bw], alpha)
        ys, xs = np.nonzero(alpha >= 0.5)
        ys += patch.y0
        xs += patch.x0
        return ys, xs, {"kind": kind, **params, "area_px": int(ys.size)}
    ys, xs, alpha, target, params = placed
    # Shading can overshoot (a lit pit wall on a bright surface): blend clips the target to [0, 255].
    blend(img, ys, xs, alpha, target)
    fp = alpha >= 0.5
    ys, xs = ys[fp], xs[fp]
    return ys, xs, {"kind": kind, **params, "area_px": int(ys.size)}


def _restricted(drawn: tuple) -> tuple:
    """A drawer's result with its opacity cut to the kind's limit around the footprint (nothing drawn yet):
    (Dense, alpha, params) or (ys, xs, alpha, target, params)."""
    if isinstance(drawn[0], Dense):
        patch, params, limit = drawn
        return patch, restrict_dense(patch.alpha, limit), params
    ys, xs, alpha, target, params, limit = drawn
    return ys, xs, restrict_to_footprint(ys, xs, alpha, limit), target, params


def _touches(placed: tuple, avoid: np.ndarray) -> bool:
    """Whether any pixel the defect would change (opacity > 0) is set in `avoid`."""
    if isinstance(placed[0], Dense):
        patch, alpha, _ = placed
        bh, bw = alpha.shape
        window = avoid[patch.y0 : patch.y0 + bh, patch.x0 : patch.x0 + bw]
        return bool((window & (alpha[: window.shape[0], : window.shape[1]] > 0)).any())
    ys, xs, alpha, _, _ = placed
    live = alpha > 0
    return bool(avoid[ys[live], xs[live]].any())


def draw_defect(kind: str, img: np.ndarray, rng: np.random.Generator, scale: float) -> tuple[np.ndarray, dict]:
    """Draw one defect of `kind` into `img` (float32 (H, W, 3), in place); return its footprint and params.

    The footprint is True exactly where the defect's opacity is >= 0.5 and is never empty.
    """
    ys, xs, params = place_defect(kind, img, rng, scale)  # never None without `avoid`
    footprint = np.zeros(img.shape[:2], dtype=bool)
    footprint[ys, xs] = True
    return footprint, params
