"""Segmentation models: a timm encoder (``pretrained=False``) inside a segmentation-models-pytorch architecture.

- ViTs and ViT-hybrids: smp's DPT, which reads multi-level features through timm's ``forward_intermediates``
  (``dynamic_img_size=True``, so any input size works) and fuses them by progressive upsampling. Its default
  widths are scaled to the ViT's embedding size (a light decoder for ViT-Tiny/Small).
- CNNs: DeepLabV3+ (dilated later stages, ``output_stride`` 8 or 16) for ResNets, UPerNet for ConvNeXt and Swin,
  FPN for HRNet, or any smp architecture named by ``architecture`` (U-Net, ...), all on ``tu-`` timm encoders.

``Segmenter`` pads every input to a multiple of the model's stride and crops the logits back, so any
``H x W`` (100 x 70, a 4K tile at a border) gives ``(N, classes, H, W)``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from timm.data import resolve_data_config
from timm.models._manipulate import group_with_matcher
from torch import nn

from pretrain.models import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    family_of,
    load_run,
    load_weights,
    probe_model,
    resolve_model_name,
    save_model,
)

from .config import FinetuneConfig

log = logging.getLogger(__name__)
_FLAT = re.compile(r"^([A-Za-z_]*[A-Za-z])\.(\d+)\.")  # "stages.0.x" <-> "stages_0.x" (timm FeatureListNet)
_UNFLAT = re.compile(r"^([A-Za-z_]*[A-Za-z])_(\d+)\.")
_INIT_PREFIXES = ("backbone.", "net.encoder.model.")  # a PretrainNet checkpoint, a finetune run


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        return self.net(x)[..., :h, :w]

    def train(self, mode: bool = True) -> Segmenter:
        super().train(mode)
        for module in self.frozen_norms:  # frozen BatchNorm keeps its running statistics too
            module.eval()
        return self


def default_architecture(resolved: str, probe: nn.Module | None) -> str:
    if probe is not None and family_of(probe) in ("ViT", "ViT-Hybrid"):
        return "DPT"
    if "swin" in resolved or "convnext" in resolved:
        return "UPerNet"
    if "hrnet" in resolved:
        return "FPN"
    return "DeepLabV3Plus"


def _accepts(probe: nn.Module | None, name: str) -> bool:
    import inspect

    return probe is not None and name in inspect.signature(type(probe).__init__).parameters


def build_segmenter(cfg: FinetuneConfig, classes: list[str]) -> tuple[Segmenter, dict]:
    """The model of `cfg` for `classes` (background first) and the config that `load_segmenter` rebuilds it from."""
    resolved = resolve_model_name(cfg.model)
    probe = probe_model(resolved)
    arch = cfg.architecture if cfg.architecture != "auto" else default_architecture(resolved, probe)
    enc_kw = dict(cfg.encoder_kwargs)
    for key, value in (("img_size", cfg.crop_size), ("dynamic_img_size", True), ("strict_img_size", False)):
        if _accepts(probe, key):
            enc_kw.setdefault(key, value)
    arch_kw = dict(cfg.decoder_kwargs)
    if arch in ("DeepLabV3Plus", "DeepLabV3"):
        arch_kw.setdefault("encoder_output_stride", cfg.output_stride)
    if arch == "DPT" and probe is not None:
        dim = int(getattr(probe, "embed_dim", 768))
        arch_kw.setdefault("decoder_intermediate_channels", [min(c, m) for c, m in
                                                             zip((dim // 2, dim, 2 * dim, 2 * dim),
                                                                 (256, 512, 1024, 1024), strict=True)])
        arch_kw.setdefault("decoder_fusion_channels", min(256, dim))
    mcfg = {"architecture": "smp", "smp_class": arch, "model": resolved, "alias": cfg.model,
            "encoder_kwargs": enc_kw, "decoder_kwargs": arch_kw, "num_classes": len(classes),
            "classes": list(classes), "crop_size": cfg.crop_size}
    model = _instantiate(mcfg)
    _freeze_unused(model)
    data_cfg = resolve_data_config({}, model=model.encoder)
    mcfg["mean"], mcfg["std"] = [float(v) for v in data_cfg["mean"]], [float(v) for v in data_cfg["std"]]
    mcfg["stride"] = model.stride
    return model, mcfg


def _instantiate(mcfg: dict) -> Segmenter:
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
    try:
        net = cls(encoder_name="tu-" + mcfg["model"], encoder_weights=None, classes=mcfg["num_classes"], **kwargs)
    except (ValueError, TypeError, AssertionError, RuntimeError) as err:
        raise ValueError(f"cannot build {mcfg['smp_class']} on {mcfg['model']} with {kwargs}: {err}") from err
    encoder = net.encoder.model
    stride = 32
    pe = getattr(encoder, "patch_embed", None)
    if mcfg["smp_class"] == "DPT" and pe is not None and callable(getattr(pe, "feat_ratio", None)):
        # DPT reassembles the token grid at half its resolution and upsamples it back: the grid must be even
        ratio = pe.feat_ratio()
        stride = 2 * (max(ratio) if isinstance(ratio, tuple | list) else int(ratio))
    return Segmenter(net, int(stride))


def _freeze_unused(model: Segmenter) -> list[str]:
    """Turn off gradients of parameters that never reach the output (a ViT's final norm and classifier when its
    intermediate blocks feed the decoder): DDP would wait forever for their gradients."""
    was_training = model.training
    model.eval()  # no dropout: the probe consumes no random numbers
    side = 2 * model.stride
    with torch.enable_grad():  # also when the caller builds the model under no_grad
        model(torch.zeros(1, 3, side, side)).sum().backward()
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
    """Rebuild a finetune run's model from RUN/model_config.json and load RUN/model.safetensors (eval mode)."""
    return load_run(run_dir, "smp", _instantiate)


def _init_file(init: str | Path, resolved: str) -> Path:
    """The weights file behind `init`, checked against the model when its run config says what it holds."""
    path = Path(init)
    folder = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"init {init}: no weights file {weights} (expected a pretrain run folder, its "
                                f"{WEIGHTS_FILE}, or a local timm weights file)")
    cfg_path = folder / CONFIG_FILE
    if cfg_path.is_file() and weights.name == WEIGHTS_FILE:
        saved = json.loads(cfg_path.read_text()).get("model")
        if saved is not None and saved != resolved:
            raise ValueError(f"init {init} holds a {saved} backbone but this run builds {resolved}: set model={saved} "
                             "or choose another init")
    return weights


def load_init(model: Segmenter, init: str | Path, resolved: str) -> dict:
    """Load backbone weights into the encoder; returns the report of loaded/missing/unexpected/resampled keys.

    A shape mismatch (other than a ViT position embedding, which is interpolated) raises a ValueError.
    """
    weights = _init_file(init, resolved)
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

    report = load_weights(model.encoder, weights, skip_head=True, key_map=key_map)
    if len(report["loaded"]) < len(target) // 2:
        raise ValueError(f"init {init}: only {len(report['loaded'])} of {len(target)} encoder tensors matched "
                         f"(unexpected keys start {report['unexpected'][:5]}): is it a {resolved} backbone?")
    return {k: v for k, v in report.items()}


def freeze(model: Segmenter, k: int, resolved: str) -> list[str]:
    """Freeze the stem / patch embedding and the first `k` blocks or stages of the encoder; returns their names.

    Blocks and stages are timm's coarse parameter groups (``group_matcher(coarse=True)``): group 0 is the stem
    (patch embedding, class token, position embedding), then one group per ViT block or CNN stage.
    """
    probe = probe_model(resolved)
    if probe is None or not callable(getattr(probe, "group_matcher", None)):
        raise ValueError(f"freeze: {resolved} has no timm group_matcher, so its blocks cannot be named")
    named = [(_UNFLAT.sub(r"\1.\2.", name, count=1), (name, p)) for name, p in model.encoder.named_parameters()]
    groups = group_with_matcher(iter(named), probe.group_matcher(coarse=True), return_values=True)
    ordered = [groups[g] for g in sorted(groups)]
    if k >= len(ordered):
        raise ValueError(f"freeze={k}: the {resolved} encoder has a stem and {len(ordered) - 1} more parameter groups "
                         f"(blocks or stages); freeze at most {len(ordered) - 1}")
    frozen = [name for group in ordered[:k + 1] for name, _ in group]
    for group in ordered[:k + 1]:
        for _, param in group:
            param.requires_grad_(False)
    frozen_ids = {id(p) for group in ordered[:k + 1] for _, p in group}
    model.frozen_norms = [m for m in model.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                          and any(True for _ in m.parameters(recurse=False))
                          and all(id(p) in frozen_ids for p in m.parameters(recurse=False))]
    model.train(model.training)
    log.info("froze %d tensors of %s (stem + %d blocks/stages)", len(frozen), resolved, k)
    return frozen
