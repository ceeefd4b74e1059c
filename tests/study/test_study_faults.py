"""Fault injection: the study runner killed (SIGKILL) in each stage in turn and rerun gives the report of an
uninterrupted run, and no kill leaves a half-written file under a final name (docs/reliability.md)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from defectforge.reader import verify_folder
from defectforge.shards import INFO_NAME, read_folder_info

from .test_study import tiny_study

REPO = Path(__file__).resolve().parents[2]
# a log line that starts each stage, and how long after it the kill comes (the stage is then under way)
STAGES = [("[data] test_4k: generating", 0.0), ("[pretrain] vit on", 0.3), ("[finetune] vit-scratch", 0.3),
          ("[finetune] cnn", 0.3), ("[evaluate]", 0.5)]


def _study(config: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "study", str(config), "--out", str(out)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _run_and_kill(cmd: list[str], marker: str, delay: float) -> str:
    """Run `cmd`, SIGKILL it `delay` s after `marker` appears in its log; returns the log. Fails when the process
    ends before the kill (the stage would not have been interrupted)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if marker in line:
                seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not seen.wait(timeout=0.02) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if seen.is_set():
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    code = proc.wait(timeout=300)
    reader.join(timeout=10)
    log = "".join(lines)
    assert code == -signal.SIGKILL, f"not killed in stage '{marker}' (exit {code}):\n{log[-3000:]}"
    after = log[log.index(marker):].splitlines()[1:]
    assert not [line for line in after if "INFO study: [" in line], f"killed after stage '{marker}' ended:\n{log}"
    return log


def _assert_nothing_half_written(root: Path) -> None:
    """Every file under a final name is whole: shards match their _info.json, JSON parses, safetensors load,
    PNGs decode. Temporary files (`*.tmp`, `step-N.tmp/`) may remain; they are never read."""
    for path in root.rglob("*"):
        if not path.is_file() or any(part.endswith(".tmp") for part in path.relative_to(root).parts):
            continue
        if "wandb" in path.relative_to(root).parts:
            continue
        if path.name == INFO_NAME:
            info = read_folder_info(path.parent)
            for split in info["splits"]:
                verify_folder(path.parent, split, info, allow=False)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".png":
            with Image.open(path) as img:
                img.load()
        elif path.name == "metrics.jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)


def _accuracy(results: dict) -> dict:
    """Per model: everything measured except the timings (which vary between runs)."""
    out = {}
    for r in results["results"]:
        m = r["metrics"]
        out[r["name"]] = {k: v for k, v in m.items() if isinstance(v, (int, float, str)) or v is None}
        out[r["name"]]["per_class"] = json.dumps(m.get("per_class"), sort_keys=True)
    return out


@pytest.mark.slow
def test_study_killed_in_each_stage_resumes_to_the_uninterrupted_report(tmp_path):
    config = tiny_study(tmp_path)
    reference = tmp_path / "reference"
    done = subprocess.run(_study(config, reference), cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    study = tmp_path / "killed"
    for marker, delay in STAGES:
        _run_and_kill(_study(config, study), marker, delay)
        _assert_nothing_half_written(study)
    done = subprocess.run(_study(config, study), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "complete, skipped" in done.stderr  # the stages finished before the last kill are not redone
    _assert_nothing_half_written(study)

    want = json.loads((reference / "report/results.json").read_text())
    got = json.loads((study / "report/results.json").read_text())
    assert [r["name"] for r in got["results"]] == [r["name"] for r in want["results"]]
    assert _accuracy(got) == _accuracy(want)
    assert [(c["claim"], c["verdict"]) for c in got["claims"] if "faster" not in c["claim"]
            and "memory" not in c["claim"]] == [(c["claim"], c["verdict"]) for c in want["claims"]
                                                if "faster" not in c["claim"] and "memory" not in c["claim"]]


def _alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


@pytest.mark.slow
def test_a_study_killed_while_training_side_by_side_takes_its_runs_with_it_and_resumes(tmp_path):
    import re

    config = tiny_study(tmp_path)
    study = tmp_path / "killed"
    # the scratch ViT trains long enough to be killed under way
    cmd = _study(config, study) + ["parallel=2", "finetune.1.overrides.max_steps=200",
                                   "finetune.1.overrides.checkpoint_every=50", "finetune.1.overrides.val_every=200"]
    env = {**_env(), "OMP_NUM_THREADS": "2"}  # two threads to share: two runs at a time
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    second = threading.Event()

    def read() -> None:  # drains the pipe to the end, so the study never blocks on it
        for line in proc.stderr:
            lines.append(line)
            if "[finetune] vit-scratch-nall-s0 started" in line:
                second.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert second.wait(timeout=300), "".join(lines)[-3000:]
    time.sleep(8.0)  # both runs under way (their processes import torch, then train)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    reader.join(timeout=10)
    log = "".join(lines)
    pids = [int(p) for p in re.findall(r"started \(pid (\d+)", log)]
    assert len(pids) >= 2 and "vit-scratch-nall-s0 finished" not in log, log[-3000:]
    deadline = time.monotonic() + 15
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in pids), "a training run outlived its study"
    _assert_nothing_half_written(study)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_nothing_half_written(study)
    results = json.loads((study / "report/results.json").read_text())
    assert {r["name"] for r in results["results"]} == {"vit-pre-nall-s0", "vit-scratch-nall-s0", "cnn-nall-s0"}
