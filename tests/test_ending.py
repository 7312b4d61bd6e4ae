"""A run ends on its best validated weights when its last ones validate worse on the whole split,
and its last state stays resumable; a run that ends better keeps its last weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cairn.checkpoint import store as ckpt
from cairn.training import train
from cairn.training.loop import Trainer
from helpers import assert_same_weights, config, records

# both tests train runs to their end
pytestmark = pytest.mark.slow


def _run(tmp_path, stories_file, small_tokenizer, **overrides):
    # the run stops at step 30, between validations (every 4): its best validated weights are older
    cfg = config(stories_file, tokenizer=small_tokenizer, epochs=2, max_steps=30, eval_every=4, eval_batches=1,
                 epoch_val="sample", checkpoint_every=0, end_stories=0, **overrides)
    return cfg, tmp_path / "run"


def test_a_run_whose_last_weights_got_worse_ends_on_its_best(tmp_path, stories_file, small_tokenizer, monkeypatch):
    finish = Trainer.finish

    def spoiled(self, stopped):  # the last steps overfit: here, the weights are simply spoiled
        with torch.no_grad():
            for p in self.model.parameters():
                p.add_(torch.randn_like(p), alpha=0.5)
        return finish(self, stopped)

    monkeypatch.setattr(Trainer, "finish", spoiled)
    cfg, out = _run(tmp_path, stories_file, small_tokenizer)
    done = train(cfg, out)
    ended = [r for r in records(out) if r.get("kind") == "end_on_best"]
    assert len(ended) == 1 and ended[0]["ends_on"] == "best"
    assert ended[0]["best_val_loss"] < ended[0]["last_val_loss"]
    best_step = ended[0]["best_step"]
    assert done["weights_step"] == best_step < done["step"]

    checkpoints = out / "checkpoints"
    final = ckpt.resolve(out)  # what eval, generate and export load
    assert final.name.endswith("_final") and ckpt.read_checkpoint(final).meta["weights_step"] == best_step
    assert_same_weights(load_file(final / "model.safetensors"),
                        load_file(checkpoints / f"{cfg.name}_best" / "model.safetensors"))
    # the test split is scored on the weights the run ends on
    tests = [r for r in records(out) if r.get("kind") == "test"]
    assert len(tests) == 1
    # the last state (spoiled weights, optimizer) is the resumable one; the final is passed over quietly
    newest, passed_over = ckpt.newest_resumable(checkpoints)
    assert newest == ckpt.latest(checkpoints) and newest.name.endswith(f"_step{done['step']:07d}")
    assert passed_over == []
    assert ckpt.resumable_problem(final) == ckpt.NOT_RESUMABLE_ENDED_ON_BEST
    last = load_file(newest / "model.safetensors")
    assert not torch.equal(last["wte.weight"], load_file(final / "model.safetensors")["wte.weight"])


def test_a_run_that_ends_better_or_is_told_not_to_keeps_its_last_weights(tmp_path, stories_file, small_tokenizer):
    cfg, out = _run(tmp_path, stories_file, small_tokenizer, end_on_best=False)
    done = train(cfg, out)
    assert done["weights_step"] == done["step"]
    assert not [r for r in records(out) if r.get("kind") == "end_on_best"]
    final = ckpt.resolve(out)
    assert ckpt.resumable_problem(final) is None and "weights_step" not in ckpt.read_checkpoint(final).meta
