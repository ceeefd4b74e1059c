"""`run_study`: a whole ViT-vs-CNN comparison from one study config (study/config.py).

Stages, in order, each skipped when its complete outputs exist (an interrupted study resumes where it stopped):
1. data: synthetic pretraining shards, the target data (generated or imported), optional 4K test scenes;
   with a `diffusion` section, then a diffusion model trained on some of those folders (their train splits)
   and the shards it generates (`data/diffusion`);
2. pretrain: each pretraining run, on the folders its `data` key names (default: the pretraining shards);
3. finetune: the grid models x training-set sizes x seeds, each from a pretrain run or from scratch;
4. evaluate: every fine-tuned model on the target's evaluation split and the 4K scenes, then the report.

Every run gets `study=<name>`, which groups it in W&B.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path

from defectforge.files import claim_output, write_atomic

from .config import DiffusionPlan, RealTarget, StudyPlan, load_study

log = logging.getLogger("study")


def _done(path: Path) -> bool:
    return path.is_file()


def _run_data(plan: StudyPlan, root: Path) -> dict[str, Path]:
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
            generate(spec, folder)  # keeps complete shards: a rerun only writes what is missing
        elif not _done(folder / "_info.json"):
            real: RealTarget = spec
            log.info("[data] %s: importing %s into %s", key, real.images, folder)
            import_folder(real.images, real.masks, folder, split_file=real.split_file, classes=list(real.classes),
                          name=real.name, val_ratio=float(real.val_ratio), mask_mode=real.mask_mode)
    if plan.diffusion is not None:
        data["diffusion"] = _run_diffusion(plan.diffusion, data, root)
    return data


def _run_diffusion(spec: DiffusionPlan, data: dict[str, Path], root: Path) -> Path:
    """Train the diffusion model on the named folders, then generate its shards; both resume."""
    from synth.generate import generate
    from synth.train_diffusion import train as train_diffusion

    run = root / "diffusion"
    pipeline = run / "pipeline"
    if _done(pipeline / "model_index.json"):
        log.info("[diffusion] model complete, skipped")
    else:
        log.info("[diffusion] training on %s", " + ".join(spec.on))
        train_diffusion(dataclasses.replace(spec.train, resume="latest"), [str(data[f]) for f in spec.on], run)
    folder = root / "data" / "diffusion"
    cfg = dataclasses.replace(spec.generate, backend=spec.backend, model_path=str(pipeline))
    cfg.validate()
    log.info("[data] diffusion: generating into %s (backend %s)", folder, cfg.backend)
    generate(cfg, folder)
    return folder


def _run_pretrain(plan: StudyPlan, data: dict[str, Path], root: Path) -> None:
    from pretrain.train import train as pretrain

    for name, (cfg, folders) in plan.pretrain.items():
        run = root / "pretrain" / name
        if _done(run / "model.safetensors"):
            log.info("[pretrain] %s: complete, skipped", name)
            continue
        log.info("[pretrain] %s on %s", name, " + ".join(folders))
        shards = [str(data[f]) for f in folders]
        pretrain(dataclasses.replace(cfg, resume="latest"), shards[0] if len(shards) == 1 else shards, run)


def _run_finetune(plan: StudyPlan, data: dict[str, Path], root: Path) -> list[str]:
    from finetune.train import train as finetune

    runs = []
    for name, (cfg, init) in plan.finetune.items():
        run = root / "finetune" / name
        runs.append(str(run))
        if _done(run / "model.safetensors"):
            log.info("[finetune] %s: complete, skipped", name)
            continue
        log.info("[finetune] %s (init: %s)", name, init or "scratch")
        finetune(dataclasses.replace(cfg, resume="latest", init=str(root / "pretrain" / init) if init else None),
                 str(data["target"]), run)
    return runs


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
    data = _run_data(plan, root)
    _run_pretrain(plan, data, root)
    runs = _run_finetune(plan, data, root)
    report = root / "report"
    shards = [str(data["target"])] + ([str(data["test_4k"])] if "test_4k" in data else [])
    newest = max((Path(r) / "model.safetensors").stat().st_mtime for r in runs)
    results = report / "results.json"
    if _done(results) and results.stat().st_mtime > newest and _done(report / "report.html"):
        log.info("[evaluate] report is newer than every model, skipped")
        return report / "report.html"
    log.info("[evaluate] %d models on %s", len(runs), ", ".join(shards))
    return evaluate(plan.evaluate, runs, shards, report, commands=[command_line(config, out, overrides)],
                    represent_runs=represent_runs(plan, root))


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
