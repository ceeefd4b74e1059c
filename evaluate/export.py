"""`python -m evaluate export`: a fine-tuned run as an ONNX or OpenVINO model, with a parity check on real tiles.

The model is exported at a fixed tile size with a dynamic batch (evaluate/runtimes.py says why), into
`RUN/exported/<format>-<dtype>-<tile>/` (built in a temporary folder and renamed when complete): the model file,
and `export.json` with what was exported and the parity check against the eager PyTorch model on evaluation
tiles (max and mean absolute logit difference, IoU of the two predictions, and the mIoU of each against the
masks, whose difference is the accuracy the export costs). int8 is static post-training quantization (ONNX
Runtime, QDQ format, per-channel weights) calibrated on training tiles; OpenVINO int8 runs that quantized ONNX
model. fp16 stores the weights in half precision (ONNX: fp16 graph with fp32 inputs and outputs; OpenVINO:
compressed weights).
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from defectforge.reader import make_dataset, read_location_info
from defectforge.tiling import tile_grid
from pretrain.metrics import class_argmax
from pretrain.segmenter import load_segmenter

from .runtimes import DTYPES, ExportedModel, export_dir, require_package

log = logging.getLogger("evaluate")
FORMATS = ("onnx", "openvino")
OPSET = 17


def real_tiles(location: str, split: str, tile: int, count: int, mean: list[float], std: list[float],
               classes: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `count` normalised (1, 3, t, t) tiles and their (t, t) masks, cut without overlap from `split`."""
    ds = make_dataset(location, split)
    if ds.classes != classes:
        raise ValueError(f"{location} has classes {ds.classes} but the model was trained on {classes}")
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    for sample in ds:
        image = sample["image"][None]
        image = image.expand(-1, 3, -1, -1) if image.shape[1] == 1 else image
        image = (image - m) / s
        for y, x, h, w in tile_grid(image.shape[-2], image.shape[-1], tile, 0.0):
            out.append((image[..., y:y + h, x:x + w].contiguous(), sample["mask"][y:y + h, x:x + w]))
            if len(out) >= count:
                return out
    if not out:
        raise ValueError(f"{location} has no {split} image to cut tiles from")
    return out


def _split(location: str, wanted: tuple[str, ...]) -> str:
    splits = list(read_location_info(location)["splits"])
    for name in wanted:
        if name in splits:
            return name
    return splits[-1]


def export_onnx(model: torch.nn.Module, path: Path, tile: int) -> None:
    """Fixed tile, dynamic batch. A timm ViT that resamples its position embedding per input size gets it
    resampled once to the tile here (the resampling op has no ONNX equivalent; at the tile it is the identity)."""
    model = copy.deepcopy(model).eval()
    encoder = getattr(model, "encoder", None)
    if callable(getattr(encoder, "set_input_size", None)) and getattr(encoder, "pos_embed", None) is not None:
        encoder.set_input_size(img_size=(tile, tile))
    x = torch.zeros(2, 3, tile, tile)
    with torch.no_grad(), warnings.catch_warnings():  # the tracer's notes on shape checks, constant at a fixed tile
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript exporter: torch.export's needs onnxscript
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader protocol over training tiles, one at a time."""

    def __init__(self, tiles: list[torch.Tensor], name: str):
        self.items = iter([{name: t.numpy().astype(np.float32)} for t in tiles])

    def get_next(self):
        return next(self.items, None)

    def rewind(self):  # not needed by the minmax calibrator
        pass


def quantize_int8(fp32: Path, out: Path, tiles: list[torch.Tensor]) -> None:
    q = require_package("onnxruntime.quantization", "--dtype int8")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the quantizer warns on the root logger per bias it folds, hundreds of lines
    try:
        q.quantize_static(str(fp32), str(out), _Calibration(tiles, "image"), quant_format=q.QuantFormat.QDQ,
                          per_channel=True, activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8)
    finally:
        root.setLevel(level)


def to_fp16(fp32: Path, out: Path) -> None:
    onnx = require_package("onnx", "--format onnx")
    float16 = require_package("onnxruntime.transformers.float16", "--format onnx --dtype fp16")
    onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), str(out))


def confusion(pred: torch.Tensor, truth: torch.Tensor, k: int) -> torch.Tensor:
    return torch.bincount(truth.flatten().long() * k + pred.flatten().long(), minlength=k * k).view(k, k)


def miou(conf: torch.Tensor) -> float:
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


@torch.no_grad()
def parity(model: torch.nn.Module, exported: ExportedModel, tiles: list[tuple[torch.Tensor, torch.Tensor]],
           num_classes: int) -> dict:
    """The exported model against the eager one on the same tiles."""
    k = num_classes
    agree, truth_eager, truth_exported = (torch.zeros(k, k, dtype=torch.long) for _ in range(3))
    max_diff, total_diff, values, padded = 0.0, 0.0, 0, 0
    for x, mask in tiles:
        ref, out = model(x), exported(x)
        padded += int(x.shape[-2] != exported.tile or x.shape[-1] != exported.tile)
        diff = (ref - out).abs()
        max_diff, total_diff, values = max(max_diff, float(diff.max())), total_diff + float(diff.sum()), \
            values + diff.numel()
        p_ref, p_out = class_argmax(ref[0], 0), class_argmax(out[0], 0)
        agree += confusion(p_out, p_ref, k)
        truth_eager += confusion(p_ref, mask, k)
        truth_exported += confusion(p_out, mask, k)
    miou_eager, miou_exported = miou(truth_eager), miou(truth_exported)
    return {"tiles": len(tiles), "padded_tiles": padded, "max_abs_logit_diff": max_diff,
            "mean_abs_logit_diff": total_diff / max(values, 1),
            "iou_vs_torch": miou(agree), "pixel_agreement": float(agree.diag().sum() / agree.sum()),
            "miou_torch": miou_eager, "miou_exported": miou_exported, "miou_change": miou_exported - miou_eager}


def build(model: torch.nn.Module, work: Path, fmt: str, dtype: str, tile: int,
          calibration: list[torch.Tensor] | None = None) -> str:
    """Write the exported model into `work`; returns its file name. int8 needs `calibration` tiles."""
    onnx_file = work / "model.onnx"
    export_onnx(model, onnx_file, tile)
    if dtype == "int8":
        if not calibration:
            raise ValueError("--dtype int8 needs calibration tiles")
        quantize_int8(onnx_file, work / "model.int8.onnx", calibration)
        (work / "model.int8.onnx").replace(onnx_file)
    elif dtype == "fp16" and fmt == "onnx":
        to_fp16(onnx_file, work / "model.fp16.onnx")
        (work / "model.fp16.onnx").replace(onnx_file)
    if fmt == "onnx":
        return onnx_file.name
    ov = require_package("openvino", "--format openvino")
    ov.save_model(ov.convert_model(str(onnx_file)), str(work / "model.xml"), compress_to_fp16=dtype == "fp16")
    onnx_file.unlink()
    return "model.xml"


def export_model(run_dir: str | Path, fmt: str, *, shards: str, tile: int = 512, dtype: str = "fp32",
                 parity_tiles: int = 16, calibration_tiles: int = 32) -> Path:
    """Export `run_dir` and check it; returns the export folder (RUN/exported/<fmt>-<dtype>-<tile>)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if not 32 <= tile <= 8192:
        raise ValueError(f"--tile {tile} is not between 32 and 8192")
    run_dir = Path(run_dir)
    if not (run_dir / "model_config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finetune run (no model_config.json; did it reach max_steps?)")
    stride = json.loads((run_dir / "model_config.json").read_text()).get("stride")  # absent in older runs
    if stride and tile % int(stride):  # every tile would be padded to the next multiple: wasted work
        raise ValueError(f"--tile {tile} is not a multiple of {run_dir.name}'s stride {stride}")
    require_package("onnx", f"--format {fmt}")
    if fmt == "onnx" or dtype != "fp32":  # the onnx parity check, int8 quantization, the fp16 graph conversion
        require_package("onnxruntime", f"--format {fmt} --dtype {dtype}")
    if fmt == "openvino":
        require_package("openvino", "--format openvino")
    model, mcfg = load_segmenter(run_dir)
    model.eval()
    args = (tile, parity_tiles, mcfg["mean"], mcfg["std"], mcfg["classes"])
    eval_tiles = real_tiles(shards, _split(shards, ("test", "val")), *args)
    final = export_dir(run_dir, fmt, dtype, tile)
    work = final.with_name(final.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        start = time.perf_counter()
        calibration = calib = None
        if dtype == "int8":
            train = _split(shards, ("train",))
            calibration = {"split": train, "tiles": calibration_tiles}
            calib = [t for t, _ in real_tiles(shards, train, tile, calibration_tiles, *args[2:])]
        file = build(model, work, fmt, dtype, tile, calib)
        info = {"run": str(run_dir), "format": fmt, "dtype": dtype, "tile": tile, "file": file, "opset": OPSET,
                "input": "image (N, 3, tile, tile), normalised with mean/std; dynamic batch",
                "output": "logits (N, classes, tile, tile)", "classes": mcfg["classes"], "mean": mcfg["mean"],
                "std": mcfg["std"], "model": mcfg["model"], "architecture": mcfg.get("smp_class"),
                "calibration": calibration, "shards": str(shards), "torch": torch.__version__,
                "export_seconds": round(time.perf_counter() - start, 2)}
        (work / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        info["parity"] = parity(model, ExportedModel(work), eval_tiles, len(mcfg["classes"]))
        (work / "export.json").write_text(json.dumps(info, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        work.rename(final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    p = info["parity"]
    log.info("%s -> %s: max |logit diff| %.2e, IoU vs torch %.4f, mIoU %.4f -> %.4f (%+.4f) on %d tiles", run_dir,
             final, p["max_abs_logit_diff"], p["iou_vs_torch"], p["miou_torch"], p["miou_exported"],
             p["miou_change"], p["tiles"])
    if p["padded_tiles"]:
        log.warning("%d of %d parity tiles came from images smaller than the %d px tile and were padded to it: the "
                    "exported model sees the padding, the eager one does not (a ViT attends to it: on 256 px images "
                    "a 512 px export of a trained ViT-Tiny agreed with eager at IoU 0.53). For images that small, "
                    "export with --tile at most their side and evaluate with the same tile_size", p["padded_tiles"],
                    p["tiles"], tile)
    return final
