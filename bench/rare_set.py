"""Build a rare multi-class "real-looking" folder to try the CPU recipe on: the stand-in for an unseen dataset.

The unseen dataset of issue 12 was grayscale photographs of 100-600 px with five defect classes covering 6 % of
the pixels, the rarest 0.02 %. This script makes a folder like it from the documented commands, so the recipe
for a user's own data (README, "Your own data") can be tried on it without looking at any real test split:

1. `python -m synth generate` (configs/synth/default.yaml): `--samples` images of 600 px on concrete, ceramic
   and metal with cracks, and fewer scratches, pits, stains and chips (1-4 defects per image, 10 % empty);
2. from each, one random crop whose width and height are drawn independently in [100, 600] px, converted to
   grayscale (`L` PNG) with its class-index mask (`PNG`, values 0..5), written as `images/` and `masks/`
   (odd sizes, the way a user's folder comes);
3. a fixed `split.json`: two thirds `train`, one third `test`;
4. `python -m synth import --split-file split.json --val-ratio 0.2`: the shards a study reads (`imported/`),
   with a `val` split carved from `train` to choose settings on.

With its defaults (seed 31 for generation, 5 for the crops; 2026-12-06) the 160 training images' pixels are
stain 6.6 %, crack 0.28 %, chip 0.11 %, pit 0.06 %, scratch 0.036 % (7.1 % defect); chip is in 8 of them, pit in 7;
128 train / 32 val / 80 test after import. (The set of docs/finetune.md's `repeat_threshold` table came from an
earlier, unsaved version of this script with other crop draws: same recipe, not the same images.)

Usage: python bench/rare_set.py [--out runs/rare] [--samples 240] [--seed 31] [--crop-seed 5]
Then, e.g.: python -m study configs/study/crackforest_cpu.yaml --out runs/study/rare \
    target.real.images=runs/rare/images target.real.masks=runs/rare/masks \
    target.real.split_file=runs/rare/split.json target.real.classes=[crack,scratch,pit,stain,chip]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from defectforge.reader import make_dataset

REPO = Path(__file__).resolve().parents[1]
DEFECTS = "defects={crack: 1.0, scratch: 0.3, pit: 0.3, stain: 0.6, chip: 0.2}"
SURFACES = "surfaces={concrete: 1.0, ceramic: 1.0, metal: 1.0}"


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = subprocess.call(cmd, cwd=REPO, env=env)
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/rare")
    p.add_argument("--samples", type=int, default=240)
    p.add_argument("--seed", type=int, default=31, help="synth generate seed")
    p.add_argument("--crop-seed", type=int, default=5, help="seed of the crop sizes and positions and the split")
    args = p.parse_args()
    out = Path(args.out).resolve()
    gen = out / "generated"
    if not (gen / "_info.json").is_file():
        run([sys.executable, "-m", "synth", "generate", "--config", "configs/synth/default.yaml", "--out", str(gen),
             "--no-progress", "workers=1", "name=rare-src", f"num_samples={args.samples}", "image_size=600",
             "shard_size=60", "val_ratio=0", f"seed={args.seed}", SURFACES, DEFECTS, "defects_per_image=[1, 4]",
             "empty_ratio=0.1"])
    classes = json.loads((gen / "_info.json").read_text())["classes"][1:]
    rng = np.random.default_rng(args.crop_seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    keys = []
    for sample in make_dataset(gen, "train", compact=True):  # uint8 image (3, H, W) and class-index mask
        key = sample["key"]
        image = Image.fromarray(sample["image"].permute(1, 2, 0).numpy()).convert("L")
        mask = sample["mask"].numpy()
        h, w = mask.shape
        cw, ch = (int(rng.integers(100, min(600, w) + 1)), int(rng.integers(100, min(600, h) + 1)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        image.crop((x, y, x + cw, y + ch)).save(out / "images" / f"{key}.png")
        Image.fromarray(mask[y:y + ch, x:x + cw].astype(np.uint8), mode="L").save(out / "masks" / f"{key}.png")
        keys.append(key)
    order = [keys[i] for i in rng.permutation(len(keys))]
    n_train = round(len(keys) * 2 / 3)
    split = {"train": sorted(order[:n_train]), "test": sorted(order[n_train:])}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    print(f"{len(keys)} crops in {out}/images and {out}/masks; split.json: {n_train} train / "
          f"{len(keys) - n_train} test; classes {classes}", flush=True)
    run([sys.executable, "-m", "synth", "import", "--images", str(out / "images"), "--masks", str(out / "masks"),
         "--split-file", str(out / "split.json"), "--classes", *classes, "--val-ratio", "0.2", "--seed", "0",
         "--name", "rare", "--out", str(out / "imported"), "--overwrite"])
    run([sys.executable, "-m", "synth", "stats", str(out / "imported")])


if __name__ == "__main__":
    main()
