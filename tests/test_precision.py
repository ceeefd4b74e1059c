"""Training precision and memory format chosen by measurement (defectforge/precision.py)."""

import json

import pytest
import torch

from defectforge import precision
from defectforge.config import load_config
from defectforge.precision import cpu_choice, cpu_signature, measure_cpu_bf16, prefers_channels_last
from finetune.config import FinetuneConfig
from pretrain.segmenter import build_segmenter


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and no choice made yet in this process."""
    monkeypatch.setenv("DEFECTFORGE_CACHE", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(precision, "_CHOICE", None)
    return tmp_path


def fake_measure(speedup):
    calls = []

    def measure():
        calls.append(1)
        return {"fp32_s": 0.2, "bf16_s": 0.2 / speedup, "bf16_speedup": speedup}
    return measure, calls


@pytest.mark.parametrize("speedup, used", [(1.6, "bf16"), (1.19, "no"), (0.4, "no")])
def test_cpu_auto_picks_bf16_only_when_measured_faster_and_keeps_the_measurement(fresh, monkeypatch, speedup, used):
    measure, calls = fake_measure(speedup)
    monkeypatch.setattr(precision, "measure_cpu_bf16", measure)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    value, info = precision.resolve_mixed_precision("auto")
    assert value == used and info["used"] == used and info["source"] == "measured now"
    assert info["bf16_speedup"] == pytest.approx(speedup, rel=1e-3)
    kept = json.loads((fresh / "cpu_precision.json").read_text())
    assert list(kept) == [cpu_signature()]
    # a new process on the same machine reads the measurement instead of timing again
    monkeypatch.setattr(precision, "_CHOICE", None)
    value2, info2 = precision.resolve_mixed_precision("auto")
    assert (value2, len(calls)) == (used, 1) and info2["source"] == str(fresh / "cpu_precision.json")


def test_explicit_precision_is_used_as_given(fresh, monkeypatch):
    monkeypatch.setattr(precision, "measure_cpu_bf16", lambda: pytest.fail("measured although not asked"))
    assert precision.resolve_mixed_precision("no") == ("no", {"asked": "no", "used": "no"})
    assert precision.resolve_mixed_precision("bf16")[0] == "bf16"


def test_distributed_process_never_measures_and_uses_the_kept_answer_or_fp32(fresh, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "measure_cpu_bf16", lambda: pytest.fail("measured in a distributed process"))
    assert cpu_choice()["used"] == "no"
    (fresh / "cpu_precision.json").write_text(json.dumps(
        {cpu_signature(): {"fp32_s": 0.3, "bf16_s": 0.1, "bf16_speedup": 3.0}}))
    monkeypatch.setattr(precision, "_CHOICE", None)
    assert cpu_choice()["used"] == "bf16"


def test_unreadable_cache_is_measured_again(fresh, monkeypatch):
    (fresh / "cpu_precision.json").write_text("{not json")
    measure, calls = fake_measure(2.0)
    monkeypatch.setattr(precision, "measure_cpu_bf16", measure)
    assert cpu_choice()["used"] == "bf16" and calls == [1]
    assert cpu_signature() in json.loads((fresh / "cpu_precision.json").read_text())


def test_real_measurement_times_both_precisions():
    got = measure_cpu_bf16(repeats=1)
    assert got["fp32_s"] > 0 and got["bf16_s"] > 0
    assert got["bf16_speedup"] == pytest.approx(got["fp32_s"] / got["bf16_s"])


@pytest.mark.parametrize("model, arch, expected", [("resnet18", "Unet", True), ("vit_tiny", "auto", False)])
def test_channels_last_for_convolutional_networks_only(model, arch, expected):
    cfg = load_config(FinetuneConfig, overrides=[f"model={model}", f"architecture={arch}", "crop_size=64"])
    net, _ = build_segmenter(cfg, ["background", "crack"])
    assert prefers_channels_last(net) is expected
