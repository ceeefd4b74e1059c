"""Compiled (numba) kernels for the renderer's passes over every pixel.

Each kernel fuses what numpy does in several passes over a full-resolution array (each a read and a write
of megabytes) into one loop: a texture lookup through the sum of two bank windows, the lit RGB build of a
surface, the sensor noise with the quantisation to uint8, the weave; and the per-pixel loops of a defect
(stroke distances, the footprint restriction, the blend, a stain). They compute the same float32 arithmetic
as the numpy expressions their docstrings give (tests/synth/test_kernels.py checks each one against that
expression), so a rendered sample stays a pure function of (config, index) whatever the number of workers.

Compiled once per machine and cached next to this file (numba's ``cache=True``; where that folder is not
writable numba uses its user cache directory, and ``NUMBA_CACHE_DIR`` moves it): the first render in a fresh
environment compiles them (about 4 s on a 2-core CPU), later processes load them in milliseconds.

`mode` of `pair_lookup`: 0 (SET) writes ``out = v``, 1 (ADD) adds ``out += v``, 2 (MUL) multiplies ``out *= v``.
"""

from __future__ import annotations

import numba
import numpy as np

SET, ADD, MUL = 0, 1, 2

_jit = numba.njit(cache=True, nogil=True)


@_jit
def _bank_row(y, h, y0, flip):
    return y0 + (h - 1 - y if flip else y)


@_jit
def pair_lookup(bank, ya, xa, fa, yb, xb, fb, table, out, mode):
    """out (mode)= table[A + B]: A, B the (H, W) windows of the uint8 `bank` at rows ya, yb and columns xa, xb,
    their row order reversed where fa, fb; `table` float32 with 509 values (see `synth.noise_banks.texture`)."""
    h, w = out.shape
    for y in range(h):
        ra = bank[_bank_row(y, h, ya, fa), xa : xa + w]
        rb = bank[_bank_row(y, h, yb, fb), xb : xb + w]
        ro = out[y]
        if mode == 0:
            for x in range(w):
                ro[x] = table[np.int32(ra[x]) + np.int32(rb[x])]
        elif mode == 1:
            for x in range(w):
                ro[x] += table[np.int32(ra[x]) + np.int32(rb[x])]
        else:
            for x in range(w):
                ro[x] *= table[np.int32(ra[x]) + np.int32(rb[x])]


@_jit
def woven(xk, wyk, yk, wxk, table_u, table_v, out, top):
    """The weave's luminance (before its fine texture) into `out` and where the warp lies on top into `top`.

    Per pixel: a = table_u[int(xk[x] + wyk[y])], b = table_v[int(yk[y] + wxk[x])] (thread profile signed
    by the thread's parity); the warp lies on top where a * b > 0; warp = |a| (0.7 + 0.3 b^2), weft =
    |b| (0.7 + 0.3 a^2); out = warp where on top, else weft.
    """
    h, w = out.shape
    k3 = np.float32(0.3)
    k7 = np.float32(0.7)
    nu, nv = table_u.shape[0] - 1, table_v.shape[0] - 1
    for y in range(h):
        sy = wyk[y]
        ty = yk[y]
        for x in range(w):  # indices truncated like astype(uint16), clamped to the tables (never read past them)
            a = table_u[min(max(np.int64(xk[x] + sy), 0), nu)]
            b = table_v[min(max(np.int64(ty + wxk[x]), 0), nv)]
            on = a * b > 0
            top[y, x] = on
            if on:
                out[y, x] = abs(a) * (b * b * k3 + k7)
            else:
                out[y, x] = abs(b) * (a * a * k3 + k7)


@_jit
def _lattice_rows(lat, k, w):
    """Every lattice row of `lat` (every k-th pixel) interpolated along x to all `w` columns: (rows, w) float32,
    left + (right - left) * float32(r / k) with r the column's offset from the lattice column to its left."""
    hk = lat.shape[0]
    rows = np.empty((hk, w), np.float32)
    for x in range(w):
        j = x // k
        f = np.float32((x - j * k) / k)
        for i in range(hk):
            rows[i, x] = (lat[i, j + 1] - lat[i, j]) * f + lat[i, j]
    return rows


@_jit
def _gain_row(rows, k, y, buf):
    """buf = image row y of the field whose every k-th row is `rows`: top + (bottom - top) * float32(r / k)."""
    i = y // k
    f = np.float32((y - i * k) / k)
    top = rows[i]
    bottom = rows[i + 1]
    for x in range(buf.shape[0]):
        buf[x] = (bottom[x] - top[x]) * f + top[x]


@_jit
def expand_lattice(lat, k, out):
    """out (H, W) = the bilinear interpolation of `lat`, whose [i, j] is pixel (i * k, j * k): along x on the
    lattice rows, then along y (exactly the lattice values at the lattice points)."""
    h, w = out.shape
    rows = _lattice_rows(lat, k, w)
    for y in range(h):
        _gain_row(rows, k, y, out[y])


@_jit
def _lit_buffers(lat, k, w):
    """What the lit-RGB kernels keep across rows: the lattice rows interpolated along x (the lattice itself when
    k == 0, unused), the gain row (all ones when k == 0) and the clipped level of the row."""
    rows = _lattice_rows(lat, k, w) if k > 0 else lat
    return rows, np.ones(w, np.float32), np.empty(w, np.float32)


@_jit
def _lit_row(lum, rows, k, y, cap, gain, v):
    """v = clip(lum[y] * gain row y, 0, cap), the gain row from `rows` (k > 0) or 1 (k == 0, `gain` all ones)."""
    zero = np.float32(0.0)
    src = lum[y]
    if k > 0:
        _gain_row(rows, k, y, gain)
    for x in range(v.shape[0]):
        v[x] = min(max(src[x] * gain[x], zero), cap)


@_jit
def lit_rgb_const(lum, lat, k, cap, c0, c1, c2, out):
    """out[..., c] = clip(lum * gain, 0, cap) * (c0, c1, c2)[c]: a surface's RGB in one pass.

    gain = `expand_lattice(lat, k)` (the smooth field and the lighting on a lattice of every k-th pixel,
    see `synth.fields.smooth_lattice`), or 1 when k == 0. `lum` is not changed.
    """
    h, w = lum.shape
    rows, gain, v = _lit_buffers(lat, k, w)
    for y in range(h):
        _lit_row(lum, rows, k, y, cap, gain, v)
        dst = out[y]
        for x in range(w):
            dst[x, 0] = v[x] * c0
            dst[x, 1] = v[x] * c1
            dst[x, 2] = v[x] * c2


@_jit
def lit_rgb_two(lum, lat, k, cap, top_mask, first, second, out):
    """`lit_rgb_const` with colour `first` (float32 (3,)) where `top_mask` is true and `second` elsewhere."""
    h, w = lum.shape
    rows, gain, v = _lit_buffers(lat, k, w)
    for y in range(h):
        _lit_row(lum, rows, k, y, cap, gain, v)
        dst = out[y]
        on = top_mask[y]
        for x in range(w):
            color = first if on[x] else second
            dst[x, 0] = v[x] * color[0]
            dst[x, 1] = v[x] * color[1]
            dst[x, 2] = v[x] * color[2]


@_jit
def noise_to_uint8(flat, bank, y0, y1, x0, x1, by, bx, scale, out):
    """Rows y0:y1, flattened-RGB columns x0:x1 of the quantised image, in place in `out` (uint8 (H, 3W)):

    out = uint8(clip(float32(bank window) * scale + flat + 0.5, 0, 255)) (truncation after +0.5 rounds half
    up), the window starting at bank row `by`, column `bx`; scale == 0 adds no noise.
    """
    half = np.float32(0.5)
    zero = np.float32(0.0)
    top = np.float32(255.0)
    n = x1 - x0
    for y in range(y0, y1):
        frow = flat[y, x0:x1]
        orow = out[y, x0:x1]
        if scale != 0:
            brow = bank[by + y - y0, bx : bx + n]
            for i in range(n):
                v = np.float32(brow[i]) * scale + frow[i]
                orow[i] = np.uint8(min(max(v + half, zero), top))
        else:
            for i in range(n):
                orow[i] = np.uint8(min(max(frow[i] + half, zero), top))


@_jit
def stroke_nearest(points, valid, reach, y0, y1, x0, x1):
    """Pixels of the box [y0, y1) x [x0, x1) within `reach` of the polyline `points` (float64 (N, 2), xy),
    each with its nearest segment: (ys, xs, seg, t, dist) in raster order, over the segments i with valid[i].

    A pixel (y, x) sits at the point (x, y). Segment i runs from points[i] to points[i + 1]; t in [0, 1] is
    the position of the nearest point along it and dist the exact (float64) distance; of equally near
    segments the first wins. Each segment visits only the pixels of its own box grown by `reach`.
    """
    ch, cw = y1 - y0, x1 - x0
    best = np.full((ch, cw), np.inf)
    seg = np.full((ch, cw), -1, np.int32)
    r2 = reach * reach
    for i in range(points.shape[0] - 1):
        if not valid[i]:
            continue
        ax, ay = points[i, 0], points[i, 1]
        vx, vy = points[i + 1, 0] - ax, points[i + 1, 1] - ay
        inv = 1.0 / max(vx * vx + vy * vy, 1e-12)
        xa = max(int(np.floor(min(ax, ax + vx) - reach)), x0)
        xb = min(int(np.ceil(max(ax, ax + vx) + reach)) + 1, x1)
        ya = max(int(np.floor(min(ay, ay + vy) - reach)), y0)
        yb = min(int(np.ceil(max(ay, ay + vy) + reach)) + 1, y1)
        for y in range(ya, yb):
            qy = y - ay
            brow = best[y - y0]
            srow = seg[y - y0]
            for x in range(xa, xb):
                qx = x - ax
                t = min(max((qx * vx + qy * vy) * inv, 0.0), 1.0)
                dx = qx - t * vx
                dy = qy - t * vy
                d2 = dx * dx + dy * dy
                if d2 <= r2 and d2 < brow[x - x0]:
                    brow[x - x0] = d2
                    srow[x - x0] = i
    n = 0
    for y in range(ch):
        for x in range(cw):
            if seg[y, x] >= 0:
                n += 1
    ys = np.empty(n, np.int64)
    xs = np.empty(n, np.int64)
    ss = np.empty(n, np.int64)
    ts = np.empty(n, np.float64)
    ds = np.empty(n, np.float32)
    j = 0
    for y in range(ch):
        for x in range(cw):
            i = seg[y, x]
            if i >= 0:
                ax, ay = points[i, 0], points[i, 1]
                vx, vy = points[i + 1, 0] - ax, points[i + 1, 1] - ay
                qx, qy = x + x0 - ax, y + y0 - ay
                ys[j], xs[j], ss[j] = y + y0, x + x0, i
                ts[j] = min(max((qx * vx + qy * vy) / max(vx * vx + vy * vy, 1e-12), 0.0), 1.0)
                ds[j] = np.sqrt(best[y, x])
                j += 1
    return ys, xs, ss, ts, ds


@_jit
def restrict_near(ys, xs, alpha, ody, odx):
    """Zero, in place, the opacity of every faint pixel (0 < alpha < 0.5) of the pixel list (ys, xs) that has no
    pixel with alpha >= 0.5 at any offset (ody[m], odx[m]) (a disk: see `synth.footprint.restrict_to_footprint`)."""
    n = ys.shape[0]
    if n == 0:
        return
    pad = 0
    for m in range(ody.shape[0]):
        pad = max(pad, abs(ody[m]), abs(odx[m]))
    y0, y1, x0, x1 = ys.min() - pad, ys.max() + pad + 1, xs.min() - pad, xs.max() + pad + 1
    canvas = np.zeros((y1 - y0, x1 - x0), np.bool_)
    for i in range(n):
        if alpha[i] >= 0.5:
            canvas[ys[i] - y0, xs[i] - x0] = True
    for i in range(n):
        a = alpha[i]
        if a > 0 and a < 0.5:
            cy, cx = ys[i] - y0, xs[i] - x0
            near = False
            for m in range(ody.shape[0]):
                if canvas[cy + ody[m], cx + odx[m]]:
                    near = True
                    break
            if not near:
                alpha[i] = 0


@_jit
def blend_pixels(img, ys, xs, alpha, target):
    """img[ys, xs] <- cur + alpha * (clip(target, 0, 255) - cur), in place, where alpha > 0 (float32); pixels
    with alpha == 0 stay bit-identical."""
    zero = np.float32(0.0)
    top = np.float32(255.0)
    for i in range(ys.shape[0]):
        a = alpha[i]
        if a > 0:
            y, x = ys[i], xs[i]
            for c in range(3):
                cur = img[y, x, c]
                t = min(max(target[i, c], zero), top)
                img[y, x, c] = cur + a * (t - cur)


@_jit
def stain(window, alpha, amount, tint, dark):
    """A stain on `window` (float32 (h, w, 3), in place): per channel c, f = amount * tint[c] * alpha;
    dark: window *= 1 - alpha * min(amount * tint[c], 0.95); light: window += (255 - window) * f."""
    h, w = min(alpha.shape[0], window.shape[0]), min(alpha.shape[1], window.shape[1])
    cap = np.float32(0.95)
    one = np.float32(1.0)
    white = np.float32(255.0)
    for y in range(h):
        for x in range(w):
            a = alpha[y, x]
            if a == 0:
                continue
            for c in range(3):
                f = amount[y, x] * tint[c]
                if dark:
                    window[y, x, c] *= one - min(f, cap) * a
                else:
                    window[y, x, c] += (white - window[y, x, c]) * (f * a)


@_jit
def city_block(mask):
    """Taxicab (L1) distance of every pixel to the nearest True pixel of `mask` (int32; h + w where there is
    none), by one forward and one backward pass: what `scipy.ndimage.distance_transform_cdt(~mask,
    metric="taxicab")` gives."""
    h, w = mask.shape
    far = h + w
    d = np.empty((h, w), np.int32)
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                d[y, x] = 0
            else:
                v = far
                if y > 0:
                    v = min(v, d[y - 1, x] + 1)
                if x > 0:
                    v = min(v, d[y, x - 1] + 1)
                d[y, x] = v
    for y in range(h - 1, -1, -1):
        for x in range(w - 1, -1, -1):
            v = d[y, x]
            if y < h - 1:
                v = min(v, d[y + 1, x] + 1)
            if x < w - 1:
                v = min(v, d[y, x + 1] + 1)
            d[y, x] = v
    return d
