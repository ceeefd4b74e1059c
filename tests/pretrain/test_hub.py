"""`pretrained: true`: published timm weights from a Hugging Face Hub cache that the tests build themselves (no
network): exactly those tensors reach pretraining and fine-tuning, the repository and revision loaded are recorded,
and weights that cannot be had fail in one line naming the repository and the ways to get it offline."""

import json
import logging
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from defectforge.config import ConfigError, load_config
from evaluate.run import describe
from finetune.config import FinetuneConfig
from finetune.train import train as finetune
from pretrain.__main__ import main as pretrain_main
from pretrain.config import PretrainConfig
from pretrain.hub import SYNTHETIC, PretrainedWeightsError, combine, fetch_pretrained, pretraining_label
from pretrain.segmenter import build_segmenter
from pretrain.train import build_model
from pretrain.train import train as pretrain
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[2]
REV_A, REV_B = "a1" * 20, "b2" * 20
VIT = "vit_tiny_patch16_224.augreg_in21k"
SMALL_VIT = {"embed_dim": 48, "num_heads": 2}
CLASSES = ["background", "crack", "pit"]
FAST = {"crop_size": 64, "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "val_every": 2, "checkpoint_every": 2,
        "log_every": 1, "num_workers": 0, "shuffle_buffer": 0, "wandb": False}


def publish(cache: Path, name: str, revision: str, **kwargs) -> dict[str, torch.Tensor]:
    """Save the weights of a timm model built with `kwargs` as the Hub cache holds timm repository `name`:
    hub/models--timm--NAME/snapshots/REV/{model.safetensors, config.json} and refs/main naming REV."""
    arch, tag = name.split(".")
    torch.manual_seed(int(revision[:4], 16))  # other weights for another revision
    kwargs.setdefault("num_classes", timm.models.get_pretrained_cfg(name).num_classes)  # the published head
    model = timm.create_model(arch, pretrained=False, **kwargs)
    repo = cache / "hub" / f"models--timm--{name}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(snapshot / "model.safetensors"), metadata={"format": "pt"})
    (snapshot / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": model.num_classes,
                                                      "pretrained_cfg": {"tag": tag}}))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return state


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hub cache at HF_HOME, offline."""
    cache = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(key, raising=False)
    return cache


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub-shards")
    make_shards(out, num_samples=8, image_size=[64, 96], shard_size=4, val_ratio=0.25)
    return out


def _flat(key: str) -> str:
    """timm's feature wrappers name stage i `stages_i` where the model says `stages.i`."""
    for prefix in ("stages", "layers"):
        key = key.replace(f"{prefix}_", f"{prefix}.", 1) if key.startswith(f"{prefix}_") else key
    return key


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    got = {_flat(k): v for k, v in model.state_dict().items() if not k.startswith(skip)}
    assert got, "nothing to compare"
    for key, tensor in got.items():
        assert torch.equal(tensor, state[key]), key


def test_pretrain_builds_both_objectives_with_exactly_the_cached_weights(hub):
    state = publish(hub, VIT, REV_A, img_size=64, **SMALL_VIT)
    cfg = load_config(PretrainConfig, None, {**FAST, "model": VIT, "model_kwargs": SMALL_VIT, "pretrained": True})
    net, mcfg = build_model(cfg, CLASSES)
    assert_loaded(net.backbone, state, skip=("head.",))  # the 21843-class head is dropped for the 2 defect classes
    assert mcfg["weights"]["repo_id"] == f"timm/{VIT}" and mcfg["weights"]["revision"] == REV_A
    assert mcfg["weights"]["pretraining"] == "ImageNet-21k" and mcfg["weights"]["license"] == "apache-2.0"
    assert mcfg["mean"] == mcfg["std"] == [0.5, 0.5, 0.5]  # the augreg weights' normalisation, not ImageNet's
    seg = load_config(PretrainConfig, None, {**FAST, "model": VIT, "model_kwargs": SMALL_VIT, "pretrained": True,
                                             "objective": "segmentation"})
    model, _ = build_segmenter(seg, CLASSES, encoder_kwargs=SMALL_VIT)
    assert_loaded(model.encoder, state)


@pytest.mark.parametrize("name, kwargs, label", [
    (VIT, {"img_size": 64, **SMALL_VIT}, "ImageNet-21k"),
    ("vit_small_patch14_reg4_dinov2.lvd142m", {"img_size": 56, **SMALL_VIT}, "DINOv2 LVD-142M"),
    ("vit_large_patch16_dinov3.sat493m", {"img_size": 64, **SMALL_VIT}, "DINOv3 SAT-493M"),
    ("resnet18.a1_in1k", {"layers": [1, 1, 1, 1]}, "ImageNet-1k"),
], ids=["vit", "dinov2-patch14-registers", "dinov3-sat", "resnet"])
def test_finetune_encoders_start_from_exactly_the_cached_weights(hub, name, kwargs, label):
    state = publish(hub, name, REV_A, **kwargs)
    encoder = {k: v for k, v in kwargs.items() if k != "img_size"}
    cfg = load_config(FinetuneConfig, None, {**FAST, "model": name, "crop_size": kwargs.get("img_size", 64),
                                             "encoder_kwargs": encoder, "pretrained": True})
    model, mcfg = build_segmenter(cfg, CLASSES)
    assert_loaded(model.encoder, state)
    assert mcfg["weights"]["pretraining"] == label and mcfg["weights"]["revision"] == REV_A
    assert tuple(mcfg["mean"]) == pytest.approx(timm.models.get_pretrained_cfg(name).mean)
    with torch.no_grad():
        assert model.eval()(torch.rand(1, 3, 100, 70)).shape == (1, 3, 100, 70)


def test_the_revision_recorded_is_the_one_refs_main_points_to_and_the_one_loaded(hub):
    publish(hub, VIT, REV_A, img_size=64, **SMALL_VIT)
    newer = publish(hub, VIT, REV_B, img_size=64, **SMALL_VIT)  # refs/main now names REV_B
    weights = fetch_pretrained(VIT)
    assert weights.record["revision"] == REV_B and REV_B in str(weights.file)
    cfg = load_config(FinetuneConfig, None, {**FAST, "model": VIT, "encoder_kwargs": SMALL_VIT, "pretrained": True})
    model, mcfg = build_segmenter(cfg, CLASSES)
    assert_loaded(model.encoder, newer)
    assert mcfg["weights"]["revision"] == REV_B


def test_runs_record_the_weights_and_the_hub_then_synthetic_chain(hub, shards, tmp_path):
    publish(hub, VIT, REV_A, img_size=64, **SMALL_VIT)
    common = {**FAST, "model": VIT}
    pre = tmp_path / "pre"
    pretrain(load_config(PretrainConfig, None, {**common, "model_kwargs": SMALL_VIT, "pretrained": True,
                                                "objective": "segmentation"}), str(shards), pre, progress=False)
    info = json.loads((pre / "run_info.json").read_text())
    assert info["pretraining"] == f"ImageNet-21k + {SYNTHETIC}" and info["weights"]["revision"] == REV_A
    assert info["normalisation"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert json.loads((pre / "model_config.json").read_text())["weights"]["repo_id"] == f"timm/{VIT}"

    runs = {"hub": {"pretrained": True}, "hub-synthetic": {"init": str(pre)}, "scratch": {}}
    for name, keys in runs.items():
        finetune(load_config(FinetuneConfig, None, {**common, "encoder_kwargs": SMALL_VIT, **keys}), str(shards),
                 tmp_path / name, progress=False)
    # what evaluation shows: model_config.json's record, through the model card
    cards = {name: describe(tmp_path / name, json.loads((tmp_path / name / "model_config.json").read_text()))
             for name in runs}
    assert {n: c.pretraining for n, c in cards.items()} == {
        "hub": "ImageNet-21k", "hub-synthetic": f"ImageNet-21k + {SYNTHETIC}", "scratch": "none"}
    assert cards["hub"].weights["revision"] == cards["hub-synthetic"].weights["revision"] == REV_A
    assert [c.synthetic for c in cards.values()] == [False, True, False]
    assert [c.pretrained for c in cards.values()] == [True, True, False]
    info = json.loads((tmp_path / "hub/run_info.json").read_text())
    assert info["weights"]["repo_id"] == f"timm/{VIT}" and info["pretraining"] == "ImageNet-21k"


def test_weights_that_cannot_be_had_fail_naming_the_repository_and_the_offline_ways(hub, shards, tmp_path, caplog):
    with pytest.raises(PretrainedWeightsError) as info:
        fetch_pretrained(VIT)
    message = str(info.value)
    for part in (f"timm/{VIT}", "HF_HUB_OFFLINE=1", str(hub / "hub"), "HF_HOME", "weights=FILE", "init=FILE"):
        assert part in message, part
    assert "\n" not in message
    out = tmp_path / "run"
    assert pretrain_main(["--config", str(REPO / "configs/pretrain/vit_tiny.yaml"), "--shards", str(shards), "--out",
                          str(out), "pretrained=true", f"model={VIT}", "wandb=false", "num_workers=0"]) == 2
    assert f"timm/{VIT}" in caplog.text and not (out / "model.safetensors").exists()
    with pytest.raises(PretrainedWeightsError, match="publishes no weights for 'vit_small_patch16_18x2_224'"):
        fetch_pretrained("vit_small_patch16_18x2_224")
    with pytest.raises(ConfigError, match="key 'weights'.*pretrained=true"):
        load_config(PretrainConfig, None, {"pretrained": True, "weights": "w.safetensors"})
    with pytest.raises(ConfigError, match="key 'init'.*pretrained=true"):
        load_config(FinetuneConfig, None, {"pretrained": True, "init": "runs/pretrain/x"})
    with pytest.raises(ConfigError, match="key 'pretrained'"):
        load_config(FinetuneConfig, None, {"pretrained": "maybe"})


def test_pretraining_labels_come_from_the_pretrained_tag():
    assert pretraining_label("vit_small_patch16_224.augreg_in21k_ft_in1k") == "ImageNet-21k"
    assert pretraining_label("vit_small_patch14_reg4_dinov2.lvd142m") == "DINOv2 LVD-142M"
    assert pretraining_label("vit_small_patch16_dinov3.lvd1689m") == "DINOv3 LVD-1689M"
    assert pretraining_label("convnext_tiny.dinov3_lvd1689m") == "DINOv3 LVD-1689M"
    assert pretraining_label("resnet50.a1_in1k") == "ImageNet-1k"
    assert pretraining_label("convnext_tiny.in12k_ft_in1k") == "ImageNet-12k"
    assert combine("ImageNet-21k", synthetic=True) == f"ImageNet-21k + {SYNTHETIC}"
    assert combine(SYNTHETIC, synthetic=True) == SYNTHETIC and combine(None, synthetic=False) == "none"


def test_nothing_is_fetched_without_pretrained_true(hub, caplog):
    caplog.set_level(logging.INFO)
    cfg = load_config(FinetuneConfig, None, {**FAST, "model": VIT, "encoder_kwargs": SMALL_VIT})
    _, mcfg = build_segmenter(cfg, CLASSES)
    assert mcfg["weights"] is None and not (hub / "hub").exists()
