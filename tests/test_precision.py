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


def fake_attention(fp32, bf16):
    calls = []

    def measure():
        calls.append(1)
        return {"attention_speedup_fp32": fp32, "attention_speedup_bf16": bf16}
    return measure, calls


def _vit():
    cfg = load_config(FinetuneConfig, overrides=["model=vit_tiny", "crop_size=64"])
    return build_segmenter(cfg, ["background", "crack"])[0]


@pytest.mark.parametrize("speedup, used, switched", [((1.0, 1.6), "bf16", True), ((1.0, 1.6), "no", False),
                                                     ((1.3, 1.0), "no", True), ((1.19, 1.19), "bf16", False)])
def test_training_attention_is_explicit_only_where_this_cpu_measured_it_faster(fresh, monkeypatch, speedup, used,
                                                                               switched):
    measure, _ = fake_measure(1.6 if used == "bf16" else 1.0)
    monkeypatch.setattr(precision, "measure_cpu_bf16", measure)
    monkeypatch.setattr(precision, "measure_cpu_attention", fake_attention(*speedup)[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    value, info = precision.resolve_mixed_precision("auto")
    assert value == used
    vit, cnn = _vit(), build_segmenter(load_config(FinetuneConfig, overrides=[
        "model=resnet18", "architecture=Unet", "crop_size=64"]), ["background", "crack"])[0]
    assert precision.use_explicit_attention(vit, info) == (12 if switched else 0)
    assert all(not m.fused_attn for m in vit.modules() if hasattr(m, "fused_attn")) is switched
    assert precision.use_explicit_attention(cnn, info) == 0  # nothing to switch
    # a GPU, or a precision given instead of measured: the fused kernel stays
    for record in ({**info, "device": "cuda"}, {"asked": "bf16", "used": "bf16"}):
        assert precision.use_explicit_attention(_vit(), record) == 0


def test_a_kept_measurement_from_before_the_attention_probe_gets_only_the_probe(fresh, monkeypatch):
    (fresh / "cpu_precision.json").write_text(json.dumps(
        {cpu_signature(): {"fp32_s": 0.3, "bf16_s": 0.1, "bf16_speedup": 3.0}}))
    monkeypatch.setattr(precision, "measure_cpu_bf16", lambda: pytest.fail("bf16 measured again"))
    measure, calls = fake_attention(1.0, 1.5)
    monkeypatch.setattr(precision, "measure_cpu_attention", measure)
    choice = cpu_choice()
    assert choice["used"] == "bf16" and choice["attention_speedup_bf16"] == 1.5 and calls == [1]
    kept = json.loads((fresh / "cpu_precision.json").read_text())[cpu_signature()]
    assert kept == {"fp32_s": 0.3, "bf16_s": 0.1, "bf16_speedup": 3.0, "attention_speedup_fp32": 1.0,
                    "attention_speedup_bf16": 1.5}


def test_real_attention_probe_and_explicit_attention_computes_what_the_fused_kernel_does():
    got = precision.measure_cpu_attention(repeats=1)
    assert got["attention_speedup_fp32"] > 0 and got["attention_speedup_bf16"] > 0
    vit = _vit().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = vit(x)
        for m in vit.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
        explicit = vit(x)
    assert torch.allclose(fused, explicit, atol=1e-4, rtol=1e-4)
