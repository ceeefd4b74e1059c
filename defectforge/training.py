"""The keys every training command shares (pretrain, finetune, synth train-diffusion) and their checks."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .augment import AugmentConfig
from .config import require, section

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


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
    require(cfg.shuffle_buffer >= 0, "shuffle_buffer", cfg.shuffle_buffer, "an integer >= 0 (0 = no shuffle)")
    require(cfg.resume is None or isinstance(cfg.resume, str), "resume", cfg.resume,
            "null, 'latest' or a checkpoint folder")
    cfg.augment.validate()


@dataclass
class TrainingKeys(AugmentConfig):
    """The keys every training command shares (pretrain, finetune, synth train-diffusion): the loop's
    (defectforge/loop.py), the loader's and, inherited from AugmentConfig, the augmentation's (on the device,
    defectforge/augment.py); `validate_training_keys` checks them. Each config overrides the defaults that
    differ for its task."""

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
    mixed_precision: str = "auto"  # auto = no on CPU, bf16 (or fp16) on GPU
    # data
    train_split: str = "train"
    val_split: str | None = "val"  # null = no validation
    # DataLoader workers per process. 1 by default: on the 2-core CPU of bench/README.md a second worker
    # competes with the two compute threads (loop/bare 0.81-0.86 with 2, 0.88-0.90 with 1); raise it on a GPU.
    num_workers: int = 1
    shuffle_buffer: int = 256
    trace_samples: bool = False  # write the sample keys each process trained on to RUN/samples/rank-<r>.txt
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
