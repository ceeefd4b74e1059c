import io
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from defectforge.reader import make_dataset, read_location_info, resolve_shards
from defectforge.shards import ShardError, decode_raw, iter_raw_samples, read_folder_info

from .helpers import make_shards

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("reader") / "ds"
    make_shards(out, num_samples=14, shard_size=3, val_ratio=0.0)  # 5 shards: 3,3,3,3,2
    return out


def keys_of(ds):
    return [s["key"] for s in ds]


def test_decodes_tensors_that_match_the_raw_members(shards):
    ds = make_dataset(shards, "train")
    samples = list(ds)
    assert len(samples) == 14 and ds.classes[0] == "background"
    raw = next(iter_raw_samples(shards / "train-000000.tar"))
    image, mask, _ = decode_raw(raw)
    first = samples[0]
    assert first["key"] == raw["__key__"]
    assert first["image"].dtype == torch.float32 and first["image"].shape == (3, 64, 64)
    assert torch.allclose(first["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert first["mask"].dtype == torch.int64 and torch.equal(first["mask"], torch.from_numpy(mask.astype(np.int64)))
    expected = [float((mask == c).any()) for c in range(1, len(ds.classes))]
    assert first["labels"].tolist() == expected


@pytest.mark.parametrize("world", [2, 3, 8])  # 8 readers > 5 shards: sample-level split
def test_ranks_see_disjoint_samples_that_cover_the_split(shards, monkeypatch, world):
    seen = []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        seen.append(keys_of(make_dataset(shards, "train")))
    flat = [k for ks in seen for k in ks]
    assert len(flat) == len(set(flat)) == 14
    assert all(seen)  # no rank idles, even with more ranks than shards


def test_loader_workers_split_without_duplicates(shards):
    loader = torch.utils.data.DataLoader(make_dataset(shards, "train"), batch_size=None, num_workers=2)
    keys = keys_of(loader)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 14


def test_resampled_mode_has_a_fixed_epoch_length(shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = make_dataset(shards, "train", resampled=True, epoch_samples=20, shuffle=4, seed=3)
    first, second = keys_of(ds), keys_of(ds)
    assert len(first) == len(second) == 10
    assert set(first) <= {f"{i:08d}" for i in range(14)}
    again = keys_of(make_dataset(shards, "train", resampled=True, epoch_samples=20, shuffle=4, seed=3))
    assert again == first  # deterministic per (seed, rank, worker, epoch)
    with pytest.raises(ValueError, match="epoch_samples"):
        make_dataset(shards, "train", resampled=True)


def test_locations_folder_info_file_pipe_and_brace_pattern(shards):
    urls, info = resolve_shards(shards, "train")
    assert len(urls) == 5 and info["classes"][0] == "background"
    assert resolve_shards(shards / "_info.json", "train")[0] == urls
    piped, _ = resolve_shards(f"pipe:cat {shards}/_info.json", "train")
    assert piped == [f"pipe:cat {u}" for u in urls]
    assert len(keys_of(make_dataset(f"pipe:cat {shards}/_info.json", "train"))) == 14
    pattern = str(shards / "train-{000000..000004}.tar")
    with pytest.raises(ShardError, match="pass classes"):
        make_dataset(pattern)
    assert len(keys_of(make_dataset(pattern, classes=read_folder_info(shards)["classes"]))) == 14
    with pytest.raises(ShardError, match="split 'val' not found"):
        make_dataset(shards, "val")


def test_a_remote_info_is_checked_like_a_local_one(shards, tmp_path):
    info = read_folder_info(shards)
    assert read_location_info(shards) == read_location_info(shards / "_info.json") == info
    assert read_location_info(f"pipe:cat {shards}/_info.json") == info
    for name, content, error in [("bad.json", "{not json", "is not valid JSON"),
                                 ("nosplits.json", json.dumps({"classes": ["background"]}), "no 'splits' entry"),
                                 ("order.json", json.dumps({**info, "classes": ["crack", "background"]}),
                                  "must start with 'background'")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(ShardError, match=error) as err:
            read_location_info(f"pipe:cat {tmp_path / name}")
        assert f"pipe:cat {tmp_path / name}" in str(err.value)  # the location is named


def test_corrupt_sample_and_truncated_shard_are_skipped_and_counted(shards, tmp_path, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    info = read_folder_info(shards)
    names = info["splits"]["train"]["filenames"][:2]
    with tarfile.open(shards / names[0]) as src, tarfile.open(bad / names[0], "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.startswith("00000001.") and member.name.endswith(".png") and "mask" not in member.name:
                data = b"not a png"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    whole = (shards / names[1]).read_bytes()
    (bad / names[1]).write_bytes(whole[: len(whole) // 2])  # a shard cut in the middle of a member
    info["splits"] = {"train": {**info["splits"]["train"], "filenames": names}}
    (bad / "_info.json").write_text(json.dumps(info))
    ds = make_dataset(bad, "train")
    with caplog.at_level(logging.WARNING, logger="defectforge.reader"):
        keys = keys_of(ds)
    assert "00000001" not in keys and {"00000000", "00000002"} <= set(keys)
    assert ds.skipped.count >= 2
    assert "skipping unreadable data" in caplog.text


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_two_accelerate_processes_read_disjoint_samples(shards, tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
           str(REPO / "tests/synth/reader_rank.py"), str(shards), str(tmp_path), mode]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in ranks)
    a, b = (r["keys"] for r in ranks)
    if mode == "eval":
        assert not set(a) & set(b) and len(a) + len(b) == 14
    else:  # resampled: each rank stops after the same number of samples (no rank waits at the epoch end)
        assert len(a) == len(b) == 6
        assert not set(a) & set(b)  # within a pass over the shards, ranks read disjoint samples


def test_training_stream_with_more_readers_than_shards_deals_samples(shards, monkeypatch):
    # 8 readers over 5 shards: each reader keeps every 8th sample of the common sequence, so the first
    # pass (14 samples) is split without overlap and every reader still gets its full share
    monkeypatch.setenv("WORLD_SIZE", "8")
    seen = []
    for rank in range(8):
        monkeypatch.setenv("RANK", str(rank))
        seen.append(keys_of(make_dataset(shards, "train", resampled=True, epoch_samples=16, seed=5)))
    assert all(len(k) == 2 for k in seen)
    firsts = [k[0] for k in seen]
    assert len(set(firsts)) == 8


def test_training_stream_fails_instead_of_spinning_when_no_shard_is_readable(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    info = read_folder_info(shards)
    (bad / "train-000000.tar").write_bytes(b"not a tar file")
    info["splits"] = {"train": {**info["splits"]["train"], "filenames": ["train-000000.tar"]}}
    (bad / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="no readable sample"):
        keys_of(make_dataset(bad, "train", resampled=True, epoch_samples=4))
