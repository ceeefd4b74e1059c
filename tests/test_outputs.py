"""Output folders: a command writes into a new or empty folder or one this project wrote, never over the user's
files, and an unwritable folder fails before any work (exit 2, one line naming it)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defectforge.files import MARKER, OutputError, claim_output
from synth.importer import ImportFailed, import_folder
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def users_folder(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.yaml").write_text("my own settings\n")
    (folder / "notes.txt").write_text("keep me\n")
    return folder


def _untouched(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "notes.txt"]
    assert (folder / "config.yaml").read_text() == "my own settings\n"


def test_claim_output_accepts_new_empty_and_own_folders_and_refuses_the_users(tmp_path, users_folder):
    assert (claim_output(tmp_path / "new" / "run", "run") / MARKER).is_file()
    (tmp_path / "empty").mkdir()
    claim_output(tmp_path / "empty", "run")
    claim_output(tmp_path / "empty", "run")  # its own folder again (resume)
    (tmp_path / "killed").mkdir()  # killed while its marker was being written (found by tests/study)
    (tmp_path / "killed" / (MARKER + ".tmp")).write_text("")
    assert (claim_output(tmp_path / "killed", "shards") / MARKER).is_file()
    with pytest.raises(OutputError, match=r"holds files this project did not write \(config.yaml, notes.txt\)"):
        claim_output(users_folder, "run")
    _untouched(users_folder)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_output(tmp_path / "file", "run")


def test_an_unwritable_output_fails_before_the_work(tmp_path, caplog):
    (tmp_path / "a-file").write_text("x")  # a folder below a file cannot be made, as root too
    with pytest.raises(OutputError, match="cannot be written"):
        claim_output(tmp_path / "a-file" / "run", "run")
    code, err = _run(["pretrain", "--config", "configs/pretrain/quickstart.yaml", "--shards", str(tmp_path),
                      "--out", str(tmp_path / "a-file" / "run")])
    assert code == 2 and "cannot be written" in err and "Traceback" not in err


def _run(args: list[str]) -> tuple[int, str]:
    import subprocess

    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    return done.returncode, done.stderr


def test_training_generation_and_evaluation_refuse_a_folder_of_the_users_files(tmp_path, users_folder):
    shards = tmp_path / "shards"
    make_shards(shards, num_samples=6, image_size=64, shard_size=3, val_ratio=0.34)
    run = tmp_path / "run"  # what evaluate checks before it claims the output
    run.mkdir()
    (run / "model_config.json").write_text("{}")
    for args in (["pretrain", "--config", "configs/pretrain/quickstart.yaml", "--shards", str(shards)],
                 ["finetune", "--config", "configs/finetune/quickstart.yaml", "--shards", str(shards)],
                 ["synth", "generate", "--config", "configs/synth/quickstart.yaml"],
                 ["evaluate", "run", "--config", "configs/evaluate/default.yaml", "--models", str(run),
                  "--shards", str(shards)]):
        code, err = _run([*args, "--out", str(users_folder)])
        assert code == 2, (args, err[-2000:])
        assert f"output {users_folder} holds files this project did not write" in err, (args, err[-2000:])
        _untouched(users_folder)


def _labeled(root: Path) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(masks / f"{i}.png")
    return images, masks


def test_import_overwrite_replaces_only_its_own_folder_and_stale_partials_are_removed(tmp_path, users_folder):
    images, masks = _labeled(tmp_path / "src")
    with pytest.raises(ImportFailed, match="replaces only a folder this project wrote"):
        import_folder(images, masks, users_folder, overwrite=True)
    _untouched(users_folder)
    out = tmp_path / "ds"
    import_folder(images, masks, out)
    assert (out / MARKER).is_file()
    stale = tmp_path / "ds.partial-999999999"  # a killed import's leftover (no such process)
    stale.mkdir()
    info = import_folder(images, masks, out, overwrite=True)
    assert info["splits"]["train"]["num_samples"] == 3 and not stale.exists()
    assert json.loads((out / "_info.json").read_text())["classes"] == ["background", "defect"]


def test_key_value_overrides_after_a_list_option_are_read_as_overrides(tmp_path):
    from defectforge.cli import split_overrides

    (tmp_path / "odd=name").mkdir()  # an existing path with "=" stays a path
    paths, overrides = split_overrides(["a", "tile_size=64", str(tmp_path / "odd=name")], ["blend=linear"])
    assert paths == ["a", str(tmp_path / "odd=name")] and overrides == ["tile_size=64", "blend=linear"]
    code, err = _run(["evaluate", "run", "--config", "configs/evaluate/default.yaml", "--models",
                      str(tmp_path / "missing"), "tile_size=64", "--shards", str(tmp_path),
                      "--out", str(tmp_path / "r")])
    assert code == 2 and "is not a finetune run" in err and "tile_size=64" not in err.split("is not")[0]
    code, err = _run(["pretrain", "--config", "configs/pretrain/quickstart.yaml", "--shards", str(tmp_path / "x"),
                      "max_step=3", "--out", str(tmp_path / "p")])
    assert code == 2 and "unknown key 'max_step'" in err  # the override was read as one, not as a shard folder
