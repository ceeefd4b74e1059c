"""Shared rasterisation helpers for procedural surfaces and defects.

Everything here is vectorised (numpy, or one compiled pass of synth/kernels.py) and sized for a few
milliseconds per 512x512 image:
- smooth fields (features >= 4 px) come from a small resize pyramid sampled on a lattice of every k-th pixel
  and interpolated bilinearly, never resized at full resolution (`smooth_lattice`; the surface's RGB pass
  in synth/kernels.py interpolates the lattice as it goes);
- fine textures and sensor noise are windows of noise banks: large fields built once per process from a
  constant seed, at offsets drawn from the sample's own generator (`texture`, `texture_linear`,
  `add_noise_to_uint8`); images over 1280 px synthesise their textures directly, so nothing repeats;
- defects are rasterised as sparse pixel lists or on their local box, never on the whole image.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from . import kernels

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# Noise banks: large fixed fields built once per process from a constant seed, of which every sample takes
# windows at offsets and flips drawn from its own generator. A sample stays a pure function of (config, index)
# (the banks are the same in every process), and a window costs a copy instead of a full-resolution synthesis.
_BANK_SEED = 0x5EED_BA4C
_Q = 32.0  # bank values are round(32 * x) for unit-std x, stored as uint8 with an offset of 127 (+-3.97 std)
_PAIR = 254  # index of zero in the sum of two bank values (0..508)


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


def _normalise(out: np.ndarray, sample: np.ndarray) -> np.ndarray:
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
    return _normalise(lattice, lattice), k


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
    return _normalise(out, out[:: max(1, height // 64), :: max(1, width // 64)])


def bank_side(height: int, width: int) -> int | None:
    """Side of the square banks an image of this size draws from (about twice its longer side or more, so
    that windows have room to differ), or None: synthesise it directly. Small images use small banks, which are quick to
    build (a process builds the few dozen it needs once, on first use)."""
    m = max(height, width)
    for longest, side in ((128, 256), (256, 512), (640, 1024), (1280, 2048)):
        if m <= longest:
            return side
    return None


def _bank_rng(*key: float) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_BANK_SEED, *(int(round(v * 1000)) for v in key)]))


def _quantise(field: np.ndarray) -> np.ndarray:
    q = np.rint(field * np.float32(_Q))
    clip(q, -127, 127, out=q)
    q += 127
    return q.astype(np.uint8)


def _pair_zmap(field: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Values (509) that a sum-of-two-windows index stands for, matched to the distribution of one field.

    Two independent windows summed have a more Gaussian histogram (heavier tails) than one fractal, which
    would change how often a threshold (a pore, a speck) is crossed. Mapping each sum through the quantile
    of a single field keeps the marginal distribution of `field` while the pattern comes from two windows.
    """
    n = bank.shape[0]
    a = bank[: n // 2].astype(np.int32)
    b = bank[n // 2 : 2 * (n // 2)][::-1, ::-1].astype(np.int32)
    counts = np.bincount((a + b).ravel(), minlength=2 * _PAIR + 1).astype(np.float64)
    cdf = np.cumsum(counts) / counts.sum()
    mid = cdf - 0.5 * counts / counts.sum()
    sample = np.sort(field[::3, ::3].ravel().astype(np.float64))
    ranks = (np.arange(sample.size) + 0.5) / sample.size
    return np.interp(mid, ranks, sample)


_BANKS: dict[tuple, tuple[np.ndarray, np.ndarray, float]] = {}


def _bank(recipe: str, side: int, *params: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(uint8 bank, pair zmap, extra) for `recipe` at `side` px, built once per process from a fixed seed."""
    key = (recipe, side, *params)
    if key not in _BANKS:
        rng = _bank_rng(len(recipe), side, *params)
        extra = 1.0
        if recipe in ("fractal", "slope"):
            field, extra = _direct(side, side, rng, recipe, *params)
        elif recipe == "streak":  # brushed lines along x: 1 px across, `length` px along, plus a broader set
            length, broad = params
            # (weights: those of the old affine-warped streaks, whose interpolation left about half the std)
            field = 0.0248 * _streaks_x(side, side, rng, 1.0, length) + 0.0165 * _streaks_x(
                side, side, rng, broad, 4.0 * length
            )
            extra = float(field.std())
            field /= np.float32(extra)
        else:
            raise ValueError(f"unknown bank recipe '{recipe}'")
        bank = _quantise(field)
        _BANKS[key] = (bank, _pair_zmap(field, bank), extra)
    return _BANKS[key]


def _streaks_x(height: int, width: int, rng: np.random.Generator, across: float, along: float) -> np.ndarray:
    """Unit-std noise of `across` x `along` px cells stretched along x (bilinear)."""
    gh, gw = int(height / across) + 4, int(width / along) + 4
    grid = rng.random((gh, gw), dtype=np.float32) - 0.5
    box = (1.0, 1.0, 1.0 + width / along, 1.0 + height / across)
    out = np.array(Image.fromarray(grid).resize((width, height), Image.Resampling.BILINEAR, box=box), dtype=np.float32)
    return _normalise(out, out[::4, ::4])


def _windows(bank: np.ndarray, height: int, width: int, rng: np.random.Generator, flip: bool = True
             ) -> tuple[int, int, bool, int, int, bool]:
    """Two independent windows of (height, width) from a square bank, each at a random offset and (with
    `flip`) row order, as (row, column, reversed) of each: `window_views` turns them into arrays. A
    directional texture (the slope of a lit relief) must not be flipped: that would light it from the other
    side. (A column flip would make the windows' rows non-contiguous.)"""
    side = bank.shape[0]
    r = rng.integers(0, 1 << 30, size=6)
    out: list = []
    for j in (0, 3):
        out += [int(r[j] % (side - height + 1)), int(r[j + 1] % (side - width + 1)), bool(flip and r[j + 2] & 1)]
    return tuple(out)


def window_views(bank: np.ndarray, height: int, width: int, windows: tuple) -> list[np.ndarray]:
    """The two (height, width) windows of `bank` that `_windows` drew, as numpy views."""
    views = []
    for y0, x0, flipped in (windows[:3], windows[3:]):
        win = bank[y0 : y0 + height, x0 : x0 + width]
        views.append(win[::-1] if flipped else win)
    return views


def _direct(height: int, width: int, rng: np.random.Generator, recipe: str, *params: float) -> tuple[np.ndarray, float]:
    """A texture synthesised at the image's size (no bank): unit-std field and its recipe scale."""
    if recipe == "fractal":
        return fractal_noise(height, width, rng, *params), 1.0
    if recipe == "slope":
        hf = fractal_noise(height + 1, width + 1, rng, *params)
        field = hf[1:, 1:] - hf[:-1, :-1]
        extra = max(float(field[::4, ::4].std()), 1e-6)
        field /= np.float32(extra)
        return field, extra
    raise ValueError(f"texture recipe '{recipe}' has no direct synthesis")


class Texture:
    """A fine texture of unit std, for a pointwise function of it: `z` holds the values its codes stand for.

    From a bank it is the sum of two bank windows (codes 0..508, never materialised: `lookup` reads the
    windows in one compiled pass); over 1280 px it is a field synthesised at the image's size, quantised to
    the same codes. `extra` is the recipe's scale (the std of a slope or streak field before normalisation).
    """

    def __init__(self, shape: tuple[int, int], z: np.ndarray, extra: float, bank: np.ndarray | None = None,
                 windows: tuple | None = None, codes: np.ndarray | None = None):
        self.shape, self.z, self.extra = shape, z, extra
        self._bank, self._windows, self._codes = bank, windows, codes

    def codes(self) -> np.ndarray:
        """The per-pixel codes (uint16 (H, W), 0..508) that `lookup` reads."""
        if self._bank is None:
            return self._codes
        a, b = window_views(self._bank, *self.shape, self._windows)
        return np.add(a, b, dtype=np.uint16)

    def lookup(self, values: np.ndarray, out: np.ndarray | None = None, mode: int = kernels.SET) -> np.ndarray:
        """out (mode)= values[code] per pixel (`values`: 509 numbers, e.g. a function of `z`); float32 (H, W).

        mode: `kernels.SET` (a new array when `out` is None), `kernels.ADD` or `kernels.MUL` into `out`."""
        table = np.ascontiguousarray(values, dtype=np.float32)
        if out is None:
            if mode != kernels.SET:
                raise ValueError("lookup: mode ADD or MUL needs `out`")
            out = np.empty(self.shape, dtype=np.float32)
        if self._bank is not None:
            kernels.pair_lookup(self._bank, *self._windows, table, out, mode)
        else:
            _combine(out, np.take(table, self._codes, mode="clip"), mode)
        return out


def _combine(out: np.ndarray, values: np.ndarray, mode: int) -> None:
    if mode == kernels.SET:
        np.copyto(out, values)
    elif mode == kernels.ADD:
        out += values
    else:
        out *= values


def texture(height: int, width: int, rng: np.random.Generator, recipe: str, *params: float,
            side: int | None = None) -> Texture:
    """A fine texture (see `Texture`): pass any function of its `z` values through `Texture.lookup`.

    Images up to 1280 px draw the sum of two bank windows (see `_bank`); larger ones synthesise the field
    directly (no repetition at any size), quantised the same way.
    """
    side = side or bank_side(height, width)
    if side is not None and max(height, width) <= side:
        bank, zmap, extra = _bank(recipe, side, *params)
        return Texture((height, width), zmap, extra, bank=bank,
                       windows=_windows(bank, height, width, rng, flip=recipe != "slope"))
    field, extra = _direct(height, width, rng, recipe, *params)
    field *= np.float32(_Q * math.sqrt(2.0))
    clip(field, -_PAIR, _PAIR, out=field)
    field += np.float32(_PAIR + 0.5)
    return Texture((height, width), (np.arange(2 * _PAIR + 1) - _PAIR) / (_Q * math.sqrt(2.0)), extra,
                   codes=field.astype(np.uint16))


def texture_linear(height: int, width: int, rng: np.random.Generator, recipe: str, *params: float,
                   scale: float = 1.0, offset: float = 0.0, side: int | None = None, transpose: bool = False,
                   out: np.ndarray | None = None, mode: int = kernels.SET) -> np.ndarray:
    """offset + scale * (a fine texture in the recipe's own units): float32 (height, width), no lookup.

    From the banks this is the sum of two windows (its std is that of the recipe, its histogram a bit more
    Gaussian, which does not matter for a texture used linearly). `transpose` draws from the bank turned by
    90 degrees (kept as a contiguous copy), for anisotropic recipes. With `out` and `mode` (`kernels.ADD` or
    `kernels.MUL`) the texture is added to or multiplied into `out` in the same pass.
    """
    if out is None:
        if mode != kernels.SET:
            raise ValueError("texture_linear: mode ADD or MUL needs `out`")
        out = np.empty((height, width), dtype=np.float32)
    side = side or bank_side(height, width)
    if side is not None and max(height, width) <= side:
        bank, _, extra = _bank(recipe, side, *params)
        if transpose:
            key = ("T", recipe, side, *params)
            if key not in _BANKS:
                _BANKS[key] = (np.ascontiguousarray(bank.T), None, extra)
            bank = _BANKS[key][0]
        windows = _windows(bank, height, width, rng, flip=recipe != "slope")
        k = scale * extra / (_Q * math.sqrt(2.0))
        # linear in the code (the sum of the two windows, 0..508): a 509-entry table, float32 as a pass would be
        table = np.arange(2 * _PAIR + 1, dtype=np.float32) * np.float32(k) + np.float32(offset - 254.0 * k)
        kernels.pair_lookup(bank, *windows, table, out, mode)
        return out
    field, extra = _direct(height, width, rng, recipe, *params)
    field *= np.float32(scale * extra)
    field += np.float32(offset)
    _combine(out, field, mode)
    return out


_SENSOR: dict[int, np.ndarray] = {}


def _sensor_bank() -> np.ndarray:
    """(1024, 3072) standard normals, stored as int8 in units of 1/32: interleaved RGB sensor noise, fixed per
    process (3 MB; reading it costs no more than float32 would)."""
    if 0 not in _SENSOR:
        z = _bank_rng(0.001).standard_normal((1024, 3072), dtype=np.float32)
        _SENSOR[0] = np.clip(np.rint(z * np.float32(_Q)), -127, 127).astype(np.int8)
    return _SENSOR[0]


def _noise_plan(height: int, width: int, rng: np.random.Generator):
    """Bands of rows, each with tiles (x0, x1 in flattened RGB columns, bank row, bank column, sign) covering
    the image. Every tile (at most half the bank each way) takes its own window of the bank at a random
    offset and sign, so the tiles of a large image do not repeat each other."""
    bank = _sensor_bank()
    bh, bw = bank.shape
    cols = 3 * width
    ny = max(1, math.ceil(height / (bh // 2)))
    nx = max(1, math.ceil(cols / (bw // 2)))
    ty = [round(i * height / ny) for i in range(ny + 1)]
    tx = [round(i * cols / nx) for i in range(nx + 1)]
    r = rng.integers(0, 1 << 30, size=(ny, nx, 3))
    bands = []
    for i in range(ny):
        y0, y1 = ty[i], ty[i + 1]
        tiles = []
        for j in range(nx):
            x0, x1 = tx[j], tx[j + 1]
            a, b, s = r[i, j]
            tiles.append((x0, x1, int(a % (bh - (y1 - y0) + 1)), int(b % (bw - (x1 - x0) + 1)), 1.0 if s & 1 else -1.0))
        bands.append((y0, y1, tiles))
    return bank, bands


def sensor_noise(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Standard-normal float32 noise (height, width, 3), independent per pixel and channel, from the bank."""
    bank, bands = _noise_plan(height, width, rng)
    out = np.empty((height, 3 * width), dtype=np.float32)
    for y0, y1, tiles in bands:
        for x0, x1, by, bx, sign in tiles:
            np.multiply(bank[by : by + y1 - y0, bx : bx + x1 - x0], np.float32(sign / _Q), out=out[y0:y1, x0:x1])
    return out.reshape(height, width, 3)


def add_noise_to_uint8(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """round(clip(img + sigma * sensor_noise)) as uint8 (H, W, 3), in one compiled pass per bank tile; img is
    not changed. Same noise as `sensor_noise(h, w, rng)`; rounding is half-up."""
    h, w = img.shape[:2]
    bank, bands = _noise_plan(h, w, rng)
    flat = np.ascontiguousarray(img, dtype=np.float32).reshape(h, 3 * w)
    out = np.empty((h, 3 * w), dtype=np.uint8)
    for y0, y1, tiles in bands:
        for x0, x1, by, bx, sign in tiles:
            kernels.noise_to_uint8(flat, bank, y0, y1, x0, x1, by, bx, np.float32(sign * sigma / _Q), out)
    return out.reshape(h, w, 3)


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
