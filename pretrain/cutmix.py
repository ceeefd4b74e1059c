"""Batch CutMix / Mixup that mixes the pixel masks together with the images and labels.

timm's `Mixup` mixes images and labels only; defect inspection also trains on the class-index masks, so
this module pastes (or blends) the masks with exactly the same boxes (or weights) as the images.

Conventions, shared by every mode:

- the partner of sample ``i`` is ``perm[i]``: a random *cyclic derangement* of the batch (a random order
  in which each sample is paired with the next one), so no sample is mixed with itself when ``B >= 2``
  (timm flips the batch instead, which leaves the middle sample of an odd batch unmixed);
- ``info["lam"][i]`` is the weight of the partner's content in sample ``i`` (0 = untouched): the fraction
  of pixels actually pasted for CutMix, the blend weight for Mixup, 0 when the batch is not mixed;
- all random numbers come from ``generator`` (on its device) or, without one, from the global RNG of the
  input's device, so the same generator state gives the same result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from defectforge.config import ConfigError, require
from defectforge.data import IGNORE

LABEL_MODES = ("area", "mask")


@dataclass
class MixConfig:
    """How a training batch is mixed; `validate()` checks every field.

    - ``cutmix_alpha``: CutMix lambda ~ Beta(alpha, alpha); 0 disables CutMix.
    - ``cutmix_prob``: probability that a batch is mixed at all (CutMix or Mixup, like timm's ``mix_prob``).
    - ``mixup_alpha``: Mixup lambda ~ Beta(alpha, alpha); 0 disables Mixup.
    - ``switch_prob``: when both alphas are > 0, the probability that a mixed batch uses CutMix rather than
      Mixup (timm's meaning of ``switch_prob``).
    - ``label_mode``: ``"area"``: soft CutMix label ``(1 - a) * y_i + a * y_perm[i]`` with ``a`` the pasted
      area fraction after clipping; ``"mask"``: multi-hot presence recomputed from the mixed mask (exact for
      defect labels: a defect cut away is absent, a pasted one present). Mixup always mixes labels with its
      blend weight, since every pixel of both images stays (faintly) visible.
    """

    cutmix_alpha: float = 0.7
    cutmix_prob: float = 1.0
    mixup_alpha: float = 0.0
    switch_prob: float = 0.5
    label_mode: str = "area"

    def validate(self) -> None:
        for key in ("cutmix_alpha", "mixup_alpha"):
            value = getattr(self, key)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"key '{key}': value {value!r} is invalid, expected a finite number >= 0 "
                                  "(0 disables it)")
        for key in ("cutmix_prob", "switch_prob"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"key '{key}': value {value!r} is invalid, expected a probability in [0, 1]")
        if self.label_mode not in LABEL_MODES:
            raise ConfigError(f"key 'label_mode': value {self.label_mode!r} is invalid, expected one of "
                              f"{', '.join(repr(m) for m in LABEL_MODES)}")

    @property
    def enabled(self) -> bool:
        return self.cutmix_prob > 0 and (self.cutmix_alpha > 0 or self.mixup_alpha > 0)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sample_beta(alpha: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``n`` draws of Beta(alpha, alpha) as float32 on `device`.

    torch.distributions cannot take a Generator, so Beta is built from two Gamma draws (Marsaglia & Tsang)
    that use only randn/rand with the generator. Work is done in log space because for alpha < 1 the boosted
    gamma ``G(alpha + 1) * U ** (1 / alpha)`` underflows to 0 for both draws, which would make X / (X + Y) NaN.
    """
    log_x = _sample_log_gamma(alpha, n, generator, device)
    log_y = _sample_log_gamma(alpha, n, generator, device)
    return torch.sigmoid(log_x - log_y)


def _sample_log_gamma(alpha: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    a = alpha + 1.0 if alpha < 1.0 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.zeros(n, device=device)
    todo = torch.ones(n, dtype=torch.bool, device=device)
    # Acceptance is above 95% for every shape, so this loop runs once or twice; each round draws a fixed
    # number of values, which keeps the result a pure function of the generator state.
    while bool(todo.any()):
        x = torch.randn(n, generator=generator, device=device)
        u = torch.rand(n, generator=generator, device=device)
        v = (1.0 + c * x) ** 3
        log_v = torch.log(v.clamp_min(1e-30))
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
        out = torch.where(ok & todo, math.log(d) + log_v, out)
        todo &= ~ok
    if alpha < 1.0:
        u = torch.rand(n, generator=generator, device=device).clamp_min(torch.finfo(torch.float32).tiny)
        out = out + torch.log(u) / alpha
    return out


def _random_partner(batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    order = torch.randperm(batch, generator=generator, device=device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(-1)
    return perm


def _cutmix_boxes(lam: Tensor, height: int, width: int, generator: torch.Generator | None = None,
                  centres: Tensor | None = None) -> Tensor:
    """Per-sample boxes ``(B, 4)`` long ``[y0, y1, x0, x1]`` (end exclusive), clipped to the image.

    Sides are ``sqrt(1 - lam)`` of H and W (so the unclipped area is about ``1 - lam``); the centre is uniform
    over the image, or the given ``centres`` ``(B, 2)`` long ``[cy, cx]`` (used by tests to force clipping).
    """
    device = lam.device
    ratio = torch.sqrt((1.0 - lam.float()).clamp(0.0, 1.0))
    cut_h = (height * ratio).long()
    cut_w = (width * ratio).long()
    if centres is None:
        cy = torch.randint(0, height, (lam.shape[0],), generator=generator, device=device)
        cx = torch.randint(0, width, (lam.shape[0],), generator=generator, device=device)
    else:
        centres = centres.to(device=device, dtype=torch.long)
        cy, cx = centres[:, 0], centres[:, 1]
    y0 = cy - cut_h // 2
    x0 = cx - cut_w // 2
    # Clip after placing the full-size box: the pasted area then shrinks near the border, and the label
    # weight must follow that clipped area, not lam.
    return torch.stack([y0.clamp(0, height), (y0 + cut_h).clamp(0, height),
                        x0.clamp(0, width), (x0 + cut_w).clamp(0, width)], dim=1)


def refuse_mixup_on_padding(cfg) -> None:
    """A config check shared by pretrain and finetune: Mixup cannot blend the ignored pixels of padded crops."""
    require(not (cfg.small_images == "pad" and cfg.mix.enabled and cfg.mixup_alpha > 0), "mixup_alpha",
            cfg.mixup_alpha, "0 with small_images: pad (a padded crop's mask holds ignored pixels, which Mixup "
            "cannot blend; CutMix can), or set small_images: resize")


def _paste_masks(boxes: Tensor, height: int, width: int) -> Tensor:
    """Boolean ``(B, H, W)``: True where the pixel comes from the partner."""
    ys = torch.arange(height, device=boxes.device).view(1, height, 1)
    xs = torch.arange(width, device=boxes.device).view(1, 1, width)
    b = boxes.view(-1, 4, 1, 1)
    return (ys >= b[:, 0]) & (ys < b[:, 1]) & (xs >= b[:, 2]) & (xs < b[:, 3])


def _presence(masks: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """Multi-hot ``(B, K)`` of the defect classes 1..K present in each mask (``IGNORE`` pixels mark none)."""
    hits = torch.zeros(masks.shape[0], num_classes + 1, dtype=dtype, device=masks.device)
    hits.scatter_(1, masks.masked_fill(masks == IGNORE, 0).flatten(1), 1.0)
    return hits[:, 1:]


def _check_inputs(images: Tensor, labels: Tensor, masks: Tensor) -> None:
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float (B, C, H, W) tensor, got {tuple(images.shape)} {images.dtype}")
    b, _, h, w = images.shape
    if labels.ndim != 2 or labels.shape[0] != b or not labels.is_floating_point():
        raise ValueError(f"labels must be a float (B, K) tensor with B={b}, got {tuple(labels.shape)} {labels.dtype}")
    if masks.shape != (b, h, w) or masks.dtype != torch.long:
        raise ValueError(f"masks must be a long (B, H, W) tensor of shape {(b, h, w)}, "
                         f"got {tuple(masks.shape)} {masks.dtype}")


def _check_mask_values(masks: Tensor, num_classes: int, ignore: bool = False) -> None:
    """Mask values in 0..K, and ``IGNORE`` (255: a padded crop, a co-training class) where it can be kept."""
    values = masks[masks != IGNORE] if ignore else masks
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > num_classes):
        hint = "" if ignore or int(values.max()) != IGNORE else (
            f"; {IGNORE} marks ignored pixels (small_images: pad, co-training), which Mixup cannot blend: "
            "use CutMix (mixup_alpha=0) or small_images=resize")
        raise ValueError(f"mask values must lie in 0..{num_classes} (labels have K={num_classes} columns), "
                         f"got {int(values.min())}..{int(values.max())}{hint}")


def mix_batch(images: Tensor, labels: Tensor, masks: Tensor, cfg: MixConfig,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, dict[str, Any]]:
    """Mix a batch with CutMix or Mixup, masks included; returns ``(images, labels, dense_target, info)``.

    Args:
        images: float ``(B, C, H, W)``.
        labels: float ``(B, K)`` multi-hot over the defect classes; column ``k - 1`` is mask value ``k``.
        masks: long ``(B, H, W)`` class-index maps, 0 = background, 1..K = defects.
        cfg: the mixing config (validated here).
        generator: source of all random numbers; without one, the global RNG of the images' device.

    The decision per batch: mix with probability ``cfg.cutmix_prob``; then CutMix or Mixup (``switch_prob``
    = probability of CutMix when both are enabled). Lambda, box and partner are drawn per sample.

    ``dense_target`` depends on the mode:

    - ``"cutmix"`` / ``"none"``: a long ``(B, H, W)`` index mask; each pixel of a CutMix mask is taken from the
      image that pixel came from. Use with ``F.cross_entropy(logits, dense_target)``.
    - ``"mixup"``: a float ``(B, K + 1, H, W)`` class-probability map, the one-hot of each mask blended with the
      same weights as the images (sums to 1 over the class dimension). ``F.cross_entropy(logits, dense_target)``
      accepts it as soft targets.

    ``info``: ``{"mode": "cutmix" | "mixup" | "none", "lam": (B,) float weight of the partner's content,
    "perm": (B,) long partner indices, "boxes": (B, 4) long [y0, y1, x0, x1] (end exclusive) for CutMix,
    else None}``. Without mixing, the inputs are returned unchanged (the same tensors).
    """
    cfg.validate()
    _check_inputs(images, labels, masks)
    batch, _, height, width = images.shape
    num_classes = labels.shape[1]
    device = images.device
    rng_device = generator.device if generator is not None else device

    decide = torch.rand(2, generator=generator, device=rng_device).tolist()
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or decide[1] < cfg.switch_prob)
    if not cfg.enabled or decide[0] >= cfg.cutmix_prob or batch == 0:
        info = {"mode": "none", "lam": torch.zeros(batch, device=device),
                "perm": torch.arange(batch, device=device), "boxes": None}
        return images, labels, masks, info

    perm = _random_partner(batch, generator, rng_device)
    alpha = cfg.cutmix_alpha if use_cutmix else cfg.mixup_alpha
    lam = _sample_beta(alpha, batch, generator, rng_device)

    if use_cutmix:
        boxes = _cutmix_boxes(lam, height, width, generator)
        perm, boxes = perm.to(device), boxes.to(device)
        paste = _paste_masks(boxes, height, width)
        mixed_images = torch.where(paste[:, None], images[perm], images)
        mixed_masks = torch.where(paste, masks[perm], masks)
        area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).float() / (height * width)
        if cfg.label_mode == "mask":
            _check_mask_values(mixed_masks, num_classes, ignore=True)
            mixed_labels = _presence(mixed_masks, num_classes, labels.dtype)
        else:
            w = area.to(labels.dtype)[:, None]
            mixed_labels = (1.0 - w) * labels + w * labels[perm]
        info = {"mode": "cutmix", "lam": area, "perm": perm, "boxes": boxes}
        return mixed_images, mixed_labels, mixed_masks, info

    perm, weight = perm.to(device), lam.to(device)
    _check_mask_values(masks, num_classes)
    w_img = weight.to(images.dtype).view(-1, 1, 1, 1)
    mixed_images = (1.0 - w_img) * images + w_img * images[perm]
    w_lab = weight.to(labels.dtype)[:, None]
    mixed_labels = (1.0 - w_lab) * labels + w_lab * labels[perm]
    one_hot = F.one_hot(masks, num_classes + 1).permute(0, 3, 1, 2).to(images.dtype)
    dense = (1.0 - w_img) * one_hot + w_img * one_hot[perm]
    info = {"mode": "mixup", "lam": weight, "perm": perm, "boxes": None}
    return mixed_images, mixed_labels, dense, info
