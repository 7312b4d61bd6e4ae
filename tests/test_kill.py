"""kill -9 at random moments (checkpoint writes included), resume each time: same final weights.

The interrupted runs are real `python -m cairn train` processes; the uninterrupted reference run
and the final, uninterrupted resumes run in-process (`cairn.cli.main`), the same arithmetic.
Kill moments are drawn in proportion to how long the reference run trains on the machine that
runs the tests, so a fast machine does not finish the run before it is killed and a slow one is
not killed ten times within its first step.
"""

import contextlib
import io
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_stories, write_stories
from safetensors.torch import load_file

from cairn.cli import main
from cairn.checkpoint import store as ckpt

# every test kills and resumes real training processes
pytestmark = pytest.mark.slow

KILLS = 10
KEEP = 2  # step checkpoints kept: a checkpoint every step, and the older ones deleted as it goes


def train_args(data: Path, out: Path, tokenizer: Path) -> list[str]:
    return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--tokenizer", str(tokenizer),
            "--resume", "auto", "--d-model", "16", "--n-heads", "2", "--n-layers", "1", "--d-mlp", "32",
            "--seq-len", "32", "--batch-size", "4", "--max-steps", "120", "--checkpoint-every", "1",
            "--keep-checkpoints", str(KEEP), "--eval-every", "10", "--eval-batches", "2", "--report-every", "5",
            "--no-progress"]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cairn", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def finish_in_process(args: list[str]) -> None:
    """Run `cairn ARGS` to its end in this process (a resume of a killed run, or the reference)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(args)
    assert code == 0, out.getvalue()


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


class _Clock(io.StringIO):
    """Captured stdout that notes when the plan line (the end of the set-up) was printed."""

    plan_at = None

    def write(self, s: str) -> int:
        if self.plan_at is None and s.startswith("plan:"):
            self.plan_at = time.monotonic()
        return super().write(s)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tokenizer):
    """A data file, the uninterrupted reference run's final weights, and how many seconds it runs
    from its plan line to its end."""
    base = tmp_path_factory.mktemp("kill")
    data = write_stories(base / "stories.jsonl", make_stories(60))
    ref = base / "ref"
    clock, err = _Clock(), io.StringIO()
    with contextlib.redirect_stdout(clock), contextlib.redirect_stderr(err):
        assert main(train_args(data, ref, small_tokenizer)) == 0, clock.getvalue() + err.getvalue()
    seconds = time.monotonic() - clock.plan_at
    weights = load_file(str(ref / "checkpoints" / "tiny_final" / "model.safetensors"))
    return data, small_tokenizer, weights, seconds


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_and_resumes_to_the_same_result(tmp_path, setup):
    data, tok, ref, _ = setup
    run = tmp_path / "run"
    proc = start(train_args(data, run, tok))
    assert wait_for_training(proc)
    seen = []
    for line in proc.stdout:  # mid-training by the run's own account, however busy the machine is
        seen.append(line)
        if line.startswith("step 10/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    assert "SIGTERM received" in out and f"resume with: cairn train --resume {run}" in out
    newest = ckpt.latest(run / "checkpoints")
    assert newest is not None and not list((run / "checkpoints").glob("*_final"))
    finish_in_process(train_args(data, run, tok))
    assert same(ref, load_file(str(run / "checkpoints" / "tiny_final" / "model.safetensors")))


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_weights(tmp_path, setup):
    data, tok, ref_weights, seconds = setup

    run = tmp_path / "run"
    rng = random.Random(1234)
    kills = mid_write = 0
    for attempt in range(40):
        if kills >= KILLS:
            finish_in_process(train_args(data, run, tok))
            break
        proc = start(train_args(data, run, tok))
        if wait_for_training(proc):
            if attempt % 2:  # every other kill: the moment a checkpoint write is under way
                wait_for_write(run / "checkpoints", proc, rng.uniform(0, 0.002))
            else:  # the timed kills together take about a quarter of the training on average
                time.sleep(rng.uniform(0.0, seconds / KILLS))
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
    assert len(list((run / "checkpoints").glob("*_checkpoint_step*"))) == KEEP
