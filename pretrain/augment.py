"""Batch augmentations with kornia on the tensors' device, identical for the image and its class-index mask.

What kornia 0.9's `AugmentationSequential(data_keys=["input", "mask"])` does with the mask (read in its
source, checked by tests/pretrain/test_augment.py):

- geometric children resample the ``mask`` key with nearest neighbour by default and with the same
  parameters as the image; intensity children (color jitter) leave it untouched;
- `RandomResizedCrop` in its default ``cropping_mode="slice"`` resizes a nearest-resampled mask on the
  half-pixel grid (``nearest-exact``) whatever ``align_corners`` says, so the image is resized with
  ``align_corners=False`` too: with ``True`` the image and the mask would be off by a fraction of a pixel;
- `RandomRotation90` is an affine warp; bilinear leaves ~1e-5 noise in the image, while nearest at exact
  multiples of 90 degrees is bit-identical to ``torch.rot90``, so both keys use nearest.

The mask is handed to kornia as float32 ``(B, 1, H, W)`` (integer masks are only accepted natively by recent
kornia releases) and cast back with ``round().long()``; nearest sampling only copies values, so the round is
a no-op guard, not a correction.

Randomness: kornia draws its parameters from torch's global RNG; the training loop seeds it with
``torch.manual_seed(seed + rank)``, which makes the augmentations reproducible per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import kornia.augmentation as K
import torch
from torch import Tensor

from synth.config import ConfigError


@dataclass
class AugmentConfig:
    """Training augmentations; `validate()` checks every field.

    - ``hflip`` / ``vflip``: probability of a horizontal / vertical flip per sample.
    - ``rot90``: probability per sample of a rotation by a uniformly drawn multiple of 90 degrees
      (0, 90, 180 or 270, so the image changes with probability ``0.75 * rot90``). Only for square outputs:
      for a non-square ``size`` the rotation is left out, since a quarter turn would change the shape.
    - ``color_jitter``: probability of brightness/contrast/saturation 0.2/0.2/0.1 and hue 0.02 (image only).
    - ``resized_crop``: random resized crop to ``size`` with area fraction in ``crop_scale`` and aspect ratio
      (width / height) in ``crop_ratio``; without it the input is expected to be ``size`` already.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    color_jitter: float = 0.8
    resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.333)

    def validate(self) -> None:
        for key in ("hflip", "vflip", "rot90", "color_jitter"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"key '{key}': value {value!r} is invalid, expected a probability in [0, 1]")
        if not isinstance(self.resized_crop, bool):
            raise ConfigError(f"key 'resized_crop': value {self.resized_crop!r} is invalid, expected true or false")
        _check_range("crop_scale", self.crop_scale, upper=1.0)
        _check_range("crop_ratio", self.crop_ratio, upper=math.inf)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_range(key: str, value: Any, upper: float) -> None:
    ok = (isinstance(value, tuple | list) and len(value) == 2 and all(_is_number(v) for v in value)
          and 0.0 < value[0] <= value[1] <= upper)
    if not ok:
        bound = "1" if upper == 1.0 else "inf"
        raise ConfigError(f"key '{key}': value {value!r} is invalid, "
                          f"expected [low, high] with 0 < low <= high <= {bound}")


def _check_size(size: Any) -> tuple[int, int]:
    if (not isinstance(size, tuple | list) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"size must be (H, W) positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def build_augment(cfg: AugmentConfig, size: tuple[int, int]) -> K.AugmentationSequential:
    """Build the augmentation pipeline for ``(image, mask)`` batches with output size ``size`` (H, W).

    Order: resized crop (so the rest works on the smaller output), flips, rotation, color jitter. Children with
    probability 0 are left out. Call it through `augment_batch`.
    """
    cfg.validate()
    size = _check_size(size)
    children: list[torch.nn.Module] = []
    if cfg.resized_crop:
        children.append(K.RandomResizedCrop(size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                            align_corners=False, p=1.0))
    if cfg.hflip > 0:
        children.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        children.append(K.RandomVerticalFlip(p=cfg.vflip))
    if cfg.rot90 > 0 and size[0] == size[1]:
        # times ~ U(-2, 2) rounded gives -2 and 2 (both 180 degrees) half weight each, so the four
        # quarter turns are equally likely.
        children.append(K.RandomRotation90(times=(-2, 2), resample="nearest", p=cfg.rot90))
    if cfg.color_jitter > 0:
        children.append(K.ColorJitter(0.2, 0.2, 0.1, 0.02, p=cfg.color_jitter))
    return K.AugmentationSequential(*children, data_keys=["input", "mask"])


def augment_batch(aug: K.AugmentationSequential, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Apply `aug` (from `build_augment`) to images ``(B, 3, H, W)`` in [0, 1] and long masks ``(B, H, W)``.

    Returns images clamped to [0, 1] and long masks ``(B, H', W')``, where every mask value is one of the input's.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    b, _, h, w = images.shape
    if masks.shape != (b, h, w) or masks.dtype.is_floating_point or masks.dtype == torch.bool:
        raise ValueError(f"masks must be an integer (B, H, W) tensor of shape {(b, h, w)}, "
                         f"got {tuple(masks.shape)} {masks.dtype}")
    if b == 0:
        return images, masks.long()
    if h != w and _rotates_input(aug):
        raise ValueError(f"a 90-degree rotation needs square inputs, got {h}x{w}: enable resized_crop with a "
                         "square size, or set rot90 to 0")
    out_images, out_masks = aug(images, masks[:, None].float())
    return out_images.clamp(0.0, 1.0), out_masks[:, 0].round().long()


def _rotates_input(aug: K.AugmentationSequential) -> bool:
    """True when a rotation acts before any resized crop, i.e. on the raw input shape."""
    for child in aug.children():
        if isinstance(child, K.RandomResizedCrop):
            return False
        if isinstance(child, K.RandomRotation90):
            return True
    return False
