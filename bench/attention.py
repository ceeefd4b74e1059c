"""Training with timm's attention as the explicit product against PyTorch's fused kernel, on this CPU.

A ViT + DPT training step (forward, `SegLoss`, backward, fused AdamW) timed with every attention layer's
`fused_attn` on (the reference, measured in the same run) and off, in alternation: `--rounds` rounds of `--steps`
steps each way, the median round kept. One JSON line per setting, {"bench": "train_step_<model>_<crop>_<precision>",
"value": explicit s/step, "reference": fused s/step, "ratio"}; a ratio below 1 means the explicit product trains
faster. Then the probe training decides with (defectforge/precision.py `measure_cpu_attention`), for comparison.
The CPU's model and flags are printed first; torch uses `--threads` threads.

Usage: python bench/attention.py [--models vit_tiny vit_small] [--crops 128:8 192:4 256:2 512:1]
       [--precisions bf16 fp32] [--threads 1] [--rounds 3] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from common import emit

from defectforge.config import load_config
from defectforge.precision import cpu_signature, measure_cpu_attention
from defectforge.training import adamw
from finetune.config import FinetuneConfig
from pretrain.segmenter import SegLoss, build_segmenter


def step_seconds(model_name: str, crop: int, batch: int, bf16: bool, rounds: int, steps: int) -> dict[bool, float]:
    """Median seconds per training step with the fused kernel (True) and the explicit product (False)."""
    cfg = load_config(FinetuneConfig, overrides=[f"model={model_name}", f"crop_size={crop}", "class_weights=null"])
    model, _ = build_segmenter(cfg, ["background", "crack", "stain"])
    model.train()
    loss_fn = SegLoss(cfg, 3)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], 1e-4)
    layers = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, crop, crop, generator=gen)
    y = torch.randint(0, 3, (batch, crop, crop), generator=gen)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step() -> None:
        with autocast():
            out = model(x)
        loss = loss_fn(out, y)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(rounds + 1):  # the first round warms both up and does not count
        for fused in (True, False):
            for layer in layers:
                layer.fused_attn = fused
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if r:
                times[fused].append((time.perf_counter() - start) / steps)
    return {fused: statistics.median(t) for fused, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_tiny"])
    p.add_argument("--crops", nargs="+", default=["128:8", "192:4", "256:2", "512:1"], help="crop:batch")
    p.add_argument("--precisions", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {cpu_signature()}", flush=True)
    for precision in args.precisions:
        for model_name in args.models:
            for spec in args.crops:
                crop, batch = (int(v) for v in spec.split(":"))
                s = step_seconds(model_name, crop, batch, precision == "bf16", args.rounds, args.steps)
                emit(f"train_step_{model_name}_{crop}_{precision}", s[False], "s/step", s[True], batch=batch,
                     reference_name="fused attention kernel, same run")
    probe = measure_cpu_attention()
    for precision in ("fp32", "bf16"):
        speedup = probe[f"attention_speedup_{precision}"]
        emit(f"probe_{precision}", 1 / speedup, "explicit / fused time", 1.0,
             note="the probe defectforge.precision.measure_cpu_attention; training switches at ratio <= 1/1.2")


if __name__ == "__main__":
    main()
