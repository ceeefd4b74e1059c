"""Damaged or missing shards through the commands: refused by name, or (allow_damaged=true) left out and counted
in run_info.json, metrics.jsonl, results.json and the report's data line (docs/reliability.md)."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from defectforge import reader
from evaluate.__main__ import main as evaluate_main
from finetune.__main__ import main as finetune_main
from tests.synth.helpers import make_shards

REPO = Path(__file__).resolve().parents[1]
FAST = ["crop_size=64", "batch_size=2", "max_steps=2", "warmup_steps=1", "val_every=2", "checkpoint_every=2",
        "num_workers=0", "wandb=false", "model=resnet18", "architecture=Unet", "val_images=1"]


@pytest.fixture(autouse=True)
def fresh_policy():
    yield
    reader.allow_damaged(False)
    reader._DAMAGE.clear()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("damaged") / "ds"
    make_shards(out, num_samples=12, image_size=64, shard_size=3, val_ratio=0.25)  # train 3 shards, val 1
    return out


def test_finetune_and_evaluate_refuse_or_count_a_missing_shard(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    (bad / "train-000001.tar").unlink()
    args = ["--config", str(REPO / "configs/finetune/quickstart.yaml"), "--shards", str(bad), "--no-progress"]
    assert finetune_main([*args, "--out", str(tmp_path / "strict"), *FAST]) == 2
    assert "shard train-000001.tar is missing" in caplog.text and "allow_damaged=true" in caplog.text
    assert not (tmp_path / "strict" / "checkpoints").exists()  # refused before any training step

    run = tmp_path / "allowed"
    assert finetune_main([*args, "--out", str(run), *FAST, "allow_damaged=true"]) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["data_damage"]["skipped_samples"] == 3
    assert any("train-000001.tar is missing" in p for p in info["data_damage"]["problems"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped_samples") == 3 for r in records)

    # the evaluation data damaged too: a flipped byte in the val shard
    val = bad / "val-000000.tar"
    data = bytearray(val.read_bytes())
    data[len(data) // 2] ^= 0xFF
    val.write_bytes(bytes(data))
    caplog.clear()
    overrides = ["tile_size=64", "speed_size=[64,64]", "repeats=2", "warmup=0", "wandb=false", "interpret_images=0"]

    def evaluate_cli(out: str, *locations: Path, allow: bool = False) -> int:
        return evaluate_main(["run", "--config", str(REPO / "configs/evaluate/default.yaml"), "--models", str(run),
                              "--shards", *map(str, locations), "--out", str(tmp_path / out), "--no-progress",
                              *overrides, *(["allow_damaged=true"] if allow else [])])

    assert evaluate_cli("report-strict", bad) == 2
    assert "shard val-000000.tar differs from the sha256" in caplog.text
    with caplog.at_level(logging.WARNING):
        with pytest.raises(ValueError, match="no evaluation image"):  # the only val shard was left out
            from defectforge.config import load_config
            from evaluate.config import EvalConfig
            from evaluate.run import evaluate

            cfg = load_config(EvalConfig, None, {"allow_damaged": True, "wandb": False})
            evaluate(cfg, [str(run)], [str(bad)], tmp_path / "report-empty", progress=False)
    # with an intact second folder beside it, the evaluation runs and says what it left out
    assert evaluate_cli("report", bad, shards, allow=True) == 0
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["data_damage"]["skipped_samples"] == 3 and results["images"] == 3
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Damaged data left out (allow_damaged): 3 sample(s) skipped" in md and "val-000000.tar" in md


def test_samples_skipped_inside_loader_workers_are_counted(shards, tmp_path, caplog):
    """An undecodable image member (its shard has no recorded sha256, so only reading finds it): with
    allow_damaged and a DataLoader worker, the worker's skip reaches run_info.json once, however many passes."""
    import io
    import tarfile

    bad = tmp_path / "undecodable"
    shutil.copytree(shards, bad)
    name = "train-000000.tar"
    with tarfile.open(shards / name) as src, tarfile.open(bad / name, "w") as dst:
        first = None
        for member in src:
            data = src.extractfile(member).read()
            key = member.name.split(".")[0]
            first = first or key
            if key == first and member.name.endswith((".png", ".jpg")) and ".mask." not in member.name:
                data = b"not an image"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    info = json.loads((bad / "_info.json").read_text())
    info["splits"]["train"]["sha256"].pop(name)
    (bad / "_info.json").write_text(json.dumps(info))
    run = tmp_path / "run"
    args = ["--config", str(REPO / "configs/finetune/quickstart.yaml"), "--shards", str(bad), "--out", str(run),
            "--no-progress", *FAST, "num_workers=1", "max_steps=6", "checkpoint_every=6", "val_every=6",
            "class_weights=null", "allow_damaged=true"]
    assert finetune_main(args) == 0
    info = json.loads((run / "run_info.json").read_text())
    assert info["data_damage"]["skipped_samples"] == 1, info["data_damage"]
    listed = (run / reader.SKIP_RECORD).read_text()
    assert f"sample '{first}' of {bad / name}" in listed
    caplog.clear()
    assert finetune_main([a for a in args if a != "allow_damaged=true"] + ["--out", str(tmp_path / "strict")]) == 2
    error = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"][-1]
    assert "\n" not in error and f"sample '{first}' of {bad / name}" in error, error  # one line from the worker
