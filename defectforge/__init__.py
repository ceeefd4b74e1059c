"""defectforge's shared layer: what two or more stages use (config loading, the shard format and reader, the
training loaders and augmentation, the Accelerate training loop, tracking, the command line, the version).

It imports no stage; every stage imports it (tests/test_layout.py checks the direction).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("defectforge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
