"""Training runs side by side (`parallel` in a study config): the thread split, the order, the loop that follows
its share, a tiny study trained two runs at a time, and a failed run reported with its log."""

import json
from pathlib import Path

import pytest
import torch

from defectforge.config import ConfigError, load_config
from defectforge.loop import THREADS_ENV, ThreadShare
from finetune.config import FinetuneConfig
from finetune.train import train as finetune
from study.config import load_study
from study.parallel import Job, JobFailed, order, run_jobs, shares
from study.runner import run_study, time_summary, wall_seconds
from tests.synth.helpers import make_shards

from .test_study import tiny_study

REPO = Path(__file__).resolve().parents[2]
FAST = {"crop_size": 64, "batch_size": 2, "max_steps": 3, "warmup_steps": 1, "val_every": 3, "checkpoint_every": 3,
        "log_every": 1, "num_workers": 0, "wandb": False, "encoder_kwargs": {"embed_dim": 48, "num_heads": 2}}


@pytest.fixture
def two_threads():
    """Two compute threads to share (two runs at a time), whatever the test process was started with."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_threads_are_split_among_the_runs_going_and_waited_on_runs_start_first():
    assert shares(2, 1) == [2] and shares(2, 2) == [1, 1] and shares(5, 2) == [3, 2]
    assert shares(2, 3) == [1, 1, 1]  # never fewer than one thread
    jobs = [Job("finetune", "scratch", None, "", Path("a")), Job("finetune", "pre", None, "", Path("b"), after="vit"),
            Job("pretrain", "vit", None, "", Path("c")), Job("pretrain", "alone", None, "", Path("d"))]
    assert [j.name for j in order(jobs)] == ["vit", "scratch", "pre", "alone"]


def test_the_study_wall_time_counts_overlapping_steps_once():
    steps = [{"started": 0.0, "seconds": 10.0}, {"started": 5.0, "seconds": 10.0}, {"started": 20.0, "seconds": 1.0}]
    assert wall_seconds(steps) == pytest.approx(16.0)
    assert wall_seconds([{"seconds": 2.0}, {"seconds": 3.0}]) == 5.0  # an older timings file: no starts, the sum


def test_parallel_must_be_a_positive_integer(monkeypatch):
    monkeypatch.chdir(REPO)
    assert load_study("configs/study/quickstart.yaml", ["parallel=1"]).parallel == 1
    with pytest.raises(ConfigError, match="'parallel'.*expected an integer >= 1"):
        load_study("configs/study/quickstart.yaml", ["parallel=0"])


def test_the_training_loop_takes_the_thread_share_written_for_it(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    make_shards(shards, num_samples=8, image_size=[64, 64], shard_size=4, val_ratio=0.25)
    share = ThreadShare(tmp_path / "threads")
    share.write(1)
    monkeypatch.setenv(THREADS_ENV, str(share.path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        finetune(load_config(FinetuneConfig, None, FAST), str(shards), tmp_path / "run", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    (tmp_path / "threads").write_text("lots\n")  # not a number: the share is left as it is
    assert share.read() is None


def test_a_study_trains_two_runs_at_a_time_and_resumes(tmp_path, monkeypatch, caplog, two_threads):
    import logging

    monkeypatch.chdir(REPO)
    config = tiny_study(tmp_path)
    # the CNN reads its data in a loader worker, started in the run's process as a run started alone starts it
    run_study(config, tmp_path / "study", ["parallel=2", "finetune.2.overrides.num_workers=1"])
    results = json.loads((tmp_path / "study/report/results.json").read_text())
    assert {r["name"] for r in results["results"]} == {"vit-pre-nall-s0", "vit-scratch-nall-s0", "cnn-nall-s0"}
    logs = sorted(p.name for p in (tmp_path / "study/logs").iterdir())
    assert logs == ["finetune-cnn-nall-s0.log", "finetune-vit-pre-nall-s0.log", "finetune-vit-scratch-nall-s0.log",
                    "pretrain-vit.log"]
    steps = {e["name"]: e for e in json.loads((tmp_path / "study/timings.json").read_text())["steps"]}
    pre, scratch, ft = steps["vit"], steps["vit-scratch-nall-s0"], steps["vit-pre-nall-s0"]
    assert scratch["started"] < pre["started"] + pre["seconds"]  # the scratch run trained beside the pretraining
    assert ft["started"] >= pre["started"] + pre["seconds"]  # the run from the pretrained model waited for it
    assert wall_seconds(list(steps.values())) < sum(e["seconds"] for e in steps.values())
    (line,) = time_summary(tmp_path / "study")
    assert line.index("; pretrain ") < line.index("; finetune ") < line.index("; total ")  # in the order they started
    info = json.loads((tmp_path / "study/finetune/vit-pre-nall-s0/run_info.json").read_text())
    assert Path(info["init"]).name == "vit" and info["init_report"]  # it started from the pretrained weights
    assert not any((tmp_path / "study/threads").iterdir())  # each run's share file goes with it
    with caplog.at_level(logging.INFO, logger="study"):
        run_study(config, tmp_path / "study", ["parallel=2"])
    assert caplog.text.count("complete, skipped") == 4 and "report is newer" in caplog.text


def test_a_failed_run_stops_the_study_with_the_end_of_its_log_and_the_run_beside_it(tmp_path, caplog, two_threads):
    import logging
    import re

    shards = tmp_path / "shards"
    make_shards(shards, num_samples=8, image_size=[64, 64], shard_size=4, val_ratio=0.25)
    cfg = load_config(FinetuneConfig, None, FAST)
    jobs = [Job("finetune", "broken", cfg, str(tmp_path / "no-such-shards"), tmp_path / "run"),
            Job("finetune", "long", load_config(FinetuneConfig, None, {**FAST, "max_steps": 100000,
                                                                      "checkpoint_every": 100000}),
                str(shards), tmp_path / "long")]
    ended = []
    with caplog.at_level(logging.INFO, logger="study"), \
            pytest.raises(JobFailed, match=r"(?s)\[finetune\] broken failed .*finetune-broken.log.*no-such-shards"):
        run_jobs(jobs, 2, tmp_path, lambda *a: ended.append(a))
    assert ended == []
    (pid,) = [int(p) for p in re.findall(r"long started \(pid (\d+)", caplog.text)]
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "\nState:\tZ" in status.read_text()  # stopped with the study


def test_the_command_exits_1_with_the_message_when_a_side_by_side_run_failed(monkeypatch, caplog):
    import study.runner
    from study.__main__ import main

    def failing(*args, **kwargs):
        raise JobFailed("[finetune] x failed (exit code 1); its log logs/finetune-x.log ends with:\nBoom")

    monkeypatch.setattr(study.runner, "run_study", failing)
    assert main(["configs/study/quickstart.yaml"]) == 1
    assert "finetune-x.log ends with:\nBoom" in caplog.text
