"""Diffusion backends: training writes a diffusers pipeline, inpaint keeps every pixel outside the dilated mask,
refine keeps the mask, a seed gives the same bytes, bad model folders are named, windows follow the defects."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from defectforge.config import ConfigError, load_config
from defectforge.reader import make_dataset
from synth.config import SynthConfig
from synth.diffusion import (
    DefectInpaintPipeline,
    build_unet,
    dilate,
    load_pipeline,
    save_pipeline,
    training_scheduler,
    windows,
)
from synth.generate import generate
from synth.train_diffusion import DiffusionTrainConfig, make_regions, train

TINY = {"crop_size": 32, "channels": [16, 32], "layers_per_block": 1, "norm_groups": 8, "batch_size": 4,
        "max_steps": 4, "warmup_steps": 1, "log_every": 2, "val_every": 2, "checkpoint_every": 2, "sample_steps": 2,
        "num_workers": 0, "wandb": False}
GEN = {"num_samples": 6, "image_size": 64, "workers": 1, "image_format": "png", "val_ratio": 0.0, "shard_size": 3,
       "empty_ratio": 0.0, "defects": {"crack": 1.0, "pit": 1.0}}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diffusion")
    generate(load_config(SynthConfig, None, {**GEN, "num_samples": 16, "val_ratio": 0.25, "seed": 5}), root / "shards",
             progress=False)
    summary = train(load_config(DiffusionTrainConfig, None, TINY), [str(root / "shards")], root / "run", progress=False)
    assert summary["step"] == 4 and summary["pipeline"]
    return root / "run"


def _samples(folder: Path) -> list[dict]:
    return list(make_dataset(folder, "train", compact=True))


def test_training_writes_a_pipeline_that_diffusers_loads(trained: Path) -> None:
    pipe_dir = trained / "pipeline"
    unet = UNet2DModel.from_pretrained(pipe_dir, subfolder="unet")
    assert unet.config.in_channels == 7 and unet.config.num_class_embeds == 3  # background, crack, pit
    pipe = DefectInpaintPipeline.from_pretrained(pipe_dir)
    assert isinstance(pipe.unet, UNet2DModel)
    info = json.loads((pipe_dir / "defectforge.json").read_text())
    assert info["classes"] == ["background", "crack", "pit"] and info["image_size"] == 32
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    assert all(np.isfinite(m["val_loss"]) for m in metrics if "val_loss" in m)
    assert sorted(p.name for p in (trained / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    assert (trained / "checkpoints" / "step-0000004").is_dir()
    # the saved weights are the EMA weights, as the loaded pipeline has them
    loaded, _ = load_pipeline(pipe_dir)
    x = torch.zeros(1, 7, 32, 32)
    ref = UNet2DModel.from_pretrained(pipe_dir, subfolder="unet")
    assert torch.equal(loaded.unet(x, 10, class_labels=torch.tensor([1])).sample,
                       ref(x, 10, class_labels=torch.tensor([1])).sample)


def test_resume_continues_the_diffusion_run(trained: Path, tmp_path: Path) -> None:
    shards = str(trained.parent / "shards")
    cfg = load_config(DiffusionTrainConfig, None, {**TINY, "stop_after": 2})
    assert train(cfg, [shards], tmp_path / "run", progress=False)["pipeline"] is None
    again = train(load_config(DiffusionTrainConfig, None, {**TINY, "resume": "latest"}), [shards], tmp_path / "run",
                  progress=False)
    assert again["step"] == 4 and (tmp_path / "run" / "pipeline" / "model_index.json").is_file()


def test_inpaint_keeps_every_pixel_outside_the_dilated_mask(trained: Path, tmp_path: Path) -> None:
    generate(load_config(SynthConfig, None, GEN), tmp_path / "proc", progress=False)
    overrides = {**GEN, "backend": "inpaint", "model_path": str(trained / "pipeline"), "steps": 3, "dilation": 2}
    generate(load_config(SynthConfig, None, overrides), tmp_path / "inp", progress=False)
    changed = 0
    for proc, inp in zip(_samples(tmp_path / "proc"), _samples(tmp_path / "inp"), strict=True):
        assert torch.equal(proc["mask"], inp["mask"])
        outside = ~torch.from_numpy(dilate(proc["mask"].numpy() > 0, 2))
        assert torch.equal(proc["image"][:, outside], inp["image"][:, outside])
        changed += int((proc["image"] != inp["image"]).any())
        meta = json.loads(inp["meta"])
        assert meta["source"] == "inpaint"
        assert meta["diffusion"]["backend"] == "inpaint" and meta["diffusion"]["steps"] == 3
        assert meta["diffusion"]["model_path"] == str(trained / "pipeline")
        assert meta["diffusion"]["scheduler"] == "ddim" and meta["diffusion"]["windows"] >= 1
    assert changed == 6  # every image had a defect (empty_ratio 0) and its pixels were regenerated


def test_refine_keeps_the_mask_and_changes_the_image(trained: Path, tmp_path: Path) -> None:
    generate(load_config(SynthConfig, None, GEN), tmp_path / "proc", progress=False)
    overrides = {**GEN, "backend": "refine", "model_path": str(trained / "pipeline"), "steps": 4, "strength": 0.5,
                 "scheduler": "dpm"}
    generate(load_config(SynthConfig, None, overrides), tmp_path / "ref", progress=False)
    for proc, ref in zip(_samples(tmp_path / "proc"), _samples(tmp_path / "ref"), strict=True):
        assert torch.equal(proc["mask"], ref["mask"])
        assert (proc["image"] != ref["image"]).float().mean() > 0.5  # SDEdit touches the whole (small) image
        assert json.loads(ref["meta"])["diffusion"]["strength"] == 0.5


def test_same_seed_same_bytes_other_seed_other_image(trained: Path, tmp_path: Path) -> None:
    overrides = {**GEN, "backend": "inpaint", "model_path": str(trained / "pipeline"), "steps": 2}

    def digests(out: Path, **extra) -> list[str]:
        generate(load_config(SynthConfig, None, {**overrides, **extra}), out, progress=False)
        return [hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))]

    first = digests(tmp_path / "a")
    assert digests(tmp_path / "b", workers=2) == first  # rendering workers change the speed, not the bytes
    assert digests(tmp_path / "c", seed=1) != first


def test_large_image_is_diffused_in_windows_around_the_defects(trained: Path, tmp_path: Path) -> None:
    overrides = {**GEN, "num_samples": 1, "image_size": [600, 900], "defects_per_image": [1, 1], "backend": "inpaint",
                 "model_path": str(trained / "pipeline"), "steps": 2, "patch_size": 128}
    generate(load_config(SynthConfig, None, overrides), tmp_path / "big", progress=False)
    (sample,) = _samples(tmp_path / "big")
    region = dilate(sample["mask"].numpy() > 0, 2)
    used = json.loads(sample["meta"])["diffusion"]["windows"]
    assert used == len(windows(region, 128)) < 5 * 8  # only windows that hold defect pixels, not the 5x8 grid


def test_windows_cover_the_region_and_skip_the_rest() -> None:
    region = np.zeros((1000, 1000), dtype=bool)
    region[10:20, 10:300] = True  # a thin horizontal crack near the top edge
    wins = windows(region, 256)
    assert len(wins) == 2 and all((w.y1 - w.y0, w.x1 - w.x0) == (256, 256) for w in wins)
    covered = np.zeros_like(region)
    for w in wins:
        covered[w.y0:w.y1, w.x0:w.x1] = True
    assert covered[region].all()
    small = np.zeros((100, 120), dtype=bool)
    small[5, 5] = True
    assert [(w.y0, w.x0, w.y1, w.x1) for w in windows(small, 256)] == [(0, 0, 100, 120)]
    assert windows(np.zeros((100, 120), dtype=bool), 256) == []


def test_training_regions_follow_the_defect_class() -> None:
    cfg = load_config(DiffusionTrainConfig, None, {**TINY, "full_prob": 0.0, "dilation": 0})
    masks = torch.zeros(3, 32, 32, dtype=torch.long)
    masks[0, 4:8, 4:20] = 2
    masks[1, 10:12, :] = 1
    torch.manual_seed(0)
    region, labels = make_regions(masks, cfg)
    assert labels.tolist()[:2] == [2, 1] and labels[2] == 0
    assert torch.equal(region[0, 0] > 0, masks[0] == 2) and torch.equal(region[1, 0] > 0, masks[1] == 1)
    assert 0 < region[2].mean() < 1  # a clean image gets a random ellipse to fill with background


def test_missing_or_incompatible_model_folders_are_named(tmp_path: Path) -> None:
    base = {**GEN, "backend": "inpaint"}
    with pytest.raises(ConfigError, match="model_path.*backend=inpaint"):
        load_config(SynthConfig, None, base)
    with pytest.raises(ConfigError, match="is not a folder"):
        load_config(SynthConfig, None, {**base, "model_path": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="missing model_index.json, unet/config.json"):
        load_config(SynthConfig, None, {**base, "model_path": str(tmp_path / "empty")})
    # a diffusers pipeline of the wrong kind: a plain 3-channel UNet without class embeddings
    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)
    save_pipeline(unet, training_scheduler(), tmp_path / "wrong", {"classes": ["background", "crack"]})
    with pytest.raises(ConfigError, match="incompatible model.*in_channels 3"):
        load_config(SynthConfig, None, {**base, "model_path": str(tmp_path / "wrong")})
    ok = build_unet(32, 3, [16, 32], 1, False, 8)
    save_pipeline(ok, training_scheduler(), tmp_path / "ok", {"classes": ["background", "crack", "pit"]})
    (tmp_path / "ok" / "defectforge.json").unlink()
    with pytest.raises(ConfigError, match="missing defectforge.json.*backend=pretrained"):
        load_config(SynthConfig, None, {**base, "model_path": str(tmp_path / "ok")})


def test_model_that_lacks_a_class_is_refused(trained: Path) -> None:
    from synth.diffusion import Diffuser

    cfg = load_config(SynthConfig, None, {**GEN, "defects": {"crack": 1.0, "stain": 1.0}, "backend": "inpaint",
                                          "model_path": str(trained / "pipeline")})
    with pytest.raises(ConfigError, match=r"cannot draw \['stain'\]"):
        Diffuser(cfg, device="cpu")


def _tiny_inpainting_pipeline(folder: Path) -> Path:
    """A randomly initialised Stable Diffusion inpainting pipeline (CLIP text encoder, VAE, 9-channel UNet)."""
    transformers = pytest.importorskip("transformers", reason="backend=pretrained needs transformers (the sd extra)")
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

    chars = "abcdefghijklmnopqrstuvwxyz0123456789,."
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=8, in_channels=9, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1)
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                          scheduler=DDIMScheduler(steps_offset=1), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder / "sd")
    return folder / "sd"


def test_pretrained_inpainting_pipeline_from_a_local_folder(tmp_path: Path) -> None:
    sd = _tiny_inpainting_pipeline(tmp_path / "model")
    base = {**GEN, "num_samples": 2, "defects": {"crack": 1.0}}
    generate(load_config(SynthConfig, None, base), tmp_path / "proc", progress=False)
    overrides = {**base, "backend": "pretrained", "model_path": str(sd), "steps": 2, "guidance_scale": 2.0,
                 "prompts": {"crack": "a dark crack in concrete"}}
    generate(load_config(SynthConfig, None, overrides), tmp_path / "sd_out", progress=False)
    for proc, out in zip(_samples(tmp_path / "proc"), _samples(tmp_path / "sd_out"), strict=True):
        assert torch.equal(proc["mask"], out["mask"])
        outside = ~torch.from_numpy(dilate(proc["mask"].numpy() > 0, 2))
        assert torch.equal(proc["image"][:, outside], out["image"][:, outside])
        assert (proc["image"] != out["image"]).any()
        meta = json.loads(out["meta"])["diffusion"]
        assert meta["backend"] == "pretrained" and meta["guidance_scale"] == 2.0
    # a component folder listed in model_index.json but missing is named
    import shutil

    shutil.rmtree(sd / "vae")
    with pytest.raises(ConfigError, match="missing the component folder.*vae"):
        load_config(SynthConfig, None, overrides)
    with pytest.raises(ConfigError, match="prompts.pit"):
        load_config(SynthConfig, None, {**overrides, "prompts": {"pit": "a pit"}})


@pytest.mark.distributed
def test_two_accelerate_processes_train_one_pipeline(trained: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    other = tmp_path / "other"  # a second folder with other classes: merged by name
    generate(load_config(SynthConfig, None, {**GEN, "num_samples": 8, "defects": {"scratch": 1.0, "crack": 1.0}}),
             other, progress=False)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items() if k != "wandb"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "synth", "train-diffusion",
           "--config", str(repo / "configs/synth/diffusion_quickstart.yaml"), "--shards",
           str(trained.parent / "shards"), str(other), "--out", str(run), "--no-progress", *overrides,
           "trace_samples=true", "wandb=true"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    steps = [[line.split()[0] for line in (run / f"samples/rank-{r}.txt").read_text().splitlines()] for r in range(2)]
    assert steps[0] == steps[1] == ["1", "2", "3", "4"]  # both ranks ran every step
    info = json.loads((run / "pipeline" / "defectforge.json").read_text())
    assert info["classes"] == ["background", "crack", "pit", "scratch"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]


def test_dilate_grows_by_a_square_of_side_2r_plus_1() -> None:
    mask = np.zeros((40, 50), dtype=bool)
    mask[10, 20] = True
    mask[30, 5] = True
    grown = dilate(mask, 3)
    expected = np.zeros_like(mask)
    expected[7:14, 17:24] = True
    expected[27:34, 2:9] = True
    assert np.array_equal(grown, expected)
    assert np.array_equal(dilate(mask, 0), mask)
