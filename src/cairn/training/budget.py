"""`--time-budget`: measure what the run's pieces cost, then plan its steps to fit the budget.

The budget covers the whole command, from start-up to the last story printed, so the plan
subtracts what set-up already used and reserves the end of the run (full validation, test,
final checkpoint, stories). The calibration steps are real training steps on the run's own first
batches, timed and then undone (weights, optimizer, counters and RNG restored), so a budgeted run
is the same run as one given its planned `max_steps` up front: same data order, same schedule.
"""

from __future__ import annotations

import copy
import math
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import num_batches
from ..errors import CairnError
from . import checkpoint as ckpt

CALIBRATION_STEPS = 6  # the first is a warm-up (allocations, caches) and is not counted
SAFETY_FRAC = 0.03  # of the budget, for a machine that slows down while we run (noisy neighbours)
SAFETY_S = 2.0


@dataclass
class Costs:
    step_s: float  # one optimizer step
    eval_batch_s: float  # one validation/test batch
    checkpoint_s: float  # one resumable checkpoint written
    story_token_s: float  # one generated token (KV cache)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(trainer) -> Costs:
    """Time a few real steps, two evaluation batches, one checkpoint and a few generated tokens;
    leave the trainer exactly as it was."""
    model, opt, t = trainer.model, trainer.optimizer, trainer.cfg.train
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_state = copy.deepcopy(trainer.state)
    saved_rng, saved_torch_rng = ckpt.rng_state(), torch.get_rng_state()
    try:
        def batches():
            while True:  # a split shorter than the calibration just starts over
                yield from trainer.loader(trainer.train_ds, 0)

        source = batches()
        times = []
        for _ in range(CALIBRATION_STEPS):
            micro = [next(source) for _ in range(t.grad_accum)]
            times.append(_timed(lambda: trainer.train_step(micro)))
        step_s = statistics.median(times[1:])

        eval_batch_s = 0.0
        held_out = trainer.val_ds or trainer.test_ds
        if held_out is not None:
            n = min(3, num_batches(len(held_out), t.batch_size * trainer.dist.world, drop_last=False))

            def run_eval(k: int):
                trainer.evaluate(held_out, max_batches=k)

            # time n batches minus one: the first pays one-off costs the hundredth does not
            eval_batch_s = (_timed(lambda: run_eval(n)) - _timed(lambda: run_eval(1))) / max(n - 1, 1)
            eval_batch_s = max(eval_batch_s, 0.0)

        def probe_checkpoint() -> None:
            # as a real save: every rank gathers (FSDP), rank 0 writes
            weights = trainer.dist.full_weights(model)
            state = {"optimizer": trainer.dist.optimizer_state(model, opt)}

            def write() -> None:
                probe = Path(tempfile.mkdtemp(prefix="cairn-budget-probe-"))  # the run directory is not made yet
                try:
                    ckpt.save_checkpoint(probe / "c", weights, {"kind": "probe"}, state)
                finally:
                    shutil.rmtree(probe, ignore_errors=True)
            trainer.dist.on_main(write, share_result=False)

        checkpoint_s = _timed(probe_checkpoint)

        story_token_s = 0.0
        if t.end_stories:
            from ..generate import SamplingConfig, generate_ids

            def gen(n_tok: int):
                s = SamplingConfig(max_new_tokens=n_tok, temperature=1.0, seed=0, stop_at_eot=False)
                list(generate_ids(model, [trainer.tokenizer.eot_id], s))

            gen(2)  # warm-up
            story_token_s = (_timed(lambda: gen(24)) - _timed(lambda: gen(8))) / 16
            story_token_s = max(story_token_s, 0.0)
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        opt.zero_grad(set_to_none=True)
        model.train()
        trainer.state = saved_state
        torch.set_rng_state(saved_torch_rng)
        ckpt.set_rng_state(saved_rng)
    # every rank must plan the same steps: they agree on the mean of their measurements
    world = trainer.dist.world
    return Costs(*(v / world for v in trainer.dist.sum([step_s, eval_batch_s, checkpoint_s, story_token_s])))


def end_reserve(trainer, c: Costs) -> float:
    """Seconds the end of the run needs after the last step."""
    t = trainer.cfg.train
    batches = 0
    if trainer.val_ds is not None:
        batches += num_batches(len(trainer.val_ds), t.batch_size, drop_last=False)
    if t.test_at_end and trainer.test_ds is not None:
        batches += num_batches(len(trainer.test_ds), t.batch_size, drop_last=False)
    return batches * c.eval_batch_s + 2 * c.checkpoint_s + t.end_stories * t.end_story_tokens * c.story_token_s


def epoch_end_s(trainer, c: Costs) -> float:
    """Seconds of an epoch's end: a validation (the full split, or its sample) and an epoch checkpoint."""
    t = trainer.cfg.train
    batches = 0
    if trainer.val_ds is not None:
        batches = num_batches(len(trainer.val_ds), t.batch_size, drop_last=False)
        if t.epoch_val == "sample" and t.eval_batches:
            batches = min(batches, t.eval_batches)
    return batches * c.eval_batch_s + c.checkpoint_s


def plan_steps(trainer, budget_s: float, elapsed_s: float, c: Costs,
               steps_per_epoch: int) -> tuple[int, float, float]:
    """(steps, end reserve, overhead per step): as many steps as fit in what is left of the
    budget, counting the periodic evaluations and checkpoints they bring (the overhead)."""
    t = trainer.cfg.train
    reserve = end_reserve(trainer, c)
    available = budget_s - elapsed_s - reserve - SAFETY_FRAC * budget_s - SAFETY_S
    per_step = c.step_s
    if t.eval_every and trainer.val_ds is not None:
        limit = t.eval_batches or num_batches(len(trainer.val_ds), t.batch_size, drop_last=False)
        per_step += (limit * c.eval_batch_s + c.checkpoint_s) / t.eval_every  # + a best-model save
    if t.checkpoint_every:
        per_step += c.checkpoint_s / t.checkpoint_every
    per_step += epoch_end_s(trainer, c) / steps_per_epoch
    steps = math.floor(available / per_step)
    if steps < 1:
        raise CairnError(f"the time budget of {budget_s:.0f}s is too short: set-up took {elapsed_s:.0f}s, the end "
                         f"of the run needs about {reserve:.0f}s and one step {c.step_s:.2f}s; raise --time-budget, "
                         "or shrink the model or the validation split")
    if t.max_steps:
        steps = min(steps, t.max_steps)
    return steps, reserve, per_step - c.step_s
