"""Fine-tuning model families: parameters, GFLOPs at 512x512 and training images/s on 256 px crops, here.

Every `configs/finetune/*.yaml` except quickstart, built as `python -m finetune` builds it (crop_size=256,
2 classes: background, crack). One JSON line per measurement, {"bench", "value", "unit", "reference",
"ratio", ...}, the reference being DeepLabV3+ ResNet-50 (`deeplabv3plus_resnet50`) measured in the same run:
- `params_<config>`: parameters (millions; "trainable_m" also given: a ViT's final norm never reaches the
  DPT decoder and is not trained).
- `gflops512_<config>`: GFLOPs of one forward of a 1x3x512x512 input, counted by
  `torch.utils.flop_counter.FlopCounterMode` (a multiply-add counts as 2 FLOPs).
- `train256_<config>`: training images/s on random 256 px crops: forward, the config's loss (`SegLoss`:
  cross-entropy + Dice), backward, AdamW step; the median over `--steps` timed steps after `--warmup` steps
  (models above `--large-params` million parameters take `--large-steps` timed steps).
Then a markdown table. torch uses one thread per available core.

Usage: python bench/finetune_models.py [--models vit_tiny hrnet_w18 ...] [--steps 5] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from pathlib import Path

import torch
from common import emit
from torch.utils.flop_counter import FlopCounterMode

from defectforge.config import load_config
from finetune.config import FinetuneConfig
from pretrain.segmenter import SegLoss, build_segmenter

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "finetune"
REFERENCE = "deeplabv3plus_resnet50"
REFERENCE_NAME = "DeepLabV3+ ResNet-50, same run"
MODELS = ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_hybrid_small", "deeplabv3plus_resnet50",
          "deeplabv3plus_resnet152", "unet_resnet50", "hrnet_w18", "convnext_tiny", "swin_tiny"]
CLASSES = ["background", "crack"]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@torch.no_grad()
def forward_gflops(model: torch.nn.Module, side: int) -> float:
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.randn(1, 3, side, side))
    return counter.get_total_flops() / 1e9


def train_rate(model: torch.nn.Module, cfg: FinetuneConfig, batch: int, crop: int, warmup: int,
               steps: int) -> tuple[float, list[float]]:
    """Median training images/s over `steps` timed forward/loss/backward/AdamW steps after `warmup` steps."""
    model.train()
    criterion = SegLoss(cfg, len(CLASSES))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, len(CLASSES), (batch, crop, crop))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        criterion(model(x), y)["loss"].backward()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times), times


def measure(name: str, args: argparse.Namespace) -> dict:
    cfg = load_config(FinetuneConfig, CONFIGS / f"{name}.yaml", {"crop_size": args.crop})
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, mcfg = build_segmenter(cfg, CLASSES)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = forward_gflops(model, args.flops_size)
    steps = args.large_steps if params > args.large_params * 1e6 else args.steps
    rate, times = train_rate(model, cfg, args.batch_size, args.crop, args.warmup, steps)
    del model
    gc.collect()
    return {"name": name, "architecture": mcfg["smp_class"], "encoder": mcfg["model"], "params_m": params / 1e6,
            "trainable_m": trainable / 1e6, "gflops": flops, "images_per_s": rate, "steps": steps,
            "step_s": [round(t, 3) for t in times], "build_s": build_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=MODELS, choices=MODELS, metavar="CONFIG",
                   help=f"configs/finetune/ names (default: all of {', '.join(MODELS)}); the reference "
                        f"{REFERENCE} is always measured first")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per model (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps before the timed ones")
    p.add_argument("--large-steps", type=int, default=3, help="timed steps for models above --large-params")
    p.add_argument("--large-params", type=float, default=100.0, help="millions of parameters")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--crop", type=int, default=256, help="training crop side (px)")
    p.add_argument("--flops-size", type=int, default=512, help="side of the 1x3xSxS input whose forward is counted")
    args = p.parse_args()
    torch.set_num_threads(cores())

    names = [REFERENCE] + [m for m in dict.fromkeys(args.models) if m != REFERENCE]
    rows: list[dict] = []
    for name in names:
        row = measure(name, args)
        rows.append(row)
        ref = rows[0]
        info = {"reference_name": REFERENCE_NAME, "architecture": row["architecture"], "encoder": row["encoder"]}
        emit(f"params_{name}", row["params_m"], "M params", ref["params_m"], trainable_m=round(row["trainable_m"], 3),
             **info)
        emit(f"gflops{args.flops_size}_{name}", row["gflops"], "GFLOPs", ref["gflops"], digits=2,
             input=f"1x3x{args.flops_size}x{args.flops_size}", **info)
        emit(f"train{args.crop}_{name}", row["images_per_s"], "images/s", ref["images_per_s"],
             batch_size=args.batch_size, steps=row["steps"], warmup=args.warmup, step_s=row["step_s"],
             threads=torch.get_num_threads(), **info)

    ref = rows[0]["images_per_s"]
    print(f"\n| config | architecture | encoder | params (M) | trainable (M) | GFLOPs @{args.flops_size} "
          f"| train images/s @{args.crop} | vs DeepLabV3+ R50 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['architecture']} | {r['encoder']} | {r['params_m']:.1f} | {r['trainable_m']:.1f} "
              f"| {r['gflops']:.1f} | {r['images_per_s']:.2f} | {r['images_per_s'] / ref:.2f} |")


if __name__ == "__main__":
    main()
