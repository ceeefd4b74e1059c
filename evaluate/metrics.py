"""Evaluation metrics over a dataset of full-size predictions.

- per class: IoU, Dice/F1, precision, recall (argmax prediction; confusion matrix from `pretrain.metrics`);
- "defect vs background" with the defect probability `1 - p(background)`, at thresholds `k / thresholds`:
  ODS (best F1 with one threshold for the dataset) and OIS (best threshold per image, averaged), with a pixel
  tolerance as crack papers use (a predicted pixel within `tolerance` px of a true one counts as correct, and
  a true pixel within `tolerance` px of a predicted one counts as found);
- pixel AP (precision-recall area over pixels, from 100-bin histograms), image-level AP for "defect present"
  (score: the image's highest defect probability);
- error near tile seams against error elsewhere (pixels where the argmax disagrees with the truth);
- each image's own confusion matrix (`image_confusion`), so that two models evaluated on the same images can
  be compared with a paired bootstrap over images (`miou_difference`; `mean_difference` for per-image scores
  such as the interpretability scores) instead of one number each.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.metrics import SegMetrics, average_precision, class_argmax


def max_filter(values: torch.Tensor, radius: int) -> torch.Tensor:
    """Float (H, W): each pixel's maximum over the (2 * radius + 1)^2 square around it (the image only)."""
    if radius <= 0:
        return values
    return F.max_pool2d(values[None, None], 2 * radius + 1, stride=1, padding=radius)[0, 0]


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Bool (H, W): the pixels within `radius` px (chessboard distance) of a True pixel of `mask`."""
    if radius <= 0:
        return mask
    return max_filter(mask.float(), radius) > 0


def threshold_counts(defect: torch.Tensor, truth: torch.Tensor, thresholds: int, tolerance: int) -> torch.Tensor:
    """(4, thresholds) float64 counts at each threshold t_k = (k + 0.5) / thresholds of the defect probability
    map `defect` (H, W) against the bool `truth` (H, W): predicted pixels (defect >= t_k), predicted pixels within
    `tolerance` px of a true one, true pixels, true pixels within `tolerance` px of a predicted one.

    The same numbers as thresholding `thresholds` times and dilating each prediction, in one pass: the predictions
    are nested (a higher threshold keeps a subset), each pixel is binned by how many thresholds it reaches and the
    bins are summed from the top; and a dilated prediction is the threshold of the max-filtered map (a pixel lies
    within `tolerance` px of a pixel >= t exactly when the window's maximum is >= t).
    """
    edges = ((torch.arange(thresholds, dtype=torch.float64) + 0.5) / thresholds).to(defect.dtype)
    near_truth = dilate(truth, tolerance)
    reach = torch.bucketize(defect, edges, right=True)  # how many thresholds each pixel reaches, 0..thresholds

    def at_least(index: torch.Tensor) -> torch.Tensor:  # per k: pixels of `index` reaching threshold k
        hist = torch.bincount(index.reshape(-1), minlength=thresholds + 1).to(torch.float64)
        return hist.flip(0).cumsum(0).flip(0)[1:]

    peak = max_filter(defect, tolerance)
    return torch.stack([at_least(reach), at_least(reach[near_truth]),
                        torch.full((thresholds,), float(truth.sum()), dtype=torch.float64),
                        at_least(torch.bucketize(peak[truth], edges, right=True))])


class EvalMetrics:
    def __init__(self, classes: list[str], *, tolerance: int = 2, thresholds: int = 20):
        self.classes, self.tolerance, self.thresholds = list(classes), tolerance, thresholds
        self.seg = SegMetrics(classes)
        # per threshold: predicted px, predicted px near truth, true px, true px near prediction
        self.ods = torch.zeros(4, thresholds, dtype=torch.float64)
        self.ois: list[float] = []
        self.image_scores: list[float] = []
        self.image_labels: list[int] = []
        self.seam = torch.zeros(4, dtype=torch.float64)  # errors in band, pixels in band, errors outside, outside
        self.image_confusion: list[list[list[int]]] = []  # per image, rows = truth, columns = prediction

    def update(self, probs: torch.Tensor, target: torch.Tensor, seams: torch.Tensor | None = None) -> None:
        """probs (1, C, H, W) on any device, target (H, W) class indices, seams (H, W) bool or None."""
        probs, target = probs.float().cpu(), target.cpu().long()
        before = self.seg.confusion.clone()
        self.seg.update(probs, target[None])
        self.image_confusion.append((self.seg.confusion - before).long().tolist())
        defect = 1 - probs[0, 0]
        truth = target > 0
        counts = threshold_counts(defect, truth, self.thresholds, self.tolerance)
        self.ods += counts
        if truth.any():
            self.ois.append(float(_f1(counts).max()))
        self.image_scores.append(float(defect.max()))
        self.image_labels.append(int(truth.any()))
        if seams is not None:
            self.seam += seam_counts(class_argmax(probs[0], 0), target, seams)

    def compute(self) -> dict:
        seg = self.seg.compute()
        c = self.seg.confusion
        tp, pred, true = c.diag(), c.sum(0), c.sum(1)
        per_class = {}
        for i, name in enumerate(self.classes):
            precision = float(tp[i] / pred[i]) if pred[i] > 0 else None
            recall = float(tp[i] / true[i]) if true[i] > 0 else None
            dice = float(2 * tp[i] / (pred[i] + true[i])) if pred[i] + true[i] > 0 else None
            per_class[name] = {"IoU": seg["IoU"][name], "Dice": dice, "precision": precision, "recall": recall}
        f1 = _f1(self.ods)
        best = int(f1.argmax())
        neg, pos = self.seg.hist
        seam_err, other_err, seam_ratio = seam_summary(self.seam)
        labels = np.array(self.image_labels)
        return {
            "mIoU": seg["mIoU"], "defect_mIoU": seg["defect_mIoU"], "pixel_accuracy": seg["pixel_accuracy"],
            "per_class": per_class,
            "ODS_F1": float(f1[best]) if self.ods[2, 0] > 0 else math.nan,
            "ODS_threshold": (best + 0.5) / self.thresholds,
            "OIS_F1": float(np.mean(self.ois)) if self.ois else math.nan,
            "tolerance_px": self.tolerance,
            "pixel_AP": _hist_ap(neg, pos),
            # undefined unless some images have a defect and some have none
            "image_AP": average_precision(np.array(self.image_scores), labels) if 0 < labels.sum() < labels.size
            else math.nan,
            "images": len(self.image_labels),
            "seam_error": seam_err, "non_seam_error": other_err,
            "seam_ratio": seam_ratio,
            "image_confusion": self.image_confusion,
            "predicted_classes": [name for name, n in zip(self.classes, pred.tolist(), strict=True) if n > 0],
        }


def seam_counts(pred: torch.Tensor, target: torch.Tensor, seams: torch.Tensor) -> torch.Tensor:
    """[errors near seams, pixels near seams, errors elsewhere, pixels elsewhere] of an argmax map (H, W)."""
    wrong = pred.cpu() != target.cpu()
    seams = seams.cpu()
    return torch.tensor([(wrong & seams).sum(), seams.sum(), (wrong & ~seams).sum(), (~seams).sum()],
                        dtype=torch.float64)


def seam_summary(counts: torch.Tensor) -> tuple[float | None, float | None, float | None]:
    """Error rate near seams, elsewhere, and their ratio (1.0: no seam effect) from summed `seam_counts`."""
    seam_err = float(counts[0] / counts[1]) if counts[1] > 0 else None
    other_err = float(counts[2] / counts[3]) if counts[3] > 0 else None
    ratio = seam_err / other_err if seam_err is not None and other_err else None
    return seam_err, other_err, ratio


def accuracy_by_source(image_confusion: list, image_sources: list[str], classes: list[str]) -> dict[str, dict]:
    """mIoU, defect mIoU and per-class IoU of each evaluation source (a shard folder) from the per-image confusion
    matrices, pooled within the source only: a 4K scene's millions of pixels then do not decide the figure of a
    validation split of small images (or the reverse)."""
    out: dict[str, dict] = {}
    for source in dict.fromkeys(image_sources):
        rows = [c for c, s in zip(image_confusion, image_sources, strict=True) if s == source]
        conf = np.asarray(rows, dtype=np.int64).sum(0)
        tp = np.diagonal(conf)
        union = conf.sum(0) + conf.sum(1) - tp
        iou = [float(tp[k] / union[k]) if union[k] > 0 else None for k in range(len(classes))]
        present = [v for v in iou if v is not None]
        defect = [v for v in iou[1:] if v is not None]
        out[source] = {"images": len(rows), "pixels": int(conf.sum()),
                       "mIoU": sum(present) / len(present) if present else math.nan,
                       "defect_mIoU": sum(defect) / len(defect) if defect else math.nan,
                       "IoU": dict(zip(classes, iou, strict=True))}
    return out


def miou_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """mIoU of confusion matrices (..., C, C) as `pretrain.metrics.SegMetrics` computes it: the mean IoU over
    the classes present in the truth or the prediction (NaN where none is)."""
    tp = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(-1) + confusion.sum(-2) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(iou, axis=-1) if iou.size else np.full(iou.shape[:-1], np.nan)


def _resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """How often each of n items is drawn in each bootstrap resample: (resamples, n) multinomial counts, the
    same as drawing n items with replacement."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)


def _interval(full: float, diffs: np.ndarray, n: int, resamples: int) -> dict | None:
    diffs = diffs[np.isfinite(diffs)]
    if not diffs.size:
        return None
    low, high = np.quantile(diffs, [0.025, 0.975])
    return {"difference": float(full), "low": float(low), "high": float(high), "images": n, "resamples": resamples}


def miou_difference(a: list, b: list, resamples: int = 2000, seed: int = 0) -> dict | None:
    """Paired bootstrap over images of mIoU(a) - mIoU(b), from the `image_confusion` lists of two models
    evaluated on the same images: the difference on all images and its 95% interval (resampling images with
    replacement, each resample's confusions summed as the dataset's are). None when the lists do not match."""
    ca, cb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if ca.ndim != 3 or ca.shape != cb.shape or len(ca) == 0:
        return None
    n, c = ca.shape[0], ca.shape[1]
    weights = _resample_weights(n, resamples, seed)
    diff = (miou_from_confusion((weights @ ca.reshape(n, -1)).reshape(-1, c, c))
            - miou_from_confusion((weights @ cb.reshape(n, -1)).reshape(-1, c, c)))
    full = miou_from_confusion(ca.sum(0)) - miou_from_confusion(cb.sum(0))
    return _interval(full, diff, n, resamples)


def mean_difference(a: list[float], b: list[float], resamples: int = 2000, seed: int = 0) -> dict | None:
    """Paired bootstrap over images of mean(a) - mean(b) for per-image scores of two models on the same images
    (e.g. pointing-game hits): the difference and its 95% interval. None when the lists do not match."""
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.ndim != 1 or va.shape != vb.shape or len(va) == 0:
        return None
    n = len(va)
    diff = _resample_weights(n, resamples, seed) @ (va - vb) / n
    return _interval(float((va - vb).mean()), diff, n, resamples)


def _f1(counts: torch.Tensor) -> torch.Tensor:
    precision = counts[1] / counts[0].clamp_min(1)
    recall = counts[3] / counts[2].clamp_min(1)
    return 2 * precision * recall / (precision + recall).clamp_min(1e-12)


def _hist_ap(neg: torch.Tensor, pos: torch.Tensor) -> float:
    """Average precision from per-bin counts of negative and positive pixels (thresholds at bin edges)."""
    if pos.sum() == 0:
        return math.nan
    tp = pos.flip(0).cumsum(0)  # from the highest bin down
    fp = neg.flip(0).cumsum(0)
    precision = tp / (tp + fp).clamp_min(1)
    recall_gain = pos.flip(0) / pos.sum()
    return float((precision * recall_gain).sum())
