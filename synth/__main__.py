"""`python -m synth {generate,import,preview,stats,train-diffusion}`: docs/synth.md, import.md, diffusion.md."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from defectforge.config import ConfigError
from defectforge.shards import ShardError

log = logging.getLogger("synth")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m synth", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render synthetic defect images with exact masks into shards")
    g.add_argument("--config", required=True, help="YAML file, e.g. configs/synth/default.yaml")
    g.add_argument("--out", required=True, help="output shard folder (resumed if it holds a partial run)")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    g.add_argument("overrides", nargs="*", help="key=value overrides, e.g. num_samples=500 image_size=[256,512]")

    i = sub.add_parser("import", help="turn a real labeled folder of images and masks into shards")
    i.add_argument("--images", required=True, help="folder of images (jpg, png, bmp, tif, webp)")
    i.add_argument("--masks", required=True, help="folder of class-index masks, matched to images by file stem")
    i.add_argument("--out", required=True, help="output shard folder (must be new or empty, see --overwrite)")
    i.add_argument("--split-file", help="JSON mapping split name -> list of ids (file stems)")
    i.add_argument("--classes", nargs="+", default=["defect"], help="defect class names for mask values 1..K")
    i.add_argument("--name", help="dataset name (default: the images folder's parent name)")
    i.add_argument("--val-ratio", type=float, default=0.0,
                   help="share held out as 'val': of all images, or with --split-file of its 'train' split")
    i.add_argument("--seed", type=int, default=0, help="seed of the --val-ratio split")
    i.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    i.add_argument("--mask-mode", choices=("index", "binary"), default="index",
                   help="index: mask values are class indices; binary: any nonzero value is class 1")
    i.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the import succeeds")

    v = sub.add_parser("preview", help="contact sheet of samples with colored mask overlays")
    v.add_argument("folder", help="shard folder")
    v.add_argument("--out", required=True, help="PNG file to write")
    v.add_argument("--split", help="split to show (default: the first)")
    v.add_argument("--num", type=int, default=16, help="number of samples")
    v.add_argument("--seed", type=int, default=0, help="which samples to pick")

    sub.add_parser("train-diffusion", add_help=False,
                   help="train the inpainting diffusion model on shards (python -m synth train-diffusion --help)")

    s = sub.add_parser("stats", help="counts per class and split, defect areas, shard sizes")
    s.add_argument("folder", help="shard folder")
    s.add_argument("--json", help="also write the statistics as JSON to this file ('-' for stdout)")
    return p


def _generate(args: argparse.Namespace) -> None:
    from defectforge.config import load_config

    from .config import SynthConfig
    from .generate import generate

    cfg = load_config(SynthConfig, args.config, args.overrides)
    info = generate(cfg, args.out, progress=not args.no_progress)
    if info is not None:
        counts = ", ".join(f"{k}: {v['num_samples']}" for k, v in info["splits"].items())
        log.info("done: %s (%s)", args.out, counts)


def _import(args: argparse.Namespace) -> None:
    from .importer import import_folder

    info = import_folder(
        args.images, args.masks, args.out, split_file=args.split_file, classes=args.classes, name=args.name,
        val_ratio=args.val_ratio, seed=args.seed, shard_size=args.shard_size, mask_mode=args.mask_mode,
        overwrite=args.overwrite,
    )
    counts = ", ".join(f"{k}: {v['num_samples']}" for k, v in info["splits"].items())
    log.info("done: %s (%s)", args.out, counts)


def _preview(args: argparse.Namespace) -> None:
    from .preview import preview

    path = preview(args.folder, args.out, split=args.split, num=args.num, seed=args.seed)
    log.info("wrote %s", path)


def _stats(args: argparse.Namespace) -> None:
    from .preview import format_stats, stats

    result = stats(args.folder)
    if args.json == "-":
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    sys.stdout.write(format_stats(result) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train-diffusion"]:  # its own parser: the shared training command line (defectforge/cli.py)
        from .train_diffusion import main as train_diffusion

        return train_diffusion(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    handler = {"generate": _generate, "import": _import, "preview": _preview, "stats": _stats}[args.command]
    try:
        handler(args)
    except (ConfigError, ShardError, FileNotFoundError) as err:
        log.error("%s", err)
        return 2
    except ValueError as err:  # importer and input checks: the message names the file and the problem
        log.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
