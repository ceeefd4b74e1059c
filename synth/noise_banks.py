"""Noise banks: fine textures and sensor noise as windows of large fields built once per process.

A bank is built from a constant seed, so it is the same in every process; a sample takes windows of it at
offsets drawn from its own generator, so it stays a pure function of (config, index), and a window costs a
copy (or one compiled lookup pass) instead of a full-resolution synthesis (`texture`, `texture_linear`,
`sensor_noise`, `add_noise_to_uint8`). Images over 1280 px synthesise their textures directly, so nothing
repeats.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from . import kernels
from .fields import clip, fractal_noise, normalise

_BANK_SEED = 0x5EED_BA4C
_Q = 32.0  # bank values are round(32 * x) for unit-std x, stored as uint8 with an offset of 127 (+-3.97 std)
_PAIR = 254  # index of zero in the sum of two bank values (0..508)


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
    return normalise(out, out[::4, ::4])


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
