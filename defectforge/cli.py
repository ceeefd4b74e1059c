"""The command line of the training commands (`python -m pretrain`, `python -m finetune`,
`python -m synth train-diffusion`): one config, shards, a run folder."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

from defectforge.config import ConfigError, load_config
from defectforge.shards import ShardError

from .loop import NonFiniteLoss


def split_overrides(values: list[str], overrides: list[str]) -> tuple[list[str], list[str]]:
    """`key=value` tokens that argparse put into a list option (`--shards A tile_size=64`: nargs="+" takes
    every following word) moved to the overrides; a token that is an existing path stays a path."""
    paths = [v for v in values if "=" not in v or Path(v).exists()]
    moved = [v for v in values if v not in paths]
    return paths, [*moved, *overrides]


def one_line(err: Exception) -> str:
    """The message of `err`; for an error re-raised from a DataLoader worker (whose message is the worker's whole
    traceback), the original error's last line, e.g. "ShardError: sample '00000003' of .../train-000000.tar: ..."."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else text
    return text


def training_main(stage: str, doc: str, schema: type, train: Callable, example: str,
                  argv: list[str] | None = None, *, config_example: str | None = None,
                  multi_shards: bool = False) -> int:
    """Parse `--config --shards --out [key=value ...]`, validate, train; exit 2 on bad input, 3 on a NaN loss.

    `multi_shards=True` takes one or more `--shards` folders and passes `train` the list.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger(stage)
    p = argparse.ArgumentParser(prog=f"python -m {stage}", description=doc.splitlines()[0])
    example_config = config_example or f"configs/{stage}/vit_tiny.yaml"
    p.add_argument("--config", required=True, help=f"YAML file, e.g. {example_config}")
    p.add_argument("--shards", required=True, nargs="+" if multi_shards else None,
                   help="shard folder, _info.json location (local, https://, pipe:)"
                        + (" (one or more)" if multi_shards else ""))
    p.add_argument("--out", required=True, help="run folder (checkpoints, metrics.jsonl, model.safetensors)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", help=f"key=value overrides, e.g. {example}")
    args = p.parse_args(argv)
    if multi_shards:
        args.shards, args.overrides = split_overrides(args.shards, args.overrides)
    try:
        cfg = load_config(schema, args.config, args.overrides)
        shards = args.shards[0] if multi_shards and len(args.shards) == 1 else args.shards
        summary = train(cfg, shards, args.out, progress=not args.no_progress)
    except (ConfigError, ShardError, FileNotFoundError, ValueError) as err:
        log.error("%s", one_line(err))
        return 2
    except NonFiniteLoss as err:
        log.error("%s", err)
        return 3
    log.info("done: %s", json.dumps(summary))
    return 0
