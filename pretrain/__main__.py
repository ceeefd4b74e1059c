"""`python -m pretrain --config FILE --shards DIR --out RUN [key=value ...]`, or `accelerate launch -m pretrain ...`.

See docs/pretrain.md for every key and docs/scaling.md for several GPUs and machines.
"""

import sys

from defectforge.cli import training_main

from .config import PretrainConfig


def main(argv: list[str] | None = None) -> int:
    from .train import train

    return training_main("pretrain", __doc__, PretrainConfig, train, "model=vit_small max_steps=500", argv,
                         multi_shards=True)


if __name__ == "__main__":
    sys.exit(main())
