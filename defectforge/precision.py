"""Numeric precision and memory format of training, chosen for the machine at hand.

`mixed_precision: auto` means bf16 (or fp16) autocast on a GPU. On a CPU the answer depends on the CPU: bf16
autocast is emulated and slower than fp32 on one with AVX2 only, and up to twice as fast on one with AVX-512 bf16
or AMX. So on a CPU `auto` measures: one small convolution + transformer workload, forward and backward, timed in
fp32 and under bf16 autocast; bf16 is used when it is at least `BF16_MIN_SPEEDUP` times faster. The result is
kept per machine (CPU model, its bf16 flags, torch version, threads) in `cache_file()`, so every later run on that
machine, and every process of a distributed run, makes the same choice; each run records it in run_info.json.

Evaluation (`python -m evaluate run`, its own `mixed_precision: auto`) runs inference under the same choice, on
the device it evaluates on: measured for 4K tiled inference on the same CPU, bf16 took ViT-Tiny + DPT from 10.7-12.4
to 7.4-7.5 s and a ResNet-18 U-Net from 13.6 to 7.5-7.8 s per image (docs/evaluate.md, "Precision and layout").

Attention trains with the explicit product (`q @ k^T`, softmax, `@ v`) instead of PyTorch's fused
`scaled_dot_product_attention` where that is measured faster on this CPU (`ATTENTION_MIN_SPEEDUP`): under bf16
autocast the fused CPU kernel's backward pass is slow at the token counts of small crops. Measured for ViT-Tiny +
DPT training steps on a 2-core AMD EPYC with AVX-512 bf16 (torch 2.14.1, one thread): 0.84-0.87x the fused step's
time at 128-512 px crops under bf16, and a tie in fp32 (0.99-1.04x); docs/scaling.md. The probe times one
attention forward + backward at two token counts in both ways, per precision, kept with the precision measurement;
only training uses it (inference keeps the fused kernel: 0.96x in bf16, but 1.36x slower explicit in fp32 at 512 px).

Convolutional networks also train in channels_last memory format (`prefers_channels_last`): a ResNet-18 U-Net step
at 128 px, batch 8, measured 0.46 -> 0.44 s in fp32 and 0.30 -> 0.26 s in bf16 on a 2-core AMD EPYC (AVX-512
bf16); it is the layout oneDNN and cuDNN prefer for convolutions. ViTs, matrix products over tokens, are left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from .files import write_atomic

log = logging.getLogger(__name__)
BF16_MIN_SPEEDUP = 1.2
ATTENTION_MIN_SPEEDUP = 1.2  # explicit attention in training when its probe is this much faster than the fused kernel
_BF16_KEYS = {"fp32_s", "bf16_s", "bf16_speedup"}
_ATTENTION_KEYS = {"attention_speedup_fp32", "attention_speedup_bf16"}
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")  # the values of every `mixed_precision` key
_CHOICE: dict | None = None


def cache_file() -> Path:
    """`$DEFECTFORGE_CACHE` or `$XDG_CACHE_HOME/defectforge` (default ~/.cache/defectforge) / cpu_precision.json."""
    root = os.environ.get("DEFECTFORGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                       Path.home() / ".cache") / "defectforge"
    return Path(root) / "cpu_precision.json"


def cpu_signature() -> str:
    """What the choice depends on: CPU model, its bf16-related flags, torch version, compute threads."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"))
    return f"{model} | {' '.join(wanted) or '-'} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _probe_step(conv: nn.Module, mlp: nn.Module, image: torch.Tensor, tokens: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = conv(image).float().square().mean() + mlp(tokens).float().square().mean()
    loss.backward()


def measure_cpu_bf16(repeats: int = 7) -> dict:
    """Seconds of one forward + backward pass of a small conv stack and transformer MLP, fp32 and bf16.

    The two are timed in alternation and each keeps its fastest pass, so other work on the machine slows
    both alike instead of deciding the comparison."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 48, 3, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
                         nn.Conv2d(48, 96, 3, stride=2, padding=1)).to(memory_format=torch.channels_last)
    mlp = nn.Sequential(nn.Linear(192, 768), nn.GELU(), nn.Linear(768, 192))
    image = torch.rand(4, 3, 96, 96, generator=gen).contiguous(memory_format=torch.channels_last)
    tokens = torch.rand(4, 256, 192, generator=gen)
    best = {"fp32": math.inf, "bf16": math.inf}
    for r in range(repeats + 1):  # the first round warms both up and does not count
        for name in ("fp32", "bf16"):
            t0 = time.perf_counter()
            _probe_step(conv, mlp, image, tokens, name == "bf16")
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return {"fp32_s": best["fp32"], "bf16_s": best["bf16"], "bf16_speedup": best["fp32"] / best["bf16"]}


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool) -> torch.Tensor:
    if fused:
        return nn.functional.scaled_dot_product_attention(q, k, v)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # timm's non-fused path


def measure_cpu_attention(repeats: int = 5) -> dict:
    """Fused-kernel seconds over explicit-product seconds of one attention forward + backward (ViT-Tiny's 3 heads
    of 64, 65 and 257 tokens: 128 and 256 px at patch 16), in fp32 and under bf16 autocast; > 1 means the explicit
    product is faster. Timed in alternation, fastest pass kept, as `measure_cpu_bf16`."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((8, 3, 65, 64), (2, 3, 257, 64))
    qkv = [[torch.rand(*shape, generator=gen, requires_grad=True) for _ in range(3)] for shape in shapes]
    out = {}
    for precision in ("fp32", "bf16"):
        best = {True: math.inf, False: math.inf}
        for r in range(repeats + 1):
            for fused in (True, False):
                t0 = time.perf_counter()
                for q, k, v in qkv:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                        y = _attention(q, k, v, fused)
                    y.float().square().mean().backward()
                if r:
                    best[fused] = min(best[fused], time.perf_counter() - t0)
        out[f"attention_speedup_{precision}"] = best[True] / best[False]
    return out


def decide(measured: dict) -> str:
    return "bf16" if measured["bf16_speedup"] >= BF16_MIN_SPEEDUP else "no"


def cpu_choice() -> dict:
    """The CPU's training precision ("no" = fp32 or "bf16") with the measurement behind it, measured once per
    machine (see the module docstring). In a process of a distributed launch nothing is measured (the processes
    would disturb each other's timing and could disagree): the machine's cached answer, else fp32."""
    global _CHOICE
    sig = cpu_signature()
    if _CHOICE is not None and _CHOICE["signature"] == sig:
        return _CHOICE
    path = cache_file()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(sig) if isinstance(cached, dict) else None
    entry = dict(entry) if isinstance(entry, dict) else {}
    missing = [keys for keys in (_BF16_KEYS, _ATTENTION_KEYS) if not keys <= entry.keys()]
    if not missing:
        choice = {**entry, "used": decide(entry), "source": str(path)}
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        choice = {**entry, "used": decide(entry) if _BF16_KEYS <= entry.keys() else "no",
                  "source": "distributed launch without a (complete) measurement of this machine; run one "
                            "single-process training here once to measure"}
    else:  # measure what the cache lacks (an entry from before the attention probe keeps its bf16 figures)
        for keys in missing:
            measured = measure_cpu_bf16() if keys is _BF16_KEYS else measure_cpu_attention()
            entry.update({k: round(v, 5) for k, v in measured.items()})
        choice = {**entry, "used": decide(entry), "source": "measured now"}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps({**(cached if isinstance(cached, dict) else {}), sig: entry}, indent=2))
        except OSError as err:  # an unwritable cache only costs the measurement next time
            log.warning("could not keep the CPU precision measurement in %s: %s", path, err)
        log.info("CPU precision: bf16 autocast %.2fx the speed of fp32 on this CPU -> %s; explicit attention "
                 "%.2fx the fused kernel's speed in training under it", entry["bf16_speedup"],
                 "bf16" if choice["used"] == "bf16" else "fp32", attention_speedup(choice))
    _CHOICE = {**choice, "signature": sig, "min_speedup": BF16_MIN_SPEEDUP}
    return _CHOICE


def resolve_mixed_precision(value: str, device_type: str | None = None) -> tuple[str, dict]:
    """Accelerate's `mixed_precision` for the config value, and how it was chosen (for run_info.json and the
    evaluation's results.json). `device_type` is the device the work runs on ("cpu", "cuda"); default: CUDA when
    there is one, as Accelerate chooses."""
    if value != "auto":
        return value, {"asked": value, "used": value}
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available()):
        used = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return used, {"asked": "auto", "used": used, "device": "cuda"}
    choice = cpu_choice()
    return choice["used"], {"asked": "auto", "device": "cpu", **choice}


def attention_speedup(precision: dict) -> float:
    """The measured speed of explicit attention over the fused kernel under the precision `precision` (a
    `resolve_mixed_precision` record) uses on a CPU; 1.0 where nothing was measured (a GPU, a forced precision on an
    unmeasured machine)."""
    key = "attention_speedup_bf16" if precision.get("used") == "bf16" else "attention_speedup_fp32"
    return float(precision.get(key) or 1.0)


def use_explicit_attention(model: nn.Module, precision: dict) -> int:
    """Switch timm's attention layers (`fused_attn`) of `model` to the explicit product when this CPU measured it
    at least `ATTENTION_MIN_SPEEDUP` times the fused kernel's speed for training under `precision` (a
    `resolve_mixed_precision` record); returns how many layers were switched (0: none, or none to switch)."""
    if precision.get("device") != "cpu" or attention_speedup(precision) < ATTENTION_MIN_SPEEDUP:
        return 0
    layers = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool) and m.fused_attn]
    for layer in layers:
        layer.fused_attn = False
    return len(layers)


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of an Accelerate `mixed_precision` value ("no": none, fp32)."""
    return {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def prefers_channels_last(model: nn.Module) -> bool:
    """True for a mostly convolutional network, at least half of its weights in 2-d convolutions (ResNet with U-Net
    or DeepLabV3+, HRNet); false for a ViT, also with its DPT decoder or a conv stem, and for ConvNeXt and Swin,
    whose pointwise layers are linear layers on channels-last tensors already."""
    spatial = total = 0
    for module in model.modules():
        for p in module.parameters(recurse=False):
            total += p.numel()
            if isinstance(module, nn.Conv2d) and p.dim() == 4:
                spatial += p.numel()
    return total > 0 and spatial >= 0.5 * total
