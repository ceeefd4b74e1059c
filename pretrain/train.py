"""Pretraining, driven by Accelerate: one process with `python -m pretrain`, many with `accelerate launch`.

Per optimizer step on every process: `grad_accum` batches from the shard stream -> augmentation
(image and mask alike) -> labels from the augmented masks -> CutMix/Mixup (masks included) -> normalisation
-> the objective's losses -> AdamW, clipping, cosine schedule. `objective: classification`: BCE on the
backbone's multi-label logits (+ cross-entropy of the dense head); `objective: segmentation`: the segmentation
network that finetune builds (pretrain/segmenter.py), its loss on the mixed masks (+ the multi-label BCE of an
auxiliary head), validated by mIoU and saved whole, so that finetune loads encoder, decoder and head;
`objective: mae`: masked-image modelling of a ViT (pretrain/mae.py), no labels, the encoder saved.

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
from timm.data import resolve_data_config
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from defectforge.augment import augment_batch, build_augment
from defectforge.config import ConfigError
from defectforge.data import IGNORE, folders_in_turn, merged_classes, to_device, train_loader, val_loader
from defectforge.loop import NonFiniteLoss, Run, checkpoints  # noqa: F401  (re-exported)
from defectforge.reader import make_dataset
from defectforge.tracking import class_palette, mask_grid
from defectforge.training import Task, normalizer, run_task

from .config import PretrainConfig
from .cutmix import mix_batch
from .hub import NONE, combine, fetch_pretrained, file_record
from .mae import MaskedAutoencoder
from .metrics import SegMetrics, multilabel_ap
from .models import PretrainNet, create_backbone, model_config, resolve_model_name, save_model
from .segmenter import SegLoss, auto_class_weights, build_segmenter, init_file, load_encoder, save_segmenter

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


def _backbone(cfg: PretrainConfig, classes: list[str], num_classes: int) -> tuple[torch.nn.Module, dict]:
    """The timm backbone of `cfg` (random, `weights`, or its published weights with `pretrained`) and the config
    its saved weights are rebuilt from, with the weights' normalisation and their record."""
    hub = fetch_pretrained(resolve_model_name(cfg.model)) if cfg.pretrained else None
    backbone = create_backbone(cfg.model, num_classes=num_classes, img_size=cfg.crop_size,
                               global_pool=cfg.global_pool, weights=cfg.weights, drop_path_rate=cfg.drop_path_rate,
                               skip_head=True, hub=hub, **cfg.model_kwargs)
    # the normalisation of the weights' pretrained config (timm's default config of the name without weights)
    data_cfg = hub.record if hub is not None else resolve_data_config({}, model=backbone)
    mcfg = model_config(cfg.model, num_classes=num_classes, classes=classes, img_size=cfg.crop_size,
                        global_pool=cfg.global_pool, kwargs=dict(cfg.model_kwargs), mean=data_cfg["mean"],
                        std=data_cfg["std"])
    mcfg["weights"] = hub.record if hub is not None else file_record(cfg.weights) if cfg.weights else None
    return backbone, mcfg


def build_model(cfg: PretrainConfig, classes: list[str]) -> tuple[PretrainNet, dict]:
    backbone, mcfg = _backbone(cfg, classes, len(classes) - 1)
    return PretrainNet(backbone, len(classes) - 1, dense_head=cfg.dense_head), mcfg


class PretrainTask(Task):
    """Multi-label BCE (+ the dense head's cross-entropy) on augmented, mixed batches of synthetic shards."""

    job_type = "pretrain"

    def build(self, run: Run) -> PretrainNet:
        cfg, shards, acc = self.cfg, self.shards, run.accelerator
        probe = make_dataset(shards, cfg.train_split)
        self.classes = probe.classes
        net, self.mcfg = self.make_model()
        # what the saved model was pretrained on: the weights it started from, then this synthetic pretraining
        self.mcfg["pretraining"] = combine((self.mcfg.get("weights") or {}).get("pretraining"), synthetic=True)
        if acc.is_main_process:
            info = probe.info or {}
            (run.run_dir / "run_info.json").write_text(json.dumps({
                "shards": [str(s) for s in shards] if isinstance(shards, list | tuple) else [str(shards)],
                "sources": info.get("sources") or [info.get("source")], "classes": self.classes,
                "weights": self.mcfg.get("weights"), "pretraining": self.mcfg["pretraining"],
                "normalisation": {"mean": self.mcfg["mean"], "std": self.mcfg["std"]}}, indent=2) + "\n")
        self.normalize = normalizer(self.mcfg["mean"], self.mcfg["std"], acc.device)
        self.aug, self.mix = build_augment(cfg.augment, (cfg.crop_size, cfg.crop_size)), cfg.mix
        self.val = val_loader(shards, cfg.val_split, img_size=cfg.crop_size, batch_size=cfg.batch_size,
                              num_workers=min(cfg.num_workers, 1), classes=self.classes,
                              small_images=cfg.small_images) if cfg.val_split else None
        return net

    def make_model(self) -> tuple[torch.nn.Module, dict]:
        return build_model(self.cfg, self.classes)

    def param_groups(self, model: PretrainNet) -> list[dict]:
        return param_groups(model, self.cfg)

    def loader(self, run: Run, epoch: int, batches: int):
        cfg = self.cfg
        return train_loader(self.shards, cfg.train_split, img_size=cfg.crop_size, batch_size=cfg.batch_size,
                            batches=batches, world_size=run.accelerator.num_processes, num_workers=cfg.num_workers,
                            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, epoch=epoch, classes=self.classes,
                            defect_crop=cfg.defect_crop, repeat_threshold=cfg.repeat_threshold,
                            small_images=cfg.small_images)

    def losses(self, run: Run, model, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        return pretrain_losses(run, model, batch, self.aug, self.mix, self.normalize, self.cfg, self.classes,
                               grid_path=run.run_dir / "cutmix_grid.png" if first else None)

    def validate(self, run: Run, model, step: int) -> dict:
        result = validate(run.accelerator, model, self.val, self.normalize, self.classes)
        return {"val_mAP": result["mAP"], "val_samples": result["samples"],
                **{f"val_AP/{k}": v for k, v in result["ap"].items() if v is not None}}

    def export(self, run: Run, model: PretrainNet) -> None:
        save_model(model.backbone, run.run_dir, self.mcfg)

    def summary(self, run: Run, done: bool) -> dict:
        return {"model": str(run.run_dir / "model.safetensors") if done else None}


class SegPretrainTask(PretrainTask):
    """`objective: segmentation`: the fine-tuning network (encoder + decoder + head) on the mixed masks."""

    def make_model(self) -> tuple[torch.nn.Module, dict]:
        cfg = self.cfg
        kwargs = {**cfg.model_kwargs, **({"drop_path_rate": cfg.drop_path_rate} if cfg.drop_path_rate else {})}
        net, mcfg = build_segmenter(cfg, self.classes, encoder_kwargs=kwargs, aux_head=cfg.aux_weight > 0)
        mcfg["objective"] = "segmentation"
        if cfg.weights:  # the encoder from a file or a run (an MAE run, say); decoder and head start afresh
            path, saved = init_file(cfg.weights, mcfg["model"])
            report = load_encoder(net, path, cfg.weights, mcfg["model"],
                                  segmentation_run=saved is not None and saved.get("architecture") == "smp")
            log.info("encoder: %d tensors loaded from %s (%d resampled)", len(report["loaded"]), path,
                     len(report["resampled"]))
            mcfg["weights"] = file_record(path)
        return net, mcfg

    def build(self, run: Run) -> torch.nn.Module:
        net = super().build(run)
        cfg = self.cfg
        weights = auto_class_weights(self.shards, cfg.train_split, self.classes, None) \
            if cfg.class_weights == "auto" else None
        self.criterion = SegLoss(cfg, len(self.classes), weights).to(run.accelerator.device)
        return net

    def param_groups(self, model: torch.nn.Module) -> list[dict]:
        return Task.param_groups(self, model)

    def losses(self, run: Run, model, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        images, labels, target = mixed_batch(run, batch, self.aug, self.mix, self.classes,
                                             run.run_dir / "cutmix_grid.png" if first else None)
        out = model(self.normalize(images))
        logits, label_logits = out if isinstance(out, tuple) else (out, None)
        losses = self.criterion(logits, target)
        if label_logits is not None:
            losses["bce"] = F.binary_cross_entropy_with_logits(label_logits.float(), labels)
            losses["loss"] = losses["loss"] + self.cfg.aux_weight * losses["bce"]
        return losses

    @torch.no_grad()
    def validate(self, run: Run, model, step: int) -> dict:
        acc = run.accelerator
        was_training = model.training
        model.eval()
        metrics = SegMetrics(self.classes, device=acc.device)
        for batch in self.val:
            images, masks = to_device(batch, acc.device)
            with acc.autocast():
                out = model(self.normalize(images))
            metrics.update((out[0] if isinstance(out, tuple) else out).float().softmax(1), masks)
        model.train(was_training)
        metrics.load(acc.reduce(metrics.state(), reduction="sum"))
        return metrics.flat()

    def export(self, run: Run, model: torch.nn.Module) -> None:
        save_segmenter(model, run.run_dir, self.mcfg)


def build_mae(cfg: PretrainConfig, classes: list[str]) -> tuple[MaskedAutoencoder, dict]:
    """The timm encoder (no classifier) inside the MAE network, and the config its saved encoder is rebuilt from."""
    backbone, mcfg = _backbone(cfg, classes, 0)
    net = MaskedAutoencoder(backbone, mask_ratio=cfg.mae_mask_ratio, decoder_dim=cfg.mae_decoder_dim,
                            decoder_depth=cfg.mae_decoder_depth)
    if cfg.crop_size % net.stride:
        raise ConfigError(f"key 'crop_size': {cfg.crop_size} is not a multiple of {cfg.model}'s token stride "
                          f"{net.stride} (objective mae reconstructs whole patches)")
    mcfg["objective"] = "mae"
    return net, mcfg


def mae_param_groups(model: MaskedAutoencoder, cfg: PretrainConfig) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases, position/class tokens and the mask token."""
    skip = {f"backbone.{n}" for n in model.backbone.no_weight_decay()} | {"mask_token"}
    return param_groups_weight_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=skip)


MAE_OWN = "MAE on own images (this study)"


class MAEPretrainTask(PretrainTask):
    """`objective: mae`: masked-image modelling (pretrain/mae.py); labels and masks are not used, so the folders
    may have different classes (synthetic shards and imported real images, read in turn)."""

    def build(self, run: Run) -> torch.nn.Module:
        cfg, acc = self.cfg, run.accelerator
        self.folders = [str(s) for s in self.shards] if isinstance(self.shards, list | tuple) else [str(self.shards)]
        self.classes, self.per_folder = merged_classes(self.folders)
        net, self.mcfg = build_mae(cfg, self.classes)
        infos = [make_dataset(s, cfg.train_split).info or {} for s in self.folders]
        sources = [i.get("source") for i in infos]
        # synthetic pretraining when every folder was generated (`synth import` writes "real:NAME"); on the user's own
        # images it is named as such
        base = (self.mcfg.get("weights") or {}).get("pretraining")
        if all(src and not str(src).startswith("real:") for src in sources):
            self.mcfg["pretraining"] = combine(base, synthetic=True)
        else:
            self.mcfg["pretraining"] = " + ".join(p for p in (base, MAE_OWN) if p and p != NONE)
        if acc.is_main_process:
            (run.run_dir / "run_info.json").write_text(json.dumps({
                "shards": self.folders, "sources": sources, "classes": self.per_folder, "objective": "mae",
                "weights": self.mcfg.get("weights"), "pretraining": self.mcfg["pretraining"],
                "normalisation": {"mean": self.mcfg["mean"], "std": self.mcfg["std"]}}, indent=2) + "\n")
        self.normalize = normalizer(self.mcfg["mean"], self.mcfg["std"], acc.device)
        self.aug = build_augment(cfg.augment, (cfg.crop_size, cfg.crop_size))
        self.val = val_loader(self.folders[0], cfg.val_split, img_size=cfg.crop_size, batch_size=cfg.batch_size,
                              num_workers=min(cfg.num_workers, 1), classes=self.per_folder[0],
                              small_images=cfg.small_images) \
            if cfg.val_split else None
        return net

    def param_groups(self, model: MaskedAutoencoder) -> list[dict]:
        return mae_param_groups(model, self.cfg)

    def loader(self, run: Run, epoch: int, batches: int):
        cfg = self.cfg
        return folders_in_turn(self.folders, self.per_folder, cfg.train_split, img_size=cfg.crop_size,
                               batch_size=cfg.batch_size, batches=batches, world_size=run.accelerator.num_processes,
                               num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                               epoch=epoch, repeat_threshold=cfg.repeat_threshold, small_images=cfg.small_images)

    def losses(self, run: Run, model, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        images, masks = to_device(batch, run.accelerator.device)
        images, _ = augment_batch(self.aug, images, masks)
        return {"loss": model(self.normalize(images))["loss"]}

    @torch.no_grad()
    def validate(self, run: Run, model: MaskedAutoencoder, step: int) -> dict:
        """The reconstruction loss over the validation split with masks fixed by `seed` (comparable between
        validations), and RUN/mae_reconstructions.png of the first batch: input, what the encoder saw, output."""
        acc = run.accelerator
        was_training = model.training
        model.eval()
        gen = torch.Generator().manual_seed(self.cfg.seed)
        total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
        for i, batch in enumerate(self.val):
            images, _ = to_device(batch, acc.device)
            x = self.normalize(images)
            with acc.autocast():
                out = model(x, generator=gen)
            total += out["loss"].float() * len(images)
            count += len(images)
            if i == 0 and acc.is_main_process:
                masked, recon = model.reconstruct(x, out)
                unnorm = self.normalize_inverse(acc.device)
                rows = [images.float(), unnorm(masked), unnorm(recon).clamp(0, 1)]
                grid = torch.cat([torch.cat(list(r[:8]), dim=-1) for r in rows], dim=-2)
                run.save_image((grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8),
                               run.run_dir / "mae_reconstructions.png", key="mae_reconstructions", step=step,
                               caption="input (top), visible patches (middle), reconstruction (bottom)")
        model.train(was_training)
        total, count = acc.reduce(total, reduction="sum"), acc.reduce(count, reduction="sum")
        return {"val_mae_loss": float(total / count.clamp_min(1)), "val_samples": int(count)}

    def normalize_inverse(self, device):
        m = torch.tensor(self.mcfg["mean"], device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.mcfg["std"], device=device).view(1, -1, 1, 1)
        return lambda x: x.float() * s + m

    def export(self, run: Run, model: MaskedAutoencoder) -> None:
        save_model(model.backbone, run.run_dir, self.mcfg)


def train(cfg: PretrainConfig, shards: str | list[str], run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) pretraining; returns a summary {step, val, checkpoint, model}.

    `shards`: one location, or several dataset folders with the same classes read as one stream (for example
    procedural and diffusion shards); RUN/run_info.json records them and their `source`s. With `objective: mae`
    the folders' classes may differ (they are read in turn, their masks unused).
    """
    task = {"segmentation": SegPretrainTask, "mae": MAEPretrainTask}.get(cfg.objective, PretrainTask)
    return run_task(task(cfg, shards), run_dir, progress=progress)


def mixed_batch(run: Run, batch: dict, aug, mix, classes: list[str], grid_path: Path | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Augment, labels from the augmented masks, mix: (images, multi-hot labels, mixed masks)."""
    images, masks = augment_batch(aug, *to_device(batch, run.accelerator.device))
    k = len(classes) - 1
    known = masks.masked_fill(masks > k, 0).flatten(1)  # ignored pixels (co-training's IGNORE) mark no class
    present = images.new_zeros(masks.shape[0], k + 1).scatter_(1, known, 1.0)
    labels = present[:, 1:]  # presence after the crop: a defect cropped away is absent
    images, labels, dense_target, info = mix_batch(images, labels, masks, mix)
    if grid_path is not None and run.accelerator.is_main_process:
        log_grid(run, images, dense_target, classes, grid_path, info["mode"])
    return images, labels, dense_target


def pretrain_losses(run: Run, model, batch: dict, aug, mix, normalize, cfg: PretrainConfig, classes: list[str], *,
                    grid_path: Path | None) -> dict[str, torch.Tensor]:
    """One batch of the classification objective: mixed batch, forward; the losses (total first)."""
    images, labels, dense_target = mixed_batch(run, batch, aug, mix, classes, grid_path)
    out = model(normalize(images))
    bce = F.binary_cross_entropy_with_logits(out["logits"].float(), labels)
    dense = F.cross_entropy(out["dense"].float(), dense_target, ignore_index=IGNORE) if "dense" in out \
        else bce.new_zeros(())
    return {"loss": bce + cfg.dense_weight * dense, "bce": bce, "dense_loss": dense}


def log_grid(run: Run, images, masks, classes: list[str], path: Path, mode: str) -> None:
    """The first mixed batch and its masks, as RUN/cutmix_grid.png and a W&B image."""
    caption = f"{mode}: images (top) and mixed masks (bottom); " + ", ".join(f"{i}={c}" for i, c in enumerate(classes))
    run.save_image(mask_grid(images, masks, class_palette(classes)), path, key="cutmix_batch", step=0, caption=caption)
