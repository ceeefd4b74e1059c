"""`objective: mae` (pretrain/mae.py): masked-image modelling of a ViT, its encoder loaded by finetune."""

import json

import pytest
import safetensors.torch
import torch

from defectforge.config import ConfigError, load_config
from defectforge.tracking import read_metrics
from finetune.config import FinetuneConfig
from finetune.train import train as finetune
from pretrain.config import PretrainConfig
from pretrain.mae import MaskedAutoencoder
from pretrain.models import create_backbone
from pretrain.train import train
from tests.synth.helpers import make_shards

TINY = {"objective": "mae", "model": "vit_tiny", "model_kwargs": {"embed_dim": 48, "num_heads": 2},
        "crop_size": 64, "batch_size": 8, "max_steps": 40, "warmup_steps": 2, "lr": 2e-3, "checkpoint_every": 40,
        "val_every": 20, "log_every": 1, "num_workers": 0, "shuffle_buffer": 8, "wandb": False,
        "mae_decoder_dim": 32, "mae_decoder_depth": 1}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Synthetic shards with the five classes and a second folder with only cracks (as an import would be)."""
    root = tmp_path_factory.mktemp("mae-shards")
    make_shards(root / "synth", num_samples=16, image_size=64, shard_size=4, val_ratio=0.25)
    make_shards(root / "cracks", num_samples=8, image_size=[64, 80], shard_size=4, val_ratio=0.25, seed=5,
                defects={"crack": 1.0})
    return root


def tiny_mae(**kw) -> MaskedAutoencoder:
    backbone = create_backbone("vit_tiny", num_classes=0, img_size=64, embed_dim=48, depth=1, num_heads=2)
    return MaskedAutoencoder(backbone, decoder_dim=32, decoder_depth=1, **kw)


def test_patches_round_trip_and_the_mask_hides_the_asked_share():
    model = tiny_mae(mask_ratio=0.75)
    x = torch.rand(2, 3, 64, 96)
    assert torch.equal(model.unpatchify(model.patchify(x), 64, 96), x)
    mask = model.random_mask(2, 24, "cpu", torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [18, 18]
    assert not torch.equal(mask[0], mask[1])  # each image its own positions


def test_loss_counts_hidden_patches_only_and_hidden_pixels_never_reach_the_encoder():
    torch.manual_seed(0)
    model = tiny_mae().eval()
    x = torch.rand(1, 3, 64, 64)
    out = model(x, generator=torch.Generator().manual_seed(1))
    hidden = out["mask"][0]
    # change only the pixels of hidden patches: everything the encoder saw is the same, so are the
    # predictions; the loss changes because the targets of the hidden patches did
    patches = model.patchify(x)
    patches[0, hidden] = torch.rand_like(patches[0, hidden])
    out2 = model(model.unpatchify(patches, 64, 64), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out["pred"], out2["pred"], atol=1e-6)
    assert not torch.isclose(out["loss"], out2["loss"])
    # the loss is the mean squared error over hidden patches of per-patch normalised pixels
    per = (out["pred"] - out["target"]).square().mean(-1)[0]
    assert out["loss"].item() == pytest.approx(per[hidden].mean().item(), rel=1e-5)


def test_mae_needs_patch_tokens():
    with pytest.raises(ConfigError, match="objective mae needs a ViT"):
        MaskedAutoencoder(create_backbone("resnet18", num_classes=0))
    with pytest.raises(ConfigError, match="mae_mask_ratio"):
        load_config(PretrainConfig, None, {**TINY, "mae_mask_ratio": 1.0})


def test_mae_run_learns_on_folders_with_different_classes_and_its_encoder_loads_into_finetune(folders, tmp_path):
    cfg = load_config(PretrainConfig, None, TINY)
    summary = train(cfg, [str(folders / "synth"), str(folders / "cracks")], tmp_path / "mae", progress=False)
    assert summary["step"] == 40 and summary["model"]
    rows = read_metrics(tmp_path / "mae/metrics.jsonl")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # reconstruction improves
    vals = [r["val_mae_loss"] for r in rows if "val_mae_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert (tmp_path / "mae/mae_reconstructions.png").is_file()
    info = json.loads((tmp_path / "mae/run_info.json").read_text())
    assert info["objective"] == "mae" and info["classes"][1] == ["background", "crack"]
    assert info["pretraining"] == "synthetic (this study)"  # both folders generated, none imported

    fcfg = load_config(FinetuneConfig, None, {
        "model": "vit_tiny", "encoder_kwargs": TINY["model_kwargs"], "init": str(tmp_path / "mae"),
        "crop_size": 64, "batch_size": 2, "max_steps": 1, "warmup_steps": 0, "val_split": None,
        "checkpoint_every": 1, "num_workers": 0, "shuffle_buffer": 0, "wandb": False, "lr": 1e-9, "min_lr": 0.0})
    finetune(fcfg, str(folders / "synth"), tmp_path / "ft", progress=False)
    report = json.loads((tmp_path / "ft/run_info.json").read_text())["init_report"]
    saved = safetensors.torch.load_file(str(tmp_path / "mae/model.safetensors"))
    assert report["loaded"][0] == len(saved)
    tuned = safetensors.torch.load_file(str(tmp_path / "ft/model.safetensors"))
    for key in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "cls_token"):
        # lr 1e-9 for one step: the fine-tuned encoder still holds the MAE weights
        assert torch.allclose(tuned["net.encoder.model." + key], saved[key], atol=1e-6), key

    # MAE, then segmentation pretraining on the masks: `weights=RUN` loads the MAE encoder into the segmenter
    scfg = load_config(PretrainConfig, None, {
        **TINY, "objective": "segmentation", "weights": str(tmp_path / "mae"), "max_steps": 1, "warmup_steps": 0,
        "lr": 1e-9, "min_lr": 0.0, "val_split": None, "checkpoint_every": 1, "class_weights": None})
    train(scfg, str(folders / "synth"), tmp_path / "seg", progress=False)
    seg = safetensors.torch.load_file(str(tmp_path / "seg/model.safetensors"))
    for key in ("patch_embed.proj.weight", "blocks.11.attn.qkv.weight", "pos_embed"):
        assert torch.allclose(seg["net.encoder.model." + key], saved[key], atol=1e-6), key
    seg_info = json.loads((tmp_path / "seg/run_info.json").read_text())
    assert seg_info["weights"]["source"] == "run" and seg_info["pretraining"] == "synthetic (this study)"
