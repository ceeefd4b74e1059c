"""Published timm weights through the Hugging Face Hub cache (`pretrained=true`), and what each run records about
the weights it started from.

`fetch_pretrained(name)` finds the weights timm would load for a timm name (``arch`` or ``arch.tag``): the
repository and file of its pretrained config (``hf_hub_id``, ``model.safetensors`` before ``pytorch_model.bin``
as timm prefers them), taken from the Hub cache or downloaded into it by ``huggingface_hub.hf_hub_download``.
The cache folder and offline mode are read from the environment when the weights are asked for (``HF_HUB_CACHE``,
``HF_HOME``, ``HF_HUB_OFFLINE``), so they hold whenever they are set. timm then builds the model from that file
(``pretrained=True`` with ``pretrained_cfg_overlay={"file": ...}``): its own loader with the architecture's
checkpoint filter (position embeddings resampled to the model's grid, classifier dropped for another class count).
Nothing here runs unless a config says ``pretrained: true``.

The record (`HubWeights.record`) names the repository, the revision (the commit of the snapshot the file came
from), the file, the licence, the normalisation and input size of timm's pretrained config and a label of the
pretraining data ("ImageNet-21k", "DINOv2 LVD-142M", ...), which evaluation shows next to "synthetic (this
study)" and "none".
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from timm.models import get_pretrained_cfg

log = logging.getLogger(__name__)

SYNTHETIC = "synthetic (this study)"
NONE = "none"
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order when the config names no file
# The first pattern found in a pretrained tag names the data the weights were pretrained on (the first stage of
# a tag like augreg_in21k_ft_in1k: ImageNet-21k, then fine-tuned on ImageNet-1k).
_DATASETS = (
    ("sat493m", "DINOv3 SAT-493M"), ("lvd1689m", "DINOv3 LVD-1689M"), ("lvd142m", "DINOv2 LVD-142M"),
    ("seer", "SEER Instagram-1B"), ("ig1b", "Instagram-1B"), ("yfcc", "YFCC-100M"), ("jft", "JFT-300M"),
    ("laion2b", "LAION-2B"), ("laion400m", "LAION-400M"), ("openai", "OpenAI CLIP WIT-400M"),
    ("datacomp", "DataComp-1B"), ("metaclip", "MetaCLIP"), ("dfn", "DFN"), ("webli", "WebLI"), ("sa1b", "SA-1B"),
    ("cc12m", "CC12M"), ("m38m", "Merged-38M"), ("in21k", "ImageNet-21k"), ("in22k", "ImageNet-21k"),
    ("in12k", "ImageNet-12k"), ("dino", "DINO ImageNet-1k"), ("in1k", "ImageNet-1k"),
)


class PretrainedWeightsError(ValueError):
    """Published weights that cannot be had: no weights for the name, not in the cache offline, no access."""


@dataclass
class HubWeights:
    """The local file of a timm model's published weights and what is recorded about them."""

    file: Path
    record: dict[str, Any]

    def timm_kwargs(self) -> dict[str, Any]:
        """What `timm.create_model` needs to load exactly this file with its own loader."""
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(self.file)}}


def hub_cache_dir() -> Path:
    """The Hugging Face Hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub, else the default)."""
    from huggingface_hub import constants

    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.path.expanduser(os.environ[key])))
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"]))) / "hub"
    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.HF_HUB_OFFLINE or value.upper() in constants.ENV_VARS_TRUE_VALUES


def pretraining_label(name: str) -> str:
    """The pretraining data of a timm name's published weights, from its tag: "ImageNet-21k", "DINOv2 LVD-142M"."""
    arch, _, tag = name.partition(".")
    for pattern, label in _DATASETS:
        if pattern in tag.lower():
            return label
    return f"timm weights {tag}" if tag else f"timm weights of {arch}"


def combine(base: str | None, synthetic: bool) -> str:
    """A run's pretraining label: the weights it started from ("ImageNet-21k", a run's own label, or none), then
    "synthetic (this study)" when it adds synthetic pretraining (once: a pretrain run from a pretrain run's file
    is still "synthetic (this study)")."""
    parts = [p for p in (base or "").split(" + ") if p and p != NONE]
    if synthetic and SYNTHETIC not in parts:
        parts.append(SYNTHETIC)
    return " + ".join(parts) or NONE


def _pretrained_cfg(name: str) -> tuple[str, Any]:
    """`name` with its tag (timm's default tag when it has none) and its pretrained config."""
    arch, _, tag = name.partition(".")
    available = timm.list_pretrained(arch) + timm.list_pretrained(arch + ".*")
    if not available:
        with_weights = sorted({n.split(".")[0] for n in timm.list_pretrained()})
        close = difflib.get_close_matches(arch, with_weights, n=5, cutoff=0.5)
        raise PretrainedWeightsError(
            f"key 'pretrained': timm publishes no weights for {name!r}"
            + (f"; models with weights near that name: {', '.join(close)}" if close else "")
            + " (timm.list_pretrained() lists them all); or set pretrained=false")
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise PretrainedWeightsError(f"key 'pretrained': {name!r} is not a timm pretrained tag; tags of {arch}: "
                                     f"{', '.join(available)}")
    full = f"{arch}.{cfg.tag}" if not tag and cfg.tag else name
    return full, cfg


def _revision(path: Path) -> str | None:
    """The commit of the Hub cache snapshot `path` lies in (models--ORG--NAME/snapshots/<commit>/FILE)."""
    parts = path.parts
    if "snapshots" in parts[:-1]:
        return parts[parts.index("snapshots") + 1]
    return None


def _missing(full: str, repo: str, files: list[str], cache: Path, offline: bool, cause: Exception | None) -> str:
    where = f"the Hugging Face repository {repo} (file {' or '.join(files)})"
    if offline:
        why = f"are not in the Hub cache {cache} and HF_HUB_OFFLINE=1 forbids downloading them"
    else:
        reason = str(cause).splitlines()[0] if cause else "no reason given"
        why = f"could not be downloaded into the Hub cache {cache} ({reason})"
    return (f"key 'pretrained': the weights of {full}, {where}, {why}. Fetch them once where there is network "
            f"(`hf download {repo}`, or this command without HF_HUB_OFFLINE) and copy that cache here (point "
            f"HF_HOME or HF_HUB_CACHE at it), or download the file and give it as a local file instead "
            f"(pretrain: weights=FILE, finetune: init=FILE) with pretrained=false")


def fetch_pretrained(name: str) -> HubWeights:
    """The local file of the published weights of timm name `name`, from the Hub cache or downloaded into it."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from timm.models._hub import hf_split

    full, cfg = _pretrained_cfg(name)
    if not cfg.hf_hub_id:
        raise PretrainedWeightsError(f"key 'pretrained': the weights of {full} are published only at {cfg.url}, not "
                                     "on the Hugging Face Hub: download the file and pass it as weights=FILE "
                                     "(pretrain) or init=FILE (finetune)")
    repo, pinned = hf_split(cfg.hf_hub_id)
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else list(_HUB_FILES)
    cache, offline = hub_cache_dir(), hub_offline()
    cause: Exception | None = None
    for filename in files:
        try:
            path = Path(hf_hub_download(repo, filename, revision=pinned, cache_dir=cache, local_files_only=offline,
                                        library_name="timm", library_version=timm.__version__))
        except GatedRepoError as err:
            raise PretrainedWeightsError(
                f"key 'pretrained': the repository {repo} ({full}) is gated: accept its licence "
                f"({cfg.license or 'see the model card'}) at https://huggingface.co/{repo} and log in "
                f"(`hf auth login` or HF_TOKEN), or copy a cache that holds it and set HF_HUB_OFFLINE=1") from err
        except RevisionNotFoundError as err:
            raise PretrainedWeightsError(f"key 'pretrained': {repo} has no revision {pinned!r} ({full})") from err
        except RepositoryNotFoundError as err:
            raise PretrainedWeightsError(f"key 'pretrained': the Hugging Face repository {repo} of {full} does not "
                                         f"exist or needs a login: {str(err).splitlines()[0]}") from err
        except (LocalEntryNotFoundError, EntryNotFoundError, OSError) as err:  # not cached, not there, no network
            cause = err
            continue
        record = {
            "source": "hub", "model": full, "repo_id": repo, "revision": _revision(path) or pinned, "file": filename,
            "path": str(path), "license": cfg.license, "pretraining": pretraining_label(full),
            "mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std],
            "input_size": list(cfg.input_size)}
        log.info("pretrained weights of %s: %s@%s (%s), licence %s", full, repo, record["revision"], filename,
                 cfg.license)
        return HubWeights(path, record)
    raise PretrainedWeightsError(_missing(full, repo, files, cache, offline, cause))


def mismatch(hub: HubWeights, model: str, kwargs: dict, err: Exception) -> PretrainedWeightsError:
    """The error of published weights that timm cannot load into the model built (other model arguments)."""
    detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4]) or str(err)
    return PretrainedWeightsError(f"key 'pretrained': the weights {hub.record['repo_id']} ({hub.file}) do not fit "
                                  f"{model} built with {kwargs}: {detail} (leave out the arguments that change the "
                                  "architecture, or set pretrained=false)")


def file_record(path: str | Path) -> dict[str, Any]:
    """What is recorded for weights loaded from a local file (`weights=FILE`, `init=FILE`): a run's
    model.safetensors carries that run's pretraining label and published weights, any other file its name."""
    path = Path(path)
    config = path.parent / "model_config.json"
    if path.name == "model.safetensors" and config.is_file():
        saved = json.loads(config.read_text())
        if saved.get("weights"):
            return saved["weights"]
        label = saved.get("pretraining") or (SYNTHETIC if saved.get("architecture") == "timm" else None)
        if label:
            return {"source": "run", "path": str(path), "pretraining": label}
    return {"source": "file", "path": str(path), "pretraining": f"local file {path.name}"}
