"""What every benchmark script shares: the JSON line it prints, the median timing of a call, and the CPU share
of other processes while it measured (`CpuShare`, psutil from the bench extra).

The scripts run as `python bench/<name>.py`, so this folder is on `sys.path` and they import it as `common`.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


def emit(bench: str, value: float, unit: str, reference: float, digits: int = 3, **extra) -> None:
    """One measurement as a JSON line: {"bench", "value", "unit", "reference", "ratio", ...extra}; the
    reference is measured in the same run, so the ratio is the figure to compare across machines."""
    print(json.dumps({"bench": bench, "value": round(value, digits), "unit": unit,
                      "reference": round(reference, digits), "ratio": round(value / reference, max(digits, 3)),
                      **extra}), flush=True)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median wall time of `repeats` calls of `fn`, after one untimed call when `warmup`."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass
class CpuShare:
    """CPU used by this process tree and by the whole machine between `start()` and `stop()`."""

    wall: float = 0.0
    ours: float = 0.0
    machine: float = 0.0

    @staticmethod
    def _ours() -> float:
        import psutil  # the bench extra

        me = psutil.Process()
        t = me.cpu_times()  # children_*: workers already joined
        total = t.user + t.system + t.children_user + t.children_system
        for child in me.children(recursive=True):  # workers still alive
            try:
                c = child.cpu_times()
                total += c.user + c.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _machine() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def start(self) -> CpuShare:
        self._t0, self._o0, self._m0 = time.perf_counter(), self._ours(), self._machine()
        return self

    def stop(self) -> CpuShare:
        self.wall = time.perf_counter() - self._t0
        self.ours = self._ours() - self._o0
        self.machine = self._machine() - self._m0
        return self

    @property
    def other(self) -> float:
        """Share of the machine (all cores) used by other processes."""
        return max(0.0, self.machine - self.ours) / max(1e-9, self.wall * (os.cpu_count() or 1))
