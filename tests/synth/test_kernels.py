"""The compiled kernels of synth/kernels.py against the numpy expressions they replace."""

from __future__ import annotations

import numpy as np
import pytest

from synth import kernels
from synth.fields import expand_lattice
from synth.noise_banks import Texture, _windows, texture, texture_linear, window_views


def _bilinear(lat: np.ndarray, k: int, h: int, w: int) -> np.ndarray:
    """Reference: along x on the lattice rows, then along y, in float32 as the kernels do."""
    x = np.arange(w)
    j, fx = x // k, ((x % k) / k).astype(np.float32)
    rows = (lat[:, j + 1] - lat[:, j]) * fx + lat[:, j]
    y = np.arange(h)
    i, fy = y // k, ((y % k) / k).astype(np.float32)[:, None]
    return (rows[i + 1] - rows[i]) * fy + rows[i]


@pytest.mark.parametrize("h,w,k", [(512, 512, 8), (513, 77, 4), (7, 9, 2), (33, 20, 1)])
def test_expand_lattice_is_bilinear_and_exact_at_the_lattice(h: int, w: int, k: int) -> None:
    rng = np.random.default_rng(h + w)
    lat = rng.uniform(0.5, 1.5, ((h - 1) // k + 2, (w - 1) // k + 2)).astype(np.float32)
    out = expand_lattice(lat, k, h, w)
    np.testing.assert_allclose(out, _bilinear(lat, k, h, w), rtol=1e-6)
    np.testing.assert_array_equal(out[::k, ::k], lat[: len(range(0, h, k)), : len(range(0, w, k))])
    with pytest.raises(ValueError, match="does not sample"):  # the kernel would read past a smaller lattice
        expand_lattice(lat[:-1], k, h, w)


@pytest.mark.parametrize("k", [0, 4])
def test_lit_rgb_is_clipped_gain_times_colour(k: int) -> None:
    rng = np.random.default_rng(k)
    h, w = 40, 51
    lum = rng.uniform(-0.2, 1.6, (h, w)).astype(np.float32)
    lat = rng.uniform(0.7, 1.3, ((h - 1) // max(k, 1) + 2, (w - 1) // max(k, 1) + 2)).astype(np.float32)
    gain = _bilinear(lat, k, h, w) if k else np.float32(1.0)
    cap = np.float32(1.2)
    level = np.clip(lum * gain, 0, cap)
    color = np.array([90.0, 120.0, 200.0], dtype=np.float32)
    out = np.empty((h, w, 3), np.float32)
    kernels.lit_rgb_const(lum, lat if k else np.ones((1, 1), np.float32), k, cap, *color, out)
    np.testing.assert_allclose(out, level[..., None] * color, rtol=1e-6)
    top = rng.random((h, w)) < 0.5
    other = np.array([10.0, 20.0, 30.0], dtype=np.float32)
    kernels.lit_rgb_two(lum, lat if k else np.ones((1, 1), np.float32), k, cap, top, color, other, out)
    np.testing.assert_allclose(out, level[..., None] * np.where(top[..., None], color, other), rtol=1e-6)


@pytest.mark.parametrize("mode", [kernels.SET, kernels.ADD, kernels.MUL])
def test_pair_lookup_reads_the_two_windows(mode: int) -> None:
    rng = np.random.default_rng(mode)
    bank = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    table = rng.normal(size=509).astype(np.float32)
    for flip in (False, True):
        win = _windows(bank, 30, 41, np.random.default_rng(11), flip=flip)
        a, b = window_views(bank, 30, 41, win)
        start = rng.uniform(0.5, 1.5, (30, 41)).astype(np.float32)
        values = table[a.astype(np.int32) + b]
        out = start.copy()
        kernels.pair_lookup(bank, *win, table, out, mode)
        expected = {kernels.SET: values, kernels.ADD: start + values, kernels.MUL: start * values}[mode]
        np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_texture_lookup_on_both_paths_is_the_table_at_the_codes() -> None:
    values = np.linspace(-1, 1, 509).astype(np.float32)
    for side in (256, 64):  # 64 < 100: synthesised directly instead of drawn from a bank
        tex = texture(100, 90, np.random.default_rng(1), "fractal", 6.0, 1.0, 0.5, side=side)
        assert isinstance(tex, Texture) and (tex._bank is None) == (side == 64)
        codes = tex.codes()
        assert codes.shape == (100, 90) and codes.max() <= 508
        np.testing.assert_array_equal(tex.lookup(values), values[codes])
        out = np.ones((100, 90), np.float32)
        np.testing.assert_allclose(tex.lookup(values, out=out, mode=kernels.ADD), 1 + values[codes], rtol=1e-6)
    with pytest.raises(ValueError, match="needs `out`"):
        tex.lookup(values, mode=kernels.MUL)


def test_texture_linear_is_linear_in_the_window_sum_and_its_modes_combine() -> None:
    from synth.noise_banks import _Q, _bank

    base = texture_linear(60, 70, np.random.default_rng(5), "fractal", 3.0, 1.0, 0.5, scale=0.2, offset=1.0)
    bank, _, extra = _bank("fractal", 256, 3.0, 1.0, 0.5)
    a, b = window_views(bank, 60, 70, _windows(bank, 60, 70, np.random.default_rng(5)))
    k = 0.2 * extra / (_Q * np.sqrt(2.0))
    np.testing.assert_allclose(base, (a.astype(np.float32) + b) * k + (1.0 - 254.0 * k), rtol=1e-5)
    out = np.full((60, 70), 2.0, np.float32)
    texture_linear(60, 70, np.random.default_rng(5), "fractal", 3.0, 1.0, 0.5, scale=0.2, offset=1.0, out=out,
                   mode=kernels.MUL)
    np.testing.assert_allclose(out, 2.0 * base, rtol=1e-6)
    assert abs(float(base.mean()) - 1.0) < 0.1 and 0.05 < float(base.std()) < 0.4


def test_woven_kernel_matches_the_numpy_weave() -> None:
    rng = np.random.default_rng(3)
    h, w, k = 37, 45, 64
    n = 20
    table_u = rng.normal(size=n * k).astype(np.float32)
    table_v = rng.normal(size=n * k).astype(np.float32)
    xk = np.arange(w, dtype=np.float32) * np.float32(k / 9.0)
    yk = np.arange(h, dtype=np.float32) * np.float32(k / 9.0)
    wyk = rng.uniform(200, 260, h).astype(np.float32)
    wxk = rng.uniform(200, 260, w).astype(np.float32)
    lum = np.empty((h, w), np.float32)
    top = np.empty((h, w), bool)
    kernels.woven(xk, wyk, yk, wxk, table_u, table_v, lum, top)
    a = table_u[np.add(xk[None, :], wyk[:, None]).astype(np.uint16)]
    b = table_v[np.add(yk[:, None], wxk[None, :]).astype(np.uint16)]
    np.testing.assert_array_equal(top, a * b > 0)
    warp = np.abs(a) * (b * b * np.float32(0.3) + np.float32(0.7))
    weft = np.abs(b) * (a * a * np.float32(0.3) + np.float32(0.7))
    np.testing.assert_allclose(lum, np.where(top, warp, weft), rtol=1e-6)


def test_restrict_to_footprint_zeros_exactly_the_faint_pixels_out_of_reach() -> None:
    from synth.footprint import restrict_to_footprint

    rng = np.random.default_rng(4)
    gy, gx = np.mgrid[:40, :50]
    keep = rng.random((40, 50)) < 0.6
    ys, xs = gy[keep], gx[keep]
    alpha = np.where(rng.random(ys.size) < 0.1, rng.uniform(0.5, 1, ys.size), rng.uniform(0, 0.5, ys.size))
    alpha[rng.random(ys.size) < 0.2] = 0.0
    alpha = alpha.astype(np.float32)
    out = restrict_to_footprint(ys, xs, alpha, 2.0)
    strong = np.stack([ys[alpha >= 0.5], xs[alpha >= 0.5]], 1)
    d2 = ((np.stack([ys, xs], 1)[:, None, :] - strong[None]) ** 2).sum(-1).min(1)
    expected = np.where((alpha < 0.5) & (d2 > 4), 0.0, alpha)
    np.testing.assert_array_equal(out, expected)
    assert out is not alpha and np.count_nonzero(out != alpha) > 0


def test_blend_is_the_clipped_lerp_and_leaves_zero_alpha_untouched() -> None:
    from synth.footprint import blend

    rng = np.random.default_rng(6)
    img = rng.uniform(0, 255, (20, 30, 3)).astype(np.float32)
    ys, xs = rng.integers(0, 20, 50), rng.integers(0, 30, 50)
    ys, xs = np.unique(np.stack([ys, xs], 1), axis=0).T
    alpha = rng.uniform(0, 1, ys.size).astype(np.float32)
    alpha[::3] = 0
    target = rng.uniform(-50, 300, (ys.size, 3)).astype(np.float32)
    expected = img.copy()
    cur = expected[ys, xs]
    expected[ys, xs] = np.where(alpha[:, None] > 0, cur + alpha[:, None] * (np.clip(target, 0, 255) - cur), cur)
    blend(img, ys, xs, alpha, target)
    np.testing.assert_allclose(img, expected, rtol=1e-6)
    np.testing.assert_array_equal(img[ys[::3], xs[::3]], expected[ys[::3], xs[::3]])


@pytest.mark.parametrize("dark", [True, False])
def test_stain_kernel_matches_the_numpy_stain(dark: bool) -> None:
    rng = np.random.default_rng(int(dark))
    img = rng.uniform(0, 255, (30, 40, 3)).astype(np.float32)
    window = img[5:25, 7:33]  # a view into the image, as place_defect passes it
    alpha = rng.uniform(0, 1, (20, 26)).astype(np.float32)
    alpha[alpha < 0.3] = 0
    amount = rng.uniform(0, 0.9, (20, 26)).astype(np.float32)
    tint = np.array([0.8, 1.0, 1.3], np.float32)
    expected = img.copy()
    ref = expected[5:25, 7:33]
    for c in range(3):
        f = amount * tint[c]
        if dark:
            ref[..., c] *= np.float32(1) - np.minimum(f, np.float32(0.95)) * alpha
        else:
            ref[..., c] += (np.float32(255) - ref[..., c]) * (f * alpha)
    kernels.stain(window, alpha, amount, tint, dark)
    np.testing.assert_allclose(img, expected, rtol=1e-6)
    np.testing.assert_array_equal(img[:5], expected[:5])  # outside the window: untouched


def test_city_block_is_scipys_taxicab_distance_transform():
    from scipy import ndimage

    rng = np.random.default_rng(8)
    for shape, density in (((37, 51), 0.02), ((5, 80), 0.2), ((64, 64), 0.001)):
        mask = rng.random(shape) < density
        mask[rng.integers(shape[0]), rng.integers(shape[1])] = True
        np.testing.assert_array_equal(kernels.city_block(mask),
                                      ndimage.distance_transform_cdt(~mask, metric="taxicab"))
