"""Training and validation loaders over shards: fixed-length resampled epochs, square crops in the workers.

Epochs: the stream is cut into epochs of `steps` optimizer steps. Every process reads exactly
`steps * grad_accum` batches per epoch, so all ranks run the same number of steps and none waits for another
at the end. Epoch `e` reseeds the shard resampling and the crops with `(seed, e)`: a run resumed from a
checkpoint at an epoch boundary sees the same batches as a run that was never interrupted.
"""

from __future__ import annotations

import functools
import logging
import math
import zlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from webdataset.utils import pytorch_worker_info

from defectforge.reader import make_dataset, repeat_factors

log = logging.getLogger(__name__)
IGNORE = 255  # mask value the losses skip: padding, co-training classes with no target class
SMALL_IMAGES = ("pad", "resize")  # what a training crop does with an image smaller than it


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class SquareCrop:
    """Decoded sample -> `size` x `size` crop (random in training, fixed per sample key in validation).

    Images are cropped at full resolution, so thin defects keep their pixels. An image smaller than `size` on a
    side is, with `small_images="pad"`, padded to `size` at a random offset (the image mirrored, as `Segmenter`
    pads at inference; the mask `IGNORE`, so the padding trains nothing) and stays at the scale it is evaluated
    at; with `"resize"` it is resized up (bilinear, mask nearest) so its shorter side is `size`. The labels are
    recomputed from the cropped mask: a defect cropped away is absent.

    `defect_crop` (training only): the probability that a crop is placed on a defect instead of uniformly.
    One of the defect classes present in the image is drawn uniformly (so a rare class is as likely as a
    common one of the same image), then one of its pixels, and the crop is placed so that this pixel falls
    at a uniformly drawn position inside it. Small defects on large images are otherwise seen in a fraction
    of the crops only: a 2 % defect area in 1/4-image crops leaves most crops all background.
    """

    def __init__(self, size: int, num_classes: int, seed: int | None, defect_crop: float = 0.0,
                 small_images: str = "resize"):
        if small_images not in SMALL_IMAGES:
            raise ValueError(f"small_images={small_images!r}: expected one of {', '.join(SMALL_IMAGES)}")
        self.size, self.num_classes, self.seed = size, num_classes, seed
        self.defect_crop, self.small_images = defect_crop, small_images
        self._rng: np.random.Generator | None = None

    def _generator(self) -> np.random.Generator:
        if self._rng is None:  # created inside the worker, so each reader has its own stream
            rank, _, worker, _ = pytorch_worker_info()
            self._rng = np.random.default_rng([self.seed, rank, worker])
        return self._rng

    def __call__(self, sample: dict) -> dict:
        image, mask = sample["image"], sample["mask"]
        h, w = mask.shape
        # validation: a crop fixed by the sample key (not the centre, which would never show an edge chip)
        rng = self._generator() if self.seed is not None else np.random.default_rng(zlib.crc32(sample["key"].encode()))
        if min(h, w) < self.size and self.small_images == "pad":
            image, mask = pad_to(image, mask, self.size, rng)
            h, w = mask.shape
        elif min(h, w) < self.size:
            scale = self.size / min(h, w)
            h, w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
            dtype = image.dtype
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                                  antialias=True)[0]
            image = image.round().clamp(0, 255).to(dtype) if dtype == torch.uint8 else image
            mask = F.interpolate(mask[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0].to(mask.dtype)
        y0, x0 = self._origin(rng, mask, h, w)
        image = image[:, y0:y0 + self.size, x0:x0 + self.size].contiguous()
        mask = mask[y0:y0 + self.size, x0:x0 + self.size].contiguous()
        counts = np.bincount(mask.numpy().ravel(), minlength=self.num_classes + 1)  # numpy: cheap per sample
        present = counts[1:self.num_classes + 1] > 0  # IGNORE (padding, co-training) marks no class
        return {"image": image, "mask": mask, "labels": torch.from_numpy(present.astype(np.float32)),
                "key": sample["key"]}

    def _origin(self, rng: np.random.Generator, mask: torch.Tensor, h: int, w: int) -> tuple[int, int]:
        """Top-left corner of the crop: on a defect with probability `defect_crop` (when there is one)."""
        size = self.size
        if self.defect_crop > 0 and self.seed is not None and rng.random() < self.defect_crop:
            m = mask.numpy()
            classes = np.flatnonzero(np.bincount(m.ravel(), minlength=2)[1:self.num_classes + 1]) + 1
            if classes.size:
                ys, xs = np.nonzero(m == classes[rng.integers(classes.size)])
                i = rng.integers(ys.size)
                y0 = int(ys[i]) - int(rng.integers(0, size))
                x0 = int(xs[i]) - int(rng.integers(0, size))
                return min(max(y0, 0), h - size), min(max(x0, 0), w - size)
        return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def pad_to(image: torch.Tensor, mask: torch.Tensor, size: int,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`image` (C, H, W) and `mask` (H, W) padded to at least `size` on each side, the image placed at a random
    offset: the image mirrored into the border (numpy's `reflect`, repeated for a border wider than the image),
    the mask filled with `IGNORE`."""
    h, w = mask.shape
    ph, pw = max(0, size - h), max(0, size - w)
    top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
    pads = ((top, ph - top), (left, pw - left))
    img = np.pad(image.numpy(), ((0, 0), *pads), mode="reflect" if min(h, w) > 1 else "edge")
    msk = np.pad(mask.numpy(), pads, mode="constant", constant_values=IGNORE)
    return torch.from_numpy(img), torch.from_numpy(msk)


def epoch_batches(steps: int, grad_accum: int) -> int:
    """Batches each process consumes in an epoch of `steps` optimizer steps."""
    return steps * grad_accum


def train_loader(shards: str, split: str, *, img_size: int, batch_size: int, batches: int, world_size: int,
                 num_workers: int, shuffle_buffer: int, seed: int, epoch: int, classes: list[str] | None = None,
                 keys: list[str] | None = None, defect_crop: float = 0.0, repeat_threshold: float = 0.0,
                 small_images: str = "resize") -> DataLoader:
    """A loader that yields at least `batches` full batches on every process (the caller takes `batches`).

    Its images and masks are uint8 (`make_dataset(compact=True)`): move them with `to_device`.

    Each of the `world_size * max(1, num_workers)` readers gets the same whole number of batches, so the
    per-reader share of `epoch_samples` never leaves a partial batch. `keys` restricts training to a subset;
    `defect_crop` is the share of crops placed on a defect and `small_images` what happens to an image smaller than
    the crop (`SquareCrop`); `repeat_threshold` > 0 shows the images
    of rare classes more often (`defectforge.reader.repeat_factors`), within the same number of batches.
    """
    readers = max(1, num_workers)
    per_reader = math.ceil(batches / readers)
    s = epoch_seed(seed, epoch)
    probe = make_dataset(shards, split, classes=classes)  # resolves classes (and fails early on a bad location)
    dataset = make_dataset(shards, split, resampled=True, epoch_samples=world_size * readers * per_reader * batch_size,
                           shuffle=shuffle_buffer, seed=s, classes=probe.classes,
                           transform=SquareCrop(img_size, len(probe.classes) - 1, seed=s, defect_crop=defect_crop,
                                                small_images=small_images),
                           keys=keys, compact=True, repeats=class_repeats(shards, split, repeat_threshold, keys))
    generator = torch.Generator().manual_seed(s)
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, generator=generator,
                      collate_fn=collate, drop_last=False, persistent_workers=False,
                      pin_memory=torch.cuda.is_available())


@functools.lru_cache(maxsize=8)
def _class_repeats(shards: str, split: str, threshold: float, keys: tuple[str, ...] | None) -> dict[str, float]:
    repeats = repeat_factors(shards, split, threshold, keys)
    if repeats:
        factors = np.array(list(repeats.values()))
        log.info("repeat_threshold=%s: %d of %d training images repeated (factor up to %.2f), %.2fx the images per "
                 "pass", threshold, int((factors > 1).sum()), factors.size, factors.max(), factors.mean())
    return repeats


def class_repeats(shards: str, split: str, threshold: float, keys: list[str] | None = None) -> dict[str, float] | None:
    """The repeat factors of `split` for `repeat_threshold` (None when it is 0), computed once per process."""
    if not threshold:
        return None
    return _class_repeats(str(shards), split, float(threshold), tuple(keys) if keys is not None else None)


def merged_classes(shards: list[str]) -> tuple[list[str], list[list[str]]]:
    """The union of the folders' classes by name (background first) and each folder's own list."""
    per_folder = [make_dataset(s, None).classes for s in shards]
    union = ["background"]
    for classes in per_folder:
        union += [c for c in classes[1:] if c not in union]
    return union, per_folder


def folders_in_turn(shards: list[str], per_folder: list[list[str]], split: str, *, batches: int,
                    **loader_kwargs) -> Iterator[dict]:
    """Training batches from several dataset folders whose classes may differ, one folder after the other
    (`batches` in all, rounded up to a multiple of the folder count); each batch is a folder's own (masks in its
    own class ids) and says which: `batch["folder"]`. Folder k's stream is seeded by `seed + 7919 * k`."""
    per = math.ceil(batches / len(shards))
    seed = loader_kwargs.pop("seed")
    loaders = [train_loader(s, split, batches=per, seed=seed + 7919 * k, classes=per_folder[k], **loader_kwargs)
               for k, s in enumerate(shards)]
    for group in zip(*loaders, strict=False):
        for k, batch in enumerate(group):
            yield {**batch, "folder": k}


def val_loader(shards: str, split: str, *, img_size: int, batch_size: int, num_workers: int,
               classes: list[str] | None = None, small_images: str = "resize") -> DataLoader:
    """Every sample of `split` once over all processes and workers, cropped to `img_size` (crop fixed by key)."""
    dataset = make_dataset(shards, split, classes=classes)
    dataset = make_dataset(shards, split, classes=dataset.classes,
                           transform=SquareCrop(img_size, len(dataset.classes) - 1, seed=None,
                                                small_images=small_images))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)


def to_device(batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch's images (float in [0, 1]) and masks (long) on `device`.

    `train_loader` ships uint8 images and masks (a quarter of the bytes of float32 through the worker queues
    and the host-to-device copy) and they are converted here, on the device; float batches pass unchanged.
    """
    images = batch["image"].to(device, non_blocking=True)
    masks = batch["mask"].to(device, non_blocking=True)
    if images.dtype == torch.uint8:
        images = images.float().div_(255.0)
    return images, masks.long()


def collate(samples: list[dict]) -> dict:
    return {"image": torch.stack([s["image"] for s in samples]), "mask": torch.stack([s["mask"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]), "key": [s["key"] for s in samples]}
