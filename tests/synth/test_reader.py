import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from defectforge import reader
from defectforge.reader import list_keys, make_dataset, read_location_info, resolve_shards
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


@pytest.fixture
def damage_allowed():
    reader.allow_damaged(True)
    yield
    reader.allow_damaged(False)
    reader._DAMAGE.clear()


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip_member_bytes(shard: Path, member_suffix: str = ".png") -> None:
    """Flip bytes in the middle of the first image member's data, in place (the tar stays a valid tar)."""
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = next(m for m in tar if m.name.endswith(member_suffix) and ".mask." not in m.name)
    at = member.offset_data + member.size // 2
    data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
    shard.write_bytes(bytes(data))


def test_flipped_bytes_missing_or_truncated_shards_fail_naming_the_shard(shards, tmp_path):
    flipped = _copy(shards, tmp_path / "flipped")
    _flip_member_bytes(flipped / "train-000001.tar")
    with pytest.raises(ShardError, match=r"train-000001\.tar differs from the sha256 recorded.*allow_damaged"):
        make_dataset(flipped, "train")
    missing = _copy(shards, tmp_path / "missing")
    (missing / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"shard train-000003\.tar is missing"):
        list_keys(missing, "train")
    truncated = _copy(shards, tmp_path / "truncated")
    whole = (truncated / "train-000000.tar").read_bytes()
    (truncated / "train-000000.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ShardError, match=r"train-000000\.tar differs"):
        make_dataset(truncated, "train")


def test_allowed_damage_leaves_the_damaged_shards_out_and_counts_them(shards, tmp_path, damage_allowed, caplog):
    bad = _copy(shards, tmp_path / "bad")
    _flip_member_bytes(bad / "train-000001.tar")
    (bad / "train-000003.tar").unlink()
    with caplog.at_level(logging.WARNING, logger="defectforge.reader"):
        keys = keys_of(make_dataset(bad, "train"))
    assert len(keys) == 14 - 3 - 3
    found = reader.damage_found()
    assert found["skipped_samples"] == 6
    assert any("train-000001.tar differs" in p for p in found["problems"])
    assert any("train-000003.tar is missing" in p for p in found["problems"])
    assert "6 samples skipped" in caplog.text


def test_remote_shards_are_counted_against_info(shards, tmp_path, damage_allowed, caplog):
    """A pipe: location cannot be hashed before reading: each shard's sample count is compared instead."""
    bad = _copy(shards, tmp_path / "remote")
    whole = (bad / "train-000002.tar").read_bytes()
    (bad / "train-000002.tar").write_bytes(whole[: len(whole) // 2])  # cut in the middle of a member
    location = f"pipe:cat {bad / '_info.json'}"
    with caplog.at_level(logging.WARNING, logger="defectforge.reader"):
        ds = make_dataset(location, "train")
        keys = keys_of(ds)
    assert 11 <= len(keys) < 14 and ds.skipped.count >= 1
    assert "train-000002.tar" in caplog.text and "b'" not in caplog.text  # shard named, no raw bytes
    reader.allow_damaged(False)
    with pytest.raises(ShardError, match=r"train-000002\.tar"):
        keys_of(make_dataset(location, "train"))


def test_undecodable_sample_is_named_by_key_and_shard(shards, tmp_path, damage_allowed, caplog):
    """A member that no longer decodes, in a folder whose _info.json was rewritten to match (so only the reader
    can tell): fails by sample key and shard, or is skipped and counted when damage is allowed."""
    bad = _copy(shards, tmp_path / "undecodable")
    name = "train-000000.tar"
    with tarfile.open(shards / name) as src, tarfile.open(bad / name, "w") as dst:
        for member in src:
            data = src.extractfile(member).read()
            if member.name.startswith("00000001.") and member.name.endswith(".png") and "mask" not in member.name:
                data = b"not a png"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
    info = read_folder_info(bad)
    info["splits"]["train"]["sha256"].pop(name)  # no digest recorded for it: the count and the decoding decide
    (bad / "_info.json").write_text(json.dumps(info))
    with caplog.at_level(logging.WARNING, logger="defectforge.reader"):
        ds = make_dataset(bad, "train")
        keys = keys_of(ds)
    assert "00000001" not in keys and len(keys) == 13 and ds.skipped.count == 1
    assert "00000001" in caplog.text and name in caplog.text
    reader.allow_damaged(False)
    with pytest.raises(ShardError, match=rf"00000001.*{name}"):
        keys_of(make_dataset(bad, "train"))


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


def test_training_stream_fails_instead_of_spinning_when_no_shard_is_readable(shards, tmp_path, damage_allowed):
    bad = tmp_path / "bad"
    bad.mkdir()
    info = read_folder_info(shards)
    (bad / "train-000000.tar").write_bytes(b"not a tar file")
    (bad / "train-000001.tar").write_bytes(b"nor this one")
    train = info["splits"]["train"]
    info["splits"] = {"train": {**train, "num_samples": 6, "filenames": ["train-000000.tar", "train-000001.tar"],
                                "shard_lengths": [3, 3], "sha256": {}}}
    (bad / "_info.json").write_text(json.dumps(info))
    with pytest.raises(ShardError, match="no readable sample in any of the 2 shards"):
        keys_of(make_dataset(bad, "train", resampled=True, epoch_samples=4))


def test_training_stream_with_a_missing_shard(shards, tmp_path, damage_allowed):
    """Two shards, one deleted: refused by name; allowed, the readable one is read (not 'no readable sample')."""
    two = tmp_path / "two"
    two.mkdir()
    info = read_folder_info(shards)
    train = info["splits"]["train"]
    for name in train["filenames"][:2]:
        shutil.copy(shards / name, two / name)
    info["splits"] = {"train": {**train, "num_samples": 6, "filenames": train["filenames"][:2],
                                "shard_lengths": [3, 3]}}
    (two / "_info.json").write_text(json.dumps(info))
    (two / train["filenames"][1]).unlink()
    keys = keys_of(make_dataset(two, "train", resampled=True, epoch_samples=12, seed=3))
    assert len(keys) == 12 and set(keys) == set(list_keys(shards / train["filenames"][0]))
    reader.allow_damaged(False)
    with pytest.raises(ShardError, match=f"shard {train['filenames'][1]} is missing"):
        make_dataset(two, "train", resampled=True, epoch_samples=12)
