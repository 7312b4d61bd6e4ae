"""Measuring what a run's pieces cost on the machine that runs it, for the time budget (budget.py plans with it).

The calibration steps are real training steps on the run's own first batches, timed and then
undone (weights, optimizer, counters and RNG restored), so a budgeted run is the same run as one
given its planned `max_steps` up front: same data order, same schedule.
"""

from __future__ import annotations

import copy
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cairn.checkpoint import store as ckpt
from cairn.data import num_batches
from cairn.training.budget import Costs

CALIBRATION_STEPS = 6  # the first is a warm-up (allocations, caches) and is not counted


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(trainer) -> Costs:
    """Time a few real steps, evaluation batches, one checkpoint and a few generated tokens; leave
    the trainer exactly as it was. Every rank gets the same figures (their mean)."""
    model, opt = trainer.model, trainer.optimizer
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_state = copy.deepcopy(trainer.state)
    saved_rng, saved_torch_rng = ckpt.rng_state(), torch.get_rng_state()
    try:
        costs = [_step_s(trainer), _eval_batch_s(trainer), _timed(lambda: _probe_checkpoint(trainer)),
                 _story_token_s(trainer)]
    finally:
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        opt.zero_grad(set_to_none=True)
        model.train()
        trainer.state = saved_state
        torch.set_rng_state(saved_torch_rng)
        ckpt.set_rng_state(saved_rng)
    world = trainer.dist.world
    return Costs(*(v / world for v in trainer.dist.sum(costs)))


def _step_s(trainer) -> float:
    def batches():
        while True:  # a split shorter than the calibration just starts over
            yield from trainer.loader(trainer.train_ds, 0)

    source, accum = batches(), trainer.cfg.train.grad_accum
    times = []
    for _ in range(CALIBRATION_STEPS):
        micro = [next(source) for _ in range(accum)]
        times.append(_timed(lambda micro=micro: trainer.train_step(micro)))
    return statistics.median(times[1:])


def _eval_batch_s(trainer) -> float:
    held_out = trainer.val_ds or trainer.test_ds
    if held_out is None:
        return 0.0
    n = min(3, num_batches(len(held_out), trainer.cfg.train.batch_size * trainer.dist.world, drop_last=False))
    # n batches minus one: the first pays one-off costs the hundredth does not
    many = _timed(lambda: trainer.evaluate(held_out, max_batches=n))
    one = _timed(lambda: trainer.evaluate(held_out, max_batches=1))
    return max((many - one) / max(n - 1, 1), 0.0)


def _probe_checkpoint(trainer) -> None:
    """A real save: every rank gathers (FSDP), rank 0 writes, into a scratch folder (the run
    directory is not made yet)."""
    weights = trainer.dist.full_weights(trainer.model)
    state = {"optimizer": trainer.dist.optimizer_state(trainer.model, trainer.optimizer)}

    def write() -> None:
        probe = Path(tempfile.mkdtemp(prefix="cairn-budget-probe-"))
        try:
            ckpt.save_checkpoint(probe / "c", weights, {"kind": "probe"}, state)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    trainer.dist.on_main(write, share_result=False)


def _story_token_s(trainer) -> float:
    if not trainer.cfg.train.end_stories:
        return 0.0
    from cairn.inference.generate import SamplingConfig, generate_ids

    def gen(n_tok: int):
        s = SamplingConfig(max_new_tokens=n_tok, temperature=1.0, seed=0, stop_at_eot=False)
        list(generate_ids(trainer.model, [trainer.tokenizer.eot_id], s))

    gen(2)  # warm-up
    return max((_timed(lambda: gen(24)) - _timed(lambda: gen(8))) / 16, 0.0)
