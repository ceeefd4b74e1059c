"""The pretraining loop end to end on tiny shards: resume, saved weights, NaN stop, two processes, the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from defectforge.config import ConfigError, load_config
from defectforge.tracking import read_metrics
from pretrain.__main__ import main
from pretrain.config import PretrainConfig
from pretrain.metrics import average_precision, multilabel_ap
from pretrain.models import load_model
from pretrain.train import NonFiniteLoss, checkpoints, train
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[2]
TINY = {"model": "vit_tiny", "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}, "crop_size": 64,
        "batch_size": 4, "max_steps": 6, "warmup_steps": 1, "checkpoint_every": 4, "val_every": 3, "log_every": 1,
        "num_workers": 1, "shuffle_buffer": 8, "wandb": False}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain-shards")
    make_shards(out, num_samples=20, image_size=[64, 96], shard_size=4, val_ratio=0.2)  # 4 train shards of 4
    return out


def config(**overrides) -> PretrainConfig:
    return load_config(PretrainConfig, None, {**TINY, **overrides})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def test_resume_mid_epoch_ends_with_the_same_weights_as_an_uninterrupted_run(shards, tmp_path):
    whole = train(config(), str(shards), tmp_path / "whole", progress=False)
    assert whole["step"] == 6 and whole["model"]

    part = train(config(stop_after=2), str(shards), tmp_path / "split", progress=False)
    assert part["step"] == 2 and part["model"] is None
    assert [p.name for p in checkpoints(tmp_path / "split")] == ["step-0000002"]
    with pytest.raises(ConfigError, match="resume=latest"):  # a run folder is never overwritten by accident
        train(config(), str(shards), tmp_path / "split", progress=False)
    rest = train(config(resume="latest"), str(shards), tmp_path / "split", progress=False)
    assert rest["step"] == 6

    a, b = weights(tmp_path / "whole/model.safetensors"), weights(tmp_path / "split/model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_metrics(tmp_path / "split/metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # continued at step 3, nothing logged twice
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole/metrics.jsonl") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split/metrics.jsonl") if "loss" in r}
    assert losses == resumed
    val = [r for r in read_metrics(tmp_path / "whole/metrics.jsonl") if "val_mAP" in r]
    assert [r["step"] for r in val] == [3, 6] and all(r["val_samples"] == 4 for r in val)
    assert (tmp_path / "whole/cutmix_grid.png").is_file()


def test_saved_model_loads_into_a_fresh_timm_model_with_identical_outputs(shards, tmp_path):
    train(config(max_steps=2, checkpoint_every=2, val_every=2), str(shards), tmp_path, progress=False)
    saved = json.loads((tmp_path / "model_config.json").read_text())
    assert saved["model"] == "vit_tiny_patch16_224" and saved["classes"][0] == "background"
    assert saved["num_classes"] == len(saved["classes"]) - 1 and len(saved["mean"]) == 3
    fresh = timm.create_model(saved["model"], pretrained=False, num_classes=saved["num_classes"],
                              img_size=saved["img_size"], **saved["kwargs"]).eval()
    safetensors.torch.load_model(fresh, str(tmp_path / "model.safetensors"), strict=True)
    rebuilt, _ = load_model(tmp_path)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), rebuilt(x))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    real = torch.nn.functional.binary_cross_entropy_with_logits
    calls = {"n": 0}

    def poisoned(logits, target, *args, **kwargs):
        calls["n"] += 1
        loss = real(logits, target, *args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(torch.nn.functional, "binary_cross_entropy_with_logits", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 4 .*step-0000002"):
        train(config(checkpoint_every=2, val_every=100), str(shards), tmp_path, progress=False)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-0000002"]
    assert not (tmp_path / "model.safetensors").exists()
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


@pytest.mark.distributed
@pytest.mark.parametrize("objective", ["classification", "segmentation"])
def test_two_accelerate_processes_split_the_data_and_stop_together(shards, tmp_path, objective):
    """Both objectives under DDP (segmentation: the ViT's unused final norm must not make DDP wait)."""
    run = tmp_path / "run"
    # smp reserves `depth`, so the segmentation network keeps ViT-Tiny's 12 blocks, at width 48
    model = {} if objective == "classification" else {"model_kwargs": {"embed_dim": 48, "num_heads": 2}}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    overrides = [f"{k}={json.dumps(v)}" for k, v in TINY.items() if k != "wandb"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "pretrain",
           "--config", str(REPO / "configs/pretrain/quickstart.yaml"), "--shards", str(shards), "--out", str(run),
           "--no-progress", *overrides, "max_steps=4", "checkpoint_every=4", "batch_size=2", "shuffle_buffer=0",
           "trace_samples=true", "wandb=true", f"objective={objective}",
           *[f"{k}={json.dumps(v)}" for k, v in model.items()]]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    traces = [(run / f"samples/rank-{r}.txt").read_text().splitlines() for r in range(2)]
    keys = [[k for line in t for k in line.split()[1:]] for t in traces]
    assert [len(t) for t in traces] == [4, 4]  # both ranks ran steps 1..4
    assert [line.split()[0] for line in traces[0]] == [line.split()[0] for line in traces[1]] == ["1", "2", "3", "4"]
    # 4 steps x 2 samples on each of 2 ranks = one pass over the 16 training samples: disjoint and complete
    assert len(keys[0]) == len(keys[1]) == 8
    assert not set(keys[0]) & set(keys[1])
    assert set(keys[0]) | set(keys[1]) == {f"{i:08d}" for i in range(16)}
    ckpts = checkpoints(run)
    assert [p.name for p in ckpts] == ["step-0000004"]
    assert sorted(p.name for p in ckpts[0].glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert (run / "model.safetensors").is_file()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]


def test_cli_reports_bad_keys_values_and_models(shards, tmp_path, caplog):
    cfg = str(REPO / "configs/pretrain/quickstart.yaml")
    args = ["--config", cfg, "--shards", str(shards), "--out", str(tmp_path / "r"), "--no-progress"]
    assert main([*args, "max_step=3"]) == 2
    assert "unknown key 'max_step'" in caplog.text and "max_steps" in caplog.text
    assert main([*args, "cutmix_prob=1.5"]) == 2
    assert "cutmix_prob" in caplog.text and "1.5" in caplog.text
    assert main([*args, "model=vit_tinny"]) == 2
    assert "vit_tiny" in caplog.text
    assert main([*args, "val_split=nope"]) == 2
    assert "nope" in caplog.text


def test_average_precision_matches_hand_computed_values():
    # ranks: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = (1/1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.1]), np.array([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # a tie between a positive and a negative counts both as retrieved at once: precision 1/2 at recall 1
    assert average_precision(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert np.isnan(average_precision(np.array([0.3]), np.array([0])))
    result = multilabel_ap(np.array([[0.9, 0.2], [0.1, 0.3]]), np.array([[1, 0], [0, 0]]), ["crack", "pit"])
    assert result == {"mAP": 1.0, "ap": {"crack": 1.0, "pit": None}}


def test_every_pretrain_config_loads():
    for path in sorted((REPO / "configs/pretrain").glob("*.yaml")):
        cfg = load_config(PretrainConfig, path)
        assert cfg.cutmix_alpha == 0.7 or path.stem == "quickstart", path


def test_ema_accumulation_and_layer_decay_save_the_ema_weights(shards, tmp_path):
    cfg = config(max_steps=2, checkpoint_every=2, val_every=2, ema=True, ema_decay=0.5, grad_accum=2,
                 layer_decay=0.75)
    summary = train(cfg, str(shards), tmp_path, progress=False)
    assert summary["step"] == 2
    saved = weights(tmp_path / "model.safetensors")
    live = weights(checkpoints(tmp_path)[-1] / "model.safetensors")  # the trained (non-EMA) network
    ema_state = safetensors.torch.load_file(str(checkpoints(tmp_path)[-1] / "state_2.safetensors"))
    for key, value in saved.items():
        assert torch.equal(value, ema_state[f"module.backbone.{key}"]), key
    assert any(not torch.equal(value, live[f"backbone.{key}"]) for key, value in saved.items())


@pytest.mark.parametrize("old", ["img_size", "image_size"])
def test_a_renamed_key_fails_naming_its_new_name(tmp_path, old):
    from synth.train_diffusion import DiffusionTrainConfig

    schema = PretrainConfig if old == "img_size" else DiffusionTrainConfig
    with pytest.raises(ConfigError, match=rf"key '{old}' was renamed to 'crop_size'"):
        load_config(schema, None, [f"{old}=64"])
    path = tmp_path / "old.yaml"
    path.write_text(f"{old}: 64\n")
    with pytest.raises(ConfigError, match=rf"{path}: key '{old}' was renamed to 'crop_size'"):
        load_config(schema, path)
    assert load_config(schema, None, ["crop_size=64"]).crop_size == 64


def test_yaml_boolean_words_stay_words_for_text_keys(tmp_path):
    """`mixed_precision=no` (YAML reads `no` as false) is the string "no", on the command line and in a file."""
    assert load_config(PretrainConfig, overrides=["mixed_precision=no"]).mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("mixed_precision: no\n")
    assert load_config(PretrainConfig, path).mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(PretrainConfig, overrides=["mixed_precision=off2"])
