"""`python -m synth train-diffusion`: train the mask- and class-conditioned inpainting UNet on image+mask shards.

    accelerate launch -m synth train-diffusion --config configs/synth/diffusion.yaml --shards DIR [DIR ...] --out RUN

Driven by the shared training skeleton (`defectforge.training.run_task`: checkpoints, exact resume, W&B,
metrics.jsonl). Each training sample becomes an inpainting task (synth/diffusion.py for the model):

- an image with defects: one of its defect classes is picked, the region to regenerate is that class's mask
  dilated by `dilation` px, and the class is the condition, so the model learns to draw that defect inside a
  given mask with the surface around it as context;
- an image without defect: the region is a random ellipse and the condition is class 0 (background), so the
  model learns to fill clean surface;
- with probability `full_prob`: the region is the whole image (condition: the picked class, or background),
  which is what `backend=refine` (SDEdit) runs.

The loss is the MSE of the UNet's prediction (`prediction`: v, the default, stays well-behaved at every
noise level; noise; or the clean image), weighted 1 inside the region and `outside_weight` outside (outside,
the blanked-image input gives the answer away). Shards from several folders (procedural, imported real ones)
are read in turn; their classes are merged by name. The result is `RUN/pipeline`, a diffusers pipeline
folder (`save_pretrained`) with the EMA weights when `ema` is on, that `synth generate backend=inpaint` loads.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from defectforge import __version__
from defectforge.augment import augment_batch, build_augment
from defectforge.config import require
from defectforge.data import folders_in_turn, merged_classes, to_device, val_loader
from defectforge.loop import Run
from defectforge.tracking import class_palette, mask_grid
from defectforge.training import Task, TrainingKeys, run_task, validate_training_keys

from .diffusion import PREDICTION_TYPES, DefectInpaintPipeline, build_unet, save_pipeline, training_scheduler

log = logging.getLogger(__name__)


@dataclass
class DiffusionTrainConfig(TrainingKeys):
    """Every key of `python -m synth train-diffusion` (docs/diffusion.md)."""

    RENAMED: ClassVar[dict[str, str]] = {"image_size": "crop_size"}

    name: str = "diffusion"
    crop_size: int = 64  # training crops (the UNet runs on any multiple of 2**(levels-1) afterwards)
    # model
    channels: list[int] = field(default_factory=lambda: [64, 128, 256, 256])
    layers_per_block: int = 2
    attention: bool = True  # self-attention at the lowest resolution
    head_dim: int = 32  # channels per attention head
    norm_groups: int = 32
    num_train_timesteps: int = 1000
    prediction: str = "v_prediction"  # what the UNet predicts: v_prediction | epsilon (noise) | sample (clean image)
    # task
    dilation: int = 2
    full_prob: float = 0.2
    outside_weight: float = 0.1
    # optimisation (defectforge/loop.py): the TrainingKeys, with these defaults
    batch_size: int = 16  # per process
    max_steps: int = 20000
    lr: float = 2e-4
    min_lr: float = 1e-6
    warmup_steps: int = 500
    weight_decay: float = 0.0
    ema: bool = True
    # augmentation: flips and quarter turns only by default (colour is what the model must learn)
    color_jitter: float = 0.0
    resized_crop: bool = False
    # data: the TrainingKeys; val_split is the first folder's split for the sample grid and val_loss
    # bookkeeping (and the TrainingKeys' checkpoint_every, resume, study, seed, wandb, ...)
    log_every: int = 20
    val_every: int = 1000  # sample grid + val_loss
    sample_steps: int = 25  # DDIM steps of the sample grid
    checkpoint_every: int = 1000

    def validate(self) -> None:
        validate_training_keys(self)
        require(self.crop_size <= 1024, "crop_size", self.crop_size, "an integer between 16 and 1024")
        require(self.small_images == "resize", "small_images", self.small_images,
                "'resize': the inpainting model learns every pixel of its crops, padding included")
        ch = self.channels
        require(isinstance(ch, list) and 2 <= len(ch) <= 6 and all(isinstance(c, int) and c > 0 for c in ch),
                "channels", ch, "a list of 2-6 positive channel counts, one per resolution level")
        require(all(c % self.norm_groups == 0 for c in ch), "norm_groups", self.norm_groups,
                f"a divisor of every channel count {ch}")
        multiple = 2 ** (len(ch) - 1)
        require(self.crop_size % multiple == 0, "crop_size", self.crop_size,
                f"a multiple of {multiple} (2**(len(channels) - 1))")
        require(isinstance(self.head_dim, int) and self.head_dim >= 1 and ch[-1] % self.head_dim == 0, "head_dim",
                self.head_dim, f"a divisor of the last channel count {ch[-1]}")
        require(self.layers_per_block >= 1, "layers_per_block", self.layers_per_block, "an integer >= 1")
        require(self.prediction in PREDICTION_TYPES, "prediction", self.prediction,
                f"one of {', '.join(PREDICTION_TYPES)}")
        require(self.num_train_timesteps >= 10, "num_train_timesteps", self.num_train_timesteps, "an integer >= 10")
        require(isinstance(self.dilation, int) and 0 <= self.dilation <= 64, "dilation", self.dilation,
                "an integer in [0, 64]")
        require(0.0 <= self.full_prob <= 1.0, "full_prob", self.full_prob, "a number in [0, 1]")
        require(0.0 <= self.outside_weight <= 1.0, "outside_weight", self.outside_weight, "a number in [0, 1]")
        require(isinstance(self.sample_steps, int) and self.sample_steps >= 1, "sample_steps", self.sample_steps,
                "an integer >= 1")


def make_regions(masks: torch.Tensor, cfg: DiffusionTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the region to regenerate (B, 1, H, W) in {0, 1} and its class label (B,); see the module doc.

    Draws from torch's global RNG (seeded per process by the loop).
    """
    b, h, w = masks.shape
    device = masks.device
    labels = torch.zeros(b, dtype=torch.long)
    raw = torch.zeros(b, 1, h, w, device=device)
    yy = torch.arange(h, device=device).view(h, 1).float()
    xx = torch.arange(w, device=device).view(1, w).float()
    for i in range(b):
        present = torch.unique(masks[i])
        present = present[present > 0].cpu()
        if len(present):
            c = int(present[torch.randint(len(present), ())])
            labels[i] = c
            raw[i, 0] = (masks[i] == c).float()
        else:  # a clean surface: fill a random ellipse with background
            cy, cx = (torch.rand(2) * 0.6 + 0.2).tolist()
            ry, rx = (torch.rand(2) * 0.25 + 0.05).tolist()
            raw[i, 0] = (((yy / h - cy) / ry) ** 2 + ((xx / w - cx) / rx) ** 2 <= 1).float()
    region = F.max_pool2d(raw, 2 * cfg.dilation + 1, stride=1, padding=cfg.dilation) if cfg.dilation else raw
    full = torch.rand(b) < cfg.full_prob
    region[full.to(device)] = 1.0
    return region, labels.to(device)


def denoising_loss(unet, scheduler, images: torch.Tensor, region: torch.Tensor, labels: torch.Tensor,
                   outside_weight: float, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """MSE of the inpainting task on the scheduler's prediction type (v, noise or clean image); images in [0, 1]."""
    x0 = images * 2 - 1
    noise = torch.randn_like(x0) if noise is None else noise
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    xt = scheduler.add_noise(x0, noise, timesteps)
    out = unet(torch.cat([xt, region, x0 * (1 - region)], dim=1), timesteps, class_labels=labels).sample
    kind = scheduler.config.prediction_type
    target = {"epsilon": noise, "sample": x0}.get(kind)
    if target is None:
        target = scheduler.get_velocity(x0, noise, timesteps)
    weight = region + outside_weight * (1 - region)
    return ((out.float() - target) ** 2 * weight).sum() / (weight.sum() * 3).clamp_min(1.0)


def sample_grid(unet, scheduler, images: torch.Tensor, region: torch.Tensor, labels: torch.Tensor,
                classes: list[str], steps: int, seed: int) -> np.ndarray:
    """Uint8 grid: originals, the blanked inputs, samples (top three rows) and the regions coloured by class."""
    pipe = DefectInpaintPipeline(unet=unet, scheduler=scheduler)
    from diffusers import DDIMScheduler

    out = pipe(images * 2 - 1, region, labels, steps=steps, generator=torch.Generator().manual_seed(seed),
               scheduler=DDIMScheduler.from_config(scheduler.config))
    samples = (out + 1) / 2
    samples = region * samples + (1 - region) * images  # composited, as `synth generate` does
    regions = (region[:, 0] * labels.view(-1, 1, 1)).long()
    rows = [mask_grid(x, regions, class_palette(classes))[: x.shape[-2]] for x in (images, images * (1 - region))]
    return np.concatenate([*rows, mask_grid(samples, regions, class_palette(classes))], axis=0)


class DiffusionTask(Task):
    """The denoising loss of the inpainting task (module doc) on image+mask shards of one or more folders."""

    job_type = "train-diffusion"

    def build(self, run: Run):
        cfg, shards, acc = self.cfg, self.shards, run.accelerator
        self.classes, self.per_folder = merged_classes(shards)
        self.luts = [torch.tensor([self.classes.index(c) for c in folder], device=acc.device)
                     for folder in self.per_folder]
        unet = build_unet(cfg.crop_size, len(self.classes), cfg.channels, cfg.layers_per_block, cfg.attention,
                          cfg.norm_groups, cfg.head_dim)
        self.noise_scheduler = training_scheduler(cfg.num_train_timesteps, cfg.prediction)
        self.aug = build_augment(cfg.augment, (cfg.crop_size, cfg.crop_size))
        if acc.is_main_process:
            log.info("classes %s from %d folder(s); UNet %.1f M parameters", self.classes, len(shards),
                     sum(p.numel() for p in unet.parameters()) / 1e6)
        self.fixed = self._fixed_batch(acc) if cfg.val_split and acc.is_main_process else None
        return unet

    def _fixed_batch(self, acc) -> tuple:
        """The validation batch, regions, noise and timesteps every validation reuses (seeded, main process)."""
        cfg = self.cfg
        batch = next(iter(val_loader(self.shards[0], cfg.val_split, img_size=cfg.crop_size,
                                     batch_size=min(8, cfg.batch_size), num_workers=0)))
        images, masks = to_device(batch, acc.device)
        state = torch.random.get_rng_state()
        torch.manual_seed(cfg.seed)
        region, labels = make_regions(self.luts[0][masks], cfg)
        torch.random.set_rng_state(state)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(cfg.seed)).to(acc.device)
        t = torch.linspace(0, cfg.num_train_timesteps - 1, images.shape[0]).long().to(acc.device)
        return images, region, labels, noise, t

    def param_groups(self, model) -> list[dict]:
        return [{"params": list(model.parameters()), "weight_decay": self.cfg.weight_decay}]

    def loader(self, run: Run, epoch: int, batches: int):
        cfg = self.cfg
        return folders_in_turn(self.shards, self.per_folder, cfg.train_split, img_size=cfg.crop_size,
                               batch_size=cfg.batch_size, batches=batches, world_size=run.accelerator.num_processes,
                               num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                               epoch=epoch, defect_crop=cfg.defect_crop, repeat_threshold=cfg.repeat_threshold)

    def losses(self, run: Run, model, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        images, masks = to_device(batch, run.accelerator.device)
        images, masks = augment_batch(self.aug, images, self.luts[batch["folder"]][masks])
        region, labels = make_regions(masks, self.cfg)
        return {"loss": denoising_loss(model, self.noise_scheduler, images, region, labels, self.cfg.outside_weight)}

    def validate(self, run: Run, model, step: int) -> dict:
        if self.fixed is None:
            return {}
        cfg = self.cfg
        model.eval()
        with torch.no_grad():
            images, region, labels, noise, t = self.fixed
            val_loss = float(denoising_loss(model, self.noise_scheduler, images, region, labels, cfg.outside_weight,
                                            noise=noise, timesteps=t))
            grid = sample_grid(model, self.noise_scheduler, images, region, labels, self.classes, cfg.sample_steps,
                               cfg.seed)
        model.train()
        caption = ("rows: originals, inputs with the region blanked, samples composited, regions by class ("
                   + ", ".join(f"{i}={c}" for i, c in enumerate(self.classes)) + ")")
        run.save_image(grid, run.run_dir / "samples" / f"step-{step:07d}.png", key="inpaint_samples", step=step,
                       caption=caption)
        return {"val_loss": val_loss}

    def export(self, run: Run, model) -> None:
        save_pipeline(model, self.noise_scheduler, run.run_dir / "pipeline", {
            "classes": self.classes, "image_size": self.cfg.crop_size, "trained_on": [str(s) for s in self.shards],
            "steps": self.cfg.max_steps, "ema": self.cfg.ema, "defectforge_version": __version__})

    def summary(self, run: Run, done: bool) -> dict:
        pipeline = run.run_dir / "pipeline"
        return {"classes": self.classes, "pipeline": str(pipeline) if done else None,
                "pipeline_written": done and pipeline.is_dir()}


def train(cfg: DiffusionTrainConfig, shards: list[str] | str, out: str | Path, progress: bool = True) -> dict:
    """Train and write RUN/pipeline; returns a summary."""
    return run_task(DiffusionTask(cfg, [shards] if isinstance(shards, str) else list(shards)), out,
                    progress=progress)


def main(argv: list[str] | None = None) -> int:
    from defectforge.cli import training_main

    return training_main("synth train-diffusion", __doc__, DiffusionTrainConfig, train, "max_steps=2000 crop_size=64",
                         argv, config_example="configs/synth/diffusion.yaml", multi_shards=True)


if __name__ == "__main__":
    sys.exit(main())

