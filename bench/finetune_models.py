"""Fine-tuning model families: parameters, GFLOPs at 512x512 and training images/s on 256 px crops, here.

One JSON line per model: {"bench": "train_<config>", "value": images/s, "unit", "reference": images/s of the
reference model (DeepLabV3+ ResNet-50, measured in the same run), "ratio", "params_m", "trainable_m",
"gflops_512"}, then a markdown table. Training images/s: batch of random 256 px crops, forward, the
shipped loss (cross-entropy + Dice), backward, AdamW step; the median over `--steps` steps after 2 warm-up
steps. GFLOPs: one forward of a 1x3x512x512 input under `torch.utils.flop_counter` (a multiply-add counts 2).

Usage: python bench/finetune_models.py [--models vit_tiny deeplabv3plus_resnet50 ...] [--steps 5] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from evaluate.cost import gflops
from finetune.config import FinetuneConfig
from finetune.models import build_segmenter
from finetune.train import SegLoss
from synth.config import load_config

REPO = Path(__file__).resolve().parents[1]
REFERENCE = "deeplabv3plus_resnet50"
MODELS = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_hybrid_small", "deeplabv3plus_resnet50",
          "deeplabv3plus_resnet152", "unet_resnet50", "hrnet_w18", "convnext_tiny", "swin_tiny"]


def measure(name: str, steps: int, batch: int) -> dict:
    cfg = load_config(FinetuneConfig, REPO / f"configs/finetune/{name}.yaml", {"crop_size": 256, "class_weights": None})
    torch.manual_seed(0)
    model, mcfg = build_segmenter(cfg, ["background", "crack"])
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.eval()
    flops = gflops(model, 512, torch.device("cpu"))
    model.train()
    criterion = SegLoss(cfg, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.rand(batch, 3, 256, 256), torch.randint(0, 2, (batch, 256, 256))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        criterion(model(x), y)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {"name": name, "architecture": mcfg["smp_class"], "encoder": mcfg["model"], "params_m": params / 1e6,
            "trainable_m": trainable / 1e6, "gflops_512": flops, "images_per_s": batch / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=MODELS)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args()
    names = [REFERENCE] + [m for m in args.models if m != REFERENCE]
    rows = []
    for name in names:
        row = measure(name, args.steps, args.batch_size)
        rows.append(row)
        ref = rows[0]["images_per_s"]
        print(json.dumps({"bench": f"train_{name}", "value": round(row["images_per_s"], 3), "unit": "images/s",
                          "reference": round(ref, 3), "ratio": round(row["images_per_s"] / ref, 3),
                          "params_m": round(row["params_m"], 2), "trainable_m": round(row["trainable_m"], 2),
                          "gflops_512": round(row["gflops_512"], 1), "threads": torch.get_num_threads()}), flush=True)
    print("\n| config | architecture | encoder | params (M) | GFLOPs @512 | train images/s @256 | vs DeepLabV3+ R50 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['architecture']} | {r['encoder']} | {r['params_m']:.1f} | {r['gflops_512']:.1f} | "
              f"{r['images_per_s']:.2f} | {r['images_per_s'] / rows[0]['images_per_s']:.2f} |")


if __name__ == "__main__":
    main()
