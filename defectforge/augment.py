"""Batch augmentations on the tensors' device, identical for the image and its class-index mask.

Three steps, in this order:

1. Random resized crop: per sample a box of area fraction in ``crop_scale`` and aspect ratio (width / height) in
   ``crop_ratio`` (log-uniform; a side longer than the input is clipped to it), resampled to the output size
   by one batched ``F.grid_sample`` with the same sampling grid for the image (bilinear) and the mask
   (nearest, so mask values are copied, never blended). Sharing the grid keeps the two aligned to the
   pixel, by construction. kornia's ``RandomResizedCrop`` does the same per sample in a Python loop of
   resizes: 44 ms of a 475 ms training step at 128 px, batch 32, on the 2-core CPU this project is measured
   on, against about 3 ms here (bench/README.md).
2. Flips and quarter turns (the dihedral group of the square): per sample a horizontal flip, a vertical
   flip and a rotation by a uniformly drawn multiple of 90 degrees, applied to image and mask by one
   ``torch.gather`` with a precomputed pixel permutation per combination. These are exact pixel moves
   (``torch.equal`` to ``torch.flip`` / ``torch.rot90``); kornia's ``RandomRotation90`` does the same with an
   affine warp, and its flip and rotation modules cost 16 ms per batch of 32 at 128 px (same machine),
   against under 2 ms here.
3. Colour jitter on the image only: per sample (with probability ``color_jitter``) a brightness, contrast and
   saturation factor drawn uniformly from 1 +- 0.2, 1 +- 0.2 and 1 +- 0.1, applied in that order with
   torchvision's definitions (brightness scales, contrast blends with the image's mean luma, saturation
   blends with the pixel's luma). The three steps are linear in the pixel values, so they compose into one
   3x3 colour matrix plus an offset per sample, applied by one batched matrix product and clamped to [0, 1]
   once at the end (torchvision and kornia clamp after every step; the results are equal wherever no
   intermediate value leaves [0, 1], which the tests check). kornia's ``ColorJitter`` for the same three
   steps cost 19 ms per training step in the loop at 128 px, batch 32, on the 2-core CPU this project is
   measured on; this costs about 1 ms. A hue shift needs the HSV round trip, 29 ms per batch with kornia on
   the same machine, so ``hue_jitter`` is a separate key, 0 by default, and only then is kornia's
   ``ColorJitter`` (hue only) run, on the same samples.

Randomness: the crop, the dihedral step, the colour factors and kornia draw from torch's global CPU RNG; the
training loop seeds it with ``torch.manual_seed(seed + rank)``, which makes the augmentations reproducible per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor

from defectforge.config import ConfigError


@dataclass
class AugmentConfig:
    """Training augmentations; `validate()` checks every field.

    - ``hflip`` / ``vflip``: probability of a horizontal / vertical flip per sample.
    - ``rot90``: probability per sample of a rotation by a uniformly drawn multiple of 90 degrees
      (0, 90, 180 or 270, so the image changes with probability ``0.75 * rot90``). Only for square outputs:
      for a non-square ``size`` the rotation is left out, since a quarter turn would change the shape.
    - ``color_jitter``: probability per sample of a brightness/contrast/saturation jitter of 0.2/0.2/0.1
      (image only), plus a hue shift of up to ``hue_jitter`` (fraction of the colour circle, <= 0.5).
    - ``resized_crop``: random resized crop to ``size`` with area fraction in ``crop_scale`` and aspect ratio
      (width / height) in ``crop_ratio``; without it the input is expected to be ``size`` already.
    """

    hflip: float = 0.5
    vflip: float = 0.5
    rot90: float = 0.5
    color_jitter: float = 0.8
    hue_jitter: float = 0.0
    resized_crop: bool = True
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.333])

    def validate(self) -> None:
        for key in ("hflip", "vflip", "rot90", "color_jitter"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"key '{key}': value {value!r} is invalid, expected a probability in [0, 1]")
        if not _is_number(self.hue_jitter) or not 0.0 <= self.hue_jitter <= 0.5:
            raise ConfigError(f"key 'hue_jitter': value {self.hue_jitter!r} is invalid, expected a number in [0, 0.5]")
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


@dataclass
class Augment:
    """The pipeline `build_augment` makes; apply it with `augment_batch`."""

    size: tuple[int, int]
    crop_scale: tuple[float, float] | None  # None: no resized crop
    crop_ratio: tuple[float, float]
    hflip: float
    vflip: float
    rot90: float  # 0 for a non-square output size
    color_jitter: float  # probability per sample of the brightness/contrast/saturation jitter (image only)
    hue: K.ColorJitter | None  # kornia's hue-only jitter (p=1), run on the jittered samples when hue_jitter > 0
    _perms: dict[tuple, Tensor] = field(default_factory=dict, repr=False)

    def resized_crop(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Random resized crops of images (bilinear) and masks (nearest) on one shared sampling grid, per sample."""
        b, c, h, w = images.shape
        lo, hi = self.crop_scale
        area = (lo + (hi - lo) * torch.rand(b)) * (h * w)
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(b))
        cw = (area * ratio).sqrt().clamp(1.0, w)
        ch = (area / ratio).sqrt().clamp(1.0, h)
        x0 = torch.rand(b) * (w - cw)
        y0 = torch.rand(b) * (h - ch)
        # Output normalised coordinate u (align_corners=False) -> input (2 * x0 + (u + 1) * cw) / w - 1.
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw / w, (2 * x0 + cw) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * y0 + ch) / h - 1
        grid = F.affine_grid(theta.to(images.device, images.dtype), [b, c, *self.size], align_corners=False)
        out_images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        out_masks = F.grid_sample(masks[:, None].to(images.dtype), grid, mode="nearest", padding_mode="border",
                                  align_corners=False)
        return out_images, out_masks[:, 0].round().long()

    def jitter(self, images: Tensor) -> Tensor:
        """Random brightness/contrast/saturation (and, if configured, hue) jitter per sample; not clamped."""
        b = images.shape[0]
        chosen = torch.rand(b) < self.color_jitter
        if not bool(chosen.any()):
            return images
        factors = 1.0 + (2.0 * torch.rand(b, 3) - 1.0) * torch.tensor(JITTER_RANGES)
        factors[~chosen] = 1.0
        images = adjust_colors(images, *factors.to(images.device, images.dtype).unbind(1))
        if self.hue is not None:
            index = chosen.nonzero()[:, 0].to(images.device)
            images = images.index_copy(0, index, self.hue(images.index_select(0, index).clamp(0.0, 1.0)))
        return images

    def dihedral(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        """Random flips and quarter turns of square (or, without rotation, any) images and masks, per sample."""
        b, c, h, w = images.shape
        if self.hflip == 0 and self.vflip == 0 and self.rot90 == 0:
            return images, masks
        hf = torch.rand(b) < self.hflip
        vf = torch.rand(b) < self.vflip
        quarter = torch.where(torch.rand(b) < self.rot90, torch.randint(0, 4, (b,)), torch.zeros(b, dtype=torch.long))
        codes = (hf.long() * 2 + vf.long()) * 4 + quarter  # 16 codes: (hflip, vflip, quarter turns)
        if not bool(codes.any()):
            return images, masks
        perms = self._permutations(h, w, images.device)
        index = perms[codes.to(images.device)]  # (B, H*W): output pixel p takes input pixel index[p]
        out_images = images.flatten(2).gather(2, index[:, None].expand(b, c, h * w)).view(b, c, h, w)
        out_masks = masks.flatten(1).gather(1, index).view(b, h, w)
        return out_images, out_masks

    def _permutations(self, h: int, w: int, device: torch.device) -> Tensor:
        key = (h, w, str(device))
        if key not in self._perms:
            grid = torch.arange(h * w).view(h, w)
            rows = []
            for code in range(16):
                hf, vf, quarter = code // 8, (code // 4) % 2, code % 4
                g = grid.flip(-1) if hf else grid
                g = g.flip(-2) if vf else g
                g = torch.rot90(g, quarter, dims=(-2, -1)) if h == w else g
                rows.append(g.reshape(-1))
            self._perms[key] = torch.stack(rows).to(device)
        return self._perms[key]


JITTER_RANGES = (0.2, 0.2, 0.1)  # brightness, contrast, saturation: factor drawn from 1 +- range
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale


def adjust_colors(images: Tensor, brightness: Tensor, contrast: Tensor, saturation: Tensor) -> Tensor:
    """Brightness, then contrast, then saturation with per-sample factors ``(B,)``, as one colour matrix per sample.

    torchvision's definitions: brightness ``x * b``; contrast ``c * x + (1 - c) * mean(luma(x))``; saturation
    ``s * x + (1 - s) * luma(x)``. Since luma is linear with weights summing to 1, the composition is
    ``s c b x + (1 - s) c b luma(x) + (1 - c) b mean(luma(x))``: a 3x3 matrix ``M`` and an offset per sample.
    Unclamped (the caller clamps once); equal to torchvision's step-by-step result wherever that never clips.
    """
    b, ch, h, w = images.shape
    if ch != 3:
        raise ValueError(f"colour jitter needs RGB images (B, 3, H, W), got {tuple(images.shape)}")
    luma = torch.tensor(LUMA, device=images.device, dtype=images.dtype)
    cb = contrast * brightness
    matrix = ((1.0 - saturation) * cb)[:, None, None] * luma.expand(3, 3)  # every row: (1 - s) c b * luma
    matrix = matrix + torch.diag_embed((saturation * cb)[:, None].expand(b, 3))
    mean_luma = images.mean(dim=(2, 3)) @ luma  # (B,)
    offset = ((1.0 - contrast) * brightness * mean_luma)[:, None, None].expand(b, 3, 1)
    return torch.baddbmm(offset, matrix, images.reshape(b, 3, h * w)).view(b, 3, h, w)


def build_augment(cfg: AugmentConfig, size: tuple[int, int]) -> Augment:
    """Build the augmentation pipeline for ``(image, mask)`` batches with output size ``size`` (H, W).

    Order: resized crop (so the rest works on the smaller output), flips, quarter turns, colour jitter.
    Quarter turns are left out for a non-square ``size``. Apply it with `augment_batch`.
    """
    cfg.validate()
    size = _check_size(size)
    hue = K.ColorJitter(hue=cfg.hue_jitter, p=1.0) if cfg.color_jitter > 0 and cfg.hue_jitter > 0 else None
    return Augment(size=size, crop_scale=tuple(cfg.crop_scale) if cfg.resized_crop else None,
                   crop_ratio=tuple(cfg.crop_ratio), hflip=cfg.hflip, vflip=cfg.vflip,
                   rot90=cfg.rot90 if size[0] == size[1] else 0.0, color_jitter=cfg.color_jitter, hue=hue)


def augment_batch(aug: Augment, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Apply `aug` (from `build_augment`) to images ``(B, 3, H, W)`` in [0, 1] and long masks ``(B, H, W)``.

    Returns images clamped to [0, 1] and long masks of the output size, every mask value one of the input's.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    b, _, h, w = images.shape
    if masks.shape != (b, h, w) or masks.dtype.is_floating_point or masks.dtype == torch.bool:
        raise ValueError(f"masks must be an integer (B, H, W) tensor of shape {(b, h, w)}, "
                         f"got {tuple(masks.shape)} {masks.dtype}")
    if b == 0:
        return images, masks.long()
    if aug.crop_scale is not None:
        images, masks = aug.resized_crop(images, masks)
    elif (h, w) != aug.size:
        raise ValueError(f"without resized_crop the input must have the output size {aug.size}, got {h}x{w}")
    images, masks = aug.dihedral(images, masks.long())
    if aug.color_jitter > 0:
        images = aug.jitter(images)
    return images.clamp(0.0, 1.0), masks
