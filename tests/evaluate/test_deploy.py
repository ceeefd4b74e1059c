"""Deployment: export to ONNX / OpenVINO with parity on real tiles, int8 calibration, runtimes in tiled inference.

Tests of an optional runtime skip with a reason when its package (the `deploy` extra) is not installed.
"""

import json
import logging
from pathlib import Path

import pytest
import torch

from defectforge.config import load_config
from defectforge.tiling import tiled_logits
from evaluate.__main__ import main
from evaluate.runtimes import load_runtime, parse_runtime
from finetune.config import FinetuneConfig
from pretrain.segmenter import build_segmenter, save_segmenter
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[2]
TILE = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy-shards")
    make_shards(out, num_samples=6, image_size=[64, 96], shard_size=3, val_ratio=0.34)
    return out


def _run(folder: Path, classes: list[str], **overrides) -> Path:
    torch.manual_seed(0)
    cfg = load_config(FinetuneConfig, None, {"crop_size": TILE, **overrides})
    model, mcfg = build_segmenter(cfg, classes)
    save_segmenter(model.eval(), folder, mcfg)
    return folder


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
    classes = json.loads((shards / "_info.json").read_text())["classes"]
    root = tmp_path_factory.mktemp("deploy-runs")
    return {"cnn": _run(root / "unet", classes, model="resnet18", architecture="Unet"),
            "vit": _run(root / "vit", classes, model="vit_tiny_patch16_224", architecture="DPT",
                        encoder_kwargs={"embed_dim": 48, "num_heads": 2})}


def _export(run: Path, shards: Path, fmt: str, dtype: str = "fp32") -> dict:
    assert main(["export", "--model", str(run), "--format", fmt, "--shards", str(shards), "--tile", str(TILE),
                 "--dtype", dtype, "--parity-tiles", "4", "--calibration-tiles", "4"]) == 0
    folder = run / "exported" / f"{fmt}-{dtype}-{TILE}"
    assert not folder.with_name(folder.name + ".tmp").exists()
    return json.loads((folder / "export.json").read_text())


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_onnx_export_matches_the_pytorch_model_on_real_tiles(kind, runs, shards):
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the deploy extra (onnx) is not installed")
    info = _export(runs[kind], shards, "onnx")
    p = info["parity"]
    assert p["tiles"] == 4 and p["max_abs_logit_diff"] < 1e-3 and p["iou_vs_torch"] > 0.99
    assert abs(p["miou_change"]) < 0.01 and info["tile"] == TILE and info["format"] == "onnx"
    assert p["padded_tiles"] == 0  # 64x96 images cut into 64 px tiles: none smaller than the export
    # the runtime in tiled inference: dynamic batch, an image larger than a tile, same logits as eager
    from pretrain.segmenter import load_segmenter

    model, _ = load_segmenter(runs[kind])
    x = torch.rand(1, 3, 100, 150)
    exported = load_runtime(model, runs[kind], "onnxruntime", TILE)
    ref = tiled_logits(model, x, tile=TILE, overlap=0.25, batch=3)
    assert (tiled_logits(exported, x, tile=TILE, overlap=0.25, batch=3) - ref).abs().max() < 1e-3
    small = torch.rand(2, 3, 48, 40)  # a tile smaller than the export size is padded and cropped back
    assert exported(small).shape == (2, model(small).shape[1], 48, 40)


def test_openvino_export_matches_the_pytorch_model(runs, shards):
    pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    p = _export(runs["cnn"], shards, "openvino")["parity"]
    assert p["max_abs_logit_diff"] < 1e-3 and p["iou_vs_torch"] > 0.99


def test_int8_is_calibrated_on_training_tiles_and_reports_its_iou_change(runs, shards):
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the deploy extra (onnx) is not installed")
    info = _export(runs["cnn"], shards, "onnx", "int8")
    assert info["calibration"] == {"split": "train", "tiles": 4}
    p = info["parity"]
    assert set(p) >= {"miou_torch", "miou_exported", "miou_change", "iou_vs_torch"}
    assert 0 < p["max_abs_logit_diff"] and p["iou_vs_torch"] > 0.5  # quantized: close, not equal


def test_runtime_names_and_missing_exports_fail_naming_what_is_expected(runs, caplog):
    assert parse_runtime("onnxruntime-int8") == ("onnxruntime", "int8") and parse_runtime("torch") == ("torch", "fp32")
    with pytest.raises(ValueError, match="runtime 'tensorrt' is not one of"):
        parse_runtime("tensorrt")
    pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")
    with pytest.raises(ValueError, match="no openvino fp16 export at tile 512.*python -m evaluate export"):
        load_runtime(torch.nn.Identity(), runs["vit"], "openvino-fp16", 512)


def test_export_warns_when_parity_tiles_were_padded_to_the_tile(runs, shards, caplog):
    """Images smaller than the export tile are padded by the exported model and not by the eager one."""
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the deploy extra (onnx) is not installed")
    with caplog.at_level(logging.WARNING):
        assert main(["export", "--model", str(runs["cnn"]), "--format", "onnx", "--shards", str(shards), "--tile",
                     "128", "--parity-tiles", "2"]) == 0
    info = json.loads((runs["cnn"] / "exported" / "onnx-fp32-128" / "export.json").read_text())
    assert info["parity"]["padded_tiles"] == 2
    assert "2 of 2 parity tiles came from images smaller than the 128 px tile" in caplog.text


def test_export_errors_name_the_run_and_the_tile(runs, shards, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    assert main(["export", "--model", str(tmp_path), "--format", "onnx", "--shards", str(shards)]) == 2
    assert "is not a finetune run" in caplog.text
    assert main(["export", "--model", str(runs["vit"]), "--format", "onnx", "--shards", str(shards),
                 "--tile", "72"]) == 2
    assert "not a multiple of" in caplog.text


def test_bf16_runtime_runs_the_eager_model_under_autocast():
    model = torch.nn.Conv2d(3, 2, 1).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        out = load_runtime(model, "unused", "bf16", 16)(x)
    assert out.dtype == torch.float32 and (out - model(x)).abs().max() < 0.05


def test_compile_runtime_compiles_and_matches_eager_in_tiled_inference():
    """`runtime=compile`: torch.compile (inductor) of the eager model, the same stitched logits. A small conv net
    keeps the compilation to seconds; bigger models compile the same way, only slower (docs/deploy.md)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 3, 1)).eval()
    runner = load_runtime(model, "unused", "compile", 32)
    assert isinstance(runner, torch._dynamo.eval_frame.OptimizedModule)
    x = torch.rand(1, 3, 48, 80)
    with torch.no_grad():
        eager = tiled_logits(model, x, tile=32, overlap=0.25, blend="gaussian", batch=8)
        compiled = tiled_logits(runner, x, tile=32, overlap=0.25, blend="gaussian", batch=8)
    assert compiled.shape == eager.shape == (1, 3, 48, 80)
    assert (compiled - eager).abs().max() < 1e-4


def test_evaluate_run_measures_each_runtime_and_the_claims_use_the_fastest_within_tolerance(runs, shards, tmp_path):
    pytest.importorskip("onnxruntime", reason="the deploy extra (onnxruntime) is not installed")
    pytest.importorskip("onnx", reason="the deploy extra (onnx) is not installed")
    for kind in ("cnn", "vit"):
        if not (runs[kind] / f"exported/onnx-fp32-{TILE}/export.json").is_file():
            _export(runs[kind], shards, "onnx")
    from evaluate.config import EvalConfig
    from evaluate.run import evaluate

    # fp32 eager as the reference: an exported fp32 model must match it (not a bf16 pass on a bf16 CPU)
    cfg = load_config(EvalConfig, None, {"wandb": False, "tile_size": TILE, "speed_size": [64, 96], "repeats": 2,
                                         "warmup": 0, "interpret_images": 0, "overlays": 0,
                                         "runtime": ["onnxruntime", "bf16"], "mixed_precision": "no"})
    assert cfg.runtimes == ["torch", "onnxruntime", "bf16"]
    evaluate(cfg, [str(runs["cnn"]), str(runs["vit"])], [str(shards)], tmp_path / "report", progress=False)
    results = json.loads((tmp_path / "report/results.json").read_text())["results"]
    for r in results:
        rt = r["cost"]["runtimes"]
        assert set(rt) == {"torch", "onnxruntime", "bf16"} and rt["torch"]["miou_change"] == 0
        assert abs(rt["onnxruntime"]["miou_change"]) < 1e-3 and rt["onnxruntime"]["within_tolerance"]
        assert len(rt["onnxruntime"]["tiled"]["seconds_all"]) == 2
        kept = {k: v["tiled"]["seconds_per_image"] for k, v in rt.items() if v["within_tolerance"]}
        assert r["cost"]["deployed"] == min(kept, key=kept.get)
    report = (tmp_path / "report/report.md").read_text()
    assert "Speed per runtime" in report and "onnxruntime: s / 4K image" in report
    assert "4K frames per second" in report


def test_evaluate_run_refuses_a_runtime_without_its_export_before_any_work(runs, shards, tmp_path, caplog):
    pytest.importorskip("openvino", reason="the deploy extra (openvino) is not installed")
    caplog.set_level(logging.ERROR)
    assert main(["run", "--config", str(REPO / "configs/evaluate/default.yaml"), "--models", str(runs["vit"]),
                 "--shards", str(shards), "--out", str(tmp_path / "r"), "runtime=openvino-int8", "wandb=false"]) == 2
    assert "no openvino int8 export at tile 512" in caplog.text and not (tmp_path / "r").exists()
    assert main(["run", "--config", str(REPO / "configs/evaluate/default.yaml"), "--models", str(runs["vit"]),
                 "--shards", str(shards), "--out", str(tmp_path / "r"), "runtime=tensorrt"]) == 2
    assert "key 'runtime': value 'tensorrt' is invalid" in caplog.text
