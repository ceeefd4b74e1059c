"""`python -m evaluate stream` on a generated 3840x2160 clip against the model's own tiled throughput on stills.

One JSON line per measurement: {"bench", "value", "unit", "reference", "ratio"}, for each model:
- `stream_<model>`: frames/s of `evaluate.stream.stream` (decode thread, model, writer thread: overlay video and
  JSON lines) on a clip of `--frames` procedural scenes, against the frames/s of `tiled_logits` alone on the
  same frames as in-memory tensors (median of `--repeats` frames after one warm-up), same runtime. Target:
  ratio >= 0.9 (the overlap leaves the model's throughput).
- `stream_memory_<model>`: the resident set after the last frame against after the first (MB); ratio ~1 means
  flat over the clip; `max_mb` and the per-frame quartiles are in the line.
Every line carries `other_cpu` (the CPU share of other processes while it measured) and the first line the
CPU model (lscpu). The clip repeats `--scenes` rendered scenes to make `--frames` frames.

Usage: python bench/stream.py [--models vit_tiny] [--frames 8] [--runtime torch] [--size 2160x3840]
Needs the deploy extra (PyAV) and the bench extra (psutil).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import CpuShare, emit
from tiled_inference import cpu_model

from defectforge.config import load_config
from defectforge.tiling import tiled_logits
from evaluate.export import build
from evaluate.runtimes import EXPORTED, export_dir, load_runtime, parse_runtime
from evaluate.stream import StreamConfig, stream
from finetune.config import FinetuneConfig
from pretrain.segmenter import build_segmenter, save_segmenter
from synth.compose import SynthConfig, render_sample

REPO = Path(__file__).resolve().parents[1]


def make_clip(path: Path, scenes: list[np.ndarray], frames: int, fps: int = 25) -> None:
    import av

    with av.open(str(path), mode="w") as container:
        s = container.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = scenes[0].shape[1], scenes[0].shape[0], "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "18"}
        for i in range(frames):
            container.mux(s.encode(av.VideoFrame.from_ndarray(scenes[i % len(scenes)], format="rgb24")))
        container.mux(s.encode(None))


@torch.no_grad()
def run(name: str, clip: Path, scenes: list[np.ndarray], tmp: Path, args: argparse.Namespace) -> None:
    cfg = load_config(FinetuneConfig, REPO / f"configs/finetune/{name}.yaml", {"crop_size": args.tile})
    model, mcfg = build_segmenter(cfg, ["background", "crack"])
    run_dir = tmp / name
    save_segmenter(model.eval(), run_dir, mcfg)
    mean, std = torch.tensor(mcfg["mean"]).view(1, 3, 1, 1), torch.tensor(mcfg["std"]).view(1, 3, 1, 1)
    stills = [(torch.from_numpy(s).permute(2, 0, 1)[None].float() / 255 - mean) / std for s in scenes]
    base, dtype = parse_runtime(args.runtime)
    if base in EXPORTED:
        folder = export_dir(run_dir, EXPORTED[base], dtype, args.tile)
        folder.mkdir(parents=True)
        calib = [s[..., :args.tile, :args.tile] for s in stills] if dtype == "int8" else None
        file = build(model, folder, EXPORTED[base], dtype, args.tile, calib)
        (folder / "export.json").write_text(json.dumps({"format": EXPORTED[base], "dtype": dtype, "tile": args.tile,
                                                        "file": file}))
    scfg = load_config(StreamConfig, None, {"runtime": args.runtime, "tile_size": args.tile, "overlap": args.overlap,
                                            "tile_batch": args.batch})
    runner = load_runtime(model, run_dir, args.runtime, args.tile)
    tiling = dict(tile=args.tile, overlap=args.overlap, blend="gaussian", batch=args.batch)
    share = CpuShare().start()
    tiled_logits(runner, stills[0], **tiling)  # warm-up
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        tiled_logits(runner, stills[i % len(stills)], **tiling).argmax(1)
        times.append(time.perf_counter() - start)
    still_fps = 1 / float(np.median(times))
    summary = stream(run_dir, str(clip), tmp / f"out-{name}", scfg, progress=False)
    share.stop()
    emit(f"stream_{name}", summary["fps"], "frames/s", still_fps, digits=4, runtime=args.runtime,
         frames=summary["frames_segmented"], model_fps_in_stream=round(summary["model_fps"], 4),
         latency_ms=summary["latency_ms"], dropped=summary["frames_dropped"], other_cpu=round(share.other, 3),
         target=">= 0.9")
    rss = summary["rss_mb"]
    emit(f"stream_memory_{name}", rss["last"], "MB resident", rss["first"], digits=1, max_mb=round(rss["max"], 1),
         quartiles_mb=[round(q, 1) for q in rss["quartiles"]], frames=summary["frames_segmented"],
         other_cpu=round(share.other, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit_tiny"], help="configs/finetune/<name>.yaml")
    p.add_argument("--size", default="2160x3840", help="HxW")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--scenes", type=int, default=2)
    p.add_argument("--runtime", default="torch")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed stills")
    args = p.parse_args()
    torch.manual_seed(0)
    h, w = (int(v) for v in args.size.split("x"))
    scenes = [np.ascontiguousarray(render_sample(load_config(SynthConfig, None, {"image_size": [h, w], "seed": s}),
                                                 0)[0]) for s in range(args.scenes)]
    print(json.dumps({"machine": {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": "cpu",
                                  "cpu": cpu_model()}, "image": [h, w], "frames": args.frames,
                      "runtime": args.runtime, "tile": args.tile}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        make_clip(clip, scenes, args.frames)
        for name in args.models:
            run(name, clip, scenes, Path(tmp), args)


if __name__ == "__main__":
    main()
