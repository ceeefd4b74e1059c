"""The fast renderer's building blocks: exactness of the shortcuts, every image size, and samples that stay a pure
function of (config, index) although textures and sensor noise come from per-process noise banks."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from defectforge.config import load_config
from synth.compose import SynthConfig, render_sample
from synth.defects import DEFECT_KINDS, draw_defect
from synth.footprint import radial_boundary, stroke_pixels
from synth.noise_banks import add_noise_to_uint8, sensor_noise
from synth.surfaces import SURFACE_KINDS, draw_imaging, make_surface

REPO = Path(__file__).resolve().parents[2]


def _digest(sample) -> str:
    image, mask, meta = sample
    h = hashlib.sha256(image.tobytes())
    h.update(mask.tobytes())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def test_sample_does_not_depend_on_what_the_process_rendered_before() -> None:
    """Banks are built lazily; a fresh process that renders only sample 7 must give the same bytes."""
    cfg = load_config(SynthConfig, None, {"image_size": [96, 160]})
    for i in range(7):
        render_sample(cfg, i)
    here = _digest(render_sample(cfg, 7))
    code = (
        "import hashlib, json; from synth.compose import SynthConfig, render_sample; "
        "from defectforge.config import load_config; "
        "im, m, meta = render_sample(load_config(SynthConfig, None, {'image_size': [96, 160]}), 7); "
        "h = hashlib.sha256(im.tobytes()); h.update(m.tobytes()); "
        "h.update(json.dumps(meta, sort_keys=True).encode()); print(h.hexdigest())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == here


@pytest.mark.parametrize("size", [(64, 64), (70, 300), (640, 96), (641, 80), (100, 1281)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", SURFACE_KINDS)
def test_surface_every_size(kind: str, size: tuple[int, int]) -> None:
    """Bank windows (up to 640 and 1280 px) and direct synthesis (larger) on square and thin images."""
    h, w = size

    def surface():
        rng = np.random.default_rng(5)
        imaging = draw_imaging(rng, gradient=0.25, vignette=0.3, noise=(0.5, 3.0))
        return make_surface(kind, h, w, rng, imaging)

    img, params = surface()
    assert img.shape == (h, w, 3) and img.dtype == np.float32
    assert np.isfinite(img).all() and img.min() >= 0.0 and img.max() <= 255.0
    assert img.std() > 0.5
    np.testing.assert_array_equal(img, surface()[0])
    json.dumps(params)


@pytest.mark.parametrize("axis", [0.0, 90.0, 3.5, -7.0, 86.0, 101.0])
def test_metal_streaks_follow_the_axis(axis: float) -> None:
    """Streaks vary little along the brushing direction and a lot across it, tilted or not."""
    from synth.surfaces import _brushed

    field = _brushed(256, 256, np.random.default_rng(1), 1.0, axis, 80.0)
    assert field.shape == (256, 256)
    a = math.radians(axis)
    along = np.array([math.sin(a), math.cos(a)])  # (dy, dx) per px along the streaks
    ys, xs = np.mgrid[40:216, 40:216]

    def step_diff(d: np.ndarray) -> float:
        y2 = np.rint(ys + 3 * d[0]).astype(int)
        x2 = np.rint(xs + 3 * d[1]).astype(int)
        return float(np.abs(field[y2, x2] - field[ys, xs]).mean())

    assert step_diff(along) < 0.5 * step_diff(np.array([along[1], -along[0]]))


def test_add_noise_is_sensor_noise_rounded() -> None:
    rng = np.random.default_rng(0)
    img = rng.uniform(-20, 275, (70, 1500, 3)).astype(np.float32)  # wider than a bank tile, out of range too
    out = add_noise_to_uint8(img, 2.5, np.random.default_rng(3))
    ref = np.clip(np.floor(img + np.float32(2.5) * sensor_noise(70, 1500, np.random.default_rng(3)) + 0.5), 0, 255)
    np.testing.assert_array_equal(out, ref.astype(np.uint8))
    noise = sensor_noise(300, 400, np.random.default_rng(4))
    assert abs(noise.std() - 1.0) < 0.02 and abs(noise.mean()) < 0.02
    # channels and neighbours are independent
    assert abs(np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]) < 0.02
    assert abs(np.corrcoef(noise[:, :-1, 0].ravel(), noise[:, 1:, 0].ravel())[0, 1]) < 0.02


def test_radial_boundary_table_matches_the_harmonics() -> None:
    rng = np.random.default_rng(2)
    amps = rng.normal(0, 1, 6) * 0.18 / np.arange(2, 8) ** 0.9
    phases = rng.uniform(0, 2 * math.pi, 6)
    theta = rng.uniform(-math.pi, math.pi, 5000)
    for radius in (3.0, 40.0, 500.0):
        harmonics = sum(a * np.cos(k * theta + p) for k, a, p in zip(range(2, 8), amps, phases, strict=True))
        exact = radius * np.maximum(1 + harmonics, 0.45)
        got = radial_boundary(np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32), radius, amps, phases)
        assert np.abs(got - exact).max() < 0.2  # px, at any radius


def test_stroke_distances_are_exact_distances_to_the_polyline() -> None:
    rng = np.random.default_rng(7)
    pts = np.cumsum(rng.normal(0, 1, (60, 2)), axis=0) + 40
    second = np.cumsum(rng.normal(0, 1, (30, 2)), axis=0) + pts[20]
    points = np.concatenate([pts, second])
    widths = rng.uniform(0.5, 4, len(points))
    ys, xs, dist, seg, t = stroke_pixels(points, widths, (90, 80), starts=[0, len(pts)])
    reach = widths.max() / 2 + 1.5
    # brute force over all segments, skipping the one that would join the two paths
    a, b = points[:-1], points[1:]
    keep = np.ones(len(a), bool)
    keep[len(pts) - 1] = False
    a, b = a[keep], b[keep]
    q = np.stack([xs, ys], 1).astype(float)[:, None, :]
    v = (b - a)[None]
    tt = np.clip(((q - a[None]) * v).sum(-1) / (v * v).sum(-1), 0, 1)
    d = np.linalg.norm(q - a[None] - tt[..., None] * v, axis=-1).min(1)
    np.testing.assert_allclose(dist, d, atol=1e-4)
    assert (dist <= reach + 1e-6).all()
    # and every pixel within reach is there
    gy, gx = np.mgrid[:90, :80]
    qa = np.stack([gx.ravel(), gy.ravel()], 1).astype(float)[:, None, :]
    ta = np.clip(((qa - a[None]) * v).sum(-1) / (v * v).sum(-1), 0, 1)
    da = np.linalg.norm(qa - a[None] - ta[..., None] * v, axis=-1).min(1)
    got = set(zip(ys.tolist(), xs.tolist(), strict=True))
    near = da <= reach - 1e-4
    assert set(zip(gy.ravel()[near].tolist(), gx.ravel()[near].tolist(), strict=True)) <= got
    assert len(got) == len(ys)  # each pixel once


@pytest.mark.parametrize("size", [(512, 512), (300, 700)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_render_metadata_matches_the_mask(size: tuple[int, int]) -> None:
    cfg = load_config(SynthConfig, None, {"image_size": list(size), "empty_ratio": 0.0,
                                          "defects_per_image": [2, 4]})
    for index in range(6):
        image, mask, meta = render_sample(cfg, index)
        assert image.shape == (*size, 3) and mask.shape == size
        per_class: dict[int, int] = {}
        for d in meta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            inside = mask[y0:y1, x0:x1] == d["class_id"]
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            assert d["area_px"] <= d["params"]["area_px"]
            per_class[d["class_id"]] = per_class.get(d["class_id"], 0) + d["area_px"]
        for class_id, area in per_class.items():
            assert area >= int((mask == class_id).sum())  # equal unless two defects of a class overlap
        assert set(np.unique(mask)) <= {0, *per_class}


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_defects_leave_unmarked_pixels_bit_identical_far_away(kind: str) -> None:
    img, _ = make_surface("asphalt", 200, 260, np.random.default_rng(9))
    before = img.copy()
    fp, _ = draw_defect(kind, img, np.random.default_rng(10), 200 / 512)
    changed = (img != before).any(axis=2)
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(~fp)
    limit = 8.0 if kind == "stain" else 2.0
    assert not (changed & (dist > limit)).any()
