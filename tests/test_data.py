"""The shared training crop (defectforge/data.py): uniform crops and crops placed on defects."""

from __future__ import annotations

import numpy as np
import torch

from defectforge.data import SquareCrop


def _sample(mask: np.ndarray, key: str = "k") -> dict:
    h, w = mask.shape
    return {"image": torch.zeros(3, h, w, dtype=torch.uint8), "mask": torch.from_numpy(mask), "key": key}


def _crops(crop: SquareCrop, mask: np.ndarray, n: int) -> list[dict]:
    return [crop(_sample(mask)) for _ in range(n)]


def test_defect_crop_zero_keeps_the_uniform_crops_draw_for_draw():
    mask = np.zeros((200, 300), np.uint8)
    mask[10:12, 250:260] = 1
    plain = _crops(SquareCrop(64, 1, seed=3), mask, 20)
    zero = _crops(SquareCrop(64, 1, seed=3, defect_crop=0.0), mask, 20)
    assert all(torch.equal(a["mask"], b["mask"]) for a, b in zip(plain, zero, strict=True))


def test_defect_crops_contain_a_small_defect_that_uniform_crops_mostly_miss():
    mask = np.zeros((256, 256), np.uint8)
    mask[200:203, 30:36] = 2  # 18 px of class 2 near a corner
    uniform = _crops(SquareCrop(64, 2, seed=0), mask, 200)
    placed = _crops(SquareCrop(64, 2, seed=0, defect_crop=1.0), mask, 200)
    hit = lambda crops: sum(bool(c["labels"][1]) for c in crops)  # noqa: E731
    assert hit(placed) == 200  # the drawn pixel is always inside the crop
    assert hit(uniform) < 60  # the defect's neighbourhood is a small part of the image
    # the defect is not always at the same place in the crop (position drawn uniformly)
    rows = {int(torch.nonzero(c["mask"] == 2)[0, 0]) for c in placed}
    assert len(rows) > 20


def test_defect_crops_draw_the_class_first_so_a_rare_class_is_as_likely_as_a_common_one():
    mask = np.zeros((512, 512), np.uint8)
    mask[:, :200] = 1  # a large class-1 region on the left
    mask[400:402, 480:484] = 2  # 8 px of class 2 far from it
    crops = _crops(SquareCrop(32, 2, seed=1, defect_crop=1.0), mask, 400)
    rare = sum(bool(c["labels"][1]) for c in crops)
    assert 150 <= rare <= 250  # about half: the class is drawn before the pixel


def test_defect_crop_share_and_images_without_defects():
    mask = np.zeros((256, 256), np.uint8)
    mask[128, 128] = 1
    crops = _crops(SquareCrop(16, 1, seed=2, defect_crop=0.5), mask, 400)
    share = sum(bool(c["labels"][0]) for c in crops) / 400
    assert 0.4 <= share <= 0.6  # half placed on the pixel, the uniform half almost never hits it
    empty = _crops(SquareCrop(16, 1, seed=2, defect_crop=1.0), np.zeros((40, 50), np.uint8), 10)
    assert all(c["image"].shape == (3, 16, 16) and not c["labels"].any() for c in empty)


def test_validation_crops_ignore_defect_crop():
    mask = np.zeros((100, 100), np.uint8)
    mask[5, 5] = 1
    a = SquareCrop(32, 1, seed=None)(_sample(mask, "key7"))
    b = SquareCrop(32, 1, seed=None, defect_crop=1.0)(_sample(mask, "key7"))
    assert torch.equal(a["mask"], b["mask"])


def _textured(h: int, w: int) -> torch.Tensor:
    return torch.arange(h * w, dtype=torch.int64).reshape(1, h, w).remainder(251).to(torch.uint8).repeat(3, 1, 1)


def test_small_images_pad_keeps_the_scale_and_ignores_the_padding():
    mask = np.zeros((40, 70), np.uint8)
    mask[10:13, 5:60] = 2  # a 3 px wide scratch
    sample = {"image": _textured(40, 70), "mask": torch.from_numpy(mask), "key": "small"}
    padded = [SquareCrop(64, 2, seed=s, small_images="pad")(dict(sample)) for s in range(6)]
    for out in padded:
        assert out["image"].shape == (3, 64, 64) and out["mask"].shape == (64, 64)
        # every real pixel is there once, at its own scale: 40 x 64 of the 40 x 70 image (cropped in width only)
        assert int((out["mask"] != 255).sum()) == 40 * 64
        rows = torch.nonzero((out["mask"] == 2).any(1)).flatten()
        assert len(rows) == 3  # still 3 px wide
        assert out["labels"].tolist() == [0.0, 1.0]  # IGNORE marks no class
    assert len({int(torch.nonzero(o["mask"] != 255)[0, 0]) for o in padded}) > 1  # the image lands at random rows
    # "resize" (the default) scales it up instead: no ignored pixel, the scratch wider
    resized = SquareCrop(64, 2, seed=0)(dict(sample))
    assert not (resized["mask"] == 255).any()
    assert int((resized["mask"] == 2).any(1).sum()) > 3


def test_pad_mirrors_the_image_and_defect_crops_never_draw_the_ignored_value():
    mask = np.zeros((20, 30), np.uint8)
    mask[4, 4] = 1
    image = _textured(20, 30)
    crop = SquareCrop(48, 1, seed=0, defect_crop=1.0, small_images="pad")
    for _ in range(20):
        out = crop({"image": image, "mask": torch.from_numpy(mask), "key": "tiny"})
        real = torch.nonzero(out["mask"] != 255)
        y0, x0 = (int(v) for v in real.min(0).values)
        assert torch.equal(out["image"][:, y0:y0 + 20, x0:x0 + 30], image)  # the image itself, unscaled
        assert out["labels"].tolist() == [1.0] and int((out["mask"] == 1).sum()) == 1
        border = out["image"][:, out["mask"] == 255]
        assert border.float().std() > 0  # mirrored texture, not a constant fill
    # a padded crop from an image that already holds IGNORE (co-training) still places crops on real classes
    ignored = mask.copy()
    ignored[15:, :] = 255
    for _ in range(20):
        out = crop({"image": image, "mask": torch.from_numpy(ignored), "key": "t"})
        assert out["labels"].tolist() == [1.0]


def test_small_images_is_validated():
    import pytest

    from defectforge.config import ConfigError
    from finetune.config import FinetuneConfig
    from synth.train_diffusion import DiffusionTrainConfig

    with pytest.raises(ConfigError, match="small_images"):
        FinetuneConfig(small_images="crop").validate()
    with pytest.raises(ValueError, match="small_images"):
        SquareCrop(32, 1, seed=0, small_images="stretch")
    with pytest.raises(ConfigError, match="small_images"):
        DiffusionTrainConfig(small_images="pad").validate()
