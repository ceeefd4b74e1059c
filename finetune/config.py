"""`FinetuneConfig`: every key of `python -m finetune`, validated before any work starts (docs/finetune.md)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from defectforge.config import require, section
from defectforge.training import TrainingKeys, validate_training_keys
from pretrain.cutmix import MixConfig, refuse_mixup_on_padding
from pretrain.segmenter import SegmentationKeys, validate_segmentation_keys


@dataclass
class FinetuneConfig(TrainingKeys, MixConfig, SegmentationKeys):
    name: str = "finetune"
    # model (finetune/models.py): a timm encoder inside a segmentation-models-pytorch architecture
    model: str = "vit_tiny"  # timm name (arch.tag picks published weights and their mean/std) or alias
    # the encoder starts from the published weights of `model`, taken from the Hugging Face Hub cache (downloaded
    # into it unless HF_HUB_OFFLINE=1; pretrain/hub.py); the default false starts from random weights or `init`
    pretrained: bool = False  # the model's published timm weights via the Hub cache (HF_HOME, HF_HUB_OFFLINE)
    # architecture, decoder_kwargs, output_stride and the loss keys: SegmentationKeys (pretrain/segmenter.py)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments
    init: str | None = None  # pretrain run folder, its model.safetensors, or a local timm weights file
    class_map: dict[str, Any] | None = None  # {target class: source class(es)}: init head rows, synthetic_shards
    freeze: int | None = None  # freeze the stem/patch embedding and the first `freeze` blocks or stages
    # e.g. 0.75: the encoder's rate scaled by layer_decay**(blocks or stages from the top); decoder and head at lr
    layer_decay: float | None = None
    # data (and the TrainingKeys' train_split, num_workers, ...)
    val_split: str | None = "val"  # never the reported split: import train/test data with --val-ratio, or null
    train_samples: int | None = None  # a deterministic subset of the training split (same seed, same subset)
    synthetic_shards: str | None = None  # co-training: shards mixed into every batch (their classes by class_map)
    synthetic_ratio: float = 0.25  # share of each batch from synthetic_shards
    crop_size: int = 512
    # half the crops on a defect (nnU-Net samples a third around foreground); measured in docs/finetune.md
    defect_crop: float = 0.5
    # an image smaller than crop_size is padded (mask ignored), not resized up: trained at the scale it is evaluated
    # at (measured on a rare multi-class set of 100-600 px images, docs/finetune.md, Data)
    small_images: str = "pad"
    val_max_size: int = 1024  # validation on whole images; larger ones in tiles of this size
    val_overlap: float = 0.1  # those tiles overlap by this share and are blended (Gaussian), as `evaluate run` tiles
    shuffle_buffer: int = 64
    # augmentation (defectforge/augment.py), image and mask alike; the other AugmentConfig defaults are kept
    color_jitter: float = 0.5
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # CutMix with the masks mixed, as in pretraining (pretrain/cutmix.py: cutmix_alpha, mixup_alpha, switch_prob)
    cutmix_prob: float = 0.0  # share of training batches mixed, masks pasted with the images; 0 = off
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
        validate_segmentation_keys(self)
        require(self.class_map is None or (isinstance(self.class_map, dict) and all(
            isinstance(v, str) or (isinstance(v, list) and v and all(isinstance(x, str) for x in v))
            for v in self.class_map.values())), "class_map", self.class_map,
            "null or a mapping {target class: pretraining class or [classes]}")
        require(not (self.pretrained and self.init), "init", self.init,
                "null with pretrained=true (the init's weights would replace the published ones; for published then "
                "synthetic pretraining, set pretrained=true on the pretrain run and init it here)")
        require(self.class_map is None or self.init is not None or self.synthetic_shards is not None, "class_map",
                self.class_map, "null without an init or synthetic_shards (it maps their classes)")
        require(isinstance(self.synthetic_ratio, int | float) and 0 < self.synthetic_ratio < 1, "synthetic_ratio",
                self.synthetic_ratio, "a number in (0, 1)")
        require(self.synthetic_shards is None or 1 <= round(self.synthetic_ratio * self.batch_size) < self.batch_size,
                "synthetic_ratio", self.synthetic_ratio,
                f"a share that leaves at least one synthetic and one target sample in a batch of {self.batch_size}")
        require(self.layer_decay is None or (isinstance(self.layer_decay, int | float) and 0 < self.layer_decay <= 1),
                "layer_decay", self.layer_decay, "null or a number in (0, 1]")
        require(self.freeze is None or self.freeze >= 0, "freeze", self.freeze,
                "null or an integer >= 0 (0 = stem/patch embedding only)")
        require(self.train_samples is None or self.train_samples >= 1, "train_samples", self.train_samples,
                "null (all) or an integer >= 1")
        require(32 <= self.crop_size <= 4096, "crop_size", self.crop_size, "an integer between 32 and 4096")
        require(64 <= self.val_max_size <= 8192, "val_max_size", self.val_max_size, "an integer between 64 and 8192")
        require(isinstance(self.val_overlap, int | float) and 0 <= self.val_overlap < 0.9, "val_overlap",
                self.val_overlap, "a fraction in [0, 0.9), as evaluate's overlap")
        require(self.val_images >= 0, "val_images", self.val_images, "an integer >= 0")
        self.mix.validate()
        require(not (self.synthetic_shards and self.mix.enabled and self.mixup_alpha > 0), "mixup_alpha",
                self.mixup_alpha, "0 with synthetic_shards (co-training masks may hold ignored pixels, which Mixup "
                "cannot blend; CutMix can)")
        refuse_mixup_on_padding(self)

    @property
    def mix(self) -> MixConfig:
        # no label head here: the labels a mix also returns are dropped, so they are always the area-weighted ones
        # (label_mode: mask would check the mixed masks against the label columns, co-training's ignored pixels too)
        return replace(section(self, MixConfig), label_mode="area")
