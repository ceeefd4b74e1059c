"""Run under `accelerate launch`: each rank writes the keys it read to OUT/rank-<r>.json."""

import json
import sys

import torch
from accelerate import Accelerator

from defectforge.reader import make_dataset

if __name__ == "__main__":
    folder, out, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if mode == "eval":
        ds = make_dataset(folder, "train")
    else:
        ds = make_dataset(folder, "train", resampled=True, epoch_samples=12, shuffle=8, seed=1)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = [s["key"] for s in loader]
    with open(f"{out}/rank-{acc.process_index}.json", "w") as f:
        json.dump({"keys": keys, "world": acc.num_processes}, f)
    acc.wait_for_everyone()
