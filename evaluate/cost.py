"""What a model costs: parameters, FLOPs per tile, seconds per 4K image and peak memory, measured here.

Peak memory: on a GPU, CUDA's peak allocated bytes (reset before the measurement); on a CPU, the process's
peak resident set (Linux `VmHWM`, reset through `/proc/self/clear_refs` before the measurement), reported
both as the absolute peak and as the increase over the resident set just before inference.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from defectforge.tiling import tile_grid, tiled_logits

from .records import Timing

log = logging.getLogger(__name__)


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: torch.nn.Module, side: int, device: torch.device) -> float:
    """Forward GFLOPs of one `side` x `side` tile (a multiply-add counts as 2 FLOPs, as FlopCounterMode does)."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, side, side, device=device))
    return counter.get_total_flops() / 1e9


def _rss_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux)
    return (_rss_kb("VmRSS") or 0) * 1024


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    hwm = _rss_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(q1, median, q3) with linear interpolation (numpy's default)."""
    v = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(v) - 1)
        lo = math.floor(pos)
        return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


class InferenceTimer:
    """Wall time and peak memory of each measured inference (`with timer.measure(): ...`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []
        self.memory: list[int] = []  # per run: CUDA peak allocated, or the peak RSS increase over the RSS before
        self.peak, self.increase = 0, 0

    @contextlib.contextmanager
    def measure(self):
        base = _reset_peak(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.times.append(time.perf_counter() - start)
        peak = _peak(self.device)
        self.memory.append(int(peak if self.device.type == "cuda" else max(0, peak - base)))
        self.peak, self.increase = max(self.peak, peak), max(self.increase, peak - base)

    def summary(self, tiles: int, image_size: tuple[int, int] | list[int], source: str = "") -> Timing:
        q1, median, q3 = quartiles(self.times)
        return Timing(seconds_per_image=median, seconds_all=list(self.times), seconds_min=min(self.times),
                      seconds_max=max(self.times), seconds_q1=q1, seconds_q3=q3, tiles=tiles,
                      tiles_per_s=tiles / median, peak_memory_bytes=int(self.peak),
                      memory_increase_bytes=int(max(0, self.increase)), memory_runs=list(self.memory),
                      memory_kind="cuda_peak_allocated" if self.device.type == "cuda" else "peak_rss",
                      image_size=[int(v) for v in image_size], source=source, rounds=len(self.times))


def time_interleaved(runs: dict[str, Callable[[], None]], device: torch.device, *, repeats: int,
                     warmup: int, warm: dict[str, Callable[[], None]] | None = None,
                     timers: dict[str, InferenceTimer] | None = None) -> dict[str, InferenceTimer]:
    """Time every entry of `runs` in alternation: `warmup` untimed rounds, then timed rounds, each calling A, B,
    C, ... once, until every entry has `repeats` timed runs, so that a slow phase of a shared machine falls on every
    model alike. `warm` gives, per entry, what its untimed rounds call instead (a cheaper call of the same shapes).
    `timers` holds runs an entry already had, timed the same way (evaluate: the accuracy pass over the timed image,
    its first round); such an entry is warm and gets that many fewer rounds."""
    timers = {name: (timers or {}).get(name) or InferenceTimer(device) for name in runs}
    with torch.no_grad():
        for _ in range(warmup):
            for name, once in runs.items():
                if not timers[name].times:
                    (warm or {}).get(name, once)()
        for _ in range(repeats):
            for name, once in runs.items():
                if len(timers[name].times) < repeats:
                    with timers[name].measure():
                        once()
    return timers


def time_inference(model: torch.nn.Module, image: torch.Tensor, *, tile: int, overlap: float, blend: str, batch: int,
                   repeats: int, warmup: int, accumulate: str | None = None, whole: bool = False) -> Timing:
    """One model alone: median seconds per image (after `warmup` untimed runs), tiles/s and peak memory."""

    def once() -> None:
        if whole:
            model(image)
        else:
            tiled_logits(model, image, tile=tile, overlap=overlap, blend=blend, batch=batch, accumulate=accumulate)

    timer = time_interleaved({"model": once}, image.device, repeats=repeats, warmup=warmup)["model"]
    h, w = image.shape[-2:]
    return timer.summary(1 if whole else len(tile_grid(h, w, tile, overlap)), (h, w))
