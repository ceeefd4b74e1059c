"""Procedural surfaces, photo crops, imaging effects and defects: shapes, ranges, determinism, mask honesty."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage, signal

from synth.defects import DEFECT_KINDS, draw_defect
from synth.surfaces import SURFACE_KINDS, apply_imaging, crop_background, make_surface

SMALL_SIZES = [(64, 64), (100, 70), (512, 512)]


def _check_image(img: np.ndarray, h: int, w: int) -> None:
    assert img.dtype == np.float32
    assert img.shape == (h, w, 3)
    assert np.isfinite(img).all()
    assert img.min() >= 0.0 and img.max() <= 255.0


def _limit(kind: str, scale: float) -> float:
    return 8.0 * max(1.0, scale) if kind == "stain" else 2.0


def _check_locality(before: np.ndarray, after: np.ndarray, fp: np.ndarray, limit: float) -> None:
    """Every changed pixel lies within `limit` px (Euclidean) of the footprint."""
    changed = (after != before).any(axis=2)
    ys, xs = np.nonzero(changed | fp)
    pad = int(limit) + 2
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, fp.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, fp.shape[1])
    dist = ndimage.distance_transform_edt(~fp[y0:y1, x0:x1])
    far = changed[y0:y1, x0:x1] & (dist > limit + 1e-6)
    assert not far.any(), f"{int(far.sum())} pixels changed more than {limit} px from the footprint"


@pytest.mark.parametrize("kind", SURFACE_KINDS)
def test_surface_shape_range_params(kind: str) -> None:
    img, params = make_surface(kind, 96, 130, np.random.default_rng(3))
    _check_image(img, 96, 130)
    assert params["kind"] == kind
    json.dumps(params)
    assert img.std() > 0.5, "surface should have texture, not be flat"


@pytest.mark.parametrize("kind", SURFACE_KINDS)
def test_surface_deterministic_and_seed_dependent(kind: str) -> None:
    a, pa = make_surface(kind, 80, 64, np.random.default_rng(11))
    b, pb = make_surface(kind, 80, 64, np.random.default_rng(11))
    c, _ = make_surface(kind, 80, 64, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert pa == pb
    assert not np.array_equal(a, c)


def _detail(img: np.ndarray) -> np.ndarray:
    """Luminance minus its 9 px local mean: the fine texture, without the smooth mottling and shading."""
    lum = img.mean(axis=2, dtype=np.float64)
    return lum - ndimage.uniform_filter(lum, 9)


def _best_match(detail: np.ndarray, y: int, x: int, side: int, region: tuple[int, int, int, int]) -> float:
    """Highest normalised correlation of the block detail[y:y+side, x:x+side] with any same-size window of
    `region` (y0, y1, x0, x1): about 1 where the block is repeated there, small for independent texture."""
    block = detail[y : y + side, x : x + side]
    block = (block - block.mean()) / np.linalg.norm(block - block.mean())
    y0, y1, x0, x1 = region
    area = detail[y0:y1, x0:x1]
    ones = np.ones((side, side))
    total, squares = signal.fftconvolve(area, ones, "valid"), signal.fftconvolve(area * area, ones, "valid")
    spread = np.sqrt(np.maximum(squares - total * total / side**2, 1e-9))
    return float((signal.fftconvolve(area, block[::-1, ::-1], "valid") / spread).max())


# 1024x1536 is synthesised at full size, 1200x1200 drawn from the largest noise banks (synth/noise_banks.py)
@pytest.mark.parametrize("size", [(1024, 1536), (1200, 1200)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", SURFACE_KINDS)
def test_large_surface_does_not_repeat_and_is_textured_everywhere(kind: str, size: tuple[int, int]) -> None:
    h, w = size
    img, params = make_surface(kind, h, w, np.random.default_rng(0))
    _check_image(img, h, w)
    again, params_again = make_surface(kind, h, w, np.random.default_rng(0))
    np.testing.assert_array_equal(img, again)
    assert params == params_again
    other, _ = make_surface(kind, h, w, np.random.default_rng(1))
    assert np.abs(img - other).mean() > 1.0, "another seed should give another surface"

    # texture in every 128 px block, and no block far brighter or darker than the surface as a whole
    lum = img.mean(axis=2)
    blocks = lum[: h // 128 * 128, : w // 128 * 128].reshape(h // 128, 128, w // 128, 128)
    assert blocks.std(axis=(1, 3)).min() > 0.5, "a flat block"
    assert np.abs(blocks.mean(axis=(1, 3)) / lum.mean() - 1.0).max() < 0.35

    # not a tiling of a smaller patch: the corner blocks are found nowhere in the opposite quarter
    detail, side = _detail(img), 96
    tiled = np.tile(img[:256, :384], (h // 256 + 1, w // 384 + 1, 1))[:h, :w]
    assert _best_match(_detail(tiled), 0, 0, side, (h // 2, h, w // 2, w)) > 0.9  # the check sees a repeat
    if kind == "woven":
        return  # a weave repeats by design
    # measured: at most 0.30, and 0.46 for brushed metal (its streaks are long and alike)
    assert _best_match(detail, 0, 0, side, (h // 2, h, w // 2, w)) < 0.6
    assert _best_match(detail, h - side, 0, side, (0, h // 2, w // 2, w)) < 0.6


def test_unknown_surface_kind_names_it() -> None:
    with pytest.raises(ValueError, match="marble") as err:
        make_surface("marble", 32, 32, np.random.default_rng(0))
    assert "concrete" in str(err.value)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("size", SMALL_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_defect_footprint_nonempty_and_local(kind: str, size: tuple[int, int]) -> None:
    h, w = size
    scale = min(h, w) / 512
    for seed in range(6):
        rng = np.random.default_rng(seed)
        img, _ = make_surface(SURFACE_KINDS[seed % len(SURFACE_KINDS)], h, w, rng)
        before = img.copy()
        fp, params = draw_defect(kind, img, rng, scale)
        assert fp.dtype == bool and fp.shape == (h, w)
        assert fp.any(), f"{kind} seed {seed}: empty footprint"
        assert params["kind"] == kind
        assert params["area_px"] == int(fp.sum())
        json.dumps(params)
        _check_image(img, h, w)
        changed = (img != before).any(axis=2)
        assert changed.any()
        # Opacity >= 0.5 towards a target colour moves nearly every footprint pixel.
        assert (changed & fp).sum() >= 0.8 * fp.sum()
        _check_locality(before, img, fp, _limit(kind, scale))


def test_defects_at_4k_nonempty_and_local() -> None:
    h, w = 2160, 3840
    scale = h / 512
    base = np.full((h, w, 3), 120.0, dtype=np.float32)
    base[::2] += 10.0  # some structure so that multiplicative shading changes pixels
    for i, kind in enumerate(DEFECT_KINDS):
        img = base.copy()
        fp, params = draw_defect(kind, img, np.random.default_rng(100 + i), scale)
        assert fp.any(), kind
        assert params["area_px"] == int(fp.sum())
        _check_locality(base, img, fp, _limit(kind, scale))


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defect_deterministic(kind: str) -> None:
    surface, _ = make_surface("ceramic", 120, 160, np.random.default_rng(5))
    out = []
    for _ in range(2):
        img = surface.copy()
        fp, params = draw_defect(kind, img, np.random.default_rng(42), 120 / 512)
        out.append((img, fp, params))
    np.testing.assert_array_equal(out[0][0], out[1][0])
    np.testing.assert_array_equal(out[0][1], out[1][1])
    assert out[0][2] == out[1][2]


def test_unknown_defect_kind_names_it() -> None:
    img = np.zeros((32, 32, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="dent") as err:
        draw_defect("dent", img, np.random.default_rng(0), 1.0)
    assert "scratch" in str(err.value)
    assert not img.any()


def test_crop_background_grayscale_upscaled(tmp_path) -> None:
    gray = (np.arange(40 * 30) % 251).reshape(30, 40).astype(np.uint8)
    path = tmp_path / "gray.png"
    Image.fromarray(gray).save(path)
    img, params = crop_background(path, 64, 64, np.random.default_rng(0))
    _check_image(img, 64, 64)
    assert params["kind"] == "photo" and params["file"] == "gray.png"
    assert params["scale"] > 1.0
    x0, y0, x1, y1 = params["crop"]
    assert 0 <= x0 < x1 <= 40 and 0 <= y0 < y1 <= 30
    # Aspect is kept: the crop is square like the target.
    assert abs((x1 - x0) - (y1 - y0)) <= 1
    np.testing.assert_array_equal(img[..., 0], img[..., 1])
    json.dumps(params)


def test_crop_background_16bit_and_exact_crop(tmp_path) -> None:
    ramp = np.tile(np.linspace(0, 65535, 200).astype(np.uint16), (150, 1))
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    img, params = crop_background(path, 100, 120, np.random.default_rng(1))
    _check_image(img, 100, 120)
    assert params["scale"] == 1.0
    x0, y0, x1, y1 = params["crop"]
    assert (x1 - x0, y1 - y0) == (120, 100)
    expected = np.rint(ramp[0, x0:x1] / 257.0)
    np.testing.assert_allclose(img[0, :, 0], expected, atol=1.0)
    a, _ = crop_background(path, 100, 120, np.random.default_rng(1))
    np.testing.assert_array_equal(img, a)


def test_crop_background_rgba(tmp_path) -> None:
    rgba = np.zeros((70, 90, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(path)
    img, _ = crop_background(path, 50, 50, np.random.default_rng(0))
    _check_image(img, 50, 50)
    assert np.all(img[..., 0] == 200) and np.all(img[..., 1] == 0)


def test_crop_background_unreadable_names_file(tmp_path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="broken.jpg"):
        crop_background(bad, 32, 32, np.random.default_rng(0))
    with pytest.raises(ValueError, match="missing.png"):
        crop_background(tmp_path / "missing.png", 32, 32, np.random.default_rng(0))


def test_apply_imaging_disabled_is_identity() -> None:
    img, _ = make_surface("painted", 64, 48, np.random.default_rng(0))
    out, params = apply_imaging(img, np.random.default_rng(1), gradient=0.0, vignette=0.0, noise=(0.0, 0.0))
    np.testing.assert_array_equal(out, img)
    assert out is not img
    assert params["noise_sigma"] == 0.0 and params["gradient"] == 0.0 and params["vignette"] == 0.0


def test_apply_imaging_noise_sigma_and_determinism() -> None:
    flat = np.full((256, 256, 3), 128.0, dtype=np.float32)
    out, params = apply_imaging(flat, np.random.default_rng(7), gradient=0.0, vignette=0.0, noise=(4.0, 6.0))
    assert out.dtype == np.float32 and out.shape == flat.shape
    assert 4.0 <= params["noise_sigma"] <= 6.0
    assert abs(float((out - flat).std()) - params["noise_sigma"]) < 0.15
    again, _ = apply_imaging(flat, np.random.default_rng(7), gradient=0.0, vignette=0.0, noise=(4.0, 6.0))
    np.testing.assert_array_equal(out, again)
    np.testing.assert_array_equal(flat, 128.0)  # input untouched


def test_apply_imaging_gradient_not_clipped_and_vignette_darkens_corners() -> None:
    bright = np.full((128, 192, 3), 250.0, dtype=np.float32)
    out, params = apply_imaging(bright, np.random.default_rng(3), gradient=0.5, vignette=0.0, noise=(0.0, 0.0))
    assert params["gradient"] > 0
    assert out.max() > 255.0  # the lit side of the gradient is allowed to overshoot
    assert out.min() < 250.0
    np.testing.assert_allclose(out.mean(), 250.0, rtol=1e-3)  # a ramp redistributes light, keeps the mean
    vig, params = apply_imaging(bright, np.random.default_rng(4), gradient=0.0, vignette=0.6, noise=(0.0, 0.0))
    assert params["vignette"] > 0
    assert vig[0, 0, 0] < vig[64, 96, 0] <= 250.0
    json.dumps(params)
