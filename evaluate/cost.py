"""What a model costs: parameters, FLOPs per tile, seconds per 4K image and peak memory, measured here.

Peak memory: on a GPU, CUDA's peak allocated bytes (reset before the measurement); on a CPU, the process's
peak resident set (Linux `VmHWM`, reset through `/proc/self/clear_refs` before the measurement), reported
both as the absolute peak and as the increase over the resident set just before inference.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import resource
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .tiling import tile_grid, tiled_logits

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


def time_inference(model: torch.nn.Module, image: torch.Tensor, *, tile: int, overlap: float, blend: str, batch: int,
                   repeats: int, warmup: int, accumulate: str | None = None, whole: bool = False) -> dict:
    """Median seconds per image (after `warmup` untimed runs), tiles/s, and peak memory of the timed runs."""
    device = image.device

    def once() -> None:
        if whole:
            model(image)
        else:
            tiled_logits(model, image, tile=tile, overlap=overlap, blend=blend, batch=batch, accumulate=accumulate)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.no_grad():
        for _ in range(warmup):
            once()
        base = _reset_peak(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        peak = _peak(device)
    h, w = image.shape[-2:]
    n_tiles = 1 if whole else len(tile_grid(h, w, tile, overlap))
    median = statistics.median(times)
    return {"seconds_per_image": median, "seconds_all": times, "tiles": n_tiles, "tiles_per_s": n_tiles / median,
            "peak_memory_bytes": int(peak), "memory_increase_bytes": int(max(0, peak - base)),
            "memory_kind": "cuda_peak_allocated" if device.type == "cuda" else "peak_rss",
            "image_size": [int(h), int(w)]}
