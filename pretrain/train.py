"""Pretraining, driven by Accelerate: one process with `python -m pretrain`, many with `accelerate launch`.

Per optimizer step on every process: `grad_accum` batches from the shard stream -> augmentation
(image and mask alike) -> labels from the augmented masks -> CutMix/Mixup (masks included) -> normalisation
-> BCE on the multi-label logits (+ cross-entropy of the dense head) -> AdamW, clipping, cosine schedule.

The loop itself (checkpoints, exact resume, NaN stop, logging) is `defectforge/loop.py`, shared with finetune.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image
from timm.data import resolve_data_config
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.utils import ModelEmaV3

from defectforge.augment import augment_batch, build_augment
from defectforge.data import to_device, train_loader, val_loader
from defectforge.loop import NonFiniteLoss, Run, checkpoints, last_checkpoint, lr_factor  # noqa: F401  (re-exported)
from defectforge.reader import make_dataset
from defectforge.tracking import class_palette, mask_grid

from .config import PretrainConfig
from .cutmix import mix_batch
from .metrics import multilabel_ap
from .models import PretrainNet, create_backbone, model_config, save_model

log = logging.getLogger("pretrain")


def param_groups(net: PretrainNet, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases and position/class tokens; optional layer-wise lr decay."""
    backbone = net.backbone
    skip = set(backbone.no_weight_decay()) if hasattr(backbone, "no_weight_decay") else set()
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=skip,
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=cfg.weight_decay, no_weight_decay_list=skip)
    if net.dense is not None:
        groups += param_groups_weight_decay(net.dense, weight_decay=cfg.weight_decay)
    out = []
    for group in groups:
        if group["params"]:
            out.append({"params": group["params"], "weight_decay": group["weight_decay"],
                        "lr": cfg.lr * group.get("lr_scale", 1.0)})
    return out


@torch.no_grad()
def validate(accelerator: Accelerator, model: torch.nn.Module, loader, normalize, classes: list[str]) -> dict:
    """mAP and per-class AP over the whole validation split, gathered from every process."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in loader:
        with accelerator.autocast():
            out = model(normalize(batch["image"].to(accelerator.device)))
        scores.append(torch.sigmoid(out["logits"].float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    model.train(was_training)
    k = len(classes) - 1
    local = (np.concatenate(scores) if scores else np.zeros((0, k)), np.concatenate(targets) if targets else
             np.zeros((0, k)))
    parts = gather_object([local])
    all_scores = np.concatenate([p[0] for p in parts])
    all_targets = np.concatenate([p[1] for p in parts])
    result = multilabel_ap(all_scores, all_targets, classes[1:])
    result["samples"] = int(all_scores.shape[0])
    return result


def build_model(cfg: PretrainConfig, classes: list[str]) -> tuple[PretrainNet, dict]:
    backbone = create_backbone(cfg.model, num_classes=len(classes) - 1, img_size=cfg.img_size,
                               global_pool=cfg.global_pool, weights=cfg.weights, drop_path_rate=cfg.drop_path_rate,
                               skip_head=True, **cfg.model_kwargs)
    data_cfg = resolve_data_config({}, model=backbone)
    mcfg = model_config(cfg.model, num_classes=len(classes) - 1, classes=classes, img_size=cfg.img_size,
                        global_pool=cfg.global_pool, kwargs=dict(cfg.model_kwargs), mean=data_cfg["mean"],
                        std=data_cfg["std"])
    return PretrainNet(backbone, len(classes) - 1, dense_head=cfg.dense_head), mcfg


def train(cfg: PretrainConfig, shards: str | list[str], run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) pretraining; returns a summary {step, val, checkpoint, model}.

    `shards`: one location, or several dataset folders with the same classes read as one stream (for example
    procedural and diffusion shards); RUN/run_info.json records them and their `source`s.
    """
    run = Run(cfg, run_dir, job_type="pretrain")
    acc, run_dir = run.accelerator, run.run_dir
    probe = make_dataset(shards, cfg.train_split)
    classes = probe.classes
    if acc.is_main_process:
        info = probe.info or {}
        (run_dir / "run_info.json").write_text(json.dumps({
            "shards": [str(s) for s in shards] if isinstance(shards, list | tuple) else [str(shards)],
            "sources": info.get("sources") or [info.get("source")], "classes": classes}, indent=2) + "\n")
    net, mcfg = build_model(cfg, classes)
    mean = torch.tensor(mcfg["mean"], device=acc.device).view(1, -1, 1, 1)
    std = torch.tensor(mcfg["std"], device=acc.device).view(1, -1, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    optimizer = torch.optim.AdamW(param_groups(net, cfg), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    model, optimizer = acc.prepare(torch.compile(net) if cfg.compile else net, optimizer)
    ema = ModelEmaV3(acc.unwrap_model(model, keep_torch_compile=False), decay=cfg.ema_decay) if cfg.ema else None
    aug, mix = build_augment(cfg.augment, (cfg.img_size, cfg.img_size)), cfg.mix
    val = val_loader(shards, cfg.val_split, img_size=cfg.img_size, batch_size=cfg.batch_size,
                     num_workers=min(cfg.num_workers, 1), classes=classes) if cfg.val_split else None
    last_val: dict | None = None

    def weights_to_keep() -> PretrainNet:  # what is validated and saved: the EMA when there is one
        return ema.module if ema is not None else acc.unwrap_model(model, keep_torch_compile=False)

    def make_loader(epoch: int, batches: int):
        return train_loader(shards, cfg.train_split, img_size=cfg.img_size, batch_size=cfg.batch_size,
                            batches=batches, world_size=acc.num_processes, num_workers=cfg.num_workers,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, epoch=epoch, classes=classes)

    def micro_step(batch: dict, first: bool) -> dict:
        return pretrain_losses(run, model, batch, aug, mix, normalize, cfg, classes,
                               grid_path=run_dir / "cutmix_grid.png" if first else None)

    def validate_now(step: int) -> dict:
        nonlocal last_val
        last_val = validate(acc, weights_to_keep(), val, normalize, classes)
        return {"val_mAP": last_val["mAP"], "val_samples": last_val["samples"],
                **{f"val_AP/{k}": v for k, v in last_val["ap"].items() if v is not None}}

    try:
        run.start(*([scheduler, ema] if ema is not None else [scheduler]))
        step = run.fit(model, optimizer, scheduler, make_loader=make_loader, micro_step=micro_step,
                       validate=validate_now if val is not None else None, ema=ema, progress=progress,
                       desc="pretrain")
        if step == cfg.max_steps and acc.is_main_process:
            save_model(weights_to_keep().backbone, run_dir, mcfg)
        acc.wait_for_everyone()
    finally:
        run.end()
    return {"step": step, "val": last_val, "checkpoint": str(last_checkpoint(run_dir)),
            "model": str(run_dir / "model.safetensors") if step == cfg.max_steps else None}


def pretrain_losses(run: Run, model, batch: dict, aug, mix, normalize, cfg: PretrainConfig, classes: list[str], *,
                    grid_path: Path | None) -> dict[str, torch.Tensor]:
    """One batch: augment, labels from the augmented masks, mix, forward; the losses (total first)."""
    device = run.accelerator.device
    images, masks = to_device(batch, device)
    images, masks = augment_batch(aug, images, masks)
    k = len(classes) - 1
    present = images.new_zeros(masks.shape[0], k + 1).scatter_(1, masks.flatten(1), 1.0)
    labels = present[:, 1:]  # presence after the crop: a defect cropped away is absent
    images, labels, dense_target, info = mix_batch(images, labels, masks, mix)
    if grid_path is not None and run.accelerator.is_main_process:
        log_grid(run, images, dense_target, classes, grid_path, info["mode"])
    out = model(normalize(images))
    bce = F.binary_cross_entropy_with_logits(out["logits"].float(), labels)
    dense = F.cross_entropy(out["dense"].float(), dense_target) if "dense" in out else bce.new_zeros(())
    return {"loss": bce + cfg.dense_weight * dense, "bce": bce, "dense_loss": dense}


def log_grid(run: Run, images, masks, classes: list[str], path: Path, mode: str) -> None:
    """The first mixed batch and its masks, as RUN/cutmix_grid.png and a W&B image."""
    grid = mask_grid(images, masks, class_palette(classes))
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(grid).save(tmp)
    tmp.replace(path)
    if run.accelerator.trackers:
        import wandb

        caption = f"{mode}: images (top) and mixed masks (bottom); " + ", ".join(
            f"{i}={c}" for i, c in enumerate(classes))
        run.log_images({"cutmix_batch": wandb.Image(grid, caption=caption)}, step=0)
