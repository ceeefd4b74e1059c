"""Backbone factory (timm), weights I/O and the pretraining network.

Models start from random weights unless the user asks for others: a local file (``load_weights``) or, with
``pretrained: true``, the model's published timm weights through the Hugging Face Hub cache (pretrain/hub.py).
 Runs are saved as ``model.safetensors`` + ``model_config.json`` so that ``load_model``
can rebuild the exact architecture without the training config.

Notes on families (timm 1.0.x):

- ViT / ViT-hybrid: ``img_size`` sets the position-embedding grid; ``dynamic_img_size=True`` is passed so
  other input sizes interpolate it. Inputs must be multiples of the patch stride (16 for ``*_patch16_*``,
  32 for the ``r26_s32`` hybrid), which ``create_backbone`` checks for ``img_size``.
- Swin: timm clamps each stage's window to that stage's feature size, so any ``img_size`` that is a multiple
  of the patch size (4) builds; multiples of 32 avoid padding in the patch-merging layers. The relative
  position tables depend on the clamped windows, so weights only load into a model built with a compatible
  ``img_size`` (``load_model`` rebuilds with the saved one).
- HRNet: ``forward_features`` returns the classification features (2048 channels at stride 32, the
  branches already fused), not the stride-4 high-resolution branch.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from defectforge.files import write_atomic

from .hub import HubWeights, mismatch

logger = logging.getLogger(__name__)

# Only names that are not timm models themselves, so an alias never hides a real architecture
# (e.g. "hrnet_w18" is a timm model distinct from "hrnet_w18_small", so it is not an alias).
ALIASES: dict[str, str] = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_hybrid_small": "vit_small_r26_s32_224",
    "swin_tiny": "swin_tiny_patch4_window7_224",
}

TOKEN_POOLS = ("token", "avg", "max", "avgmax", "map")
SPATIAL_POOLS = ("avg", "max", "avgmax")
_NEST_KEYS = ("state_dict", "model", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"


def resolve_model_name(name: str) -> str:
    """Alias or timm model name (optionally with a pretrained tag) -> timm name; unknown -> ValueError."""
    key = name.strip()
    if key in ALIASES:
        return ALIASES[key]
    known = timm.list_models()
    if key in known:
        return key
    # "arch.tag" names select a pretrained_cfg (mean/std) and, with pretrained: true, the weights loaded.
    if "." in key and key.split(".", 1)[0] in known and key in timm.list_pretrained(key):
        return key
    close = difflib.get_close_matches(key, known + list(ALIASES), n=5, cutoff=0.0)
    raise ValueError(f"unknown model {name!r}; closest names: {', '.join(close)}")


def probe_model(resolved: str) -> nn.Module | None:
    """Build the default architecture on the meta device (no memory, ~0.1 s) to inspect its class."""
    try:
        with torch.device("meta"):
            return timm.create_model(resolved, pretrained=False)
    except Exception as err:  # noqa: BLE001 - a model that cannot be built on meta only loses the pre-checks
        logger.debug("meta probe of %s failed (%s); skipping pre-checks", resolved, err)
        return None


def _init_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(type(model).__init__).parameters)


def _is_token_model(model: nn.Module) -> bool:
    return hasattr(model, "num_prefix_tokens")


FAMILIES = ("ViT", "ViT-Hybrid", "Swin", "CNN")
VIT_FAMILIES = FAMILIES[:2]  # a global token grid: attention maps, absolute position embeddings


def family_of(model: nn.Module) -> str:
    """The family of a built timm model (or a segmentation model's timm encoder): ViT, ViT-Hybrid, Swin or CNN.

    Decided by structure: a model with prefix tokens is a ViT, a hybrid when its patch embedding runs a
    convolutional backbone; a timm Swin (its module) is Swin; everything else is a CNN.
    """
    if _is_token_model(model):
        return "ViT-Hybrid" if hasattr(getattr(model, "patch_embed", None), "backbone") else "ViT"
    return "Swin" if "swin" in type(model).__module__ else "CNN"


@functools.cache
def model_family(name: str) -> str:
    """The family (`family_of`) of a timm name or alias, from a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = timm.create_model(resolve_model_name(name).split(".")[0], pretrained=False)
    return family_of(model)


def _check_img_size(model: nn.Module, resolved: str, img_size: int | tuple[int, int]) -> None:
    pe = getattr(model, "patch_embed", None)
    if pe is None:
        return
    info = getattr(getattr(pe, "backbone", None), "feature_info", None)
    # HybridEmbed.feat_ratio() divides img_size by the (rounded) grid, so a hybrid's stride comes from its stem
    if isinstance(info, list) and info:
        ratio = tuple(info[-1]["reduction"] * p for p in pe.patch_size)
    else:
        ratio = pe.feat_ratio() if callable(getattr(pe, "feat_ratio", None)) else pe.patch_size
    ratio_hw = (ratio, ratio) if isinstance(ratio, int) else tuple(ratio)
    size_hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if any(s % r for s, r in zip(size_hw, ratio_hw, strict=True)):
        raise ValueError(
            f"img_size {img_size} does not suit {resolved}: each side must be a multiple of its patch stride "
            f"{ratio_hw} (e.g. {tuple(max(r, s // r * r) for s, r in zip(size_hw, ratio_hw, strict=True))})"
        )
    layers = getattr(model, "layers", None)
    if getattr(model, "output_fmt", None) == "NHWC" and layers is not None:
        total = ratio_hw[0] * 2 ** (len(layers) - 1)
        if any(s % total for s in size_hw):
            logger.warning("img_size %s is not a multiple of %d: %s pads its patch-merging layers", img_size, total,
                           resolved)


def _build(name: str, *, num_classes: int, img_size: int | tuple[int, int] | None, global_pool: str | None,
           drop_path_rate: float, kwargs: dict[str, Any], hub: HubWeights | None = None) -> nn.Module:
    resolved = resolve_model_name(name)
    if num_classes < 0:  # 0: no classifier (timm's identity head), as objective mae builds it
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    probe = probe_model(resolved)
    accepted = _init_params(probe) if probe is not None else set()
    kw: dict[str, Any] = dict(kwargs)
    if "dynamic_img_size" in accepted:
        kw.setdefault("dynamic_img_size", True)
    if img_size is not None:
        if probe is None or "img_size" in accepted:
            kw["img_size"] = tuple(img_size) if isinstance(img_size, list) else img_size
        else:
            logger.info("%s is fully convolutional: img_size=%s is recorded but not passed to it", resolved, img_size)
    if global_pool is not None:
        if probe is not None:
            allowed = TOKEN_POOLS if _is_token_model(probe) else SPATIAL_POOLS
            if global_pool not in allowed:
                family = "ViT-like (token)" if _is_token_model(probe) else "convolutional/Swin (spatial)"
                raise ValueError(f"global_pool={global_pool!r} is invalid for {resolved}, a {family} model; "
                                 f"accepted: {', '.join(allowed)}")
        kw["global_pool"] = global_pool
    if drop_path_rate:
        if probe is not None and "drop_path_rate" not in accepted:
            raise ValueError(f"{resolved} ({type(probe).__name__}) does not support drop_path_rate")
        kw["drop_path_rate"] = drop_path_rate
    try:
        model = timm.create_model(resolved, num_classes=num_classes, **kw,
                                  **(hub.timm_kwargs() if hub is not None else {"pretrained": False}))
    except RuntimeError as err:  # timm's strict load: the published tensors do not fit the model built
        if hub is None:
            raise
        raise mismatch(hub, resolved, kw, err) from err
    except (AssertionError, TypeError) as err:
        raise ValueError(f"cannot build {resolved} with {kw}: {err}") from err
    if img_size is not None and "img_size" in kw:
        _check_img_size(model, resolved, kw["img_size"])
    return model


def create_backbone(name: str, *, num_classes: int, img_size: int | tuple[int, int] | None = None,
                    global_pool: str | None = None, weights: str | Path | None = None, drop_path_rate: float = 0.0,
                    skip_head: bool = False, hub: HubWeights | None = None, **kwargs: Any) -> nn.Module:
    """Build a timm model and optionally load a local weights file, or its published weights `hub`, into it.

    ``img_size`` reaches only models whose class takes it (ViT, hybrids, Swin), which also get
    ``dynamic_img_size=True``. ``skip_head`` is passed on to ``load_weights``. ``hub`` (from
    ``pretrain.hub.fetch_pretrained``) is loaded by timm itself; its classifier is dropped when the class count
    differs, and a position embedding is resampled to ``img_size``.
    """
    if weights is not None and hub is not None:
        raise ValueError("weights=FILE and pretrained=true both name the initial weights: set one of them")
    model = _build(name, num_classes=num_classes, img_size=img_size, global_pool=global_pool,
                   drop_path_rate=drop_path_rate, kwargs=kwargs, hub=hub)
    if weights is not None:
        load_weights(model, weights, skip_head=skip_head)
    elif hub is None:
        logger.info("%s starts from random initialisation (no weights file given, pretrained=false)",
                    resolve_model_name(name))
    return model


# ----------------------------------------------------------------------------------------------- weights


def read_state_dict(path: Path) -> dict[str, Tensor]:
    with path.open("rb") as fh:
        head = fh.read(9)
    # safetensors starts with a little-endian u64 header length followed by the JSON header.
    if len(head) == 9 and head[8:9] == b"{":
        try:
            return safetensors.torch.load_file(str(path), device="cpu")
        except Exception as err:
            raise ValueError(f"{path} looks like safetensors but cannot be read: {err}") from err
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is neither a safetensors file nor a torch checkpoint loadable with "
                         f"weights_only=True: {err}") from err
    for _ in range(len(_NEST_KEYS)):
        if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
            break
        nested = next((obj[k] for k in _NEST_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj = nested
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{path} holds no state dict (tensors by name, bare or under {'/'.join(_NEST_KEYS)}); "
                         f"found {keys}")
    return dict(obj)


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """State-dict prefixes of the class-dependent output layers (skipped by ``load_weights(skip_head=True)``)."""
    if callable(getattr(model, "head_prefixes", None)):
        return tuple(model.head_prefixes())
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ("head", "fc", "classifier")
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _is_head_key(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _resample_pos_embed(model: nn.Module, tensor: Tensor, target: Tensor) -> Tensor | None:
    """A ViT position embedding trained at another image size, interpolated to the model's patch grid."""
    pe = getattr(model, "patch_embed", None)
    grid = getattr(pe, "grid_size", None)
    if grid is None or tensor.ndim != 3 or target.ndim != 3 or tensor.shape[-1] != target.shape[-1]:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    if target.shape[1] != prefix + grid[0] * grid[1] or round((tensor.shape[1] - prefix) ** 0.5) ** 2 != \
            tensor.shape[1] - prefix:
        return None
    return resample_abs_pos_embed(tensor, new_size=list(grid), num_prefix_tokens=prefix)


def load_weights(model: nn.Module, path: str | Path, *, strict_shapes: bool = True, skip_head: bool = False,
                 key_map: Callable[[str], str] | None = None, select: Callable[[str], bool] | None = None) -> dict:
    """Load a local safetensors / torch weights file into ``model``; returns what was loaded and what was not.

    ``skip_head=True`` leaves every classifier-head tensor at its initialisation (whatever its shape), so a
    backbone trained on K classes loads into a K'-class model. A ViT position embedding trained at another
    image size is interpolated to the model's grid (listed under ``"resampled"``). With ``strict_shapes=False``
    other tensors of the wrong shape are skipped and listed under ``"mismatched"`` instead of raising.
    ``key_map`` renames each file key (after ``module.``/``_orig_mod.`` are stripped) to the model's naming;
    ``select`` keeps only the file keys (before renaming) it is true for (the rest is not this model's part).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    file_sd = {_strip(k): v for k, v in read_state_dict(path).items()}
    if select is not None:
        file_sd = {k: v for k, v in file_sd.items() if select(k)}
    if key_map is not None:
        file_sd = {key_map(k): v for k, v in file_sd.items()}
    model_sd = model.state_dict()
    prefixes = head_prefixes(model)
    to_load: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "missing": [], "unexpected": [], "skipped_head": [],
                                    "mismatched": [], "resampled": []}
    for key, tensor in file_sd.items():
        if key not in model_sd:
            report["unexpected"].append(key)
        elif skip_head and _is_head_key(key, prefixes):
            report["skipped_head"].append(key)
        elif tensor.shape != model_sd[key].shape and key.endswith("pos_embed") and \
                (resampled := _resample_pos_embed(model, tensor, model_sd[key])) is not None:
            to_load[key] = resampled
            report["resampled"].append(key)
        elif tensor.shape != model_sd[key].shape:
            if strict_shapes:
                raise ValueError(f"shape mismatch for {key!r} in {path}: file {tuple(tensor.shape)}, model "
                                 f"{tuple(model_sd[key].shape)}" + ("" if skip_head or not _is_head_key(key, prefixes)
                                                                    else " (a head tensor: use skip_head=True)"))
            report["mismatched"].append(key)
        else:
            to_load[key] = tensor
    if not to_load:
        raise ValueError(f"no tensor in {path} matches the model: file keys start {list(file_sd)[:5]}, "
                         f"model keys start {list(model_sd)[:5]}")
    model.load_state_dict(to_load, strict=False)
    report["loaded"] = list(to_load)
    skipped = set(report["skipped_head"]) | set(report["mismatched"])
    report["missing"] = [k for k in model_sd if k not in to_load and k not in skipped]
    logger.info("loaded %d tensors from %s (%d missing, %d unexpected, %d head skipped, %d mismatched)",
                len(to_load), path, len(report["missing"]), len(report["unexpected"]), len(report["skipped_head"]),
                len(report["mismatched"]))
    for kind in ("missing", "unexpected", "mismatched"):
        if report[kind]:
            logger.warning("%s keys (%d), first: %s", kind, len(report[kind]), report[kind][:5])
    return report


def model_config(model_name: str, *, num_classes: int, classes: list[str], img_size: int | tuple[int, int] | None,
                 global_pool: str | None, kwargs: dict, mean: Any, std: Any) -> dict:
    """Everything ``load_model`` needs to rebuild the architecture (JSON-serialisable)."""
    from defectforge import __version__

    try:
        json.dumps(kwargs)
    except TypeError as err:
        raise ValueError(f"model kwargs must be JSON-serialisable to be saved: {err}") from err
    return {
        "architecture": "timm",
        "model": resolve_model_name(model_name),
        "alias": model_name,
        "num_classes": int(num_classes),
        "classes": list(classes),
        "img_size": list(img_size) if isinstance(img_size, tuple | list) else img_size,
        "global_pool": global_pool,
        "kwargs": dict(kwargs),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "version": __version__,
    }


def save_model(model: nn.Module, run_dir: str | Path, model_config: dict) -> None:
    """Write RUN/model.safetensors and RUN/model_config.json, each via a temporary name.

    A ``PretrainNet`` is recorded as such (with its dense head) so ``load_model`` rebuilds the wrapper;
    saving ``net.backbone`` gives a plain timm state dict that finetune loads into a fresh timm model.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = dict(model_config)
    if isinstance(model, PretrainNet):
        config["module"] = {"type": "PretrainNet", "dense_head": model.dense is not None,
                            "dense_hidden": model.dense_hidden}
    else:
        config.pop("module", None)
    tmp = run_dir / (WEIGHTS_FILE + ".tmp")
    safetensors.torch.save_model(model, str(tmp), metadata={"format": "pt"}, force_contiguous=True)
    os.replace(tmp, run_dir / WEIGHTS_FILE)  # same folder, so atomic: never a half file under the final name
    write_atomic(run_dir / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("saved %s to %s", config.get("model"), run_dir)


def load_run(run_dir: str | Path, architecture: str, build: Callable[[dict], nn.Module]) -> tuple[nn.Module, dict]:
    """Read RUN/model_config.json, check its `architecture`, build the model with `build(config)` and load
    RUN/model.safetensors strictly; returns the model in eval mode and the config."""
    run_dir = Path(run_dir)
    cfg_path, weights_path = run_dir / CONFIG_FILE, run_dir / WEIGHTS_FILE
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: is {run_dir} a saved run?")
    config = json.loads(cfg_path.read_text())
    if config.get("architecture") != architecture:
        raise ValueError(f"{cfg_path}: architecture {config.get('architecture')!r} is not supported here "
                         f"(expected {architecture!r})")
    model = build(config)
    try:
        safetensors.torch.load_model(model, str(weights_path), strict=True, device="cpu")
    except RuntimeError as err:
        raise ValueError(f"{weights_path} does not match the model described by {cfg_path}: {err}") from err
    return model.eval(), config


def _rebuild(config: dict) -> nn.Module:
    img_size = config.get("img_size")
    model: nn.Module = _build(config["model"], num_classes=config["num_classes"],
                              img_size=tuple(img_size) if isinstance(img_size, list) else img_size,
                              global_pool=config.get("global_pool"), drop_path_rate=0.0,
                              kwargs=config.get("kwargs") or {})
    module = config.get("module") or {}
    if module.get("type") == "PretrainNet":
        model = PretrainNet(model, config["num_classes"], dense_head=module["dense_head"],
                            dense_hidden=module["dense_hidden"])
    return model


def load_model(run_dir: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a pretrain run's model from RUN/model_config.json and load RUN/model.safetensors (eval mode)."""
    return load_run(run_dir, "timm", _rebuild)


# ------------------------------------------------------------------------------------------- network


def _token_grid(model: nn.Module, n_tokens: int, input_hw: tuple[int, int] | None) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    grid: tuple[int, int] | None = None
    if pe is not None and input_hw is not None and callable(getattr(pe, "dynamic_feat_size", None)):
        grid = tuple(pe.dynamic_feat_size(tuple(input_hw)))
    elif pe is not None and getattr(pe, "grid_size", None) is not None:
        grid = tuple(pe.grid_size)
    else:
        side = round(n_tokens**0.5)
        grid = (side, side)
    if grid[0] * grid[1] != n_tokens:
        raise ValueError(f"{n_tokens} patch tokens do not fill a {grid[0]}x{grid[1]} grid: pass the input size "
                         f"(input_hw) for inputs other than the model's img_size")
    return grid


def features_to_map(model: nn.Module, feats: Tensor, input_hw: tuple[int, int] | None = None) -> Tensor:
    """timm ``forward_features`` output -> NCHW map.

    (B, N, C) tokens (ViTs, hybrids): the ``num_prefix_tokens`` class/register tokens are dropped and the rest
    reshaped to the patch grid of ``input_hw`` (needed for inputs other than ``img_size``). 4-D outputs are
    NHWC when the model says so (``output_fmt``, Swin) or, for models that do not, when only the last dim
    equals ``num_features``; otherwise NCHW (CNNs, HRNet), returned unchanged.
    """
    if feats.ndim == 3:
        tokens = feats[:, int(getattr(model, "num_prefix_tokens", 0)):]
        gh, gw = _token_grid(model, tokens.shape[1], input_hw)
        return tokens.transpose(1, 2).reshape(feats.shape[0], feats.shape[2], gh, gw)
    if feats.ndim != 4:
        raise ValueError(f"cannot turn features of shape {tuple(feats.shape)} into a feature map")
    fmt = getattr(model, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt)) if fmt is not None else None
    if fmt == "NHWC":
        return feats.permute(0, 3, 1, 2)
    if fmt is None:
        nf = getattr(model, "num_features", None)
        if nf is not None and feats.shape[-1] == nf and feats.shape[1] != nf:
            return feats.permute(0, 3, 1, 2)
    return feats


class PretrainNet(nn.Module):
    """timm backbone + its multi-label classification head, plus an optional dense (mask) head.

    forward(x) -> {"logits": (B, K)} and, with ``dense_head=True``, "dense": (B, K+1, H, W) (class 0 is
    background), bilinearly upsampled from the backbone's last feature map to the input size.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, dense_head: bool = False, dense_hidden: int = 256):
        super().__init__()
        if getattr(backbone, "num_classes", num_classes) != num_classes:
            raise ValueError(f"backbone has {backbone.num_classes} classes, PretrainNet was given {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.dense_hidden = dense_hidden
        self.dense: nn.Sequential | None = None
        if dense_head:
            channels = int(backbone.num_features)
            self.dense = nn.Sequential(
                nn.Conv2d(channels, dense_hidden, 1, bias=False),
                nn.BatchNorm2d(dense_hidden),
                nn.GELU(),
                nn.Conv2d(dense_hidden, num_classes + 1, 1),
            )

    def head_prefixes(self) -> tuple[str, ...]:
        heads = tuple(f"backbone.{p}" for p in head_prefixes(self.backbone))
        return heads + (("dense.3",) if self.dense is not None else ())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.backbone.forward_features(x)
        out = {"logits": self.backbone.forward_head(feats)}
        if self.dense is not None:
            fmap = features_to_map(self.backbone, feats, tuple(x.shape[-2:]))
            if fmap.shape[1] != self.dense[0].in_channels:
                raise ValueError(f"feature map has {fmap.shape[1]} channels, the dense head expects "
                                 f"{self.dense[0].in_channels}")
            out["dense"] = F.interpolate(self.dense(fmap), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return out
