"""The one shard reader every stage uses: a WebDataset pipeline that yields decoded tensors.

A location is one of
- a local shard folder (it holds `_info.json`),
- any location naming `_info.json`: a local file, an `https://` URL, or a `pipe:` command such as
  `pipe:aws s3 cp s3://bucket/ds/_info.json -`; each shard's location is the same string with `_info.json`
  replaced by the shard's file name, so object storage works without copying,
- a brace pattern or list of shard URLs (`/data/train-{000000..000009}.tar`, `pipe:...`), then `classes` must
  be given.

Two modes. Evaluation (`resampled=False`) reads every sample exactly once over all ranks and DataLoader
workers: shards are dealt out when there are at least as many as readers, otherwise every reader opens every
shard and keeps every n-th sample, so no reader idles and none sees a sample twice. Training
(`resampled=True`) streams endless passes over the shards, each pass in a fresh order seeded by `(seed, pass)`,
dealt to the readers the same way (so readers see disjoint samples within a pass), and stops each reader
after its share of a fixed epoch length, so every rank runs the same number of steps and none waits.
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import subprocess
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.utils import make_seed, pytorch_worker_info

from .shards import IMAGE_EXTS, INFO_NAME, ShardError, parse_info, read_folder_info

log = logging.getLogger(__name__)


def read_location_info(location: str | Path) -> dict:
    """The checked `_info.json` at any location: a local shard folder or `_info.json` file (both read by
    `shards.read_folder_info`), an https URL, or a `pipe:` command that prints it."""
    loc = str(location)
    if loc.startswith("pipe:"):
        out = subprocess.run(loc[5:], shell=True, check=False, capture_output=True)
        if out.returncode != 0:
            raise ShardError(f"'{loc}' failed ({out.returncode}): {out.stderr.decode(errors='replace')[:500]}")
        return parse_info(out.stdout, loc)
    if loc.startswith(("http://", "https://")):
        with urllib.request.urlopen(loc, timeout=60) as resp:  # noqa: S310 - the user names the location
            return parse_info(resp.read(), loc)
    path = Path(loc)
    return read_folder_info(path.parent if path.name == INFO_NAME else path)


def resolve_shards(location: str | Path | list[str], split: str | None = None) -> tuple[list[str], dict | None]:
    """Shard URLs of `split` at `location` and the `_info.json` content when there is one.

    A list is either shard URLs/patterns (no `_info.json`), or several dataset folders (or `_info.json`
    locations) read as one: their classes must be equal, and the info returned is the first one's with
    `sources` (every folder's `source`) and `locations` added.
    """
    if isinstance(location, (list, tuple)):
        if len(location) == 1:
            return resolve_shards(location[0], split)
        resolved = [resolve_shards(item, split) for item in location]
        infos = [info for _, info in resolved]
        urls = [u for found, _ in resolved for u in found]
        if all(info is None for info in infos):
            return urls, None
        if any(info is None for info in infos):
            raise ShardError(f"cannot read {list(map(str, location))} as one dataset: some have an _info.json and "
                             "some do not")
        first = infos[0]
        for item, info in zip(location[1:], infos[1:], strict=True):
            if info["classes"] != first["classes"]:
                raise ShardError(f"cannot read '{location[0]}' and '{item}' as one dataset: classes "
                                 f"{first['classes']} != {info['classes']}")
        merged = {**first, "sources": [info.get("source") for info in infos],
                  "locations": [str(item) for item in location]}
        return urls, merged
    loc = str(location)
    is_dir = Path(loc).is_dir()
    if not is_dir and INFO_NAME not in loc:
        urls = list(wds.shardlists.expand_urls(loc))
        if not urls:
            raise ShardError(f"shard location '{loc}' expands to no shard")
        return urls, None
    info = read_location_info(loc)
    splits = info["splits"]
    split = split or next(iter(splits))
    if split not in splits:
        raise ShardError(f"split '{split}' not found at '{loc}'; it has: {', '.join(splits) or 'none'}")
    names = splits[split]["filenames"]
    if is_dir:
        return [str(Path(loc) / n) for n in names], info
    at = loc.rfind(INFO_NAME)
    return [loc[:at] + n + loc[at + len(INFO_NAME):] for n in names], info


def list_keys(location: str | Path | list[str], split: str | None = None) -> list[str]:
    """Every sample key of `split`, in shard order (reads the shards, without decoding)."""
    urls, _ = resolve_shards(location, split)
    samples = wds.tarfile_to_samples(handler=SkipCounter())(iter({"url": u} for u in urls))
    return [sample["__key__"] for sample in samples]


class SkipCounter:
    """Counts and logs samples that could not be read, per reader process."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping unreadable data (%d so far in this reader): %r", self.count, exn)
        return True  # keep going


def decode_sample(sample: dict, num_classes: int, compact: bool = False) -> dict:
    """Raw tar members -> {"image": float (3,H,W) in [0,1], "mask": long (H,W), "labels": float (K,), ...}.

    `compact=True` keeps the image and the mask as uint8 (0-255 and class indices): a quarter of the bytes to
    copy between loader workers and the trainer, which converts them on its device (`defectforge.data.to_device`).
    """
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "mask.png" not in sample:
        raise ShardError(f"sample '{key}' in {sample.get('__url__')}: missing image or mask.png member")
    image = np.array(Image.open(io.BytesIO(sample[ext])).convert("RGB"))  # a writable copy for torch
    mask = np.array(Image.open(io.BytesIO(sample["mask.png"])))
    if mask.shape != image.shape[:2]:
        raise ShardError(f"sample '{key}' in {sample.get('__url__')}: mask {mask.shape} != image {image.shape[:2]}")
    # numpy on the uint8 mask: ~10x cheaper than torch ops on a small int64 tensor, and this runs per sample
    counts = np.bincount(mask.ravel(), minlength=num_classes + 1)
    if len(counts) > num_classes + 1:
        raise ShardError(f"sample '{key}' in {sample.get('__url__')}: mask value {len(counts) - 1} "
                         f"outside the {num_classes} defect classes")
    present = counts[1:] > 0
    return {
        "image": (torch.from_numpy(image).permute(2, 0, 1) if compact
                  else torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)),
        "mask": torch.from_numpy(mask) if compact else torch.from_numpy(mask.astype(np.int64)),
        "labels": torch.from_numpy(present.astype(np.float32)),
        "cls": int(sample["cls"]) if "cls" in sample else (int(present.argmax()) + 1 if present.any() else 0),
        "key": key,
        "meta": sample.get("json", b"{}").decode(),
    }


def _safe_map(fn: Callable[[dict], dict], counter: SkipCounter):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            try:
                yield fn(sample)
            except Exception as exn:  # a corrupt sample is skipped and counted, not fatal
                counter(exn)
    return stage


class _EvalSource(torch.utils.data.IterableDataset):
    """Every sample once over all (rank, worker) readers; see the module docstring."""

    def __init__(self, urls: list[str], handler: SkipCounter):
        self.urls = urls
        self.handler = handler

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = pytorch_worker_info()
        reader, readers = rank * num_workers + worker, world * num_workers
        by_shard = len(self.urls) >= readers
        shards = self.urls[reader::readers] if by_shard else self.urls
        samples = wds.tarfile_to_samples(handler=self.handler)(iter({"url": u} for u in shards))
        for i, sample in enumerate(samples):
            if by_shard or i % readers == reader:
                yield sample


class _CyclicSource(torch.utils.data.IterableDataset):
    """Training stream: pass after pass over the shards, each pass shuffled by `(seed, pass)`.

    Every reader computes the same endless shard sequence and takes its own part of it: every n-th shard
    when there are at least as many shards as readers, else every n-th sample. Readers never see the same
    sample within a pass, and none runs dry. A whole pass without a readable sample is an error rather than
    an endless loop.
    """

    def __init__(self, urls: list[str], handler: SkipCounter, seed: int, keys: frozenset[str] | None = None):
        self.urls, self.handler, self.seed, self.keys = urls, handler, seed, keys

    def _sequence(self) -> Iterator[str]:
        for cycle in itertools.count():
            order = list(self.urls)
            random.Random(make_seed(self.seed, cycle)).shuffle(order)
            yield from order

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = pytorch_worker_info()
        reader, readers = rank * num_workers + worker, world * num_workers
        # a key subset is dealt sample by sample, so that no reader waits forever on shards without one
        by_shard = self.keys is None and len(self.urls) >= readers
        shards = itertools.islice(self._sequence(), reader, None, readers) if by_shard else self._sequence()
        position, barren = 0, 0
        for url in shards:
            found = 0
            for sample in wds.tarfile_to_samples(handler=self.handler)(iter([{"url": url}])):
                if self.keys is not None and sample.get("__key__") not in self.keys:
                    continue
                found += 1
                if by_shard or position % readers == reader:
                    yield sample
                position += 1
            barren = 0 if found else barren + 1
            if barren >= len(self.urls):
                raise ShardError(f"no readable{' selected' if self.keys is not None else ''} sample in a whole "
                                 f"pass over {len(self.urls)} shards (first: {self.urls[0]})")


def _take_share(total: int):
    """Stop each reader after its share of `total` samples (the fixed epoch length of resampled mode)."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        _, world, _, num_workers = pytorch_worker_info()
        share = -(-total // (world * num_workers))
        for i, sample in enumerate(src):
            if i >= share:
                return
            yield sample
    return stage


def _seeded_shuffle(bufsize: int, seed: int):
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        rank, _, worker, _ = pytorch_worker_info()
        return wds.shuffle(bufsize, initial=min(bufsize, 64), seed=make_seed(seed, rank, worker))(src)
    return stage


def make_dataset(location: str | Path | list[str], split: str | None = None, *, resampled: bool = False,
                 epoch_samples: int | None = None, shuffle: int = 0, seed: int = 0,
                 classes: list[str] | None = None, transform: Callable[[dict], dict] | None = None,
                 keys: Collection[str] | None = None, compact: bool = False) -> wds.DataPipeline:
    """The WebDataset pipeline over `split` at `location`, decoding to tensors.

    `resampled=True` needs `epoch_samples`, the number of samples per epoch over all ranks. `shuffle` is a
    buffer size (0 = keep shard order). `transform` runs on each decoded sample (for example a crop) inside
    the loader workers. `keys` restricts the pipeline to those sample keys (a few-shot subset, see
    `list_keys`). `compact=True` decodes to uint8 tensors (see `decode_sample`). The pipeline has `.classes`
    and `.info` (None without `_info.json`) attributes.
    """
    urls, info = resolve_shards(location, split)
    if info is not None:
        classes = info["classes"]
    if not classes:
        raise ShardError(f"'{location}' has no _info.json: pass classes=[background, ...] to read it")
    counter = SkipCounter()
    stages: list = []
    if resampled:
        if not epoch_samples or epoch_samples < 1:
            raise ValueError("resampled=True needs epoch_samples >= 1 (samples per epoch over all ranks)")
        stages.append(_CyclicSource(urls, counter, seed, frozenset(keys) if keys is not None else None))
    else:
        stages.append(_EvalSource(urls, counter))
        if keys is not None:
            wanted = frozenset(keys)
            stages.append(wds.select(lambda sample: sample.get("__key__") in wanted))
    if shuffle > 0:
        stages.append(_seeded_shuffle(shuffle, seed))
    num_classes = len(classes) - 1
    stages.append(_safe_map(lambda s: decode_sample(s, num_classes, compact), counter))
    if transform is not None:
        stages.append(_safe_map(transform, counter))
    if resampled:
        stages.append(_take_share(epoch_samples))
    pipeline = wds.DataPipeline(*stages)
    pipeline.classes = list(classes)
    pipeline.info = info
    pipeline.skipped = counter
    return pipeline
