"""Pretraining throughput: the full loop against a bare loop, and the reader against what training consumes.

One JSON line per measurement: {"bench", "value", "unit", "reference", "ratio"}, for each image size:
- `loop_<size>`: images/s of `pretrain.train.train` (shards -> decode and crop in the loader workers ->
  kornia augmentation -> CutMix -> forward/backward/AdamW), taken from the `images_per_s` it logs to
  `metrics.jsonl` (time of the optimizer steps including the wait for data; validation and checkpoints
  excluded; the first log window is dropped as warm-up). Reference: a bare loop with the same model, batch,
  optimizer and losses on in-memory random tensors (no data, no augmentation, no mixing). Target >= 0.85.
- `reader_<size>`: images/s the data path alone delivers (`pretrain.data.train_loader`, same workers),
  against the images/s the training loop consumes (the `loop_` value). Target >= 2.
Both sides of each ratio run in this process, one after the other, with the same torch thread count.

Usage: python bench/pretrain_throughput.py [--sizes 128 224] [--steps 30] [--batch-size 32] [--num-workers 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import PretrainConfig
from pretrain.data import train_loader
from pretrain.tracking import read_metrics
from pretrain.train import build_model, param_groups, train
from synth.compose import SynthConfig
from synth.config import load_config
from synth.generate import generate


def emit(bench: str, value: float, unit: str, reference: float, **extra) -> None:
    print(json.dumps({"bench": bench, "value": round(value, 3), "unit": unit, "reference": round(reference, 3),
                      "ratio": round(value / reference, 3), **extra}), flush=True)


def bare_loop(cfg: PretrainConfig, classes: list[str], steps: int) -> float:
    """Images/s of forward/backward/AdamW on in-memory tensors (median over steps, after 2 warm-up steps)."""
    torch.manual_seed(0)
    net, _ = build_model(cfg, classes)
    net.train()
    optimizer = torch.optim.AdamW(param_groups(net, cfg), lr=cfg.lr)
    k = len(classes) - 1
    images = torch.rand(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    labels = torch.rand(cfg.batch_size, k)
    masks = torch.randint(0, k + 1, (cfg.batch_size, cfg.img_size, cfg.img_size))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        out = net(images)
        loss = F.binary_cross_entropy_with_logits(out["logits"], labels) + F.cross_entropy(out["dense"], masks)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return cfg.batch_size / statistics.median(times)


def reader_rate(shards: Path, cfg: PretrainConfig, batches: int) -> float:
    loader = train_loader(str(shards), "train", img_size=cfg.img_size, batch_size=cfg.batch_size, batches=batches,
                          world_size=1, num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer, seed=0, epoch=0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    start = time.perf_counter()
    n = 0
    for _ in range(batches - 1):
        n += next(it)["image"].shape[0]
    return n / (time.perf_counter() - start)


def run(size: int, args: argparse.Namespace, workdir: Path) -> None:
    shards = workdir / f"shards-{size}"
    generate(load_config(SynthConfig, None, {"num_samples": 256, "image_size": size, "shard_size": 32,
                                             "val_ratio": 0.0, "workers": 0}), shards, progress=False)
    overrides = {"model": args.model, "img_size": size, "batch_size": args.batch_size, "max_steps": args.steps,
                 "warmup_steps": 1, "log_every": max(1, args.steps // 5), "checkpoint_every": args.steps,
                 "val_split": None, "num_workers": args.num_workers, "wandb": False}
    cfg = load_config(PretrainConfig, None, overrides)
    run_dir = workdir / f"run-{size}"
    train(cfg, str(shards), run_dir, progress=False)
    windows = [r["images_per_s"] for r in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in r][1:]
    loop = statistics.median(windows)
    classes = json.loads((shards / "_info.json").read_text())["classes"]
    bare = bare_loop(cfg, classes, args.steps)
    emit(f"loop_{size}", loop, "images/s", bare, model=args.model, batch=args.batch_size,
         num_workers=args.num_workers, threads=torch.get_num_threads(), target=">= 0.85")
    reader = reader_rate(shards, cfg, args.reader_batches)
    emit(f"reader_{size}", reader, "images/s", loop, num_workers=args.num_workers, target=">= 2")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--reader-batches", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            run(size, args, Path(tmp))


if __name__ == "__main__":
    main()
