"""Fine-tuning's side of the segmentation networks (built by `pretrain.segmenter`): where the initial weights come
from, and which layers stay frozen.

`load_init` loads a classification pretraining run's backbone into the encoder, a segmentation run (pretrain
`objective: segmentation`, or an earlier fine-tuning) whole: encoder, decoder and the segmentation head's rows
of the classes that match by name or through `class_map`; a local timm weights file into the encoder.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from timm.models._manipulate import group_with_matcher
from torch import nn

from pretrain.hub import NONE, SYNTHETIC, file_record
from pretrain.models import probe_model, read_state_dict
from pretrain.segmenter import ENCODER_PREFIX as _ENCODER
from pretrain.segmenter import IGNORE, Segmenter, init_file, load_encoder

log = logging.getLogger(__name__)
_UNFLAT = re.compile(r"^([A-Za-z_]*[A-Za-z])_(\d+)\.")
_AUX = "net.classification_head."


def load_init(model: Segmenter, init: str | Path, mcfg: dict, class_map: dict | None = None) -> dict:
    """Load `init` into `model` (built from `mcfg`); returns what loaded and what did not, and why.

    The encoder always: a shape mismatch (other than a ViT position embedding, which is interpolated) raises a
    ValueError. From a segmentation run also the decoder (when its architecture and decoder arguments are the
    same) and the segmentation head (`transfer_head`). The report lists tensors under "loaded", "missing",
    "unexpected", "resampled", ..., and for a segmentation run "decoder_loaded", "reinitialised" (tensor ->
    reason) and "classes" (target class -> the pretraining classes its head row came from, or why none).
    """
    resolved = mcfg["model"]
    weights, saved = init_file(init, resolved)
    segmentation_run = saved is not None and saved.get("architecture") == "smp"
    report = load_encoder(model, weights, init, resolved, segmentation_run=segmentation_run)
    report = dict(report)
    if segmentation_run:
        report.update(transfer_head(model, read_state_dict(weights), saved, mcfg, class_map))
    return report


def init_pretraining(init: str | Path, resolved: str) -> tuple[dict | None, str]:
    """What `init` was pretrained on: the record of the published (or local) weights its chain started from, and
    its pretraining label ("ImageNet-21k + synthetic (this study)", "synthetic (this study)", "local file X")."""
    weights, saved = init_file(init, resolved)
    if saved is None:  # a bare timm weights file
        record = file_record(weights)
        return record, record["pretraining"]
    label = saved.get("pretraining")
    if label is None:  # a run saved before the pretraining was recorded: a pretrain run, or a fine-tuning
        pretrain_run = saved.get("architecture") == "timm" or saved.get("objective") == "segmentation"
        label = SYNTHETIC if pretrain_run or saved.get("init") else NONE
    return saved.get("weights"), label


def map_classes(target: list[str], source: list[str], class_map: dict | None) -> dict[str, list[str] | str]:
    """Target class -> the source classes its head row starts from, or the reason it is re-initialised.

    A class takes the source class of the same name unless `class_map` names others ({target: source or
    [sources]}); background always maps to background.
    """
    class_map = dict(class_map or {})
    for key, value in class_map.items():
        names = [value] if isinstance(value, str) else list(value)
        if key not in target:
            raise ValueError(f"key 'class_map': '{key}' is not a class of the fine-tuning data ({', '.join(target)})")
        missing = [n for n in names if n not in source]
        if missing or not names:
            raise ValueError(f"key 'class_map': {key} -> {missing or names} is not a class of the init's pretraining "
                             f"data ({', '.join(source)})")
        class_map[key] = names
    out: dict[str, list[str] | str] = {}
    for name in target:
        if name in class_map:
            out[name] = class_map[name]
        elif name in source:
            out[name] = [name]
        else:
            out[name] = f"re-initialised: no pretraining class named '{name}' (name one with class_map)"
    return out


def class_lut(target: list[str], source: list[str], class_map: dict | None) -> torch.Tensor:
    """Mask value in `source`'s classes -> mask value in `target`'s, by `map_classes`; a source class that no
    target class takes becomes `IGNORE` (its pixels train nothing rather than being called background)."""
    mapping = map_classes(target, source, class_map)
    lut = torch.full((256,), IGNORE, dtype=torch.uint8)
    for index, name in enumerate(target):
        if isinstance(mapping[name], list):
            for src in mapping[name]:
                lut[source.index(src)] = index
    return lut


def transfer_head(model: Segmenter, file_sd: dict[str, torch.Tensor], saved: dict, mcfg: dict,
                  class_map: dict | None) -> dict:
    """Decoder and segmentation head of a segmentation run into `model`; the encoder is loaded by `load_init`.

    The decoder loads when the run's smp architecture and decoder arguments equal this model's, else it stays
    re-initialised. The last convolution of the head has one output row per class: row i of the target starts
    as the mean of the rows of the source classes `map_classes` gives it (the row itself when it is one class).
    """
    model_sd = model.state_dict()
    reinit: dict[str, str] = {}
    classes = map_classes(mcfg["classes"], saved["classes"], class_map)
    same_arch = (saved.get("smp_class"), saved.get("decoder_kwargs")) == (mcfg["smp_class"], mcfg["decoder_kwargs"])
    if not same_arch:
        reason = (f"the init is a {saved.get('smp_class')} with {saved.get('decoder_kwargs')}, this run builds "
                  f"{mcfg['smp_class']} with {mcfg['decoder_kwargs']}")
        return {"decoder_loaded": [], "reinitialised": {"decoder and head": reason},
                "classes": {name: "re-initialised: the decoder differs" for name in mcfg["classes"]}}
    last = [name for name, m in model.net.segmentation_head.named_modules() if isinstance(m, nn.Conv2d)][-1]
    rows = {f"net.segmentation_head.{last}.{p}" for p in ("weight", "bias")}
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in file_sd.items():
        if not key.startswith("net.") or key.startswith((_ENCODER, _AUX)):
            continue
        if key in rows:
            new = model_sd[key].clone()
            for i, name in enumerate(mcfg["classes"]):
                if isinstance(classes[name], list):
                    new[i] = torch.stack([tensor[saved["classes"].index(s)] for s in classes[name]]).mean(0)
            to_load[key] = new
        elif key in model_sd and model_sd[key].shape == tensor.shape:
            to_load[key] = tensor
        else:
            reinit[key] = "not in this model" if key not in model_sd else \
                f"shape {tuple(tensor.shape)} in the init, {tuple(model_sd[key].shape)} here"
    model.load_state_dict(to_load, strict=False)
    log.info("loaded %d decoder and head tensors; head rows: %s", len(to_load), classes)
    return {"decoder_loaded": sorted(to_load), "reinitialised": reinit, "classes": classes}


def encoder_groups(model: Segmenter, resolved: str, key: str) -> list[list[tuple[str, nn.Parameter]]]:
    """The encoder's parameters in timm's coarse groups (``group_matcher(coarse=True)``), from the input up: group
    0 is the stem (patch embedding, class token, position embedding), then one group per ViT block or CNN stage.
    `key` names the config key that needs them in the error for a model without a group matcher."""
    probe = probe_model(resolved)
    if probe is None or not callable(getattr(probe, "group_matcher", None)):
        raise ValueError(f"{key}: {resolved} has no timm group_matcher, so its blocks cannot be named")
    named = [(_UNFLAT.sub(r"\1.\2.", name, count=1), (name, p)) for name, p in model.encoder.named_parameters()]
    groups = group_with_matcher(iter(named), probe.group_matcher(coarse=True), return_values=True)
    return [groups[g] for g in sorted(groups)]


def layer_decay_groups(model: Segmenter, resolved: str, lr: float, weight_decay: float,
                       decay: float) -> list[dict]:
    """AdamW groups with layer-wise rate decay (BEiT, MAE): the decoder and head at `lr`, the encoder's last
    block or stage that reaches the output at `lr * decay`, the one below at `lr * decay**2`, ... the stem at
    `lr * decay**n`; weight decay as everywhere (none on biases and 1-d parameters). Frozen and unused parameters
    are left out (unused top groups, such as a ViT's final norm under DPT, do not count as depth)."""
    ordered = encoder_groups(model, resolved, "layer_decay")
    while ordered and not any(p.requires_grad for _, p in ordered[-1]):  # e.g. a ViT's final norm, unused by DPT
        ordered.pop()
    scale = {id(p): decay ** (len(ordered) - i) for i, group in enumerate(ordered) for _, p in group}
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            no_decay = p.ndim <= 1 or name.endswith(".bias")
            buckets.setdefault((scale.get(id(p), 1.0), no_decay), []).append(p)
    return [{"params": params, "lr": lr * s, "weight_decay": 0.0 if no_decay else weight_decay}
            for (s, no_decay), params in sorted(buckets.items(), key=lambda kv: kv[0])]


def freeze(model: Segmenter, k: int, resolved: str) -> list[str]:
    """Freeze the stem / patch embedding and the first `k` blocks or stages of the encoder (`encoder_groups`);
    returns their names."""
    ordered = encoder_groups(model, resolved, "freeze")
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
