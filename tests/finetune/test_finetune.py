"""Fine-tuning: every model family, freezing, init from a pretrain run or a timm file, subsets, metrics, CrackForest."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from defectforge.config import ConfigError, load_config
from defectforge.tiling import tiled_logits
from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.models import freeze, layer_decay_groups, load_init
from finetune.train import predict, select_subset, train
from pretrain.config import PretrainConfig
from pretrain.metrics import SegMetrics
from pretrain.segmenter import SegLoss, build_segmenter, load_segmenter
from pretrain.train import train as pretrain
from synth.importer import import_folder
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["background", "crack", "pit"]
SMALL_VIT = {"embed_dim": 48, "num_heads": 2}
FAST = {"crop_size": 64, "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "val_every": 3, "checkpoint_every": 3,
        "log_every": 1, "num_workers": 0, "shuffle_buffer": 0, "wandb": False, "val_images": 2}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune-shards")
    make_shards(out, num_samples=12, image_size=[64, 96], shard_size=4, val_ratio=0.25)
    return out


def config(path: str | None = None, **overrides) -> FinetuneConfig:
    return load_config(FinetuneConfig, REPO / path if path else None, {**FAST, **overrides})


@pytest.mark.parametrize("name", ["vit_tiny", "vit_hybrid_small", "deeplabv3plus_resnet50", "deeplabv3plus_resnet152",
                                  "unet_resnet50", "hrnet_w18", "convnext_tiny", "swin_tiny"])
def test_each_family_builds_from_its_config_trains_and_keeps_any_input_size(name):
    cfg = config(f"configs/finetune/{name}.yaml", crop_size=64)
    model, mcfg = build_segmenter(cfg, CLASSES)
    criterion = SegLoss(cfg, len(CLASSES))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    x, y = torch.rand(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))
    losses = criterion(model(x), y)
    losses["loss"].backward()
    optimizer.step()
    assert torch.isfinite(losses["loss"]) and set(losses) >= {"loss", "ce", "dice"}
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 100, 70)).shape == (1, 3, 100, 70)
        assert model(torch.rand(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    assert mcfg["num_classes"] == 3 and mcfg["classes"] == CLASSES


def test_freezing_keeps_weights_and_batchnorm_statistics_bit_identical(shards, tmp_path):
    timm_file = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet18", num_classes=7).state_dict(), str(timm_file))
    cfg = config(model="resnet18", architecture="Unet", init=str(timm_file), freeze=2, val_split=None)
    train(cfg, str(shards), tmp_path / "run", progress=False)
    saved = safetensors.torch.load_file(str(tmp_path / "run/model.safetensors"))
    source = safetensors.torch.load_file(str(timm_file))
    prefix = "net.encoder.model."
    for key in source:
        if key.startswith(("conv1.", "bn1.", "layer1.", "layer2.")):  # stem + 2 stages: frozen
            assert torch.equal(saved[prefix + key], source[key]), key
    changed = [k for k in source if k.startswith("layer3.") and k.endswith("weight")
               and not torch.equal(saved[prefix + k], source[k])]
    assert changed, "layer3 should train"
    info = json.loads((tmp_path / "run/run_info.json").read_text())
    assert info["init_report"]["loaded"][0] > 0 and info["frozen"] > 0
    # trained in channels_last (a CNN), at the precision measured for this CPU (defectforge/precision.py)
    assert info["precision"]["channels_last"] is True and info["precision"]["asked"] == "auto"
    assert info["precision"]["used"] in ("no", "bf16") and info["precision"]["device"] == "cpu"


def test_init_from_a_pretrain_run_loads_the_saved_backbone_and_rejects_a_mismatch(shards, tmp_path):
    pcfg = load_config(PretrainConfig, None, {"model": "vit_tiny", "model_kwargs": SMALL_VIT, "crop_size": 64,
                                              "batch_size": 2, "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                              "val_split": None, "num_workers": 0, "wandb": False})
    pretrain(pcfg, str(shards), tmp_path / "pre", progress=False)
    saved = safetensors.torch.load_file(str(tmp_path / "pre/model.safetensors"))

    cfg = config(model="vit_tiny", encoder_kwargs=SMALL_VIT)
    model, mcfg = build_segmenter(cfg, CLASSES)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    report = load_init(model, tmp_path / "pre", mcfg)
    after = model.encoder.state_dict()
    assert report["loaded"] and not report["missing"] and sorted(report["skipped_head"]) == ["head.bias", "head.weight"]
    for key in report["loaded"]:
        assert torch.equal(after[key], saved[key]), key
        assert not torch.equal(after[key], before[key]) or key.endswith("bias"), key

    bigger, mcfg2 = build_segmenter(config(model="vit_tiny", encoder_kwargs=SMALL_VIT, crop_size=128), CLASSES)
    assert load_init(bigger, tmp_path / "pre", mcfg2)["resampled"] == ["pos_embed"]

    resnet, rcfg = build_segmenter(config(model="resnet18", architecture="Unet"), CLASSES)
    with pytest.raises(ValueError, match="holds a vit_tiny_patch16_224 backbone but this run builds resnet18"):
        load_init(resnet, tmp_path / "pre", rcfg)
    wide, wcfg = build_segmenter(config(model="vit_tiny"), CLASSES)  # embed_dim 192 vs the saved 48
    with pytest.raises(ValueError, match="shape mismatch"):
        load_init(wide, tmp_path / "pre", wcfg)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_init(wide, tmp_path / "nowhere", wcfg)


def test_subset_is_deterministic_nested_and_checked():
    keys = [f"{i:08d}" for i in range(100)]
    a, b = select_subset(keys, 10, seed=3), select_subset(keys, 10, seed=3)
    assert a == b and len(set(a)) == 10
    assert set(a) <= set(select_subset(keys, 40, seed=3))
    assert select_subset(keys, 10, seed=4) != a
    assert select_subset(keys, None, seed=0) is None
    with pytest.raises(ConfigError, match="train_samples"):
        select_subset(keys, 101, seed=0)


def test_validation_tiles_an_image_as_the_evaluation_does_every_tile_full_sized():
    """Above `val_max_size` validation sees only whole tiles (a 256 px image in 96 px tiles: starts 0, 86, 160),
    blended as `evaluate run` blends them; the old grid's 64 px border tiles showed a ViT a token grid it never
    trained on. Up to `val_max_size` the image goes in whole."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.extend([tuple(x.shape[-2:])] * x.shape[0])
            return torch.stack([x[:, 0], -x[:, 0]], 1)  # logits that depend on the pixel, not the tile

    image = torch.randn(1, 3, 256, 200)
    probs = predict(Probe(), image, 96, overlap=0.1)
    assert set(seen) == {(96, 96)} and len(seen) == 9  # 3 rows (0, 86, 160) x 3 columns (0, 86, 104)
    assert torch.allclose(probs, tiled_logits(Probe(), image, tile=96, overlap=0.1).softmax(1), atol=1e-6)
    assert torch.allclose(probs, torch.stack([image[:, 0], -image[:, 0]], 1).softmax(1), atol=1e-5)
    seen.clear()
    predict(Probe(), torch.randn(1, 3, 96, 80), 96)
    assert seen == [(96, 80)]
    with pytest.raises(ConfigError, match="val_overlap"):
        config(val_overlap=0.95)


def test_training_reads_only_the_subset_and_saves_a_loadable_model(shards, tmp_path):
    cfg = config(model="resnet18", architecture="Unet", train_samples=3, trace_samples=True, max_steps=4,
                 checkpoint_every=4, val_every=4)
    summary = train(cfg, str(shards), tmp_path, progress=False)
    info = json.loads((tmp_path / "run_info.json").read_text())
    seen = {k for line in (tmp_path / "samples/rank-0.txt").read_text().splitlines() for k in line.split()[1:]}
    assert seen == set(info["subset"]) and len(info["subset"]) == 3
    assert summary["val"]["val_mIoU"] is not None and (tmp_path / "val_examples.png").is_file()
    model, mcfg = load_segmenter(tmp_path)
    with torch.no_grad():
        assert model(torch.rand(1, 3, 100, 70)).shape == (1, len(mcfg["classes"]), 100, 70)


def test_layer_decay_gives_each_encoder_block_its_rate_and_the_decoder_the_full_rate(shards, tmp_path):
    cfg = config(model="vit_tiny", encoder_kwargs=SMALL_VIT, layer_decay=0.5, lr=1e-3, freeze=0)
    model, mcfg = build_segmenter(cfg, CLASSES)
    freeze(model, 0, mcfg["model"])  # the patch embedding: frozen, so in no group
    groups = layer_decay_groups(model, mcfg["model"], 1e-3, 0.01, 0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(lr_of) == sorted(id(p) for p in trainable)  # every trainable tensor once, no frozen one
    blocks = model.encoder.blocks
    depth = len(blocks)  # stem + one group per block: the last block decay**1, block 0 decay**depth
    assert lr_of[id(blocks[-1].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5)
    assert lr_of[id(blocks[0].mlp.fc1.weight)] == pytest.approx(1e-3 * 0.5 ** depth)
    assert all(lr_of[id(p)] == pytest.approx(1e-3) for p in model.net.decoder.parameters() if p.requires_grad)
    assert id(model.encoder.patch_embed.proj.weight) not in lr_of
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))
    with pytest.raises(ConfigError, match="layer_decay"):
        config(layer_decay=1.5)
    # a short run with it trains and saves
    train(config(model="vit_tiny", encoder_kwargs=SMALL_VIT, layer_decay=0.75, val_split=None), str(shards),
          tmp_path / "run", progress=False)
    assert (tmp_path / "run/model.safetensors").is_file()


def test_freeze_and_architecture_errors_name_the_problem(shards, tmp_path, caplog):
    model, mcfg = build_segmenter(config(model="resnet18", architecture="Unet"), CLASSES)
    with pytest.raises(ValueError, match="freeze=9"):
        freeze(model, 9, mcfg["model"])
    with pytest.raises(ValueError, match="depth"):
        build_segmenter(config(model="vit_tiny", encoder_kwargs={"depth": 2}), CLASSES)
    args = ["--config", str(REPO / "configs/finetune/quickstart.yaml"), "--shards", str(shards), "--out",
            str(tmp_path / "r"), "--no-progress"]
    assert main([*args, "architecture=Unett"]) == 2
    assert "architecture" in caplog.text and "Unett" in caplog.text
    assert main([*args, "train_samples=1000"]) == 2
    assert "at most the 9 samples" in caplog.text
    assert main([*args, "val_split=test"]) == 2  # the shards have train and val only
    assert "key 'val_split': split 'test' not found" in caplog.text and "--val-ratio" in caplog.text


def test_segmentation_metrics_match_hand_computed_values():
    m = SegMetrics(["background", "crack"], bins=10)
    target = torch.tensor([[[0, 0, 1, 1]]])
    # defect probabilities 0.1, 0.6, 0.4, 0.9 -> argmax: 0, 1, 0, 1
    p_defect = torch.tensor([0.1, 0.6, 0.4, 0.9]).view(1, 1, 4)
    m.update(torch.stack([1 - p_defect, p_defect], dim=1), target)
    r = m.compute()
    # background: tp 1 (pixel 0), fp 1 (pixel 2), fn 1 (pixel 1) -> 1/3; crack: tp 1, fp 1, fn 1 -> 1/3
    assert r["IoU"] == {"background": pytest.approx(1 / 3), "crack": pytest.approx(1 / 3)}
    assert r["mIoU"] == pytest.approx(1 / 3) and r["pixel_accuracy"] == pytest.approx(0.5)
    assert r["F1@0.5"] == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    # thresholds 0.2, 0.3 and 0.4 all give tp 2, fp 1, fn 0 (F1 0.8); the lowest of equal F1s is reported
    assert r["F1_best"] == pytest.approx(0.8) and r["best_threshold"] == pytest.approx(0.2)


def test_segmentation_metrics_leave_ignored_pixels_out():
    p_defect = torch.tensor([0.1, 0.6, 0.4, 0.9, 0.9, 0.1]).view(1, 1, 6)
    probs = torch.stack([1 - p_defect, p_defect], dim=1)
    padded, plain = SegMetrics(["background", "crack"], bins=10), SegMetrics(["background", "crack"], bins=10)
    padded.update(probs, torch.tensor([[[0, 0, 1, 1, 255, 255]]]))  # a padded crop's IGNORE pixels
    plain.update(probs[..., :4], torch.tensor([[[0, 0, 1, 1]]]))
    assert torch.equal(padded.state(), plain.state())


def test_a_short_crackforest_run_finds_the_cracks(tmp_path, crackforest):
    shards = tmp_path / "cf"
    import_folder(crackforest / "images", crackforest / "masks", shards, split_file=crackforest / "split.json",
                  classes=["crack"], name="crackforest", val_ratio=0.15, seed=0, shard_size=32, mask_mode="index",
                  overwrite=False)
    cfg = config(model="resnet18", architecture="Unet", crop_size=128, batch_size=8, max_steps=40, lr=1e-3,
                 warmup_steps=5, val_split="val", val_every=40, checkpoint_every=40, num_workers=1,
                 class_weights=[1.0, 5.0])
    train(cfg, str(shards), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    crack_iou = [r["val_IoU/crack"] for r in records if "val_IoU/crack" in r]
    assert len(crack_iou) == 1
    # cracks are 1.6% of the pixels: all-background scores 0, all-crack about 0.016; measured 0.29-0.32 (2 cores)
    assert crack_iou[0] > 0.15, crack_iou


@pytest.mark.distributed
def test_two_accelerate_processes_train_a_vit_with_frozen_blocks(shards, tmp_path):
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "finetune",
           "--config", str(REPO / "configs/finetune/quickstart.yaml"), "--shards", str(shards), "--out", str(run),
           "--no-progress", "encoder_kwargs={embed_dim: 48, num_heads: 2}", "freeze=2", "max_steps=2",
           "warmup_steps=1", "checkpoint_every=2", "val_every=2", "batch_size=2", "crop_size=64", "num_workers=0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_mIoU" in line]
    assert val[-1]["val_pixels"] == 3 * 64 * 96  # the 3 validation images, split over the ranks, counted once
    assert sorted(p.name for p in (run / "checkpoints/step-0000002").glob("random_states_*")) == [
        "random_states_0.pkl", "random_states_1.pkl"]
    assert (run / "model.safetensors").is_file()


def test_auto_class_weights_come_from_training_pixels(shards):
    from defectforge.reader import make_dataset
    from finetune.train import auto_class_weights

    classes = make_dataset(shards, "train").classes
    weights = auto_class_weights(str(shards), "train", classes, None)
    counts = torch.zeros(len(classes))
    for sample in make_dataset(shards, "train"):
        counts += torch.bincount(sample["mask"].flatten(), minlength=len(classes)).float()
    assert weights[0] == 1.0 and len(weights) == len(classes)
    for c in range(1, len(classes)):
        expected = 1.0 if counts[c] == 0 else float((counts[0] / counts[c]).sqrt().clamp(1, 20))
        assert weights[c] == pytest.approx(expected, rel=1e-5)
    cfg = config(class_weights="auto")
    assert cfg.class_weights == "auto"
    with pytest.raises(ConfigError, match="class_weights"):
        config(class_weights="inverse")


def test_building_under_no_grad_still_finds_the_unused_parameters():
    with torch.no_grad():
        model, _ = build_segmenter(config(model="vit_tiny", encoder_kwargs=SMALL_VIT), CLASSES)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(".norm." in n or ".head." in n for n in frozen), frozen


@pytest.mark.parametrize("name", ["vit_small_patch14_reg4_dinov2", "vit_small_patch16_dinov3"])
def test_dinov2_and_dinov3_vits_with_dpt_keep_any_input_size(name):
    """DINOv2 (patch 14, register tokens) and DINOv3 (patch 16, RoPE) through DPT: smp's decoder expects strides that
    are powers of two, so a patch-14 grid gets the patch-16 decoder and logits resized to the input."""
    cfg = config(model=name, crop_size=56, encoder_kwargs={"embed_dim": 48, "num_heads": 2})
    model, mcfg = build_segmenter(cfg, CLASSES)
    assert mcfg["smp_class"] == "DPT" and model.stride == (28 if "patch14" in name else 32)
    model.eval()
    with torch.no_grad():
        for size in ((100, 70), (64, 96), (56, 56)):
            assert model(torch.rand(1, 3, *size)).shape == (1, 3, *size)


def test_cutmix_in_finetuning_pastes_masks_with_the_images_and_is_off_unless_asked(shards, tmp_path):
    from types import SimpleNamespace

    from defectforge.augment import build_augment
    from finetune.train import FinetuneTask

    still = {"hflip": 0.0, "vflip": 0.0, "rot90": 0.0, "color_jitter": 0.0, "resized_crop": False}
    # each sample is one flat colour i / 10 with the mask value i: after mixing, a pixel's mask must still be its
    # colour, wherever the box came from
    batch = {"image": torch.arange(3.0).view(3, 1, 1, 1).expand(3, 3, 8, 8) / 10,
             "mask": torch.arange(3).view(3, 1, 1).expand(3, 8, 8).to(torch.uint8), "key": ["a", "b", "c"]}
    run = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu"), is_main_process=True),
                          run_dir=tmp_path)

    def seen_by_the_loss(cfg):
        task = FinetuneTask(cfg, str(shards))
        task.classes, task.normalize = CLASSES, lambda x: x
        task.aug, task.mix = build_augment(cfg.augment, (8, 8)), cfg.mix
        task.criterion = lambda logits, target: {"loss": logits.sum(), "images": logits, "target": target}
        torch.manual_seed(0)
        return task.losses(run, lambda x: x, batch, first=False)

    plain = seen_by_the_loss(config(**still))
    assert not config().mix.enabled
    assert torch.equal(plain["target"], batch["mask"].long()) and torch.equal(plain["images"], batch["image"])
    mixed = seen_by_the_loss(config(cutmix_prob=1.0, **still))
    colour = (mixed["images"][:, 0] * 10).round().long()
    assert torch.equal(mixed["target"], colour)  # the masks were pasted with exactly the images' boxes
    assert not torch.equal(mixed["target"], batch["mask"].long())  # and something was pasted
    with pytest.raises(ConfigError, match="mixup_alpha"):
        config(cutmix_prob=1.0, mixup_alpha=0.2, synthetic_shards=str(shards), batch_size=4)
    # the command: a short mixed run shows its first mixed batch
    cfg = config(model="resnet18", architecture="Unet", cutmix_prob=1.0, max_steps=2, val_every=2, checkpoint_every=2)
    assert train(cfg, str(shards), tmp_path / "run", progress=False)["step"] == 2
    assert (tmp_path / "run/cutmix_grid.png").is_file()
