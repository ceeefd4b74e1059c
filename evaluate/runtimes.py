"""Inference runtimes behind one call, `model(tiles) -> logits`: eager PyTorch, `torch.compile`, bf16 autocast,
and models exported by `python -m evaluate export` run by ONNX Runtime or OpenVINO (docs/deploy.md).

A runtime name is `torch`, `compile`, `bf16`, or `<runtime>[-<dtype>]` with runtime `onnxruntime` or `openvino`
and dtype `fp32` (default), `fp16` or `int8`; an exported model is found at `RUN/exported/<format>-<dtype>-<tile>/`.
Exported models have a fixed tile size (timm ViTs resample their position embedding per input size, which the
ONNX exporter cannot express): a smaller tile (an image smaller than the tile) is padded to it and cropped back.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EAGER = ("torch", "compile", "bf16")
EXPORTED = {"onnxruntime": "onnx", "openvino": "openvino"}  # runtime -> export format
DTYPES = ("fp32", "fp16", "int8")
EXPORT_DIR = "exported"
EXTRA = "pip install -e '.[deploy]'"


def require_package(module: str, what: str):
    """Import an optional runtime package, or fail naming it and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs the Python package {module!r}, which is not installed here: {EXTRA}") \
            from None


def parse_runtime(name: str) -> tuple[str, str]:
    """`onnxruntime-int8` -> ("onnxruntime", "int8"); `torch` -> ("torch", "fp32"); a bad name fails naming it."""
    base, _, dtype = str(name).partition("-")
    if base in EAGER and not dtype:
        return base, "fp32"
    if base in EXPORTED and (dtype or "fp32") in DTYPES:
        return base, dtype or "fp32"
    raise ValueError(f"runtime {name!r} is not one of {', '.join(EAGER)}, or onnxruntime/openvino with an optional "
                     f"-fp16 or -int8 (e.g. onnxruntime-int8)")


def export_dir(run_dir: str | Path, fmt: str, dtype: str, tile: int) -> Path:
    return Path(run_dir) / EXPORT_DIR / f"{fmt}-{dtype}-{tile}"


def find_export(run_dir: str | Path, fmt: str, dtype: str, tile: int) -> Path:
    """The export folder of `run_dir` in that format, dtype and tile, or a one-line error saying how to make it."""
    folder = export_dir(run_dir, fmt, dtype, tile)
    if (folder / "export.json").is_file():
        return folder
    found = sorted(p.name for p in (Path(run_dir) / EXPORT_DIR).glob("*") if (p / "export.json").is_file())
    raise ValueError(f"{run_dir} has no {fmt} {dtype} export at tile {tile} (expected {folder}; found: "
                     f"{', '.join(found) or 'none'}); make it with: python -m evaluate export --model {run_dir} "
                     f"--format {fmt} --dtype {dtype} --tile {tile} --shards DIR")


class ExportedModel:
    """An exported model as a callable on torch tensors: (N, 3, h, w) with h, w <= tile -> (N, C, h, w) logits."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        self.info = json.loads((self.folder / "export.json").read_text())
        self.tile = int(self.info["tile"])
        self.format = self.info["format"]
        threads = threads or torch.get_num_threads()
        if self.format == "onnx":
            ort = require_package("onnxruntime", "runtime onnxruntime")
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(str(self.folder / self.info["file"]), options,
                                                providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            self._run = lambda x: self.session.run(None, {self.input: x})[0]
        else:
            ov = require_package("openvino", "runtime openvino")
            core = ov.Core()
            config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
            if self.info["dtype"] == "fp32":  # else OpenVINO computes in bf16 on CPUs that have it
                config["INFERENCE_PRECISION_HINT"] = "f32"
            compiled = core.compile_model(str(self.folder / self.info["file"]), "CPU", config)
            self.request = compiled.create_infer_request()
            self._run = lambda x: self.request.infer({0: x})[0].copy()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h > self.tile or w > self.tile:
            raise ValueError(f"{self.folder} was exported for {self.tile} px tiles, got a {h}x{w} tile: evaluate with "
                             f"tile_size={self.tile} or export again with --tile {max(h, w)}")
        if (h, w) != (self.tile, self.tile):  # an image smaller than the tile: pad as the model pads to its stride
            ph, pw = self.tile - h, self.tile - w
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self._run(np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32))
        return torch.from_numpy(np.asarray(out, dtype=np.float32))[..., :h, :w]


class Autocast(torch.nn.Module):
    """The eager model under CPU/CUDA autocast to `dtype` (bf16 by default), returning fp32 logits."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def load_runtime(model: torch.nn.Module, run_dir: str | Path, runtime: str, tile: int) -> Callable:
    """`model` (eager, eval mode) run through `runtime`; exported runtimes read RUN/exported/."""
    base, dtype = parse_runtime(runtime)
    if base == "torch":
        return model
    if base == "compile":
        return torch.compile(model, dynamic=False)
    if base == "bf16":
        return Autocast(model)
    require_package(base, f"runtime {runtime}")
    return ExportedModel(find_export(run_dir, EXPORTED[base], dtype, tile))
