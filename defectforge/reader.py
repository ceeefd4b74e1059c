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

What is read is compared with `_info.json` (docs/reliability.md, "damaged data"): a local folder's shards are
checked once per process before any sample is read (every listed shard present, its sha256 the recorded one),
and every reader counts the samples of each shard against the recorded `shard_lengths` (the only check a remote
location gets). A damaged shard, a short shard or an undecodable sample is a `ShardError` naming the shard (and
the sample key), unless damage is allowed (`allow_damaged(True)`, the commands' `allow_damaged=true`): then
damaged local shards are left out whole, undecodable samples are skipped, and both are counted
(`damage_found`, `dataset.skipped`).
"""

from __future__ import annotations

import io
import itertools
import logging
import random
import subprocess
import urllib.request
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.utils import make_seed, pytorch_worker_info

from .shards import IMAGE_EXTS, INFO_NAME, ShardError, parse_info, read_folder_info, sha256_file

log = logging.getLogger(__name__)

_ALLOW_DAMAGED = False  # the process's policy, set by each command from its allow_damaged key
_SKIP_RECORD: Path | None = None  # where readers (loader workers included) list the samples they skipped
_VERIFIED: dict[tuple, list[str]] = {}  # (folder, split, (name, size, mtime) of each shard) -> shards kept
SKIP_RECORD = "skipped_samples.tsv"  # its name in a run or report folder: what (shard, sample key), samples, reason


def allow_damaged(flag: bool, record: str | Path | None = None) -> None:
    """Set this process's policy, False (the default) failing on damaged data and True leaving it out and
    counting it, and start a fresh count (`damage_found`): each command (a training run, an evaluation) calls
    this before it reads data. `record`: a file every reader created afterwards appends each sample it skips
    to (one tab-separated line: the shard or sample, the number of samples, the reason), loader worker
    processes included, so that `damage_found` counts them too."""
    global _ALLOW_DAMAGED, _SKIP_RECORD
    _ALLOW_DAMAGED = bool(flag)
    _SKIP_RECORD = Path(record) if record is not None and flag else None
    _DAMAGE.clear()


@dataclass
class Damage:
    """What was left out of one split of one local folder: the problems found and their samples."""

    location: str
    split: str
    problems: list[str] = field(default_factory=list)
    skipped: int = 0


_DAMAGE: dict[tuple[str, str], Damage] = {}  # damage let through in this process, per (folder, split)


def damage_found() -> dict | None:
    """The damage let through since `allow_damaged(True)`: {"skipped_samples": N, "problems": ["<folder>
    [<split>]: <problem>", ...]}: the shards left out whole, plus the samples readers skipped as they read
    (counted from the `record` file), or None when everything read was whole."""
    skipped = sum(d.skipped for d in _DAMAGE.values())
    problems = [f"{d.location} [{d.split}]: {p}" for d in _DAMAGE.values() for p in d.problems]
    if _SKIP_RECORD is not None and _SKIP_RECORD.is_file():
        per_item: dict[str, int] = {}  # a sample skipped in every pass over the data counts once
        for fields in (line.split("\t") for line in _SKIP_RECORD.read_text().splitlines()):
            if len(fields) == 3 and fields[1].isdigit():
                per_item[fields[0]] = max(per_item.get(fields[0], 0), int(fields[1]))
        read = sum(per_item.values())
        if read:
            skipped += read
            problems.append(f"{read} sample(s) skipped while reading, listed in {_SKIP_RECORD}")
    if not problems:
        return None
    return {"skipped_samples": skipped, "problems": problems}


def _damage_error(where: str, problems: list[str]) -> ShardError:
    return ShardError(f"{where}: {'; '.join(problems)}. The data no longer matches its _info.json: write it again "
                      "(synth generate / synth import), or pass allow_damaged=true to leave the damaged shards out "
                      "(their samples are counted as skipped)")


def verify_folder(folder: str | Path, split: str, info: dict, allow: bool | None = None) -> list[str]:
    """The shard names of `split` in the local shard `folder` that match `_info.json`: each listed shard must
    exist with the recorded sha256 (a shard without a recorded digest only has its samples counted as read).
    A mismatch is a `ShardError` naming the shard, unless damage is allowed (`allow`, default: the process's
    policy): then the damaged shards are left out and their recorded samples counted (`damage_found`).
    Checked once per process and state of the files."""
    allow = _ALLOW_DAMAGED if allow is None else allow
    folder = Path(folder)
    entry = info["splits"][split]
    names = list(entry["filenames"])
    lengths = list(entry.get("shard_lengths") or [None] * len(names))
    stamps = tuple((n, *_stamp(folder / n)) for n in names)
    cache = (str(folder.resolve()), split, stamps)
    if cache not in _VERIFIED:
        _VERIFIED[cache] = _verify(folder, split, names, lengths, entry)
    kept, problems, skipped = _VERIFIED[cache]
    if problems and not allow:
        raise _damage_error(f"'{folder}' split '{split}'", problems)
    if problems and (str(folder), split) not in _DAMAGE:
        log.warning("'%s' split '%s': %s; left out (allow_damaged): %d samples skipped", folder, split,
                    "; ".join(problems), skipped)
        _DAMAGE[(str(folder), split)] = Damage(str(folder), split, problems, skipped)
    return list(kept)


def _verify(folder: Path, split: str, names: list[str], lengths: list, entry: dict) -> tuple[list[str], list[str], int]:
    """(shards kept, problems, samples of the shards left out) of one split of a local folder."""
    digests = entry.get("sha256") or {}
    problems, kept, skipped = [], [], 0
    if len(lengths) != len(names):
        raise ShardError(f"{folder / INFO_NAME}: split '{split}' lists {len(names)} shards but {len(lengths)} "
                         "shard_lengths")
    declared = entry.get("num_samples")
    if declared is not None and all(n is not None for n in lengths) and declared != sum(lengths):
        raise ShardError(f"{folder / INFO_NAME}: split '{split}' declares {declared} samples but its shard_lengths "
                         f"add up to {sum(lengths)}")
    for name, length in zip(names, lengths, strict=True):
        path = folder / name
        problem = None
        if not path.is_file():
            problem = f"shard {name} is missing"
        elif name in digests and sha256_file(path) != digests[name]:
            problem = f"shard {name} differs from the sha256 recorded when it was written (damaged or changed)"
        if problem is None:
            kept.append(name)
        else:
            problems.append(problem)
            skipped += length or 0
    return kept, problems, skipped


def _stamp(path: Path) -> tuple[int | None, int | None]:
    """(size, mtime) of a file, (None, None) when it is missing: a changed shard is verified again."""
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


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
    `sources` (every folder's `source`) and `locations` added. A local folder's shards are checked against its
    `_info.json` first (`verify_folder`).
    """
    urls, info, _ = _resolve(location, split)
    return urls, info


def _resolve(location: str | Path | list[str], split: str | None) -> tuple[list[str], dict | None, dict[str, int]]:
    """`resolve_shards` plus the recorded sample count of each shard URL (those `_info.json` lists)."""
    if isinstance(location, (list, tuple)):
        if len(location) == 1:
            return _resolve(location[0], split)
        resolved = [_resolve(item, split) for item in location]
        infos = [info for _, info, _ in resolved]
        urls = [u for found, _, _ in resolved for u in found]
        lengths = {u: n for _, _, found in resolved for u, n in found.items()}
        if all(info is None for info in infos):
            return urls, None, lengths
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
        return urls, merged, lengths
    loc = str(location)
    is_dir = Path(loc).is_dir()
    if not is_dir and INFO_NAME not in loc:
        urls = list(wds.shardlists.expand_urls(loc))
        if not urls:
            raise ShardError(f"shard location '{loc}' expands to no shard")
        return urls, None, {}
    info = read_location_info(loc)
    splits = info["splits"]
    split = split or next(iter(splits))
    if split not in splits:
        raise ShardError(f"split '{split}' not found at '{loc}'; it has: {', '.join(splits) or 'none'}")
    names = splits[split]["filenames"]
    recorded = dict(zip(names, splits[split].get("shard_lengths") or [], strict=False))
    local = Path(loc) if is_dir else Path(loc).parent if Path(loc).is_file() else None
    if local is not None:
        names = verify_folder(local, split, info)
        urls = [str(local / n) for n in names]
    else:
        at = loc.rfind(INFO_NAME)
        urls = [loc[:at] + n + loc[at + len(INFO_NAME):] for n in names]
    return urls, info, {u: recorded[n] for u, n in zip(urls, names, strict=True) if n in recorded}


def list_keys(location: str | Path | list[str], split: str | None = None) -> list[str]:
    """Every sample key of `split`, in shard order (reads the shards, without decoding)."""
    urls, _, lengths = _resolve(location, split)
    counter = SkipCounter(strict=not _ALLOW_DAMAGED, record=_SKIP_RECORD)
    return [sample["__key__"] for url in urls for sample in _shard_samples(url, counter, lengths.get(url))]


class SkipCounter:
    """What one reader process could not read. Strict (damage not allowed): a `ShardError` naming the shard and
    the sample; otherwise counted and logged with the same names."""

    def __init__(self, strict: bool = False, record: Path | None = None) -> None:
        self.count = 0
        self.strict = strict
        self.record = record  # a file each skip is appended to (`allow_damaged`), from any process
        self._recorded: set[str] = set()

    def skip(self, where: str, reason: str, samples: int = 1) -> None:
        if self.strict:
            raise ShardError(f"{where}: {reason} (pass allow_damaged=true to skip damaged data and count it)")
        self.count += samples
        log.warning("skipping %s: %s (%d skipped so far in this reader)", where, reason, self.count)
        if self.record is not None and samples and where not in self._recorded:
            self._recorded.add(where)
            fields = [where, str(samples), reason]
            line = "\t".join(f.replace("\t", " ").replace("\n", " ") for f in fields) + "\n"
            with open(self.record, "a") as f:  # one short append per line: whole lines from every process
                f.write(line)

    def for_shard(self, url: str, counted: bool = True) -> Callable[[Exception], bool]:
        """A webdataset handler for errors while reading the tar at `url`; `counted=False` when the shard's
        samples are counted against `_info.json` afterwards (which then counts what the error cost)."""
        def handler(exn: Exception) -> bool:
            self.skip(f"shard {url}", _describe(exn), 1 if counted else 0)
            return True
        return handler


def _describe(exn: Exception) -> str:
    """`Type: message` without the raw bytes or stream objects webdataset appends to an exception's args."""
    text = next((a for a in exn.args if isinstance(a, str)), "")
    text = text.split(" @ <")[0]  # webdataset appends " @ <stream object>"
    return f"{type(exn).__name__}: {text[:300]}" if text else type(exn).__name__


def _shard_samples(url: str, counter: SkipCounter, expected: int | None) -> Iterator[dict]:
    """The raw samples of one shard, then its sample count compared with the recorded one."""
    found = 0
    for sample in wds.tarfile_to_samples(handler=counter.for_shard(url, expected is None))(iter([{"url": url}])):
        found += 1
        yield sample
    if expected is not None and found != expected:
        counter.skip(f"shard {url}", f"{found} samples read, _info.json records {expected}", max(expected - found, 0))


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
            except ShardError as exn:  # already names the sample and its shard
                counter.skip("a sample", str(exn))
            except Exception as exn:  # a corrupt sample: skipped and counted, or fatal when strict
                counter.skip(f"sample '{sample.get('__key__') or sample.get('key')}'"
                             f"{' of ' + sample['__url__'] if '__url__' in sample else ''}", _describe(exn))
    return stage


class _EvalSource(torch.utils.data.IterableDataset):
    """Every sample once over all (rank, worker) readers; see the module docstring."""

    def __init__(self, urls: list[str], handler: SkipCounter, lengths: dict[str, int] | None = None):
        self.urls = urls
        self.handler = handler
        self.lengths = lengths or {}

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, num_workers = pytorch_worker_info()
        reader, readers = rank * num_workers + worker, world * num_workers
        by_shard = len(self.urls) >= readers
        shards = self.urls[reader::readers] if by_shard else self.urls
        i = 0
        for url in shards:
            for sample in _shard_samples(url, self.handler, self.lengths.get(url)):
                if by_shard or i % readers == reader:
                    yield sample
                i += 1


def repeat_factors(location: str | Path | list[str], split: str | None, threshold: float,
                   keys: Collection[str] | None = None) -> dict[str, float]:
    """Repeat factors that show images of rare classes more often (repeat-factor sampling, Gupta et al., LVIS
    2019; detectron2's `RepeatFactorTrainingSampler`), per sample key of `split` (of the `keys` subset when given).

    With f_c the share of those images whose mask holds defect class c, class c gets r_c = max(1,
    sqrt(threshold / f_c)) and an image the largest r_c of the classes it holds (1 without a defect): with
    `threshold` 0.3 a class present in 3 % of the images is seen about 3.2 times as often, one present in 30 % or
    more is not repeated, and a single-class dataset whose every image holds the class is read unchanged. Reads
    the masks only (no image is decoded).
    """
    urls, _, lengths = _resolve(location, split)
    counter = SkipCounter(strict=not _ALLOW_DAMAGED, record=_SKIP_RECORD)
    wanted = frozenset(keys) if keys is not None else None
    present: dict[str, np.ndarray] = {}
    for url in urls:
        for sample in _shard_samples(url, counter, lengths.get(url)):
            key = sample.get("__key__")
            if (wanted is not None and key not in wanted) or "mask.png" not in sample:
                continue  # a sample without its mask is the decoder's to report
            values = np.unique(np.asarray(Image.open(io.BytesIO(sample["mask.png"]))))
            present[key] = values[(values > 0) & (values != 255)]  # 255: ignored pixels (co-training)
    if not present:
        return {}
    ids, counts = np.unique(np.concatenate(list(present.values())), return_counts=True)
    per_class = {int(c): max(1.0, float(np.sqrt(threshold / (n / len(present))))) for c, n in zip(ids, counts,
                                                                                                   strict=True)}
    return {key: max((per_class[int(c)] for c in values), default=1.0) for key, values in present.items()}


class _CyclicSource(torch.utils.data.IterableDataset):
    """Training stream: pass after pass over the shards, each pass shuffled by `(seed, pass)`.

    Every reader computes the same endless shard sequence and takes its own part of it: every n-th shard
    when there are at least as many shards as readers, else every n-th sample. Readers never see the same
    sample within a pass, and none runs dry. When every shard has been read in a row without a sample, that is
    an error rather than an endless loop (a shard that is readable ends the streak). `repeats` (key -> factor
    r >= 1, `repeat_factors`) yields a sample floor(r) times, once more with probability r - floor(r) (a coin
    seeded by the seed and the reader); the shuffle buffer downstream spreads the copies, each cropped anew.
    """

    def __init__(self, urls: list[str], handler: SkipCounter, seed: int, keys: frozenset[str] | None = None,
                 lengths: dict[str, int] | None = None, repeats: dict[str, float] | None = None):
        self.urls, self.handler, self.seed, self.keys = urls, handler, seed, keys
        self.lengths = lengths or {}
        self.repeats = repeats or {}

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
        position, barren, distinct = 0, set(), set(self.urls)
        coin = random.Random(make_seed(self.seed, reader, 8191))
        for url in shards:
            found = 0
            for sample in _shard_samples(url, self.handler, self.lengths.get(url)):
                if self.keys is not None and sample.get("__key__") not in self.keys:
                    continue
                found += 1
                if by_shard or position % readers == reader:
                    r = self.repeats.get(sample.get("__key__"), 1.0)
                    copies = int(r) + (coin.random() < r - int(r)) if r > 1.0 else 1
                    yield sample
                    for _ in range(copies - 1):  # the extra copies of a repeated sample, each its own dict
                        yield dict(sample)
                position += 1
            barren = set() if found else barren | {url}
            if barren == distinct:  # every shard read in a row without a sample: nothing left to read
                raise ShardError(f"no readable{' selected' if self.keys is not None else ''} sample in any of the "
                                 f"{len(distinct)} shards (first: {self.urls[0]})")


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
                 keys: Collection[str] | None = None, compact: bool = False,
                 repeats: dict[str, float] | None = None) -> wds.DataPipeline:
    """The WebDataset pipeline over `split` at `location`, decoding to tensors.

    `resampled=True` needs `epoch_samples`, the number of samples per epoch over all ranks. `shuffle` is a
    buffer size (0 = keep shard order). `transform` runs on each decoded sample (for example a crop) inside
    the loader workers. `keys` restricts the pipeline to those sample keys (a few-shot subset, see
    `list_keys`). `compact=True` decodes to uint8 tensors (see `decode_sample`). `repeats` (resampled only):
    per-key repeat factors from `repeat_factors`. The pipeline has `.classes`
    and `.info` (None without `_info.json`) attributes.
    """
    urls, info, lengths = _resolve(location, split)
    if info is not None:
        classes = info["classes"]
    if not classes:
        raise ShardError(f"'{location}' has no _info.json: pass classes=[background, ...] to read it")
    counter = SkipCounter(strict=not _ALLOW_DAMAGED, record=_SKIP_RECORD)
    stages: list = []
    if resampled:
        if not epoch_samples or epoch_samples < 1:
            raise ValueError("resampled=True needs epoch_samples >= 1 (samples per epoch over all ranks)")
        stages.append(_CyclicSource(urls, counter, seed, frozenset(keys) if keys is not None else None, lengths,
                                    repeats))
    else:
        stages.append(_EvalSource(urls, counter, lengths))
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
