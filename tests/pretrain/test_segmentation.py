"""Segmentation pretraining (`objective: segmentation`) and its transfer into fine-tuning: the decoder and the
head's class rows load by name, through `class_map`, or are re-initialised with the reason written down."""

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from defectforge.config import ConfigError, load_config
from defectforge.tracking import read_metrics
from finetune.config import FinetuneConfig
from finetune.models import load_init, map_classes
from finetune.train import train as finetune
from pretrain.config import PretrainConfig
from pretrain.segmenter import build_segmenter, load_segmenter
from pretrain.train import train as pretrain
from synth.importer import import_folder
from tests.synth.helpers import make_shards

SMALL_VIT = {"embed_dim": 48, "num_heads": 2}
FAST = {"crop_size": 64, "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "val_every": 4, "checkpoint_every": 4,
        "log_every": 1, "num_workers": 0, "shuffle_buffer": 0, "wandb": False}
SYNTH = ["background", "crack", "scratch", "pit", "stain", "chip"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("segpre-shards")
    make_shards(out, num_samples=16, image_size=[64, 96], shard_size=4, val_ratio=0.25)
    return out


@pytest.fixture(scope="module")
def vit_run(shards, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("segpre-vit") / "run"
    cfg = load_config(PretrainConfig, None, {**FAST, "objective": "segmentation", "model": "vit_tiny",
                                             "model_kwargs": SMALL_VIT, "defect_crop": 0.5})
    summary = pretrain(cfg, str(shards), run, progress=False)
    assert summary["step"] == 4 and "val_defect_mIoU" in summary["val"]
    return run


def _real_folder(root: Path, classes: list[str]) -> Path:
    """A labeled folder with the given defect classes (values 1..K), imported with a val split."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        mask = np.zeros((64, 80), np.uint8)
        for k in range(1, len(classes) + 1):
            y, x = rng.integers(0, 56), rng.integers(0, 72)
            mask[y:y + 6, x:x + 6] = k
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
        Image.fromarray(mask).save(masks / f"{i:03d}.png")
    out = root / "shards"
    import_folder(images, masks, out, classes=classes, name="mine", val_ratio=0.25, seed=0)
    return out


def test_segmentation_pretraining_writes_the_finetune_network_and_its_metrics(vit_run):
    model, mcfg = load_segmenter(vit_run)
    assert mcfg["objective"] == "segmentation" and mcfg["smp_class"] == "DPT" and mcfg["classes"] == SYNTH
    assert mcfg["aux_classes"] == len(SYNTH) - 1  # the multi-label auxiliary head
    logits, labels = model(torch.rand(1, 3, 70, 90))
    assert logits.shape == (1, len(SYNTH), 70, 90) and labels.shape == (1, len(SYNTH) - 1)
    rows = [r for r in read_metrics(vit_run / "metrics.jsonl") if "loss" in r]
    assert rows and all({"ce", "dice", "bce"} <= set(r) for r in rows)
    assert (vit_run / "cutmix_grid.png").is_file()


def test_finetune_from_a_segmentation_run_loads_encoder_decoder_and_head_with_identical_outputs(shards, vit_run,
                                                                                             tmp_path):
    cfg = load_config(FinetuneConfig, None, {**FAST, "model": "vit_tiny", "encoder_kwargs": SMALL_VIT,
                                             "init": str(vit_run)})
    model, mcfg = build_segmenter(cfg, SYNTH)
    report = load_init(model, vit_run, mcfg)
    saved = safetensors.torch.load_file(str(vit_run / "model.safetensors"))
    decoder = [k for k in saved if k.startswith("net.decoder.")]
    assert decoder and set(decoder) <= set(report["decoder_loaded"])
    assert "net.segmentation_head.head.4.weight" in report["decoder_loaded"]
    assert report["classes"] == {c: [c] for c in SYNTH} and not report["reinitialised"]
    assert not report["unexpected"]
    pre, _ = load_segmenter(vit_run)
    model.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), pre(x)[0], atol=1e-5)  # the same network, without the auxiliary head

    # the command: run_info.json says what loaded
    summary = finetune(load_config(FinetuneConfig, None, {**FAST, "model": "vit_tiny", "encoder_kwargs": SMALL_VIT,
                                                          "init": str(vit_run), "max_steps": 2, "val_every": 2,
                                                          "checkpoint_every": 2}), str(shards), tmp_path / "ft",
                       progress=False)
    assert summary["step"] == 2
    info = json.loads((tmp_path / "ft/run_info.json").read_text())["init_report"]
    assert info["decoder_loaded"][0] >= len(decoder) and info["classes"][1]["crack"] == ["crack"]


def test_class_map_renames_merges_and_reinitialises_head_rows(vit_run, tmp_path):
    saved = safetensors.torch.load_file(str(vit_run / "model.safetensors"))
    w, b = saved["net.segmentation_head.head.4.weight"], saved["net.segmentation_head.head.4.bias"]
    target = ["background", "defect", "blowhole", "dent"]
    cfg = load_config(FinetuneConfig, None, {**FAST, "model": "vit_tiny", "encoder_kwargs": SMALL_VIT,
                                             "init": str(vit_run)})
    model, mcfg = build_segmenter(cfg, target)
    fresh = model.state_dict()["net.segmentation_head.head.4.weight"].clone()
    report = load_init(model, vit_run, mcfg, {"defect": ["crack", "scratch"], "blowhole": "pit"})
    head = model.state_dict()
    got_w, got_b = head["net.segmentation_head.head.4.weight"], head["net.segmentation_head.head.4.bias"]
    assert torch.equal(got_w[0], w[0]) and torch.equal(got_b[0], b[0])  # background from background
    assert torch.allclose(got_w[1], (w[1] + w[2]) / 2) and torch.allclose(got_b[1], (b[1] + b[2]) / 2)
    assert torch.equal(got_w[2], w[3])  # blowhole <- pit
    assert torch.equal(got_w[3], fresh[3])  # dent: no pretraining class of that name, left as initialised
    assert report["classes"]["defect"] == ["crack", "scratch"] and report["classes"]["blowhole"] == ["pit"]
    assert "no pretraining class named 'dent'" in report["classes"]["dent"]


def test_class_map_errors_name_the_class_and_the_lists(vit_run):
    with pytest.raises(ValueError, match="'rust' is not a class of the fine-tuning data"):
        map_classes(["background", "crack"], SYNTH, {"rust": "stain"})
    with pytest.raises(ValueError, match=r"crack -> \['spall'\] is not a class of the init's pretraining data"):
        map_classes(["background", "crack"], SYNTH, {"crack": ["spall"]})
    with pytest.raises(ConfigError, match="class_map"):
        load_config(FinetuneConfig, None, {"class_map": {"crack": "crack"}})  # no init to map from
    with pytest.raises(ConfigError, match="objective"):
        load_config(PretrainConfig, None, {"objective": "detection"})


def test_a_cnn_segmentation_run_transfers_and_a_different_decoder_is_reinitialised(shards, tmp_path):
    run = tmp_path / "unet"
    pretrain(load_config(PretrainConfig, None, {**FAST, "objective": "segmentation", "model": "resnet18",
                                                "architecture": "Unet", "aux_weight": 0.0}), str(shards), run,
             progress=False)
    mine = _real_folder(tmp_path / "mine", ["crack", "dent"])
    unet = {**FAST, "model": "resnet18", "architecture": "Unet", "init": str(run), "max_steps": 2, "val_every": 2,
            "checkpoint_every": 2}
    finetune(load_config(FinetuneConfig, None, unet), str(mine), tmp_path / "ft", progress=False)
    report = json.loads((tmp_path / "ft/run_info.json").read_text())["init_report"]
    assert report["decoder_loaded"][0] > 0 and report["classes"][1]["crack"] == ["crack"]
    assert "dent" in report["classes"][1]["dent"]
    fpn, mcfg = build_segmenter(load_config(FinetuneConfig, None, {**unet, "architecture": "FPN"}), ["background"])
    other = load_init(fpn, run, mcfg)
    assert other["decoder_loaded"] == [] and "Unet" in other["reinitialised"]["decoder and head"]


def test_co_training_batches_hold_the_configured_share_with_mapped_classes(shards, tmp_path):
    from defectforge.reader import list_keys
    from finetune.models import class_lut
    from finetune.train import FinetuneTask, co_batch
    from pretrain.segmenter import IGNORE

    mine = _real_folder(tmp_path / "mine", ["defect", "dent"])
    lut = class_lut(["background", "defect", "dent"], SYNTH, {"defect": ["crack", "scratch"]})
    assert lut[:6].tolist() == [0, 1, 1, IGNORE, IGNORE, IGNORE]  # pit, stain, chip: no target class
    cfg = load_config(FinetuneConfig, None, {**FAST, "batch_size": 4, "synthetic_shards": str(shards),
                                             "synthetic_ratio": 0.25, "class_map": {"defect": ["crack", "scratch"]}})
    task = FinetuneTask(cfg, str(mine))
    task.classes, task.subset, task.syn_classes, task.syn_lut = ["background", "defect", "dent"], None, SYNTH, lut

    class _Acc:
        num_processes = 1

    class _Run:
        accelerator = _Acc()

    synthetic_keys = set(list_keys(str(shards), "train"))
    batches = list(task.loader(_Run(), epoch=0, batches=3))
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (4, 3, 64, 64) and batch["mask"].shape == (4, 64, 64)
        assert [k in synthetic_keys for k in batch["key"]] == [False, False, False, True]  # 1 of 4 synthetic
        assert set(batch["mask"][:3].unique().tolist()) <= {0, 1, 2}
        assert set(batch["mask"][3].unique().tolist()) <= {0, 1, IGNORE}
    plain = co_batch({"image": torch.zeros(1, 3, 2, 2), "mask": torch.zeros(1, 2, 2, dtype=torch.uint8), "key": ["a"]},
                     {"image": torch.ones(1, 3, 2, 2), "mask": torch.tensor([[[1, 2], [3, 0]]], dtype=torch.uint8),
                      "key": ["b"]}, lut)
    assert plain["mask"][1].tolist() == [[1, 1], [IGNORE, 0]] and plain["key"] == ["a", "b"]
    # the loss skips IGNORE pixels: a logit map that is right everywhere else has the same loss
    from pretrain.segmenter import SegLoss
    loss = SegLoss(cfg, 3)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    logits = torch.zeros(1, 3, 4, 4)
    logits[:, 0] = 5.0
    marked = target.clone()
    marked[0, 0, 0] = IGNORE
    wrong = logits.clone()
    wrong[0, :, 0, 0] = torch.tensor([-5.0, 5.0, 0.0])  # wrong at the ignored pixel only
    assert torch.allclose(loss(wrong, marked)["ce"], loss(logits, target)["ce"], atol=1e-6)
    # and the command: a short co-training run records what it mixed in
    unet = {**FAST, "model": "resnet18", "architecture": "Unet", "max_steps": 2, "val_every": 2, "checkpoint_every": 2,
            "synthetic_shards": str(shards), "class_map": {"defect": ["crack", "scratch"]}}
    assert finetune(load_config(FinetuneConfig, None, unet), str(mine), tmp_path / "co", progress=False)["step"] == 2
    info = json.loads((tmp_path / "co/run_info.json").read_text())["synthetic"]
    assert info["ratio"] == 0.25 and info["classes"]["scratch"] == 1 and info["classes"]["pit"] == IGNORE
    # CutMix on co-training batches: the ignored pixels are pasted like any other mask value
    mixed = {**unet, "cutmix_prob": 1.0, "label_mode": "mask"}
    summary = finetune(load_config(FinetuneConfig, None, mixed), str(mine), tmp_path / "comix", progress=False)
    assert summary["step"] == 2 and (tmp_path / "comix/cutmix_grid.png").is_file()


def test_class_map_with_a_classification_init_needs_synthetic_shards(shards, tmp_path):
    cls_run = tmp_path / "cls"
    pretrain(load_config(PretrainConfig, None, {**FAST, "model": "vit_tiny", "model_kwargs": SMALL_VIT,
                                                "max_steps": 1, "warmup_steps": 0, "checkpoint_every": 1,
                                                "val_split": None}),
             str(shards), cls_run, progress=False)
    mine = _real_folder(tmp_path / "mine", ["defect"])
    base = {**FAST, "model": "vit_tiny", "encoder_kwargs": SMALL_VIT, "init": str(cls_run), "max_steps": 1,
            "warmup_steps": 0, "val_every": 1, "checkpoint_every": 1, "class_map": {"defect": ["crack", "pit"]}}
    with pytest.raises(ConfigError, match="not a segmentation run and there are no synthetic_shards"):
        finetune(load_config(FinetuneConfig, None, base), str(mine), tmp_path / "a", progress=False)
    with_shards = {**base, "synthetic_shards": str(shards)}  # then class_map maps the co-training classes
    assert finetune(load_config(FinetuneConfig, None, with_shards), str(mine), tmp_path / "b",
                    progress=False)["step"] == 1


def test_crops_larger_than_the_images_are_padded_and_train_every_objective(shards, tmp_path):
    # the shards' images are 64 x 96: 96 px crops pad every one (mask IGNORE), which every loss and metric skips
    small = {**FAST, "crop_size": 96, "max_steps": 2, "val_every": 2, "checkpoint_every": 2, "small_images": "pad",
             "model": "vit_tiny", "model_kwargs": SMALL_VIT, "defect_crop": 0.5}
    seg = pretrain(load_config(PretrainConfig, None, {**small, "objective": "segmentation"}), str(shards),
                   tmp_path / "seg", progress=False)
    assert np.isfinite(seg["val"]["val_defect_mIoU"])
    cls = pretrain(load_config(PretrainConfig, None, {**small, "objective": "classification", "label_mode": "mask",
                                                      "cutmix_prob": 1.0}), str(shards), tmp_path / "cls",
                   progress=False)
    losses = [r for r in read_metrics(tmp_path / "cls/metrics.jsonl") if "dense_loss" in r]
    assert cls["step"] == 2 and losses and all(np.isfinite(r["dense_loss"]) for r in losses)
    assert FinetuneConfig().small_images == "pad" and PretrainConfig().small_images == "resize"
    with pytest.raises(ConfigError, match="mixup_alpha"):
        load_config(PretrainConfig, None, {**small, "cutmix_prob": 1.0, "mixup_alpha": 0.4})
    with pytest.raises(ConfigError, match="small_images"):
        load_config(FinetuneConfig, None, {"cutmix_prob": 1.0, "mixup_alpha": 0.4})
    ft = finetune(load_config(FinetuneConfig, None, {**FAST, "crop_size": 96, "max_steps": 2, "val_every": 2,
                                                    "checkpoint_every": 2, "model": "resnet18",
                                                    "architecture": "Unet"}),
                  str(shards), tmp_path / "ft", progress=False)
    assert ft["step"] == 2 and np.isfinite(ft["val"]["val_mIoU"])
