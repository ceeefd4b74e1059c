"""`python -m evaluate run --config FILE --models RUN [RUN ...] --shards DIR [DIR ...] --out DIR [key=value ...]`,
`python -m evaluate represent --models RUN [RUN ...] --shards DIR [DIR ...] --out DIR [key=value ...]`,
`python -m evaluate export --model RUN --format onnx|openvino --shards DIR [--tile 512] [--dtype fp32|fp16|int8]`,
`python -m evaluate stream --model RUN SOURCE --out DIR [runtime=torch] [every=1] [key=value ...]`.
See docs/evaluate.md and docs/deploy.md. (The study runner moved to `python -m study CONFIG`.)"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from defectforge.cli import split_overrides
from defectforge.config import ConfigError, load_config
from defectforge.shards import ShardError

log = logging.getLogger("evaluate")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="evaluate fine-tuned models on shards and write the report")
    r.add_argument("--config", required=True, help="YAML file, e.g. configs/evaluate/default.yaml")
    r.add_argument("--models", nargs="+", required=True, help="finetune run folders")
    r.add_argument("--shards", nargs="+", required=True, help="shard folders (their test, val or last split)")
    r.add_argument("--out", required=True, help="report folder")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument("overrides", nargs="*", help="key=value, e.g. tile_size=512 overlap=0.1 blend=gaussian")
    v = sub.add_parser("represent", help="how the models see: CKA, attention distance, rollout, the probe")
    v.add_argument("--config", help="optional YAML file of represent keys (docs/evaluate.md)")
    v.add_argument("--models", nargs="+", required=True, help="finetune or pretrain run folders")
    v.add_argument("--shards", nargs="+", required=True, help="shard folders (their test, val or last split)")
    v.add_argument("--out", required=True, help="output folder")
    v.add_argument("overrides", nargs="*", help="key=value, e.g. crop=224 max_images=64 rollout_fusion=max")
    e = sub.add_parser("export", help="export a finetune run to ONNX or OpenVINO, with a parity check")
    e.add_argument("--model", required=True, help="finetune run folder")
    e.add_argument("--format", required=True, choices=["onnx", "openvino"])
    e.add_argument("--shards", required=True, help="shard folder: parity on its test/val tiles, int8 calibration "
                   "on its train tiles")
    e.add_argument("--tile", type=int, default=512, help="tile size the model is exported for (fixed)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    e.add_argument("--parity-tiles", type=int, default=16)
    e.add_argument("--calibration-tiles", type=int, default=32)
    w = sub.add_parser("stream", help="segment a video file, camera URL or folder of frames; overlay video, "
                       "one JSON line per frame, FPS summary")
    w.add_argument("--model", required=True, help="finetune run folder")
    w.add_argument("--out", required=True, help="output folder")
    w.add_argument("--no-progress", action="store_true")
    w.add_argument("source", help="video file, rtsp:// or http:// URL, or folder of frames")
    w.add_argument("overrides", nargs="*", help="key=value, e.g. runtime=onnxruntime every=2 tile_size=512")
    s = sub.add_parser("study", help="moved: use `python -m study CONFIG [--out DIR] [key=value ...]`")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "stream" or any(e.startswith("-") or "=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:  # stream: key=value after --out (argparse takes positionals only up to the first option)
        args.overrides = [*args.overrides, *extra]
    if args.command == "study":  # the study runner drives every stage, so it lives downstream of evaluate
        log.error("`python -m evaluate study` moved to `python -m study CONFIG [--out DIR] [key=value ...]`, e.g. "
                  "python -m study %s", shlex.join(args.rest) or "configs/study/quickstart.yaml")
        return 2
    if args.command == "export":
        return _export(args)
    if args.command == "stream":
        return _stream(args)
    args.models, overrides = split_overrides(args.models, args.overrides)
    args.shards, args.overrides = split_overrides(args.shards, overrides)
    command = "python -m evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "represent":
            from .represent_report import run_represent
            from .represent_run import RepresentConfig

            path = run_represent(load_config(RepresentConfig, args.config, args.overrides), args.models,
                                 args.shards, args.out, commands=[command])
            log.info("report: %s", path)
            print(f"report: {path}")
            return 0
        from .config import EvalConfig
        from .run import evaluate

        cfg = load_config(EvalConfig, args.config, args.overrides)
        path = evaluate(cfg, args.models, args.shards, args.out, progress=not args.no_progress, commands=[command])
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info("report: %s", path)
    print(f"report: {path}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    try:
        from .stream import StreamConfig, stream

        cfg = load_config(StreamConfig, None, args.overrides)
        summary = stream(args.model, args.source, args.out, cfg, progress=not args.no_progress)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(f"stream: {summary['frames_segmented']} frames, {summary['fps']:.2f} FPS -> {args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    try:
        from .export import export_model

        folder = export_model(args.model, args.format, shards=args.shards, tile=args.tile, dtype=args.dtype,
                              parity_tiles=args.parity_tiles, calibration_tiles=args.calibration_tiles)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    print(f"exported: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
