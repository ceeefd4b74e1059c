"""`python -m evaluate study configs/study/<name>.yaml`: a whole ViT-vs-CNN comparison from one config.

Stages, in order, each skipped when its complete outputs exist (an interrupted study resumes where it stopped):
1. data: synthetic pretraining shards, the target data (generated or imported), optional 4K test scenes;
   with a `diffusion` section, then a diffusion model trained on some of those folders (their train splits)
   and the shards it generates (`data/diffusion`);
2. pretrain: each pretraining run, on the folders its `data` key names (default: the pretraining shards);
3. finetune: the grid models x training-set sizes x seeds, each from a pretrain run or from scratch;
4. evaluate: every fine-tuned model on the target's evaluation split and the 4K scenes, then the report.

Every stage config is loaded and validated before the first stage runs, so a typo fails in a second, not
after an hour. Every run gets `study=<name>`, which groups it in W&B.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from defectforge.config import ConfigError, _closest, load_config, parse_overrides
from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig
from synth.compose import SynthConfig

from .config import EvalConfig

log = logging.getLogger("evaluate.study")
TOP_KEYS = ("name", "pretrain_data", "target", "test_4k", "diffusion", "pretrain", "finetune", "train_samples", "seeds",
            "evaluate")
DATA_FOLDERS = ("pretrain", "target", "diffusion")


def _check_keys(node: dict, known: tuple[str, ...], where: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: expected a mapping, found {type(node).__name__}")
    for key in node:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'{_closest(str(key), list(known))}; known keys: "
                              f"{', '.join(known)}")


def _stage(node: dict, schema: type, where: str, extra: dict | None = None):
    """A stage step {config: FILE, overrides: {...}} loaded and validated with `schema`."""
    _check_keys(node, ("config", "overrides", "name", "init", "data"), where)
    if "config" not in node:
        raise ConfigError(f"{where}: missing key 'config' (a YAML file of the stage)")
    overrides = {**(node.get("overrides") or {}), **(extra or {})}
    try:
        return load_config(schema, node["config"], overrides)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def load_study(path: str | Path, overrides: list[str] | None = None) -> dict:
    """The study plan with every stage config resolved and validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config '{path}' does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    for key, value in parse_overrides(overrides or []).items():
        node = raw
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    _check_keys(raw, TOP_KEYS, str(path))
    name = raw.get("name") or path.stem
    plan: dict[str, Any] = {"name": name, "data": {}, "pretrain": {}, "finetune": {}}
    study = {"study": name}
    if raw.get("pretrain_data"):
        plan["data"]["pretrain"] = ("synth", _stage(raw["pretrain_data"], SynthConfig, "pretrain_data"))
    target = raw.get("target")
    if not target:
        raise ConfigError(f"{path}: 'target' is required (synth: {{config, overrides}} or real: {{images, masks}})")
    _check_keys(target, ("synth", "real"), "target")
    if "synth" in target:
        plan["data"]["target"] = ("synth", _stage(target["synth"], SynthConfig, "target.synth"))
    elif "real" in target:
        real = dict(target["real"])
        _check_keys(real, ("images", "masks", "split_file", "classes", "mask_mode", "name", "val_ratio"), "target.real")
        for key in ("images", "masks"):
            if not Path(real.get(key, "")).is_dir():
                raise ConfigError(f"target.real.{key}: folder '{real.get(key)}' does not exist")
        plan["data"]["target"] = ("real", real)
    else:
        raise ConfigError("target: give 'synth' or 'real'")
    if raw.get("test_4k"):
        plan["data"]["test_4k"] = ("synth", _stage(raw["test_4k"], SynthConfig, "test_4k"))
    if raw.get("diffusion"):
        plan["diffusion"] = _diffusion_plan(raw["diffusion"], plan, study)
    for i, step in enumerate(raw.get("pretrain") or []):
        if "name" not in step:
            raise ConfigError(f"pretrain[{i}]: missing key 'name'")
        where = f"pretrain[{i}] ({step['name']})"
        cfg = _stage(step, PretrainConfig, where, study)
        folders = step.get("data") or ["pretrain" if "pretrain" in plan["data"] else "target"]
        _check_folders(folders, plan, f"{where}.data")
        plan["pretrain"][step["name"]] = (cfg, folders)
    sizes = raw.get("train_samples") or [None]
    seeds = raw.get("seeds") or [0]
    for i, step in enumerate(raw.get("finetune") or []):
        if "name" not in step:
            raise ConfigError(f"finetune[{i}]: missing key 'name'")
        init = step.get("init")
        if init is not None and init not in plan["pretrain"]:
            raise ConfigError(f"finetune[{i}] ({step['name']}): init '{init}' is not a pretrain run of this study "
                              f"({', '.join(plan['pretrain']) or 'none'}); use null for training from scratch")
        for n in sizes:
            for seed in seeds:
                run = f"{step['name']}-n{n if n is not None else 'all'}-s{seed}"
                cfg = _stage(step, FinetuneConfig, f"finetune[{i}] ({step['name']})",
                             {**study, "train_samples": n, "seed": seed, "name": run})
                plan["finetune"][run] = (cfg, init)
    if not plan["finetune"]:
        raise ConfigError(f"{path}: 'finetune' lists no model")
    ev = raw.get("evaluate") or {"config": "configs/evaluate/default.yaml"}
    plan["evaluate"] = _stage(ev, EvalConfig, "evaluate", study)
    return plan


def _check_folders(folders: Any, plan: dict, where: str) -> None:
    if not isinstance(folders, list) or not folders:
        raise ConfigError(f"{where}: expected a list of data folders ({', '.join(DATA_FOLDERS)}), found {folders!r}")
    for f in folders:
        if f not in DATA_FOLDERS:
            raise ConfigError(f"{where}: unknown data folder '{f}'{_closest(str(f), list(DATA_FOLDERS))}; "
                              f"known: {', '.join(DATA_FOLDERS)}")
        if f == "diffusion" and "diffusion" not in plan:
            raise ConfigError(f"{where}: 'diffusion' needs a top-level diffusion section (train, data, generate)")
        if f != "diffusion" and f not in plan["data"]:
            raise ConfigError(f"{where}: this study has no '{f}' data")


def _diffusion_plan(node: dict, plan: dict, study: dict) -> dict:
    """{train: cfg, data: [folders], generate: cfg}; the generate config is validated as procedural here (the
    model it needs does not exist yet) and gets its backend and model_path when the study runs."""
    from synth.train_diffusion import DiffusionTrainConfig

    _check_keys(node, ("train", "data", "generate"), "diffusion")
    for key in ("train", "generate"):
        if key not in node:
            raise ConfigError(f"diffusion: missing key '{key}' ({{config: FILE, overrides: {{...}}}})")
    train_cfg = _stage(node["train"], DiffusionTrainConfig, "diffusion.train", study)
    on = node.get("data") or ["pretrain" if "pretrain" in plan["data"] else "target"]
    if "diffusion" in on:
        raise ConfigError("diffusion.data: the diffusion model cannot train on its own output")
    _check_folders(on, plan, "diffusion.data")
    gen = node["generate"]
    _check_keys(gen, ("config", "overrides"), "diffusion.generate")
    overrides = dict(gen.get("overrides") or {})
    backend = overrides.pop("backend", "inpaint")
    if backend not in ("inpaint", "refine"):
        raise ConfigError(f"diffusion.generate: backend '{backend}' is invalid, expected inpaint or refine (the model "
                          "this study trains)")
    if "model_path" in overrides:
        raise ConfigError("diffusion.generate: model_path is set by the study (the model it trains)")
    gen_cfg = _stage({"config": gen["config"], "overrides": overrides}, SynthConfig, "diffusion.generate",
                     {"backend": "procedural"})
    return {"train": train_cfg, "on": on, "generate": gen_cfg, "backend": backend}


def _done(path: Path) -> bool:
    return path.is_file()


def run_study(config: str | Path, out: str | Path | None = None, overrides: list[str] | None = None) -> Path:
    from finetune.train import train as finetune
    from pretrain.train import train as pretrain
    from synth.generate import generate
    from synth.importer import import_folder

    from .run import evaluate

    plan = load_study(config, overrides)
    root = Path(out or Path("runs/study") / plan["name"])
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text(json.dumps({"config": str(config), "overrides": overrides or [],
                                                 "command": shlex.join(sys.argv)}, indent=2) + "\n")
    data: dict[str, Path] = {}
    for key, (kind, spec) in plan["data"].items():
        folder = root / "data" / key
        data[key] = folder
        if kind == "synth":
            log.info("[data] %s: generating into %s", key, folder)
            generate(spec, folder)  # keeps complete shards: a rerun only writes what is missing
        elif not _done(folder / "_info.json"):
            log.info("[data] %s: importing %s into %s", key, spec["images"], folder)
            import_folder(spec["images"], spec["masks"], folder, split_file=spec.get("split_file"),
                          classes=spec.get("classes") or ["defect"], name=spec.get("name"),
                          val_ratio=float(spec.get("val_ratio", 0.0)), mask_mode=spec.get("mask_mode", "index"))
    if "diffusion" in plan:
        data["diffusion"] = _run_diffusion(plan["diffusion"], data, root)
    for name, (cfg, folders) in plan["pretrain"].items():
        run = root / "pretrain" / name
        if _done(run / "model.safetensors"):
            log.info("[pretrain] %s: complete, skipped", name)
            continue
        log.info("[pretrain] %s on %s", name, " + ".join(folders))
        shards = [str(data[f]) for f in folders]
        pretrain(dataclasses.replace(cfg, resume="latest"), shards[0] if len(shards) == 1 else shards, run)
    runs = []
    for name, (cfg, init) in plan["finetune"].items():
        run = root / "finetune" / name
        runs.append(str(run))
        if _done(run / "model.safetensors"):
            log.info("[finetune] %s: complete, skipped", name)
            continue
        log.info("[finetune] %s (init: %s)", name, init or "scratch")
        finetune(dataclasses.replace(cfg, resume="latest", init=str(root / "pretrain" / init) if init else None),
                 str(data["target"]), run)
    report = root / "report"
    shards = [str(data["target"])] + ([str(data["test_4k"])] if "test_4k" in data else [])
    newest = max((Path(r) / "model.safetensors").stat().st_mtime for r in runs)
    if _done(report / "results.json") and (report / "results.json").stat().st_mtime > newest \
            and _done(report / "report.html"):
        log.info("[evaluate] report is newer than every model, skipped")
        return report / "report.html"
    log.info("[evaluate] %d models on %s", len(runs), ", ".join(shards))
    cmd = "python -m evaluate study " + shlex.join([str(config)] + (["--out", str(out)] if out else [])
                                                     + list(overrides or []))
    return evaluate(plan["evaluate"], runs, shards, report, commands=[cmd])


def _run_diffusion(spec: dict, data: dict[str, Path], root: Path) -> Path:
    """Train the diffusion model on the named folders, then generate its shards; both resume."""
    from synth.generate import generate
    from synth.train_diffusion import train as train_diffusion

    run = root / "diffusion"
    pipeline = run / "pipeline"
    if _done(pipeline / "model_index.json"):
        log.info("[diffusion] model complete, skipped")
    else:
        log.info("[diffusion] training on %s", " + ".join(spec["on"]))
        train_diffusion(dataclasses.replace(spec["train"], resume="latest"), [str(data[f]) for f in spec["on"]], run)
    folder = root / "data" / "diffusion"
    cfg = dataclasses.replace(spec["generate"], backend=spec["backend"], model_path=str(pipeline))
    cfg.validate()
    log.info("[data] diffusion: generating into %s (backend %s)", folder, cfg.backend)
    generate(cfg, folder)
    return folder
