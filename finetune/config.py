"""`FinetuneConfig`: every key of `python -m finetune`, validated before any work starts (docs/finetune.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defectforge.config import require
from defectforge.training import TrainingKeys, validate_training_keys

ARCHITECTURES = ("auto", "DPT", "DeepLabV3Plus", "DeepLabV3", "Unet", "UnetPlusPlus", "FPN", "UPerNet", "PSPNet",
                 "PAN", "Linknet", "MAnet", "Segformer")
LOSSES = ("ce", "ce_dice", "focal", "focal_dice")


@dataclass
class FinetuneConfig(TrainingKeys):
    name: str = "finetune"
    # model (finetune/models.py): a timm encoder inside a segmentation-models-pytorch architecture
    model: str = "vit_tiny"  # timm name or alias (pretrain/models.py ALIASES)
    architecture: str = "auto"  # DPT for ViTs/hybrids, UPerNet for Swin/ConvNeXt, FPN for HRNet, else DeepLabV3Plus
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of the smp architecture
    output_stride: int = 16  # DeepLabV3(+) only: 8 or 16 (dilated later stages)
    init: str | None = None  # pretrain run folder, its model.safetensors, or a local timm weights file
    freeze: int | None = None  # freeze the stem/patch embedding and the first `freeze` blocks or stages
    # data (and the TrainingKeys' train_split, num_workers, ...)
    val_split: str | None = "val"  # never the reported split: import train/test data with --val-ratio, or null
    train_samples: int | None = None  # a deterministic subset of the training split (same seed, same subset)
    crop_size: int = 512
    val_max_size: int = 1024  # validation on whole images; larger ones in tiles of this size
    shuffle_buffer: int = 64
    # augmentation (defectforge/augment.py), image and mask alike; the other AugmentConfig defaults are kept
    color_jitter: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # loss
    loss: str = "ce_dice"
    dice_weight: float = 1.0
    class_weights: Any = None  # null | auto (from training-pixel frequencies) | [w_background, w_1, ...]
    # optimisation (defectforge/loop.py): the TrainingKeys, with these defaults
    batch_size: int = 8
    max_steps: int = 2000
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    # bookkeeping (and the TrainingKeys' log_every, checkpoint_every, resume, study, seed, wandb, ...)
    val_images: int = 4  # validation images shown as image / ground truth / prediction

    def validate(self) -> None:
        validate_training_keys(self)
        require(self.architecture in ARCHITECTURES, "architecture", self.architecture,
                f"one of {', '.join(ARCHITECTURES)}")
        require(self.output_stride in (8, 16), "output_stride", self.output_stride, "8 or 16")
        require(self.freeze is None or self.freeze >= 0, "freeze", self.freeze,
                "null or an integer >= 0 (0 = stem/patch embedding only)")
        require(self.train_samples is None or self.train_samples >= 1, "train_samples", self.train_samples,
                "null (all) or an integer >= 1")
        require(32 <= self.crop_size <= 4096, "crop_size", self.crop_size, "an integer between 32 and 4096")
        require(64 <= self.val_max_size <= 8192, "val_max_size", self.val_max_size, "an integer between 64 and 8192")
        require(self.loss in LOSSES, "loss", self.loss, f"one of {', '.join(LOSSES)}")
        require(self.dice_weight >= 0, "dice_weight", self.dice_weight, "a number >= 0")
        require(self.class_weights in (None, "auto") or (isinstance(self.class_weights, list) and all(
            isinstance(w, int | float) and w >= 0 for w in self.class_weights)), "class_weights", self.class_weights,
            "null, 'auto' or a list of numbers >= 0, background first")
        require(self.val_images >= 0, "val_images", self.val_images, "an integer >= 0")
