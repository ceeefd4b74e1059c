"""defectforge synth stage: procedural and diffusion defect images with exact masks, into WebDataset shards."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("defectforge")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
