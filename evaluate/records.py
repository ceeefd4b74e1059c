"""What an evaluation produces, as typed records: a model card and the model's accuracy, interpretability and
cost results. `evaluate/run.py` fills them, `evaluate/claims.py` decides the claims from them,
`evaluate/report.py` renders them; `to_dict` gives the `results.json` entry of a model."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pretrain.hub import NONE, SYNTHETIC, combine
from pretrain.models import VIT_FAMILIES

if TYPE_CHECKING:
    from .claims import Claim
    from .config import EvalConfig


@dataclass
class ModelCard:
    """Which model a result belongs to (from the run's model_config.json and run_info.json)."""
    name: str
    run: str
    model: str  # timm name (with the tag of its published weights, when it names one)
    architecture: str | None  # smp class (Unet, DPT, ...)
    family: str  # ViT, ViT-Hybrid, Swin or CNN (pretrain.models.model_family)
    init: str | None = None  # the pretrain run it started from
    pretrained: bool = False  # any pretraining: published weights, synthetic pretraining or both
    pretrain_sources: list[str] | None = None  # what made the pretraining data (procedural, inpaint, ...)
    train_samples: int | None = None
    # "ImageNet-21k", "DINOv2 LVD-142M", "synthetic (this study)", "ImageNet-21k + synthetic (this study)", "none"
    pretraining: str | None = None
    synthetic: bool | None = None  # its pretraining includes this study's synthetic pretraining
    weights: dict | None = None  # the published weights it started from: repo_id, revision, file, license, ...
    crop_size: int | None = None  # the side of the crops it was trained on (None: not recorded)

    def __post_init__(self) -> None:
        # a card made without the pretraining fields: `pretrained` then means synthetic pretraining, as it once did
        if self.synthetic is None:
            self.synthetic = self.pretrained if self.pretraining is None else SYNTHETIC in self.pretraining.split(" + ")
        if self.pretraining is None:
            self.pretraining = combine(None, self.synthetic)
        self.pretrained = self.pretrained or self.pretraining != NONE

    @property
    def arch(self) -> str:
        """The timm architecture, without the tag that picks published weights."""
        return self.model.split(".")[0]

    def grid_mismatch(self, tile: int) -> bool:
        """A ViT (absolute position embeddings) tiled at another size than the crops it was trained on."""
        return self.family in VIT_FAMILIES and bool(self.crop_size) and self.crop_size != tile

    @property
    def start(self) -> str:
        """The pretraining before this study's synthetic pretraining ("ImageNet-21k", or "none")."""
        return " + ".join(p for p in self.pretraining.split(" + ") if p != SYNTHETIC) or NONE


@dataclass
class Accuracy:
    """Metrics of one model over every evaluation image (evaluate/metrics.py), plus the overlap-0 seam pass."""
    mIoU: float
    defect_mIoU: float
    pixel_accuracy: float
    per_class: dict[str, dict[str, float | None]]
    ODS_F1: float
    ODS_threshold: float
    OIS_F1: float
    tolerance_px: int
    pixel_AP: float
    image_AP: float
    images: int
    seam_error: float | None
    non_seam_error: float | None
    seam_ratio: float | None
    image_confusion: list = field(default_factory=list)
    predicted_classes: list[str] = field(default_factory=list)  # classes the argmax predicts anywhere
    # the same model tiled without overlap, on the images that are tiled (only the seam metric)
    seam_error_no_overlap: float | None = None
    non_seam_error_no_overlap: float | None = None
    seam_ratio_no_overlap: float | None = None
    seam_images: int = 0
    # source (shard folder) -> {images, pixels, mIoU, defect_mIoU, IoU: {class: value}}, pooled per source
    by_source: dict = field(default_factory=dict)


@dataclass
class Learned:
    """Whether a model's predictions carry information (docs/evaluate.md, "did not learn")."""
    learned: bool
    reason: str  # why not, or the figure it passed on


@dataclass
class Interpretability:
    method: str  # attention | grad-cam
    images: int
    pointing_game: float | None = None
    energy_in_defect: float | None = None
    energy_chance: float | None = None
    per_image: list[dict] = field(default_factory=list)  # the same images for every model: paired comparisons


@dataclass
class Timing:
    """Interleaved timed runs of one model (evaluate/cost.py): median and spread, memory per run."""
    seconds_per_image: float  # median
    seconds_all: list[float]
    seconds_min: float
    seconds_max: float
    seconds_q1: float
    seconds_q3: float
    tiles: int
    tiles_per_s: float
    peak_memory_bytes: int
    memory_increase_bytes: int  # the largest increase of one run over the memory just before it
    memory_runs: list[int]  # per run: CUDA peak allocated, or (CPU) the peak RSS increase over the RSS before
    memory_kind: str  # cuda_peak_allocated | peak_rss
    image_size: list[int]
    source: str = ""
    rounds: int = 0


@dataclass
class RuntimeResult:
    """One model through one runtime (evaluate/runtimes.py): its timing and the accuracy it keeps."""
    runtime: str
    tiled: Timing | None = None
    mIoU: float | None = None  # of the argmax over every evaluation image; the same formula as `eager_mIoU`
    eager_mIoU: float | None = None  # eager PyTorch fp32, same formula, same images
    miou_change: float | None = None  # mIoU - eager_mIoU
    within_tolerance: bool = True  # |miou_change| <= runtime_tolerance
    error: str | None = None  # why this runtime could not run (missing package or export), when it could not


@dataclass
class Cost:
    parameters: int
    gflops_per_tile: float
    tiled: Timing  # eager PyTorch (runtime torch, at mixed_precision), always measured: every runtime's reference
    whole: dict[str, Any] | None = None  # timing of the whole image at once, or {"error": ...}
    runtimes: dict[str, RuntimeResult] = field(default_factory=dict)  # every runtime measured, torch included
    deployed: str = "torch"  # the fastest runtime whose mIoU stayed within runtime_tolerance of eager torch

    @property
    def fastest(self) -> Timing:
        """The timing the speed claims use: that of `deployed`."""
        entry = self.runtimes.get(self.deployed)
        return entry.tiled if entry is not None and entry.tiled is not None else self.tiled


@dataclass
class ModelResult:
    card: ModelCard
    metrics: Accuracy
    learned: Learned
    cost: Cost | None = None
    interpretability: Interpretability | None = None

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def family(self) -> str:
        return self.card.family

    def to_dict(self) -> dict:
        """The `results.json` entry: the card's fields at the top level, then the results."""
        out = dataclasses.asdict(self.card)
        out.update(learned=self.learned.learned, learned_reason=self.learned.reason,
                   metrics=dataclasses.asdict(self.metrics),
                   interpretability=dataclasses.asdict(self.interpretability) if self.interpretability else None,
                   cost=dataclasses.asdict(self.cost) if self.cost else None)
        return out


@dataclass
class Evaluation:
    """Everything one `python -m evaluate run` measured and decided: what `results.json` holds."""
    config: EvalConfig
    classes: list[str]
    sources: list[str]
    images: int
    device: str
    results: list[ModelResult]
    claims: list[Claim] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    data_damage: dict | None = None  # with allow_damaged: {"skipped_samples": N, "problems": [...]}
    represent: dict | None = None  # with represent: true, what evaluate/represent_run.py measured
    # inference precision: {"asked", "used" (no/bf16/fp16), and for auto on a CPU the measurement behind it}
    precision: dict | None = None

    def to_dict(self) -> dict:
        return {"config": dataclasses.asdict(self.config), "classes": self.classes, "sources": self.sources,
                "images": self.images, "device": self.device, "results": [r.to_dict() for r in self.results],
                "claims": [dataclasses.asdict(c) for c in self.claims], "commands": self.commands,
                "data_damage": self.data_damage, "represent": self.represent, "precision": self.precision}


def judge_learned(metrics: Accuracy, floor: float) -> Learned:
    """Did the model learn? Not when its argmax predicts one class everywhere, or when its defect mIoU is below
    `floor` (a NaN defect mIoU: no defect in the truth nor the prediction, so only the first rule applies)."""
    if len(metrics.predicted_classes) <= 1:
        only = metrics.predicted_classes[0] if metrics.predicted_classes else "nothing"
        return Learned(False, f"predicts {only} everywhere")
    value = metrics.defect_mIoU
    if value is not None and not math.isnan(value) and value < floor:
        return Learned(False, f"defect mIoU {value:.3f} below learned_floor {floor:.3f}")
    return Learned(True, f"defect mIoU {value:.3f}")
