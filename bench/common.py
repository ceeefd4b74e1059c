"""What every benchmark script shares: the JSON line it prints and the median timing of a call.

The scripts run as `python bench/<name>.py`, so this folder is on `sys.path` and they import it as `common`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable


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
