"""`python -m evaluate run`: every model on every evaluation image, tiled, then cost, then the report."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from defectforge.reader import load_info, make_dataset
from finetune.models import load_segmenter

from .config import EvalConfig
from .cost import InferenceTimer, gflops, parameters, time_inference
from .interpret import interpret_model
from .metrics import EvalMetrics
from .tiling import seam_mask, tile_grid, tiled_logits

log = logging.getLogger("evaluate")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available here")
    return torch.device(name)


def eval_split(location: str, requested: str | None) -> str:
    """The split to evaluate: the requested one, else test, else val, else the last one listed."""
    splits = list(load_info(location)["splits"])
    if requested is not None:
        if requested not in splits:
            raise ValueError(f"{location} has no split {requested!r}; it has {', '.join(splits)}")
        return requested
    for name in ("test", "val"):
        if name in splits:
            return name
    return splits[-1]


def describe(run_dir: Path, mcfg: dict) -> dict:
    """Model card of a run: name, family (ViT, ViT-Hybrid, Swin, CNN), pretraining, training-set size."""
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    model = mcfg["model"]
    if re.match(r"vit_.*_r\d+", model) or "hybrid" in model:
        family = "ViT-Hybrid"
    elif mcfg.get("smp_class") == "DPT" or model.startswith(("vit", "deit", "eva", "beit")):
        family = "ViT"
    elif "swin" in model:
        family = "Swin"
    else:
        family = "CNN"
    init = info.get("init")
    sources = None  # what the pretraining data was made by (procedural, inpaint, refine, imported, ...)
    pre_info = Path(init) / "run_info.json" if init else None
    if pre_info is not None and pre_info.is_file():
        sources = sorted({str(s) for s in json.loads(pre_info.read_text()).get("sources") or [] if s})
    return {"name": run_dir.name, "run": str(run_dir), "model": model, "architecture": mcfg.get("smp_class"),
            "family": family, "init": init, "pretrained": bool(init), "pretrain_sources": sources,
            "train_samples": info.get("train_samples")}


def _prepare(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    image = image.to(device)[None]
    if image.shape[1] == 1:  # grayscale: the models take three channels
        image = image.expand(-1, 3, -1, -1)
    return (image - mean) / std


def speed_image(images: list[dict], size: list[int], seed: int) -> tuple[torch.Tensor, str]:
    """A 4K image to time: the first evaluation image of `size`, else a procedural scene rendered here."""
    for sample in images:
        if list(sample["image"].shape[-2:]) == list(size):
            return sample["image"], f"evaluation image {sample['key']}"
    from defectforge.config import load_config
    from synth.compose import SynthConfig, render_sample

    cfg = load_config(SynthConfig, None, {"image_size": list(size), "seed": seed})
    image, _, _ = render_sample(cfg, 0)
    return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).float() / 255, "procedural scene (synth, seed " \
        f"{seed})"


def load_images(shards: list[str], cfg: EvalConfig) -> tuple[list[dict], list[str], list[str]]:
    """Every evaluation sample (image, mask, key, source) of every shard location, and their common classes."""
    images, classes, sources = [], None, []
    for location in shards:
        split = eval_split(location, cfg.split)
        ds = make_dataset(location, split)
        if classes is not None and ds.classes != classes:
            raise ValueError(f"{location} has classes {ds.classes}, the other shards {classes}: evaluate them "
                             "separately")
        classes = ds.classes
        sources.append(f"{location} ({split})")
        for i, sample in enumerate(ds):
            if cfg.max_images is not None and i >= cfg.max_images:
                break
            images.append({"image": sample["image"], "mask": sample["mask"], "key": f"{Path(location).name}/"
                           f"{sample['key']}"})
    if not images:
        raise ValueError(f"no evaluation image in {', '.join(shards)}")
    return images, classes, sources


def evaluate_model(run_dir: Path, images: list[dict], classes: list[str], cfg: EvalConfig, device: torch.device,
                   overlay_keys: set[str], progress: bool = True) -> tuple[dict, dict]:
    model, mcfg = load_segmenter(run_dir)
    if mcfg["classes"] != classes:
        raise ValueError(f"model {run_dir} was trained on classes {mcfg['classes']} but the evaluation shards have "
                         f"{classes}: evaluate it on data with the same classes (in the same order)")
    model.to(device).eval()
    mean = torch.tensor(mcfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(mcfg["std"], device=device).view(1, -1, 1, 1)
    accumulate = "cpu" if cfg.accumulate == "host" else device
    metrics = EvalMetrics(classes, tolerance=cfg.tolerance, thresholds=cfg.thresholds)
    predictions: dict[str, np.ndarray] = {}
    timer = InferenceTimer(device)  # evaluation images of `speed_size` are timed as they are predicted
    for index, sample in enumerate(tqdm(images, desc=run_dir.name, disable=not progress)):
        x = _prepare(sample["image"], mean, std, device)
        h, w = x.shape[-2:]
        # only after at least `warmup` (and one) images: the first inferences include one-off setup costs
        timed = [h, w] == list(cfg.speed_size) and len(timer.times) < cfg.repeats and index >= max(1, cfg.warmup)
        with timer.measure() if timed else contextlib.nullcontext():
            logits = tiled_logits(model, x, tile=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend,
                                  batch=cfg.tile_batch, accumulate=accumulate)
        probs = logits.softmax(1)
        seams = seam_mask(h, w, cfg.tile_size, cfg.overlap, cfg.seam_band) \
            if len(tile_grid(h, w, cfg.tile_size, cfg.overlap)) > 1 else None
        metrics.update(probs, sample["mask"], seams)
        if sample["key"] in overlay_keys:
            predictions[sample["key"]] = probs[0].argmax(0).to(torch.uint8).cpu().numpy()
    result = {**describe(run_dir, mcfg), "metrics": metrics.compute()}
    maps: list = []
    if cfg.interpret_images:
        result["interpretability"], maps = interpret_model(model, images, mean, std, device, cfg.interpret_tolerance,
                                                           cfg.interpret_images)
    image, source = speed_image(images, cfg.speed_size, cfg.seed)
    x = _prepare(image, mean, std, device)
    measured = len(timer.times)
    timing = time_inference(model, x, tile=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend,
                            batch=cfg.tile_batch, repeats=cfg.repeats, warmup=0 if measured else cfg.warmup,
                            accumulate=accumulate, timer=timer)
    timing["source"] = source if not measured else f"{measured} evaluation image(s) of this size, timed during " \
        f"the accuracy pass (after at least {max(1, cfg.warmup)} other image(s) as warm-up)" + \
        (f", plus {len(timer.times) - measured} extra run(s)" if len(timer.times) > measured else "")
    result["cost"] = {"parameters": parameters(model), "gflops_per_tile": gflops(model, cfg.tile_size, device),
                      "tiled": timing}
    if cfg.whole_image:
        try:
            result["cost"]["whole"] = time_inference(model, x, tile=cfg.tile_size, overlap=cfg.overlap,
                                                     blend=cfg.blend, batch=1, repeats=cfg.repeats, warmup=cfg.warmup,
                                                     whole=True)
        except (RuntimeError, MemoryError) as err:  # out of memory is a result here, not a crash
            result["cost"]["whole"] = {"error": str(err).splitlines()[0]}
    log.info("%s: mIoU %.4f, %.2f s per %dx%d image", run_dir.name, result["metrics"]["mIoU"],
             timing["seconds_per_image"], *cfg.speed_size)
    return result, {"predictions": predictions, "maps": maps}


def evaluate(cfg: EvalConfig, models: list[str], shards: list[str], out: str | Path, *, progress: bool = True,
             commands: list[str] | None = None) -> Path:
    """Evaluate every run in `models` on `shards`, write results.json and the report; returns report.html."""
    from .report import write_report

    out = Path(out)
    device = resolve_device(cfg.device)
    runs = [Path(m) for m in models]
    for run in runs:
        if not (run / "model_config.json").is_file():
            raise FileNotFoundError(f"{run} is not a finetune run (no model_config.json; did it reach max_steps?)")
    images, classes, sources = load_images(shards, cfg)
    by_size = sorted(images, key=lambda s: -s["image"].shape[-1] * s["image"].shape[-2])
    overlay_keys = {s["key"] for s in by_size[:cfg.overlays]}
    results, predictions, maps = [], {}, {}
    for run in runs:
        result, extra = evaluate_model(run, images, classes, cfg, device, overlay_keys, progress)
        results.append(result)
        predictions[result["name"]] = extra["predictions"]
        maps[result["name"]] = extra["maps"]
    out.mkdir(parents=True, exist_ok=True)
    payload = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "classes": classes,
               "sources": sources, "images": len(images), "device": str(device), "results": results,
               "commands": commands or []}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    tmp.replace(out / "results.json")
    overlays = [s for s in by_size[:cfg.overlays]]
    return write_report(out, payload, overlays, predictions, maps)
