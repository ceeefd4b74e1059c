"""`EvalConfig`: every key of `python -m evaluate run`, validated before any work starts (docs/evaluate.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from defectforge.config import require
from defectforge.precision import MIXED_PRECISION
from defectforge.tiling import BLENDS

from .runtimes import parse_runtime


def valid_runtime(name) -> bool:
    try:
        parse_runtime(name)
    except ValueError:
        return False
    return True


@dataclass
class EvalConfig:
    name: str = "evaluate"
    # tiled inference
    tile_size: int = 512
    overlap: float = 0.1  # share of a tile shared with its neighbour
    blend: str = "gaussian"  # gaussian | pyramid | average
    tile_batch: int = 8
    accumulate: str = "device"  # device | host: where the stitched logits live
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    # inference precision of every pass (accuracy, seams, timing): auto = bf16 (or fp16) autocast on a GPU; on a
    # CPU bf16 where the machine's measurement (as for training) found it >= 1.2x faster, else fp32; no = fp32
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    # each runtime is timed and its accuracy measured; eager torch is always measured too, as the reference
    runtime: Any = "torch"  # one or a list of torch / compile / bf16 / onnxruntime[-fp16/-int8] / openvino[-...]
    # mIoU change from eager (`torch` at mixed_precision) within which a runtime counts for speed claims
    runtime_tolerance: float = 0.005
    whole_image: bool = False  # also time each model on the whole 4K image at once, for comparison
    # data
    split: str | None = None  # null: test, else val, else the last split of each shard folder
    max_images: int | None = None  # per shard folder
    # a shard that no longer matches _info.json or an undecodable sample fails the evaluation by name; true:
    # left out, and the count of skipped samples written to results.json and the report's data line
    allow_damaged: bool = False
    # metrics
    tolerance: int = 2  # px, for ODS/OIS (crack papers use 2)
    thresholds: int = 20  # ODS/OIS thresholds (k + 0.5) / thresholds
    seam_band: int = 4  # px on each side of an inner tile edge counted as "near a seam"
    claim_margin: float = 0.01  # mIoU gain below which "A wins on accuracy" counts as no win (report claims)
    # a model whose defect mIoU is below this "did not learn" (so does one predicting one class everywhere), and
    # every claim involving it is inconclusive; 0.05 is far above the 0.000-0.006 of models that mark (almost)
    # nothing and far below what a model that finds the defects reaches (docs/evaluate.md)
    learned_floor: float = 0.05
    # interpretability (evaluate/interpret.py): ViT attention vs CNN Grad-CAM against the defect masks
    interpret_images: int = 8  # images with a defect scored per model (0 = off)
    interpret_tolerance: int = 8  # px around a defect that count as "on the defect"
    # how the models see (evaluate/represent_run.py, docs/evaluate.md): CKA, attention distance, rollout, probe
    represent: bool = False  # true: the report's "How the models see" section and its two claims
    represent_images: int = 32  # evaluation images (cropped to represent_crop) the measures use
    represent_crop: int = 224  # px, square crops around a defect (a multiple of 32)
    # cost
    speed_size: list[int] = field(default_factory=lambda: [2160, 3840])  # the "4K image" that is timed
    repeats: int = 3
    warmup: int = 1
    # report
    overlays: int = 2  # images shown with every model's prediction (the largest of the evaluation set)
    study: str | None = None
    seed: int = 0
    wandb: bool = True
    wandb_project: str = "defectforge"

    @property
    def runtimes(self) -> list[str]:
        """Every runtime to measure, eager torch first."""
        names = [self.runtime] if isinstance(self.runtime, str) else list(self.runtime)
        return ["torch", *[n for n in dict.fromkeys(names) if n != "torch"]]

    def validate(self) -> None:
        require(isinstance(self.runtime, str) or (isinstance(self.runtime, list) and self.runtime), "runtime",
                self.runtime, "a runtime name or a non-empty list of them")
        for name in self.runtimes:
            require(valid_runtime(name), "runtime", name, "torch, compile, bf16, or onnxruntime / openvino with an "
                    "optional -fp16 or -int8 (e.g. onnxruntime-int8)")
        require(0 <= self.runtime_tolerance < 1, "runtime_tolerance", self.runtime_tolerance,
                "an mIoU change in [0, 1)")
        require(isinstance(self.tile_size, int) and 32 <= self.tile_size <= 8192, "tile_size", self.tile_size,
                "an integer between 32 and 8192")
        require(0.0 <= self.overlap < 0.9, "overlap", self.overlap, "a fraction in [0, 0.9)")
        require(self.blend in BLENDS, "blend", self.blend, f"one of {', '.join(BLENDS)}")
        require(self.tile_batch >= 1, "tile_batch", self.tile_batch, "an integer >= 1")
        require(self.accumulate in ("device", "host"), "accumulate", self.accumulate, "'device' or 'host'")
        require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
                self.device, "auto, cpu, cuda or cuda:N")
        require(self.mixed_precision in MIXED_PRECISION, "mixed_precision", self.mixed_precision,
                f"one of {', '.join(MIXED_PRECISION)} (no = fp32)")
        require(isinstance(self.allow_damaged, bool), "allow_damaged", self.allow_damaged, "true or false")
        require(self.max_images is None or self.max_images >= 1, "max_images", self.max_images, "null or >= 1")
        require(0 <= self.tolerance <= 32, "tolerance", self.tolerance, "an integer in [0, 32]")
        require(2 <= self.thresholds <= 200, "thresholds", self.thresholds, "an integer in [2, 200]")
        require(0 <= self.seam_band <= 64, "seam_band", self.seam_band, "an integer in [0, 64]")
        require(0 <= self.claim_margin < 1, "claim_margin", self.claim_margin, "an mIoU difference in [0, 1)")
        require(0 <= self.learned_floor < 1, "learned_floor", self.learned_floor, "a defect mIoU in [0, 1)")
        require(len(self.speed_size) == 2 and all(64 <= s <= 16384 for s in self.speed_size), "speed_size",
                self.speed_size, "[H, W], each between 64 and 16384")
        require(self.repeats >= 1, "repeats", self.repeats, "an integer >= 1")
        require(self.warmup >= 0, "warmup", self.warmup, "an integer >= 0")
        require(self.interpret_images >= 0, "interpret_images", self.interpret_images, "an integer >= 0")
        require(0 <= self.interpret_tolerance <= 128, "interpret_tolerance", self.interpret_tolerance,
                "an integer in [0, 128]")
        require(isinstance(self.represent, bool), "represent", self.represent, "true or false")
        require(self.represent_images >= 4, "represent_images", self.represent_images, "an integer >= 4")
        require(32 <= self.represent_crop <= 2048 and self.represent_crop % 32 == 0, "represent_crop",
                self.represent_crop, "a multiple of 32 between 32 and 2048")
        require(self.overlays >= 0, "overlays", self.overlays, "an integer >= 0")
