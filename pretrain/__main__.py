"""`python -m pretrain --config FILE --shards DIR --out RUN [key=value ...]`, or `accelerate launch -m pretrain ...`.

See docs/pretrain.md for every key and docs/scaling.md for several GPUs and machines.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from synth.config import ConfigError, load_config
from synth.shards import ShardError

log = logging.getLogger("pretrain")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/pretrain/vit_tiny.yaml")
    p.add_argument("--shards", required=True, help="shard folder, _info.json location (local, https://, pipe:)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, model.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=vit_small max_steps=500")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from .config import PretrainConfig
    from .train import NonFiniteLoss, train

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        summary = train(cfg, args.shards, args.out, progress=not args.no_progress)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", err)
        return 2
    except NonFiniteLoss as err:
        log.error("%s", err)
        return 3
    log.info("done: %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
