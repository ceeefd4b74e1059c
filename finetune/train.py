"""Segmentation fine-tuning on the shared Accelerate loop (`defectforge/loop.py`).

Per optimizer step: `grad_accum` random `crop_size` crops from the training shards (a deterministic
`train_samples` subset when asked) -> augmentation of image and mask alike -> normalisation ->
cross-entropy (+ Dice or focal) -> AdamW on the unfrozen parameters. Validation runs on whole images
(padded to the model's stride); images larger than `val_max_size` in overlapping tiles of that size, blended as
the evaluation blends them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from defectforge.augment import augment_batch, build_augment
from defectforge.config import ConfigError
from defectforge.data import to_device, train_loader
from defectforge.loop import Run
from defectforge.reader import list_keys, make_dataset
from defectforge.shards import ShardError
from defectforge.tiling import tiled_logits
from defectforge.tracking import class_palette, mask_grid
from defectforge.training import Task, normalizer, run_task
from pretrain.hub import combine
from pretrain.metrics import SegMetrics
from pretrain.segmenter import SegLoss, Segmenter, auto_class_weights, build_segmenter, save_segmenter
from pretrain.train import mixed_batch

from .config import FinetuneConfig
from .models import class_lut, freeze, init_pretraining, layer_decay_groups, load_init

log = logging.getLogger("finetune")
PANEL_SIDE = 256


def select_subset(keys: list[str], n: int | None, seed: int) -> list[str] | None:
    """`n` keys of the split, the same for the same seed; a smaller `n` is a subset of a larger one."""
    if n is None:
        return None
    if n > len(keys):
        raise ConfigError(f"key 'train_samples': value {n} is invalid, expected at most the {len(keys)} samples of "
                          "the training split")
    order = np.random.default_rng([seed, 0x5EB5E7]).permutation(sorted(keys))
    return sorted(order[:n].tolist())


@torch.no_grad()
def predict(model: torch.nn.Module, image: torch.Tensor, max_size: int, overlap: float = 0.1) -> torch.Tensor:
    """Class probabilities (1, C, H, W) of one normalised image (1, 3, H, W): whole up to `max_size` (one tile),
    above it in tiles of `max_size` overlapping by `overlap` and blended as the evaluation blends them
    (`tiled_logits`: every tile full-sized, the last aligned to the border), so validation measures what the
    report will."""
    return tiled_logits(model, image, tile=max_size, overlap=overlap, blend="gaussian").softmax(1)


def _panel(image: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, ...]:
    size = (PANEL_SIDE, PANEL_SIDE)
    return (F.interpolate(image[None], size=size, mode="bilinear", antialias=True)[0],
            F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0].long(),
            F.interpolate(pred[None, None].float(), size=size, mode="nearest")[0, 0].long())


def validate(run: Run, model: torch.nn.Module, shards: str, cfg: FinetuneConfig, classes: list[str], normalize,
             step: int) -> dict:
    acc = run.accelerator
    was_training = model.training
    model.eval()
    metrics = SegMetrics(classes, device=acc.device)
    examples = []
    for sample in make_dataset(shards, cfg.val_split, classes=classes):
        image = sample["image"].to(acc.device)[None]
        with acc.autocast():
            probs = predict(model, normalize(image), cfg.val_max_size, cfg.val_overlap)
        mask = sample["mask"].to(acc.device)
        metrics.update(probs, mask[None])
        if len(examples) < cfg.val_images:
            examples.append((sample["key"], *_panel(sample["image"], sample["mask"], probs[0].argmax(0).cpu())))
    model.train(was_training)
    metrics.load(acc.reduce(metrics.state(), reduction="sum"))
    if acc.is_main_process and examples:
        _save_examples(run, examples, classes, step)
    return metrics.flat()


def _save_examples(run: Run, examples: list, classes: list[str], step: int) -> None:
    """RUN/val_examples.png (image / ground truth / prediction rows) and W&B mask panels."""
    palette = class_palette(classes)
    images = torch.stack([e[1] for e in examples])
    grid = np.concatenate([mask_grid(images, torch.stack([e[2] for e in examples]), palette),
                           mask_grid(images, torch.stack([e[3] for e in examples]), palette)[PANEL_SIDE:]], axis=0)

    def panels() -> list:
        import wandb

        labels = dict(enumerate(classes))
        return [wandb.Image((e[1].permute(1, 2, 0).numpy() * 255).astype(np.uint8), caption=e[0], masks={
            "ground_truth": {"mask_data": e[2].numpy().astype(np.uint8), "class_labels": labels},
            "prediction": {"mask_data": e[3].numpy().astype(np.uint8), "class_labels": labels}}) for e in examples]

    run.save_image(grid, run.run_dir / "val_examples.png", key="val_examples", step=step, wandb_value=panels)


class FinetuneTask(Task):
    """Cross-entropy (+ Dice or focal) on augmented crops of the target's training split."""

    job_type = "finetune"

    def build(self, run: Run) -> Segmenter:
        cfg, shards, acc = self.cfg, self.shards, run.accelerator
        classes = self.classes = make_dataset(shards, cfg.train_split).classes
        if cfg.val_split:  # a missing split fails now, not at the first validation
            try:
                make_dataset(shards, cfg.val_split)
            except ShardError as err:
                raise ShardError(f"key 'val_split': {err}. Validate on a split carved from the training data "
                                 "(`synth import ... --val-ratio 0.15`), or set val_split=null; never on the "
                                 "split the models are compared on") from None
        self.subset = select_subset(list_keys(shards, cfg.train_split), cfg.train_samples, cfg.seed)
        if cfg.synthetic_shards:  # co-training: their classes mapped onto the target's (class_map)
            self.syn_classes = make_dataset(cfg.synthetic_shards, cfg.train_split).classes
            self.syn_lut = class_lut(classes, self.syn_classes, cfg.class_map)
        model, self.mcfg = build_segmenter(cfg, classes)
        self.init_report = None
        if cfg.init is not None:
            self.init_report = load_init(model, cfg.init, self.mcfg, cfg.class_map)
            if cfg.class_map and "classes" not in self.init_report and not cfg.synthetic_shards:
                raise ConfigError(f"key 'class_map': init {cfg.init} is not a segmentation run and there are no "
                                  "synthetic_shards, so nothing has classes to map")
            self.mcfg["init"] = str(cfg.init)
            self.mcfg["weights"], self.mcfg["pretraining"] = init_pretraining(cfg.init, self.mcfg["model"])
        else:  # the published weights (pretrained=true) or none
            self.mcfg["pretraining"] = combine((self.mcfg["weights"] or {}).get("pretraining"), synthetic=False)
        frozen = freeze(model, cfg.freeze, self.mcfg["model"]) if cfg.freeze is not None else []
        weights = auto_class_weights(shards, cfg.train_split, classes, self.subset) \
            if cfg.class_weights == "auto" else None
        if weights is not None:
            log.info("class weights from the training pixels: %s", dict(zip(classes, [round(w, 2) for w in weights],
                                                                          strict=True)))
        if acc.is_main_process:
            report = self.init_report
            (run.run_dir / "run_info.json").write_text(json.dumps({
                "init": str(cfg.init) if cfg.init else None,
                "weights": self.mcfg["weights"], "pretraining": self.mcfg["pretraining"],
                "normalisation": {"mean": self.mcfg["mean"], "std": self.mcfg["std"]},
                "init_report": {k: (len(v), v if isinstance(v, dict) else v[:20]) for k, v in report.items()}
                if report else None,
                "frozen": len(frozen), "class_weights": weights or cfg.class_weights,
                "train_samples": len(self.subset) if self.subset is not None else None, "subset": self.subset,
                "synthetic": {"shards": cfg.synthetic_shards, "ratio": cfg.synthetic_ratio,
                              "classes": dict(zip(self.syn_classes, (int(v) for v in self.syn_lut), strict=False))}
                if cfg.synthetic_shards else None,
                "model": self.mcfg}, indent=2) + "\n")
        self.normalize = normalizer(self.mcfg["mean"], self.mcfg["std"], acc.device)
        self.criterion = SegLoss(cfg, len(classes), weights).to(acc.device)
        self.aug, self.mix = build_augment(cfg.augment, (cfg.crop_size, cfg.crop_size)), cfg.mix
        return model

    def param_groups(self, model: Segmenter) -> list[dict]:
        if self.cfg.layer_decay is None:
            return super().param_groups(model)
        groups = layer_decay_groups(model, self.mcfg["model"], self.cfg.lr, self.cfg.weight_decay,
                                    self.cfg.layer_decay)
        log.info("layer_decay=%s: %d parameter groups, rates %.2g to %.2g", self.cfg.layer_decay, len(groups),
                 min(g["lr"] for g in groups), max(g["lr"] for g in groups))
        return groups

    def loader(self, run: Run, epoch: int, batches: int):
        cfg = self.cfg
        k = round(cfg.synthetic_ratio * cfg.batch_size) if cfg.synthetic_shards else 0
        common = dict(img_size=cfg.crop_size, batches=batches, world_size=run.accelerator.num_processes,
                      num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, epoch=epoch,
                      defect_crop=cfg.defect_crop, small_images=cfg.small_images)
        target = train_loader(self.shards, cfg.train_split, batch_size=cfg.batch_size - k, seed=cfg.seed,
                              classes=self.classes, keys=self.subset, repeat_threshold=cfg.repeat_threshold, **common)
        if not k:
            return target
        synthetic = train_loader(cfg.synthetic_shards, cfg.train_split, batch_size=k, seed=cfg.seed + 7919,
                                 classes=self.syn_classes, **common)
        return (co_batch(a, b, self.syn_lut) for a, b in zip(target, synthetic, strict=False))

    def losses(self, run: Run, model, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        if self.mix.enabled:  # CutMix of images and masks alike (the first mixed batch: RUN/cutmix_grid.png)
            images, _, target = mixed_batch(run, batch, self.aug, self.mix, self.classes,
                                            run.run_dir / "cutmix_grid.png" if first else None)
        else:
            images, target = augment_batch(self.aug, *to_device(batch, run.accelerator.device))
        return self.criterion(model(self.normalize(images)), target)

    def validate(self, run: Run, model, step: int) -> dict:
        return validate(run, model, self.shards, self.cfg, self.classes, self.normalize, step)

    def export(self, run: Run, model: Segmenter) -> None:
        save_segmenter(model, run.run_dir, self.mcfg)

    def summary(self, run: Run, done: bool) -> dict:
        return {"model": str(run.run_dir / "model.safetensors") if done else None,
                "init": self.init_report and {k: len(v) for k, v in self.init_report.items()}}


def co_batch(target: dict, synthetic: dict, lut: torch.Tensor) -> dict:
    """One co-training batch: the target samples, then the synthetic ones with their masks mapped by `lut`."""
    return {"image": torch.cat([target["image"], synthetic["image"]]),
            "mask": torch.cat([target["mask"], lut[synthetic["mask"].long()].to(target["mask"].dtype)]),
            "key": target["key"] + synthetic["key"]}


def train(cfg: FinetuneConfig, shards: str, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) fine-tuning; returns a summary {step, val, checkpoint, model, init}."""
    return run_task(FinetuneTask(cfg, shards), run_dir, progress=progress)


__all__ = ["Segmenter", "SegLoss", "predict", "select_subset", "train", "validate"]
