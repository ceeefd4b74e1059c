import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from defectforge.config import ConfigError
from defectforge.shards import decode_raw, iter_raw_samples, read_folder_info, sha256_file
from synth import generate as generate_mod
from synth.compose import render_sample
from synth.generate import plan_shards

from .helpers import make_shards, tiny_config

REPO = Path(__file__).resolve().parents[2]


def tar_names(path):
    with tarfile.open(path) as tar:
        return tar.getnames()


def all_samples(folder):
    info = read_folder_info(folder)
    for split, entry in info["splits"].items():
        for name in entry["filenames"]:
            for raw in iter_raw_samples(Path(folder) / name):
                yield split, name, raw


def test_round_trip_members_counts_classes_and_metadata(tmp_path):
    info = make_shards(tmp_path / "ds", image_size=[100, 70])
    assert info["classes"] == ["background", "crack", "scratch", "pit", "stain", "chip"]
    assert info["splits"]["train"]["num_samples"] == 8 and info["splits"]["val"]["num_samples"] == 2
    on_disk = json.loads((tmp_path / "ds" / "_info.json").read_text())
    assert on_disk == info
    seen = {}
    for _split, name, raw in all_samples(tmp_path / "ds"):
        seen.setdefault(name, 0)
        seen[name] += 1
        assert set(raw) == {"__key__", "png", "mask.png", "json", "cls"}
        image, mask, meta = decode_raw(raw)
        assert image.shape == (100, 70, 3) and mask.shape == (100, 70)
        assert mask.max() < len(info["classes"])
        assert meta["source"] == "procedural" and meta["seed"] == [0, int(raw["__key__"])]
        for d in meta["defects"]:
            x0, y0, x1, y1 = d["bbox"]
            region = mask[y0:y1, x0:x1] == d["class_id"]
            assert region.any() and d["area_px"] <= region.sum()
            assert info["classes"][d["class_id"]] == d["class"]
        counts = np.bincount(mask.ravel(), minlength=len(info["classes"]))
        counts[0] = 0
        assert int(raw["cls"]) == (int(counts.argmax()) if counts.any() else 0)
    for _split, entry in info["splits"].items():
        assert [seen[n] for n in entry["filenames"]] == entry["shard_lengths"]
        for n in entry["filenames"]:
            assert entry["sha256"][n] == sha256_file(tmp_path / "ds" / n)
            assert tar_names(tmp_path / "ds" / n)[0].endswith(".cls")  # members in key order, sorted
    assert (tmp_path / "ds" / "config.yaml").is_file()
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_empty_ratio_and_class_subset(tmp_path):
    info = make_shards(tmp_path / "ds", empty_ratio=1.0, val_ratio=0.0)
    assert list(info["splits"]) == ["train"]
    for _, _, raw in all_samples(tmp_path / "ds"):
        _, mask, meta = decode_raw(raw)
        assert mask.max() == 0 and meta["defects"] == [] and raw["cls"] == b"0"
    info = make_shards(tmp_path / "ds2", defects={"scratch": 1.0}, empty_ratio=0.0)
    for _, _, raw in all_samples(tmp_path / "ds2"):
        _, mask, meta = decode_raw(raw)
        assert set(np.unique(mask)) <= {0, 1} and mask.max() == 1
        assert {d["class"] for d in meta["defects"]} == {"scratch"}


def test_same_bytes_with_one_or_several_workers(tmp_path):
    one = make_shards(tmp_path / "w1", workers=1)
    three = make_shards(tmp_path / "w3", workers=3)
    assert one["splits"] == three["splits"]  # file names, lengths and sha256 of every shard
    for name in one["splits"]["train"]["filenames"]:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w3" / name).read_bytes()


def test_resume_after_interruption_keeps_complete_shards(tmp_path, monkeypatch):
    reference = make_shards(tmp_path / "ref")
    real_write = generate_mod.write_shard
    calls = {"n": 0}

    def dying_write(path, samples):
        calls["n"] += 1
        if calls["n"] == 2:  # killed in the middle of the second shard
            next(iter(samples))
            raise KeyboardInterrupt
        return real_write(path, samples)

    monkeypatch.setattr(generate_mod, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path / "ds")
    names = sorted(p.name for p in (tmp_path / "ds").iterdir())
    assert names == [".defectforge", "config.yaml", "train-000000.tar"]  # no half shard, no _info.json yet
    first = (tmp_path / "ds" / "train-000000.tar").stat().st_mtime_ns
    (tmp_path / "ds" / "train-000001.tar.tmp").write_bytes(b"garbage of a killed run")

    monkeypatch.setattr(generate_mod, "write_shard", real_write)
    info = make_shards(tmp_path / "ds")
    assert info["splits"] == reference["splits"]
    assert (tmp_path / "ds" / "train-000000.tar").stat().st_mtime_ns == first  # kept, not rewritten
    keys = [raw["__key__"] for _, _, raw in all_samples(tmp_path / "ds")]
    assert sorted(keys) == [f"{i:08d}" for i in range(10)]
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_resume_writes_damaged_kept_shards_again(tmp_path, caplog):
    """A shard damaged after it was written is not kept: against the sha256 of the earlier _info.json, or, when
    the first run died before writing one, by reading it again; the rerun is byte-identical to a clean run."""
    reference = make_shards(tmp_path / "ref")
    ds = tmp_path / "ds"
    make_shards(ds)
    shard = ds / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a member: still a tar of the same length
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="synth.generate"):
        info = make_shards(ds)
    assert "train-000001.tar differs from the sha256 recorded" in caplog.text
    assert info["splits"] == reference["splits"]
    assert shard.read_bytes() == (tmp_path / "ref" / "train-000001.tar").read_bytes()

    (ds / "_info.json").unlink()  # as after a run killed before the end: no digest recorded
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # truncated
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synth.generate"):
        info = make_shards(ds)
    assert "train-000001.tar cannot be read" in caplog.text
    assert info["splits"] == reference["splits"]


def test_rerun_with_another_config_is_refused(tmp_path):
    make_shards(tmp_path / "ds")
    make_shards(tmp_path / "ds", workers=2)  # speed-only keys may change
    with pytest.raises(ConfigError, match=r"another config \(num_samples: 10 -> 12\)"):
        make_shards(tmp_path / "ds", num_samples=12)


def test_plan_covers_every_index_once():
    cfg = tiny_config(num_samples=23, shard_size=5, val_ratio=0.3)
    plan = plan_shards(cfg)
    indices = [i for p in plan for i in range(p.start, p.stop)]
    assert indices == list(range(23))
    assert [p.filename for p in plan if p.split == "val"] == ["val-000000.tar", "val-000001.tar"]


def test_same_seed_same_sample_and_other_seed_differs():
    cfg = tiny_config(image_size=96)
    a, b = render_sample(cfg, 3), render_sample(cfg, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    c = render_sample(tiny_config(image_size=96, seed=1), 3)
    assert not np.array_equal(a[0], c[0])


def test_4k_scene_has_several_defects_of_several_sizes():
    cfg = tiny_config(image_size=[2160, 3840], empty_ratio=0.0, defects_per_image=[1, 2])
    image, mask, meta = render_sample(cfg, 0)
    assert image.shape == (2160, 3840, 3)
    areas = [d["area_px"] for d in meta["defects"]]
    assert len(areas) >= 4, areas
    assert max(areas) > 5 * min(areas)
    thin = [d for d in meta["defects"] if d["class"] in ("crack", "scratch")]
    assert thin, "a 4K scene should carry thin defects"


def test_cli_generate_and_bad_override(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "synth", "generate", "--config", str(REPO / "configs/synth/quickstart.yaml"),
           "--out", str(tmp_path / "ds"), "--no-progress", "num_samples=6", "image_size=64", "workers=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    splits = read_folder_info(tmp_path / "ds")["splits"]
    assert (splits["train"]["num_samples"], splits["val"]["num_samples"]) == (4, 2)  # val_ratio 0.25 of 6
    bad = subprocess.run(cmd[:-3] + ["num_sampels=6"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown key 'num_sampels'" in bad.stderr


@pytest.mark.distributed
def test_accelerate_two_processes_write_the_single_process_output(tmp_path):
    single = make_shards(tmp_path / "single", num_samples=14, shard_size=3)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "synth", "generate",
           "--config", str(REPO / "configs/synth/quickstart.yaml"), "--out", str(tmp_path / "multi"),
           "--no-progress", "num_samples=14", "shard_size=3", "image_size=64", "workers=1", "val_ratio=0.2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    multi = read_folder_info(tmp_path / "multi")
    assert multi["splits"] == single["splits"]
