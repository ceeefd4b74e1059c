"""`PretrainConfig`: every key of `python -m pretrain`, validated before any work starts (docs/pretrain.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from defectforge.config import require, section
from defectforge.training import TrainingKeys, validate_training_keys

from .cutmix import MixConfig, refuse_mixup_on_padding
from .segmenter import SegmentationKeys, validate_segmentation_keys

OBJECTIVES = ("classification", "segmentation", "mae")


@dataclass
class PretrainConfig(TrainingKeys, MixConfig, SegmentationKeys):
    """Every key of `python -m pretrain` (docs/pretrain.md): the TrainingKeys, the mixing keys of MixConfig
    (cutmix_alpha, cutmix_prob, mixup_alpha, switch_prob, label_mode; pretrain/cutmix.py), the
    SegmentationKeys (architecture, decoder_kwargs, output_stride, loss, dice_weight, class_weights;
    pretrain/segmenter.py) read with `objective: segmentation`, and these."""

    RENAMED: ClassVar[dict[str, str]] = {"img_size": "crop_size"}

    name: str = "pretrain"
    # segmentation: the network finetune builds (encoder + decoder + head, pretrain/segmenter.py) on the masks,
    # loaded whole by finetune; classification: the timm backbone's multi-label head (+ the dense head);
    # mae: masked-image modelling of ViTs/hybrids without labels (pretrain/mae.py), the encoder is kept
    objective: str = "classification"  # classification | segmentation | mae
    # model (pretrain/models.py): any timm name (arch.tag picks published weights and their mean/std) or alias
    model: str = "vit_tiny"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    global_pool: str | None = None  # null = the model's default; ViTs: token (CLS) | avg (GAP) | ...
    # start from the published weights of `model`, taken from the Hugging Face Hub cache (downloaded into it unless
    # HF_HUB_OFFLINE=1; pretrain/hub.py); the default false starts from random weights or from `weights`
    pretrained: bool = False  # the model's published timm weights via the Hub cache (HF_HOME, HF_HUB_OFFLINE)
    weights: str | None = None  # local weights file or run folder to start from (segmentation: the encoder only)
    drop_path_rate: float = 0.0
    dense_head: bool = True  # also predict the mask (the generator's pixel labels come for free)
    dense_weight: float = 1.0  # weight of the dense cross-entropy against the multi-label BCE
    aux_weight: float = 0.2  # segmentation: weight of the multi-label BCE of an auxiliary head (0 = no head)
    mae_mask_ratio: float = 0.75  # mae: share of patch tokens hidden from the encoder and reconstructed
    mae_decoder_dim: int = 128  # mae: width of the reconstruction decoder (discarded after pretraining)
    mae_decoder_depth: int = 2  # mae: transformer blocks of the decoder
    # optimisation beyond the TrainingKeys (batch_size, lr, max_steps, ...)
    layer_decay: float | None = None  # e.g. 0.75: lr scaled by decay**(depth from the top) per block
    # mixing, augmentation on the device, data and bookkeeping: the MixConfig and TrainingKeys fields

    def validate(self) -> None:
        validate_training_keys(self)
        require(self.crop_size >= 32, "crop_size", self.crop_size, "an integer between 32 and 4096")
        require(self.layer_decay is None or 0 < self.layer_decay <= 1, "layer_decay", self.layer_decay,
                "null or a number in (0, 1]")
        require(0 <= self.drop_path_rate < 1, "drop_path_rate", self.drop_path_rate, "a number in [0, 1)")
        require(self.dense_weight >= 0, "dense_weight", self.dense_weight, "a number >= 0")
        require(self.objective in OBJECTIVES, "objective", self.objective, f"one of {', '.join(OBJECTIVES)}")
        require(self.aux_weight >= 0, "aux_weight", self.aux_weight, "a number >= 0")
        require(not (self.pretrained and self.weights), "weights", self.weights,
                "null with pretrained=true (both name the initial weights: a local file, or the published ones)")
        validate_segmentation_keys(self)
        if self.objective == "segmentation":
            require(self.layer_decay is None, "layer_decay", self.layer_decay, "null with objective segmentation")
        require(0 < self.mae_mask_ratio < 1, "mae_mask_ratio", self.mae_mask_ratio, "a number in (0, 1)")
        require(self.mae_decoder_dim >= 8 and self.mae_decoder_dim % 4 == 0, "mae_decoder_dim", self.mae_decoder_dim,
                "an integer >= 8, a multiple of 4 (four attention heads, sin-cos positions)")
        require(self.mae_decoder_depth >= 1, "mae_decoder_depth", self.mae_decoder_depth, "an integer >= 1")
        if self.objective == "mae":
            require(self.layer_decay is None, "layer_decay", self.layer_decay, "null with objective mae")
        self.mix.validate()
        refuse_mixup_on_padding(self)

    @property
    def mix(self) -> MixConfig:
        return section(self, MixConfig)
