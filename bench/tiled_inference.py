"""Tiled 4K inference: `evaluate.tiling.tiled_logits` against references measured in the same run.

One JSON line per measurement: {"bench", "value", "unit", "reference", "ratio"}, for each model:
- `overhead_<model>`: our seconds per 3840x2160 image against the bare batched forward over the same tiles
  (tiles cut out and batched before the clock starts; only `model(batch)` is timed). Target: ratio <= 1.05.
- `monai_<model>`: ours against MONAI's `sliding_window_inference` (Gaussian blending, same tile size,
  overlap and batch) on the same model and image. Target: ratio <= 1.0 (at least as fast).
- `memory_<model>`: peak memory of our tiled run against feeding all tiles at once (CPU: peak resident set,
  reset before each measurement; GPU: peak allocated). Lower is the point of tiling.
Times are medians of `--repeats` runs after one warm-up run of each method.

Usage: python bench/tiled_inference.py [--models vit_tiny deeplabv3plus_resnet50] [--repeats 3] [--batch 8]
Needs MONAI for the second comparison (`pip install -e ".[bench]"`); without it that line is skipped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from common import emit, median_seconds

from defectforge.config import load_config
from evaluate.cost import InferenceTimer
from evaluate.tiling import tile_grid, tiled_logits
from finetune.config import FinetuneConfig
from pretrain.segmenter import build_segmenter
from synth.compose import SynthConfig, render_sample

REPO = Path(__file__).resolve().parents[1]


@torch.no_grad()
def run(name: str, image: torch.Tensor, args: argparse.Namespace) -> None:
    cfg = load_config(FinetuneConfig, REPO / f"configs/finetune/{name}.yaml", {"crop_size": args.tile})
    model, _ = build_segmenter(cfg, ["background", "crack"])
    model.eval()
    tiles = tile_grid(image.shape[-2], image.shape[-1], args.tile, args.overlap)
    crops = [image[..., y:y + h, x:x + w] for y, x, h, w in tiles]
    batches = [torch.cat(crops[i:i + args.batch]) for i in range(0, len(crops), args.batch)]

    def ours() -> None:
        tiled_logits(model, image, tile=args.tile, overlap=args.overlap, blend="gaussian", batch=args.batch)

    def bare() -> None:
        for batch in batches:
            model(batch)

    t_ours, t_bare = median_seconds(ours, args.repeats), median_seconds(bare, args.repeats)
    emit(f"overhead_{name}", t_ours, "s/image", t_bare, digits=4, tiles=len(tiles), target="<= 1.05")
    try:
        from monai.inferers import sliding_window_inference
    except ImportError:
        print(json.dumps({"bench": f"monai_{name}", "skipped": "monai is not installed (pip install -e .[bench])"}))
    else:
        def monai() -> None:
            sliding_window_inference(image, roi_size=(args.tile, args.tile), sw_batch_size=args.batch,
                                     predictor=model, overlap=args.overlap, mode="gaussian")

        emit(f"monai_{name}", t_ours, "s/image", median_seconds(monai, args.repeats), digits=4, target="<= 1.0")
    tiled_mem, all_mem = InferenceTimer(image.device), InferenceTimer(image.device)
    with tiled_mem.measure():
        ours()
    everything = torch.cat(crops)
    with all_mem.measure():
        model(everything)
    gb = 1024 ** 3
    emit(f"memory_{name}", tiled_mem.peak / gb, "GB peak", all_mem.peak / gb, digits=4,
         increase_gb=round(tiled_mem.increase / gb, 3), all_at_once_increase_gb=round(all_mem.increase / gb, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_tiny", "deeplabv3plus_resnet50"],
                   help="configs/finetune/<name>.yaml")
    p.add_argument("--size", default="2160x3840", help="HxW")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    synth = load_config(SynthConfig, None, {"image_size": [h, w], "seed": 0})
    array, _, _ = render_sample(synth, 0)
    image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float()[None] / 255
    print(json.dumps({"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                                  "device": "cpu"}, "image": [h, w], "tile": args.tile, "overlap": args.overlap,
                      "batch": args.batch}), flush=True)
    for name in args.models:
        run(name, image, args)


if __name__ == "__main__":
    main()
