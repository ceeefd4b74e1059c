"""Small shard folders for the tests, made with the real generator."""

from pathlib import Path

from defectforge.config import load_config
from synth.compose import SynthConfig
from synth.generate import generate


def tiny_config(**overrides) -> SynthConfig:
    base = {"num_samples": 10, "image_size": 64, "shard_size": 4, "val_ratio": 0.2, "workers": 1,
            "image_format": "png"}
    base.update(overrides)
    return load_config(SynthConfig, None, base)


def make_shards(out: Path, **overrides) -> dict:
    return generate(tiny_config(**overrides), out, progress=False)
