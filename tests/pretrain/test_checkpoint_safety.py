"""A checkpoint folder cannot run code on resume: the loop's own state is JSON + safetensors, and every pickle
Accelerate reads is loaded with weights_only (a crafted one is refused with a clear error)."""

import os
import pickle
import shutil

import pytest
import safetensors.torch
import torch

from defectforge.config import ConfigError, load_config
from defectforge.files import MARKER
from pretrain.config import PretrainConfig
from pretrain.train import train
from tests.synth.helpers import make_shards

TINY = {"model": "vit_tiny", "model_kwargs": {"depth": 1, "embed_dim": 48, "num_heads": 2}, "crop_size": 64,
        "batch_size": 2, "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 2, "val_every": 4, "log_every": 1,
        "num_workers": 0, "shuffle_buffer": 0, "wandb": False, "ema": True, "ema_decay": 0.5, "keep_checkpoints": 3}


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    shards = tmp_path_factory.mktemp("safety-shards")
    make_shards(shards, num_samples=10, image_size=64, shard_size=4, val_ratio=0.2)
    run = tmp_path_factory.mktemp("safety-run") / "run"
    train(load_config(PretrainConfig, None, TINY), str(shards), run, progress=False)
    return shards, run


def _copy_step2(run, tmp_path):
    """A run folder holding only the step-2 checkpoint, to resume from."""
    other = tmp_path / "resumed"
    shutil.copytree(run / "checkpoints" / "step-0000002", other / "checkpoints" / "step-0000002")
    shutil.copy(run / MARKER, other / MARKER)  # the run folder's own marker: the project may write here
    return other


def test_the_loop_state_is_saved_without_pickle(run):
    _, folder = run
    ckpt = folder / "checkpoints" / "step-0000004"
    assert not list(ckpt.glob("custom_checkpoint_*"))
    names = {p.name for p in ckpt.iterdir()}
    assert {"state_0.json", "state_1.json", "state_2.json", "state_2.safetensors"} <= names  # counters, lr, EMA
    ema = safetensors.torch.load_file(str(ckpt / "state_2.safetensors"))
    saved = safetensors.torch.load_file(str(folder / "model.safetensors"))  # the export is the EMA
    key = next(k for k in ema if k.endswith("patch_embed.proj.weight"))
    assert torch.equal(ema[key], saved[key.split("backbone.", 1)[1]])  # the export is the backbone


def test_a_crafted_custom_checkpoint_is_refused_unread(run, tmp_path):
    shards, folder = run
    other = _copy_step2(folder, tmp_path)
    marker = tmp_path / "pwned"
    (other / "checkpoints" / "step-0000002" / "custom_checkpoint_0.pkl").write_bytes(
        pickle.dumps(Payload(str(marker))))
    with pytest.raises(ConfigError, match="holds custom_checkpoint_0.pkl, a pickle this project never writes"):
        train(load_config(PretrainConfig, None, {**TINY, "resume": "latest"}), str(shards), other, progress=False)
    assert not marker.exists()


def test_resume_from_the_safe_state_ends_with_the_uninterrupted_weights(run, tmp_path):
    shards, folder = run
    other = _copy_step2(folder, tmp_path)
    summary = train(load_config(PretrainConfig, None, {**TINY, "resume": "latest"}), str(shards), other,
                    progress=False)
    assert summary["step"] == 4
    a = safetensors.torch.load_file(str(other / "model.safetensors"))
    b = safetensors.torch.load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)  # same weights as the uninterrupted run


def test_a_crafted_pickle_that_accelerate_reads_is_refused_naming_the_checkpoint(run, tmp_path):
    shards, folder = run
    other = _copy_step2(folder, tmp_path)
    marker = tmp_path / "pwned"
    ckpt = other / "checkpoints" / "step-0000002"
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(ConfigError, match="refused unread") as err:
        train(load_config(PretrainConfig, None, {**TINY, "resume": "latest"}), str(shards), other, progress=False)
    assert str(ckpt) in str(err.value) and not marker.exists()


def test_a_checkpoint_without_the_loop_state_fails_naming_the_file(run, tmp_path):
    shards, folder = run
    other = _copy_step2(folder, tmp_path)
    (other / "checkpoints" / "step-0000002" / "state_0.json").unlink()
    with pytest.raises(ConfigError, match="state_0.json is missing"):
        train(load_config(PretrainConfig, None, {**TINY, "resume": "latest"}), str(shards), other, progress=False)
