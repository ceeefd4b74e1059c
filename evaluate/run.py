"""`python -m evaluate run`: every model on every evaluation image, tiled, then cost, then the report."""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from defectforge.files import claim_output, write_atomic
from defectforge.precision import autocast_dtype, prefers_channels_last, resolve_mixed_precision
from defectforge.reader import SKIP_RECORD, allow_damaged, damage_found, make_dataset, read_location_info
from defectforge.tiling import seam_mask, tile_grid, tiled_logits, warmup_strip
from pretrain.hub import NONE, SYNTHETIC
from pretrain.metrics import class_argmax
from pretrain.models import model_family
from pretrain.segmenter import load_segmenter

from .claims import decide_claims
from .config import EvalConfig
from .cost import InferenceTimer, gflops, parameters, time_inference, time_interleaved
from .export import confusion, miou
from .interpret import interpret_model
from .metrics import EvalMetrics, accuracy_by_source, seam_counts, seam_summary
from .records import Accuracy, Cost, Evaluation, ModelCard, ModelResult, RuntimeResult, judge_learned
from .runtimes import EXPORTED, Autocast, find_export, load_runtime, parse_runtime, require_package

log = logging.getLogger("evaluate")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no CUDA device is available here")
    return torch.device(name)


def eval_split(location: str, requested: str | None) -> str:
    """The split to evaluate: the requested one, else test, else val, else the last one listed."""
    splits = list(read_location_info(location)["splits"])
    if requested is not None:
        if requested not in splits:
            raise ValueError(f"{location} has no split {requested!r}; it has {', '.join(splits)}")
        return requested
    for name in ("test", "val"):
        if name in splits:
            return name
    return splits[-1]


def describe(run_dir: Path, mcfg: dict) -> ModelCard:
    """Model card of a run: name, family (ViT, ViT-Hybrid, Swin, CNN), pretraining, training-set size."""
    info_path = run_dir / "run_info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    init = info.get("init")
    sources = None  # what the pretraining data was made by (procedural, inpaint, refine, imported, ...)
    pre_info = Path(init) / "run_info.json" if init else None
    if pre_info is not None and pre_info.is_file():
        sources = sorted({str(s) for s in json.loads(pre_info.read_text()).get("sources") or [] if s})
    # recorded by the run; a run saved before pretraining was recorded had synthetic pretraining exactly with an init
    pretraining = mcfg.get("pretraining") or (SYNTHETIC if init else NONE)
    return ModelCard(name=run_dir.name, run=str(run_dir), model=mcfg["model"], architecture=mcfg.get("smp_class"),
                     family=model_family(mcfg["model"]), init=init, pretrained=pretraining != NONE,
                     pretrain_sources=sources, train_samples=info.get("train_samples"), pretraining=pretraining,
                     weights=mcfg.get("weights"), crop_size=mcfg.get("crop_size"))


def _prepare(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device) -> torch.Tensor:
    image = image.to(device)[None]
    if image.shape[1] == 1:  # grayscale: the models take three channels
        image = image.expand(-1, 3, -1, -1)
    return (image - mean) / std


def speed_sample(images: list[dict], size: list[int]) -> dict | None:
    """The first evaluation image of `size` (the timed image), or None."""
    return next((s for s in images if list(s["image"].shape[-2:]) == list(size)), None)


def speed_image(images: list[dict], size: list[int], seed: int) -> tuple[torch.Tensor, str]:
    """A 4K image to time: the first evaluation image of `size`, else a procedural scene rendered here."""
    sample = speed_sample(images, size)
    if sample is not None:
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


def seam_errors(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, *, tile: int, overlap: float,
                blend: str, batch: int, band: int, accumulate: torch.device | str | None = None) -> torch.Tensor:
    """`seam_counts` of `model` tiled with `overlap` on one normalised image (its seams: that grid's inner edges)."""
    h, w = x.shape[-2:]
    logits = tiled_logits(model, x, tile=tile, overlap=overlap, blend=blend, batch=batch, accumulate=accumulate)
    return seam_counts(class_argmax(logits[0], 0), target, seam_mask(h, w, tile, overlap, band))


@dataclass
class Loaded:
    """A model kept after its accuracy pass, for the interleaved timing."""
    model: torch.nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    result: ModelResult
    runtimes: dict = dataclasses.field(default_factory=dict)  # runtime name -> callable (torch: the model)
    accuracy: dict = dataclasses.field(default_factory=dict)  # runtime name -> (mIoU, eager mIoU)
    timed: InferenceTimer | None = None  # the accuracy pass over the timed image, timed: the first timed round

    def __post_init__(self) -> None:
        if not self.runtimes:  # eager PyTorch only
            self.runtimes = {"torch": self.model}
            self.accuracy = {"torch": (float("nan"), float("nan"))}


def resolve_precision(cfg: EvalConfig, device: torch.device) -> dict:
    """The inference precision of this evaluation on `device` and how it was chosen (results.json "precision"):
    `mixed_precision: auto` is decided as for training (defectforge/precision.py), on the evaluation's device."""
    return resolve_mixed_precision(cfg.mixed_precision, device.type)[1]


def _load(run_dir: Path, classes: list[str], device: torch.device, precision: str = "no",
          ) -> tuple[torch.nn.Module, torch.nn.Module, dict, torch.Tensor, torch.Tensor]:
    """The model (eval mode, on `device`; convolutional networks in channels_last, as in training), the callable
    every tiled pass runs (the model under autocast when `precision` is bf16 or fp16), its config, mean and std."""
    model, mcfg = load_segmenter(run_dir)
    if mcfg["classes"] != classes:
        raise ValueError(f"model {run_dir} was trained on classes {mcfg['classes']} but the evaluation shards have "
                         f"{classes}: evaluate it on data with the same classes (in the same order)")
    model.to(device).eval()
    if prefers_channels_last(model):
        model.to(memory_format=torch.channels_last)
    dtype = autocast_dtype(precision)
    runner = Autocast(model, dtype) if dtype is not None else model
    mean = torch.tensor(mcfg["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(mcfg["std"], device=device).view(1, -1, 1, 1)
    return model, runner, mcfg, mean, std


def evaluate_model(run_dir: Path, images: list[dict], classes: list[str], cfg: EvalConfig, device: torch.device,
                   overlay_keys: set[str], progress: bool = True, precision: str = "no",
                   timed_key: str | None = None) -> tuple[Loaded, dict]:
    """Accuracy (with the overlap-0 seam pass on tiled images) and interpretability of one run. The tiled passes
    run at `precision` (an Accelerate mixed_precision value), the interpretability maps in fp32. The accuracy pass
    over the image keyed `timed_key` (the timed image), after `cfg.warmup` untimed passes over its warm-up strip,
    is timed as `time_models` times it: the model's first timed round (`Loaded.timed`)."""
    model, runner, mcfg, mean, std = _load(run_dir, classes, device, precision)
    accumulate = "cpu" if cfg.accumulate == "host" else device
    metrics = EvalMetrics(classes, tolerance=cfg.tolerance, thresholds=cfg.thresholds)
    no_overlap, tiled_images = torch.zeros(4, dtype=torch.float64), 0
    predictions: dict[str, np.ndarray] = {}
    eager = torch.zeros(len(classes), len(classes), dtype=torch.long)  # argmax confusion, for the runtimes' change
    tiling = dict(tile=cfg.tile_size, blend=cfg.blend, batch=cfg.tile_batch, accumulate=accumulate)
    timed = None
    for sample in tqdm(images, desc=run_dir.name, disable=not progress):
        x = _prepare(sample["image"], mean, std, device)
        h, w = x.shape[-2:]
        if sample["key"] == timed_key:
            strip = warmup_strip(x, cfg.tile_size, cfg.overlap, cfg.tile_batch)
            for _ in range(cfg.warmup):
                tiled_logits(runner, strip, overlap=cfg.overlap, **tiling)
            timed = InferenceTimer(device)
            with timed.measure():
                logits = tiled_logits(runner, x, overlap=cfg.overlap, **tiling)
        else:
            logits = tiled_logits(runner, x, overlap=cfg.overlap, **tiling)
        probs = logits.softmax(1)
        del logits
        tiled = len(tile_grid(h, w, cfg.tile_size, cfg.overlap)) > 1
        pred = class_argmax(probs[0], 0).cpu()
        eager += confusion(pred, sample["mask"], len(classes))
        metrics.update(probs, sample["mask"], seam_mask(h, w, cfg.tile_size, cfg.overlap, cfg.seam_band)
                       if tiled else None)
        if tiled and cfg.overlap > 0:  # the same model without overlap: only the seam metric, only tiled images
            no_overlap += seam_errors(runner, x, sample["mask"], overlap=0.0, band=cfg.seam_band, **tiling)
            tiled_images += 1
        if sample["key"] in overlay_keys:
            predictions[sample["key"]] = pred.to(torch.uint8).numpy()
    accuracy = Accuracy(**metrics.compute())
    accuracy.seam_error_no_overlap, accuracy.non_seam_error_no_overlap, accuracy.seam_ratio_no_overlap = \
        seam_summary(no_overlap)
    accuracy.seam_images = tiled_images
    accuracy.by_source = accuracy_by_source(accuracy.image_confusion, [i["key"].split("/", 1)[0] for i in images],
                                            classes)
    card = describe(run_dir, mcfg)
    if card.grid_mismatch(cfg.tile_size):
        log.warning("%s was trained on %d px crops and is tiled at %d px: its position embeddings are resampled to "
                    "a token grid it was not trained on (set tile_size to the training crop, docs/evaluate.md)",
                    run_dir.name, card.crop_size, cfg.tile_size)
    result = ModelResult(card=card, metrics=accuracy,
                         learned=judge_learned(accuracy, cfg.learned_floor))
    maps: list = []
    if cfg.interpret_images:
        result.interpretability, maps = interpret_model(model, images, mean, std, device, cfg.interpret_tolerance,
                                                        cfg.interpret_images)
    log.info("%s: mIoU %.4f, defect mIoU %.4f%s", run_dir.name, accuracy.mIoU, accuracy.defect_mIoU,
             "" if result.learned.learned else f" - did not learn ({result.learned.reason})")
    loaded = Loaded(model, mean, std, result, {"torch": runner}, {"torch": (miou(eager), miou(eager))}, timed)
    for name in cfg.runtimes[1:]:
        loaded.runtimes[name] = load_runtime(model, run_dir, name, cfg.tile_size)
        loaded.accuracy[name] = (runtime_miou(loaded.runtimes[name], images, classes, cfg, mean, std, device,
                                              tiling), miou(eager))
        log.info("%s through %s: mIoU %.4f (eager %.4f, same formula)", run_dir.name, name, *loaded.accuracy[name])
    return loaded, {"predictions": predictions, "maps": maps}


def runtime_miou(runner, images: list[dict], classes: list[str], cfg: EvalConfig, mean: torch.Tensor,
                 std: torch.Tensor, device: torch.device, tiling: dict) -> float:
    """mIoU of the argmax of `runner` tiled over every evaluation image (the formula of `export.miou`)."""
    conf = torch.zeros(len(classes), len(classes), dtype=torch.long)
    for sample in images:
        x = _prepare(sample["image"], mean, std, device)
        logits = tiled_logits(runner, x, overlap=cfg.overlap, **tiling)
        conf += confusion(class_argmax(logits[0], 0).cpu(), sample["mask"], len(classes))
    return miou(conf)


def check_runtimes(runs: list[Path], cfg: EvalConfig) -> None:
    """Before any work: every runtime asked for is installed and every exported model it needs exists."""
    for name in cfg.runtimes[1:]:
        base, dtype = parse_runtime(name)
        if base in EXPORTED:
            require_package(base, f"runtime={name}")
            for run in runs:
                find_export(run, EXPORTED[base], dtype, cfg.tile_size)


def time_models(loaded: list[Loaded], images: list[dict], cfg: EvalConfig, device: torch.device) -> None:
    """Cost of every model: parameters, FLOPs, then the tiled timing of all models in alternation on one image."""
    image, source = speed_image(images, cfg.speed_size, cfg.seed)
    accumulate = "cpu" if cfg.accumulate == "host" else device
    inputs = {m.result.name: _prepare(image, m.mean, m.std, device) for m in loaded}
    # the untimed rounds run on a strip of the image holding one batch of tiles: the same shapes, a few tiles
    strips = {k: warmup_strip(x, cfg.tile_size, cfg.overlap, cfg.tile_batch) for k, x in inputs.items()}

    def runner(m: Loaded, name: str, source: dict[str, torch.Tensor] = inputs):
        return lambda: tiled_logits(m.runtimes[name], source[m.result.name], tile=cfg.tile_size, overlap=cfg.overlap,
                                    blend=cfg.blend, batch=cfg.tile_batch, accumulate=accumulate)

    entries = [(m, r) for m in loaded for r in m.runtimes]
    seeded = {(m.result.name, "torch"): m.timed for m in loaded if m.timed is not None}
    timers = time_interleaved({(m.result.name, r): runner(m, r) for m, r in entries}, device,
                              repeats=cfg.repeats, warmup=cfg.warmup,
                              warm={(m.result.name, r): runner(m, r, strips) for m, r in entries}, timers=seeded)
    h, w = image.shape[-2:]
    tiles = len(tile_grid(h, w, cfg.tile_size, cfg.overlap))
    sh, sw = next(iter(strips.values())).shape[-2:]
    where = f"{source}; {len(loaded)} model(s) timed in alternation, {cfg.warmup} warm-up round(s)" + \
        (f" on its top {sw}x{sh} ({len(tile_grid(sh, sw, cfg.tile_size, cfg.overlap))} tiles)"
         if cfg.warmup and (sh, sw) != (h, w) else "") + f", {cfg.repeats} timed round(s)" + \
        (", the first of them each model's accuracy pass over this image" if seeded else "")
    for m in loaded:
        timing = timers[(m.result.name, "torch")].summary(tiles, (h, w), where)
        m.result.cost = Cost(parameters=parameters(m.model), gflops_per_tile=gflops(m.model, cfg.tile_size, device),
                             tiled=timing)
        for name in m.runtimes:
            value, eager = m.accuracy[name]
            change = value - eager
            m.result.cost.runtimes[name] = RuntimeResult(
                name, timers[(m.result.name, name)].summary(tiles, (h, w), where), value, eager, change,
                bool(abs(change) <= cfg.runtime_tolerance or name == "torch"))
        kept = [r for r in m.result.cost.runtimes.values() if r.within_tolerance]
        m.result.cost.deployed = min(kept, key=lambda r: r.tiled.seconds_per_image).runtime
        if cfg.whole_image:
            m.result.cost.whole = _time_whole(m.runtimes["torch"], inputs[m.result.name], cfg)
        log.info("%s: %s s per %dx%d image (median of %d, IQR %.2f-%.2f)", m.result.name,
                 f"{timing.seconds_per_image:.2f}", h, w, len(timing.seconds_all), timing.seconds_q1,
                 timing.seconds_q3)


def _time_whole(model: torch.nn.Module, x: torch.Tensor, cfg: EvalConfig) -> dict:
    try:
        return dataclasses.asdict(time_inference(model, x, tile=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend,
                                                 batch=1, repeats=cfg.repeats, warmup=cfg.warmup, whole=True))
    except (RuntimeError, MemoryError) as err:  # out of memory is a result here, not a crash
        return {"error": str(err).splitlines()[0]}


def _represent(cfg: EvalConfig, runs: list[Path], extra: list[str], images: list[dict],
               results: list[ModelResult]) -> tuple[dict, dict, list]:
    """With `represent: true`: how the models (and the `extra` pretrain runs) see, and its two claims."""
    from .claims import represent_claims
    from .represent_report import represent_images
    from .represent_run import RepresentConfig

    rcfg = RepresentConfig(max_images=None, crop=cfg.represent_crop, device=cfg.device,
                           interpret_tolerance=cfg.interpret_tolerance, seed=cfg.seed)
    rep, maps = represent_images(rcfg, [str(r) for r in runs] + list(extra), images[:cfg.represent_images])
    return rep, maps, represent_claims(rep, rcfg.probe_margin, {r.name: r.learned.learned for r in results})


def evaluate(cfg: EvalConfig, models: list[str], shards: list[str], out: str | Path, *, progress: bool = True,
             commands: list[str] | None = None, represent_runs: list[str] | None = None) -> Path:
    """Evaluate every run in `models` on `shards`, write results.json and the report; returns report.html.
    With `represent: true` the measures of how the models see also take `represent_runs` (pretrain runs)."""
    from .report import precision_note, write_report

    device = resolve_device(cfg.device)
    runs = [Path(m) for m in models]
    for run in runs:
        if not (run / "model_config.json").is_file():
            raise FileNotFoundError(f"{run} is not a finetune run (no model_config.json; did it reach max_steps?)")
    check_runtimes(runs, cfg)
    out = claim_output(out, "report")  # before the work: a folder of the user's files or an unwritable one fails now
    (out / SKIP_RECORD).unlink(missing_ok=True)  # this evaluation's list of skipped samples, not an earlier one's
    allow_damaged(cfg.allow_damaged, record=out / SKIP_RECORD)
    images, classes, sources = load_images(shards, cfg)
    damage = damage_found()
    by_size = sorted(images, key=lambda s: -s["image"].shape[-1] * s["image"].shape[-2])
    overlay_keys = {s["key"] for s in by_size[:cfg.overlays]}
    precision = resolve_precision(cfg, device)
    log.info("inference precision: %s", precision_note(precision))
    loaded, predictions, maps = [], {}, {}
    timed_key = (speed_sample(images, cfg.speed_size) or {}).get("key")
    for run in runs:
        entry, extra = evaluate_model(run, images, classes, cfg, device, overlay_keys, progress, precision["used"],
                                      timed_key)
        loaded.append(entry)
        predictions[entry.result.name] = extra["predictions"]
        maps[entry.result.name] = extra["maps"]
    time_models(loaded, images, cfg, device)
    results = [m.result for m in loaded]
    rep, rep_maps, rep_claims = _represent(cfg, runs, represent_runs or [], images, results) if cfg.represent \
        else (None, {}, [])
    evaluation = Evaluation(config=cfg, classes=classes, sources=sources, images=len(images), device=str(device),
                            precision=precision,
                            results=results, claims=decide_claims(results, cfg.claim_margin, cfg.overlap) + rep_claims,
                            commands=commands or [], data_damage=damage, represent=rep)
    write_atomic(out / "results.json", json.dumps(evaluation.to_dict(), indent=2, default=float) + "\n")
    return write_report(out, evaluation, by_size[:cfg.overlays], predictions, maps, rep_maps)
