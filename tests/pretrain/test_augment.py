"""Device augmentations: shared geometry for image and mask, class-index masks, colour jitter, seeding, errors."""

from __future__ import annotations

import pytest
import torch

from defectforge.augment import AugmentConfig, augment_batch, build_augment

VALUES = torch.tensor([0, 1, 2, 5])
GEOMETRY_ONLY = {"color_jitter": 0.0, "resized_crop": False}


def _marked_batch(b: int = 8, size: tuple[int, int] = (48, 48), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks with blobs of classes {1, 2, 5}; the image's channel 0 is 1 exactly on the defects."""
    g = torch.Generator().manual_seed(seed)
    masks = VALUES[torch.randint(0, 4, (b, size[0] // 4, size[1] // 4), generator=g)]
    masks = masks.repeat_interleave(4, 1).repeat_interleave(4, 2)
    images = torch.rand(b, 3, *size, generator=g) * 0.5
    images[:, 0] = (masks > 0).float()
    return images, masks


def _all_rotations_and_flips(x: torch.Tensor) -> list[torch.Tensor]:
    out = []
    for k in range(4):
        r = torch.rot90(x, k, dims=(-2, -1))
        out += [r, r.flip(-1)]
    return out


def test_mask_values_stay_in_the_input_set() -> None:
    aug = build_augment(AugmentConfig(), (40, 40))
    for seed in range(5):
        torch.manual_seed(seed)
        images, masks = _marked_batch(seed=seed)
        out, out_masks = augment_batch(aug, images, masks)
        assert out.shape == (8, 3, 40, 40) and out_masks.shape == (8, 40, 40)
        assert out_masks.dtype == torch.long
        assert torch.isin(out_masks, VALUES).all()
        assert out.min() >= 0 and out.max() <= 1


def test_full_crop_is_the_identity_and_half_crop_is_a_2x_zoom() -> None:
    geometry = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "color_jitter": 0.0}
    images, masks = _marked_batch(size=(40, 40))
    same = build_augment(AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **geometry), (40, 40))
    out, out_masks = augment_batch(same, images, masks)
    assert torch.equal(out_masks, masks) and torch.allclose(out, images, atol=1e-5)
    # A quarter of the area at twice the size: the 4-px mask blocks become 8-px runs (nearest sampling), so
    # the places where a row or column changes value are 8 px apart (or a multiple of 8).
    zoom = build_augment(AugmentConfig(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), **geometry), (40, 40))
    torch.manual_seed(0)
    _, zoomed = augment_batch(zoom, images, masks)
    for lines in (zoomed, zoomed.transpose(1, 2)):
        for line in lines.flatten(0, 1):
            changes = (line[1:] != line[:-1]).nonzero().flatten()
            assert ((changes[1:] - changes[:-1]) % 8 == 0).all(), line


@pytest.mark.parametrize("rot90", [0.0, 1.0])
def test_flips_and_rotations_move_image_and_mask_together(rot90: float) -> None:
    aug = build_augment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=rot90, **GEOMETRY_ONLY), (48, 48))
    moved = 0
    for seed in range(3):
        torch.manual_seed(seed)
        images, masks = _marked_batch(seed=seed)
        out, out_masks = augment_batch(aug, images, masks)
        # The defect pixels of the output mask are exactly where the moved image is marked.
        assert torch.equal(out_masks > 0, out[:, 0] == 1)
        for i in range(len(images)):
            candidates = _all_rotations_and_flips(torch.cat([images[i], masks[i][None].float()]))
            pair = torch.cat([out[i], out_masks[i][None].float()])
            assert any(torch.equal(pair, c) for c in candidates), "an exact flip/rotation of the input pair"
            moved += not torch.equal(out_masks[i], masks[i])
    assert moved > 0


def test_resized_crop_samples_image_and_mask_on_the_same_grid() -> None:
    # Stripes along one axis make the bilinear image 1-D, so the nearest mask pixel is the one whose weight
    # is above 1/2: a half-pixel shift between the two (align_corners=True for the image) breaks this.
    aug = build_augment(AugmentConfig(hflip=0.0, vflip=0.0, rot90=0.0, color_jitter=0.0), (48, 48))
    g = torch.Generator().manual_seed(0)
    for seed, axis in [(0, 1), (1, 2), (2, 1)]:
        stripes = (torch.rand(8, 64, generator=g) < 0.4).long()
        masks = (stripes[:, None, :] if axis == 1 else stripes[:, :, None]).expand(8, 64, 64).contiguous()
        images = masks[:, None].float().expand(8, 3, 64, 64).contiguous()
        torch.manual_seed(seed)
        out, out_masks = augment_batch(aug, images, masks)
        value = out[:, 0]
        sure = (value - 0.5).abs() > 1e-3
        assert torch.equal((value > 0.5)[sure], (out_masks > 0)[sure])


def test_color_jitter_changes_the_image_only() -> None:
    aug = build_augment(AugmentConfig(hflip=0, vflip=0, rot90=0, color_jitter=1.0, resized_crop=False), (32, 32))
    torch.manual_seed(0)
    images, masks = _marked_batch(size=(32, 32))
    images[:, 1] = 1.0  # saturated channel: brightness up must be clamped
    out, out_masks = augment_batch(aug, images, masks)
    assert torch.equal(out_masks, masks)
    assert not torch.allclose(out, images)
    assert out.min() >= 0 and out.max() <= 1


def test_adjust_colors_equals_torchvision_where_nothing_clips() -> None:
    from torchvision.transforms.v2 import functional as TF

    from defectforge.augment import adjust_colors

    torch.manual_seed(3)
    images = 0.35 + 0.3 * torch.rand(4, 3, 20, 24)  # mid-range: no step of torchvision's clips
    brightness = torch.tensor([0.8, 1.0, 1.1, 1.2])
    contrast = torch.tensor([1.2, 0.8, 1.0, 0.9])
    saturation = torch.tensor([0.9, 1.1, 1.05, 1.0])
    out = adjust_colors(images, brightness, contrast, saturation)
    for i in range(4):
        ref = TF.adjust_brightness(images[i], float(brightness[i]))
        ref = TF.adjust_contrast(ref, float(contrast[i]))
        ref = TF.adjust_saturation(ref, float(saturation[i]))
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_color_jitter_scales_gray_by_brightness_and_keeps_luma_ratio() -> None:
    from defectforge.augment import LUMA, adjust_colors

    gray = torch.full((2, 3, 8, 8), 0.4)
    gray[1] = torch.linspace(0.2, 0.6, 64).view(8, 8)  # a neutral ramp
    factors = torch.tensor([0.85, 1.15])
    out = adjust_colors(gray, factors, torch.tensor([1.2, 0.8]), torch.tensor([0.9, 1.1]))
    # a neutral image stays neutral; contrast moves values about the mean, which brightness scaled
    assert torch.allclose(out[0], 0.4 * 0.85 * torch.ones(3, 8, 8), atol=1e-6)
    assert torch.allclose(out[1, 0], out[1, 2], atol=1e-6)
    luma = torch.tensor(LUMA).view(1, 3, 1, 1)
    colour = 0.3 + 0.4 * torch.rand(2, 3, 16, 16)
    out = adjust_colors(colour, factors, torch.tensor([1.1, 0.9]), torch.tensor([0.9, 1.1]))
    ratio = (out * luma).sum(1).mean((1, 2)) / (colour * luma).sum(1).mean((1, 2))
    assert torch.allclose(ratio, factors, atol=1e-5)  # contrast and saturation keep the mean luma


def test_color_jitter_probability_and_hue() -> None:
    images, masks = _marked_batch(size=(32, 32))
    images = 0.3 + 0.4 * torch.rand_like(images)
    none = build_augment(AugmentConfig(hflip=0, vflip=0, rot90=0, color_jitter=0.0, resized_crop=False), (32, 32))
    assert none.color_jitter == 0 and torch.equal(augment_batch(none, images, masks)[0], images)
    hue = build_augment(AugmentConfig(hflip=0, vflip=0, rot90=0, color_jitter=1.0, hue_jitter=0.5,
                                      resized_crop=False), (32, 32))
    assert hue.hue is not None
    torch.manual_seed(1)
    out, _ = augment_batch(hue, images, masks)
    # with only brightness/contrast/saturation every pixel keeps its channel order; a hue shift reorders some
    order_in = images.argmax(1)
    assert (out.argmax(1) != order_in).float().mean() > 0.1


def test_output_images_are_clamped() -> None:
    aug = build_augment(AugmentConfig(color_jitter=0.0), (32, 32))
    images, masks = _marked_batch()
    out, _ = augment_batch(aug, images * 1.5 - 0.2, masks)
    assert out.min() == 0 and out.max() == 1


def test_reproducible_with_manual_seed() -> None:
    aug = build_augment(AugmentConfig(), (40, 40))
    images, masks = _marked_batch()
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(augment_batch(aug, images, masks))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])


def test_rotation_is_left_out_for_non_square_size() -> None:
    aug = build_augment(AugmentConfig(rot90=1.0), (32, 48))
    assert aug.rot90 == 0.0 and build_augment(AugmentConfig(rot90=1.0), (32, 32)).rot90 == 1.0
    images, masks = _marked_batch(size=(64, 64))
    out, out_masks = augment_batch(aug, images, masks)
    assert out.shape == (8, 3, 32, 48) and out_masks.shape == (8, 32, 48)


def test_non_square_flips_without_crop() -> None:
    aug = build_augment(AugmentConfig(hflip=0.5, vflip=0.5, rot90=1.0, **GEOMETRY_ONLY), (32, 48))
    torch.manual_seed(0)
    images, masks = _marked_batch(size=(32, 48))
    out, out_masks = augment_batch(aug, images, masks)
    assert torch.equal(out_masks > 0, out[:, 0] == 1)
    for i in range(len(images)):
        pair = torch.cat([images[i], masks[i][None].float()])
        flips = [pair, pair.flip(-1), pair.flip(-2), pair.flip(-1).flip(-2)]
        assert any(torch.equal(torch.cat([out[i], out_masks[i][None].float()]), f) for f in flips)


def test_input_of_another_size_without_crop_is_refused() -> None:
    aug = build_augment(AugmentConfig(rot90=1.0, resized_crop=False), (32, 32))
    images, masks = _marked_batch(size=(32, 48))
    with pytest.raises(ValueError, match="output size"):
        augment_batch(aug, images, masks)


def test_dihedral_codes_are_all_drawn_and_uniform_over_quarter_turns() -> None:
    # With rot90=1 and no flip, each output is a quarter turn of its input and the four turns are about equally
    # likely (400 draws: expected 100 each).
    aug = build_augment(AugmentConfig(hflip=0.0, vflip=0.0, rot90=1.0, **GEOMETRY_ONLY), (8, 8))
    torch.manual_seed(0)
    images = torch.arange(64.0).view(1, 1, 8, 8).expand(400, 3, 8, 8).contiguous() / 64
    masks = torch.arange(64).view(1, 8, 8).expand(400, 8, 8).contiguous()
    _, out_masks = augment_batch(aug, images, masks)
    counts = [sum(torch.equal(m, torch.rot90(masks[0], k)) for m in out_masks) for k in range(4)]
    assert sum(counts) == 400 and min(counts) > 70, counts


def test_bad_inputs_are_rejected() -> None:
    aug = build_augment(AugmentConfig(), (32, 32))
    images, masks = _marked_batch(size=(32, 32))
    with pytest.raises(ValueError, match="masks"):
        augment_batch(aug, images, masks.float())
    with pytest.raises(ValueError, match="masks"):
        augment_batch(aug, images, masks[:, :16])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hflip", 1.5, "[0, 1]"),
        ("color_jitter", -0.1, "[0, 1]"),
        ("hue_jitter", 0.6, "[0, 0.5]"),
        ("crop_scale", (0.9, 0.2), "low <= high"),
        ("crop_scale", (0.2, 1.5), "<= 1"),
        ("crop_ratio", (0.0, 1.0), "0 < low"),
    ],
)
def test_bad_config_names_key_value_and_expectation(key: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError) as err:
        build_augment(AugmentConfig(**{key: value}), (32, 32))
    message = str(err.value)
    assert f"'{key}'" in message and repr(value) in message and expected in message
