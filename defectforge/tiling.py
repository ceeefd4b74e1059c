"""Tiled inference for images of any size: overlapping tiles, batched, logits blended with border-decaying weights.

Memory stays bounded by the output (C x H x W logits + one weight map, on the accumulation device) plus one
batch of tiles, whatever the number of tiles. A tile larger than the image shrinks to the image.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

BLENDS = ("gaussian", "pyramid", "average")


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` overlapping by at least `overlap` of a tile.

    The stride is `tile * (1 - overlap)` rounded down; the last tile is aligned to the end, so no tile reaches
    past the image (no padding artifacts at the border) and every pixel is covered.
    """
    if tile >= length:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return sorted({min(i * stride, length - tile) for i in range(count)})


def tile_grid(height: int, width: int, tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """(y, x, h, w) of every tile; `h`, `w` are `tile` or the image side when the image is smaller."""
    th, tw = min(tile, height), min(tile, width)
    return [(y, x, th, tw) for y in tile_starts(height, th, overlap) for x in tile_starts(width, tw, overlap)]


def warmup_strip(image: torch.Tensor, tile: int, overlap: float, batch: int) -> torch.Tensor:
    """The top of `image` (..., H, W) that holds one full batch of `batch` tiles of `tile` px and no more: tiled
    like the whole image (the same tile and batch shapes, the same blending), to warm a model up before it is
    timed on `image` at a fraction of a whole pass (8 of the 45 tiles of a 4K image at 512 px, 10 %). The whole
    image when it has at most two batches of tiles."""
    h, w = image.shape[-2:]
    if len(tile_grid(h, w, tile, overlap)) <= 2 * batch:
        return image
    th, tw = min(tile, h), min(tile, w)
    ys, xs = tile_starts(h, th, overlap), tile_starts(w, tw, overlap)
    if len(xs) >= batch:  # one row of tiles, `batch` wide: its own grid is exactly those tiles
        return image[..., :th, :xs[batch - 1] + tw]
    rows = math.ceil(batch / len(xs))
    return image[..., :ys[rows - 1] + th, :]


def blend_window(h: int, w: int, blend: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """(h, w) weights: Gaussian (sigma = side / 8, as MONAI's default), pyramid (distance to the border), or ones.

    Weights are strictly positive, so a pixel covered by a single tile (image corners) keeps its logits.
    """
    if blend not in BLENDS:
        raise ValueError(f"blend {blend!r} is not one of {', '.join(BLENDS)}")
    if blend == "average":
        return torch.ones(h, w, device=device)

    def profile(n: int) -> torch.Tensor:
        pos = torch.arange(n, device=device, dtype=torch.float32)
        if blend == "gaussian":
            sigma = max(n / 8.0, 1e-3)
            return torch.exp(-0.5 * ((pos - (n - 1) / 2) / sigma) ** 2)
        return torch.minimum(pos + 1, n - pos) / ((n + 1) // 2)

    window = profile(h)[:, None] * profile(w)[None, :]
    return (window / window.max()).clamp_min(1e-4)


def _batches(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def tiled_logits(model: torch.nn.Module, image: torch.Tensor, *, tile: int = 512, overlap: float = 0.1,
                 blend: str = "gaussian", batch: int = 8, accumulate: torch.device | str | None = None,
                 autocast=None) -> torch.Tensor:
    """Blended logits (1, C, H, W) of a normalised image (1, 3, H, W) on the model's device.

    `accumulate` is where the stitched output lives (default: the image's device; "cpu" keeps GPU memory at
    one tile batch). `autocast` is an optional context-manager factory (e.g. `accelerator.autocast`).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image (1, C, H, W), got {tuple(image.shape)}")
    _, _, height, width = image.shape
    accumulate = torch.device(accumulate) if accumulate is not None else image.device
    tiles = tile_grid(height, width, tile, overlap)
    th, tw = tiles[0][2], tiles[0][3]
    weight = blend_window(th, tw, blend, device=accumulate)
    out: torch.Tensor | None = None
    total = torch.zeros(1, height, width, device=accumulate)
    for group in _batches(tiles, batch):
        crops = torch.cat([image[..., y:y + h, x:x + w] for y, x, h, w in group])
        if autocast is not None:
            with autocast():
                logits = model(crops)
        else:
            logits = model(crops)
        logits = logits.float().to(accumulate)
        if out is None:
            out = torch.zeros(logits.shape[1], height, width, device=accumulate)
        for (y, x, h, w), tile_logits in zip(group, logits, strict=True):
            out[:, y:y + h, x:x + w] += tile_logits * weight
            total[:, y:y + h, x:x + w] += weight
    return (out / total)[None]


def seam_mask(height: int, width: int, tile: int, overlap: float, band: int) -> torch.Tensor:
    """Bool (H, W): pixels within `band` px of a tile edge that lies inside the image (where seams would show)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for y, x, h, w in tile_grid(height, width, tile, overlap):
        for edge in (y, y + h):
            if 0 < edge < height:
                mask[max(0, edge - band):edge + band, x:x + w] = True
        for edge in (x, x + w):
            if 0 < edge < width:
                mask[y:y + h, max(0, edge - band):edge + band] = True
    return mask
