"""`SynthConfig`: the settings of `python -m synth generate`, validated at load (keys in docs/synth.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defectforge.config import ConfigError, require

from .defects import DEFECT_KINDS
from .labeled import labeled_classes, open_labeled
from .surfaces import SURFACE_KINDS

BACKENDS = ("procedural", "inpaint", "refine", "pretrained")  # all but procedural: synth/diffusion.py
DIFFUSION_SCHEDULERS = ("ddim", "dpm")
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass
class SynthConfig:
    """`python -m synth generate` settings; the keys are documented in docs/synth.md."""

    name: str = "synthetic-defects"
    backend: str = "procedural"
    num_samples: int = 1000
    image_size: Any = 256  # one int (square) or [H, W]
    seed: int = 0
    workers: int = 1  # 0 = one per CPU core
    shard_size: int = 256
    val_ratio: float = 0.1
    image_format: str = "jpg"
    jpeg_quality: int = 95
    surfaces: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in SURFACE_KINDS})
    # Order fixes the mask values: the first defect class is 1, the next 2, ...
    defects: dict[str, float] = field(default_factory=lambda: {k: 1.0 for k in DEFECT_KINDS})
    defects_per_image: list[int] = field(default_factory=lambda: [1, 3])
    empty_ratio: float = 0.1
    background_dir: str | None = None
    background_ratio: float = 0.5
    labeled_dir: str | None = None  # a shard folder (synth import) of labeled images, cropped with their labels
    labeled_split: str = "train"  # the split of labeled_dir that is cropped; val and test are refused
    labeled_ratio: float = 0.5  # with labeled_dir: probability that an image is a crop of a labeled image
    labeled_margin: int = 4  # px around every labeled pixel that no synthetic defect touches
    gradient: float = 0.25
    vignette: float = 0.3
    noise: list[float] = field(default_factory=lambda: [0.5, 3.0])
    # diffusion backends (docs/diffusion.md); ignored by `procedural`
    model_path: str | None = None  # inpaint/refine: a `synth train-diffusion` RUN/pipeline; pretrained: any local
    steps: int = 25  # sampler steps
    strength: float | None = None  # share of the schedule to run; null = 1.0 (inpaint, pretrained), 0.4 (refine)
    scheduler: str = "ddim"  # ddim | dpm (DPM-Solver++ multistep)
    patch_size: int = 256  # diffusion works in windows of this size around the defects
    dilation: int = 2  # px the defect mask grows by to give the inpainting a margin (pixels beyond stay identical)
    prompts: dict[str, str] = field(default_factory=dict)  # pretrained: class -> text prompt
    guidance_scale: float = 7.5  # pretrained: classifier-free guidance

    def validate(self) -> None:
        require(self.backend in BACKENDS, "backend", self.backend, f"one of {', '.join(BACKENDS)}")
        require(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        h, w = self.size
        require(64 <= h <= 8192 and 64 <= w <= 8192, "image_size", self.image_size,
                "one int or [H, W], each between 64 and 8192")
        require(self.workers >= 0, "workers", self.workers, "an integer >= 0 (0 = one per core)")
        require(self.shard_size >= 1, "shard_size", self.shard_size, "an integer >= 1")
        require(0.0 <= self.val_ratio < 1.0, "val_ratio", self.val_ratio, "a number in [0, 1)")
        require(self.image_format in ("jpg", "png"), "image_format", self.image_format, "'jpg' or 'png'")
        require(50 <= self.jpeg_quality <= 100, "jpeg_quality", self.jpeg_quality, "an integer in [50, 100]")
        _check_weights("surfaces", self.surfaces, SURFACE_KINDS)
        _check_weights("defects", self.defects, DEFECT_KINDS)
        lo_hi = self.defects_per_image
        require(len(lo_hi) == 2 and 0 <= lo_hi[0] <= lo_hi[1] <= 64, "defects_per_image", lo_hi,
                "[min, max] with 0 <= min <= max <= 64 (counts for a 512x512 image)")
        require(0.0 <= self.empty_ratio <= 1.0, "empty_ratio", self.empty_ratio, "a number in [0, 1]")
        require(0.0 <= self.background_ratio <= 1.0, "background_ratio", self.background_ratio, "a number in [0, 1]")
        require(0.0 <= self.gradient <= 1.0, "gradient", self.gradient, "a number in [0, 1]")
        require(0.0 <= self.vignette <= 1.0, "vignette", self.vignette, "a number in [0, 1]")
        require(len(self.noise) == 2 and 0 <= self.noise[0] <= self.noise[1] <= 50, "noise", self.noise,
                "[min, max] sensor noise sigma in 8-bit levels, 0 <= min <= max <= 50")
        if self.background_dir is not None:
            background_files(self.background_dir)  # fails now, naming the folder, rather than in a worker
        require(0.0 <= self.labeled_ratio <= 1.0, "labeled_ratio", self.labeled_ratio, "a number in [0, 1]")
        require(isinstance(self.labeled_margin, int) and 0 <= self.labeled_margin <= 64, "labeled_margin",
                self.labeled_margin, "an integer in [0, 64] (px)")
        if self.labeled_dir is not None:
            self.check_labeled_backend()
            open_labeled(self.labeled_dir, self.labeled_split, list(self.defects), verify=True)
        if self.backend != "procedural":
            self._validate_diffusion()

    def check_labeled_backend(self) -> None:
        """Labeled crops are procedural only: the diffusion backends regenerate the pixels of every labeled class
        (the real defects' too) or whole windows, so the real pixels and their labels would not be kept."""
        if self.labeled_dir is not None and self.backend != "procedural":
            raise ConfigError(f"key 'labeled_dir': crops of labeled images are drawn with backend=procedural only, "
                              f"found backend={self.backend} (it would repaint the real defects)")

    def _validate_diffusion(self) -> None:
        from .diffusion import check_model_folder, check_pretrained_folder

        require(self.model_path is not None, "model_path", self.model_path,
                f"a model folder for backend={self.backend} (see docs/diffusion.md)")
        require(isinstance(self.steps, int) and 1 <= self.steps <= 1000, "steps", self.steps, "an integer in [1, 1000]")
        require(self.strength is None or 0.0 < self.strength <= 1.0, "strength", self.strength,
                "null or a number in (0, 1]")
        require(self.scheduler in DIFFUSION_SCHEDULERS, "scheduler", self.scheduler,
                f"one of {', '.join(DIFFUSION_SCHEDULERS)}")
        require(isinstance(self.patch_size, int) and 32 <= self.patch_size <= 2048 and self.patch_size % 8 == 0,
                "patch_size", self.patch_size, "a multiple of 8 in [32, 2048]")
        require(isinstance(self.dilation, int) and 0 <= self.dilation <= 64, "dilation", self.dilation,
                "an integer in [0, 64]")
        require(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, "a number >= 0")
        for name in self.prompts:
            require(name in self.defects, f"prompts.{name}", name, f"one of the defect classes {list(self.defects)}")
        if self.backend == "pretrained":
            check_pretrained_folder(self.model_path)
        else:
            check_model_folder(self.model_path)

    @property
    def diffusion_strength(self) -> float:
        if self.strength is not None:
            return float(self.strength)
        return 0.4 if self.backend == "refine" else 1.0

    @property
    def size(self) -> tuple[int, int]:
        size = self.image_size
        if isinstance(size, int) and not isinstance(size, bool):
            return size, size
        if isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
            return int(size[0]), int(size[1])
        raise ConfigError(f"key 'image_size': value {size!r} is invalid, expected one int or [H, W]")

    @property
    def classes(self) -> list[str]:
        """Mask value k is `classes[k]`: background, the `defects` in order, then the classes of `labeled_dir`
        that `defects` does not name."""
        if self.labeled_dir is not None:
            return labeled_classes(self.labeled_dir, list(self.defects))
        return ["background", *self.defects]

    @property
    def num_val(self) -> int:
        return int(round(self.num_samples * self.val_ratio))


def _check_weights(key: str, weights: dict[str, float], known: tuple[str, ...]) -> None:
    for name, weight in weights.items():
        require(name in known, f"{key}.{name}", name, f"one of {', '.join(known)}")
        require(weight >= 0, f"{key}.{name}", weight, "a weight >= 0")
    require(sum(weights.values()) > 0, key, dict(weights), "at least one weight > 0")


def background_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"key 'background_dir': folder '{folder}' does not exist, expected a folder of photos")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_EXTS)
    if not files:
        raise ConfigError(
            f"key 'background_dir': folder '{folder}' holds no image, expected {', '.join(PHOTO_EXTS)} files"
        )
    return files
