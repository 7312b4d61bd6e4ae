"""The time budget: one object that owns a run's step plan, its deadline, its pace and re-plans.

Without a budget the plan is what the config asks for (its epochs, capped by max_steps). With one
(`budget.time_budget`), `fit` turns measured costs into as many steps as fit (plan.py's arithmetic),
keeping the end of the run and a margin; while the run goes, `after_step` records each step's
seconds and `replan` fits the plan to the pace measured over the last steps. The plan is a part of
every checkpoint (`state_dict`): a resumed budgeted run finishes the plan it was given.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import asdict, fields
from typing import Any, Optional

from cairn.checkpoint.schema import Plan
from cairn.config.sections import RunConfig, ScheduleConfig
from cairn.data.batching import num_batches
from cairn.data.formats import Rows, RunDatasets
from cairn.training.budget import plan as arithmetic
from cairn.training.distributed import Dist
from cairn.training.optim import decay_progress, lr_at, warmup_steps

log = logging.getLogger(__name__)


class Budget:
    def __init__(self, plan: Plan, seconds: Optional[float], started: float, dist: Dist, schedule: ScheduleConfig,
                 max_steps: int):
        self.plan, self.seconds, self.started, self.dist = plan, seconds, started, dist
        self.schedule, self.max_steps = schedule, max_steps
        self.deadline: Optional[float] = None  # monotonic time by which the last step must be done
        self.overhead_s = 0.0  # planned evaluation and checkpoint seconds per step
        self.epoch_end_s = 0.0  # planned seconds of an epoch end's validation and checkpoint
        self.reserve_s = 0.0  # planned seconds of the end of the run, at the measured pace
        self.restored = False  # a resumed budgeted run keeps the plan it was given
        self.pace: deque[float] = deque(maxlen=arithmetic.PACE_WINDOW)  # the last steps' seconds

    @property
    def active(self) -> bool:
        """Whether steps are planned for the clock: a budget, and a plan not carried over from a resume."""
        return self.seconds is not None and not self.restored

    # ------------------------------------------------------------ the schedule under this plan

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based) under this plan."""
        p = self.plan
        return lr_at(step, self.schedule, p.total_steps, p.warmup_steps, (p.relaid_at, p.relaid_progress))

    def move_end(self, step: int, total_steps: int) -> None:
        """End the run at `total_steps` instead, `step` steps being done. Once the decay has begun,
        what is left of it is re-laid from here; a warm-up under way keeps its length (changing it
        would move the rate up or down mid-ramp)."""
        p = self.plan
        if step > p.warmup_steps:
            p.relaid_progress = decay_progress(step, p.warmup_steps, p.total_steps, (p.relaid_at, p.relaid_progress))
            p.relaid_at = step
        p.total_steps, p.warmup_steps = total_steps, min(p.warmup_steps, total_steps)
        p.epochs = max(p.epochs, math.ceil(total_steps / p.steps_per_epoch))

    # ------------------------------------------------------------ planning

    def fit(self, costs: arithmetic.Costs, work: arithmetic.Workload) -> None:
        """Plan the steps that fit in what is left of the budget, given the measured costs."""
        assert self.seconds is not None
        elapsed = self.dist.sum([time.monotonic() - self.started])[0] / self.dist.world
        b = arithmetic.plan(self.seconds, elapsed, costs, work)
        p = self.plan
        self.plan = Plan(p.micro_batches_per_epoch, p.steps_per_epoch, b.steps, warmup_steps(self.schedule, b.steps),
                         math.ceil(b.steps / p.steps_per_epoch), budget_s=self.seconds, step_s=costs.step_s)
        # the deadline keeps the plan's margin, so that re-plans (which fit the steps to the time left
        # before it) never spend the margin meant for a machine that slows down
        self.deadline = self.started + self.seconds - b.reserve_s - arithmetic.margin_s(self.seconds)
        self.overhead_s, self.epoch_end_s, self.reserve_s = b.overhead_s, b.epoch_end_s, b.reserve_s
        log.info(f"time budget {self.seconds:.0f}s: {elapsed:.1f}s used by set-up and measuring; {costs.step_s:.3f}s "
                 f"per step, {costs.eval_batch_s:.3f}s per evaluation batch, {costs.checkpoint_s:.2f}s per checkpoint, "
                 f"{b.reserve_s:.0f}s kept for the end of the run -> {b.steps} steps "
                 f"({b.steps / p.steps_per_epoch:.2f} epochs)")
        if work.end_val_bound and work.val_batches < work.whole_val_batches:
            log.info(f"time budget: the end validates a fixed sample of {work.val_batches} of the validation split's "
                     f"{work.whole_val_batches:,} batches (eval.end_val_batches)")
        if not arithmetic.test_in_reserve(work):
            log.info(f"time budget: the test scores {work.test_batches:,} batches of the test split (about "
                     f"{arithmetic.test_s(costs, work):.0f}s) after the budget's end, apart from it")
        if not b.end_in_budget:
            log.warning(f"time budget: the end of the run does not fit in the budget after even one step; "
                        f"--max-steps {self.max_steps} asked for steps, so the run takes {b.steps} and ends about "
                        f"{b.past_budget_s:.0f}s past the budget (--time-budget off runs without one)")

    def after_step(self, seconds: float) -> None:
        self.pace.append(seconds)

    def replan(self, step: int) -> bool:
        """Under a time budget, fit the plan to the pace measured over the last steps (a machine's
        pace wanders, by 20% from one run to the next on shared hardware). What is left of the
        learning-rate decay is re-laid from the rate in force to the new end: the rate never jumps.
        Returns whether the plan changed."""
        if self.deadline is None or not self.pace:
            return False
        recent = sum(self.pace) / len(self.pace)
        # every rank must change the plan alike: they agree on the mean pace and time left
        pace, left = (v / self.dist.world for v in
                      self.dist.sum([recent, max(self.end_of_steps() - time.monotonic(), 0.0)]))
        new = arithmetic.replan(step, self.plan.total_steps, self.plan.warmup_steps, pace, left, self.overhead_s,
                                self.max_steps)
        if new is None:
            return False
        log.info(f"time budget: {pace:.3f}s per step over the last {len(self.pace)} steps: "
                 f"re-planned from {self.plan.total_steps} to {new} steps")
        self.move_end(step, new)
        return True

    def slowdown(self) -> float:
        """How many times slower than measured at the start the last steps ran (at least 1): their
        median, so that one slow step (torch.compile compiling the epoch's short last batch took
        seconds) does not read as a slower machine, while a neighbour's load, which slows every
        step, does."""
        if not self.pace or not self.plan.step_s:
            return 1.0
        recent = list(self.pace)[-arithmetic.SLOWDOWN_STEPS:]
        return max(1.0, statistics.median(recent) / self.plan.step_s)

    def end_of_steps(self) -> float:
        """The monotonic time by which the last step must be done: the deadline, moved earlier by
        the time the end of the run takes beyond its plan when the machine runs slower than it did
        at the start (a neighbour's load slows the end's evaluations as much as the steps)."""
        assert self.deadline is not None
        return self.deadline - self.reserve_s * (self.slowdown() - 1)

    def past_deadline(self) -> bool:
        """Whether this process is past the deadline (the loop agrees on it with the other ranks)."""
        return self.deadline is not None and time.monotonic() > self.end_of_steps()

    def no_room_for_epoch_end(self) -> bool:
        """Whether an epoch's end (validation and checkpoint) would run past the deadline: the run
        then stops there, and its end validates this very model once, in the time kept for it."""
        late = (self.deadline is not None
                and time.monotonic() + self.epoch_end_s * self.slowdown() > self.end_of_steps())
        return self.dist.sum([float(late)])[0] > 0

    # ------------------------------------------------------------ a part of every checkpoint

    def state_dict(self) -> dict[str, Any]:
        return {"plan": asdict(self.plan)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A budgeted run keeps the plan it was saved with (its steps were fitted to the budget
        once); a run without a budget plans from its config, which a resume may have changed."""
        saved = state.get("plan")
        if self.seconds is not None and saved:
            known = {f.name for f in fields(Plan)}
            self.plan = Plan(**{k: v for k, v in saved.items() if k in known})
            self.restored = True
            log.info(f"resume: keeping the time budget's plan of {self.plan.total_steps} steps "
                     "(the budget's clock is not re-applied to a resumed run)")


def initial_plan(n_rows: int, batch_size: int, grad_accum: int, epochs: int, max_steps: int, world: int,
                 schedule: ScheduleConfig) -> Optional[Plan]:
    """The steps the config asks for: its epochs of the training split, capped by max_steps; None
    when the split holds too few rows for one step."""
    # the last, short batch is kept: the loss is a mean over real tokens, so its rows weigh what
    # every other row weighs, and every training row is seen in every epoch
    micro = num_batches(n_rows, batch_size * world, drop_last=False)
    steps_per_epoch = -(-micro // grad_accum)
    if steps_per_epoch == 0:
        return None
    total = int(min(steps_per_epoch * epochs, max_steps or math.inf))
    return Plan(micro, steps_per_epoch, total, warmup_steps(schedule, total), epochs)


def workload(cfg: RunConfig, steps_per_epoch: int, data: RunDatasets) -> arithmetic.Workload:
    """What the run does besides its steps, in evaluation batches, checkpoints and tokens."""
    e, size = cfg.eval, cfg.train.batch_size

    def batches(rows: Optional[Rows]) -> int:
        if rows is None:
            return 0
        return num_batches(len(rows), size, drop_last=False)

    val, test = batches(data.val), batches(data.test)
    bound = e.end_val_batches
    whole = min(val, bound) if bound else val  # what a validation of the whole split scores under the budget
    if e.end_test_batches:
        test = min(test, e.end_test_batches)
    return arithmetic.Workload(
        steps_per_epoch=steps_per_epoch, val_batches=whole, test_batches=test if e.test_at_end else 0,
        eval_every=e.eval_every, eval_sample_batches=min(e.eval_batches, val) if e.eval_batches else whole,
        epoch_val_batches=min(val, e.eval_batches) if e.epoch_val == "sample" and e.eval_batches else whole,
        checkpoint_every=cfg.checkpoint.checkpoint_every, story_tokens=e.end_stories * e.end_story_tokens,
        max_steps=cfg.train.max_steps, best_val_batches=whole if e.end_on_best else 0, end_val_bound=bound,
        end_test_bound=e.end_test_batches,
        whole_val_batches=val)


def end_test_batches(cfg: RunConfig) -> int:
    """The most batches the final test scores: eval.end_test_batches under a time budget, else 0 (all)."""
    return cfg.eval.end_test_batches if cfg.budget.seconds is not None else 0


def end_val_batches(cfg: RunConfig) -> int:
    """The most batches a validation of the whole split scores in this run: eval.end_val_batches
    under a time budget (a resumed budgeted run too, so its end scores what it planned), else 0 (all)."""
    return cfg.eval.end_val_batches if cfg.budget.seconds is not None else 0
