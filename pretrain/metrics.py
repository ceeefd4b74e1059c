"""Average precision for multi-label classification (the validation mAP of pretraining)."""

from __future__ import annotations

import math

import numpy as np


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one class: the mean of the precision at the rank of each positive (sklearn's definition).

    Ties are ranked together: all samples sharing a score count as retrieved at once. NaN when there is
    no positive, since AP is undefined then.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets).ravel() > 0.5
    if scores.shape != targets.shape:
        raise ValueError(f"scores {scores.shape} and targets {targets.shape} differ in shape")
    n_pos = int(targets.sum())
    if n_pos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    # last index of each run of equal scores: precision and recall are evaluated only there
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tp = np.cumsum(targets)[last]
    precision = tp / (last + 1)
    recall_gain = np.diff(np.r_[0, tp]) / n_pos
    return float(np.sum(precision * recall_gain))


def multilabel_ap(scores: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    """{"mAP": mean over classes with a positive, "ap": {class: AP or None}} for (N, K) arrays."""
    scores, targets = np.asarray(scores), np.asarray(targets)
    if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != len(classes):
        raise ValueError(f"expected (N, {len(classes)}) scores and targets, got {scores.shape} and {targets.shape}")
    ap = {name: average_precision(scores[:, k], targets[:, k]) for k, name in enumerate(classes)}
    valid = [v for v in ap.values() if not math.isnan(v)]
    return {"mAP": float(np.mean(valid)) if valid else math.nan,
            "ap": {k: (None if math.isnan(v) else v) for k, v in ap.items()}}
