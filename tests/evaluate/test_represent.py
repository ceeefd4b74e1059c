"""How the models see (evaluate/represent.py): CKA, attention distance, receptive field, rollout, probe, AUROC."""

import json
import math

import numpy as np
import pytest
import torch

from evaluate.represent import (
    MinibatchCKA,
    attention_distance,
    auroc,
    cka,
    gram,
    hsic_unbiased,
    linear_probe,
    receptive_field,
    rollout,
    u_center,
)


def _features(n=256, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def test_u_centred_product_is_the_unbiased_hsic_written_out():
    x, y = _features(20, 7, 1), _features(20, 5, 2)
    k, l = gram(x), gram(y)  # noqa: E741
    fast = float((u_center(k) * u_center(l)).sum() / (20 * 17))
    assert fast == pytest.approx(hsic_unbiased(k, l), rel=1e-9)


def test_cka_of_a_representation_with_itself_is_one_and_invariant_to_rotation_and_scale():
    x = _features()
    q, _ = torch.linalg.qr(_features(64, 64, 3))  # a random orthogonal matrix
    y = x @ torch.randn(64, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5 * _features(
        256, 32, 5)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-9)
    base = cka(x, y)
    assert 0.2 < base < 0.99
    assert cka(x @ q, y) == pytest.approx(base, abs=1e-9)
    assert cka(3.7 * x, y * 0.01) == pytest.approx(base, abs=1e-9)


def test_cka_of_independent_random_features_is_near_zero():
    assert abs(cka(_features(512, 768, 6), _features(512, 2048, 7), batch=64)) < 0.02


def test_the_minibatch_estimate_agrees_with_the_full_batch_value():
    x = _features(512, 96, 8)
    y = torch.tanh(x[:, :48] @ torch.randn(48, 80, generator=torch.Generator().manual_seed(9), dtype=torch.float64)) \
        + 0.3 * _features(512, 80, 10)
    full, mini = cka(x, y), cka(x, y, batch=64)
    assert 0.1 < full < 0.95 and mini == pytest.approx(full, abs=0.03)


def test_minibatch_cka_gives_every_pair_of_layers_and_refuses_tiny_batches():
    acc = MinibatchCKA()
    x = _features(32, 8, 11)
    acc.update({"a": x, "b": 2 * x, "c": _features(32, 8, 12)})
    m = acc.compute()
    assert m.shape == (3, 3) and np.allclose(np.diag(m), 1) and np.allclose(m, m.T) and m[0, 1] == pytest.approx(1)
    with pytest.raises(ValueError, match="at least 4 examples"):
        acc.update({"a": x[:3], "b": x[:3], "c": x[:3]})


def test_attention_distance_of_local_and_uniform_attention_equals_hand_computed_values():
    # a 2x2 grid of 16 px patches plus a class token; local: each patch attends to itself and its right/left
    # neighbour half-half -> every query's distance is 8 px
    n = 5
    local = torch.zeros(1, 2, n, n)
    for q, k in [(1, 2), (2, 1), (3, 4), (4, 3)]:
        local[0, :, q, q] = 0.4
        local[0, :, q, k] = 0.4
        local[0, :, q, 0] = 0.2  # to the class token: excluded, the patch weights are renormalised
    assert attention_distance(local, (2, 2), 16, prefix=1) == pytest.approx([8.0, 8.0])
    uniform = torch.full((1, 1, 4, 4), 0.25)  # no prefix: each query sees 0, 16, 16, 16*sqrt(2) px
    assert attention_distance(uniform, (2, 2), 16)[0] == pytest.approx((32 + 16 * math.sqrt(2)) / 4)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_receptive_field_of_stacked_3x3_convolutions_matches_the_theoretical_size(k):
    torch.manual_seed(k)
    net = torch.nn.Sequential(*[torch.nn.Conv2d(2 if i else 3, 2, 3, padding=1) for i in range(k)])
    with torch.no_grad():
        for conv in net:
            conv.weight.abs_()  # no cancellation inside the theoretical field
    x = torch.rand(1, 3, 21, 21, requires_grad=True)
    net(x)[0, :, 10, 10].sum().backward()
    erf = receptive_field(x.grad[0].abs().sum(0), share=1.0)
    assert erf["size"] == 2 * k + 1
    assert 0 < erf["mean_distance"] < k * math.sqrt(2)
    assert receptive_field(x.grad[0].abs().sum(0), share=0.5)["size"] <= 2 * k + 1


def test_rollout_of_identity_attention_is_uniform_and_follows_a_pointing_class_token():
    n = 1 + 9
    identity = [torch.eye(n).expand(1, 3, n, n)] * 4
    for fusion in ("mean", "max", "min"):
        r = rollout(identity, prefix=1, fusion=fusion, discard_ratio=0.5)
        assert r.shape == (1, 9) and torch.allclose(r, r[:, :1].expand_as(r))
    r = rollout([torch.eye(9).expand(1, 2, 9, 9)], prefix=0)  # no class token: the mean over patch queries
    assert torch.allclose(r, torch.full((1, 9), 1 / 9))
    pointing = torch.eye(n).expand(1, 2, n, n).clone()
    pointing[0, :, 0] = 0
    pointing[0, :, 0, 5] = 1  # the class token looks at patch 4
    assert int(rollout([pointing, torch.eye(n)[None, None]], prefix=1).argmax()) == 4
    with pytest.raises(ValueError, match="head fusion"):
        rollout(identity, prefix=1, fusion="median")


def test_the_probe_reads_a_label_the_features_carry_and_is_at_chance_on_noise():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(2000, generator=g) < 0.1).long()  # rare positives, as defect patches are
    informative = torch.randn(2000, 32, generator=g) + 1.5 * y[:, None] * torch.randn(1, 32, generator=g)
    assert linear_probe(informative[:1000], y[:1000], informative[1000:], y[1000:]) > 0.95
    noise = torch.randn(2000, 32, generator=g)
    assert abs(linear_probe(noise[:1000], y[:1000], noise[1000:], y[1000:]) - 0.5) < 0.08
    with pytest.raises(ValueError, match="one class"):
        linear_probe(noise[:10], torch.zeros(10), noise[:10], y[:10])


def test_auroc_by_hand():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.ones(4), torch.tensor([0, 1, 0, 1])) == pytest.approx(0.5)
    assert math.isnan(auroc(torch.rand(4), torch.zeros(4)))


# ------------------------------------------------------------------------------------- the command, on runs

CLASSES = ["background", "crack", "pit"]
SMALL_VIT = {"embed_dim": 48, "num_heads": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from defectforge.config import load_config
    from finetune.config import FinetuneConfig
    from pretrain.models import create_backbone, model_config, save_model
    from pretrain.segmenter import build_segmenter, save_segmenter
    from tests.synth.helpers import make_shards

    root = tmp_path_factory.mktemp("represent")
    make_shards(root / "shards", num_samples=16, image_size=64, shard_size=8, val_ratio=0.5)
    classes = json.loads((root / "shards/_info.json").read_text())["classes"]
    torch.manual_seed(0)
    for name, over in [("vit", {"model": "vit_tiny", "encoder_kwargs": SMALL_VIT}),
                       ("cnn", {"model": "resnet18", "architecture": "Unet"})]:
        model, mcfg = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": 64, **over}), classes)
        save_segmenter(model, root / name, mcfg)
    for pool in ("token", "avg"):
        m = create_backbone("vit_tiny", num_classes=len(classes) - 1, img_size=64, global_pool=pool, depth=2,
                            **SMALL_VIT)
        mcfg = model_config("vit_tiny", num_classes=len(classes) - 1, classes=classes, img_size=64, global_pool=pool,
                            kwargs={"depth": 2, **SMALL_VIT}, mean=[0.5] * 3, std=[0.25] * 3)
        save_model(m, root / f"cls_{pool}", mcfg)
    return root


def test_represent_writes_the_matrices_figures_and_both_claims(runs, tmp_path):
    from evaluate.__main__ import main

    out = tmp_path / "rep"
    models = [str(runs / n) for n in ("vit", "cnn", "cls_token", "cls_avg")]
    assert main(["represent", "--models", *models, "--shards", str(runs / "shards"), "--out", str(out),
                 "batch_size=4", "erf_images=2"]) == 0
    rep = json.loads((out / "represent.json").read_text())
    names, matrix = rep["cka"]["names"], np.array(rep["cka"]["matrix"])
    assert len(names) == 12 + 5 + 2 + 2 and np.allclose(np.diag(matrix), 1) and np.allclose(matrix, matrix.T)
    vit, cnn, token, avg = rep["models"]
    assert np.array(vit["attention_distance"]).shape == (12, 2) and cnn["attention_distance"] is None
    assert [f["layer"] for f in cnn["receptive_field"]] == ["act1", "layer1", "layer2", "layer3", "layer4"]
    fields = [f["mean_distance"] for f in cnn["receptive_field"]]
    assert fields == sorted(fields)  # deeper stages see farther
    assert set(vit["localization"]) == {"last-layer CLS attention", "attention rollout"}
    assert set(cnn["localization"]) == {"Grad-CAM"} and 0 <= cnn["localization"]["Grad-CAM"]["auroc"] <= 1
    assert (token["global_pool"], avg["global_pool"], vit["global_pool"]) == ("token", "avg", None)
    assert len(token["probe"]) == 2 and all(0 <= a <= 1 for a in token["probe"])
    claims = {c["claim"].split(" (")[0]: c["verdict"] for c in rep["claims"]}
    assert claims["ViT layers see globally early"] in ("supported", "not supported")
    assert claims["CLS-trained ViTs keep spatial information at the output"] != "not measured"
    for png in ("cka", "attention_distance", "represent_maps", "probe"):
        assert (out / f"{png}.png").stat().st_size > 5000
    assert "How the models see" in (out / "report.md").read_text()


def test_the_class_attention_read_here_is_the_one_interpret_computes(runs):
    from evaluate.interpret import attention_map
    from evaluate.represent_run import attention_weights, load_subject

    s = load_subject(runs / "vit", torch.device("cpu"))
    x = torch.rand(1, 3, 64, 64)
    fused = [b.attn.fused_attn for b in s.encoder.blocks]
    with torch.no_grad(), attention_weights(s.encoder) as weights:
        s.encoder.forward_features(x)
    assert [b.attn.fused_attn for b in s.encoder.blocks] == fused and len(weights) == 12  # switched back after
    cls = weights[-1][0, :, 0, 1:].mean(0).reshape(1, 1, 4, 4)
    expected = torch.nn.functional.interpolate(cls, size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(attention_map(s.segmenter, x), expected, atol=1e-5)


def test_represent_errors_name_the_problem(runs, tmp_path, caplog):
    from evaluate.__main__ import main

    shards = str(runs / "shards")
    assert main(["represent", "--models", str(tmp_path), "--shards", shards, "--out", str(tmp_path / "o")]) == 2
    assert "is not a finetune or pretrain run" in caplog.text
    assert main(["represent", "--models", str(runs / "vit"), "--shards", shards, "--out", str(tmp_path / "o2"),
                 "batch_size=2"]) == 2
    assert "batch_size" in caplog.text and "unbiased HSIC" in caplog.text
    assert main(["represent", "--models", str(runs / "vit"), "--shards", shards, "--out", str(tmp_path / "o3"),
                 "rollout_fusion=median"]) == 2
    assert "rollout_fusion" in caplog.text


def test_the_claims_read_hand_built_measures():
    from evaluate.claims import represent_claims

    def model(name, kind="segmentation", family="ViT", distance=None, field=None, pool=None, probe=None):
        return {"name": name, "kind": kind, "family": family, "attention_distance": distance, "global_pool": pool,
                "receptive_field": field and [{"mean_distance": f} for f in field], "probe": probe}

    rep = {"crop": 224, "models": [model("v", distance=[[3, 80], [90, 100]]),
                                   model("c", family="CNN", field=[5, 20, 40, 70, 120]),
                                   model("t", "classification", pool="token", probe=[0.8, 0.9]),
                                   model("a", "classification", pool="avg", probe=[0.8, 0.6])]}
    early, spatial = represent_claims(rep)
    assert early.verdict == "supported" and "75%" in early.evidence and "stage 5" in early.evidence
    assert spatial.verdict == "supported" and "+0.30" in spatial.evidence
    rep["models"][3]["probe"] = [0.8, 0.93]
    assert represent_claims(rep)[1].verdict == "not supported"
    assert represent_claims(rep, learned={"v": False})[0].verdict == "inconclusive: v did not learn"
    assert [c.verdict for c in represent_claims({"crop": 64, "models": rep["models"][:1]})] == ["not measured"] * 2


def test_evaluate_run_with_represent_adds_the_section_and_the_two_claim_rows(runs, tmp_path):
    from evaluate.config import EvalConfig
    from evaluate.run import evaluate

    cfg = EvalConfig(tile_size=64, speed_size=[64, 64], repeats=1, warmup=0, wandb=False, interpret_images=2,
                     overlays=0, represent=True, represent_images=8, represent_crop=64)
    report = evaluate(cfg, [str(runs / "vit"), str(runs / "cnn")], [str(runs / "shards")], tmp_path / "report",
                      progress=False, represent_runs=[str(runs / "cls_token"), str(runs / "cls_avg")])
    results = json.loads((tmp_path / "report/results.json").read_text())
    assert [m["name"] for m in results["represent"]["models"]] == ["vit", "cnn", "cls_token", "cls_avg"]
    claims = {c["claim"].split(" (")[0]: c["verdict"] for c in results["claims"]}
    # untrained models did not learn: the claims that involve them say so
    assert claims["ViT layers see globally early"].startswith("inconclusive: ")
    assert claims["CLS-trained ViTs keep spatial information at the output"] != "not measured"
    text = (tmp_path / "report/report.md").read_text()
    assert "## How the models see" in text and "cka.png" in text and "probe.png" in text
    assert report.name == "report.html" and (tmp_path / "report/attention_distance.png").is_file()


def test_a_hybrid_vit_measures_distance_in_pixels_of_its_tokens_not_of_its_patch_projection():
    import timm

    from evaluate.represent_run import RepresentConfig, Subject, measure

    torch.manual_seed(0)
    enc = timm.create_model("vit_small_r26_s32_224", img_size=64, dynamic_img_size=True, depth=2).eval()
    assert enc.patch_embed.patch_size == (1, 1)  # on the stem's feature map; a token covers 32 px
    s = Subject("hybrid", "-", "classification", enc, "ViT-Hybrid", torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1),
                "token")
    crops = [{"key": str(i), "image": torch.rand(3, 64, 64), "mask": torch.zeros(64, 64, dtype=torch.long)}
             for i in range(4)]
    for c in crops[::2]:
        c["mask"][:32, :32] = 1
    rep, _ = measure([s], crops, RepresentConfig(batch_size=4, crop=64))
    distance = np.array(rep["models"][0]["attention_distance"])
    assert distance.shape == (2, 6) and (distance > 8).all() and (distance <= 32 * math.sqrt(2)).all()


def test_gradcam_of_a_batch_is_each_image_on_its_own(runs):
    from evaluate.interpret import gradcam_map, gradcam_maps
    from evaluate.represent_run import load_subject

    s = load_subject(runs / "cnn", torch.device("cpu"))
    with torch.no_grad():
        s.segmenter.net.segmentation_head[0].weight.mul_(-1)  # untrained: the map would be 0 everywhere
        s.segmenter.net.segmentation_head[0].bias.mul_(-1)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    batch = gradcam_maps(s.segmenter, x)
    assert batch.shape == (3, 64, 64) and batch.abs().sum() > 0
    for i in range(3):
        assert torch.allclose(batch[i], gradcam_map(s.segmenter, x[i:i + 1]), atol=1e-5, rtol=1e-4)
