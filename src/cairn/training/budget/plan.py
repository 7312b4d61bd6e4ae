"""`--time-budget`: plan a run's steps so that the whole command ends within the budget.

Pure arithmetic on measured costs (see calibrate.py for the measuring): the plan subtracts what
set-up already used, reserves the end of the run (its validation, test, final checkpoint,
stories), and spreads the periodic evaluations and checkpoints over the steps. While the run goes,
`replan` fits the plan to the pace actually measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from cairn.util.errors import CairnError, option

SAFETY_FRAC = 0.03  # of the budget, for a machine that slows down while the run goes (noisy neighbours)
SAFETY_S = 2.0
PACE_WINDOW = 200  # steps over which a running plan measures its pace
SLOWDOWN_STEPS = 20  # the last steps that say how much slower than measured the machine runs now
GROW_MARGIN = 0.01  # a plan grows only by more than this fraction: no re-plan for every small wobble


@dataclass
class Costs:
    step_s: float  # one optimizer step
    eval_batch_s: float  # one validation/test batch
    checkpoint_s: float  # one resumable checkpoint written
    story_token_s: float  # one generated token (KV cache)


@dataclass
class Workload:
    """What the run does besides its steps, in the units the costs are measured in."""
    steps_per_epoch: int
    val_batches: int  # a whole validation split (0 = no validation split)
    test_batches: int  # the test at the end (0 = none)
    eval_every: int  # a periodic evaluation every N steps (0 = none) ...
    eval_sample_batches: int  # ... of this many batches
    epoch_val_batches: int  # the validation at an epoch's end
    checkpoint_every: int  # a step checkpoint every N steps (0 = none)
    story_tokens: int  # tokens generated at the end
    max_steps: int = 0  # a cap on the steps (0 = none)
    best_val_batches: int = 0  # the best weights validated again at the end (end_on_best)
    end_val_bound: int = 0  # eval.end_val_batches: the most batches an end evaluation is planned for (0 = none)
    end_test_bound: int = 0  # eval.end_test_batches: the most batches the final test scores (0 = none)
    whole_val_batches: int = 0  # the validation split's batches, however many the bound lets the end score


@dataclass
class BudgetPlan:
    steps: int
    reserve_s: float  # kept for the end of the run
    overhead_s: float  # evaluations and checkpoints, spread per step
    epoch_end_s: float  # one epoch end: its validation and checkpoint
    past_budget_s: float = 0.0  # what the end is expected to run past the budget (a max_steps run, the test)
    end_in_budget: bool = True  # False: a max_steps run whose end does not fit (no time is kept for it)


def test_in_reserve(w: Workload) -> bool:
    """Whether the budget keeps time for the test. A test bounded by `end_test_bound` always fits.
    An unbounded one scores the whole test split, so its cost grows with the data: when it holds
    more batches than `end_val_bound`, it runs after the budget (its time is not taken from the
    steps) and the run says so; the shared sample's test fits."""
    return not w.end_val_bound or bool(w.end_test_bound) or w.test_batches <= w.end_val_bound


def test_s(c: Costs, w: Workload) -> float:
    return w.test_batches * c.eval_batch_s


def end_reserve(c: Costs, w: Workload) -> float:
    """Seconds the end of the run needs after the last step, within the budget (the test only when
    `test_in_reserve`)."""
    return ((w.val_batches + w.best_val_batches) * c.eval_batch_s + (test_s(c, w) if test_in_reserve(w) else 0.0)
            + 3 * c.checkpoint_s + w.story_tokens * c.story_token_s)


def epoch_end_s(c: Costs, w: Workload) -> float:
    return w.epoch_val_batches * c.eval_batch_s + c.checkpoint_s


def overhead_per_step(c: Costs, w: Workload) -> float:
    """The periodic evaluations (each with a possible best-model save), checkpoints and epoch ends, per step."""
    per_step = 0.0
    if w.eval_every and w.val_batches:
        per_step += (w.eval_sample_batches * c.eval_batch_s + c.checkpoint_s) / w.eval_every
    if w.checkpoint_every:
        per_step += c.checkpoint_s / w.checkpoint_every
    return per_step + epoch_end_s(c, w) / w.steps_per_epoch


def margin_s(budget_s: float) -> float:
    """Seconds of the budget never planned for: kept for a machine that slows down."""
    return SAFETY_FRAC * budget_s + SAFETY_S


def plan(budget_s: float, elapsed_s: float, c: Costs, w: Workload) -> BudgetPlan:
    """As many steps as fit in what is left of the budget.

    A run with max_steps asked for that many steps: when its end does not fit after even one step,
    it takes as many of them as fit in what is left (the end then runs past the budget, and the log
    says by about how much) rather than being refused. Otherwise a budget too short is refused,
    naming the ways out."""
    reserve = end_reserve(c, w)
    left = budget_s - elapsed_s - margin_s(budget_s)
    overhead = overhead_per_step(c, w)
    steps = math.floor((left - reserve) / (c.step_s + overhead))
    after = 0.0 if test_in_reserve(w) else test_s(c, w)
    if steps < 1 and w.max_steps:
        steps = min(w.max_steps, max(1, math.floor(left / (c.step_s + overhead))))
        after += max(0.0, elapsed_s + steps * (c.step_s + overhead) + reserve - budget_s)
        return BudgetPlan(steps, 0.0, overhead, epoch_end_s(c, w), after, end_in_budget=False)
    if steps < 1:
        raise CairnError(f"the time budget of {budget_s:.0f}s is too short: set-up took {elapsed_s:.0f}s, the end "
                         f"of the run needs about {reserve:.0f}s and one step {c.step_s:.2f}s; raise "
                         f"{option('budget.time_budget')} or turn it off ({option('budget.time_budget')} off, with "
                         f"{option('train.max_steps')} N for a fixed number of steps), or shrink the model or the "
                         f"validation split ({option('eval.end_val_batches')} bounds the end's)")
    if w.max_steps:
        steps = min(steps, w.max_steps)
    return BudgetPlan(steps, reserve, overhead, epoch_end_s(c, w), after)


def replan(step: int, total: int, warmup: int, pace_s: float, left_s: float, overhead_s: float,
           max_steps: int = 0) -> Optional[int]:
    """The new total steps for the pace measured over the last steps, or None to keep `total`.

    When the steps left no longer fit, the plan shrinks at once, so the deadline never falls
    mid-schedule at a high learning rate. Once a tenth of the plan is done (the calibration steps
    are a noisy estimate) it also grows, by more than GROW_MARGIN at a time, when the machine has
    sped up: otherwise a run that speeds up ends early and wastes its budget."""
    fits = step + math.floor(left_s / (pace_s + overhead_s))
    if max_steps:
        fits = min(fits, max_steps)
    fits = max(fits, step, warmup)
    grow = step >= total / 10 and fits > total * (1 + GROW_MARGIN)
    return fits if fits < total or grow else None
