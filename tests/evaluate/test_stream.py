"""`python -m evaluate stream`: a short generated clip, a folder of frames, bad and unreachable sources."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from defectforge.config import load_config
from evaluate.__main__ import main
from finetune.config import FinetuneConfig
from pretrain.segmenter import build_segmenter, save_segmenter

FRAMES = 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(FinetuneConfig, None, {"crop_size": 64, "model": "resnet18", "architecture": "Unet"})
    model, mcfg = build_segmenter(cfg, ["background", "crack", "pit"])
    folder = tmp_path_factory.mktemp("stream-run") / "unet"
    save_segmenter(model.eval(), folder, mcfg)
    return folder


def _frames(n: int = FRAMES, h: int = 64, w: int = 96) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    av = pytest.importorskip("av", reason="the deploy extra (av) is not installed")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for frame in _frames():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def _check(out: Path, frames: int) -> dict:
    av = pytest.importorskip("av")
    lines = [json.loads(line) for line in (out / "frames.jsonl").read_text().splitlines()]
    assert len(lines) == frames
    assert set(lines[0]) >= {"frame", "time", "defect_area_px", "defects", "latency_ms", "inference_ms"}
    assert set(lines[0]["defect_area_px"]) == {"crack", "pit"}
    for line in lines:
        for d in line["defects"]:
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 64 and d["area"] >= 1
    with av.open(str(out / "overlay.mp4")) as container:
        decoded = list(container.decode(video=0))
    assert len(decoded) == frames and (decoded[0].width, decoded[0].height) == (96, 64)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames_segmented"] == frames and summary["fps"] > 0 and summary["frames_dropped"] == 0
    assert summary["latency_ms"]["p50"] > 0 and not list(out.glob("*.tmp"))
    return summary


def test_stream_of_a_video_writes_the_overlay_and_one_json_line_per_frame(run, clip, tmp_path):
    assert main(["stream", "--model", str(run), str(clip), "--out", str(tmp_path / "s"), "tile_size=64",
                 "overlap=0.25", "--no-progress"]) == 0
    summary = _check(tmp_path / "s", FRAMES)
    assert summary["frames_decoded"] == FRAMES
    assert main(["stream", "--model", str(run), str(clip), "--out", str(tmp_path / "e"), "tile_size=64",
                 "every=2", "--no-progress"]) == 0
    summary = _check(tmp_path / "e", FRAMES // 2)
    assert summary["frames_skipped_every"] == FRAMES // 2


def test_stream_of_a_frame_folder(run, tmp_path):
    pytest.importorskip("av", reason="the deploy extra (av) is not installed")
    from PIL import Image

    frames = tmp_path / "frames"
    frames.mkdir()
    for i, frame in enumerate(_frames(4)):
        Image.fromarray(frame).save(frames / f"{i:04d}.png")
    assert main(["stream", "--model", str(run), str(frames), "--out", str(tmp_path / "s"), "tile_size=64",
                 "--no-progress"]) == 0
    _check(tmp_path / "s", 4)


def test_bad_or_unreachable_sources_fail_naming_them(run, tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    missing = tmp_path / "nothing.mp4"
    assert main(["stream", "--model", str(run), str(missing), "--out", str(tmp_path / "a")]) == 2
    assert f"source {missing} does not exist" in caplog.text and not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    assert main(["stream", "--model", str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "b")]) == 2
    assert "holds no image" in caplog.text
    pytest.importorskip("av", reason="the deploy extra (av) is not installed")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all" * 100)
    assert main(["stream", "--model", str(run), str(broken), "--out", str(tmp_path / "c")]) == 2
    assert f"cannot decode video {broken}" in caplog.text
    assert main(["stream", "--model", str(run), "rtsp://127.0.0.1:9/cam", "--out", str(tmp_path / "d")]) == 2
    assert "cannot open camera stream rtsp://127.0.0.1:9/cam" in caplog.text
    assert main(["stream", "--model", str(run), str(broken), "--out", str(tmp_path / "c"), "every=0"]) == 2
    assert "key 'every'" in caplog.text
