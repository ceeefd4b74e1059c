"""The Accelerate training loop under `defectforge.training.run_task`: run folder, checkpoints, exact resume, logging.

`run_task` (pretrain, finetune, synth train-diffusion) supplies the model, optimizer, schedule, a loader factory
and a micro-step; `Run.fit` runs the steps. The config object needs these keys (the `TrainingKeys` of
defectforge/training.py plus each config's `name`): `name`,
`batch_size`, `grad_accum`, `max_steps`, `stop_after`, `lr`, `min_lr`, `warmup_steps`, `clip_grad`,
`mixed_precision`, `log_every`, `val_every`, `checkpoint_every`, `keep_checkpoints`, `resume`, `study`, `seed`,
`trace_samples`, `wandb`, `wandb_project`.

Resume is exact: the data stream of epoch `e` (one `checkpoint_every` interval) is seeded by `(seed, e)`,
a resumed run skips the batches its checkpoint already consumed in that epoch, and `load_state` restores
model, optimizer, schedule, step and every process's RNG.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load
from accelerate.utils import set_seed
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from defectforge.config import ConfigError, save_config, to_dict

from .files import claim_output, write_atomic
from .precision import resolve_mixed_precision
from .reader import SKIP_RECORD, allow_damaged, damage_found
from .tracking import MetricsLog, wandb_init_kwargs

log = logging.getLogger(__name__)
CKPT_RE = re.compile(r"^step-(\d+)$")
THREADS_ENV = "DEFECTFORGE_THREADS_FILE"


class ThreadShare:
    """The CPU compute threads a training process may use, changed from outside while it trains.

    A study that trains several runs side by side (`parallel` in the study config) writes each run's share of
    the machine's threads into a file named by `$DEFECTFORGE_THREADS_FILE`; the run's loop reads it (at most once
    a second) and calls `torch.set_num_threads` when it changed, so a run left alone gets the whole CPU back.
    The loop's own thread must make the call: OpenMP keeps the thread count per calling thread."""

    def __init__(self, path: str | Path, every: float = 1.0):
        self.path, self.every, self._checked = Path(path), every, -math.inf

    @classmethod
    def from_env(cls) -> ThreadShare | None:
        path = os.environ.get(THREADS_ENV)
        return cls(path) if path else None

    def write(self, threads: int) -> None:
        write_atomic(self.path, f"{int(threads)}\n")

    def read(self) -> int | None:
        """The share in the file; None when it is missing or not a positive integer (nothing changes then)."""
        try:
            threads = int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None
        return threads if threads >= 1 else None

    def apply(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.every:
            return
        self._checked = now
        threads = self.read()
        if threads is not None and threads != torch.get_num_threads():
            torch.set_num_threads(threads)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped without saving the bad state."""


class TrainState:
    """The loop's own counters, saved with every checkpoint."""

    def __init__(self) -> None:
        self.step = 0
        self.wandb_id = ""

    def state_dict(self) -> dict:
        return {"step": self.step, "wandb_id": self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.wandb_id = int(state["step"]), str(state["wandb_id"])


def make_accelerator(cfg: Any, run_dir: Path, mixed_precision: str) -> Accelerator:
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       gradient_accumulation_steps=cfg.grad_accum, log_with="wandb" if cfg.wandb else None,
                       project_dir=str(run_dir))


def lr_factor(cfg: Any) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine to min_lr / lr at max_steps; argument = optimizer steps taken."""
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a `.tmp` folder is an interrupted save and never counts)."""
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and CKPT_RE.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(CKPT_RE.match(p.name).group(1)))


def last_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(cfg: Any, run_dir: Path) -> Path | None:
    existing = checkpoints(run_dir)
    if cfg.resume is None:
        if existing:
            raise ConfigError(f"{run_dir} already holds checkpoints ({existing[-1].name}): pass resume=latest to "
                              "continue it, or choose a new --out")
        return None
    if cfg.resume == "latest":
        if not existing:
            log.info("resume=latest: no checkpoint in %s yet, starting from step 0", run_dir)
        return existing[-1] if existing else None
    path = Path(cfg.resume)
    if not (path / "model.safetensors").is_file() and not any(path.glob("pytorch_model*")):
        raise ConfigError(f"key 'resume': {path} is not a checkpoint folder (expected RUN/checkpoints/step-N)")
    return path


def save_objects(folder: Path, objects: Sequence[Any]) -> None:
    """Each object's `state_dict()` without pickle: its tensors as `state_<i>.safetensors`, the rest as
    `state_<i>.json` (the loop's counters, the schedule, the EMA weights)."""
    for i, obj in enumerate(objects):
        state = obj.state_dict()
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        rest = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
        if tensors:
            save_file(tensors, str(folder / f"state_{i}.safetensors"))
        try:
            (folder / f"state_{i}.json").write_text(json.dumps(rest))
        except TypeError as err:
            raise TypeError(f"the state of {type(obj).__name__} holds a value that is neither a tensor nor JSON: "
                            f"{err}") from err


def load_objects(folder: Path, objects: Sequence[Any]) -> None:
    """Restore what `save_objects` wrote; nothing here is unpickled, so a checkpoint cannot run code."""
    for i, obj in enumerate(objects):
        path = folder / f"state_{i}.json"
        if not path.is_file():
            raise ConfigError(f"cannot resume from {folder}: {path.name} is missing (a checkpoint of an older "
                              "version, or damaged); start a new run")
        state = json.loads(path.read_text())
        tensors = folder / f"state_{i}.safetensors"
        if tensors.is_file():
            state.update(load_file(str(tensors)))
        obj.load_state_dict(state)


def check_pickles(folder: Path) -> None:
    """Read every pickle of an Accelerate checkpoint (optimizer, RNG states) as Accelerate does, `weights_only`:
    one that holds more than tensors and plain values fails here, naming it, where Accelerate would skip a bad
    RNG state with an info line and resume inexactly."""
    for path in sorted([*folder.glob("*.pkl"), *folder.glob("*.bin")]):
        try:
            accelerate_load(path, map_location="cpu")
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ConfigError(f"cannot resume from {folder}: {path.name} holds more than tensors and plain values "
                              f"(or is damaged), refused unread: {str(err).splitlines()[0]}") from err


def save_checkpoint(accelerator: Accelerator, run_dir: Path, step: int, keep: int,
                    objects: Sequence[Any] = ()) -> Path:
    """`save_state` (model, optimizer, RNG) and `save_objects` into step-N.tmp, renamed to step-N once every
    process has written its part."""
    root = run_dir / "checkpoints"
    final, tmp = root / f"step-{step:07d}", root / f"step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        save_objects(tmp, objects)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def backward_and_step(accelerator: Accelerator, model, optimizer, losses: dict[str, torch.Tensor],
                      clip_grad: float | None) -> dict[str, float]:
    """Backward `losses["loss"]`; clip and step when Accelerate syncs, unless any process saw a non-finite loss.

    Returns every loss averaged over the processes (so all of them agree on stopping).
    """
    accelerator.backward(losses["loss"])
    if accelerator.sync_gradients and clip_grad is not None:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    names = list(losses)
    values = accelerator.reduce(torch.stack([losses[n].detach().float() for n in names]), reduction="mean")
    if torch.isfinite(values).all():  # never step on a non-finite loss: `fit` stops the run
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(zip(names, (float(v) for v in values.cpu()), strict=True))


class _Window:
    """Losses and seconds summed over the steps since the last log line."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds = 0, 0.0

    def add(self, losses: dict[str, float], seconds: float) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1
        self.seconds += seconds

    def flush(self) -> tuple[dict[str, float], int, float]:
        """(mean of each loss, steps, seconds), and start a new window."""
        out = ({k: v / self.steps for k, v in self.sums.items()}, self.steps, self.seconds)
        self.__init__()
        return out


class Run:
    """Accelerator, run folder, registered state, resume, trackers and `metrics.jsonl` of one training run."""

    def __init__(self, cfg: Any, run_dir: str | Path, *, job_type: str):
        self.cfg, self.run_dir, self.job_type = cfg, Path(run_dir), job_type
        mixed_precision, self.precision = resolve_mixed_precision(cfg.mixed_precision)
        self.accelerator = make_accelerator(cfg, self.run_dir, mixed_precision)
        # the shard readers' policy for this process; samples skipped while reading are listed in the run folder
        allow_damaged(cfg.allow_damaged, record=self.run_dir / SKIP_RECORD)
        self._damage_noted: dict[str, dict | None] = {"run_info": None, "metrics": None}
        if self.accelerator.is_main_process:
            claim_output(self.run_dir, "run")  # never a folder of the user's own files
        self.resume_from = resolve_resume(cfg, self.run_dir)
        self.state = TrainState()
        self.objects: list[Any] = [self.state]  # what `save_objects` checkpoints; `start` adds the rest
        self.metrics: MetricsLog | None = None
        self._trace: TextIO | None = None
        self._micro_step: Callable[[dict, bool], dict[str, torch.Tensor]] | None = None
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        set_seed(cfg.seed)  # identical initial weights on every process

    def start(self, *objects: Any) -> None:
        """Register `objects` (schedule, EMA, ...) for checkpointing, load the checkpoint, open the trackers."""
        acc, cfg = self.accelerator, self.cfg
        # not Accelerate's register_for_checkpointing: it unpickles custom_checkpoint_*.pkl with
        # weights_only=False, so a crafted checkpoint would run code; these are saved as JSON + safetensors
        self.objects = [self.state, *objects]
        if self.resume_from is not None:
            foreign = sorted(p.name for p in self.resume_from.glob("custom_checkpoint_*"))
            if foreign:
                raise ConfigError(f"cannot resume from {self.resume_from}: it holds {', '.join(foreign)}, a pickle "
                                  "this project never writes (an older version's checkpoint, or a crafted one); "
                                  "refused unread")
            check_pickles(self.resume_from)
            try:
                acc.load_state(str(self.resume_from))  # model (safetensors), optimizer and RNG: weights_only
            except (RuntimeError, KeyError, ValueError) as err:
                raise ConfigError(f"cannot resume from {self.resume_from}: it does not match this config "
                                  f"({err})") from err
            load_objects(self.resume_from, self.objects)
            log.info("resumed from %s at step %d", self.resume_from, self.state.step)
        else:
            set_seed(cfg.seed + acc.process_index)  # augmentation and mixing differ per process
        if acc.is_main_process and not self.state.wandb_id:
            self.state.wandb_id = secrets.token_hex(4)  # kept in checkpoints: a resumed run continues the W&B run
        if cfg.wandb:
            acc.init_trackers(cfg.wandb_project, config=to_dict(cfg), init_kwargs={"wandb": wandb_init_kwargs(
                self.run_dir, name=cfg.name, group=cfg.study, run_id=self.state.wandb_id, job_type=self.job_type)})
        if acc.is_main_process:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl",
                                      resume_step=self.state.step if self.resume_from else None)

    def note_damage(self, step: int | None = None) -> None:
        """With `allow_damaged`: write what the readers left out so far into run_info.json ("data_damage") and,
        given the `step` (the metrics log is open), into metrics.jsonl ("skipped_samples"); each only when it
        changed, and nothing at all when the data was whole."""
        damage = damage_found()
        if damage is None or not self.accelerator.is_main_process:
            return
        if damage != self._damage_noted["run_info"]:
            path = self.run_dir / "run_info.json"
            info = json.loads(path.read_text()) if path.is_file() else {}
            write_atomic(path, json.dumps({**info, "data_damage": damage}, indent=2))
            self._damage_noted["run_info"] = damage
        if step is not None and damage != self._damage_noted["metrics"]:
            self.record({"skipped_samples": damage["skipped_samples"]}, step)
            self._damage_noted["metrics"] = damage

    def note_info(self, **entries: Any) -> None:
        """Merge `entries` into RUN/run_info.json (main process)."""
        if not self.accelerator.is_main_process:
            return
        path = self.run_dir / "run_info.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        write_atomic(path, json.dumps({**info, **entries}, indent=2) + "\n")

    def record(self, values: dict, step: int) -> None:
        if self.metrics is not None:
            self.metrics.write({"step": step, **values})
        self.accelerator.log({k: v for k, v in values.items() if isinstance(v, int | float)}, step=step)

    def log_images(self, images: dict, step: int) -> None:
        """W&B images (main process, when W&B is on)."""
        if self.accelerator.is_main_process and self.accelerator.trackers:
            self.accelerator.get_tracker("wandb", unwrap=True).log(images, step=step)

    def save_image(self, grid: np.ndarray, path: Path, *, key: str, step: int, caption: str = "",
                   wandb_value: Callable[[], Any] | None = None) -> None:
        """Write a uint8 grid as a PNG in the run folder (atomically) and log it to W&B under `key`.

        `wandb_value` builds what W&B gets instead of the plain image (for example mask panels); it is only
        called when a W&B tracker is open. Main process only.
        """
        if not self.accelerator.is_main_process:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(grid).save(png, format="PNG")
        write_atomic(path, png.getvalue())
        if self.accelerator.trackers:
            import wandb

            self.log_images({key: wandb_value() if wandb_value else wandb.Image(grid, caption=caption)}, step=step)

    def fit(self, model, optimizer, scheduler, *, make_loader: Callable[[int, int], Iterable[dict]],
            micro_step: Callable[[dict, bool], dict[str, torch.Tensor]], validate: Callable[[int], dict] | None,
            ema=None, progress: bool = True, desc: str = "train") -> int:
        """Run optimizer steps from the resumed step to `stop_after` or `max_steps`; returns the last step.

        `make_loader(epoch, batches)` yields at least `batches` batches (dicts with a "key" list) seeded by the
        epoch; `micro_step(batch, first)` returns scalar losses with "loss" first, computed by the stage's
        forward; `validate(step)` returns flat metrics to record.
        """
        cfg, end = self.cfg, self.cfg.stop_after or self.cfg.max_steps
        step = self.state.step
        self._micro_step = micro_step
        if cfg.trace_samples:
            (self.run_dir / "samples").mkdir(parents=True, exist_ok=True)
            self._trace = (self.run_dir / "samples" / f"rank-{self.accelerator.process_index}.txt").open("a")
        show = progress and self.accelerator.is_local_main_process
        bar = tqdm(total=end, initial=step, desc=desc, disable=not show)
        window = _Window()
        threads = ThreadShare.from_env()  # set when a study trains this run beside others
        try:
            while step < end:
                epoch = step // cfg.checkpoint_every
                epoch_end = min((epoch + 1) * cfg.checkpoint_every, cfg.max_steps, end)
                batches = self._epoch_batches(make_loader, epoch, step)
                while step < epoch_end:
                    if threads is not None:
                        threads.apply()
                    started = time.perf_counter()
                    window.add(self._optimizer_step(model, optimizer, batches, step), time.perf_counter() - started)
                    scheduler.step()
                    step += 1
                    self.state.step = step
                    if ema is not None:  # step = optimizer steps done, as timm counts them (no decay on the first)
                        ema.update(self.accelerator.unwrap_model(model, keep_torch_compile=False), step=step)
                    bar.update(1)
                    self._after_step(step, end, epoch, optimizer, window, validate, bar)
            self.accelerator.wait_for_everyone()
        finally:
            bar.close()
            if self._trace is not None:
                self._trace.close()
                self._trace = None
        return step

    def _epoch_batches(self, make_loader: Callable[[int, int], Iterable[dict]], epoch: int, step: int) -> Iterator:
        """The batches of data epoch `epoch`, past those a resumed run already consumed in it."""
        cfg = self.cfg
        epoch_end = min((epoch + 1) * cfg.checkpoint_every, cfg.max_steps)
        batches = iter(make_loader(epoch, (epoch_end - epoch * cfg.checkpoint_every) * cfg.grad_accum))
        for _ in range((step - epoch * cfg.checkpoint_every) * cfg.grad_accum):
            next(batches)
        return batches

    def _optimizer_step(self, model, optimizer, batches: Iterator, step: int) -> dict[str, float]:
        """`grad_accum` micro-batches and one optimizer step; the losses averaged over them. Non-finite: stop."""
        acc, cfg = self.accelerator, self.cfg
        totals: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            if self._trace is not None:
                self._trace.write(f"{step + 1} " + " ".join(batch["key"]) + "\n")
            with acc.accumulate(model):
                losses = backward_and_step(acc, model, optimizer, self._micro_step(batch, step == micro == 0),
                                           cfg.clip_grad)
            if not all(math.isfinite(v) for v in losses.values()):
                detail = ", ".join(f"{k} {v}" for k, v in losses.items())
                raise NonFiniteLoss(f"non-finite loss at step {step + 1} ({detail}); stopped without saving, "
                                    f"last good checkpoint: {last_checkpoint(self.run_dir)}")
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.grad_accum
        return totals

    def _after_step(self, step: int, end: int, epoch: int, optimizer, window: _Window,
                    validate: Callable[[int], dict] | None, bar) -> None:
        """Log every `log_every` steps, validate every `val_every`, checkpoint every `checkpoint_every`."""
        cfg, acc = self.cfg, self.accelerator
        if step % cfg.log_every == 0 or step == end:
            means, steps, seconds = window.flush()
            self.record({**means, "lr": max(g["lr"] for g in optimizer.param_groups),
                         "images_per_s": steps * cfg.batch_size * cfg.grad_accum * acc.num_processes / seconds,
                         "epoch": epoch}, step)
            bar.set_postfix(loss=f"{means['loss']:.4f}")
        if validate is not None and (step % cfg.val_every == 0 or step == cfg.max_steps):
            self.record(validate(step), step)
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint(acc, self.run_dir, step, cfg.keep_checkpoints, self.objects)

    def end(self) -> None:
        self.accelerator.end_training()  # also ends the process group: no collective after this
