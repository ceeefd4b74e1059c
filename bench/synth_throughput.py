"""Synth throughput: generate+write against encode+write of the same images, and the reader's decode rate.

One JSON line per measurement: {"bench", "value", "unit", "reference", "ratio"}. Both sides of a ratio are
measured in this run, in one process each, so the ratio means something on a shared machine:
- `generate_<size>`: images/s of `synth generate` (render + encode + write), reference: encode + write only
  of the same images already rendered in memory (the floor no generator can beat). Target at 512: ratio >= 0.5.
- `reader_<size>`: images/s of `make_dataset` (tar read + decode to tensors), reference: bare PIL decode of
  the same image and mask bytes from memory.
- `sha256_check_<size>`: images/s of the once-per-process check of a local folder against `_info.json`
  (`verify_folder`: every shard hashed), reference: the reader's images/s; a ratio well above 1 means the
  check costs a small part of one reading pass.

Usage: python bench/synth_throughput.py [--sizes 256 512 2160x3840] [--n 64] [--format jpg]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from common import emit
from PIL import Image

from defectforge.config import load_config
from defectforge.reader import make_dataset, verify_folder
from defectforge.shards import encode_sample, iter_raw_samples, read_folder_info, write_shard
from synth.compose import render_sample
from synth.config import SynthConfig
from synth.generate import generate, sample_key


def parse_size(text: str) -> list[int]:
    return [int(v) for v in text.split("x")] if "x" in text else [int(text), int(text)]


def run(size: list[int], n: int, fmt: str, workdir: Path) -> None:
    cfg = load_config(SynthConfig, None, {"image_size": size, "num_samples": n, "workers": 1, "shard_size": n,
                                          "val_ratio": 0.0, "image_format": fmt})
    label = f"{size[0]}x{size[1]}"
    rendered = [render_sample(cfg, i) for i in range(n)]

    t0 = time.perf_counter()
    write_shard(workdir / f"ref-{label}.tar", (encode_sample(sample_key(i), img, mask, meta, fmt, cfg.jpeg_quality)
                                              for i, (img, mask, meta) in enumerate(rendered)))
    encode_rate = n / (time.perf_counter() - t0)

    t0 = time.perf_counter()
    generate(cfg, workdir / f"gen-{label}", progress=False)
    gen_rate = n / (time.perf_counter() - t0)
    emit(f"generate_{label}_{fmt}", gen_rate, "img/s", encode_rate, reference_name="encode+write only",
         target=">=0.5" if label == "512x512" else None)

    raws = list(iter_raw_samples(workdir / f"ref-{label}.tar"))
    t0 = time.perf_counter()
    for raw in raws:
        np.asarray(Image.open(io.BytesIO(raw[fmt])).convert("RGB"))
        np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
    decode_rate = n / (time.perf_counter() - t0)
    folder = workdir / f"gen-{label}"
    t0 = time.perf_counter()
    verify_folder(folder, "train", read_folder_info(folder))  # hashes every shard (then cached in this process)
    check_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    count = sum(1 for _ in make_dataset(folder, "train"))
    read_rate = count / (time.perf_counter() - t0)
    emit(f"reader_{label}_{fmt}", read_rate, "img/s", decode_rate, reference_name="bare PIL decode from memory")
    emit(f"sha256_check_{label}_{fmt}", check_rate, "img/s", read_rate, reference_name="reader (make_dataset)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["256", "512", "2160x3840"])
    p.add_argument("--n", type=int, default=64, help="images per size (4K uses n // 8, at least 4)")
    p.add_argument("--format", default="jpg", choices=("jpg", "png"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for i, text in enumerate(args.sizes):
            size = parse_size(text)
            n = args.n if size[0] * size[1] <= 1024 * 1024 else max(4, args.n // 8)
            # A fresh folder per size: `generate` resumes into a folder that already holds the shards, so a
            # size given twice would otherwise time a no-op.
            workdir = Path(tmp) / str(i)
            workdir.mkdir()
            run(size, n, args.format, workdir)


if __name__ == "__main__":
    main()
