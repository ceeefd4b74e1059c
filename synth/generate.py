"""`synth generate`: render samples in worker processes and write them into shards, resumably.

The output is fixed by the config alone. Samples are numbered globally (train first, then val), shard k of a
split holds a fixed index range, and each sample is seeded from `(seed, index)`. Worker count and process
count therefore change the speed, never the bytes. Under `accelerate launch`, process r writes the shards
j with j % world == r; process 0 writes `_info.json` once every shard exists.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm import tqdm

from defectforge.config import ConfigError, save_config, to_dict
from defectforge.files import claim_output
from defectforge.shards import (
    INFO_NAME,
    TMP_SUFFIX,
    Sample,
    ShardError,
    ShardRecord,
    decode_raw,
    encode_sample,
    iter_raw_samples,
    read_folder_info,
    sha256_file,
    shard_name,
    write_info,
    write_shard,
)

from .compose import render_sample
from .config import SynthConfig, background_files
from .labeled import LabeledSource, labeled_source

log = logging.getLogger(__name__)
CONFIG_NAME = "config.yaml"
# Keys that change how fast the output is made but not what it is.
NON_OUTPUT_KEYS = ("workers",)


@dataclass(frozen=True)
class ShardPlan:
    split: str
    index: int
    start: int
    stop: int

    @property
    def filename(self) -> str:
        return shard_name(self.split, self.index)


def plan_shards(cfg: SynthConfig) -> list[ShardPlan]:
    """Every shard of the output, in order, with the global sample range it holds."""
    n_val = cfg.num_val
    ranges = {"train": (0, cfg.num_samples - n_val), "val": (cfg.num_samples - n_val, cfg.num_samples)}
    plan = []
    for split, (a, b) in ranges.items():
        for k, start in enumerate(range(a, b, cfg.shard_size)):
            plan.append(ShardPlan(split, k, start, min(start + cfg.shard_size, b)))
    return plan


def sample_key(index: int) -> str:
    return f"{index:08d}"


# Worker state, set once per worker process by `_init_worker` so that each task sends only an index.
_CFG: SynthConfig | None = None
_BACKGROUNDS: list[Path] | None = None
_LABELED: LabeledSource | None = None


def _labeled(cfg: SynthConfig) -> LabeledSource | None:
    return labeled_source(cfg.labeled_dir, cfg.labeled_split, list(cfg.defects)) if cfg.labeled_dir else None


def _init_worker(cfg: SynthConfig) -> None:
    global _CFG, _BACKGROUNDS, _LABELED
    _CFG = cfg
    _BACKGROUNDS = background_files(cfg.background_dir) if cfg.background_dir else None
    _LABELED = _labeled(cfg)  # the index of the labeled split: where each image and mask lie in its shard


def _make_sample(index: int) -> Sample | tuple:
    """The encoded sample; for a diffusion backend the rendered arrays, which the main process diffuses."""
    assert _CFG is not None, "worker not initialised"
    image, mask, meta = render_sample(_CFG, index, _BACKGROUNDS, _LABELED)
    if _CFG.backend != "procedural":
        return image, mask, meta
    return encode_sample(sample_key(index), image, mask, meta, _CFG.image_format, _CFG.jpeg_quality)


def _diffused(stream: Iterator, cfg: SynthConfig) -> Iterator[Sample]:
    """Diffusion on the rendered samples, in this process (the model is loaded once, on Accelerate's device).

    Procedural rendering stays in the `workers` processes and overlaps with the diffusion here.
    """
    from .diffusion import Diffuser

    with closing(stream):  # closing this generator also stops the render workers
        diffuser = Diffuser(cfg)
        for image, mask, meta in stream:
            image, meta = diffuser(image, mask, meta)
            yield encode_sample(sample_key(meta["index"]), image, mask, meta, cfg.image_format, cfg.jpeg_quality)


def _check_or_write_config(cfg: SynthConfig, out: Path, is_main: bool) -> None:
    path = out / CONFIG_NAME
    new = to_dict(cfg)
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        changed = [k for k in sorted(set(old) | set(new)) if k not in NON_OUTPUT_KEYS and old.get(k) != new.get(k)]
        if changed:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
            raise ConfigError(
                f"output folder '{out}' holds shards of another config ({diff}); "
                f"use another --out, or delete the folder to regenerate"
            )
    elif any(out.glob("*.tar")):
        raise ConfigError(f"output folder '{out}' holds shards but no {CONFIG_NAME}: not a folder this command made")
    if is_main:
        save_config(cfg, path)


def _dist_state():
    """(rank, world, barrier) of an `accelerate launch` run, or a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state.wait_for_everyone


def _samples(todo: list[ShardPlan], workers: int, cfg: SynthConfig) -> Iterator[Sample]:
    """Samples of `todo` in order, rendered by `workers` processes with a bounded number in flight."""
    indices = itertools.chain.from_iterable(range(p.start, p.stop) for p in todo)
    if workers <= 1:
        _init_worker(cfg)
        yield from map(_make_sample, indices)
        return
    # spawn, not fork: this may run inside an `accelerate launch` process that already started threads.
    # An executor, not a Pool: a worker that dies raises BrokenProcessPool instead of hanging the run.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg,)) as pool:
        window: deque = deque()
        for index in indices:
            window.append(pool.submit(_make_sample, index))
            if len(window) >= 4 * workers:  # bounds memory: encoded 4K samples are tens of MB each
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def generate(cfg: SynthConfig, out: str | Path, progress: bool = True) -> dict | None:
    """Write the shards of `cfg` into `out` and return the `_info.json` content (on process 0, else None).

    Complete shards already in `out` from an interrupted run of the same config are kept.
    """
    out = Path(out)
    cfg.check_labeled_backend()  # a config made by dataclasses.replace has not been validated
    if cfg.labeled_dir is not None and out.resolve() == Path(cfg.labeled_dir).resolve():
        raise ConfigError(f"key 'labeled_dir': '{cfg.labeled_dir}' is the output folder; use another --out")
    rank, world, barrier = _dist_state()
    if rank == 0:
        claim_output(out, "shards")  # a new, empty or earlier generator folder; never the user's own files
    barrier()
    _check_or_write_config(cfg, out, rank == 0)
    barrier()

    plan = plan_shards(cfg)
    mine = [p for j, p in enumerate(plan) if j % world == rank]
    for p in mine:  # leftovers of a killed run: never complete, so never trusted
        (out / (p.filename + TMP_SUFFIX)).unlink(missing_ok=True)
    recorded = _recorded_digests(out)
    records: dict[str, ShardRecord] = {}
    for p in mine:  # shards of an earlier run are kept only when they are still what was written
        path = out / p.filename
        problem = _kept_shard_problem(path, p, recorded.get(p.filename))
        if problem:
            log.warning("rank %d: %s %s: writing it again", rank, path, problem)
            path.unlink()
        elif path.exists() and p.filename in recorded:  # verified against its digest: not hashed again below
            records[p.filename] = ShardRecord(p.filename, p.stop - p.start, recorded[p.filename], path.stat().st_size)
    todo = [p for p in mine if not (out / p.filename).exists()]
    kept = len(mine) - len(todo)
    if kept:
        log.info("rank %d: keeping %d complete shard(s), writing %d", rank, kept, len(todo))
    workers = cfg.workers or os.cpu_count() or 1
    total = sum(p.stop - p.start for p in todo)
    with tqdm(total=total, desc=f"generate[{rank}]" if world > 1 else "generate", unit="img",
              disable=not progress or total == 0, position=rank) as bar:
        samples = _samples(todo, min(workers, max(total, 1)), cfg)
        if cfg.backend != "procedural" and total:
            samples = _diffused(samples, cfg)
        with closing(samples) as stream:
            for p in todo:
                chunk = itertools.islice(stream, p.stop - p.start)
                records[p.filename] = write_shard(out / p.filename, _counting(chunk, bar))
    barrier()
    info = None
    if rank == 0:
        info = _write_info(cfg, out, plan, records)
    barrier()
    return info


def _recorded_digests(out: Path) -> dict[str, str]:
    """sha256 per shard name from the `_info.json` of an earlier complete run in `out` ({} without one)."""
    try:
        info = read_folder_info(out)
    except ShardError:
        return {}
    return {name: digest for entry in info["splits"].values() for name, digest in (entry.get("sha256") or {}).items()}


def _kept_shard_problem(path: Path, plan: ShardPlan, digest: str | None) -> str | None:
    """Why the existing shard at `path` cannot be kept (None: keep it, or it does not exist). With a recorded
    sha256 the file must match it; without one (the first run was killed before writing `_info.json`) it is
    read again: the planned keys in order, each sample decodable."""
    if not path.exists():
        return None
    if digest is not None:
        return None if sha256_file(path) == digest else "differs from the sha256 recorded in _info.json"
    expected = [sample_key(i) for i in range(plan.start, plan.stop)]
    try:
        keys = []
        for raw in iter_raw_samples(path):
            decode_raw(raw)
            keys.append(raw["__key__"])
    except Exception as err:  # a truncated tar, a damaged member: any failure means "write it again"
        return f"cannot be read ({type(err).__name__}: {str(err)[:200]})"
    return None if keys == expected else f"holds {len(keys)} samples, not the planned {len(expected)}"


def _counting(samples, bar):
    for s in samples:
        yield s
        bar.update(1)


def _write_info(cfg: SynthConfig, out: Path, plan: list[ShardPlan], fresh: dict[str, ShardRecord]) -> dict:
    splits: dict[str, list[ShardRecord]] = {}
    for p in plan:
        path = out / p.filename
        if not path.exists():
            raise RuntimeError(f"shard '{path}' is missing after generation: another process failed")
        rec = fresh.get(p.filename) or ShardRecord(p.filename, p.stop - p.start, sha256_file(path),
                                                    path.stat().st_size)
        splits.setdefault(p.split, []).append(rec)
    extra: dict = {"image_size": list(cfg.size)}
    labeled = _labeled(cfg)
    if labeled is not None:
        extra["labeled"] = labeled.record()
    info = write_info(out, cfg.name, splits, cfg.classes, to_dict(cfg), source=cfg.backend, extra=extra)
    log.info("wrote %s with %d samples in %d shards", out / INFO_NAME, cfg.num_samples, len(plan))
    return info
