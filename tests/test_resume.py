"""Exact resume: a run stopped after N steps and resumed to 2N is the run that never stopped."""

import json
from pathlib import Path

import pytest
import torch
from conftest import make_stories, write_stories

from cairn.util.errors import CairnError
from cairn.training import train
from cairn.checkpoint import store as ckpt
from helpers import assert_same_weights, config, final_weights, losses, steps_per_epoch


def planned_steps_per_epoch(run: Path) -> int:
    return json.loads((run / "run.json").read_text())["plan"]["steps_per_epoch"]


@pytest.fixture
def tiny(tmp_path, small_tokenizer):
    """config(...) with the shared small tokenizer on 36 generated stories: about 3,300 tokens, as
    many as conftest's 60 stories with GPT-2's tokenizer, so an epoch is about 20 steps."""
    stories = write_stories(tmp_path / "stories.jsonl", make_stories(36))
    return lambda **overrides: config(stories, tokenizer=small_tokenizer, **overrides)


@pytest.mark.parametrize("batching,extra", [
    ("pack", {}),
    ("pad", {}),
    ("pack", {"grad_accum": 2, "dropout": 0.1}),  # dropout: the torch RNG must be restored too
    ("pack", {"optimizer": "muon"}),  # two torch optimizers behind one: both states must come back
])
@pytest.mark.slow
def test_stop_and_resume_equals_uninterrupted_across_an_epoch_boundary(tmp_path, tiny, batching, extra):
    per_epoch = steps_per_epoch(tiny(batching=batching, **extra))
    total = per_epoch + per_epoch // 2 + 1  # the second half crosses into epoch 2
    stop = total // 2
    assert stop < per_epoch < total
    full = tmp_path / "full"
    train(tiny(batching=batching, max_steps=total, **extra), full)
    assert planned_steps_per_epoch(full) == per_epoch
    part = tmp_path / "part"
    out = train(tiny(batching=batching, max_steps=total, **extra), part, stop_after=stop)
    assert out["stopped"].startswith("stop-after") and out["step"] == stop
    assert not list((part / "checkpoints").glob("*_final"))
    train(tiny(batching=batching, max_steps=total, **extra), part, resume=True)
    assert_same_weights(final_weights(full), final_weights(part))
    assert losses(full) == losses(part)


@pytest.mark.slow
def test_resume_at_an_epoch_end_and_with_a_new_step_cap(logs, tmp_path, tiny):
    per_epoch = steps_per_epoch(tiny())
    full = tmp_path / "full"
    train(tiny(max_steps=2 * per_epoch), full)
    assert planned_steps_per_epoch(full) == per_epoch
    part = tmp_path / "part"
    train(tiny(max_steps=2 * per_epoch), part, stop_after=per_epoch)
    train(tiny(max_steps=2 * per_epoch), part, resume=True)
    assert_same_weights(final_weights(full), final_weights(part))
    assert losses(full) == losses(part)
    # a finished run can be extended: the training hyperparameters may change on resume
    train(tiny(max_steps=2 * per_epoch + 3, lr=1e-3), part, resume=True)
    assert any("schedule.lr changed" in m for m in logs) and any("max_steps changed" in m for m in logs)
    final = ckpt.read_checkpoint(next((part / "checkpoints").glob("*_final")))
    assert final.meta["state"]["step"] == 2 * per_epoch + 3


def test_resume_with_another_architecture_names_the_fields(tmp_path, tiny):
    run = tmp_path / "run"
    train(tiny(max_steps=6), run, stop_after=3)
    with pytest.raises(CairnError, match=r"model config differs: model.d_model \(32 -> 64\)"):
        train(tiny(max_steps=6, d_model=64), run, resume=True)


@pytest.mark.slow
def test_keep_last_k_step_checkpoints(tmp_path, tiny):
    run = tmp_path / "run"
    train(tiny(max_steps=16, checkpoint_every=2, keep_checkpoints=3), run)
    steps = sorted(p.name for p in (run / "checkpoints").glob("*_checkpoint_step*"))
    assert steps == [f"tiny_checkpoint_step{s:07d}" for s in (12, 14, 16)]


def test_failed_checkpoint_write_keeps_the_previous_one_and_stops_clearly(tmp_path, tiny, monkeypatch):
    import errno

    run = tmp_path / "run"
    real = ckpt.save_checkpoint
    calls = {"n": 0}

    def failing(path, *a, **k):
        if "_checkpoint_step" in Path(path).name:
            calls["n"] += 1
            if calls["n"] == 2:  # the second step checkpoint: the disk is full half-way through
                def boom(*args, **kwargs):
                    raise OSError(errno.ENOSPC, "No space left on device")
                monkeypatch.setattr("safetensors.torch.save_file", boom)
                try:
                    return real(path, *a, **k)
                finally:
                    monkeypatch.undo()
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt, "save_checkpoint", failing)
    with pytest.raises(CairnError, match=r"could not write checkpoint .*step0000010 at step 10 \(no space left on the "
                                         r"device\).*newest good checkpoint is .*step0000005.*free space"):
        train(tiny(max_steps=20), run)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["latest", "tiny_best", "tiny_checkpoint_step0000005"]  # no half-written directory
    good = ckpt.read_checkpoint(ckpt.latest(run / "checkpoints"))
    assert good.meta["state"]["step"] == 5 and good.model_state() and good.trainer_state()


@pytest.mark.slow
def test_non_finite_loss_stops_or_is_skipped(logs, tmp_path, tiny, monkeypatch):
    from cairn.model.transformer import Transformer

    real_forward = Transformer.forward
    seen = {"n": 0}

    def poisoned(self, idx, cache=None, labels=None):
        out = real_forward(self, idx, cache, labels)
        if labels is not None and self.training:
            seen["n"] += 1
            if seen["n"] == 7:
                return out[0] * float("nan"), out[1]
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(CairnError, match="not finite at step 7.*last good checkpoint is .*step0000005"):
        train(tiny(max_steps=10), tmp_path / "stop")
    seen["n"] = 0
    out = train(tiny(max_steps=10, skip_nonfinite=1), tmp_path / "skip")
    assert out["step"] == 10 and any("update skipped" in m for m in logs)
    w = final_weights(tmp_path / "skip")
    assert all(torch.isfinite(t).all() for t in w.values())


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_losses_and_another_seed_does_not(tmp_path, tiny):
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        train(tiny(max_steps=8, report_every=2, seed=seed), tmp_path / name)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    assert losses(tmp_path / "a") != losses(tmp_path / "c")
