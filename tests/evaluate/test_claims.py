"""The claims from typed records: accuracy by paired bootstrap, "did not learn", the seam comparison at overlap 0,
and the interleaved timing with its spread."""

import math

import numpy as np
import pytest
import torch

from defectforge.tiling import tile_grid, tiled_logits, warmup_strip
from evaluate.claims import decide_claims
from evaluate.config import EvalConfig
from evaluate.cost import InferenceTimer, time_interleaved
from evaluate.metrics import EvalMetrics, mean_difference, miou_from_confusion, seam_summary
from evaluate.records import Accuracy, Cost, Interpretability, ModelCard, ModelResult, Timing, judge_learned
from evaluate.run import Loaded, seam_errors, time_models


def _confusions(accuracy: list[float], pixels: int = 400) -> list:
    """Per-image 2-class confusions with the given share of correct pixels per image (half defect)."""
    out = []
    for a in accuracy:
        right = round(a * pixels / 2)
        out.append([[right, pixels // 2 - right], [pixels // 2 - right, right]])
    return out


def _background_everywhere(images: int, pixels: int = 400) -> list:
    return [[[pixels // 2, 0], [pixels // 2, 0]] for _ in range(images)]


def _accuracy(confusion: list, seam: tuple[float, float] | None = None) -> Accuracy:
    total = np.sum(confusion, 0)
    iou = np.diag(total) / np.maximum(total.sum(0) + total.sum(1) - np.diag(total), 1)
    predicted = [c for c, n in zip(["background", "crack"], total.sum(0), strict=True) if n > 0]
    return Accuracy(mIoU=float(miou_from_confusion(total)), defect_mIoU=float(iou[1]), pixel_accuracy=math.nan,
                    per_class={}, ODS_F1=math.nan, ODS_threshold=0.5, OIS_F1=math.nan, tolerance_px=2,
                    pixel_AP=math.nan, image_AP=math.nan, images=len(confusion), seam_error=None,
                    non_seam_error=None, seam_ratio=seam[1] if seam else None, image_confusion=confusion,
                    predicted_classes=predicted, seam_ratio_no_overlap=seam[0] if seam else None,
                    seam_images=2 if seam else 0)


def _timing(seconds: list[float], memory: list[int] | None = None) -> Timing:
    v = sorted(seconds)
    q1, med, q3 = np.quantile(v, [0.25, 0.5, 0.75])
    memory = memory or [2 ** 30] * len(seconds)
    return Timing(seconds_per_image=float(med), seconds_all=seconds, seconds_min=v[0], seconds_max=v[-1],
                  seconds_q1=float(q1), seconds_q3=float(q3), tiles=4, tiles_per_s=4 / med,
                  peak_memory_bytes=max(memory), memory_increase_bytes=max(memory), memory_runs=memory,
                  memory_kind="peak_rss", image_size=[64, 64])


def _result(name, family, accuracy=None, *, confusion=None, pretrained=False, train_samples=None, model=None,
            sources=None, seconds=(1.0, 1.1, 1.2), method=None, hits=None, seam=None, pretraining=None,
            weights=None) -> ModelResult:
    metrics = _accuracy(confusion if confusion is not None else _confusions(accuracy), seam)
    interp = None
    if method:
        scores = [{"hit": h, "energy": 0.5 if h else 0.1, "chance": 0.05} for h in hits]
        interp = Interpretability(method=method, images=len(hits), pointing_game=float(np.mean(hits)),
                                  energy_in_defect=0.3, energy_chance=0.05, per_image=scores)
    card = ModelCard(name=name, run=name, model=model or name, architecture=None, family=family,
                     pretrained=pretrained, pretrain_sources=sources, train_samples=train_samples,
                     pretraining=pretraining, weights=weights)
    return ModelResult(card=card, metrics=metrics, learned=judge_learned(metrics, EvalConfig().learned_floor),
                       cost=Cost(parameters=1, gflops_per_tile=1.0, tiled=_timing(list(seconds))),
                       interpretability=interp)


def _verdict(results, claim, **kwargs) -> str:
    return next(c.verdict for c in decide_claims(results, **kwargs) if c.claim.startswith(claim))


def test_accuracy_claims_are_inconclusive_within_the_spread_of_the_images():
    cnn = _result("cnn", "CNN", [0.8, 0.7] * 6)
    assert _verdict([_result("vit", "ViT", [0.95] * 12, pretrained=True), cnn], "Pretrained ViTs") == "supported"
    assert _verdict([_result("vit", "ViT", [0.5] * 12, pretrained=True), cnn], "Pretrained ViTs") == "not supported"
    # a higher mIoU that comes from two images out of twelve is no win
    close = _result("vit", "ViT", [0.8, 0.7] * 5 + [0.9, 0.8], pretrained=True)
    assert close.metrics.mIoU > cnn.metrics.mIoU
    claim = next(c for c in decide_claims([close, cnn]) if c.claim == "Pretrained ViTs win on pixel accuracy")
    assert claim.verdict == "inconclusive" and "95% interval" in claim.evidence
    # a gain on every image, but smaller than claim_margin: no win worth the name
    tiny = _result("vit", "ViT", [0.805, 0.705] * 6, pretrained=True)
    assert _verdict([tiny, cnn], "Pretrained ViTs") == "not supported"
    assert _verdict([tiny, cnn], "Pretrained ViTs", margin=0.0) == "supported"
    assert _verdict([close, cnn], "CNNs win with little data") == "not measured"
    small = [_result("cnn-s", "CNN", [0.9] * 12, train_samples=8), _result("vit-s", "ViT", [0.6] * 12,
                                                                           train_samples=8)]
    assert _verdict([close, cnn, *small], "CNNs win with little data") == "supported"


def test_attention_claim_is_a_paired_comparison_of_pointing_hits():
    def verdict(att_hits, cam_hits):
        return _verdict([_result("vit", "ViT", [0.8] * 12, method="attention", hits=att_hits),
                         _result("cnn", "CNN", [0.8] * 12, method="grad-cam", hits=cam_hits)], "Attention maps")

    assert verdict([True] * 12, [False] * 12) == "supported"
    assert verdict([False] * 12, [True] * 12) == "not supported"
    assert verdict([True, True, True, False] + [False] * 4, [True] + [False] * 7) == "inconclusive"  # 3/8 vs 1/8
    ci = mean_difference([1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0])
    assert ci["difference"] == pytest.approx(0.5) and ci["low"] <= 0.5 <= ci["high"]
    assert mean_difference([1.0], [1.0, 0.0]) is None


def _study_like(subject: ModelResult) -> list[ModelResult]:
    """Results in which `subject` (a pretrained ViT on 8 images, diffusion-pretrained, scored, tiled) takes part
    in every claim."""
    others = [
        _result("vit-scratch", "ViT", [0.7] * 12, model="vit_tiny", train_samples=8, seconds=(2.0, 2.1, 2.2)),
        _result("vit-proc", "ViT", [0.75] * 12, model="vit_tiny", train_samples=8, pretrained=True,
                sources=["procedural"], method="attention", hits=[True] * 6 + [False] * 6, seam=(1.8, 1.0)),
        _result("hybrid", "ViT-Hybrid", [0.8] * 12, train_samples=8),
        _result("cnn", "CNN", [0.9] * 12, train_samples=8, seconds=(0.5, 0.55, 0.6), method="grad-cam",
                hits=[True] * 12, seam=(1.6, 1.05)),
    ]
    return [subject, *others]


def _subject(confusion) -> ModelResult:
    return _result("vit-subject", "ViT", confusion=confusion, model="vit_tiny", train_samples=8, pretrained=True,
                   sources=["inpaint", "procedural"], seconds=(2.0, 2.05, 2.1), method="attention",
                   hits=[False] * 12, seam=(1.5, 1.0))


def test_a_model_that_did_not_learn_makes_the_claims_it_is_in_inconclusive_and_pooled_claims_skip_it():
    metrics = EvalMetrics(["background", "crack"], tolerance=0, thresholds=4)
    truth = torch.zeros(16, 16, dtype=torch.long)
    truth[4:8, 2:14] = 1
    everywhere = torch.zeros(1, 2, 16, 16)
    everywhere[0, 0] = 1.0  # background everywhere
    metrics.update(everywhere, truth)
    learned = judge_learned(Accuracy(**metrics.compute()), floor=0.05)
    assert not learned.learned and learned.reason == "predicts background everywhere"

    degenerate = decide_claims(_study_like(_subject(_background_everywhere(12))))
    assert len(degenerate) == 9
    involved = {c.claim: c.verdict for c in degenerate if "vit-subject" in c.models}
    # a claim that names it (diffusion data vs not: the subject is the only diffusion-pretrained model) is
    # inconclusive; claims that pick from a family take the ViTs that learned, so they do not involve it
    assert involved == {"Diffusion-generated data improves synthetic pretraining":
                        "inconclusive: vit-subject did not learn"}, [(c.claim, c.verdict) for c in degenerate]
    assert not [c for c in degenerate if "did not learn" in c.verdict and "vit-subject" not in c.models]
    # a family in which no model learned still takes part, and every claim it is in says why
    results = _study_like(_subject(_confusions([0.85] * 12)))
    cnn = next(r for r in results if r.name == "cnn")
    results[results.index(cnn)] = _result("cnn", "CNN", confusion=_background_everywhere(12), train_samples=8,
                                          seconds=(0.5, 0.55, 0.6), method="grad-cam", hits=[True] * 12,
                                          seam=(1.6, 1.05))
    no_cnn = {c.claim: c.verdict for c in decide_claims(results) if "cnn" in c.models}
    assert set(no_cnn) >= {"CNNs are faster on 4K images (claimed 0.3 vs 2.1 s)", "Pretrained ViTs win on pixel "
                           "accuracy", "Attention maps localize defects better than Grad-CAM"}
    assert set(no_cnn.values()) == {"inconclusive: cnn did not learn"}
    learned = decide_claims(_study_like(_subject(_confusions([0.85] * 12))))
    assert len(learned) == 9 and not [c for c in learned if "did not learn" in c.verdict or c.verdict ==
                                      "not measured"]
    assert {c.verdict for c in learned} >= {"supported", "not supported"}


def test_a_defect_miou_below_the_floor_did_not_learn_and_names_the_key():
    barely = _accuracy([[[199, 1], [197, 3]]] * 4)  # predicts a little crack, defect IoU 3/201
    verdict = judge_learned(barely, floor=0.05)
    assert not verdict.learned and "below learned_floor 0.050" in verdict.reason
    assert judge_learned(barely, floor=0.01).learned
    from defectforge.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="learned_floor"):
        load_config(EvalConfig, None, {"learned_floor": 1.5})


class TileBorderModel(torch.nn.Module):
    """Not translation-equivariant: marks "defect" within 3 px of its input's border, background elsewhere, so
    that tiling without overlap draws the tile grid into the prediction."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        border = torch.ones(h, w, dtype=torch.bool)
        border[3:-3, 3:-3] = False
        defect = torch.where(border, 5.0, -5.0).expand(b, 1, h, w)
        return torch.cat([torch.zeros_like(defect), defect], 1)


def test_a_model_with_a_tile_seam_artefact_has_a_larger_seam_error_without_overlap():
    x, truth = torch.rand(1, 3, 128, 256), torch.zeros(128, 256, dtype=torch.long)
    kwargs = dict(tile=64, blend="gaussian", batch=4, band=4)
    e0, _, r0 = seam_summary(seam_errors(TileBorderModel(), x, truth, overlap=0.0, **kwargs))
    e1, _, r1 = seam_summary(seam_errors(TileBorderModel(), x, truth, overlap=0.25, **kwargs))
    assert e0 > 0.5 and e1 < e0 / 4 and r1 < r0  # without overlap the tile borders are wrong near every seam
    assert r0 > 1.1 >= r1 or e1 == 0  # the seam claim's threshold
    removed = _study_like(_subject(_confusions([0.85] * 12)))
    assert _verdict(removed, "Tile overlap") == "supported"
    removed[0].metrics.seam_ratio = 1.6  # the artefact stays with overlap
    assert _verdict(removed, "Tile overlap") == "not supported"
    assert _verdict(removed, "Tile overlap", overlap=0.0) == "not measured"


class Recorder(torch.nn.Module):
    def __init__(self, name: str, calls: list[str]):
        super().__init__()
        self.name, self.calls, self.conv = name, calls, torch.nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == 64:  # the timed image (FLOP counting uses a 128 px tile)
            self.calls.append(self.name)
        return self.conv(x)


def test_models_are_timed_in_alternation_and_the_spread_is_reported():
    calls: list[str] = []
    cfg = EvalConfig(tile_size=128, speed_size=[64, 64], repeats=3, warmup=1, wandb=False)
    loaded = []
    for name in ("a", "b"):
        card = ModelCard(name=name, run=name, model=name, architecture=None, family="CNN")
        result = ModelResult(card=card, metrics=_accuracy(_confusions([0.8])), learned=judge_learned(
            _accuracy(_confusions([0.8])), 0.05))
        loaded.append(Loaded(Recorder(name, calls).eval(), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), result))
    images = [{"image": torch.rand(3, 64, 64), "mask": torch.zeros(64, 64, dtype=torch.long), "key": "x/0"}]
    time_models(loaded, images, cfg, torch.device("cpu"))
    assert calls == ["a", "b"] * (cfg.warmup + cfg.repeats)
    for m in loaded:
        t = m.result.cost.tiled
        assert len(t.seconds_all) == len(t.memory_runs) == 3 and t.rounds == 3
        assert t.seconds_min <= t.seconds_q1 <= t.seconds_per_image <= t.seconds_q3 <= t.seconds_max
        assert "in alternation" in t.source and "evaluation image x/0" in t.source
    order: list[str] = []
    timers = time_interleaved({"p": lambda: order.append("p"), "q": lambda: order.append("q")},
                              torch.device("cpu"), repeats=2, warmup=0)
    assert order == ["p", "q", "p", "q"] and len(timers["q"].times) == 2
    order.clear()  # warm-up rounds call the cheaper `warm` entry where there is one, and are not timed
    timers = time_interleaved({"p": lambda: order.append("p"), "q": lambda: order.append("q")},
                              torch.device("cpu"), repeats=1, warmup=2, warm={"p": lambda: order.append("p-strip")})
    assert order == ["p-strip", "q", "p-strip", "q", "p", "q"] and len(timers["p"].times) == 1


def test_the_accuracy_pass_over_the_timed_image_is_each_models_first_timed_round():
    """An entry that comes with a timed run (evaluate: its accuracy pass over the timed image) is warm: no warm-up
    round, one timed round fewer, and its earlier run counts among its `repeats`; the others alternate as before."""
    cpu = torch.device("cpu")
    seeded = InferenceTimer(cpu)
    with seeded.measure():
        pass
    order: list[str] = []
    timers = time_interleaved({"p": lambda: order.append("p"), "q": lambda: order.append("q")}, cpu, repeats=2,
                              warmup=1, timers={"p": seeded})
    assert order == ["q", "p", "q", "q"] and timers["p"] is seeded
    assert len(timers["p"].times) == len(timers["q"].times) == 2
    calls: list[str] = []
    cfg = EvalConfig(tile_size=128, speed_size=[64, 64], repeats=3, warmup=1, wandb=False)
    loaded = []
    for name in ("a", "b"):
        card = ModelCard(name=name, run=name, model=name, architecture=None, family="CNN")
        acc = _accuracy(_confusions([0.8]))
        first = InferenceTimer(cpu)
        with first.measure():
            pass
        loaded.append(Loaded(Recorder(name, calls).eval(), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1),
                             ModelResult(card=card, metrics=acc, learned=judge_learned(acc, 0.05)), timed=first))
    images = [{"image": torch.rand(3, 64, 64), "mask": torch.zeros(64, 64, dtype=torch.long), "key": "x/0"}]
    time_models(loaded, images, cfg, cpu)
    assert calls == ["a", "b"] * (cfg.repeats - 1)
    for m in loaded:
        t = m.result.cost.tiled
        assert t.rounds == 3 and t.seconds_all[0] == m.timed.times[0]
        assert "the first of them each model's accuracy pass over this image" in t.source


def test_warm_up_runs_on_a_strip_with_one_batch_of_the_timed_tiles():
    calls: list[tuple] = []

    class Shapes(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return x[:, :2]

    image = torch.rand(1, 3, 2160, 3840)
    strip = warmup_strip(image, 512, 0.1, 8)
    assert strip.shape[-2:] == (512, 512 + 7 * 460) and torch.equal(strip, image[..., :512, :strip.shape[-1]])
    assert len(tile_grid(2160, 3840, 512, 0.1)) == 45 and len(tile_grid(*strip.shape[-2:], 512, 0.1)) == 8
    tiled_logits(Shapes(), strip, tile=512, overlap=0.1, batch=8)
    assert calls == [(8, 3, 512, 512)]  # one full batch: the shape most of the whole image's batches have
    tall = torch.rand(1, 3, 4000, 1200)  # three tiles a row: three rows hold a batch of 8
    assert warmup_strip(tall, 512, 0.1, 8).shape[-2:] == (512 + 2 * 460, 1200)
    small = torch.rand(1, 3, 700, 900)  # four tiles: the whole image
    assert warmup_strip(small, 512, 0.1, 8) is small


def test_speed_claim_uses_medians_and_is_inconclusive_when_the_spreads_overlap():
    def speed(cnn_seconds, vit_seconds):
        return _verdict([_result("cnn", "CNN", [0.8] * 4, seconds=cnn_seconds),
                         _result("vit", "ViT", [0.8] * 4, seconds=vit_seconds)], "CNNs are faster")

    assert speed((1.0, 1.1, 1.2), (2.0, 2.1, 2.2)) == "supported"
    assert speed((2.0, 2.1, 2.2), (1.0, 1.1, 1.2)) == "not supported"
    # the issue's busy machine: the same medians' order, but one slow outlier run each way
    assert speed((1.0, 1.9, 2.4), (1.5, 2.0, 2.6)) == "inconclusive"
    assert speed((1.0,), (2.0,)) == "inconclusive"  # one run each: no spread to judge the order by
    claim = next(c for c in decide_claims([_result("cnn", "CNN", [0.8] * 4), _result("vit", "ViT", [0.8] * 4)])
                 if c.claim.startswith("CNNs are faster"))
    assert "IQR" in claim.evidence and "min-max" in claim.evidence


HUB = "ImageNet-21k"
SYN = "synthetic (this study)"


def _claim(results, title):
    return next(c for c in decide_claims(results) if c.claim.startswith(title))


def test_pretrained_vits_are_compared_with_pretrained_cnns_and_synthetic_pretraining_with_the_same_start():
    """The study that mixes the arms: ViT-S from the hub, hub then synthetic, synthetic only, from scratch, and a
    ResNet-50 from the hub and from scratch."""
    arms = [
        _result("vit-hub", "ViT", [0.80] * 12, model="vit_small_patch16_224.augreg_in21k", pretraining=HUB),
        _result("vit-hub-syn", "ViT", [0.85] * 12, model="vit_small_patch16_224.augreg_in21k",
                pretraining=f"{HUB} + {SYN}", sources=["procedural"]),
        _result("vit-syn", "ViT", [0.75] * 12, model="vit_small_patch16_224", pretraining=SYN, sources=["procedural"]),
        _result("vit-scratch", "ViT", [0.60] * 12, model="vit_small_patch16_224", pretraining="none"),
        _result("r50-hub", "CNN", [0.70] * 12, model="resnet50.a1_in1k", pretraining="ImageNet-1k"),
        _result("r50-scratch", "CNN", [0.95] * 12, model="resnet50", pretraining="none"),
    ]
    cards = {r.name: r.card for r in arms}
    assert [c.pretrained for c in cards.values()] == [True, True, True, False, True, False]
    assert [c.synthetic for c in cards.values()] == [False, True, True, False, False, False]
    assert cards["vit-hub-syn"].start == HUB and cards["vit-syn"].start == "none" and cards["vit-hub"].arch == \
        "vit_small_patch16_224"
    won = _claim(arms, "Pretrained ViTs win")  # the best pretrained ViT against the pretrained CNN, not r50-scratch
    assert won.verdict == "supported" and "vit-hub-syn" in won.evidence and "best pretrained CNN r50-hub" in \
        won.evidence and "r50-scratch" not in won.models
    synthetic = _claim(arms, "Synthetic pretraining")  # hub+synthetic vs hub (0.85 vs 0.80), syn vs scratch
    assert synthetic.verdict == "supported" and "vit-hub-syn" in synthetic.evidence and "vit-hub (" in \
        synthetic.evidence
    assert set(synthetic.models) == {"vit-hub-syn", "vit-hub", "vit-syn", "vit-scratch"}
    no_pretrained_cnn = [r for r in arms if r.name != "r50-hub"]
    claim = _claim(no_pretrained_cnn, "Pretrained ViTs win")
    assert claim.verdict == "not supported" and "no CNN is pretrained here" in claim.evidence
    only_hub = [r for r in arms if r.name in ("vit-hub", "vit-scratch", "r50-hub")]  # no synthetic arm: no pair
    assert _claim(only_hub, "Synthetic pretraining").verdict == "not measured"


def test_the_report_shows_each_models_pretraining_and_the_weights_loaded(tmp_path):
    from evaluate.records import Evaluation
    from evaluate.report import write_report

    weights = {"source": "hub", "repo_id": "timm/vit_small_patch16_224.augreg_in21k", "revision": "c0ffee" * 7,
               "file": "model.safetensors", "license": "apache-2.0", "pretraining": HUB}
    results = [_result("vit-hub", "ViT", [0.8] * 4, model="vit_small_patch16_224.augreg_in21k", pretraining=HUB,
                       weights=weights),
               _result("vit-syn", "ViT", [0.7] * 4, pretraining=SYN), _result("cnn", "CNN", [0.9] * 4)]
    cfg = EvalConfig(wandb=False, interpret_images=0)
    evaluation = Evaluation(config=cfg, classes=["background", "crack"], sources=["x (test)"], images=4, device="cpu",
                            results=results, claims=decide_claims(results))
    write_report(tmp_path, evaluation, [], {})
    text = (tmp_path / "report.md").read_text()
    assert "| pretraining |" in text and f"| {HUB} |" in text and f"| {SYN} |" in text and "| none |" in text
    assert "## Pretrained weights" in text and "timm/vit_small_patch16_224.augreg_in21k @ c0ffeec0ffee" in text
    assert "apache-2.0" in text


def test_the_report_shows_where_each_true_class_goes(tmp_path):
    from evaluate.records import Evaluation
    from evaluate.report import _confusion_figure, confusions, write_report

    # two images, classes background / crack / scratch; rows = truth. The ViT never predicts scratch (its scratch
    # pixels go to background), the CNN finds 3 of every 4 and calls the fourth a crack
    vit_img = [[90, 0, 0], [2, 8, 0], [10, 0, 0]]
    cnn_img = [[89, 1, 0], [1, 9, 0], [0, 2, 6]]
    classes = ["background", "crack", "scratch"]
    results = [_result(name, family, [0.9] * 2) for name, family in (("vit", "ViT"), ("cnn", "CNN"), ("old", "CNN"))]
    results[0].metrics.image_confusion = [vit_img, vit_img]
    results[1].metrics.image_confusion = [cnn_img, cnn_img]
    results[2].metrics.image_confusion = []  # a run evaluated without per-image matrices is left out
    assert [name for name, _ in confusions(results)] == ["vit", "cnn"]
    assert confusions(results)[0][1].tolist() == [[180, 0, 0], [4, 16, 0], [20, 0, 0]]
    cfg = EvalConfig(wandb=False, interpret_images=0)
    evaluation = Evaluation(config=cfg, classes=classes, sources=["x (val)"], images=2, device="cpu",
                            results=results, claims=[])
    write_report(tmp_path, evaluation, [], {})
    text = (tmp_path / "report.md").read_text()
    assert "## Where each class's pixels go" in text
    assert "| run | true class | pixels | as background | as crack | as scratch |" in text
    assert "| vit | scratch | 20 | 1.000 | 0.000 | 0.000 |" in text
    assert "| cnn | scratch | 16 | 0.000 | 0.250 | 0.750 |" in text
    assert "| old |" not in text.split("## Where each class's pixels go")[1].split("##")[0]
    assert (tmp_path / "confusion.png").stat().st_size > 1000 and "confusion.png" in text
    assert "Where each class&#x27;s pixels go" in (tmp_path / "report.html").read_text()
    fig = _confusion_figure(confusions(results) * 2, classes)  # four runs: two rows of three, two panels blank
    assert len(fig.axes) == 6 and sum(ax.axison for ax in fig.axes) == 4


def test_a_vit_tiled_at_another_size_than_its_training_crops_is_named_in_the_report():
    from evaluate.report import _grid_note

    vit, hybrid, cnn = _result("vit", "ViT", [0.8] * 4), _result("hyb", "ViT-Hybrid", [0.8] * 4), \
        _result("cnn", "CNN", [0.8] * 4)
    for r, crop in ((vit, 128), (hybrid, 512), (cnn, 128)):
        r.card.crop_size = crop
    note = _grid_note([vit, hybrid, cnn], 512)
    assert "vit (128 px)" in note and "hyb" not in note and "cnn" not in note  # a CNN has no token grid
    assert vit.card.grid_mismatch(512) and not vit.card.grid_mismatch(128) and not cnn.card.grid_mismatch(512)
    assert _grid_note([vit, cnn], 128) == ""
    vit.card.crop_size = None  # a run saved without its crop size: nothing to say
    assert _grid_note([vit], 512) == ""
