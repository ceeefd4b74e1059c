"""Evaluation: tiled inference, blend weights, metrics against hand-computed values, saliency maps, the command."""

from pathlib import Path

import numpy as np
import pytest
import torch

from defectforge.tiling import blend_window, seam_mask, tile_grid, tiled_logits
from evaluate.__main__ import main
from evaluate.metrics import (
    EvalMetrics,
    accuracy_by_source,
    dilate,
    miou_difference,
    miou_from_confusion,
    threshold_counts,
)
from evaluate.run import _prepare

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


@pytest.mark.parametrize("tolerance", [0, 1, 2])
def test_threshold_counts_equal_thresholding_and_dilating_each_prediction(tolerance):
    """The one-pass counts of ODS/OIS F1 are the per-threshold definition, exactly (values on the edges too)."""
    g = torch.Generator().manual_seed(tolerance)
    for trial in range(40):
        h, w = torch.randint(1, 30, (2,), generator=g).tolist()
        thresholds = [2, 4, 7, 20][trial % 4]
        defect = torch.rand(h, w, generator=g)
        if trial % 2:  # many pixels exactly on a threshold (k + 0.5) / thresholds, and 0 and 1
            defect = (torch.randint(0, 2 * thresholds + 1, (h, w), generator=g).float() / (2 * thresholds))
        truth = torch.rand(h, w, generator=g) > 0.7
        expected = torch.zeros(4, thresholds, dtype=torch.float64)
        for k in range(thresholds):
            pred = defect >= (k + 0.5) / thresholds
            expected[:, k] = torch.tensor([pred.sum(), (pred & dilate(truth, tolerance)).sum(), truth.sum(),
                                           (truth & dilate(pred, tolerance)).sum()], dtype=torch.float64)
        assert torch.equal(threshold_counts(defect, truth, thresholds, tolerance), expected), trial


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


def test_accuracy_per_source_pools_each_source_on_its_own():
    """A large image that is all wrong must not hide a small source that is all right (and one source = the whole)."""
    classes = ["background", "crack"]
    small = [[[90, 0], [0, 10]]] * 2  # perfect
    big = [[[0, 9000], [1000, 0]]]  # every pixel wrong
    out = accuracy_by_source(small + big, ["val", "val", "4k"], classes)
    assert out["val"] == {"images": 2, "pixels": 200, "mIoU": 1.0, "defect_mIoU": 1.0,
                          "IoU": {"background": 1.0, "crack": 1.0}}
    assert out["4k"]["defect_mIoU"] == 0.0 and out["4k"]["images"] == 1
    m = EvalMetrics(classes, tolerance=0, thresholds=4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        m.update(torch.rand(1, 2, 9, 11, generator=g), torch.randint(0, 2, (9, 11), generator=g))
    whole = m.compute()
    one = accuracy_by_source(whole["image_confusion"], ["a"] * 3, classes)["a"]
    assert one["mIoU"] == pytest.approx(whole["mIoU"]) and one["defect_mIoU"] == pytest.approx(whole["defect_mIoU"])


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


def test_attention_and_gradcam_maps_have_the_image_size_and_localization_is_scored_by_hand():
    from defectforge.config import load_config
    from evaluate.interpret import attention_map, gradcam_map, is_vit, localization
    from finetune.config import FinetuneConfig
    from pretrain.segmenter import build_segmenter

    vit, _ = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, "encoder_kwargs": {
        "embed_dim": 48, "num_heads": 2}}), ["background", "crack"])
    cnn, _ = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, "model": "resnet18",
                                                                "architecture": "Unet"}), ["background", "crack"])
    assert is_vit(vit) and not is_vit(cnn)  # decided by pretrain.models.family_of on the Segmenter's encoder
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




def test_run_errors_name_the_problem_and_the_old_study_command_points_to_the_new_one(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    args = ["run", "--config", "configs/evaluate/default.yaml", "--models", str(tmp_path / "missing"), "--shards",
            str(tmp_path), "--out", str(tmp_path / "r")]
    assert main(args) == 2 and "is not a finetune run" in caplog.text
    assert main([*args, "blend=linear"]) == 2 and "blend" in caplog.text
    caplog.clear()
    assert main(["study", "configs/study/quickstart.yaml", "seeds=[0,1]"]) == 2
    assert "moved to `python -m study CONFIG" in caplog.text
    assert "python -m study configs/study/quickstart.yaml 'seeds=[0,1]'" in caplog.text
    assert not list(tmp_path.glob("r*"))  # nothing ran


def _tiny_unet(folder: Path) -> list[str]:
    """A saved ResNet-18 U-Net run (random weights) for three classes; returns the classes."""
    from defectforge.config import load_config
    from finetune.config import FinetuneConfig
    from pretrain.segmenter import build_segmenter, save_segmenter

    classes = ["background", "crack", "pit"]
    torch.manual_seed(0)
    model, mcfg = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, "model": "resnet18",
                                                                   "architecture": "Unet"}), classes)
    save_segmenter(model.eval(), folder, mcfg)
    return classes


def test_the_accuracy_pass_over_the_timed_image_is_timed_after_its_warm_up(tmp_path):
    """`evaluate_model` times its pass over the image keyed `timed_key` (the first of that model's timed rounds)
    and no other; `speed_sample` finds the first evaluation image of the timed size."""
    from defectforge.config import load_config
    from evaluate.config import EvalConfig
    from evaluate.run import evaluate_model, speed_sample

    classes = _tiny_unet(tmp_path / "unet")
    images = [{"image": torch.rand(3, 48, 48), "mask": torch.zeros(48, 48, dtype=torch.long), "key": "t/0"},
              {"image": torch.rand(3, 64, 96), "mask": torch.zeros(64, 96, dtype=torch.long), "key": "s/0"}]
    assert speed_sample(images, [64, 96]) is images[1] and speed_sample(images, [2160, 3840]) is None
    cfg = load_config(EvalConfig, None, {"tile_size": 64, "speed_size": [64, 96], "warmup": 1, "wandb": False,
                                         "interpret_images": 0, "mixed_precision": "no"})
    cpu = torch.device("cpu")
    timed, _ = evaluate_model(tmp_path / "unet", images, classes, cfg, cpu, set(), False, "no", "s/0")
    assert len(timed.timed.times) == len(timed.timed.memory) == 1 and timed.timed.times[0] > 0
    untimed, _ = evaluate_model(tmp_path / "unet", images, classes, cfg, cpu, set(), False, "no", None)
    assert untimed.timed is None
    assert timed.result.metrics.mIoU == untimed.result.metrics.mIoU  # timing changes nothing measured


def test_inference_precision_follows_the_machines_measurement_and_cnns_run_channels_last(tmp_path, monkeypatch):
    """`mixed_precision: auto` takes the CPU's measured choice (as training does), explicit values are kept, the tiled
    passes run the model under that autocast with fp32 logits, and a CNN is evaluated in channels_last."""
    from defectforge import precision
    from defectforge.config import ConfigError, load_config
    from evaluate.config import EvalConfig
    from evaluate.report import precision_note
    from evaluate.run import _load, resolve_precision
    from evaluate.runtimes import Autocast

    classes = _tiny_unet(tmp_path / "unet")
    cpu = torch.device("cpu")
    auto = load_config(EvalConfig, None, {})
    for measured, speedup in (("bf16", 1.9), ("no", 0.1)):
        monkeypatch.setattr(precision, "cpu_choice", lambda m=measured, s=speedup: {
            "used": m, "bf16_speedup": s, "min_speedup": 1.2, "source": "test"})
        got = resolve_precision(auto, cpu)
        assert got["asked"] == "auto" and got["used"] == measured and got["bf16_speedup"] == speedup
    assert "bf16 autocast (mixed_precision=auto: bf16 measured 1.90x" in precision_note(
        {"asked": "auto", "used": "bf16", "bf16_speedup": 1.9, "min_speedup": 1.2})

    def unmeasured():
        raise AssertionError("an explicit mixed_precision must not measure the CPU")

    monkeypatch.setattr(precision, "cpu_choice", unmeasured)
    fp32 = load_config(EvalConfig, None, {"mixed_precision": "no"})
    assert resolve_precision(fp32, cpu) == {"asked": "no", "used": "no"}
    assert precision_note(resolve_precision(fp32, cpu)) == "fp32 (mixed_precision=no)"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(EvalConfig, None, {"mixed_precision": "fp8"})

    net, runner, _, mean, std = _load(tmp_path / "unet", classes, cpu, "bf16")
    assert isinstance(runner, Autocast) and runner.model is net and runner.dtype == torch.bfloat16
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in net.parameters() if p.dim() == 4)
    net32, runner32, *_ = _load(tmp_path / "unet", classes, cpu, "no")
    assert runner32 is net32
    x = _prepare(torch.rand(3, 64, 96), mean, std, cpu)
    low = tiled_logits(runner, x, tile=64, overlap=0.25, batch=4)
    full = tiled_logits(runner32, x, tile=64, overlap=0.25, batch=4)
    assert low.dtype == full.dtype == torch.float32 and low.shape == full.shape == (1, 3, 64, 96)
    assert not torch.equal(low, full)  # bf16 did run
    assert (low - full).abs().max() <= 0.05 * full.abs().max() + 1e-3


def test_class_argmax_equals_torch_argmax_also_on_ties():
    """The contiguous-memory argmax over the class axis gives torch's indices, the first maximum on ties."""
    from pretrain.metrics import class_argmax

    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 3, (2, 5, 96, 128), generator=gen).float()  # integer scores: many ties
    assert torch.equal(class_argmax(scores, 1), scores.argmax(1))
    assert torch.equal(class_argmax(scores[0], 0), scores[0].argmax(0))
    assert torch.equal(class_argmax(scores.transpose(0, 1)[:, :1], 0), scores.transpose(0, 1)[:, :1].argmax(0))
    small = torch.rand(1, 3, 4, 4, generator=gen)
    assert torch.equal(class_argmax(small), small.argmax(1))
