"""Pretraining throughput: the full training loop against a bare loop, and the reader against what training uses.

One JSON line per measurement, {"bench", "value", "unit", "reference", "ratio", ...}, for each image size:

- `loop_<size>`: images/s of the real `pretrain.train.train` (shards -> decode and square crop in the
  DataLoader workers -> augmentation on the device -> labels -> CutMix -> normalise -> forward / backward / clipping /
  AdamW / schedule). Reference: a bare loop with the same model (`pretrain.train.build_model`), batch size,
  AdamW parameter groups, clipping and losses (BCE on the logits + dense cross-entropy) on in-memory random
  tensors of the same shapes: no data, no augmentation, no mixing. Target: ratio >= 0.85.
- `reader_<size>`: images/s the data path alone delivers (`defectforge.data.train_loader` with the loop's
  `num_workers`, shuffle buffer and crops, no model). Reference: the images/s the loop consumes (the `loop_`
  value). Target: ratio >= 2.

How each figure is timed:
- The loop figure comes from the `images_per_s` values `train()` writes to RUN/metrics.jsonl rather than from
  timing `train()` from outside: each window times its optimizer steps from before the batch is fetched
  (so a data stall counts) to after the schedule step, and leaves out what is not steady-state training
  (model build, shard probing, the final checkpoint and weights save; validation is off). The first log
  window is dropped as warm-up (DataLoader worker start-up, first allocations, the CutMix grid PNG); the
  remaining windows are combined as total images / total time. Config: wandb=false, val_split=null,
  checkpoint_every larger than the run (one data epoch, so the workers start once), log_every = steps // 8.
- The bare loop drops the same number of warm-up steps (one log window) and is timed as total images / total
  time over the rest, so both sides of the ratio use the same statistic.
- The reader drops its first batch (worker start-up) and times the next `steps` batches (at least 20).
- torch uses `--threads` intra-op threads (default: what torch picked at start-up, one per core), set before
  every measurement and checked after it. DataLoader workers run one thread each (torch's default), on the
  same cores: on a 2-core machine they compete with the two compute threads.
- Shards are generated in a temporary folder with `synth.generate.generate` (256 JPEG samples at
  `size + size // 4`, so the loader's random square crop has room to move, as with real larger images).

Other processes on a shared machine distort every figure: each line carries `other_cpu`, the share of the
machine's CPU that processes outside this one (and its workers) used while it was measured (psutil).
A value above ~0.05 means the figure is not trustworthy; rerun on a quiet machine.

Repeats: a shared VM's speed drifts by several percent within minutes, so the loop and the bare loop are
measured `--repeats` times (3), each loop followed by its bare run; the `loop_` line gives the pair with the
median ratio and lists every ratio (`ratios`). The reader runs once, against that median loop.

Usage: python bench/pretrain_throughput.py [--sizes 128 224] [--steps N] [--batch-size 32] [--model vit_tiny]
       [--objective classification|segmentation|mae] [--num-workers 1] [--threads T] [--repeats 3]
With `--objective segmentation` both sides train the segmentation network (`pretrain/segmenter.py`: encoder,
decoder, head and the auxiliary label head) with `SegLoss` + the auxiliary BCE; class weights off (`auto` would
read the shards before training, outside the timed windows anyway). With `--objective mae` both sides train the
MAE network (`pretrain/mae.py`). Both sides run at the precision and memory format the loop chooses for this
machine (`defectforge/precision.py`: bf16 autocast where measured faster, channels_last for CNNs).
Default steps per size: max(30, round(80 * (128 / size) ** 2)), i.e. 80 at 128 px and 30 at 224 px
(about 10 minutes in all with 3 repeats on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import CpuShare, emit
from timm.optim import param_groups_weight_decay

from defectforge.config import load_config
from defectforge.data import train_loader
from defectforge.precision import prefers_channels_last, resolve_mixed_precision
from defectforge.tracking import read_metrics
from defectforge.training import adamw
from pretrain.config import PretrainConfig
from pretrain.segmenter import SegLoss, build_segmenter
from pretrain.train import build_mae, build_model, mae_param_groups, param_groups, train
from synth.config import SynthConfig
from synth.generate import generate

NUM_SAMPLES = 256
NOISY = 0.05  # other processes above this share of the machine's CPU make a figure untrustworthy


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def check_threads(threads: int, what: str) -> None:
    if torch.get_num_threads() != threads:
        print(f"# warning: {what} left torch with {torch.get_num_threads()} threads instead of {threads}; reset",
              file=sys.stderr)
        torch.set_num_threads(threads)


def loop_rate(cfg: PretrainConfig, shards: Path, run_dir: Path) -> tuple[float, int, CpuShare]:
    """Images/s of `train()` from its metrics.jsonl windows, the first one dropped; (rate, timed steps, cpu)."""
    cpu = CpuShare().start()
    train(cfg, str(shards), run_dir, progress=False)
    cpu.stop()
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "images_per_s" in r]
    images = seconds = 0.0
    steps, previous = 0, 0
    for i, row in enumerate(rows):
        n = row["step"] - previous
        previous = row["step"]
        if i == 0:
            continue  # warm-up window
        window_images = n * cfg.batch_size * cfg.grad_accum
        images += window_images
        seconds += window_images / row["images_per_s"]
        steps += n
    if steps == 0:
        raise SystemExit(f"only {len(rows)} log window(s) in {run_dir}/metrics.jsonl: raise --steps")
    return images / seconds, steps, cpu


def bare_rate(cfg: PretrainConfig, classes: list[str], steps: int, warmup: int) -> tuple[float, CpuShare]:
    """Images/s of forward / losses / backward / clip / AdamW on fixed random tensors (no data, no augmentation).

    The same network and losses as the objective's task: classification (`build_model`: BCE on the logits +
    dense cross-entropy) or segmentation (`build_segmenter` with the auxiliary label head: `SegLoss` + the
    weighted BCE), with the same AdamW parameter groups."""
    torch.manual_seed(cfg.seed)
    k, b, s = len(classes) - 1, cfg.batch_size, cfg.crop_size
    images = torch.rand(b, 3, s, s)
    labels = (torch.rand(b, k) < 0.5).float()
    masks = torch.randint(0, k + 1, (b, s, s))
    if cfg.objective == "mae":
        net, _ = build_mae(cfg, classes)
        groups = mae_param_groups(net, cfg)

        def losses() -> torch.Tensor:
            return net(images)["loss"]
    elif cfg.objective == "segmentation":
        net, _ = build_segmenter(cfg, classes, encoder_kwargs=dict(cfg.model_kwargs), aux_head=cfg.aux_weight > 0)
        groups = param_groups_weight_decay(net, weight_decay=cfg.weight_decay)
        criterion = SegLoss(cfg, len(classes))

        def losses() -> torch.Tensor:
            out = net(images)
            logits, label_logits = out if isinstance(out, tuple) else (out, None)
            loss = criterion(logits, masks)["loss"]
            if label_logits is not None:
                loss = loss + cfg.aux_weight * F.binary_cross_entropy_with_logits(label_logits.float(), labels)
            return loss
    else:
        net, _ = build_model(cfg, classes)
        groups = param_groups(net, cfg)

        def losses() -> torch.Tensor:
            out = net(images)
            bce = F.binary_cross_entropy_with_logits(out["logits"].float(), labels)
            dense = F.cross_entropy(out["dense"].float(), masks) if "dense" in out else bce.new_zeros(())
            return bce + cfg.dense_weight * dense
    net.train()
    # the precision and memory format the loop chose (defectforge/precision.py), so both sides do the same work
    bf16 = resolve_mixed_precision(cfg.mixed_precision)[0] == "bf16"
    if prefers_channels_last(net):
        net = net.to(memory_format=torch.channels_last)
    optimizer = adamw(groups, cfg.lr)  # the loop's optimizer, so both sides do the same work

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = losses()
        loss.backward()
        if cfg.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    cpu = CpuShare().start()
    for _ in range(steps):
        step()
    cpu.stop()
    return steps * b / cpu.wall, cpu


def reader_rate(cfg: PretrainConfig, shards: Path, classes: list[str], batches: int) -> tuple[float, CpuShare]:
    """Images/s of `train_loader` alone (same workers, crops and shuffle as the loop); first batch dropped."""
    loader = train_loader(str(shards), cfg.train_split, img_size=cfg.crop_size, batch_size=cfg.batch_size,
                          batches=batches + 1, world_size=1, num_workers=cfg.num_workers,
                          shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, epoch=0, classes=classes)
    it = iter(loader)
    next(it)
    cpu = CpuShare().start()
    n = sum(next(it)["image"].shape[0] for _ in range(batches))
    cpu.stop()
    del it
    return n / cpu.wall, cpu


def default_steps(size: int) -> int:
    return max(30, round(80 * (128 / size) ** 2))


def run(size: int, args: argparse.Namespace, workdir: Path) -> None:
    steps = args.steps or default_steps(size)
    log_every = max(2, steps // 8)
    shard_size = size + size // 4
    shards = workdir / f"shards-{size}"
    generate(load_config(SynthConfig, None, {"num_samples": NUM_SAMPLES, "image_size": shard_size,
                                             "shard_size": NUM_SAMPLES // 4, "val_ratio": 0.0, "workers": 0}),
             shards, progress=False)
    classes = json.loads((shards / "_info.json").read_text())["classes"]
    cfg = load_config(PretrainConfig, None, {
        "name": f"bench-{size}", "model": args.model, "crop_size": size, "batch_size": args.batch_size,
        "max_steps": steps, "warmup_steps": min(10, steps - 1), "log_every": log_every,
        "checkpoint_every": 10 * steps, "val_split": None, "num_workers": args.num_workers, "wandb": False,
        "objective": args.objective, **({"class_weights": None} if args.objective == "segmentation" else {})})
    common = {"model": args.model, "objective": args.objective, "batch": args.batch_size,
              "shard_image_size": shard_size, "num_workers": args.num_workers, "threads": args.threads}
    size = {"segmentation": f"seg_{size}", "mae": f"mae_{size}"}.get(args.objective, size)  # the lines' names

    set_threads(args.threads)
    pairs = []  # (loop, bare, timed steps, other_cpu) per repeat; each ratio from one loop and the bare run after it
    for r in range(args.repeats):
        loop, timed, loop_cpu = loop_rate(cfg, shards, workdir / f"run-{size}-{r}")
        check_threads(args.threads, "train()")
        bare, bare_cpu = bare_rate(cfg, classes, timed, warmup=log_every)
        check_threads(args.threads, "the bare loop")
        pairs.append((loop, bare, timed, max(loop_cpu.other, bare_cpu.other)))
    ratios = [p[0] / p[1] for p in pairs]
    loop, bare, timed, other = pairs[sorted(range(len(pairs)), key=ratios.__getitem__)[len(pairs) // 2]]
    emit(f"loop_{size}", loop, "images/s", bare, reference_name="bare forward/backward/AdamW on random tensors",
         steps=steps, timed_steps=timed, **common, repeats=args.repeats, ratios=[round(x, 3) for x in ratios],
         other_cpu=round(max(p[3] for p in pairs), 3), target=">= 0.85 (the median repeat)",
         met=loop / bare >= 0.85)
    other = max(p[3] for p in pairs)
    if other > NOISY:
        print(f"# warning: other processes used {other:.0%} of the CPU during loop_{size}", file=sys.stderr)

    reader, reader_cpu = reader_rate(cfg, shards, classes, max(20, steps))
    check_threads(args.threads, "the reader")
    emit(f"reader_{size}", reader, "images/s", loop, reference_name="images/s the training loop consumes",
         batches=max(20, steps), **common, other_cpu=round(reader_cpu.other, 3), target=">= 2",
         met=reader / loop >= 2)
    if reader_cpu.other > NOISY:
        print(f"# warning: other processes used {reader_cpu.other:.0%} of the CPU during reader_{size}",
              file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[128, 224])
    p.add_argument("--model", default="vit_tiny")
    p.add_argument("--objective", default="classification", choices=("classification", "segmentation", "mae"),
                   help="what is pretrained: the classification backbone or the whole segmentation network "
                        "(lines named loop_seg_<size>, reader_seg_<size>)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps of the loop per size (default: 80 at 128 px, 30 at 224 px)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=PretrainConfig.num_workers,
                   help="DataLoader workers of the loop and the reader (default: the PretrainConfig default)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=3,
                   help="loop + bare pairs per size; the line shows the median pair and lists every ratio")
    args = p.parse_args()
    if args.steps is not None and args.steps < 4:
        p.error("--steps must be >= 4 (a warm-up window and at least one timed one)")
    print(f"# {platform.node()}: nproc {os.cpu_count()}, torch {torch.__version__}, threads {args.threads}, "
          f"num_workers {args.num_workers}", file=sys.stderr)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, size in enumerate(args.sizes):
            workdir = Path(tmp) / str(i)  # a fresh folder per size: `generate` would resume into an existing one
            workdir.mkdir()
            run(size, args, workdir)
    print(f"# total {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
