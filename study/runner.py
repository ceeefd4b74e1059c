"""`run_study`: a whole ViT-vs-CNN comparison from one study config (study/config.py).

Stages, in order, each skipped when its complete outputs exist (an interrupted study resumes where it stopped):
1. data: synthetic pretraining shards, the target data (generated or imported), optional 4K test scenes;
   with a `diffusion` section, then a diffusion model trained on some of those folders (their train splits)
   and the shards it generates (`data/diffusion`);
2. pretrain: each pretraining run, on the folders its `data` key names (default: the pretraining shards);
3. finetune: the grid models x training-set sizes x seeds, each from a pretrain run or from scratch;
   with `parallel: N` on a CPU, stages 2 and 3 train up to N runs at once, a fine-tuning starting as soon as the
   run it starts from is complete (study/parallel.py);
4. evaluate: every fine-tuned model on the target's evaluation split and the 4K scenes, then the report.

Every run gets `study=<name>`, which groups it in W&B. The wall time of every step (each data folder, pretraining,
fine-tuning and the evaluation) is written to `timings.json` in the study folder as it ends, with the machine it
ran on, and printed at the end (`time_summary`); a step skipped on a resumed run keeps its earlier measurement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from defectforge.files import claim_output, write_atomic

from .config import DiffusionPlan, RealTarget, StudyPlan, load_study
from .parallel import Job, run_jobs, trainer

log = logging.getLogger("study")


def _done(path: Path) -> bool:
    return path.is_file()


TIMINGS = "timings.json"


class StageClock:
    """Wall seconds of each study step, kept in `root/timings.json` (rewritten whole after every step, so an
    interrupted study keeps what it measured). Entries: {"stage", "name", "seconds", "started" (epoch seconds),
    "measured_at" (its end), "machine"}; a
    step that a resumed run skips keeps its entry from the run that did it, and a step resumed after an
    interruption records the time of its last part only."""

    def __init__(self, root: Path):
        from defectforge.precision import cpu_signature

        self.path = root / TIMINGS
        self.steps: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.steps = {f"{e['stage']}/{e['name']}": e for e in json.loads(self.path.read_text())["steps"]}
            except (ValueError, KeyError, TypeError) as err:  # damaged: the earlier times are lost, not the study
                log.warning("%s is not a timings file (%s): the earlier steps' times are dropped", self.path, err)
        self.machine = cpu_signature()

    @contextmanager
    def measure(self, stage: str, name: str):
        started, start = time.time(), time.perf_counter()
        yield
        self.record(stage, name, started, time.perf_counter() - start)

    def record(self, stage: str, name: str, started: float, seconds: float) -> None:
        """One step's wall `seconds` from `started` (epoch seconds; steps that ran side by side overlap)."""
        end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started + seconds))
        self.steps[f"{stage}/{name}"] = {"stage": stage, "name": name, "seconds": round(seconds, 3),
                                         "started": round(started, 3), "measured_at": end, "machine": self.machine}
        write_atomic(self.path, json.dumps({"steps": list(self.steps.values())}, indent=2) + "\n")


def _measure(clock: StageClock | None, stage: str, name: str):
    """`clock.measure(stage, name)`, or nothing measured without a clock (a step that has nothing to do)."""
    return clock.measure(stage, name) if clock is not None else nullcontext()


def _run_data(plan: StudyPlan, root: Path, clock: StageClock | None = None) -> dict[str, Path]:
    from synth.generate import generate
    from synth.importer import import_folder

    data: dict[str, Path] = {}
    # a folder drawn on another one's images (`labeled_dir: target`) is made after it
    for key in sorted(plan.data, key=lambda k: k in plan.labeled_from):
        kind, spec = plan.data[key]
        folder = root / "data" / key
        data[key] = folder
        if key in plan.labeled_from:
            spec = dataclasses.replace(spec, labeled_dir=str(data[plan.labeled_from[key]]))
            spec.validate()
        if kind == "synth":
            log.info("[data] %s: generating into %s", key, folder)
            with _measure(None if _done(folder / "_info.json") else clock, "data", key):
                generate(spec, folder)  # keeps complete shards: a rerun only writes what is missing
        elif not _done(folder / "_info.json"):
            real: RealTarget = spec
            with _measure(clock, "data", key):
                log.info("[data] %s: importing %s into %s", key, real.images, folder)
                import_folder(real.images, real.masks, folder, split_file=real.split_file,
                              classes=list(real.classes), name=real.name, val_ratio=float(real.val_ratio),
                              mask_mode=real.mask_mode)
    if plan.diffusion is not None:
        data["diffusion"] = _run_diffusion(plan.diffusion, data, root, clock)
    return data


def _run_diffusion(spec: DiffusionPlan, data: dict[str, Path], root: Path, clock: StageClock | None = None) -> Path:
    """Train the diffusion model on the named folders, then generate its shards; both resume."""
    from synth.generate import generate
    from synth.train_diffusion import train as train_diffusion

    run = root / "diffusion"
    pipeline = run / "pipeline"
    if _done(pipeline / "model_index.json"):
        log.info("[diffusion] model complete, skipped")
    else:
        log.info("[diffusion] training on %s", " + ".join(spec.on))
        with _measure(clock, "diffusion", "train"):
            train_diffusion(dataclasses.replace(spec.train, resume="latest"), [str(data[f]) for f in spec.on], run)
    folder = root / "data" / "diffusion"
    cfg = dataclasses.replace(spec.generate, backend=spec.backend, model_path=str(pipeline))
    cfg.validate()
    log.info("[data] diffusion: generating into %s (backend %s)", folder, cfg.backend)
    with _measure(None if _done(folder / "_info.json") else clock, "data", "diffusion"):
        generate(cfg, folder)
    return folder


def _training_jobs(plan: StudyPlan, data: dict[str, Path], root: Path) -> list[Job]:
    """Every pretraining and fine-tuning run of the plan that is not complete yet, in the config's order."""
    jobs, pending_pretrain = [], set()
    for name, (cfg, folders) in plan.pretrain.items():
        run = root / "pretrain" / name
        if _done(run / "model.safetensors"):
            log.info("[pretrain] %s: complete, skipped", name)
            continue
        shards = [str(data[f]) for f in folders]
        jobs.append(Job("pretrain", name, dataclasses.replace(cfg, resume="latest"),
                        shards[0] if len(shards) == 1 else shards, run))
        pending_pretrain.add(name)
    for name, (cfg, init) in plan.finetune.items():
        run = root / "finetune" / name
        if _done(run / "model.safetensors"):
            log.info("[finetune] %s: complete, skipped", name)
            continue
        cfg = dataclasses.replace(cfg, resume="latest", init=str(root / "pretrain" / init) if init else None)
        jobs.append(Job("finetune", name, cfg, str(data["target"]), run,
                        after=init if init in pending_pretrain else None))
    return jobs


def _side_by_side(plan: StudyPlan) -> bool:
    """`parallel` > 1 applies to a single-process study on a CPU (one GPU, or a distributed launch, trains one run at
    a time)."""
    import torch

    if plan.parallel <= 1:
        return False
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.info("parallel: %d applies to CPU studies; here the runs train one at a time", plan.parallel)
        return False
    return True


def _run_training(plan: StudyPlan, data: dict[str, Path], root: Path, clock: StageClock | None = None) -> list[str]:
    """Every pretraining run, then every fine-tuning (or up to `parallel` of them at once, study/parallel.py);
    returns the fine-tuning run folders."""
    jobs = _training_jobs(plan, data, root)
    if jobs and _side_by_side(plan):
        run_jobs(jobs, plan.parallel, root, clock.record if clock is not None else lambda *a: None)
    else:
        for job in jobs:
            log.info("[%s] %s on %s%s", job.stage, job.name, job.shards,
                     f" (init: {job.cfg.init})" if job.stage == "finetune" and job.cfg.init else "")
            with _measure(clock, job.stage, job.name):
                trainer(job.stage)(job.cfg, job.shards, job.run)
    return [str(root / "finetune" / name) for name in plan.finetune]


def represent_runs(plan: StudyPlan, root: Path) -> list[str]:
    """With `evaluate.overrides.represent: true`, the classification-pretrained runs join "how the models see"
    (the token/avg probe needs a pooled head); otherwise none."""
    if not plan.evaluate.represent:
        return []
    return [str(root / "pretrain" / name) for name, (cfg, _) in plan.pretrain.items()
            if cfg.objective == "classification"]


def command_line(config: str | Path, out: str | Path | None, overrides: list[str] | None) -> str:
    """The command that reruns this study (shown in the report)."""
    return "python -m study " + shlex.join([str(config)] + (["--out", str(out)] if out else []) + list(overrides or []))


def run_study(config: str | Path, out: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    """Run (or resume) the study in `config` into `out` (default runs/study/<name>); returns the report path."""
    from evaluate.run import evaluate

    plan = load_study(config, overrides)
    root = Path(out or Path("runs/study") / plan.name)
    claim_output(root, "study")
    write_atomic(root / "study.json", json.dumps({"config": str(config), "overrides": overrides or [],
                                                  "command": shlex.join(sys.argv)}, indent=2) + "\n")
    clock = StageClock(root)
    data = _run_data(plan, root, clock)
    runs = _run_training(plan, data, root, clock)
    report = root / "report"
    shards = [str(data["target"])] + ([str(data["test_4k"])] if "test_4k" in data else [])
    newest = max((Path(r) / "model.safetensors").stat().st_mtime for r in runs)
    results = report / "results.json"
    if _done(results) and results.stat().st_mtime > newest and _done(report / "report.html"):
        log.info("[evaluate] report is newer than every model, skipped")
        return report / "report.html"
    log.info("[evaluate] %d models on %s", len(runs), ", ".join(shards))
    with _measure(clock, "evaluate", "report"):
        return evaluate(plan.evaluate, runs, shards, report, commands=[command_line(config, out, overrides)],
                        represent_runs=represent_runs(plan, root))


def wall_seconds(steps: list[dict]) -> float:
    """The study's wall time over its steps: the union of their intervals (steps trained side by side overlap);
    the plain sum for entries without a start (written before starts were kept)."""
    if not all("started" in e for e in steps):
        return sum(e["seconds"] for e in steps)
    total, end = 0.0, -float("inf")
    for start, stop in sorted((e["started"], e["started"] + e["seconds"]) for e in steps):
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def time_summary(root: Path) -> list[str]:
    """The study's wall time per stage from `root/timings.json` (minutes; each step, then the total)."""
    path = Path(root) / TIMINGS
    if not path.is_file():
        return []
    steps = json.loads(path.read_text()).get("steps", [])
    if not steps:
        return []
    if all("started" in e for e in steps):  # in the order the steps started (runs side by side end out of order)
        steps = sorted(steps, key=lambda e: e["started"])
    by_stage: dict[str, list[dict]] = {}
    for e in steps:
        by_stage.setdefault(e["stage"], []).append(e)
    parts = [f"{stage} " + " + ".join(f"{e['seconds'] / 60:.1f}" for e in entries)
             for stage, entries in by_stage.items()]
    total = wall_seconds(steps)
    machines = sorted({e.get("machine", "?") for e in steps})
    return [f"time (min, wall): {'; '.join(parts)}; total {total / 60:.1f} ({TIMINGS}; "
            f"machine: {' / '.join(machines)})"]


def summary(report_html: Path) -> list[str]:
    """What a study's console shows at the end: each model's accuracy and whether it learned, then every claim
    with its verdict and evidence (interval included), read from the report's results.json."""
    path = Path(report_html).with_name("results.json")
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    lines = ["models (defect mIoU, mIoU, learned; then the same per evaluation source):"]
    for r in data.get("results", []):
        m = r.get("metrics") or {}
        learned = "yes" if r.get("learned") else f"did not learn ({r.get('learned_reason')})"
        per_source = "".join(f"; {name} {v['defect_mIoU']:.3f}, {v['mIoU']:.3f}"
                             for name, v in (m.get("by_source") or {}).items()) if len(m.get("by_source") or {}) > 1 \
            else ""
        lines.append(f"  {r['name']}: {m.get('defect_mIoU', float('nan')):.3f}, {m.get('mIoU', float('nan')):.3f}, "
                     f"{learned}{per_source}")
    lines.append("claims:")
    for c in data.get("claims", []):
        lines.append(f"  {c['claim']}: {c['verdict']} ({c['evidence']})")
    return lines
