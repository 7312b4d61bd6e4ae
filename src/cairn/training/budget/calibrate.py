"""Measuring what a run's pieces cost on the machine that runs it, for the time budget (budget.py plans with it).

The calibration steps are real training steps on the run's own first batches, timed and then
undone (weights, optimizer, counters and RNG restored), so a budgeted run is the same run as one
given its planned `max_steps` up front: same data order, same schedule.
"""

from __future__ import annotations

import copy
from functools import partial
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from cairn.checkpoint import store as ckpt
from cairn.checkpoint.schema import TrainState
from cairn.data.formats import Rows
from cairn.inference.generate import SamplingConfig, generate_ids
from cairn.model.transformer import Transformer
from cairn.training.budget.plan import Costs
from cairn.training.distributed import Dist
from cairn.training.optim import Optimizer
from cairn.training.step import Batch

CALIBRATION_STEPS = 6  # the first is a warm-up (allocations, caches) and is not counted


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Snapshot:
    """The weights, optimizer, counters and random generators, put back as they were on leaving."""

    def __init__(self, model: Transformer, optimizer: Optimizer, state: TrainState):
        self.model, self.optimizer, self.state = model, optimizer, state

    def __enter__(self) -> Snapshot:
        self.weights = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.opt = copy.deepcopy(self.optimizer.state_dict())
        self.counters = copy.deepcopy(self.state)
        self.rng, self.torch_rng = ckpt.rng_state(), torch.get_rng_state()
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.load_state_dict(self.weights)
        self.optimizer.load_state_dict(self.opt)
        self.optimizer.zero_grad(set_to_none=True)
        self.model.train()
        for name, value in vars(self.counters).items():
            setattr(self.state, name, value)
        torch.set_rng_state(self.torch_rng)
        ckpt.set_rng_state(self.rng)


def measure(*, step: Callable[[list[Batch]], object], train_batches: Callable[[], Iterable[Batch]], accum: int,
            score: Callable[[Rows, int], object], held_out: Optional[Rows], held_out_batches: int,
            weights: Callable[[], dict[str, torch.Tensor]], optimizer_state: Callable[[], dict],
            model: Transformer, story_start: int, story_tokens: bool, snapshot: Snapshot, dist: Dist) -> Costs:
    """Time a few real steps, evaluation batches, one checkpoint and a few generated tokens; leave
    the run exactly as it was. Every rank gets the same figures (their mean)."""
    with snapshot:
        costs = [_step_s(step, train_batches, accum), _eval_batch_s(score, held_out, held_out_batches),
                 _timed(lambda: _probe_checkpoint(weights, optimizer_state, dist)),
                 _story_token_s(model, story_start) if story_tokens else 0.0]
    return Costs(*(v / dist.world for v in dist.sum(costs)))


def _step_s(step: Callable[[list[Batch]], object], train_batches: Callable[[], Iterable[Batch]], accum: int) -> float:
    def batches() -> Iterator[Batch]:
        while True:  # a split shorter than the calibration just starts over
            yield from train_batches()

    source = batches()
    times = []
    for _ in range(CALIBRATION_STEPS):
        micro = [next(source) for _ in range(accum)]
        times.append(_timed(partial(step, micro)))
    return statistics.median(times[1:])


def _eval_batch_s(score: Callable[[Rows, int], object], held_out: Optional[Rows], n_batches: int) -> float:
    if held_out is None:
        return 0.0
    n = min(3, n_batches)
    # n batches minus one: the first pays one-off costs the hundredth does not
    many = _timed(lambda: score(held_out, n))
    one = _timed(lambda: score(held_out, 1))
    each = (many - one) / max(n - 1, 1)
    # on a loaded machine the difference can come out at zero or below: a batch never costs nothing,
    # so the mean of the n (one-off costs and all) stands in, erring on the long side
    return each if each > 0 else many / n


def _probe_checkpoint(weights: Callable[[], dict[str, torch.Tensor]], optimizer_state: Callable[[], dict],
                      dist: Dist) -> None:
    """A real save: every rank gathers (FSDP), rank 0 writes, into a scratch folder (the run
    directory is not made yet)."""
    tensors, state = weights(), {"optimizer": optimizer_state()}

    def write() -> None:
        probe = Path(tempfile.mkdtemp(prefix="cairn-budget-probe-"))
        try:
            ckpt.save_checkpoint(probe / "c", tensors, {"kind": "probe"}, state)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    dist.on_main(write, share_result=False)


def _story_token_s(model: Transformer, start: int) -> float:
    def gen(n_tok: int) -> None:
        s = SamplingConfig(max_new_tokens=n_tok, temperature=1.0, seed=0, stop_at_eot=False)
        list(generate_ids(model, [start], s))

    gen(2)  # warm-up
    return max((_timed(lambda: gen(24)) - _timed(lambda: gen(8))) / 16, 0.0)
