"""How ViTs and CNNs see (Raghu et al. 2021, "Do Vision Transformers See Like Convolutional Neural Networks?"):
the measures, on plain tensors, with no model loading (evaluate/represent_run.py feeds them from the user's runs).

- `MinibatchCKA`: linear CKA between every pair of layers, estimated over minibatches with the unbiased HSIC
  (Nguyen et al. 2021, as the paper does): CKA = mean_b HSIC_u(K_b, L_b) / sqrt(mean_b HSIC_u(K_b, K_b) mean_b
  HSIC_u(L_b, L_b)). HSIC_u(K, L) = <U(K), U(L)> / (n (n - 3)) with U the U-centering of a Gram matrix
  (Szekely & Rizzo 2014), which equals Song et al.'s unbiased estimator; one product of the stacked U-centred
  Grams gives every pair at once.
- `attention_distance`: mean pixel distance between a query patch and the patches it attends to, per head
  (prefix tokens excluded as queries and as keys; each query's patch weights renormalised to sum to 1).
- `receptive_field`: the effective receptive field of a central output unit (|d unit / d input|), as the mean
  pixel distance of that gradient mass from the unit (the attention-distance analogue) and the side of the
  smallest centred square that holds `share` of it.
- `rollout`: attention rollout (Abnar & Zuidema 2020) with head fusion mean/max/min and a discard ratio.
- `linear_probe`: a class-balanced ridge classifier trained on some images' tokens, scored (balanced accuracy)
  on the other images' tokens.
- `auroc`: the area under the ROC curve of map values as a detector of defect pixels (ties counted half).
"""

from __future__ import annotations

import math

import numpy as np
import torch

FUSIONS = ("mean", "max", "min")


# ------------------------------------------------------------------------------------------------- CKA


def gram(x: torch.Tensor) -> torch.Tensor:
    """Linear kernel of (n, ...) features: (n, n), in float64."""
    x = x.reshape(x.shape[0], -1).double()
    return x @ x.T


def u_center(k: torch.Tensor) -> torch.Tensor:
    """U-centering of an (n, n) Gram matrix (n > 3): <U(K), U(L)> / (n (n - 3)) is the unbiased HSIC."""
    n = k.shape[0]
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 examples per minibatch, got {n}")
    k = k.clone()
    k.fill_diagonal_(0)
    rows = k.sum(0)
    u = k - rows[None, :] / (n - 2) - rows[:, None] / (n - 2) + rows.sum() / ((n - 1) * (n - 2))
    u.fill_diagonal_(0)
    return u


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741
    """Song et al. (2012)'s unbiased HSIC of two Gram matrices, written out (the reference for the tests)."""
    n = k.shape[0]
    k, l = k.double().clone(), l.double().clone()  # noqa: E741
    k.fill_diagonal_(0)
    l.fill_diagonal_(0)
    one = torch.ones(n, 1, dtype=torch.float64)
    value = (torch.trace(k @ l) + (one.T @ k @ one).item() * (one.T @ l @ one).item() / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ k @ l @ one).item())
    return float(value / (n * (n - 3)))


class MinibatchCKA:
    """Linear CKA between every pair of `layers` (named representations), accumulated over minibatches.

    `update({name: (n, ...) features})` takes one minibatch of every layer (the same n examples); `compute()`
    returns the (layers, layers) CKA matrix in the order of `names`.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.hsic: torch.Tensor | None = None
        self.batches = 0

    def update(self, features: dict[str, torch.Tensor]) -> None:
        names = list(features)
        if self.names and names != self.names:
            raise ValueError(f"minibatch has layers {names}, earlier ones had {self.names}")
        self.names = names
        stacked = torch.stack([u_center(gram(f)).flatten() for f in features.values()])
        n = next(iter(features.values())).shape[0]
        hsic = stacked @ stacked.T / (n * (n - 3))
        self.hsic = hsic if self.hsic is None else self.hsic + hsic
        self.batches += 1

    def compute(self) -> np.ndarray:
        if self.hsic is None:
            raise ValueError("no minibatch was given to the CKA")
        h = self.hsic / self.batches
        d = h.diagonal().clamp_min(1e-30).sqrt()
        return (h / d[:, None] / d[None, :]).numpy()


def cka(x: torch.Tensor, y: torch.Tensor, batch: int | None = None) -> float:
    """Linear CKA of two (n, ...) representations of the same examples (unbiased HSIC; minibatches of `batch`)."""
    acc = MinibatchCKA()
    step = batch or x.shape[0]
    for i in range(0, x.shape[0] - step + 1, step):
        acc.update({"x": x[i:i + step], "y": y[i:i + step]})
    return float(acc.compute()[0, 1])


# ------------------------------------------------------------------------------------- attention distance


def patch_distances(grid: tuple[int, int], patch: float | tuple[float, float]) -> torch.Tensor:
    """(N, N) pixel distance between the centres of the patches of a (gh, gw) grid, row-major."""
    ph, pw = (patch, patch) if isinstance(patch, int | float) else patch
    ys, xs = torch.meshgrid(torch.arange(grid[0], dtype=torch.float64) * ph,
                            torch.arange(grid[1], dtype=torch.float64) * pw, indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double()
    return torch.cdist(pos, pos)


def attention_distance(weights: torch.Tensor, grid: tuple[int, int], patch: float | tuple[float, float],
                       prefix: int = 0) -> np.ndarray:
    """Mean attention distance per head, in pixels, from (B, heads, N, N) attention weights (N = prefix + grid).

    Prefix tokens (class, registers) are left out as queries and as keys; each query's weights over the patches
    are renormalised to 1, then distance-weighted and averaged over queries and images."""
    w = weights[:, :, prefix:, prefix:].double()
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-30)
    d = patch_distances(grid, patch)
    if w.shape[-1] != d.shape[0]:
        raise ValueError(f"{w.shape[-1]} patch tokens do not fill a {grid[0]}x{grid[1]} grid")
    return (w * d).sum(-1).mean((0, 2)).numpy()


# -------------------------------------------------------------------------------- effective receptive field


def receptive_field(grad: torch.Tensor, share: float = 0.95, centre: tuple[int, int] | None = None) -> dict:
    """Effective receptive field from |d unit / d input| of shape (H, W) (summed over channels and images).

    mean_distance: the gradient-weighted mean pixel distance from the unit's centre (comparable with the mean
    attention distance); size: the side of the smallest square centred there holding `share` of the mass."""
    g = grad.double().abs()
    h, w = g.shape
    cy, cx = centre if centre is not None else ((h - 1) / 2, (w - 1) / 2)
    total = float(g.sum())
    if total <= 0:
        return {"mean_distance": 0.0, "size": 0, "share": share}
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    mean_distance = float((g * ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()).sum() / total)
    # Chebyshev "ring" of every pixel around the centre: a square of side s holds the pixels with ring < s / 2
    ring = torch.maximum((ys - cy).abs(), (xs - cx).abs())
    order = torch.argsort(ring.flatten())
    cumulative = torch.cumsum(g.flatten()[order], 0)
    reach = float(ring.flatten()[order][int(torch.searchsorted(cumulative, share * total * (1 - 1e-9)))])
    return {"mean_distance": mean_distance, "size": int(round(2 * reach + 1)), "share": share}


# --------------------------------------------------------------------------------------------- rollout


def fuse_heads(weights: torch.Tensor, fusion: str) -> torch.Tensor:
    """(B, heads, N, N) -> (B, N, N) by the mean, max or min over heads."""
    if fusion == "mean":
        return weights.mean(1)
    if fusion == "max":
        return weights.amax(1)
    if fusion == "min":
        return weights.amin(1)
    raise ValueError(f"head fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")


def rollout(layers: list[torch.Tensor], prefix: int, fusion: str = "mean", discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout: (B, patches) relevance of every patch for the class token (the mean over the patch
    queries when there is no prefix token), from every block's (B, heads, N, N) weights in order.

    Per block: heads fused, the lowest `discard_ratio` of the weights set to 0 (never those into the first
    token), the residual added as 0.5 A + 0.5 I, rows renormalised; the blocks' matrices multiplied in order."""
    result = None
    for weights in layers:
        a = fuse_heads(weights.double(), fusion)
        b, n, _ = a.shape
        if discard_ratio > 0:
            flat = a.reshape(b, -1).clone()
            k = int(flat.shape[1] * discard_ratio)
            if k:
                low = flat.topk(k, dim=1, largest=False).indices
                into_class = (low % n == 0) if prefix else torch.zeros_like(low, dtype=torch.bool)
                # weights into the class token stay (vit-explain's rule)
                flat.scatter_(1, low, torch.where(into_class, flat.gather(1, low), torch.zeros_like(flat[:, :1])))
            a = flat.reshape(b, n, n)
        a = 0.5 * a + 0.5 * torch.eye(n, dtype=a.dtype)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    if result is None:
        raise ValueError("attention rollout needs at least one block")
    rows = result[:, 0] if prefix else result.mean(1)
    return rows[:, prefix:].float()


# ------------------------------------------------------------------------------------------- probe, AUROC


def _balanced_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    recalls = [float((pred[y == c] == c).double().mean()) for c in (0, 1) if bool((y == c).any())]
    return float(np.mean(recalls)) if recalls else math.nan


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 ridge: float = 1.0) -> float:
    """Balanced accuracy on (test_x, test_y) of a linear classifier fitted on (train_x, train_y).

    Features standardised with the training statistics; least squares on +-1 targets with each class weighted by
    the inverse of its count (defect tokens are rare) and an L2 penalty `ridge` (closed form, deterministic)."""
    x, xt = train_x.double(), test_x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    x, xt = (x - mu) / sd, (xt - mu) / sd
    y = train_y.bool()
    if y.all() or not y.any():
        raise ValueError("the probe's training tokens hold one class only: use more images with defects")
    weight = torch.where(y, 0.5 / y.sum(), 0.5 / (~y).sum()).double()
    xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    target = torch.where(y, 1.0, -1.0).double()
    lhs = xa.T @ (xa * weight[:, None]) + ridge / len(x) * torch.eye(xa.shape[1], dtype=x.dtype)
    coef = torch.linalg.solve(lhs, xa.T @ (weight * target))
    pred = (torch.cat([xt, torch.ones(len(xt), 1, dtype=xt.dtype)], 1) @ coef > 0).long()
    return _balanced_accuracy(pred, test_y.long())


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` as a detector of `labels` (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    s, y = scores.flatten().double().numpy(), labels.flatten().bool().numpy()
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return math.nan
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))
