"""The study config: typed sections loaded through `defectforge.config.load_config`, then resolved into a plan.

`load_config` checks the YAML and the dotted `key=value` overrides against `StudyConfig` (unknown keys with
"did you mean", types); `load_study` then loads and validates every stage config the study names, so a typo
anywhere fails before the first stage runs, naming the stage and the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from defectforge.config import ConfigError, load_config
from evaluate.config import EvalConfig
from finetune.config import FinetuneConfig
from pretrain.config import PretrainConfig
from synth.config import SynthConfig

DATA_FOLDERS = ("pretrain", "target", "diffusion")
DEFAULT_EVALUATE = "configs/evaluate/default.yaml"


@dataclass
class StageStep:
    """A stage config file and the overrides applied to it."""
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class RealTarget:
    """A real folder of images and masks, imported like `synth import`."""
    images: str | None = None
    masks: str | None = None
    split_file: str | None = None
    classes: list[str] = field(default_factory=lambda: ["defect"])
    mask_mode: str = "index"
    name: str | None = None
    val_ratio: float = 0.0


@dataclass
class Target:
    synth: StageStep | None = None
    real: RealTarget | None = None


@dataclass
class DiffusionSection:
    train: StageStep | None = None
    data: list[str] | None = None  # folders the diffusion model trains on (default: [pretrain])
    generate: StageStep | None = None


@dataclass
class PretrainStep:
    name: str | None = None
    config: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    data: list[str] | None = None  # folders read as one stream (default: [pretrain])


@dataclass
class FinetuneStep:
    name: str | None = None
    config: str | None = None
    init: str | None = None  # a pretrain step's name, or null for training from scratch
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudyConfig:
    name: str | None = None  # default: the file's stem
    pretrain_data: StageStep | None = None
    target: Target | None = None
    test_4k: StageStep | None = None
    diffusion: DiffusionSection | None = None
    pretrain: list[PretrainStep] = field(default_factory=list)
    finetune: list[FinetuneStep] = field(default_factory=list)
    train_samples: list[Any] = field(default_factory=lambda: [None])  # int or null (= the whole split)
    seeds: list[int] = field(default_factory=lambda: [0])
    evaluate: StageStep | None = None  # default: configs/evaluate/default.yaml
    parallel: int = 1  # training runs at once on a CPU, sharing its threads (study/parallel.py)

    def validate(self) -> None:
        if not isinstance(self.parallel, int) or self.parallel < 1:
            raise ConfigError(f"key 'parallel': value {self.parallel!r} is invalid, expected an integer >= 1 (training "
                              "runs at once on a CPU)")
        for n in self.train_samples:
            if n is not None and (not isinstance(n, int) or n < 1):
                raise ConfigError(f"key 'train_samples': value {n!r} is invalid, expected an integer >= 1 or null")


@dataclass
class DiffusionPlan:
    train: Any  # synth.train_diffusion.DiffusionTrainConfig
    on: list[str]
    generate: SynthConfig  # validated as procedural; backend and model_path are set when the study runs
    backend: str


@dataclass
class StudyPlan:
    """Every stage of a study with its validated config, in the order the runner executes them."""
    name: str
    data: dict[str, tuple[str, Any]] = field(default_factory=dict)  # folder -> ("synth", SynthConfig) | ("real", ...)
    # generated folder -> the study data folder whose train split it draws on (`labeled_dir: target`)
    labeled_from: dict[str, str] = field(default_factory=dict)
    diffusion: DiffusionPlan | None = None
    pretrain: dict[str, tuple[PretrainConfig, list[str]]] = field(default_factory=dict)
    finetune: dict[str, tuple[FinetuneConfig, str | None]] = field(default_factory=dict)
    evaluate: EvalConfig | None = None
    parallel: int = 1


def _stage(step: Any, schema: type, where: str, extra: dict | None = None):
    """A step's stage config (`step.config` + `step.overrides` + `extra`), loaded and validated with `schema`."""
    if step is None or not step.config:
        raise ConfigError(f"{where}: missing key 'config' (a YAML file of the stage)")
    try:
        return load_config(schema, step.config, {**(step.overrides or {}), **(extra or {})})
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_folders(folders: list[str], plan: StudyPlan, where: str) -> None:
    if not folders:
        raise ConfigError(f"{where}: expected a list of data folders ({', '.join(DATA_FOLDERS)}), found {folders!r}")
    for f in folders:
        if f not in DATA_FOLDERS:
            raise ConfigError(f"{where}: unknown data folder '{f}'; known: {', '.join(DATA_FOLDERS)}")
        if f == "diffusion" and plan.diffusion is None:
            raise ConfigError(f"{where}: 'diffusion' needs a top-level diffusion section (train, data, generate)")
        if f != "diffusion" and f not in plan.data:
            raise ConfigError(f"{where}: this study has no '{f}' data")


def _default_folders(plan: StudyPlan) -> list[str]:
    return ["pretrain" if "pretrain" in plan.data else "target"]


def _data_plan(cfg: StudyConfig, plan: StudyPlan, source: Path) -> None:
    if cfg.pretrain_data is not None:
        # `labeled_dir: target`: defects drawn on crops of this study's own target training images, with their
        # labels (synth/labeled.py); the folder exists only once the study has made it, so it is set then
        over = dict(cfg.pretrain_data.overrides or {})
        on_target = over.get("labeled_dir") == "target"
        if on_target:
            del over["labeled_dir"]
        spec = _stage(StageStep(cfg.pretrain_data.config, over), SynthConfig, "pretrain_data")
        if on_target:
            if spec.backend != "procedural":
                raise ConfigError(f"pretrain_data: key 'labeled_dir': crops of the target's images are drawn with "
                                  f"backend=procedural only, found backend={spec.backend}")
            plan.labeled_from["pretrain"] = "target"
        plan.data["pretrain"] = ("synth", spec)
    target = cfg.target
    if target is None or (target.synth is None and target.real is None):
        raise ConfigError(f"{source}: 'target' is required (synth: {{config, overrides}} or real: {{images, masks}})")
    if target.synth is not None:
        plan.data["target"] = ("synth", _stage(target.synth, SynthConfig, "target.synth"))
    else:
        for key in ("images", "masks"):
            value = getattr(target.real, key)
            if not value or not Path(value).is_dir():
                raise ConfigError(f"target.real.{key}: folder '{value}' does not exist")
        plan.data["target"] = ("real", target.real)
    if cfg.test_4k is not None:
        plan.data["test_4k"] = ("synth", _stage(cfg.test_4k, SynthConfig, "test_4k"))


def _diffusion_plan(node: DiffusionSection, plan: StudyPlan, study: dict) -> DiffusionPlan:
    """The generate config is validated as procedural here (the model it needs does not exist yet)."""
    from synth.train_diffusion import DiffusionTrainConfig

    for key in ("train", "generate"):
        if getattr(node, key) is None:
            raise ConfigError(f"diffusion: missing key '{key}' ({{config: FILE, overrides: {{...}}}})")
    train_cfg = _stage(node.train, DiffusionTrainConfig, "diffusion.train", study)
    on = list(node.data or _default_folders(plan))
    if "diffusion" in on:
        raise ConfigError("diffusion.data: the diffusion model cannot train on its own output")
    _check_folders(on, plan, "diffusion.data")
    overrides = dict(node.generate.overrides or {})
    backend = overrides.pop("backend", "inpaint")
    if backend not in ("inpaint", "refine"):
        raise ConfigError(f"diffusion.generate: backend '{backend}' is invalid, expected inpaint or refine (the model "
                          "this study trains)")
    if "model_path" in overrides:
        raise ConfigError("diffusion.generate: model_path is set by the study (the model it trains)")
    gen_cfg = _stage(StageStep(node.generate.config, overrides), SynthConfig, "diffusion.generate",
                     {"backend": "procedural"})
    try:
        replace(gen_cfg, backend=backend).check_labeled_backend()
    except ConfigError as err:
        raise ConfigError(f"diffusion.generate: {err}") from None
    return DiffusionPlan(train=train_cfg, on=on, generate=gen_cfg, backend=backend)


def _pretrain_plan(steps: list[PretrainStep], plan: StudyPlan, study: dict) -> None:
    for i, step in enumerate(steps):
        if not step.name:
            raise ConfigError(f"pretrain[{i}]: missing key 'name'")
        where = f"pretrain[{i}] ({step.name})"
        cfg = _stage(step, PretrainConfig, where, study)
        folders = list(step.data) if step.data is not None else _default_folders(plan)
        _check_folders(folders, plan, f"{where}.data")
        plan.pretrain[step.name] = (cfg, folders)


def _finetune_plan(cfg: StudyConfig, plan: StudyPlan, study: dict) -> None:
    for i, step in enumerate(cfg.finetune):
        if not step.name:
            raise ConfigError(f"finetune[{i}]: missing key 'name'")
        if step.init is not None and step.init not in plan.pretrain:
            raise ConfigError(f"finetune[{i}] ({step.name}): init '{step.init}' is not a pretrain run of this study "
                              f"({', '.join(plan.pretrain) or 'none'}); use null for training from scratch")
        for n in cfg.train_samples or [None]:
            for seed in cfg.seeds or [0]:
                run = f"{step.name}-n{n if n is not None else 'all'}-s{seed}"
                plan.finetune[run] = (_stage(step, FinetuneConfig, f"finetune[{i}] ({step.name})",
                                             {**study, "train_samples": n, "seed": seed, "name": run}), step.init)
                if step.init is not None and plan.finetune[run][0].pretrained:
                    raise ConfigError(f"finetune[{i}] ({step.name}): pretrained=true with init '{step.init}': the "
                                      "init's weights would replace the published ones; for published then "
                                      "synthetic pretraining set pretrained: true in the overrides of pretrain run "
                                      f"'{step.init}'")


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyPlan:
    """The study plan with every stage config resolved and validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study config '{path}' does not exist")
    cfg = load_config(StudyConfig, path, overrides or [])
    plan = StudyPlan(name=cfg.name or path.stem, parallel=cfg.parallel)
    study = {"study": plan.name}
    _data_plan(cfg, plan, path)
    if cfg.diffusion is not None:
        plan.diffusion = _diffusion_plan(cfg.diffusion, plan, study)
    _pretrain_plan(cfg.pretrain, plan, study)
    _finetune_plan(cfg, plan, study)
    if not plan.finetune:
        raise ConfigError(f"{path}: 'finetune' lists no model")
    plan.evaluate = _stage(cfg.evaluate or StageStep(DEFAULT_EVALUATE), EvalConfig, "evaluate", study)
    return plan
