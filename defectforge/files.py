"""Files written whole or not at all: a reader (or a resumed run) never finds half a file under a final name."""

from __future__ import annotations

from pathlib import Path

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `<path>.tmp` and rename it to `path` (atomic in one folder); on an error the temporary
    file is removed and `path` is left as it was. `str` is written as UTF-8."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


MARKER = ".defectforge"  # in every output folder this project writes: the folders it may write into again
# what an output folder of an earlier version held (written before the marker existed), per kind
_LEGACY = {"run": ("config.yaml", "metrics.jsonl"), "shards": ("_info.json",), "report": ("results.json",),
           "study": ("study.json",)}


class OutputError(ValueError):
    """An output folder that this project may not write into (not its own, or not writable)."""


def is_own_output(folder: Path) -> bool:
    """`folder` was written by this project: it holds the marker (or an earlier version's output files)."""
    if (folder / MARKER).is_file() or (folder / (MARKER + TMP_SUFFIX)).is_file():  # or killed while claiming it
        return True
    return any(all((folder / name).exists() for name in names) for names in _LEGACY.values())


def claim_output(folder: str | Path, kind: str) -> Path:
    """Make `folder` an output folder of this project before any work starts, or refuse.

    A command may write into a new or empty folder, or into one this project wrote itself (to resume or
    complete it), and nowhere else: a folder of the user's own files is refused with its name and a few of
    its entries, so nothing of theirs is overwritten. An unwritable folder is refused here, not after the work.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output {folder} is a file, expected a folder (new, empty, or one this project wrote)")
    if folder.is_dir() and any(folder.iterdir()) and not is_own_output(folder):
        entries = sorted(p.name for p in folder.iterdir())
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise OutputError(f"output {folder} holds files this project did not write ({shown}); choose a new or "
                          "empty folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / MARKER).is_file():
            write_atomic(folder / MARKER, f"{kind}: written by defectforge; safe to delete with its folder\n")
    except OSError as err:
        raise OutputError(f"output {folder} cannot be written: {err.strerror or err}") from None
    return folder
