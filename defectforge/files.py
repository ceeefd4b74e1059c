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
