"""What a run records: `metrics.jsonl`, the W&B tracker settings, class colours and image grids (every stage)."""

from __future__ import annotations

import json
import math
import netrc
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from .files import write_atomic


class MetricsLog:
    """Appends one JSON object per line to RUN/metrics.jsonl (flushed per line, main process only)."""

    def __init__(self, path: str | Path, resume_step: int | None = None):
        self.path = Path(path)
        if resume_step is not None and self.path.is_file():
            # lines written after the checkpoint we resume from describe steps that will be run again
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(clean) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_init_kwargs(run_dir: Path, *, name: str, group: str | None, run_id: str, job_type: str) -> dict:
    """wandb.init arguments: files under RUN/wandb, offline unless the user logged in or set WANDB_MODE."""
    kwargs = {"dir": str(run_dir), "name": name, "group": group, "id": run_id, "resume": "allow",
              "job_type": job_type}
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        kwargs["mode"] = "offline"
    return kwargs


def mask_grid(images: Tensor, masks: Tensor, palette: np.ndarray, *, max_items: int = 8) -> np.ndarray:
    """Uint8 (2H, N*W, 3) grid: images on the top row, their colored class masks below (for W&B and PNG)."""
    n = min(max_items, images.shape[0])
    imgs = (images[:n].detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    if imgs.shape[-1] == 1:
        imgs = np.repeat(imgs, 3, axis=-1)
    ms = masks[:n].detach().cpu()
    if ms.ndim == 4:  # Mixup soft targets (N, K+1, H, W): show the most likely class
        ms = ms.argmax(1)
    ms = ms.numpy()
    colored = palette[ms.clip(0, len(palette) - 1)]
    colored[ms == 255] = 128  # ignored pixels (a padded crop, co-training): grey
    return np.concatenate([np.concatenate(list(imgs), axis=1), np.concatenate(list(colored), axis=1)], axis=0)


def class_colors(classes: list[str]) -> list[tuple[float, float, float]]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(classes) <= 11 else "tab20"]
    # Index 0 (background) is never drawn; class k gets the k-th color of the map.
    return [(0.0, 0.0, 0.0)] + [tuple(cmap((k - 1) % cmap.N)[:3]) for k in range(1, len(classes))]


def class_palette(classes: list[str]) -> np.ndarray:
    """Uint8 (len(classes), 3) colors, black background, the same colors as `synth preview`."""
    return (np.array(class_colors(classes)) * 255).round().astype(np.uint8)
