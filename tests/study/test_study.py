"""The study runner: a typed study config through the shared loader, every stage in order, resume, errors."""

import json
from pathlib import Path

import pytest
import yaml

from defectforge.config import ConfigError
from study.__main__ import main
from study.config import StudyPlan, load_study
from study.runner import _run_data, run_study, summary, time_summary

REPO = Path(__file__).resolve().parents[2]


def tiny_study(tmp_path: Path, diffusion: bool = False) -> Path:
    study = {
        "name": "tiny",
        "pretrain_data": {"config": "configs/synth/default.yaml",
                          "overrides": {"num_samples": 16, "image_size": 64, "shard_size": 8, "val_ratio": 0.25,
                                        "workers": 1}},
        "target": {"synth": {"config": "configs/synth/default.yaml",
                             "overrides": {"num_samples": 12, "image_size": 64, "shard_size": 6, "val_ratio": 0.25,
                                           "seed": 1, "workers": 1, "surfaces": {"concrete": 1.0}}}},
        "test_4k": {"config": "configs/synth/4k.yaml",
                    "overrides": {"num_samples": 2, "image_size": [160, 288], "workers": 1}},
        "pretrain": [{"name": "vit", "config": "configs/pretrain/quickstart.yaml",
                      "overrides": {"model_kwargs": {"embed_dim": 48, "num_heads": 2}, "crop_size": 64,
                                    "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                    "val_every": 2, "num_workers": 0, "wandb": False}}],
        "finetune": [
            {"name": "vit-pre", "config": "configs/finetune/quickstart.yaml", "init": "vit",
             "overrides": {"encoder_kwargs": {"embed_dim": 48, "num_heads": 2}}},
            {"name": "vit-scratch", "config": "configs/finetune/quickstart.yaml", "init": None,
             "overrides": {"encoder_kwargs": {"embed_dim": 48, "num_heads": 2}}},
            {"name": "cnn", "config": "configs/finetune/quickstart.yaml", "init": None,
             "overrides": {"model": "resnet18", "architecture": "Unet"}},
        ],
        "train_samples": [None],
        "seeds": [0],
        "evaluate": {"config": "configs/evaluate/default.yaml",
                     "overrides": {"tile_size": 128, "speed_size": [160, 288], "repeats": 1, "warmup": 0,
                                   "wandb": False}},
    }
    fast = {"crop_size": 64, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
            "val_every": 2, "num_workers": 0, "wandb": False}
    if diffusion:  # the procedural-only vs procedural+diffusion pretraining switch
        study["diffusion"] = {
            "train": {"config": "configs/synth/diffusion_quickstart.yaml",
                      "overrides": {"crop_size": 32, "channels": [16, 32], "norm_groups": 8, "layers_per_block": 1,
                                    "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                    "val_every": 2, "sample_steps": 2, "num_workers": 0, "wandb": False}},
            "data": ["pretrain"],
            "generate": {"config": "configs/synth/default.yaml",
                         "overrides": {"backend": "inpaint", "num_samples": 8, "image_size": 64, "shard_size": 4,
                                       "val_ratio": 0.25, "seed": 3, "workers": 1, "steps": 2}}}
        diff_pre = {**study["pretrain"][0], "name": "vit-diff", "data": ["pretrain", "diffusion"]}
        study["pretrain"].append(diff_pre)
        study["finetune"].insert(1, {**study["finetune"][0], "name": "vit-diffpre", "init": "vit-diff",
                                     "overrides": dict(study["finetune"][0]["overrides"])})
    for step in study["finetune"]:
        step["overrides"].update(fast)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def test_a_tiny_study_runs_every_stage_writes_every_report_section_and_resumes(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    config = tiny_study(tmp_path, diffusion=True)
    report = run_study(config, tmp_path / "study")
    md = (tmp_path / "study/report/report.md").read_text()
    for section in ("## Results per model", "## Per class", "## The usual ViT-vs-CNN trade-off, measured",
                    "## Claims checked on this data", "## Accuracy against speed",
                    "## Interpretability: where the models look", "## Predictions on the largest images",
                    "## How this report was made"):
        assert section in md, section
    assert "vit-pre-nall-s0" in md and "cnn-nall-s0" in md
    assert "Synthetic pretraining (with CutMix) makes ViTs viable" in md
    assert "Accuracy per evaluation source" in md
    assert "Diffusion-generated data improves synthetic pretraining" in md
    assert (tmp_path / "study/diffusion/pipeline/model_index.json").is_file()
    diff_info = json.loads((tmp_path / "study/data/diffusion/_info.json").read_text())
    assert diff_info["source"] == "inpaint" and diff_info["splits"]["train"]["num_samples"] == 6
    pre_info = json.loads((tmp_path / "study/pretrain/vit-diff/run_info.json").read_text())
    assert pre_info["sources"] == ["procedural", "inpaint"] and len(pre_info["shards"]) == 2
    html = report.read_text()
    assert html.count("data:image/png;base64,") >= 3 and "<table>" in html
    results = json.loads((tmp_path / "study/report/results.json").read_text())
    assert {r["family"] for r in results["results"]} == {"ViT", "CNN"}
    sources = {r["name"]: r["pretrain_sources"] for r in results["results"]}
    assert sources["vit-diffpre-nall-s0"] == ["inpaint", "procedural"] and sources["vit-pre-nall-s0"] == ["procedural"]
    assert sources["cnn-nall-s0"] is None
    assert results["results"][0]["cost"]["tiled"]["image_size"] == [160, 288]
    for r in results["results"]:  # the two scenes are tiled: seam error with and without overlap, timing spread
        assert r["metrics"]["seam_images"] == 2 and r["metrics"]["seam_ratio_no_overlap"] is not None
        assert {"seconds_q1", "seconds_q3", "seconds_min", "seconds_max"} <= set(r["cost"]["tiled"])
        assert isinstance(r["learned"], bool) and r["learned_reason"]
        # accuracy of each evaluation source on its own: the target's split and the 4K scenes
        by_source = r["metrics"]["by_source"]
        assert set(by_source) == {"target", "test_4k"} and by_source["test_4k"]["images"] == 2
        assert by_source["target"]["images"] + 2 == r["metrics"]["images"]
    assert [c["claim"] for c in results["claims"]][:2] == ["CNNs are faster on 4K images (claimed 0.3 vs 2.1 s)",
                                                           "CNNs need less memory at 4K (claimed 8 vs 24 GB)"]
    # what the console shows at the end: every model's accuracy and every claim with its verdict and evidence
    printed = summary(report)
    assert printed[0].startswith("models") and any(line.startswith("  vit-pre-nall-s0: ") for line in printed)
    claim = next(c for c in results["claims"] if c["claim"].startswith("Synthetic pretraining"))
    assert f"  {claim['claim']}: {claim['verdict']} ({claim['evidence']})" in printed
    assert "python -m study " in md
    assert results["images"] == 3 + 2  # target val split and the two large scenes

    from defectforge.config import load_config
    from evaluate.config import EvalConfig
    from evaluate.run import evaluate
    from tests.synth.helpers import make_shards

    other = tmp_path / "two-classes"
    make_shards(other, num_samples=4, defects={"crack": 1.0}, val_ratio=0.5)
    with pytest.raises(ValueError, match="trained on classes .* but the evaluation shards have"):
        evaluate(load_config(EvalConfig, None, {"wandb": False}), [str(tmp_path / "study/finetune/cnn-nall-s0")],
                 [str(other)], tmp_path / "r2", progress=False)

    import logging

    # the wall time of every step that did work, with the machine
    timings = json.loads((tmp_path / "study/timings.json").read_text())["steps"]
    steps = {(e["stage"], e["name"]): e for e in timings}
    assert set(steps) == {("data", "target"), ("data", "test_4k"), ("data", "pretrain"), ("diffusion", "train"),
                          ("data", "diffusion"), ("pretrain", "vit"), ("pretrain", "vit-diff"),
                          ("finetune", "vit-pre-nall-s0"), ("finetune", "vit-diffpre-nall-s0"),
                          ("finetune", "vit-scratch-nall-s0"), ("finetune", "cnn-nall-s0"), ("evaluate", "report")}
    assert all(e["seconds"] > 0 and "threads" in e["machine"] for e in timings)
    (line,) = time_summary(tmp_path / "study")
    assert line.startswith("time (min, wall): data ") and "; evaluate " in line and "; total " in line

    with caplog.at_level(logging.INFO, logger="study"):
        run_study(config, tmp_path / "study")  # everything complete: every stage is skipped
    assert caplog.text.count("complete, skipped") == 7 and "report is newer" in caplog.text  # 2 + 4 runs, diffusion
    # a skipped step keeps the time measured when it ran
    assert json.loads((tmp_path / "study/timings.json").read_text())["steps"] == timings
    (tmp_path / "study/timings.json").write_text("{not json")  # damaged: warned, the study still runs
    with caplog.at_level(logging.WARNING, logger="study"):
        run_study(config, tmp_path / "study")
    assert "is not a timings file" in caplog.text


def test_study_errors_name_the_problem_before_any_work(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    config = tiny_study(tmp_path)
    with pytest.raises(ConfigError, match="finetune\\[0\\] \\(vit-pre\\).*unknown key 'crop_sise'"):
        load_study(config, ["finetune=[{name: vit-pre, config: configs/finetune/quickstart.yaml, init: vit, "
                            "overrides: {crop_sise: 3}}]"])
    with pytest.raises(ConfigError, match="init 'nope' is not a pretrain run"):
        load_study(config, ["finetune=[{name: x, config: configs/finetune/quickstart.yaml, init: nope}]"])
    with pytest.raises(ConfigError, match="unknown key 'pretrian'"):
        load_study(config, ["pretrian=[]"])
    with pytest.raises(ConfigError, match=r"pretrain\[0\] \(vit\).data: 'diffusion' needs a top-level diffusion"):
        load_study(config, ["pretrain=[{name: vit, config: configs/pretrain/quickstart.yaml, data: [pretrain, "
                            "diffusion]}]"])
    with pytest.raises(ConfigError, match="unknown data folder 'pretrian'"):
        load_study(config, ["pretrain=[{name: vit, config: configs/pretrain/quickstart.yaml, data: [pretrian]}]"])
    with pytest.raises(ConfigError, match="diffusion.generate: model_path is set by the study"):
        load_study(config, ["diffusion={train: {config: configs/synth/diffusion_quickstart.yaml}, generate: "
                            "{config: configs/synth/default.yaml, overrides: {model_path: x}}}"])
    with pytest.raises(ConfigError, match="unknown key 'pretrian' \\(did you mean pretrain"):
        load_study(config, ["pretrian.x=1"])
    with pytest.raises(ConfigError, match="target.real.imagse.*Did you mean: 'images'"):
        load_study(config, ["target.real.imagse=x"])
    with pytest.raises(ConfigError, match=r"finetune\[0\] \(vit-pre\): pretrained=true with init 'vit'.*pretrain "
                       "run 'vit'"):  # the published weights go into the pretrain run: hub, then synthetic
        load_study(config, ["finetune=[{name: vit-pre, config: configs/finetune/quickstart.yaml, init: vit, "
                            "overrides: {pretrained: true}}]"])
    assert main([str(config), "--out", str(tmp_path / "s"), "seeds=[a]"]) == 2 and "seeds" in caplog.text
    assert not (tmp_path / "s").exists()  # failed before any work


def test_a_study_on_a_real_folder_imports_it_and_times_on_a_procedural_4k_scene(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    monkeypatch.chdir(REPO)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # grayscale photos of odd size with a one-class crack mask
        Image.fromarray(rng.integers(0, 255, (70, 90), dtype=np.uint8)).save(images / f"img{i}.png")
        mask = np.zeros((70, 90), dtype=np.uint8)
        mask[30:33, 10:80] = 1
        Image.fromarray(mask).save(masks / f"img{i}.png")
    study = yaml.safe_load(tiny_study(tmp_path).read_text())
    study["target"] = {"real": {"images": str(images), "masks": str(masks), "classes": ["crack"], "val_ratio": 0.34}}
    study.pop("test_4k")
    study.pop("pretrain_data")
    study["pretrain"] = []
    study["finetune"] = [study["finetune"][2]]  # the CNN only
    study["evaluate"]["overrides"].update({"speed_size": [96, 160], "overlays": 1})
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(study))
    run_study(path, tmp_path / "study")
    results = json.loads((tmp_path / "study/report/results.json").read_text())
    assert results["classes"] == ["background", "crack"] and results["images"] == 2
    assert "procedural scene" in results["results"][0]["cost"]["tiled"]["source"]




def _grid(raw: dict) -> dict[str, dict]:
    """The finetune runs a study YAML asks for, with the overrides each must carry."""
    sizes, seeds = raw.get("train_samples") or [None], raw.get("seeds") or [0]
    return {f"{s['name']}-n{n if n is not None else 'all'}-s{seed}": s for s in raw["finetune"] for n in sizes
            for seed in seeds}


@pytest.mark.parametrize("path", sorted((REPO / "configs/study").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_config_loads_and_validates_its_stage_configs(path, monkeypatch, request):
    from evaluate.config import EvalConfig
    from finetune.config import FinetuneConfig
    from pretrain.config import PretrainConfig

    monkeypatch.chdir(REPO)
    if "crackforest" in path.stem:  # the study imports the real data: skipped (the fixture says why) without it
        request.getfixturevalue("crackforest")
    raw = yaml.safe_load(path.read_text())
    plan = load_study(path)
    assert isinstance(plan, StudyPlan) and plan.name == raw.get("name", path.stem)
    assert "target" in plan.data and (("test_4k" in plan.data) == bool(raw.get("test_4k")))
    assert list(plan.pretrain) == [s["name"] for s in raw.get("pretrain") or []]
    for step in raw.get("pretrain") or []:
        cfg, folders = plan.pretrain[step["name"]]
        assert isinstance(cfg, PretrainConfig) and cfg.study == plan.name
        assert folders == (step.get("data") or ["pretrain"])
    grid = _grid(raw)
    assert list(plan.finetune) == list(grid)
    for run, (cfg, init) in plan.finetune.items():
        step = grid[run]
        assert isinstance(cfg, FinetuneConfig) and cfg.name == run and init == step.get("init")
        for key, value in (step.get("overrides") or {}).items():  # the study's overrides reached the stage config
            if not isinstance(value, dict):
                assert getattr(cfg, key) == value, (run, key)
    assert isinstance(plan.evaluate, EvalConfig) and plan.evaluate.study == plan.name
    for key, value in ((raw.get("evaluate") or {}).get("overrides") or {}).items():
        assert getattr(plan.evaluate, key) == value
    assert (plan.diffusion is not None) == bool(raw.get("diffusion"))


def test_dotted_overrides_edit_the_study_config(monkeypatch):
    monkeypatch.chdir(REPO)
    plan = load_study("configs/study/quickstart.yaml", ["evaluate.overrides={repeats: 5}", "seeds=[0,1]",
                                                         "train_samples=[20,null]"])
    assert plan.evaluate.repeats == 5
    assert "resnet18-unet-n20-s1" in plan.finetune and plan.finetune["resnet18-unet-n20-s1"][0].train_samples == 20
    with pytest.raises(ConfigError, match="train_samples"):
        load_study("configs/study/quickstart.yaml", ["train_samples=[0]"])
    # an item of a list by its index: one fine-tuning entry's rate, the others untouched
    plan = load_study("configs/study/quickstart.yaml", ["finetune.1.overrides.lr=2.0e-4"])
    assert [cfg.lr for cfg, _ in plan.finetune.values()] == [1.0e-3, 2.0e-4, 1.0e-3]
    assert [cfg.layer_decay for cfg, _ in plan.finetune.values()] == [0.75, None, None]
    # the quickstart evaluates and validates in tiles of the crops its models were fine-tuned on (docs/evaluate.md)
    assert {cfg.crop_size for cfg, _ in plan.finetune.values()} == {plan.evaluate.tile_size} == \
        {cfg.val_max_size for cfg, _ in plan.finetune.values()}
    # and overlap and blend as it does (finetune.predict blends with Gaussian weights)
    assert {cfg.val_overlap for cfg, _ in plan.finetune.values()} == {plan.evaluate.overlap}
    assert plan.evaluate.blend == "gaussian"
    # the pretrained ViT is fine-tuned with the decoder it was pretrained with (so the decoder loads), and the ViT
    # from scratch is that same network
    (pre, _), = plan.pretrain.values()
    (synthpre, init), (scratch, none) = (plan.finetune[f"vit_tiny-{kind}-nall-s0"] for kind in ("synthpre", "scratch"))
    assert (init, none) == ("vit_tiny", None)
    assert pre.model == synthpre.model == scratch.model and pre.crop_size == synthpre.crop_size == scratch.crop_size
    assert pre.decoder_kwargs == synthpre.decoder_kwargs == scratch.decoder_kwargs
    # and the pretraining places as many of its crops on a defect as the fine-tunings do (docs/finetune.md)
    assert pre.defect_crop == synthpre.defect_crop == scratch.defect_crop == 0.8
    for bad, match in (("finetune.3.overrides.lr=1", "'finetune' is a list of 3 item.*from 0 to 2, not '3'"),
                       ("finetune.x.overrides.lr=1", "not 'x'"), ("finetune.0.nosuch=1", "nosuch"),
                       ("finetune.0.overrides.nosuch=1", "unknown key 'nosuch'")):
        with pytest.raises(ConfigError, match=match):
            load_study("configs/study/quickstart.yaml", [bad])


def test_pretraining_data_drawn_on_the_targets_own_training_images(tmp_path):
    """`labeled_dir: target` in pretrain_data: made after the target, from crops of its train split only."""
    path = tiny_study(tmp_path)
    study = yaml.safe_load(path.read_text())
    study["pretrain_data"]["overrides"].update({"labeled_dir": "target", "labeled_ratio": 1.0})
    del study["test_4k"]
    path.write_text(yaml.safe_dump(study))
    plan = load_study(path)
    assert plan.labeled_from == {"pretrain": "target"} and plan.data["pretrain"][1].labeled_dir is None
    data = _run_data(plan, tmp_path / "s")
    info = json.loads((data["pretrain"] / "_info.json").read_text())
    assert info["labeled"]["folder"] == str(data["target"]) and info["labeled"]["split"] == "train"
    assert info["classes"] == json.loads((data["target"] / "_info.json").read_text())["classes"]
    assert info["splits"]["train"]["num_samples"] + info["splits"]["val"]["num_samples"] == 16


def test_represent_true_hands_the_classification_pretrain_runs_to_the_evaluation(tmp_path, monkeypatch):
    from study.runner import represent_runs

    monkeypatch.chdir(REPO)
    path = tiny_study(tmp_path)
    study = yaml.safe_load(path.read_text())
    study["pretrain"].append({**study["pretrain"][0], "name": "cls",
                              "overrides": {**study["pretrain"][0]["overrides"], "objective": "classification"}})
    path.write_text(yaml.safe_dump(study))
    assert represent_runs(load_study(path), tmp_path) == []
    plan = load_study(path, ["evaluate.overrides.represent=true"])
    assert plan.evaluate.represent is True and represent_runs(plan, tmp_path) == [str(tmp_path / "pretrain/cls")]
