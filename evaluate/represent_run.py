"""`python -m evaluate represent`: the measures of evaluate/represent.py on the models a user trained.

A model is a finetune run or a segmentation pretrain run (`load_segmenter`: its `.encoder` is the timm module)
or a classification pretrain run (`load_model`). Layers: a ViT's (or hybrid's) blocks, their patch tokens
(prefix tokens excluded everywhere: the class token has no place in the image, and CKA then compares the same
kind of thing across families); a CNN's encoder stages (timm's feature_info). Every model sees the same square
crops of the evaluation images (around a defect where there is one), in the same minibatches.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.config import require
from pretrain.models import VIT_FAMILIES, family_of, load_model
from pretrain.segmenter import load_segmenter

from .interpret import gradcam_maps, localization
from .represent import FUSIONS, MinibatchCKA, attention_distance, auroc, linear_probe, receptive_field, rollout

log = logging.getLogger("evaluate")


@dataclass
class RepresentConfig:
    name: str = "represent"
    split: str | None = None  # null: test, else val, else the last split of each shard folder
    max_images: int | None = 64  # per shard folder
    crop: int = 224  # px, square crops (at most the smallest image side; a multiple of 32)
    batch_size: int = 16  # images per CKA minibatch (>= 4: the unbiased HSIC)
    cka_grid: int = 8  # every layer's map average-pooled to at most this many cells a side before CKA
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    erf_images: int = 8  # images whose input gradient gives a CNN stage's effective receptive field
    erf_share: float = 0.95  # share of the gradient mass the receptive field's square holds
    rollout_fusion: str = "mean"  # mean | max | min over heads
    discard_ratio: float = 0.9  # lowest attention weights dropped per block before the rollout
    interpret_tolerance: int = 8  # px around a defect that count as "on the defect" (pointing game, energy)
    probe_background: int = 16  # non-defect tokens kept per image for the probe (every defect token is kept)
    probe_min_share: float = 0.1  # a patch is "defect" when at least this share of its pixels is
    probe_margin: float = 0.05  # last-layer probe gain (token over avg) that counts for the claim
    seed: int = 0

    def validate(self) -> None:
        require(self.max_images is None or self.max_images >= 4, "max_images", self.max_images, "null or >= 4")
        require(32 <= self.crop <= 2048 and self.crop % 32 == 0, "crop", self.crop,
                "a multiple of 32 between 32 and 2048")
        require(self.batch_size >= 4, "batch_size", self.batch_size, "an integer >= 4 (the unbiased HSIC)")
        require(1 <= self.cka_grid <= 64, "cka_grid", self.cka_grid, "an integer in [1, 64]")
        require(self.device in ("auto", "cpu") or self.device.startswith("cuda"), "device", self.device,
                "auto, cpu, cuda or cuda:N")
        require(self.erf_images >= 1, "erf_images", self.erf_images, "an integer >= 1")
        require(0 < self.erf_share <= 1, "erf_share", self.erf_share, "a share in (0, 1]")
        require(self.rollout_fusion in FUSIONS, "rollout_fusion", self.rollout_fusion, f"one of {', '.join(FUSIONS)}")
        require(0 <= self.discard_ratio < 1, "discard_ratio", self.discard_ratio, "a share in [0, 1)")
        require(0 <= self.interpret_tolerance <= 128, "interpret_tolerance", self.interpret_tolerance,
                "an integer in [0, 128]")
        require(self.probe_background >= 1, "probe_background", self.probe_background, "an integer >= 1")
        require(0 < self.probe_min_share <= 1, "probe_min_share", self.probe_min_share, "a share in (0, 1]")
        require(0 <= self.probe_margin < 1, "probe_margin", self.probe_margin, "an accuracy difference in [0, 1)")


@dataclass
class Subject:
    """One model as the measures see it."""
    name: str
    run: str
    kind: str  # "segmentation" (smp network), "classification" or "mae" (timm backbone of a pretrain run)
    encoder: torch.nn.Module  # the timm module
    family: str
    mean: torch.Tensor
    std: torch.Tensor
    global_pool: str | None  # token | avg for a classification ViT; None otherwise (no pooled head is trained)
    segmenter: torch.nn.Module | None = None
    results: dict = field(default_factory=dict)


def load_subject(run: str | Path, device: torch.device) -> Subject:
    """A finetune or pretrain run folder as a Subject; one clear error when it is neither."""
    run = Path(run)
    path = run / "model_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} is not a finetune or pretrain run (no model_config.json)")
    kind = json.loads(path.read_text()).get("architecture")
    if kind == "smp":
        model, mcfg = load_segmenter(run)
        encoder, segmenter, pool = model.encoder, model, None
    elif kind == "timm":
        model, mcfg = load_model(run)
        encoder, segmenter = getattr(model, "backbone", model), None
        kind = "mae" if mcfg.get("objective") == "mae" else "classification"
        pool = (mcfg.get("global_pool") or getattr(encoder, "global_pool", None)) \
            if family_of(encoder) in VIT_FAMILIES and kind == "classification" else None
    else:
        raise ValueError(f"{run}: architecture {kind!r} in model_config.json is neither a segmentation nor a "
                         "classification run")
    family = family_of(encoder)
    if family == "Swin":
        raise ValueError(f"{run}: Swin models (windowed attention) are not supported by represent")
    model.to(device).eval()
    mean = torch.tensor(mcfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(mcfg["std"], device=device).view(1, -1, 1, 1)
    return Subject(run.name, str(run), "segmentation" if kind == "smp" else kind, encoder, family, mean, std,
                   pool if isinstance(pool, str) else None, segmenter)


def square_crops(images: list[dict], side: int) -> list[dict]:
    """Every image cropped to `side` (at most its smallest side, a multiple of 32) around its middle defect pixel."""
    side = min([side] + [min(s["mask"].shape) for s in images]) // 32 * 32
    if side < 32:
        raise ValueError("represent needs images of at least 32x32 px")
    out = []
    for s in images:
        mask = s["mask"]
        h, w = mask.shape
        ys, xs = torch.nonzero(mask > 0, as_tuple=True)
        cy, cx = (int(ys[len(ys) // 2]), int(xs[len(xs) // 2])) if len(ys) else (h // 2, w // 2)
        y0, x0 = min(max(0, cy - side // 2), h - side), min(max(0, cx - side // 2), w - side)
        image = s["image"][..., y0:y0 + side, x0:x0 + side]
        out.append({"key": s["key"], "image": image.expand(3, -1, -1) if image.shape[0] == 1 else image,
                    "mask": mask[y0:y0 + side, x0:x0 + side]})
    return out


@contextlib.contextmanager
def attention_weights(encoder: torch.nn.Module):
    """Every block's (B, heads, N, N) attention weights while inside: timm's fused attention returns none, so it
    is switched off here (for extraction only) and the softmax output caught where it enters `attn_drop`."""
    blocks = list(getattr(encoder, "blocks", []))
    attns = [getattr(b, "attn", None) for b in blocks]
    if not blocks or any(a is None or not hasattr(a, "fused_attn") or not hasattr(a, "attn_drop") for a in attns):
        raise ValueError(f"{type(encoder).__name__} has no timm attention blocks whose weights can be read")
    caught: list[torch.Tensor] = []
    fused = [a.fused_attn for a in attns]
    hooks = [a.attn_drop.register_forward_hook(lambda _m, _a, out: caught.append(out.detach())) for a in attns]
    for a in attns:
        a.fused_attn = False
    try:
        yield caught
    finally:
        for a, f in zip(attns, fused, strict=True):
            a.fused_attn = f
        for h in hooks:
            h.remove()


def layer_maps(subject: Subject, x: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    """(names, NCHW maps): a ViT's blocks (patch tokens on their grid) or a CNN's encoder stages."""
    enc = subject.encoder
    if subject.family in VIT_FAMILIES:
        caught: list[torch.Tensor] = []
        hooks = [b.register_forward_hook(lambda _m, _a, out: caught.append(out)) for b in enc.blocks]
        try:
            enc.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        prefix = int(enc.num_prefix_tokens)
        gh, gw = enc.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        maps = [t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], gh, gw) for t in caught]
        return [f"block{i + 1}" for i in range(len(maps))], maps
    if hasattr(enc, "forward_intermediates"):
        maps = enc.forward_intermediates(x, intermediates_only=True)
    else:
        maps = enc(x)  # smp's features_only encoder: the list of stage outputs
    info = getattr(enc, "feature_info", None)
    names = list(info.module_name()) if info is not None and hasattr(info, "module_name") else []
    if len(names) != len(maps):
        names = [f"stage{i + 1}" for i in range(len(maps))]
    return names, list(maps)


def effective_receptive_fields(subject: Subject, crops: list[dict], cfg: RepresentConfig) -> list[dict]:
    """Per CNN stage: |d (central unit, summed over channels) / d input| over `erf_images` crops -> field."""
    x = torch.stack([c["image"] for c in crops[:cfg.erf_images]]).to(subject.mean.device)
    x = ((x - subject.mean) / subject.std).requires_grad_(True)
    with torch.enable_grad():
        names, maps = layer_maps(subject, x)
        out = []
        for i, (name, m) in enumerate(zip(names, maps, strict=True)):
            h, w = m.shape[-2:]
            (grad,) = torch.autograd.grad(m[:, :, h // 2, w // 2].sum(), x, retain_graph=i < len(maps) - 1)
            stride = x.shape[-1] / w
            centre = ((h // 2 + 0.5) * x.shape[-2] / h - 0.5, (w // 2 + 0.5) * stride - 0.5)
            erf = receptive_field(grad.abs().sum((0, 1)).cpu(), cfg.erf_share, centre)
            out.append({"layer": name, "depth": i + 1, "stride": stride, **erf})
    return out


def _patch_labels(mask: torch.Tensor, grid: tuple[int, int], min_share: float) -> torch.Tensor:
    share = F.adaptive_avg_pool2d((mask > 0).float()[None, None], grid)[0, 0]
    return (share >= min_share).flatten()


class Measures:
    """Everything gathered from one model over the minibatches (CKA inputs, attention, maps, probe tokens)."""

    def __init__(self, subject: Subject, cfg: RepresentConfig):
        self.s, self.cfg = subject, cfg
        self.cka_batches: list[dict[str, torch.Tensor]] = []
        self.distance: list[np.ndarray] = []  # per batch: (blocks, heads)
        self.scores: dict[str, list[dict]] = {}
        self.tokens: list[list[torch.Tensor]] = []  # per block: kept tokens of every image
        self.token_labels: list[torch.Tensor] = []
        self.token_image: list[torch.Tensor] = []
        self.maps: list[tuple] = []  # (key, image, mask, {method: map}) of the first two images with a defect

    def batch(self, crops: list[dict], offset: int) -> None:
        s, cfg = self.s, self.cfg
        x = (torch.stack([c["image"] for c in crops]).to(s.mean.device) - s.mean) / s.std
        grid = cfg.cka_grid
        if s.family in VIT_FAMILIES:
            with torch.no_grad(), attention_weights(s.encoder) as weights:
                names, maps = layer_maps(s, x)
            self._attention(weights, crops, x, maps, offset)
        else:
            with torch.no_grad():
                names, maps = layer_maps(s, x)
            self._saliency(crops, x)
        self.cka_batches.append({n: F.adaptive_avg_pool2d(m.float(), (min(grid, m.shape[-2]), min(grid, m.shape[-1])))
                                 .flatten(1).cpu() for n, m in zip(names, maps, strict=True)})

    def _attention(self, weights, crops, x, maps, offset) -> None:
        s, cfg = self.s, self.cfg
        enc = s.encoder
        prefix = int(enc.num_prefix_tokens)
        grid = tuple(enc.patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
        patch = (x.shape[-2] / grid[0], x.shape[-1] / grid[1])  # px per token, a hybrid's conv stem included
        self.distance.append(np.stack([attention_distance(w, grid, patch, prefix) for w in weights]))
        last = weights[-1].mean(1)
        cls = last[:, 0, prefix:] if prefix else last[:, prefix:, prefix:].mean(1)
        rolled = rollout(weights, prefix, cfg.rollout_fusion, cfg.discard_ratio)
        for i, c in enumerate(crops):
            if bool((c["mask"] > 0).any()):
                upsampled = {m: F.interpolate(v[i].reshape(1, 1, *grid).float(), size=x.shape[-2:], mode="bilinear",
                                              align_corners=False)[0, 0].cpu() for m, v in
                             (("last-layer CLS attention", cls), ("attention rollout", rolled))}
                self._score(c, upsampled)
        gen = torch.Generator().manual_seed(cfg.seed + offset)
        if not self.tokens:
            self.tokens = [[] for _ in maps]
        for i, c in enumerate(crops):
            labels = _patch_labels(c["mask"], grid, cfg.probe_min_share)
            background = torch.nonzero(~labels).flatten()
            keep = torch.cat([torch.nonzero(labels).flatten(),
                              background[torch.randperm(len(background), generator=gen)[:cfg.probe_background]]])
            for layer, m in enumerate(maps):
                self.tokens[layer].append(m[i].flatten(1).T[keep].cpu())
            self.token_labels.append(labels[keep])
            self.token_image.append(torch.full((len(keep),), offset + i))

    def _saliency(self, crops, x) -> None:
        if self.s.segmenter is None:
            return  # Grad-CAM scores "defect rather than background": a segmentation network's logits
        cams = gradcam_maps(self.s.segmenter, x).cpu()  # the whole minibatch in one backward pass
        for i, c in enumerate(crops):
            if bool((c["mask"] > 0).any()):
                self._score(c, {"Grad-CAM": cams[i]})

    def _score(self, crop: dict, maps: dict[str, torch.Tensor]) -> None:
        for method, sal in maps.items():
            score = localization(sal, crop["mask"], self.cfg.interpret_tolerance)
            score["auroc"] = auroc(sal, crop["mask"] > 0)
            self.scores.setdefault(method, []).append(score)
        if len(self.maps) < 2 and (not self.maps or self.maps[-1][0] != crop["key"]):
            self.maps.append((crop["key"], crop["image"], crop["mask"], {}))
        if self.maps and self.maps[-1][0] == crop["key"]:
            self.maps[-1][3].update({m: v.numpy() for m, v in maps.items()})

    def probe(self) -> list[float] | None:
        """Balanced accuracy per block of the probe (trained on even images' tokens, tested on odd images')."""
        if not self.tokens:
            return None
        labels, image = torch.cat(self.token_labels), torch.cat(self.token_image)
        train, test = image % 2 == 0, image % 2 == 1
        out = []
        for layer in self.tokens:
            x = torch.cat(layer)
            try:
                out.append(linear_probe(x[train], labels[train], x[test], labels[test]))
            except ValueError as err:
                log.warning("%s: no probe (%s)", self.s.name, err)
                return None
        return out

    def summary(self, erf: list[dict] | None) -> dict:
        scores = {m: {"images": len(v), "pointing_game": float(np.mean([s["hit"] for s in v])),
                      "energy_in_defect": float(np.mean([s["energy"] for s in v])),
                      "energy_chance": float(np.mean([s["chance"] for s in v])),
                      "auroc": float(np.nanmean([s["auroc"] for s in v]))} for m, v in self.scores.items()}
        distance = np.mean(self.distance, 0).tolist() if self.distance else None
        return {"name": self.s.name, "run": self.s.run, "kind": self.s.kind, "family": self.s.family,
                "global_pool": self.s.global_pool, "layers": list(self.cka_batches[0]),
                "attention_distance": distance, "receptive_field": erf, "localization": scores,
                "probe": self.probe()}


def measure(subjects: list[Subject], crops: list[dict], cfg: RepresentConfig) -> tuple[dict, dict]:
    """Every measure on every model over the same minibatches of `crops`; (results, maps for the figures)."""
    batches = [crops[i:i + cfg.batch_size] for i in range(0, len(crops), cfg.batch_size)]
    if len(crops) < 4:
        raise ValueError(f"represent needs at least 4 evaluation images, got {len(crops)}")
    models, maps, cka = [], {}, MinibatchCKA()
    gathered = []
    for s in subjects:
        m = Measures(s, cfg)
        for b, batch in enumerate(batches):
            m.batch(batch, b * cfg.batch_size)
        erf = effective_receptive_fields(s, crops, cfg) if s.family not in VIT_FAMILIES else None
        models.append(m.summary(erf))
        maps[s.name] = m.maps
        gathered.append(m)
        log.info("%s: %d layers measured", s.name, len(models[-1]["layers"]))
    for b in range(len(batches)):
        if len(batches[b]) < 4:  # a last minibatch too small for the unbiased HSIC: left out of the CKA only
            continue
        cka.update({f"{m.s.name}/{layer}": f for m in gathered for layer, f in m.cka_batches[b].items()})
    return {"images": len(crops), "crop": int(crops[0]["image"].shape[-1]), "batches": cka.batches,
            "models": models, "cka": {"names": cka.names, "matrix": cka.compute().tolist()}}, maps
