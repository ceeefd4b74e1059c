"""`evaluate represent` on two models (ViT-Tiny + DPT, ResNet-18 U-Net; random weights) and 64 procedural
images, against the bare encoder forward passes over the same crops in the same minibatches.

One JSON line per measurement, {"bench", "value", "unit", "reference", "ratio", ...}:
- `represent_2models_<n>img`: seconds of `represent_images` (load both runs, crop, every measure: CKA, attention
  distance, rollout and class attention scored, Grad-CAM, receptive fields, the probe); reference: the two
  encoders' plain forward passes over the same crops (the floor any layer-wise analysis pays).
- `gradcam_per_image`: seconds of the hand-written Grad-CAM (evaluate/interpret.py) on one crop, against
  pytorch-grad-cam's GradCAM on the same layer and target (only when `pytorch_grad_cam` imports; the maps are
  compared too: "max_abs_diff" of the min-max-normalised maps; the untrained head's sign is flipped so that the
  map is not 0 everywhere).
"cpu" is lscpu's model name.

Usage: python bench/represent.py [--images 64] [--crop 224] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import emit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's packages, not another installed one

from defectforge.config import load_config  # noqa: E402
from evaluate.interpret import gradcam_map  # noqa: E402
from evaluate.represent_report import represent_images  # noqa: E402
from evaluate.represent_run import RepresentConfig, layer_maps, load_subject, square_crops  # noqa: E402
from finetune.config import FinetuneConfig  # noqa: E402
from pretrain.segmenter import build_segmenter, save_segmenter  # noqa: E402
from synth.compose import SynthConfig, render_sample  # noqa: E402


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def make_runs(root: Path, classes: list[str], crop: int) -> list[str]:
    torch.manual_seed(0)
    runs = []
    for name, over in (("vit_tiny-dpt", {"model": "vit_tiny"}), ("resnet18-unet", {"model": "resnet18",
                                                                                   "architecture": "Unet"})):
        model, mcfg = build_segmenter(load_config(FinetuneConfig, None, {"crop_size": crop, **over}), classes)
        save_segmenter(model, root / name, mcfg)
        runs.append(str(root / name))
    return runs


def make_images(n: int, side: int) -> tuple[list[dict], list[str]]:
    cfg = load_config(SynthConfig, None, {"image_size": side, "seed": 0})
    images = []
    for i in range(n):
        image, mask, _ = render_sample(cfg, i)
        images.append({"key": f"{i:04d}", "image": torch.from_numpy(image).permute(2, 0, 1).float() / 255,
                       "mask": torch.from_numpy(mask).long()})
    return images, list(cfg.classes)


def bare_forward(runs: list[str], crops: list[dict], batch: int) -> float:
    subjects = [load_subject(r, torch.device("cpu")) for r in runs]
    start = time.perf_counter()
    with torch.no_grad():
        for s in subjects:
            for i in range(0, len(crops), batch):
                x = (torch.stack([c["image"] for c in crops[i:i + batch]]) - s.mean) / s.std
                layer_maps(s, x)
    return time.perf_counter() - start


def gradcam_comparison(cnn_run: str, side: int, repeats: int) -> None:
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError:
        print('{"bench": "gradcam_per_image", "skipped": "pytorch_grad_cam is not installed"}', flush=True)
        return
    s = load_subject(cnn_run, torch.device("cpu"))
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    model = s.segmenter
    with torch.no_grad():  # untrained, "defect rather than background" lowers every feature: the map would be 0
        model.net.segmentation_head[0].weight.mul_(-1)
        model.net.segmentation_head[0].bias.mul_(-1)

    class Target:
        def __call__(self, out):
            return (out[1:].logsumexp(0) - out[0]).mean()

    cam = GradCAM(model=model, target_layers=[model.net.encoder.model.layer4])
    calls = {"ours": lambda: gradcam_map(model, x), "theirs": lambda: cam(input_tensor=x, targets=[Target()])}
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    for _ in range(repeats + 1):  # in alternation (the machine is shared); the first round is a warm-up
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    ours, theirs = (statistics.median(times[n][1:]) for n in ("ours", "theirs"))
    a, b = gradcam_map(model, x).numpy(), cam(input_tensor=x, targets=[Target()])[0]
    peak = float(a.max())
    a = (a - a.min()) / max(a.max() - a.min(), 1e-7)
    emit("gradcam_per_image", ours, "s", theirs, reference_name="pytorch-grad-cam GradCAM, same layer and target",
         side=side, max_abs_diff=round(float(abs(a - b).max()), 6), map_max=round(peak, 6), cpu=cpu_model())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--parts", nargs="+", default=["represent", "gradcam"], choices=["represent", "gradcam"])
    args = p.parse_args()
    images, classes = make_images(args.images, args.crop)
    cfg = RepresentConfig(crop=args.crop, max_images=None, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        runs = make_runs(Path(tmp), classes, args.crop)
        if "represent" in args.parts:
            crops = square_crops(images, args.crop)
            reference = min(bare_forward(runs, crops, cfg.batch_size) for _ in range(args.repeats))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                represent_images(cfg, runs, images)
                times.append(time.perf_counter() - start)
            emit(f"represent_2models_{args.images}img", min(times), "s", reference,
                 reference_name="the two encoders' bare forward passes over the same crops", crop=args.crop,
                 models=[Path(r).name for r in runs], threads=torch.get_num_threads(), cpu=cpu_model())
        if "gradcam" in args.parts:
            gradcam_comparison(runs[1], args.crop, max(5, args.repeats))


if __name__ == "__main__":
    main()
