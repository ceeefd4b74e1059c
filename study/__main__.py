"""`python -m study CONFIG [--out DIR] [key=value ...]`: run a whole comparison (synth, pretrain, finetune,
evaluate) from one study config, e.g. configs/study/quickstart.yaml. See docs/evaluate.md."""

from __future__ import annotations

import argparse
import logging
import sys

from defectforge.config import ConfigError
from defectforge.shards import ShardError

log = logging.getLogger("study")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m study", description=__doc__.splitlines()[0])
    p.add_argument("config", help="e.g. configs/study/quickstart.yaml")
    p.add_argument("--out", help="study folder (default: runs/study/<name>)")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the study config, e.g. seeds=[0,1]")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_intermixed_args(argv)  # overrides may follow --out
    from .parallel import JobFailed
    from .runner import run_study, summary, time_summary

    try:
        path = run_study(args.config, args.out, args.overrides)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    except JobFailed as err:  # a run trained in its own process (`parallel`): its error is at the end of its log
        log.error("%s", err)
        return 1
    for line in summary(path) + time_summary(path.parent.parent):
        print(line)
    log.info("report: %s", path)
    print(f"report: {path}")  # the one line a user looks for at the end; stdout for scripts
    return 0


if __name__ == "__main__":
    sys.exit(main())
