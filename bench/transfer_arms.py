"""Which use of synthetic data transfers to a real segmentation target: the arms of issue 12, arm by arm.

Every step is one of the documented commands (`synth import`, `synth generate`, `pretrain`, `finetune`,
`evaluate run`), so a user can repeat any arm by hand. On a real folder of images and masks with a fixed
train/test split (default: ../shared/data/crackforest), a validation split is carved from the training images
(`--val-ratio`); every arm fine-tunes the same network with the same recipe on the remaining training images,
and is scored on that validation split (what a choice may be based on) and on the test split (reported only).

Arms (ViT-Tiny + DPT and ResNet-18 U-Net unless `--models`; `mae*` are ViT-only, a CNN has no MAE here):
- `scratch`: random initialisation.
- `cls`: classification pretraining (multi-label + dense head, backbone kept) on procedural shards.
- `seg_proc`: segmentation pretraining (encoder + decoder + head, loaded whole) on procedural shards.
- `seg_own`: segmentation pretraining on synthetic defects drawn onto crops of the target's own training images
  (`synth generate labeled_dir=...`, their real labels kept).
- `cotrain`: no pretraining; the own-surface shards mixed into each fine-tuning batch (`synthetic_shards`).
- `mae`: masked-image modelling on the target's training images (their masks unused).
- `mae_seg`: `mae`, then segmentation pretraining on the own-surface shards from its encoder.
One pretraining per (model, arm), shared by the fine-tuning seeds (the spread over seeds is the fine-tuning's).
The time of an arm is its pretraining (MAE's included for `mae_seg`) plus one fine-tuning, as measured here:
wall seconds of each command with `--jobs` commands sharing the machine.

Out: `--out`/arms.json (every run: val and test IoU of each class and defect mIoU, seconds of pretraining and
fine-tuning) and arms.md (the table: mean and spread over seeds). Steps whose output exists are not re-run, so
an interrupted run continues. `--jobs 2` runs two commands at a time, each on `--threads` threads.

Usage: python bench/transfer_arms.py [--data ../shared/data/crackforest] [--out runs/arms] [--seeds 0 1 2]
       [--models vit_tiny resnet18] [--arms scratch cls ...] [--jobs 2 --threads 1] [--steps 300]
       [--class-weights auto] [--crops resized|own]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("scratch", "cls", "seg_proc", "seg_own", "cotrain", "mae", "mae_seg")
PRETRAINED_ARMS = {"cls": "procedural", "seg_proc": "procedural", "seg_own": "own", "mae": "real", "mae_seg": "own"}
CNN_ARMS = ("scratch", "cls", "seg_proc", "seg_own", "cotrain")
MODELS = {"vit_tiny": [], "resnet18": ["model=resnet18", "architecture=Unet"]}
# the synthetic data of crackforest_cpu.yaml (mostly cracks on concrete and asphalt)
DEFECTS = "defects={crack: 1.0, scratch: 0.5, pit: 0.3, stain: 0.3, chip: 0.2}"
SURFACES = "surfaces={concrete: 1.0, asphalt: 2.0, ceramic: 0.5, metal: 0.5}"
# `--crops`: "resized", the crops the arms table was measured with (random resized crops in pretraining and
# fine-tuning, half of the fine-tuning crops on a defect); "own", the quickstart configs' crops at the images' own
# scale, 0.8 on a defect (docs/finetune.md, "The quickstart recipe")
CROPS = {"resized": {"pretrain": ["resized_crop=true"], "finetune": ["resized_crop=true", "defect_crop=0.5"]},
         "own": {"pretrain": ["resized_crop=false"], "finetune": ["resized_crop=false", "defect_crop=0.8"]}}


def run(cmd: list[str], log: Path, threads: int) -> float:
    """Run one command (log to `log`), return its wall seconds; stop the whole benchmark if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    if code:
        sys.exit(f"failed ({code}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - start


class Arms:
    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out).resolve()
        self.py = sys.executable
        self.times_file = self.out / "seconds.json"
        self.times = json.loads(self.times_file.read_text()) if self.times_file.is_file() else {}
        (self.out / "logs").mkdir(parents=True, exist_ok=True)

    def step(self, key: str, cmd: list[str], done: Path) -> None:
        if done.exists() and key in self.times:
            return
        seconds = run(cmd, self.out / "logs" / f"{key}.log", self.args.threads)
        self.times[key] = round(seconds, 1)
        self.times_file.write_text(json.dumps(self.times, indent=1))

    def parallel(self, jobs: list[tuple[str, list[str], Path]]) -> None:
        with ThreadPoolExecutor(self.args.jobs) as pool:
            list(pool.map(lambda j: self.step(*j), jobs))

    # data
    def data(self) -> None:
        d, out, s = Path(self.args.data).resolve(), self.out / "data", str(self.args.synth_samples)
        real = out / "real"
        self.step("data_real", [self.py, "-m", "synth", "import", "--images", str(d / "images"), "--masks",
                                str(d / "masks"), "--split-file", str(d / "split.json"), "--classes",
                                *self.args.classes, "--val-ratio", str(self.args.val_ratio), "--seed", "0",
                                "--out", str(real), "--overwrite"], real / "_info.json")
        common = ["--config", "configs/synth/default.yaml", "--no-progress", f"num_samples={s}", "image_size=160",
                  "shard_size=64", "val_ratio=0.1", DEFECTS]
        extra = {"procedural": [SURFACES], "own": [f"labeled_dir={real}", "labeled_ratio=1.0"]}
        needed = {PRETRAINED_ARMS.get(a) for a in self.args.arms} | ({"own"} if "cotrain" in self.args.arms else set())
        self.parallel([(f"data_{source}", [self.py, "-m", "synth", "generate", "--out", str(out / source), *common,
                                           f"name=arms-{source}", *args], out / source / "_info.json")
                       for source, args in extra.items() if source in needed])

    # pretraining
    def pretrain_cmd(self, model: str, arm: str) -> tuple[str, list[str], Path]:
        folder = self.out / "pretrain" / f"{model}-{arm}"
        data = self.out / "data" / PRETRAINED_ARMS[arm]
        objective = {"cls": "classification", "mae": "mae"}.get(arm, "segmentation")
        extra = [f"weights={self.out / 'pretrain' / f'{model}-mae'}"] if arm == "mae_seg" else []
        cmd = [self.py, "-m", "pretrain", "--config", "configs/pretrain/quickstart.yaml", "--shards", str(data),
               "--out", str(folder), "--no-progress", f"objective={objective}", *MODELS[model],
               f"max_steps={self.args.pretrain_steps}", "val_every=200", "checkpoint_every=200",
               *CROPS[self.args.crops]["pretrain"], *extra]
        return f"pretrain_{model}-{arm}", cmd, folder / "model.safetensors"

    def arms_of(self, model: str) -> list[str]:
        return [a for a in self.args.arms if model == "vit_tiny" or a in CNN_ARMS]

    def pretrain(self) -> None:
        """Every pretraining but MAE -> segmentation (MAE first, so that one can start early)."""
        first = [self.pretrain_cmd(m, a) for m in self.args.models for a in self.arms_of(m)
                 if a in PRETRAINED_ARMS and a != "mae_seg"]
        self.parallel(sorted(first, key=lambda j: "mae" not in j[0]))

    # fine-tuning
    def finetune(self) -> list[tuple[str, str, int, Path]]:
        """MAE -> segmentation pretraining alongside the other arms' fine-tunings, then its own fine-tunings."""
        jobs, runs = [self.pretrain_cmd(m, "mae_seg") for m in self.args.models if "mae_seg" in self.arms_of(m)], []
        for seed in self.args.seeds:
            for m in self.args.models:
                for a in self.arms_of(m):
                    folder = self.out / "finetune" / f"{m}-{a}-s{seed}"
                    extra = []
                    if a in PRETRAINED_ARMS:
                        extra.append(f"init={self.out / 'pretrain' / f'{m}-{a}'}")
                    if a == "cotrain":
                        extra += [f"synthetic_shards={self.out / 'data' / 'own'}", "synthetic_ratio=0.25"]
                    cmd = [self.py, "-m", "finetune", "--config", "configs/finetune/quickstart.yaml", "--shards",
                           str(self.out / "data" / "real"), "--out", str(folder), "--no-progress", *MODELS[m],
                           f"crop_size={self.args.crop}", f"max_steps={self.args.steps}", f"seed={seed}",
                           f"val_every={self.args.steps}", f"checkpoint_every={self.args.steps}",
                           f"class_weights={self.args.class_weights}", *CROPS[self.args.crops]["finetune"], *extra]
                    jobs.append((f"finetune_{m}-{a}-s{seed}", cmd, folder / "model_config.json"))
                    runs.append((m, a, seed, folder))
        self.parallel([j for j in jobs if "-mae_seg-" not in j[0]])
        self.parallel([j for j in jobs if "-mae_seg-" in j[0]])
        return runs

    def evaluate(self, runs: list[tuple[str, str, int, Path]]) -> dict:
        scores, jobs, tag = {}, [], "-".join(str(s) for s in self.args.seeds)  # other seeds: another report
        for split in ("val", "test"):
            report = self.out / f"eval_{split}_seeds{tag}"
            jobs.append((f"evaluate_{split}_seeds{tag}", [
                self.py, "-m", "evaluate", "run", "--config", "configs/evaluate/default.yaml", "--models",
                *[str(r[3]) for r in runs], "--shards", str(self.out / "data" / "real"), "--out", str(report),
                "--no-progress", f"split={split}", "interpret_images=0", "overlays=0", "repeats=1", "warmup=0",
                "speed_size=[256,256]", "wandb=false"], report / "results.json"))
        self.parallel(jobs)
        for split in ("val", "test"):
            results = json.loads((self.out / f"eval_{split}_seeds{tag}" / "results.json").read_text())["results"]
            by_run = {Path(r["run"]).resolve(): r["metrics"] for r in results}
            for m, a, seed, folder in runs:
                met = by_run[folder.resolve()]
                scores.setdefault((m, a, seed), {})[split] = {
                    "defect_mIoU": met["defect_mIoU"],
                    **{c: v["IoU"] for c, v in met["per_class"].items() if c != "background"}}
        return scores

    def table(self, runs, scores: dict) -> None:
        rows, records = [], []
        for m in self.args.models:
            for a in self.arms_of(m):
                seeds = [s for mm, aa, s, _ in runs if (mm, aa) == (m, a)]
                val = [scores[(m, a, s)]["val"]["defect_mIoU"] for s in seeds]
                test = [scores[(m, a, s)]["test"]["defect_mIoU"] for s in seeds]
                pre = self.times.get(f"pretrain_{m}-{a}", 0.0) + (
                    self.times.get(f"pretrain_{m}-mae", 0.0) if a == "mae_seg" else 0.0)
                ft = min(self.times[f"finetune_{m}-{a}-s{s}"] for s in seeds)  # the least disturbed seed
                records.append({"model": m, "arm": a, "seeds": seeds, "val": val, "test": test,
                                "pretrain_s": pre, "finetune_s": round(ft, 1),
                                "per_seed": {s: scores[(m, a, s)] for s in seeds}})
                rows.append(f"| {m} | {a} | {statistics.mean(val):.3f} ± {sd(val):.3f} | "
                            f"{statistics.mean(test):.3f} ± {sd(test):.3f} | {min(test):.3f}-{max(test):.3f} | "
                            f"{pre / 60:.1f} | {ft / 60:.1f} |")
        (self.out / "arms.json").write_text(json.dumps(records, indent=1))
        head = ("| model | arm | val defect mIoU (mean ± sd) | test defect mIoU (mean ± sd) | test min-max | "
                "pretraining min | fine-tuning min (fastest seed) |\n|---|---|---|---|---|---|---|")
        text = head + "\n" + "\n".join(rows) + "\n"
        (self.out / "arms.md").write_text(text)
        print(text)


def sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared/data/crackforest"),
                   help="folder with images/, masks/, split.json (train/test)")
    p.add_argument("--classes", nargs="+", default=["crack"])
    p.add_argument("--out", default="runs/arms")
    p.add_argument("--val-ratio", type=float, default=0.2, help="share of the training images held out as val")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (the arms table: 300; "
                   "crackforest_cpu.yaml: 600)")
    p.add_argument("--crops", default="resized", choices=list(CROPS),
                   help="resized: random resized crops, half on a defect (the arms table); own: crops at the images' "
                        "own scale, 0.8 on a defect (the quickstart configs and crackforest_cpu.yaml since "
                        "2026-12-06)")
    p.add_argument("--crop", type=int, default=192, help="fine-tuning crop (crackforest_cpu.yaml: 192)")
    p.add_argument("--class-weights", default="auto", choices=["auto", "null"],
                   help="fine-tuning class_weights: the arms table was measured with auto (the quickstart default "
                        "until 2026-12-05; crackforest_cpu.yaml now uses null, chosen afterwards on val)")
    p.add_argument("--pretrain-steps", type=int, default=400, help="crackforest_cpu.yaml: 400")
    p.add_argument("--synth-samples", type=int, default=640, help="crackforest_cpu.yaml: 640")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    arms = Arms(args)
    arms.data()
    arms.pretrain()
    runs = arms.finetune()
    arms.table(runs, arms.evaluate(runs))


if __name__ == "__main__":
    main()
