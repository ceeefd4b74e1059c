"""`python -m finetune --config FILE --shards DIR --out RUN [key=value ...]`, or `accelerate launch -m finetune ...`.

See docs/finetune.md for every key; docs/scaling.md applies as for pretrain.
"""

import sys

from defectforge.cli import training_main

from .config import FinetuneConfig


def main(argv: list[str] | None = None) -> int:
    from .train import train

    return training_main("finetune", __doc__, FinetuneConfig, train,
                         "init=runs/pretrain/vit_tiny train_samples=50 freeze=2", argv)


if __name__ == "__main__":
    sys.exit(main())
