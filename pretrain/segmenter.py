"""Segmentation networks shared by pretraining (`objective: segmentation`) and fine-tuning: a timm encoder
(random, or its published weights with ``pretrained: true``) inside a segmentation-models-pytorch architecture,
its loss, and its keys.

- ViTs and ViT-hybrids: smp's DPT, which reads multi-level features through timm's ``forward_intermediates``
  (``dynamic_img_size=True``, so any input size works) and fuses them by progressive upsampling. Its default
  widths are scaled to the ViT's embedding size (a light decoder for ViT-Tiny/Small).
- CNNs: DeepLabV3+ (dilated later stages, ``output_stride`` 8 or 16) for ResNets, UPerNet for ConvNeXt and Swin,
  FPN for HRNet, or any smp architecture named by ``architecture`` (U-Net, ...), all on ``tu-`` timm encoders.

``Segmenter`` pads every input to a multiple of the model's stride and crops the logits back, so any
``H x W`` (100 x 70, a 4K tile at a border) gives ``(N, classes, H, W)``. smp's DPT reassembles the token grid by
factors of two, which a patch-14 ViT (DINOv2) does not fit: its decoder is built as for patch 16 on the same
grid (reassembled x4, x2, x1, x1/2) and the logits, 16/14 of the padded input, are resized to it. The same
network (encoder, decoder and head) is built by `python -m pretrain` on synthetic masks and by `python -m finetune`,
so that a segmentation pretraining run loads into fine-tuning whole (finetune/models.py `load_init`).

``pretrained: true`` builds the encoder with its published timm weights (pretrain/hub.py); the model config
records them (`weights`: repository, revision, licence) and the normalisation is theirs.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from timm.data import resolve_data_config
from torch import nn

from defectforge.config import ConfigError, require
from defectforge.data import IGNORE
from defectforge.reader import make_dataset

from .hub import HubWeights, fetch_pretrained, mismatch
from .models import (
    CONFIG_FILE,
    VIT_FAMILIES,
    WEIGHTS_FILE,
    family_of,
    load_run,
    load_weights,
    probe_model,
    resolve_model_name,
    save_model,
)

log = logging.getLogger(__name__)
ARCHITECTURES = ("auto", "DPT", "DeepLabV3Plus", "DeepLabV3", "Unet", "UnetPlusPlus", "FPN", "UPerNet", "PSPNet",
                 "PAN", "Linknet", "MAnet", "Segformer")
LOSSES = ("ce", "ce_dice", "focal", "focal_dice")


@dataclass
class SegmentationKeys:
    """The keys of a segmentation network and its loss, read by `python -m finetune` and by `python -m pretrain`
    with `objective: segmentation`."""

    architecture: str = "auto"  # DPT for ViTs/hybrids, UPerNet for Swin/ConvNeXt, FPN for HRNet, else DeepLabV3Plus
    decoder_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of the smp architecture
    output_stride: int = 16  # DeepLabV3(+) only: 8 or 16 (dilated later stages)
    loss: str = "ce_dice"
    dice_weight: float = 1.0
    class_weights: Any = None  # null | auto (from training-pixel frequencies) | [w_background, w_1, ...]


def validate_segmentation_keys(cfg: SegmentationKeys) -> None:
    require(cfg.architecture in ARCHITECTURES, "architecture", cfg.architecture, f"one of {', '.join(ARCHITECTURES)}")
    require(cfg.output_stride in (8, 16), "output_stride", cfg.output_stride, "8 or 16")
    require(cfg.loss in LOSSES, "loss", cfg.loss, f"one of {', '.join(LOSSES)}")
    require(cfg.dice_weight >= 0, "dice_weight", cfg.dice_weight, "a number >= 0")
    require(cfg.class_weights in (None, "auto") or (isinstance(cfg.class_weights, list) and all(
        isinstance(w, int | float) and w >= 0 for w in cfg.class_weights)), "class_weights", cfg.class_weights,
        "null, 'auto' or a list of numbers >= 0, background first")


class Segmenter(nn.Module):
    """An smp model plus padding to its stride; ``forward(x) -> (N, num_classes + 1, H, W)`` logits."""

    def __init__(self, net: nn.Module, stride: int):
        super().__init__()
        self.net = net
        self.stride = stride
        self.frozen_norms: list[nn.Module] = []

    @property
    def encoder(self) -> nn.Module:
        """The timm module inside smp's encoder (where init weights load and freezing applies)."""
        return self.net.encoder.model

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.net(x)
        out, labels = out if isinstance(out, tuple) else (out, None)  # with the auxiliary classification head
        if out.shape[-2:] != x.shape[-2:]:  # a patch-14 DPT: logits at 16/14 of the padded input
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out[..., :h, :w] if labels is None else (out[..., :h, :w], labels)

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        for module in self.frozen_norms:  # frozen BatchNorm keeps its running statistics too
            module.eval()
        return self


def default_architecture(resolved: str, probe: nn.Module | None) -> str:
    if probe is not None and family_of(probe) in VIT_FAMILIES:
        return "DPT"
    if "swin" in resolved or "convnext" in resolved:
        return "UPerNet"
    if "hrnet" in resolved:
        return "FPN"
    return "DeepLabV3Plus"


def accepts(probe: nn.Module | None, name: str) -> bool:
    import inspect

    return probe is not None and name in inspect.signature(type(probe).__init__).parameters


def build_segmenter(cfg: SegmentationKeys, classes: list[str], *, encoder_kwargs: dict | None = None,
                    aux_head: bool = False) -> tuple[Segmenter, dict]:
    """The model of `cfg` for `classes` (background first) and the config that `load_segmenter` rebuilds it from.

    `cfg` gives `model`, `crop_size`, `pretrained` and the SegmentationKeys; `encoder_kwargs` (default
    `cfg.encoder_kwargs`) go to timm. `aux_head=True` adds smp's classification head on the deepest features (one
    logit per defect class; the model then returns `(mask_logits, label_logits)`), the multi-label auxiliary of
    pretraining. With `pretrained: true` the encoder starts from the published weights of `model` (the config's
    `weights` records their repository and revision; mean/std are theirs).
    """
    resolved = resolve_model_name(cfg.model)
    hub = fetch_pretrained(resolved) if getattr(cfg, "pretrained", False) else None
    probe = probe_model(resolved)
    arch = cfg.architecture if cfg.architecture != "auto" else default_architecture(resolved, probe)
    enc_kw = dict(cfg.encoder_kwargs if encoder_kwargs is None else encoder_kwargs)
    for key, value in (("img_size", cfg.crop_size), ("dynamic_img_size", True), ("strict_img_size", False)):
        if accepts(probe, key):
            enc_kw.setdefault(key, value)
    arch_kw = dict(cfg.decoder_kwargs)
    if arch in ("DeepLabV3Plus", "DeepLabV3"):
        arch_kw.setdefault("encoder_output_stride", cfg.output_stride)
    if arch == "DPT" and probe is not None:
        # DPT-Base's widths (reassemble 96/192/384/768, fusion 256 on ViT-B's 768) scaled to the embedding:
        # ViT-Tiny gets 24/48/96/192 and 64. smp's defaults are DPT-Large's, 10 M decoder parameters on
        # ViT-Tiny's 5.7 M and four times the training cost (2.4 vs 0.58 s per step of 8 at 128 px, 1 thread)
        dim = int(getattr(probe, "embed_dim", 768))
        arch_kw.setdefault("decoder_intermediate_channels", [dim // 8, dim // 4, dim // 2, dim])
        arch_kw.setdefault("decoder_fusion_channels", min(256, dim // 3))
    mcfg = {"architecture": "smp", "smp_class": arch, "model": resolved, "alias": cfg.model,
            "encoder_kwargs": enc_kw, "decoder_kwargs": arch_kw, "num_classes": len(classes),
            "classes": list(classes), "crop_size": cfg.crop_size,
            "aux_classes": len(classes) - 1 if aux_head else 0}
    model = instantiate(mcfg, hub)
    freeze_unused(model)
    data_cfg = resolve_data_config({}, model=model.encoder)
    mcfg["mean"], mcfg["std"] = [float(v) for v in data_cfg["mean"]], [float(v) for v in data_cfg["std"]]
    if hub is not None:  # the normalisation the weights were trained with
        mcfg["mean"], mcfg["std"] = hub.record["mean"], hub.record["std"]
    mcfg["weights"] = hub.record if hub is not None else None
    mcfg["stride"] = model.stride
    return model, mcfg


def instantiate(mcfg: dict, hub: HubWeights | None = None) -> Segmenter:
    """The smp model of `mcfg` (random weights, or the encoder's published weights `hub`), padded to its stride."""
    cls = getattr(smp, mcfg["smp_class"], None)
    if cls is None:
        raise ValueError(f"segmentation-models-pytorch has no architecture {mcfg['smp_class']!r}")
    if "depth" in mcfg["encoder_kwargs"]:  # smp's encoders take `depth` as their number of feature stages
        raise ValueError(f"encoder_kwargs.depth={mcfg['encoder_kwargs']['depth']}: segmentation-models-pytorch "
                         "reserves `depth` for the number of feature levels, so a timm model's depth cannot be "
                         "changed here; choose a smaller timm model instead (e.g. vit_tiny)")
    kwargs = {**mcfg["decoder_kwargs"], **mcfg["encoder_kwargs"]}
    if "decoder_intermediate_channels" in kwargs:
        kwargs["decoder_intermediate_channels"] = tuple(kwargs["decoder_intermediate_channels"])
    if mcfg.get("aux_classes"):
        kwargs["aux_params"] = {"classes": mcfg["aux_classes"]}
    if hub is not None:  # smp passes the overlay on to timm.create_model, which loads the file
        kwargs["pretrained_cfg_overlay"] = hub.timm_kwargs()["pretrained_cfg_overlay"]
    try:
        net = cls(encoder_name="tu-" + mcfg["model"], encoder_weights=True if hub is not None else None,
                  classes=mcfg["num_classes"], **kwargs)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:
        if hub is not None and isinstance(err, RuntimeError):
            raise mismatch(hub, mcfg["model"], mcfg["encoder_kwargs"], err) from err
        raise ValueError(f"cannot build {mcfg['smp_class']} on {mcfg['model']} with {kwargs}: {err}") from err
    if mcfg["smp_class"] == "DPT":
        _fit_dpt_decoder(net, kwargs)
    encoder = net.encoder.model
    stride = 32
    pe = getattr(encoder, "patch_embed", None)
    if mcfg["smp_class"] == "DPT" and pe is not None and callable(getattr(pe, "feat_ratio", None)):
        # DPT reassembles the token grid at half its resolution and upsamples it back: the grid must be even
        ratio = pe.feat_ratio()
        stride = 2 * (max(ratio) if isinstance(ratio, tuple | list) else int(ratio))
    return Segmenter(net, int(stride))


def _fit_dpt_decoder(net: nn.Module, kwargs: dict) -> None:
    """A DPT on a patch stride that is no power of two (14): its decoder rebuilt as for stride 16 on the same
    token grid (smp derives each level's resampling from the stride: x3.5 and x1.75 would not meet in the fusion)."""
    import inspect

    from segmentation_models_pytorch.decoders.dpt.decoder import DPTDecoder

    enc = net.encoder
    if all(s & (s - 1) == 0 for s in enc.output_strides):
        return
    defaults = inspect.signature(smp.DPT.__init__).parameters
    net.decoder = DPTDecoder(
        encoder_out_channels=enc.out_channels, encoder_output_strides=[16] * len(enc.out_channels),
        encoder_has_prefix_tokens=enc.has_prefix_tokens,
        readout=kwargs.get("decoder_readout", defaults["decoder_readout"].default),
        intermediate_channels=kwargs.get("decoder_intermediate_channels",
                                         defaults["decoder_intermediate_channels"].default),
        fusion_channels=kwargs.get("decoder_fusion_channels", defaults["decoder_fusion_channels"].default))


def freeze_unused(model: Segmenter) -> list[str]:
    """Turn off gradients of parameters that never reach the output (a ViT's final norm and classifier when its
    intermediate blocks feed the decoder): DDP would wait forever for their gradients."""
    was_training = model.training
    model.eval()  # no dropout: the probe consumes no random numbers
    side = 2 * model.stride
    with torch.enable_grad():  # also when the caller builds the model under no_grad
        out = model(torch.zeros(1, 3, side, side))
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for name, p in model.named_parameters():
        p.grad = None
        if name in unused:
            p.requires_grad_(False)
    model.train(was_training)
    if unused:
        log.info("%d parameters do not reach the output and are not trained: %s", len(unused), unused[:6])
    return unused


def save_segmenter(model: Segmenter, run_dir: Path, mcfg: dict) -> None:
    save_model(model, run_dir, mcfg)


def load_segmenter(run_dir: str | Path) -> tuple[Segmenter, dict]:
    """Rebuild a segmentation run's model (finetune, or pretrain with objective segmentation) from
    RUN/model_config.json and load RUN/model.safetensors (eval mode)."""
    return load_run(run_dir, "smp", instantiate)


def auto_class_weights(shards: str, split: str, classes: list[str], keys: list[str] | None,
                       max_samples: int = 500) -> list[float]:
    """Cross-entropy weights from the training split's pixel frequencies: sqrt(f_background / f_class), in [1, 20].

    Only training data is read (the subset when there is one, at most `max_samples` images); a class without
    a pixel keeps weight 1.
    """
    counts = torch.zeros(len(classes), dtype=torch.float64)
    for i, sample in enumerate(make_dataset(shards, split, classes=classes, keys=keys)):
        if i >= max_samples:
            break
        counts += torch.bincount(sample["mask"].flatten(), minlength=len(classes)).double()
    weights = [1.0]
    for c in range(1, len(classes)):
        weights.append(float((counts[0] / counts[c]).sqrt().clamp(1.0, 20.0)) if counts[c] > 0 else 1.0)
    return weights


class SegLoss(torch.nn.Module):
    """Cross-entropy (optionally class-weighted) or focal, plus Dice over the classes when asked; mask pixels
    of value `IGNORE` (a co-training class with no target class) count in none of them."""

    def __init__(self, cfg: SegmentationKeys, num_values: int, weights: list[float] | None = None):
        super().__init__()
        weight = None
        if weights is not None:
            weight = torch.tensor(weights, dtype=torch.float32)
        elif isinstance(cfg.class_weights, list):
            if len(cfg.class_weights) != num_values:
                raise ConfigError(f"key 'class_weights': {len(cfg.class_weights)} weights given, the shards have "
                                  f"{num_values} classes (background first)")
            weight = torch.tensor(cfg.class_weights, dtype=torch.float32)
        self.register_buffer("weight", weight)
        self.focal = FocalLoss(mode="multiclass", ignore_index=IGNORE) if cfg.loss.startswith("focal") else None
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=IGNORE) \
            if cfg.loss.endswith("dice") else None
        self.dice_weight = cfg.dice_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """`target`: (N, H, W) class indices, or (N, C, H, W) class probabilities (a Mixup batch): the
        cross-entropy takes them as soft targets, focal and Dice their argmax."""
        logits = logits.float()
        hard = target.argmax(1) if target.is_floating_point() else target
        main = self.focal(logits, hard) if self.focal is not None else F.cross_entropy(logits, target,
                                                                                        weight=self.weight,
                                                                                        ignore_index=IGNORE)
        out = {"loss": main, "ce" if self.focal is None else "focal": main}
        if self.dice is not None:
            dice = self.dice(logits, hard)
            out["loss"] = main + self.dice_weight * dice
            out["dice"] = dice
        return out


# ------------------------------------------------------------------------------------ initial encoder weights

_FLAT = re.compile(r"^([A-Za-z_]*[A-Za-z])\.(\d+)\.")  # "stages.0.x" <-> "stages_0.x" (timm FeatureListNet)
_INIT_PREFIXES = ("backbone.", "net.encoder.model.")  # a PretrainNet checkpoint, a segmentation run
ENCODER_PREFIX = "net.encoder."


def init_file(init: str | Path, resolved: str) -> tuple[Path, dict | None]:
    """The weights file behind `init` (a run folder, its model.safetensors, or a bare timm weights file) and its
    run config (None for a bare file), checked against the model."""
    path = Path(init)
    folder = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"init {init}: no weights file {weights} (expected a pretrain run folder, its "
                                f"{WEIGHTS_FILE}, or a local timm weights file)")
    cfg_path = folder / CONFIG_FILE
    config = None
    if cfg_path.is_file() and weights.name == WEIGHTS_FILE:
        config = json.loads(cfg_path.read_text())
        saved = config.get("model")
        if saved is not None and saved != resolved:
            raise ValueError(f"init {init} holds a {saved} backbone but this run builds {resolved}: set model={saved} "
                             "or choose another init")
    return weights, config


def load_encoder(model: Segmenter, weights: Path, init: str | Path, resolved: str, *,
                 segmentation_run: bool = False) -> dict:
    """Load the encoder tensors of `weights` (a timm backbone, a pretrain run's, or a segmentation run's encoder
    part when `segmentation_run`) into `model.encoder`; fails when fewer than half of the encoder matched."""
    target = set(model.encoder.state_dict())

    def key_map(key: str) -> str:
        for prefix in _INIT_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        if key in target:
            return key
        flat = _FLAT.sub(r"\1_\2.", key, count=1)
        return flat if flat in target else key

    report = load_weights(model.encoder, weights, skip_head=True, key_map=key_map,
                          select=(lambda k: k.startswith(ENCODER_PREFIX)) if segmentation_run else None)
    if len(report["loaded"]) < len(target) // 2:
        raise ValueError(f"init {init}: only {len(report['loaded'])} of {len(target)} encoder tensors matched "
                         f"(unexpected keys start {report['unexpected'][:5]}): is it a {resolved} backbone?")
    return report
