"""The one training skeleton: the keys every training command shares, their checks, and `run_task`.

Pretraining, fine-tuning and diffusion training each supply a `Task` (the model, batch -> losses, validation,
what to export); `run_task` owns the rest: the run folder (`Run`), AdamW (fused where torch has it) with warmup +
cosine, Accelerate's `prepare`, `torch.compile`, EMA, resume, the NaN stop, logging, checkpoints and the final export.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn

from .augment import AugmentConfig
from .config import require, section
from .data import SMALL_IMAGES
from .loop import Run, last_checkpoint, lr_factor
from .precision import MIXED_PRECISION, prefers_channels_last, use_explicit_attention
from .reader import damage_found


def adamw(groups: Iterable, lr: float) -> torch.optim.AdamW:
    """AdamW, fused where torch has the fused kernel for the parameters' device (CPU since torch 2.4, CUDA):
    one pass over every tensor instead of the default foreach implementation's pass per operation. Same update
    (tests/test_training.py). Measured on the 2-vCPU AMD EPYC with AVX-512 (family 25 model 17, torch
    2.14.1, 2 threads; docs/scaling.md "Fused AdamW"): 23-30 -> 6 ms per step for ViT-Tiny + DPT, 45-50 -> 10 ms
    for the ResNet-18 U-Net. Where the fused kernel is refused (an older torch, another device) the default."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr)


def validate_training_keys(cfg) -> None:
    """Checks of the keys every training config shares (the loop's keys, the loader's, the augmentation)."""
    for key in ("batch_size", "grad_accum", "max_steps", "log_every", "val_every", "checkpoint_every",
                "keep_checkpoints"):
        value = getattr(cfg, key)
        require(isinstance(value, int) and value >= 1, key, value, "an integer >= 1")
    require(cfg.stop_after is None or 1 <= cfg.stop_after <= cfg.max_steps, "stop_after", cfg.stop_after,
            f"null or a step in [1, max_steps={cfg.max_steps}]")
    require(cfg.lr > 0 and math.isfinite(cfg.lr), "lr", cfg.lr, "a finite number > 0")
    require(0 <= cfg.min_lr <= cfg.lr, "min_lr", cfg.min_lr, f"a number in [0, lr={cfg.lr}]")
    require(0 <= cfg.warmup_steps < cfg.max_steps, "warmup_steps", cfg.warmup_steps,
            f"an integer in [0, max_steps={cfg.max_steps})")
    require(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    require(cfg.clip_grad is None or cfg.clip_grad > 0, "clip_grad", cfg.clip_grad, "null or a number > 0")
    require(cfg.mixed_precision in MIXED_PRECISION, "mixed_precision", cfg.mixed_precision,
            f"one of {', '.join(MIXED_PRECISION)}")
    require(cfg.num_workers >= 0, "num_workers", cfg.num_workers, "an integer >= 0")
    require(isinstance(cfg.allow_damaged, bool), "allow_damaged", cfg.allow_damaged, "true or false")
    require(cfg.shuffle_buffer >= 0, "shuffle_buffer", cfg.shuffle_buffer, "an integer >= 0 (0 = no shuffle)")
    require(isinstance(cfg.crop_size, int) and 16 <= cfg.crop_size <= 4096, "crop_size", cfg.crop_size,
            "an integer between 16 and 4096")
    require(isinstance(cfg.defect_crop, int | float) and 0 <= cfg.defect_crop <= 1, "defect_crop", cfg.defect_crop,
            "a probability in [0, 1]")
    require(isinstance(cfg.repeat_threshold, int | float) and 0 <= cfg.repeat_threshold <= 1, "repeat_threshold",
            cfg.repeat_threshold, "a number in [0, 1] (0 = every image once per pass)")
    require(cfg.small_images in SMALL_IMAGES, "small_images", cfg.small_images,
            f"one of {', '.join(SMALL_IMAGES)} (what a training crop does with an image smaller than crop_size)")
    require(0 < cfg.ema_decay < 1, "ema_decay", cfg.ema_decay, "a number in (0, 1)")
    require(cfg.resume is None or isinstance(cfg.resume, str), "resume", cfg.resume,
            "null, 'latest' or a checkpoint folder")
    cfg.augment.validate()


@dataclass
class TrainingKeys(AugmentConfig):
    """The keys every training command shares (pretrain, finetune, synth train-diffusion): the loop's
    (defectforge/loop.py), the loader's and, inherited from AugmentConfig, the augmentation's (on the device,
    defectforge/augment.py); `validate_training_keys` checks them. Each config overrides the defaults that
    differ for its task."""

    crop_size: int = 224  # side of the square training crops the loader cuts (and the augmentation returns)
    defect_crop: float = 0.0  # share of the training crops placed on a defect pixel (defectforge/data.py)
    repeat_threshold: float = 0.0  # > 0: images of rare classes shown more often (docs/finetune.md, Data)
    small_images: str = "resize"  # an image smaller than crop_size: "pad" (mask ignored) or "resize" it up
    # optimisation (defectforge/loop.py)
    batch_size: int = 32  # per process
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps; the cosine schedule spans them
    stop_after: int | None = None  # end this invocation at that step (schedule unchanged); resume later
    lr: float = 1e-3
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    clip_grad: float | None = 1.0
    mixed_precision: str = "auto"  # auto: bf16 (or fp16) on GPU; on CPU bf16 if measured >= 1.2x faster, else no
    ema: bool = False  # validate and export an exponential moving average of the weights
    ema_decay: float = 0.999
    compile: bool = False  # torch.compile the model
    # data
    train_split: str = "train"
    val_split: str | None = "val"  # null = no validation
    # DataLoader workers per process. 1 by default: on the 2-core CPU of bench/README.md a second worker
    # competes with the two compute threads (loop/bare 0.81-0.86 with 2, 0.88-0.90 with 1); raise it on a GPU.
    num_workers: int = 1
    shuffle_buffer: int = 256
    trace_samples: bool = False  # write the sample keys each process trained on to RUN/samples/rank-<r>.txt
    # a shard that no longer matches _info.json (missing, other sha256, fewer samples) or an undecodable sample
    # fails the run by name; true: left out, counted, the count written to run_info.json and metrics.jsonl
    allow_damaged: bool = False
    # bookkeeping
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 200  # also the length of one data "epoch" (the stream is reseeded per interval)
    keep_checkpoints: int = 2
    resume: str | None = None  # latest | a checkpoint folder
    study: str | None = None  # W&B group
    seed: int = 0
    wandb: bool = True
    wandb_project: str = "defectforge"

    @property
    def augment(self) -> AugmentConfig:
        return section(self, AugmentConfig)


def normalizer(mean: Sequence[float], std: Sequence[float], device: torch.device) -> Callable[[torch.Tensor],
                                                                                          torch.Tensor]:
    """x -> (x - mean) / std per channel, on `device` (images in [0, 1], as the loaders give them)."""
    m = torch.tensor(list(mean), device=device).view(1, -1, 1, 1)
    s = torch.tensor(list(std), device=device).view(1, -1, 1, 1)
    return lambda x: (x - m) / s


class Task:
    """What one training command supplies to `run_task`; the skeleton calls these in this order.

    `build` returns the model (not yet prepared) and may write RUN/run_info.json; `loader(run, epoch, batches)`
    yields the seeded batches of a data epoch; `losses` returns scalar losses with "loss" first; `validate`
    gets the weights that are kept (the EMA when there is one) and returns flat metrics; `export` writes the
    final outputs on the main process after the last step; `summary` adds entries to the returned summary.
    """

    job_type = "train"

    def __init__(self, cfg: Any, shards: Any):
        self.cfg, self.shards = cfg, shards
        self.last_val: dict | None = None

    def build(self, run: Run) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module) -> list[dict]:
        """AdamW groups: no weight decay on norms, biases and 1-d parameters."""
        return param_groups_weight_decay(model, weight_decay=self.cfg.weight_decay)

    def loader(self, run: Run, epoch: int, batches: int) -> Iterable[dict]:
        raise NotImplementedError

    def losses(self, run: Run, model: nn.Module, batch: dict, first: bool) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def validates(self) -> bool:
        return bool(self.cfg.val_split)

    def validate(self, run: Run, model: nn.Module, step: int) -> dict:
        return {}

    def export(self, run: Run, model: nn.Module) -> None:
        """Write the final outputs (main process, only when the run reached `max_steps`)."""

    def summary(self, run: Run, done: bool) -> dict:
        return {}


def run_task(task: Task, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Run (or resume) `task` to `stop_after` or `max_steps`; returns {step, val, checkpoint, ...task.summary}."""
    cfg = task.cfg
    run = Run(cfg, run_dir, job_type=task.job_type)
    acc = run.accelerator
    net = task.build(run)
    channels_last = prefers_channels_last(net)
    if channels_last:  # a convolutional network: measured 5-20 % faster per step (docs/scaling.md)
        net = net.to(memory_format=torch.channels_last)
    # on a CPU where the explicit product measured faster than the fused attention kernel (defectforge/precision.py)
    explicit = use_explicit_attention(net, run.precision)
    run.note_info(precision={**run.precision, "channels_last": channels_last, "explicit_attention_layers": explicit})
    run.note_damage()
    optimizer = adamw(task.param_groups(net), cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    model, optimizer = acc.prepare(torch.compile(net) if cfg.compile else net, optimizer)
    ema = ModelEmaV3(acc.unwrap_model(model, keep_torch_compile=False), decay=cfg.ema_decay) if cfg.ema else None

    def kept() -> nn.Module:  # what is validated and exported: the EMA when there is one
        return ema.module if ema is not None else acc.unwrap_model(model, keep_torch_compile=False)

    def validate(step: int) -> dict:
        task.last_val = task.validate(run, kept(), step)
        return task.last_val

    try:
        run.start(*([scheduler, ema] if ema is not None else [scheduler]))
        run.note_damage(run.state.step)
        step = run.fit(model, optimizer, scheduler, make_loader=lambda epoch, n: task.loader(run, epoch, n),
                       micro_step=lambda batch, first: task.losses(run, model, batch, first),
                       validate=validate if task.validates else None, ema=ema, progress=progress,
                       desc=task.job_type)
        if step == cfg.max_steps and acc.is_main_process:
            task.export(run, kept())
        acc.wait_for_everyone()
        run.note_damage(step)
    finally:
        run.end()
    damage = damage_found()
    return {"step": step, "val": task.last_val, "checkpoint": str(last_checkpoint(run.run_dir)),
            **task.summary(run, step == cfg.max_steps), **({"data_damage": damage} if damage else {})}
