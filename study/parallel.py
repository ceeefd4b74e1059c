"""Training runs side by side on a CPU (`parallel: N` in a study config).

One training run does not keep every core of a small CPU busy: its step leaves cores waiting on the data, on
Python and on memory. With `parallel: N` the study trains up to N runs at once, each in its own process, and
splits the CPU's compute threads among the runs going at that moment: when one ends, the others get its threads
back while they train (`defectforge.loop.ThreadShare`). A fine-tuning that starts from a pretraining run waits
for it; runs that something waits on start first. Each process writes its log to `<study>/logs/<stage>-<run>.log`;
the console shows one progress bar per run, read from the runs' metrics.jsonl.

Nothing about a run's result depends on it: each run has its own seed, data stream and checkpoints, and resumes
like a run started alone. What changes is the wall time of each run (they share the CPU) and the study's total.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from defectforge.loop import THREADS_ENV, ThreadShare
from defectforge.tracking import read_metrics

log = logging.getLogger("study")
POLL_S = 1.0


class JobFailed(RuntimeError):
    """A training run that a study started in its own process ended with an error."""


@dataclass
class Job:
    """One training run of a study: `stage` is "pretrain" or "finetune"; `after` names the pretrain job whose model
    it starts from (it waits for it)."""
    stage: str
    name: str
    cfg: Any
    shards: str | list[str]
    run: Path
    after: str | None = None

    @property
    def key(self) -> str:
        return f"{self.stage}/{self.name}"

    @property
    def log_name(self) -> str:
        return f"{self.stage}-{self.name}.log"


def trainer(stage: str):
    """The `train(cfg, shards, run_dir, *, progress)` of a stage ("pretrain" or "finetune")."""
    if stage == "pretrain":
        from pretrain.train import train
    else:
        from finetune.train import train
    return train


def shares(total: int, running: int) -> list[int]:
    """`total` threads split among `running` runs, at least one each, the remainder to the first ones."""
    base, extra = divmod(total, running)
    return [max(1, base + (i < extra)) for i in range(running)]


def order(jobs: list[Job]) -> list[Job]:
    """Jobs that another waits for first (they are on the longest path), then the config's order."""
    waited_on = {j.after for j in jobs if j.after}
    return sorted(jobs, key=lambda j: j.name not in waited_on or j.stage != "pretrain")


def _end_with_parent(parent: int) -> None:
    """Kill this process when the study's process is gone (killed, say): a run left training on its own would
    race the rerun that resumes it. Checked every second from a daemon thread."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-study", daemon=True).start()


def _child(stage: str, cfg: Any, shards: Any, run: str, share: str, log_path: str, parent: int, method: str) -> None:
    """A training run in its own process: output to its log file, threads from its share file, ended with the
    study's process, its data loader workers started as the study's would be (a spawned process defaults to spawn,
    which the shard pipeline's closures cannot be pickled for)."""
    _end_with_parent(parent)
    mp.set_start_method(method, force=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    os.environ[THREADS_ENV] = share
    # the thread count is left at the machine's until the loop reads its share: the CPU precision choice
    # (defectforge/precision.py) was made by the study for the machine's thread count and is found in its cache
    trainer(stage)(cfg, shards, run, progress=False)


def _progress(run: Path) -> int:
    try:
        return max((int(r.get("step", 0)) for r in read_metrics(run / "metrics.jsonl")), default=0)
    except (OSError, ValueError):  # not written yet, or a line being written
        return 0


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_jobs(jobs: list[Job], parallel: int, root: Path, record) -> None:
    """Run `jobs` up to `parallel` at a time, each in a spawned process; `record(stage, name, started, seconds)`
    is called as each one ends. A failed run stops the others (they resume from their checkpoints on the next
    call) and raises JobFailed with the end of its log."""
    import torch
    from tqdm.auto import tqdm

    from defectforge.precision import cpu_choice

    total = torch.get_num_threads()
    lanes = max(1, min(parallel, total))
    if not torch.cuda.is_available():
        cpu_choice()  # measured (or read) once here, for every process, before they share the CPU
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (root / "threads").mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    pending, running, pretrained = deque(order(jobs)), {}, set()  # pretrained: complete pretrain runs
    bars: dict[str, Any] = {}
    slots: list[str | None] = [None] * lanes  # the console line of each running job's progress bar
    log.info("training %d runs, up to %d at a time on %d threads (logs: %s)", len(jobs), lanes, total, logs)
    try:
        while pending or running:
            for key, (job, proc, started, share) in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[key]
                share.path.unlink(missing_ok=True)
                bars.pop(key).close()
                slots[slots.index(key)] = None
                if proc.exitcode != 0:
                    raise JobFailed(f"[{job.stage}] {job.name} failed (exit code {proc.exitcode}); "
                                    f"its log {logs / job.log_name} ends with:\n{_tail(logs / job.log_name)}")
                record(job.stage, job.name, started, time.time() - started)
                if job.stage == "pretrain":
                    pretrained.add(job.name)
                log.info("[%s] %s finished in %.1f min", job.stage, job.name, (time.time() - started) / 60)
            ready = [j for j in pending if j.after is None or j.after in pretrained]
            while ready and len(running) < lanes:
                job = ready.pop(0)
                pending.remove(job)
                share = ThreadShare(root / "threads" / job.key.replace("/", "-"))
                log_path = logs / job.log_name
                args = (job.stage, job.cfg, job.shards, str(job.run), str(share.path), str(log_path), os.getpid(),
                        mp.get_start_method())
                proc = ctx.Process(target=_child, name=job.key, args=args)
                proc.start()
                running[job.key] = (job, proc, time.time(), share)
                slot = slots.index(None)
                slots[slot] = job.key
                bars[job.key] = tqdm(total=job.cfg.stop_after or job.cfg.max_steps, desc=f"{job.stage} {job.name}",
                                     position=slot, leave=False, file=sys.stderr, mininterval=2.0)
                log.info("[%s] %s started (pid %d, log: %s)", job.stage, job.name, proc.pid, log_path)
            # every run going gets its share, a run just started its first (its loop reads the file once it trains)
            for (_job, _proc, _started, share), threads in zip(running.values(), shares(total, max(1, len(running))),
                                                              strict=False):
                if share.read() != threads:
                    share.write(threads)
            for key, bar in bars.items():
                step = _progress(running[key][0].run)
                if step > bar.n:
                    bar.update(step - bar.n)
            if pending and not running:
                missing = sorted({j.after for j in pending})
                raise JobFailed(f"runs {[j.name for j in pending]} wait for pretrain runs that are not in the study: "
                                f"{missing}")
            time.sleep(POLL_S)
    finally:
        for _job, proc, _started, _share in running.values():
            proc.terminate()
        for _job, proc, _started, _share in running.values():
            proc.join(30)
        for bar in bars.values():
            bar.close()

