"""Evaluation: tiled inference, blend weights, metrics against hand-computed values, the study and its report."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from defectforge.config import ConfigError
from evaluate.__main__ import main
from evaluate.metrics import EvalMetrics, miou_difference, miou_from_confusion
from evaluate.run import _prepare
from evaluate.study import load_study, run_study
from evaluate.tiling import blend_window, seam_mask, tile_grid, tiled_logits

REPO = Path(__file__).resolve().parents[2]


def pointwise_fcn() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()


@pytest.mark.parametrize("blend", ["gaussian", "pyramid", "average"])
def test_tiled_inference_of_a_fully_convolutional_model_equals_whole_image_inference(blend):
    model, image = pointwise_fcn(), torch.rand(1, 3, 700, 1000)
    tiled = tiled_logits(model, image, tile=256, overlap=0.1, blend=blend, batch=3)
    with torch.no_grad():
        whole = model(image)
    assert tiled.shape == whole.shape
    assert torch.allclose(tiled, whole, atol=1e-5)


def test_tiles_cover_the_image_without_leaving_it_and_weights_normalise_at_borders_and_corners():
    tiles = tile_grid(700, 1000, 256, 0.1)
    covered = torch.zeros(700, 1000, dtype=torch.int32)
    for y, x, h, w in tiles:
        assert 0 <= y and y + h <= 700 and 0 <= x and x + w <= 1000 and (h, w) == (256, 256)
        covered[y:y + h, x:x + w] += 1
    assert covered.min() >= 1 and covered[0, 0] == 1 and covered[-1, -1] == 1
    starts = sorted({x for _, x, _, _ in tiles})
    assert min(b - a for a, b in zip(starts, starts[1:], strict=False)) <= int(256 * 0.9)  # at least 10% overlap
    window = blend_window(256, 256, "gaussian")
    assert window.min() > 0 and window[128, 128] == pytest.approx(1.0, abs=1e-3)

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2, *x.shape[-2:]), 3.5)

    out = tiled_logits(Constant(), torch.rand(1, 3, 700, 1000), tile=256, overlap=0.1, blend="gaussian")
    assert torch.allclose(out, torch.full_like(out, 3.5), atol=1e-5)  # weights sum to one everywhere


def test_a_tile_larger_than_the_image_and_a_grayscale_image_work():
    model = pointwise_fcn()
    assert tile_grid(100, 300, 512, 0.1) == [(0, 0, 100, 300)]
    gray = torch.rand(1, 90, 130)
    x = _prepare(gray, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), torch.device("cpu"))
    assert x.shape == (1, 3, 90, 130)
    assert tiled_logits(model, x, tile=512).shape == (1, 4, 90, 130)


def test_seam_mask_marks_inner_tile_edges_only():
    mask = seam_mask(100, 300, 128, 0.0, band=2)
    assert not mask[:, :100].any()  # the first inner edge is at x=128 (band 126-129); one tile row, no y edge
    assert mask[:, 126:130].all() and not mask[:, 0].any() and not mask[:, -1].any()


def test_metrics_match_hand_computed_values_with_and_without_tolerance():
    truth = torch.zeros(8, 8, dtype=torch.long)
    truth[4, 1:7] = 1  # a one-pixel-wide "crack"
    shifted = torch.zeros(1, 2, 8, 8)
    shifted[0, 0] = 1.0
    shifted[0, 0, 5, 1:7], shifted[0, 1, 5, 1:7] = 0.0, 1.0  # predicted one row below
    strict = EvalMetrics(["background", "crack"], tolerance=0, thresholds=4)
    strict.update(shifted, truth)
    loose = EvalMetrics(["background", "crack"], tolerance=1, thresholds=4)
    loose.update(shifted, truth)
    s, t = strict.compute(), loose.compute()
    assert s["ODS_F1"] == pytest.approx(0.0) and t["ODS_F1"] == pytest.approx(1.0)
    assert t["OIS_F1"] == pytest.approx(1.0)
    # argmax: 6 crack px predicted, none right: crack IoU 0; background: 52 tp, 6 fp, 6 fn
    assert s["per_class"]["crack"]["IoU"] == pytest.approx(0.0)
    assert s["per_class"]["background"]["IoU"] == pytest.approx(52 / 64)
    assert s["per_class"]["background"]["precision"] == pytest.approx(52 / 58)
    assert s["image_AP"] != s["image_AP"]  # NaN: every image has a defect, AP undefined


def test_per_image_confusions_sum_to_the_dataset_confusion():
    m = EvalMetrics(["background", "crack", "pit"], tolerance=0, thresholds=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        m.update(torch.rand(1, 3, 9, 11, generator=g), torch.randint(0, 3, (9, 11), generator=g))
    out = m.compute()
    per_image = np.array(out["image_confusion"])
    assert per_image.shape == (3, 3, 3) and (per_image.sum((1, 2)) == 99).all()
    np.testing.assert_array_equal(per_image.sum(0), m.seg.confusion.numpy())
    assert miou_from_confusion(per_image.sum(0)) == pytest.approx(out["mIoU"])


def _confusions(accuracy: list[float], pixels: int = 400) -> list:
    """Per-image 2-class confusions with the given share of correct pixels per image (half defect)."""
    out = []
    for a in accuracy:
        right = round(a * pixels / 2)
        out.append([[right, pixels // 2 - right], [pixels // 2 - right, right]])
    return out


def test_miou_difference_is_a_paired_interval_over_images():
    better = miou_difference(_confusions([0.9] * 12), _confusions([0.7] * 12))
    assert better["low"] > 0.2 and better["difference"] == pytest.approx(better["low"], abs=1e-9)
    mixed = miou_difference(_confusions([0.9, 0.6] * 6), _confusions([0.6, 0.9] * 6))
    assert mixed["difference"] == pytest.approx(0.0) and mixed["low"] < 0 < mixed["high"]
    assert miou_difference(_confusions([0.9] * 3), _confusions([0.9] * 4)) is None  # not the same images
    assert miou_difference([], []) is None


def _result(name, family, accuracy, pretrained=False, train_samples=None):
    confusion = _confusions(accuracy)
    return {"name": name, "family": family, "model": name, "pretrained": pretrained, "train_samples": train_samples,
            "pretrain_sources": None, "interpretability": None,
            "metrics": {"mIoU": float(miou_from_confusion(np.sum(confusion, 0))), "seam_ratio": None,
                        "image_confusion": confusion},
            "cost": {"tiled": {"seconds_per_image": 1.0, "memory_kind": "rss_increase", "memory_increase_bytes": 1}}}


def test_accuracy_claims_are_inconclusive_within_the_spread_of_the_images():
    from evaluate.report import claims

    def verdict(results, claim):
        return next(row[1] for row in claims(results) if row[0].startswith(claim))

    cnn = _result("cnn", "CNN", [0.8, 0.7] * 6)
    assert verdict([_result("vit", "ViT", [0.95] * 12, pretrained=True), cnn], "Pretrained ViTs") == "supported"
    assert verdict([_result("vit", "ViT", [0.5] * 12, pretrained=True), cnn], "Pretrained ViTs") == "not supported"
    # a higher mIoU that comes from two images out of twelve is no win
    close = _result("vit", "ViT", [0.8, 0.7] * 5 + [0.9, 0.8], pretrained=True)
    assert close["metrics"]["mIoU"] > cnn["metrics"]["mIoU"]
    rows = {row[0]: row for row in claims([close, cnn])}
    assert rows["Pretrained ViTs win on pixel accuracy"][1] == "inconclusive"
    assert "95% interval" in rows["Pretrained ViTs win on pixel accuracy"][2]
    # a gain on every image, but smaller than claim_margin: no win worth the name
    tiny = _result("vit", "ViT", [0.805, 0.705] * 6, pretrained=True)
    assert verdict([tiny, cnn], "Pretrained ViTs") == "not supported"
    assert next(r[1] for r in claims([tiny, cnn], margin=0.0) if r[0].startswith("Pretrained ViTs")) == "supported"
    assert verdict([close, cnn], "CNNs win with little data") == "not measured"
    small = [_result("cnn-s", "CNN", [0.9] * 12, train_samples=8), _result("vit-s", "ViT", [0.6] * 12,
                                                                          train_samples=8)]
    assert verdict([close, cnn, *small], "CNNs win with little data") == "supported"


def test_attention_claim_is_a_paired_comparison_of_pointing_hits():
    from evaluate.metrics import mean_difference
    from evaluate.report import claims

    def with_maps(result, method, hits):
        scores = [{"hit": h, "energy": 0.5 if h else 0.1, "chance": 0.05} for h in hits]
        result["interpretability"] = {"method": method, "images": len(hits),
                                      "pointing_game": float(np.mean(hits)), "energy_in_defect": 0.3,
                                      "energy_chance": 0.05, "per_image": scores}
        return result

    def verdict(att_hits, cam_hits):
        results = [with_maps(_result("vit", "ViT", [0.8] * 12), "attention", att_hits),
                   with_maps(_result("cnn", "CNN", [0.8] * 12), "grad-cam", cam_hits)]
        return next(r[1] for r in claims(results) if r[0].startswith("Attention maps"))

    assert verdict([True] * 12, [False] * 12) == "supported"
    assert verdict([False] * 12, [True] * 12) == "not supported"
    assert verdict([True, True, True, False] + [False] * 4, [True] + [False] * 7) == "inconclusive"  # 3/8 vs 1/8
    ci = mean_difference([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0])
    assert ci["difference"] == pytest.approx(0.5) and ci["low"] <= 0.5 <= ci["high"]
    assert mean_difference([1.0], [1.0, 0.0]) is None


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
                      "overrides": {"model_kwargs": {"embed_dim": 48, "num_heads": 2}, "img_size": 64,
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
                      "overrides": {"image_size": 32, "channels": [16, 32], "norm_groups": 8, "layers_per_block": 1,
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

    with caplog.at_level(logging.INFO, logger="evaluate.study"):
        run_study(config, tmp_path / "study")  # everything complete: every stage is skipped
    assert caplog.text.count("complete, skipped") == 7 and "report is newer" in caplog.text  # 2 + 4 runs, diffusion


def test_study_and_run_errors_name_the_problem(tmp_path, monkeypatch, caplog):
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
    args = ["run", "--config", "configs/evaluate/default.yaml", "--models", str(tmp_path / "missing"), "--shards",
            str(tmp_path), "--out", str(tmp_path / "r")]
    assert main(args) == 2 and "is not a finetune run" in caplog.text
    assert main([*args, "blend=linear"]) == 2 and "blend" in caplog.text


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


def test_attention_and_gradcam_maps_have_the_image_size_and_localization_is_scored_by_hand():
    from defectforge.config import load_config
    from evaluate.interpret import attention_map, gradcam_map, localization
    from finetune.config import FinetuneConfig
    from finetune.models import build_segmenter

    vit, _ = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, "encoder_kwargs": {
        "embed_dim": 48, "num_heads": 2}}), ["background", "crack"])
    cnn, _ = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, "model": "resnet18",
                                                                "architecture": "Unet"}), ["background", "crack"])
    x = torch.rand(1, 3, 70, 90)
    att = attention_map(vit.eval(), x)
    assert att.shape == (70, 90) and att.min() >= 0
    cam = gradcam_map(cnn.eval(), x)
    assert cam.shape == (70, 90) and cam.min() >= 0
    assert all(p.grad is None for p in cnn.parameters())  # no gradient left behind
    mask = torch.zeros(10, 10, dtype=torch.long)
    mask[2, 2] = 1
    saliency = torch.zeros(10, 10)
    saliency[2, 3], saliency[8, 8] = 3.0, 1.0
    score = localization(saliency, mask, tolerance=1)  # peak 1 px from the defect; 3 of 4 units of mass near it
    assert score["hit"] and score["energy"] == pytest.approx(0.75) and score["chance"] == pytest.approx(9 / 100)


@pytest.mark.parametrize("path", sorted((REPO / "configs/study").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_config_loads_and_validates_its_stage_configs(path, monkeypatch):
    monkeypatch.chdir(REPO)
    if "crackforest" in path.stem and not (REPO.parent / "shared/data/crackforest").is_dir():
        pytest.skip("../shared/data/crackforest is not here (the study imports it)")
    assert load_study(path)["name"] == yaml.safe_load(path.read_text())["name"]
