"""Faults a run must survive: lost or damaged checkpoints, two writers, full and read-only
storage, corrupt caches, odd files. Each case ends in one clean line (exit 2) or a correct
recovery, and what was intact before is intact after. See docs/failure-handling.md."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cairn.checkpoint import store as ckpt
from cairn.cli import main
from cairn.util.failures import storage_problem

STEPS = ["--max-steps", "12", "--checkpoint-every", "4", "--eval-every", "0", "--no-progress",
         "--seq-len", "32", "--batch-size", "4", "--end-stories", "0"]


def _stories(n: int) -> list[str]:
    names, things = ["Tom", "Lily", "Sam", "Mia", "Ben"], ["a ball", "a cat", "a kite", "a box"]
    return [f"{names[i % 5]} found {things[i % 4]} in the park. {names[(i + 2) % 5]} liked it. The end."
            for i in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A small tokenizer, the data, and a run paused at step 8 of 12 (step checkpoints 4 and 8)."""
    from cairn.tokenizer.learn import train_bpe

    root = tmp_path_factory.mktemp("faults")
    data = root / "stories.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in _stories(300)), encoding="utf-8")
    tok = root / "tok"
    train_bpe(_stories(300), 300, tok)
    run = root / "run"
    assert main(["train", "--preset", "tiny", "--tokenizer", str(tok), "--data", str(data), "--out", str(run),
                 "--stop-after", "8", *STEPS]) == 0
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "tiny_checkpoint_step0000004", "tiny_checkpoint_step0000008"], names
    return {"root": root, "data": data, "tok": tok, "run": run}


@pytest.fixture
def run(base, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base["run"], copy)
    return copy


def snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def one_line_error(capsys, code: int) -> str:
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n{out}\n{err}"
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def resume(run: Path, *extra: str) -> int:
    return main(["train", "--resume", str(run), "--no-progress", *extra])


def step_ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"tiny_checkpoint_step{step:07d}"


# ---------------------------------------------------------------- resume finds the newest valid checkpoint

def test_resume_without_latest_continues_from_the_newest_checkpoint(run, capsys):
    (run / "checkpoints" / "latest").unlink()
    older = snapshot(step_ckpt(run, 4))
    assert resume(run) == 0
    out = capsys.readouterr().out
    assert f"resumed from {step_ckpt(run, 8)} at step 8" in out
    assert snapshot(step_ckpt(run, 4)) == older
    assert json.loads((run / "checkpoints" / "tiny_final" / "state.json").read_text())["state"]["step"] == 12


def test_a_latest_that_points_outside_the_run_is_not_followed(run, capsys):
    (run / "checkpoints" / "latest").write_text("../../elsewhere\n")
    assert ckpt.latest(run / "checkpoints") is None
    assert resume(run, "--stop-after", "9") == 0
    assert f"resumed from {step_ckpt(run, 8)}" in capsys.readouterr().out


def test_a_corrupt_newest_checkpoint_is_passed_over_for_the_one_before(run, capsys):
    weights = step_ckpt(run, 8) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert resume(run, "--stop-after", "5") == 0
    out = capsys.readouterr().out
    assert f"passing over {step_ckpt(run, 8)}" in out and f"resumed from {step_ckpt(run, 4)} at step 4" in out


def test_the_advice_after_a_corrupt_checkpoint_names_a_good_one(run, capsys):
    weights = step_ckpt(run, 8) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_line_error(capsys, main(["eval", str(step_ckpt(run, 8))]))
    assert "is corrupt or truncated" in line and str(step_ckpt(run, 4)) in line


def test_with_no_valid_checkpoint_resume_refuses_and_changes_nothing(run, capsys):
    for d in (run / "checkpoints").glob("tiny_*"):
        (d / "trainer.pt").unlink()
    before = snapshot(run)
    line = one_line_error(capsys, resume(run))
    assert "no checkpoint that can resume" in line and f"cairn train --restart {run}" in line
    assert snapshot(run) == before


def test_restart_moves_the_old_run_aside_and_starts_over(run, capsys):
    before = snapshot(run)
    assert main(["train", "--restart", str(run), "--no-progress", "--max-steps", "2"]) == 0
    aside = [p for p in run.parent.iterdir() if p.name.startswith("run.before-restart-")]
    assert len(aside) == 1 and snapshot(aside[0]) == before
    assert json.loads((run / "checkpoints" / "tiny_final" / "state.json").read_text())["state"]["step"] == 2


def _edit_state(path: Path, edit) -> None:
    meta = json.loads((path / "state.json").read_text())
    edit(meta)
    (path / "state.json").write_text(json.dumps(meta))


STATE_DAMAGE = {
    "negative-step": (lambda m: m["state"].update(step=-5), r"state\.step must be from 0"),
    "fractional-step": (lambda m: m["state"].update(step=1.5), r"state\.step must be a whole number"),
    "enormous-step": (lambda m: m["state"].update(step=10**18), r"state\.step must be from 0"),
    "best-loss-not-a-number": (lambda m: m["state"].update(best_val_loss="low"), r"best_val_loss must be a finite"),
    "batch-past-the-epoch": (lambda m: m["state"].update(batch_in_epoch=10**6), r"batch_in_epoch .* is past"),
    "unknown-state-field": (lambda m: m["state"].update(colour=1), r"unknown fields \['colour'\]"),
    "rng-malformed": (lambda m: m["rng"]["python"][1].pop(), r"rng\.python is not"),
    "plan-missing": (lambda m: m.pop("plan"), r"plan must be a table"),
}


@pytest.mark.parametrize("damage", STATE_DAMAGE, ids=list(STATE_DAMAGE))
def test_a_damaged_state_is_refused_field_by_field(run, capsys, damage):
    edit, expect = STATE_DAMAGE[damage]
    for d in (run / "checkpoints").glob("tiny_checkpoint_*"):
        _edit_state(d, edit)
    before = snapshot(run)
    line = one_line_error(capsys, resume(run))
    assert "no checkpoint that can resume" in line
    assert re.search(expect, line), line
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["extra-tensor", "wrong-shape", "wrong-dtype"])
def test_weights_that_do_not_fit_the_model_are_refused_before_loading(run, capsys, damage):
    f = step_ckpt(run, 8) / "model.safetensors"
    tensors = load_file(str(f))
    if damage == "extra-tensor":
        tensors["intruder"] = torch.zeros(3)
    elif damage == "wrong-shape":
        tensors["wte.weight"] = tensors["wte.weight"][:-1].clone()
    else:
        tensors["wte.weight"] = tensors["wte.weight"].half()
    f.unlink()
    save_file(tensors, str(f))
    before = snapshot(run)
    line = one_line_error(capsys, resume(run))
    assert f"cannot resume from {step_ckpt(run, 8)}" in line
    assert {"extra-tensor": "intruder", "wrong-shape": "wte.weight has shape", "wrong-dtype": "wte.weight is F16"}[
        damage] in line
    assert snapshot(run) == before


def test_an_optimizer_state_that_does_not_fit_is_refused(run, capsys):
    f = step_ckpt(run, 8) / "trainer.pt"
    state = torch.load(f, weights_only=True)
    name = next(iter(state["optimizer"]["state"]))
    state["optimizer"]["state"][name]["exp_avg"] = torch.zeros(2, 2)
    torch.save(state, f)
    before = snapshot(run)
    line = one_line_error(capsys, resume(run))
    assert "trainer.pt does not fit this model" in line and name in line
    assert snapshot(run) == before


# ---------------------------------------------------------------- one writer per run

@pytest.mark.slow
def test_a_second_writer_is_refused_at_once_naming_the_first(run, base, capsys):
    """A real training process holds the run; a resume of it, and a new run into it, are refused
    in one line naming the holder's PID; the live writer's files are left alone."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    writer = subprocess.Popen([sys.executable, "-m", "cairn", "train", "--resume", str(run), "--no-progress",
                               "--max-steps", "100000", "--checkpoint-every", "0"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in writer.stdout:  # training has begun once the first step is reported
            seen.append(line)
            if line.startswith("step "):
                break
        assert writer.poll() is None, "".join(seen)
        holder = (run / ".writer").read_text()
        assert f"pid {writer.pid} on " in holder
        started = time.monotonic()
        line = one_line_error(capsys, resume(run))
        assert time.monotonic() - started < 10
        assert "is being written by another cairn process" in line and f"pid {writer.pid}" in line
        line = one_line_error(capsys, main(["train", "--preset", "tiny", "--tokenizer", str(base["tok"]), "--data",
                                            str(base["data"]), "--out", str(run), "--no-progress"]))
        assert f"pid {writer.pid}" in line
        assert writer.poll() is None  # the writer never noticed
    finally:
        writer.send_signal(signal.SIGTERM)
        out = writer.communicate(timeout=120)[0]
    assert writer.returncode == 0, "".join(seen) + out
    assert "stopped (signal)" in out and not (run / ".writer").exists()


def test_a_failed_new_run_leaves_no_directory(base, tmp_path, capsys):
    out = tmp_path / "new"
    line = one_line_error(capsys, main(["train", "--preset", "tiny", "--tokenizer", str(base["tok"]), "--data",
                                        str(base["data"]), "--out", str(out), "--seq-len", "100000",
                                        "--context-len", "100000", "--no-progress"]))
    assert "too few for one step" in line and not out.exists()


# ---------------------------------------------------------------- full and read-only storage

@contextlib.contextmanager
def tmpfs(where: Path, size_kb: int):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({r.stderr.decode().strip() or 'mount failed'}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def read_only(where: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def _size_kb(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_keeps_the_last_good_one(base, tmp_path, capsys):
    one = _size_kb(step_ckpt(base["run"], 4))
    with tmpfs(tmp_path / "small", int(one * 1.6) + 64) as disk:
        out = disk / "run"
        code = main(["train", "--preset", "tiny", "--tokenizer", str(base["tok"]), "--data", str(base["data"]),
                     "--out", str(out), *STEPS])
        line = one_line_error(capsys, code)
        assert "could not write checkpoint" in line and "no space left on the device" in line
        good = step_ckpt(out, 4)
        assert f"the newest good checkpoint is {good}" in line and "free space" in line
        assert ckpt.resumable_problem(good) is None and ckpt.read_checkpoint(good).model_state()
        assert not list((out / "checkpoints").glob(".*tmp*"))


def test_resuming_a_run_on_read_only_storage_is_one_line(run, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", 64 * 1024) as disk:
        shutil.copytree(run, disk / "run")
        read_only(disk)
        before = snapshot(disk / "run")
        line = one_line_error(capsys, resume(disk / "run"))
        assert "read-only" in line and "writable" in line
        assert snapshot(disk / "run") == before


def test_a_read_only_token_cache_is_one_line(base, tmp_path, capsys, monkeypatch):
    with tmpfs(tmp_path / "cache", 1024) as disk:
        read_only(disk)
        monkeypatch.setenv("CAIRN_CACHE", str(disk / "cairn"))
        line = one_line_error(capsys, main(["prepare", "--data", str(base["data"]), "--tokenizer", str(base["tok"]),
                                            "--json"]))
        assert "cache" in line and ("--cache-dir" in line or "writable" in line)


@pytest.mark.parametrize("command", ["export", "tokenizer"])
def test_writing_an_export_or_a_tokenizer_to_read_only_storage_is_one_line(base, run, tmp_path, capsys, command):
    with tmpfs(tmp_path / "ro", 1024) as disk:
        read_only(disk)
        argv = (["export", str(run / "checkpoints" / "tiny_checkpoint_step0000008"), "--out", str(disk / "hf")]
                if command == "export" else
                ["tokenizer", "train", "--data", str(base["data"]), "--vocab-size", "300", "--out", str(disk / "tok")])
        line = one_line_error(capsys, main(argv))
        assert "read-only" in line and "writable" in line


@pytest.mark.parametrize("error,expect", [
    (OSError(errno.ENOSPC, "No space left on device", "/x/y"), "no space left on the device"),
    (RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1234 vs 1200: "
                  "PytorchStreamWriter failed writing file data/0: file write failed; No space left on device"),
     "no space left on the device"),
    (type("SafetensorError", (Exception,), {})("Error while serializing: IoError(Os { code: 30, kind: "
                                                 "ReadOnlyFilesystem, message: \"Read-only file system\" })"),
     "the file system is read-only"),
    (OSError(errno.ENAMETOOLONG, "File name too long"), "a file name is too long"),
])
def test_storage_failures_are_recognised_whatever_library_raised_them(error, expect):
    problem = storage_problem(error)
    assert problem is not None and problem.what == expect


def test_a_write_that_failed_without_a_reason_is_explained_by_its_file_system(tmp_path):
    torch_says = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 490304 vs 490192")
    problem = storage_problem(torch_says, str(tmp_path))
    assert problem is not None and problem.what == "a write failed"  # tmp_path has space and is writable
    with tmpfs(tmp_path / "full", 64) as disk:
        (disk / "filler").write_bytes(b"x" * (60 << 10))
        assert storage_problem(torch_says, str(disk)).what == "no space left on the device"


def test_a_bug_is_not_taken_for_a_storage_failure():
    assert storage_problem(ValueError("operands could not be broadcast together")) is None
    assert storage_problem(KeyError("step")) is None


# ---------------------------------------------------------------- caches and odd files

def _cache_dir(monkeypatch, tmp_path) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CAIRN_CACHE", str(cache))
    return cache


def _prepare(base, capsys) -> dict:
    assert main(["prepare", "--data", str(base["data"]), "--tokenizer", str(base["tok"]), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("damage", ["offsets-garbage", "offsets-truncated", "token-beyond-vocab", "meta-impossible"])
def test_a_corrupt_token_cache_is_rebuilt_with_one_log_line(base, tmp_path, capsys, monkeypatch, damage):
    _cache_dir(monkeypatch, tmp_path)
    first = _prepare(base, capsys)
    d = Path(first["cache_dir"])
    original = snapshot(d)
    offsets = d / "train.offsets.npy"
    if damage == "offsets-garbage":
        arr = np.load(offsets)
        np.save(offsets, arr[::-1].copy())
    elif damage == "offsets-truncated":
        np.save(offsets, np.load(offsets)[:-5])
    elif damage == "token-beyond-vocab":
        tokens = np.memmap(d / "train.tokens", dtype=np.dtype(json.loads((d / "meta.json").read_text())["dtype"]),
                           mode="r+")
        tokens[3] = np.iinfo(tokens.dtype).max
        tokens.flush()
        del tokens
    else:
        meta = json.loads((d / "meta.json").read_text())
        meta["splits"]["train"]["bytes"] = -7
        (d / "meta.json").write_text(json.dumps(meta))
    assert main(["prepare", "--data", str(base["data"]), "--tokenizer", str(base["tok"])]) == 0
    out, err = capsys.readouterr()
    assert "is corrupt" in out + err and "rebuilding it" in out + err
    again = snapshot(d)
    assert {k: v for k, v in again.items() if k != "meta.json"} == \
        {k: v for k, v in original.items() if k != "meta.json"}


def test_two_processes_preparing_one_cache_at_once_both_get_it_whole(base, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "CAIRN_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "cairn", "prepare", "--data", str(base["data"]), "--tokenizer", str(base["tok"]),
           "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    reports = [json.loads(out) for out, _ in results]
    assert reports[0]["cache_dir"] == reports[1]["cache_dir"] and reports[0]["splits"] == reports[1]["splits"]
    tokens = cache / "tokens"
    assert [p.name for p in tokens.iterdir()] == [Path(reports[0]["cache_dir"]).name]  # no temporary left


def test_a_pipe_among_the_data_files_is_skipped_and_a_pipe_as_data_is_refused(base, tmp_path, capsys, monkeypatch):
    _cache_dir(monkeypatch, tmp_path)
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(base["data"], folder / "a.jsonl")
    os.mkfifo(folder / "b.jsonl")
    assert _prepare({**base, "data": folder}, capsys)["splits"]["train"]["stories"] > 0
    line = one_line_error(capsys, main(["prepare", "--data", str(folder / "b.jsonl")]))
    assert "not a regular file" in line


def test_a_model_too_large_for_memory_is_one_line_with_its_size(base, tmp_path, capsys):
    line = one_line_error(capsys, main(["train", "--preset", "tiny", "--tokenizer", str(base["tok"]), "--data",
                                        str(base["data"]), "--out", str(tmp_path / "huge"), "--d-model", "65536",
                                        "--n-heads", "64", "--d-mlp", "262144", "--n-layers", "64", "--no-progress"]))
    assert "parameters" in line and "GB" in line and "lower --d-model" in line
    assert not (tmp_path / "huge").exists()


def test_a_temperature_so_small_that_only_the_best_token_survives_still_samples(run, capsys):
    code = main(["generate", str(step_ckpt(run, 8)), "--prompt", "Tom found", "--temperature", "1e-30",
                 "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    greedy = main(["generate", str(step_ckpt(run, 8)), "--prompt", "Tom found", "--temperature", "0",
                   "--max-new-tokens", "5"])
    assert greedy == 0 and capsys.readouterr().out == out


def test_a_checkpoints_entry_that_is_a_file_is_named_not_overwritten(run, capsys):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a directory\n")
    before = snapshot(run)
    line = one_line_error(capsys, resume(run))
    assert "checkpoints is a file" in line and "move it away" in line
    assert snapshot(run) == before


def test_a_run_name_too_long_for_checkpoint_files_is_refused_up_front(base, tmp_path, capsys):
    line = one_line_error(capsys, main(["train", "--preset", "tiny", "--tokenizer", str(base["tok"]), "--data",
                                        str(base["data"]), "--out", str(tmp_path / "r"), "--name", "n" * 240]))
    assert "too long for checkpoint file names" in line and "--name" in line and "free space" not in line
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_whose_model_cannot_fit_in_memory_is_one_line(run, capsys):
    _edit_state(step_ckpt(run, 8), lambda m: m["config"]["model"].update(d_model=65536, n_heads=64, d_mlp=262144,
                                                                          n_layers=64))
    line = one_line_error(capsys, main(["eval", str(step_ckpt(run, 8))]))
    assert "parameters" in line and "GB" in line and "lower --d-model" in line
