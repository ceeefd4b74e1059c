"""Diffusion sampling: `synth generate backend=inpaint` against the bare UNet forward times N on the same tensors.

One JSON line per measurement, {"bench", "value", "unit", "reference", "ratio", ...}:
- `inpaint_<size>`: images/s of the inpaint backend (`synth.diffusion.Diffuser` on a rendered sample:
  windows around the defects, padding, N sampler steps, compositing, uint8 conversion), against the images/s
  the bare `unet(x, t, class_labels)` forward alone would give for the same windows and steps: every window
  the sample needed, on a tensor of that window's padded shape, N times. Target: ratio >= 0.9 (at most 10%
  overhead for the sampler, the windowing and the conversions).
- `refine_<size>`: the same for SDEdit (`backend=refine`, `strength` of the steps).
Each sample is a procedural render at the size (the render itself is not timed: see synth_throughput.py).
The model is the quickstart architecture (configs/synth/diffusion_quickstart.yaml) with random weights:
the speed does not depend on what it learned. Times are medians over `--repeats` runs, each side after one
UNet forward per window shape (a whole warm-up run would double a 4K measurement: minutes on a CPU).

Usage: python bench/diffusion_sampling.py [--sizes 256 2160x3840] [--steps 10] [--repeats 3] [--patch-size 256]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
from common import emit, median_seconds

from defectforge.config import load_config
from synth.compose import SynthConfig, render_sample
from synth.diffusion import Diffuser, build_unet, dilate, pad_to, save_pipeline, training_scheduler, windows
from synth.train_diffusion import DiffusionTrainConfig

REPO = Path(__file__).resolve().parents[1]


def parse_size(text: str) -> list[int]:
    return [int(v) for v in text.split("x")] if "x" in text else [int(text), int(text)]


def make_model(folder: Path) -> Path:
    cfg = load_config(DiffusionTrainConfig, REPO / "configs/synth/diffusion_quickstart.yaml", {})
    classes = ["background", "crack", "scratch", "pit", "stain", "chip"]
    torch.manual_seed(0)
    unet = build_unet(cfg.crop_size, len(classes), cfg.channels, cfg.layers_per_block, cfg.attention, cfg.norm_groups,
                      cfg.head_dim)
    return save_pipeline(unet, training_scheduler(), folder / "pipeline", {"classes": classes,
                                                                           "image_size": cfg.crop_size})


def bare_seconds(diffuser: Diffuser, shapes: list[tuple[int, int]], calls: int, repeats: int) -> float:
    """Seconds of `calls` bare UNet forwards on each window shape (padded as the backend pads them)."""
    unet = diffuser.pipe.unet
    label = torch.tensor([1], device=diffuser.device)
    tensors = []
    for h, w in shapes:
        x, _, _ = pad_to(torch.zeros(1, 7, h, w), diffuser.multiple)
        tensors.append(x.to(diffuser.device))
    t = torch.tensor(500, device=diffuser.device)

    @torch.no_grad()
    def run() -> None:
        for x in tensors:
            for _ in range(calls):
                unet(x, t, class_labels=label)

    warm(diffuser, shapes)
    return median_seconds(run, repeats, warmup=False)


@torch.no_grad()
def warm(diffuser: Diffuser, shapes: list[tuple[int, int]]) -> None:
    """One UNet forward per distinct window shape (first-call allocations), instead of a whole warm-up run."""
    label = torch.tensor([1], device=diffuser.device)
    for h, w in sorted(set(shapes)):
        x, _, _ = pad_to(torch.zeros(1, 7, h, w), diffuser.multiple)
        diffuser.pipe.unet(x.to(diffuser.device), 500, class_labels=label)


def measure(backend: str, size: list[int], model: Path, args: argparse.Namespace) -> None:
    overrides = {"image_size": size, "num_samples": 1, "backend": backend, "model_path": str(model),
                 "steps": args.steps, "patch_size": args.patch_size, "empty_ratio": 0.0, "seed": args.seed}
    cfg = load_config(SynthConfig, None, overrides)
    image, mask, meta = render_sample(cfg, 0)
    diffuser = Diffuser(cfg, device="cpu" if not torch.cuda.is_available() else None)
    # the windows the backend used, and how many UNet calls each took
    if backend == "refine":
        h, w = mask.shape
        small = h <= args.patch_size and w <= args.patch_size
        region = (mask >= 0) if small else dilate(mask > 0, args.patch_size // 4)
        calls = args.steps - min(args.steps - 1, args.steps - round(args.steps * cfg.diffusion_strength))
        wins = windows(region, args.patch_size)
    else:
        calls = args.steps
        wins = [win for c in range(1, int(mask.max()) + 1) if (mask == c).any()
                for win in windows(dilate(mask == c, cfg.dilation), args.patch_size)]
    shapes = [(win.y1 - win.y0, win.x1 - win.x0) for win in wins]
    warm(diffuser, shapes)
    seconds = median_seconds(lambda: diffuser(image, mask, meta), args.repeats, warmup=False)
    bare = bare_seconds(diffuser, shapes, calls, args.repeats)
    label = f"{size[0]}x{size[1]}"
    emit(f"{backend}_{label}", 1.0 / seconds, "images/s", 1.0 / bare, digits=4,
         reference_name=f"bare UNet forward x {calls} on the same {len(shapes)} window(s)", windows=len(shapes),
         steps=args.steps, unet_calls_per_window=calls, seconds_per_image=round(seconds, 3),
         threads=torch.get_num_threads(), target=">= 0.9")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256", "2160x3840"])
    p.add_argument("--backends", nargs="+", default=["inpaint", "refine"], choices=("inpaint", "refine"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="which procedural scene is rendered")
    args = p.parse_args()
    print(f"# {platform.node()}: nproc {os.cpu_count()}, torch {torch.__version__}, threads {torch.get_num_threads()}",
          file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp))
        for text in args.sizes:
            for backend in args.backends:
                measure(backend, parse_size(text), model, args)


if __name__ == "__main__":
    main()
