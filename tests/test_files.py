"""write_atomic: a file is replaced whole or left as it was, and no temporary file stays behind."""

from pathlib import Path

import pytest

from defectforge.files import write_atomic


def test_write_atomic_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    assert write_atomic(path, "{}\n") == path and path.read_text() == "{}\n"
    write_atomic(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["a.json"]

    def interrupted(self, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new")
    assert path.read_bytes() == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
