"""Where do the models look? ViT attention maps against CNN Grad-CAM, scored on the true defect masks.

- ViT (and ViT-hybrid) encoders: the attention of the class token to every patch in the last block, averaged
  over heads (recomputed from that block's q and k, since fused attention does not return weights).
- CNN encoders: Grad-CAM on the deepest encoder feature map, for the score "defect rather than background"
  (mean over pixels of `logsumexp(defect logits) - background logit`).
Both maps are upsampled to the image. Scores per image with a defect, averaged:
- pointing game: the map's maximum lies within `tolerance` px of a defect pixel;
- energy in defect: the share of the map's mass within `tolerance` px of a defect pixel (a uniform map scores
  the defect's dilated area fraction, given as the chance level).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.models import VIT_FAMILIES, family_of

from .metrics import dilate
from .records import Interpretability

CROP = 512


def _pad(model, image: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    h, w = image.shape[-2:]
    ph, pw = (-h) % model.stride, (-w) % model.stride
    if ph or pw:
        image = F.pad(image, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
    return image, h, w


def is_vit(model) -> bool:
    """Attention maps for ViTs and hybrids (`model.encoder` is the Segmenter's timm encoder)."""
    return family_of(model.encoder) in VIT_FAMILIES


@torch.no_grad()
def attention_map(model, image: torch.Tensor) -> torch.Tensor:
    """(H, W) class-token attention of the last ViT block (mean over heads), upsampled to the image."""
    enc = model.encoder
    attn = enc.blocks[-1].attn
    captured: dict[str, torch.Tensor] = {}
    hook = attn.register_forward_hook(lambda _m, args, _out: captured.__setitem__("x", args[0]))
    padded, h, w = _pad(model, image)
    try:
        model.net(padded)
    finally:
        hook.remove()
    x = captured["x"]
    b, n, c = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
    prefix = int(enc.num_prefix_tokens)
    cls = weights[0, :, 0, prefix:].mean(0)
    gh, gw = enc.patch_embed.dynamic_feat_size(tuple(padded.shape[-2:]))
    grid = cls.reshape(1, 1, gh, gw)
    return F.interpolate(grid, size=padded.shape[-2:], mode="bilinear", align_corners=False)[0, 0, :h, :w]


def gradcam_map(model, image: torch.Tensor) -> torch.Tensor:
    """(H, W) Grad-CAM of the deepest encoder features for "defect rather than background"."""
    return gradcam_maps(model, image)[0]


def gradcam_maps(model, images: torch.Tensor) -> torch.Tensor:
    """(B, H, W) Grad-CAM of each image of a batch (the score is summed over the images, each image's own mean
    over pixels: the network is in eval mode, so an image's gradient is that of its own score)."""
    captured: dict[str, torch.Tensor] = {}

    def keep(_m, _args, out):
        feature = out[-1] if isinstance(out, list | tuple) else out
        feature.retain_grad()
        captured["f"] = feature

    hook = model.net.encoder.register_forward_hook(keep)
    padded, h, w = _pad(model, images)
    try:
        with torch.enable_grad():
            logits = model.net(padded.requires_grad_(False))
            logits = logits[0] if isinstance(logits, tuple) else logits  # a network with the auxiliary label head
            score = (logits[:, 1:].logsumexp(1) - logits[:, 0]).mean((1, 2)).sum()
            model.zero_grad(set_to_none=True)
            score.backward()
    finally:
        hook.remove()
    feature = captured["f"]
    cam = F.relu((feature.grad.mean((2, 3), keepdim=True) * feature).sum(1, keepdim=True)).detach()
    model.zero_grad(set_to_none=True)
    return F.interpolate(cam, size=padded.shape[-2:], mode="bilinear", align_corners=False)[:, 0, :h, :w]


def crop_around_defect(image: torch.Tensor, mask: torch.Tensor, side: int = CROP) -> tuple[torch.Tensor, torch.Tensor]:
    """Images larger than `side` are cropped to `side` around a defect pixel (attention is quadratic in size)."""
    h, w = mask.shape
    if max(h, w) <= side:
        return image, mask
    ys, xs = torch.nonzero(mask > 0, as_tuple=True)
    cy, cx = (int(ys[len(ys) // 2]), int(xs[len(xs) // 2])) if len(ys) else (h // 2, w // 2)
    sh, sw = min(side, h), min(side, w)
    y0, x0 = min(max(0, cy - sh // 2), h - sh), min(max(0, cx - sw // 2), w - sw)
    return image[..., y0:y0 + sh, x0:x0 + sw], mask[y0:y0 + sh, x0:x0 + sw]


def localization(saliency: torch.Tensor, mask: torch.Tensor, tolerance: int) -> dict:
    """Pointing game hit, energy inside the (dilated) defect, and the chance level of that energy."""
    region = dilate(mask > 0, tolerance)
    sal = saliency.float().clamp_min(0)
    peak = int(sal.flatten().argmax())
    total = float(sal.sum())
    return {"hit": bool(region.flatten()[peak]),
            "energy": float(sal[region].sum()) / total if total > 0 else 0.0,
            "chance": float(region.float().mean())}


def interpret_model(model, samples: list[dict], mean: torch.Tensor, std: torch.Tensor, device: torch.device,
                    tolerance: int, limit: int) -> tuple[Interpretability, list[tuple]]:
    """Scores over up to `limit` images with a defect, and the maps of the first two (for the report)."""
    method = "attention" if is_vit(model) else "grad-cam"
    scores, maps = [], []
    for sample in samples:
        if len(scores) >= limit:
            break
        if not bool((sample["mask"] > 0).any()):
            continue
        image, mask = crop_around_defect(sample["image"], sample["mask"])
        x = image.to(device)[None]
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - mean) / std
        saliency = (attention_map(model, x) if method == "attention" else gradcam_map(model, x)).cpu()
        scores.append(localization(saliency, mask, tolerance))
        if len(maps) < 2:
            maps.append((sample["key"], image, mask, saliency.numpy()))
    if not scores:
        return Interpretability(method=method, images=0), maps
    return Interpretability(method=method, images=len(scores),
                            pointing_game=float(np.mean([s["hit"] for s in scores])),
                            energy_in_defect=float(np.mean([s["energy"] for s in scores])),
                            energy_chance=float(np.mean([s["chance"] for s in scores])),
                            per_image=scores), maps  # the same images for every model: paired comparisons
