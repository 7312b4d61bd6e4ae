"""Runs trained and checkpointed by cairn before its config was split into sections and its
checkpoints were built from Stateful parts (commit 04bf875) resume exactly and load with this code.

The fixture, and the commands that made it: tests/fixtures/checkpoint-before-sections/README.md.
"""

import contextlib
import io
import json
import math
import shutil
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

import cairn
from cairn.cli import main
from cairn.config.io import field_index, from_dict, load_toml
from cairn.config.sections import RunConfig
from helpers import assert_same_weights, final_weights, losses, records

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoint-before-sections"
STEP8 = Path("checkpoints") / "tiny_checkpoint_step0000008"


@pytest.fixture
def old(tmp_path, monkeypatch) -> Path:
    """A copy of the fixture, the working directory (the runs' configs name their data
    `stories.jsonl`), with a cache of its own."""
    copy = tmp_path / "old"
    shutil.copytree(FIXTURE, copy)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("CAIRN_CACHE", str(tmp_path / "cache"))
    return copy


def run_cli(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    assert code == 0, out.getvalue()
    return out.getvalue()


def state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "state.json").read_text())


def same_scores(new: dict, old: dict) -> bool:
    """Equal, but held-out scores to 1e-6 relative: scoring batches held-out stories by length now,
    so its sums add in another order (training, and so the weights, stay bit for bit the same)."""
    held_out = ("val_", "test_", "best_val_")
    return new.keys() == old.keys() and all(
        new[k] == pytest.approx(old[k], rel=1e-6) if k.startswith(held_out) and isinstance(old[k], float)
        else new[k] == old[k] for k in old)


def test_the_old_stopped_run_resumes_to_the_old_uninterrupted_run_exactly(old, logs):
    run, full = old / "stopped", old / "uninterrupted"
    run_cli("train", "--resume", "stopped", "--no-progress")
    assert any(m.startswith("resumed from") and "at step 8" in m for m in logs), logs

    # steps 9-12 with the new code give the weights the old code reached without stopping, bit for bit
    assert_same_weights(final_weights(run), final_weights(full))
    # and the same state: step, epoch position, tokens, best validation loss, plan, RNG states
    final = state(next((run / "checkpoints").glob("*_final")))
    old_final = state(full / "checkpoints" / "tiny_final")
    assert final["state"]["step"] == old_final["state"]["step"] == 12
    for key in ("format", "format_version", "kind", "tokenizer", "plan", "rng", "world_size"):
        assert final[key] == old_final[key], key
    assert same_scores(final["state"], old_final["state"])
    # the new code writes the config in sections; it is the same config as the old flat one
    assert from_dict(final["config"]) == from_dict(old_final["config"])

    # every metrics record but the timings, validations and the test at the end included
    assert len(losses(run)) == len(losses(full))
    assert all(same_scores(a, b) for a, b in zip(losses(run), losses(full)))
    held_out = [r for r in losses(run) if r["kind"] in ("val", "test")]
    assert [(r["kind"], r["step"]) for r in held_out] == [("val", 4), ("val", 8), ("val", 12), ("val", 12),
                                                            ("test", 12)]


def test_old_checkpoints_load(old):
    run, full = old / "stopped", old / "uninterrupted"
    step8 = cairn.load(run / STEP8, device="cpu")
    assert step8.meta["kind"] == "step" and step8.meta["state"]["step"] == 8
    cfg = step8.config
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (32, 1, 300)
    assert cfg.schedule.lr == 0.003 and cfg.optim.beta2 == 0.95 and cfg.checkpoint.checkpoint_every == 4
    assert step8.tokenizer.name == "bpe-a88056898187b43b" and step8.tokenizer.vocab_size == 300
    saved = load_file(str(run / STEP8 / "model.safetensors"))
    assert_same_weights({k: v for k, v in step8.model.state_dict().items() if k in saved}, saved)

    # a run directory without a final checkpoint: its newest; the weights-only best checkpoint
    assert cairn.load(run, device="cpu").path.name == STEP8.name
    best = cairn.load(run / "checkpoints" / "tiny_best", device="cpu")
    assert best.meta["kind"] == "best" and best.meta["state"]["step"] == 8
    # a finished run directory: its final checkpoint
    final = cairn.load(full, device="cpu")
    assert final.path.name == "tiny_final" and final.meta["state"]["step"] == 12
    assert final.config == step8.config


def test_old_runs_evaluate_and_generate(old):
    full = old / "uninterrupted"
    # `cairn eval` scores the old final weights on the run's splits as its training did at its end, to float
    # rounding (about 1e-8 apart, the same figures as the code before the change prints for `cairn eval`)
    val = next(r for r in records(full) if r["kind"] == "val" and r["full"])
    test = next(r for r in records(full) if r["kind"] == "test")
    for split, rec in (("val", val), ("test", test)):
        got = json.loads(run_cli("eval", str(full), "--split", split, "--json", "--device", "cpu"))
        assert got["tokens"] == rec[f"{split}_tokens"]
        assert got["loss"] == pytest.approx(rec[f"{split}_loss"], rel=1e-6), split

    got = json.loads(run_cli("eval", str(old / "stopped" / STEP8), "--split", "val", "--json", "--device", "cpu"))
    assert math.isfinite(got["loss"]) and got["tokens"] == val["val_tokens"]

    args = ["generate", "stopped", "--prompt", "Once upon a time", "--max-new-tokens", "8", "--seed", "3",
            "--json", "--device", "cpu"]
    first, again = (json.loads(run_cli(*args)) for _ in range(2))
    assert first == {**again, "tokens_per_s": first["tokens_per_s"]}
    assert 1 <= first["tokens"] <= 8 and first["prompt"] == "Once upon a time" and isinstance(first["text"], str)


def test_the_old_flat_config_file_loads_into_the_sections():
    path = FIXTURE / "stopped" / "config.toml"
    raw = tomllib.loads(path.read_text(encoding="utf-8"))
    assert set(raw) == {"name", "seed", "tokenizer", "init_from", "model", "data", "train"}  # the old layout
    assert "lr" in raw["train"] and "template_user" in raw["data"]

    cfg = load_toml(path, RunConfig())
    assert cfg.schedule.lr == raw["train"]["lr"] == 0.003
    assert cfg.schedule.schedule == "cosine" and cfg.optim.beta2 == 0.95 and cfg.eval.eval_every == 4
    assert cfg.checkpoint.checkpoint_every == 4 and cfg.system.precision == "fp32" and cfg.report.report_every == 5
    assert cfg.chat.template_user == "User: {content}\n" and cfg.data.source == "stories.jsonl"
    # every value the old file states lands in the field of that name, and it states every field there
    # is but those added after it was written, which take their defaults
    index, stated = field_index(), set()
    for key, value in raw.items():
        for name, v in (value.items() if isinstance(value, dict) else [(key, value)]):
            section, field, _ = index[name]
            assert getattr(cfg if section is None else getattr(cfg, section), field) == v, name
            stated.add(name)
    newer = {"tokenizer_sample_bytes": cfg.data.tokenizer_sample_bytes, "end_val_batches": cfg.eval.end_val_batches,
             "end_test_batches": cfg.eval.end_test_batches, "trackers": cfg.report.trackers, "stride": cfg.eval.stride}
    assert stated == {k for k in index if "." not in k} - set(newer)
    assert newer == {"tokenizer_sample_bytes": RunConfig().data.tokenizer_sample_bytes,
                     "end_val_batches": RunConfig().eval.end_val_batches,
                     "end_test_batches": RunConfig().eval.end_test_batches, "trackers": RunConfig().report.trackers,
                     "stride": RunConfig().eval.stride}
    # the checkpoints hold the same config as a dict in the same old layout
    assert from_dict(state(FIXTURE / "stopped" / STEP8)["config"]) == cfg
