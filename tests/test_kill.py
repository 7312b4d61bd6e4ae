"""kill -9 at random moments (checkpoint writes included), resume each time: same final weights."""

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import json

import pytest
import torch
from conftest import make_stories
from safetensors.torch import load_file

from cairn import checkpoint as ckpt

KILLS = 10


def command(data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "cairn", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
            "--resume", "auto", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-mlp", "32",
            "--seq-len", "32", "--batch-size", "4", "--max-steps", "120", "--checkpoint-every", "1",
            "--eval-every", "10", "--eval-batches", "2", "--report-every", "5", "--no-progress"]


def wait_for_training(proc: subprocess.Popen, timeout: float = 60) -> bool:
    """Read the log until the plan line (set-up done); False if the process ended first."""
    end = time.time() + timeout
    while time.time() < end:
        line = proc.stdout.readline()
        if not line:
            return False
        if line.startswith("plan:"):
            return True
    return False


def wait_for_write(ckpts: Path, proc: subprocess.Popen, delay: float, timeout: float = 20) -> None:
    """Poll until a checkpoint's temporary directory exists, then wait `delay` more seconds."""
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if ckpts.is_dir() and any(".tmp-" in p.name for p in ckpts.iterdir()):
            time.sleep(delay)
            return
        time.sleep(0.0005)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A data file and the uninterrupted reference run."""
    base = tmp_path_factory.mktemp("kill")
    data = base / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in make_stories(60)), encoding="utf-8")
    ref = base / "ref"
    subprocess.run(command(data, ref), check=True, capture_output=True, timeout=300)
    return data, load_file(str(ref / "checkpoints" / "tiny_final" / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resumes_to_the_same_result(tmp_path, setup):
    data, ref = setup
    run = tmp_path / "run"
    proc = subprocess.Popen(command(data, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert wait_for_training(proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and f"resume with: cairn train --resume {run}" in out
    newest = ckpt.latest(run / "checkpoints")
    assert newest is not None and not list((run / "checkpoints").glob("*_final"))
    subprocess.run(command(data, run), check=True, capture_output=True, timeout=300)
    assert same(ref, load_file(str(run / "checkpoints" / "tiny_final" / "model.safetensors")))


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, setup):
    stories_file, ref_weights = setup

    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = mid_write = 0
    for attempt in range(40):
        proc = subprocess.Popen(command(stories_file, run), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        if kills >= KILLS:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out
            break
        if wait_for_training(proc):
            if attempt % 2:  # every other kill: the moment a checkpoint write is under way
                wait_for_write(run / "checkpoints", proc, rng.uniform(0, 0.002))
            else:
                time.sleep(rng.uniform(0.0, 0.8))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == 0:  # it finished before the kill landed: start a fresh run
            shutil.rmtree(run)
            kills = mid_write = 0
            continue
        kills += 1
        ckpts = run / "checkpoints"
        mid_write += any(".tmp-" in p.name for p in ckpts.iterdir()) if ckpts.is_dir() else 0
        newest = ckpt.latest(ckpts) if ckpts.is_dir() else None
        if newest is not None:  # whatever `latest` names must be complete and loadable
            c = ckpt.read_checkpoint(newest)
            assert c.model_state() and c.trainer_state()["optimizer"]["state"]
    assert kills >= KILLS
    print(f"\nkill -9: {kills} kills ({mid_write} during a checkpoint write), {attempt + 1} starts")
    assert same(ref_weights, load_file(str(run / "checkpoints" / "tiny_final" / "model.safetensors")))
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
