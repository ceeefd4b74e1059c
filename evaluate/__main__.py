"""`python -m evaluate run --config FILE --models RUN [RUN ...] --shards DIR [DIR ...] --out REPORT_DIR [key=value ...]`
and `python -m evaluate study configs/study/<name>.yaml`. See docs/evaluate.md."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

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
    s = sub.add_parser("study", help="run a whole comparison from one config (synth, pretrain, finetune, evaluate)")
    s.add_argument("config", help="e.g. configs/study/quickstart.yaml")
    s.add_argument("--out", help="study folder (default: runs/study/<name>)")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the study config")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            from .config import EvalConfig
            from .run import evaluate

            cfg = load_config(EvalConfig, args.config, args.overrides)
            command = "python -m evaluate " + shlex.join(sys.argv[1:] if argv is None else argv)
            path = evaluate(cfg, args.models, args.shards, args.out, progress=not args.no_progress,
                            commands=[command])
        else:
            from .study import run_study

            path = run_study(args.config, args.out, args.overrides)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    log.info("report: %s", path)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
