"""`python -m evaluate stream --model RUN SOURCE --out DIR [key=value ...]`: a video, camera or folder of frames
segmented frame by frame, tiled, through any runtime (docs/deploy.md).

Three stages overlap: a decoder thread -> bounded queue -> the model (this thread) -> bounded queue -> a writer
thread (overlay video and one JSON line per frame), so the throughput is that of the model as long as decoding
and writing are faster. A file or folder is read at the model's pace (nothing dropped); a live camera
(`rtsp://`, `http://`) is not, so a frame that finds the queue full is dropped and counted.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from defectforge.config import require
from defectforge.files import claim_output, write_atomic
from defectforge.tiling import BLENDS, tiled_logits
from pretrain.metrics import class_argmax
from pretrain.segmenter import load_segmenter

from .cost import _rss_kb, quartiles
from .runtimes import load_runtime, parse_runtime, require_package

log = logging.getLogger("evaluate")
FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LIVE = ("rtsp://", "rtsps://", "http://", "https://", "rtmp://", "udp://")
PALETTE = np.array([[255, 40, 40], [40, 200, 255], [255, 200, 0], [160, 60, 255], [0, 255, 120]], dtype=np.float32)
_END = object()


@dataclass
class StreamConfig:
    runtime: str = "torch"  # torch / compile / bf16 / onnxruntime[-fp16/-int8] / openvino[-fp16/-int8]
    every: int = 1  # segment every N-th frame (the others are neither segmented nor written)
    tile_size: int = 512
    overlap: float = 0.1
    blend: str = "gaussian"
    tile_batch: int = 8
    queue: int = 4  # frames between decoder and model, and between model and writer
    max_frames: int | None = None  # stop after this many decoded frames (null: the whole source)
    fps: float = 25.0  # frame rate of a folder of frames (a video keeps its own)
    alpha: float = 0.5  # opacity of the mask overlay
    codec: str = "libx264"  # of the overlay video (mpeg4 when the PyAV build lacks it)

    def validate(self) -> None:
        try:
            parse_runtime(self.runtime)
            ok = True
        except ValueError:
            ok = False
        require(ok, "runtime", self.runtime, "torch, compile, bf16, or onnxruntime / openvino with an optional "
                "-fp16 or -int8")
        require(isinstance(self.every, int) and self.every >= 1, "every", self.every, "an integer >= 1")
        require(isinstance(self.tile_size, int) and 32 <= self.tile_size <= 8192, "tile_size", self.tile_size,
                "an integer between 32 and 8192")
        require(0.0 <= self.overlap < 0.9, "overlap", self.overlap, "a fraction in [0, 0.9)")
        require(self.blend in BLENDS, "blend", self.blend, f"one of {', '.join(BLENDS)}")
        require(self.tile_batch >= 1, "tile_batch", self.tile_batch, "an integer >= 1")
        require(self.queue >= 1, "queue", self.queue, "an integer >= 1")
        require(self.max_frames is None or self.max_frames >= 1, "max_frames", self.max_frames, "null or >= 1")
        require(self.fps > 0, "fps", self.fps, "a frame rate > 0")
        require(0 <= self.alpha <= 1, "alpha", self.alpha, "a fraction in [0, 1]")


def open_source(source: str, fps: float):
    """(frames iterator of (pts seconds, RGB uint8 array), frame rate, live) for a video, URL or folder."""
    if source.startswith(LIVE):
        av = require_package("av", "a camera stream")
        try:
            container = av.open(source, options={"rtsp_transport": "tcp", "timeout": "5000000"}, timeout=10)
        except Exception as err:  # PyAV raises one subclass per FFmpeg error
            raise ValueError(f"cannot open camera stream {source}: {err}") from None
        return _video_frames(container), _rate(container, fps), True
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_EXTS)
        if not files:
            raise ValueError(f"frame folder {source} holds no image ({', '.join(FRAME_EXTS)})")
        return _folder_frames(files, fps), fps, False
    if not path.is_file():
        raise ValueError(f"source {source} does not exist: expected a video file, a folder of frames, or an "
                         "rtsp:// / http:// camera URL")
    av = require_package("av", "a video file")
    try:
        container = av.open(str(path))
        if not container.streams.video:
            raise ValueError("no video stream")
    except Exception as err:
        raise ValueError(f"cannot decode video {source}: {err}") from None
    return _video_frames(container), _rate(container, fps), False


def _rate(container, default: float) -> float:
    rate = container.streams.video[0].average_rate
    return float(rate) if rate else default


def _video_frames(container):
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    try:
        for frame in container.decode(stream):
            yield (float(frame.time) if frame.time is not None else None), frame.to_ndarray(format="rgb24")
    finally:
        container.close()


def _folder_frames(files: list[Path], fps: float):
    from PIL import Image

    for i, file in enumerate(files):
        with Image.open(file) as im:
            yield i / fps, np.asarray(im.convert("RGB"))


def defects(mask: np.ndarray, classes: list[str]) -> tuple[dict[str, int], list[dict]]:
    """Area per defect class and one box [x0, y0, x1, y1] (inclusive-exclusive) per connected defect."""
    from scipy import ndimage

    areas, boxes = {}, []
    for k, name in enumerate(classes[1:], start=1):
        where = mask == k
        areas[name] = int(where.sum())
        if not areas[name]:
            continue
        labels, _ = ndimage.label(where)
        for i, sl in enumerate(ndimage.find_objects(labels), start=1):
            if sl is not None:
                boxes.append({"class": name, "box": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop],
                              "area": int((labels[sl] == i).sum())})
    return areas, boxes


def overlay(frame: np.ndarray, mask: np.ndarray, alpha: float) -> np.ndarray:
    """`frame` with each defect class's colour blended over its pixels (only those are computed: a 4K frame in
    float took 175 ms, a third of a core the model needs on a small CPU)."""
    out = frame.copy()
    hit = mask > 0
    if hit.any():
        colors = PALETTE[(mask[hit].astype(np.int64) - 1) % len(PALETTE)]
        out[hit] = (frame[hit] * (1 - alpha) + colors * alpha).clip(0, 255).astype(np.uint8)
    return out


class _Writer(threading.Thread):
    """Encodes overlay frames and writes the JSON lines, both under temporary names."""

    def __init__(self, out: Path, rate: float, cfg: StreamConfig, items: queue.Queue, classes: list[str]):
        super().__init__(daemon=True)
        self.out, self.rate, self.cfg, self.items, self.classes = out, rate, cfg, items, classes
        self.error: BaseException | None = None
        self.video_tmp, self.lines_tmp = out / "overlay.mp4.tmp", out / "frames.jsonl.tmp"

    def run(self) -> None:
        av = require_package("av", "the overlay video")
        from fractions import Fraction

        container, stream = av.open(str(self.video_tmp), mode="w", format="mp4"), None
        try:
            with self.lines_tmp.open("w") as lines:
                while (item := self.items.get()) is not _END:
                    frame, mask, record = item
                    areas, boxes = defects(mask, self.classes)  # here, not in the model's thread
                    record = {**record, "defect_area_px": areas, "defects": boxes}
                    h, w = frame.shape[0] // 2 * 2, frame.shape[1] // 2 * 2  # yuv420p needs even sides
                    if stream is None:
                        stream = self._stream(container, av, Fraction(self.rate).limit_denominator(1001), w, h)
                    picture = av.VideoFrame.from_ndarray(overlay(frame[:h, :w], mask[:h, :w], self.cfg.alpha),
                                                         format="rgb24")
                    container.mux(stream.encode(picture))
                    lines.write(json.dumps(record) + "\n")
            if stream is not None:
                container.mux(stream.encode(None))
        except BaseException as err:  # reported by the main thread
            self.error = err
            while self.items.get() is not _END:  # keep the model from blocking on a full queue
                pass
        finally:
            container.close()

    def _stream(self, container, av, rate, w: int, h: int):
        try:
            stream = container.add_stream(self.cfg.codec, rate=rate)
        except (ValueError, av.error.FFmpegError):
            log.warning("codec %s is not in this PyAV build: mpeg4 instead", self.cfg.codec)
            stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"preset": "ultrafast"}
        return stream


def _decode(frames, cfg: StreamConfig, live: bool, items: queue.Queue, counts: dict) -> None:
    try:
        for index, (pts, frame) in enumerate(frames):
            if cfg.max_frames is not None and index >= cfg.max_frames:
                break
            counts["decoded"] += 1
            if index % cfg.every:
                continue
            item = (index, pts, frame, time.perf_counter())
            if live:
                try:
                    items.put_nowait(item)
                except queue.Full:
                    counts["dropped"] += 1
            else:
                items.put(item)
    except BaseException as err:
        items.put(err)
    items.put(_END)


def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    v = np.asarray(values)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99))}


@torch.no_grad()
def stream(run_dir: str | Path, source: str, out: str | Path, cfg: StreamConfig, progress: bool = True) -> dict:
    """Segment every `cfg.every`-th frame of `source` into `out`; returns the summary (also out/summary.json)."""
    run_dir = Path(run_dir)
    if not (run_dir / "model_config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a finetune run (no model_config.json; did it reach max_steps?)")
    frames, rate, live = open_source(str(source), cfg.fps)
    require_package("av", "evaluate stream (the overlay video)")
    out = claim_output(out, "stream")
    model, mcfg = load_segmenter(run_dir)
    model.eval()
    runner = load_runtime(model, run_dir, cfg.runtime, cfg.tile_size)
    mean, std = torch.tensor(mcfg["mean"]).view(1, 3, 1, 1), torch.tensor(mcfg["std"]).view(1, 3, 1, 1)
    counts = {"decoded": 0, "dropped": 0}
    inbox: queue.Queue = queue.Queue(cfg.queue)
    outbox: queue.Queue = queue.Queue(cfg.queue)
    writer = _Writer(out, rate / cfg.every, cfg, outbox, mcfg["classes"])
    decoder = threading.Thread(target=_decode, args=(frames, cfg, live, inbox, counts), daemon=True)
    infer, latency, rss = [], [], []
    start = time.perf_counter()
    writer.start()
    decoder.start()
    error: BaseException | None = None
    while (item := inbox.get()) is not _END:
        if isinstance(item, BaseException):
            error = item
            continue
        if writer.error is not None:
            continue  # drain the decoder; the writer's error is raised below
        index, pts, frame, decoded_at = item
        t0 = time.perf_counter()
        x = (torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255 - mean) / std
        logits = tiled_logits(runner, x, tile=cfg.tile_size, overlap=cfg.overlap, blend=cfg.blend,
                              batch=cfg.tile_batch)
        mask = class_argmax(logits[0], 0).to(torch.uint8).numpy()
        t1 = time.perf_counter()
        infer.append(t1 - t0)
        latency.append(t1 - decoded_at)
        rss.append((_rss_kb("VmRSS") or 0) / 1024)
        outbox.put((frame, mask, {"frame": index, "time": pts, "inference_ms": round(1000 * (t1 - t0), 2),
                                  "latency_ms": round(1000 * (t1 - decoded_at), 2)}))
        if progress and len(infer) % 10 == 0:
            log.info("%d frames, %.2f FPS", len(infer), len(infer) / (time.perf_counter() - start))
    outbox.put(_END)
    writer.join()
    decoder.join()
    wall = time.perf_counter() - start
    for err in (error, writer.error):
        if err is not None:
            writer.video_tmp.unlink(missing_ok=True)
            writer.lines_tmp.unlink(missing_ok=True)
            raise ValueError(f"stream {source} failed: {err}") from err
    writer.video_tmp.replace(out / "overlay.mp4")
    writer.lines_tmp.replace(out / "frames.jsonl")
    summary = {"source": str(source), "live": live, "run": str(run_dir), "runtime": cfg.runtime,
               "frames_decoded": counts["decoded"], "frames_segmented": len(infer),
               "frames_skipped_every": counts["decoded"] - len(infer) - counts["dropped"],
               "frames_dropped": counts["dropped"], "every": cfg.every, "seconds": wall,
               "fps": len(infer) / wall if wall else None,
               "model_fps": len(infer) / sum(infer) if infer else None,
               "inference_ms": {k: v and 1000 * v for k, v in _pct(infer).items()},
               "latency_ms": {k: v and 1000 * v for k, v in _pct(latency).items()},
               "rss_mb": {"first": rss[0] if rss else None, "last": rss[-1] if rss else None,
                          "max": max(rss) if rss else None, "quartiles": list(quartiles(rss)) if rss else None},
               "tile_size": cfg.tile_size, "overlap": cfg.overlap, "threads": torch.get_num_threads()}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("%s: %d frames segmented in %.1f s (%.2f FPS, model alone %.2f FPS), %d dropped", source, len(infer),
             wall, summary["fps"] or 0, summary["model_fps"] or 0, counts["dropped"])
    return summary
