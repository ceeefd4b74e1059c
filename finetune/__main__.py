"""`python -m finetune --config FILE --shards DIR --out RUN [key=value ...]`, or `accelerate launch -m finetune ...`.

See docs/finetune.md for every key; docs/scaling.md applies as for pretrain.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from synth.config import ConfigError, load_config
from synth.shards import ShardError

log = logging.getLogger("finetune")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/finetune/vit_tiny.yaml")
    p.add_argument("--shards", required=True, help="shard folder, _info.json location (local, https://, pipe:)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, model.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. init=runs/pretrain/vit_tiny train_samples=50 freeze=2")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from pretrain.loop import NonFiniteLoss

    from .config import FinetuneConfig
    from .train import train

    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
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
