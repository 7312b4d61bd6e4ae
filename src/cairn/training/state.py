"""What a run has done and what it plans to do: saved in every checkpoint, restored on resume."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Everything besides weights and optimizer that decides the rest of a run."""
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    batch_in_epoch: int = 0  # global micro-batches (of processes x batch_size rows) of this epoch already consumed
    best_val_loss: float = math.inf
    bad_evals: int = 0  # evaluations since the best one (early stopping)
    tokens_seen: int = 0  # real target tokens trained on
    last_eval_step: int = -1
    skipped_steps: int = 0  # updates skipped for a non-finite loss
    # running sums behind the logged train losses, so a resumed run logs what the original would
    window_loss_sum: float = 0.0
    window_tokens: int = 0
    epoch_loss_sum: float = 0.0
    epoch_tokens: int = 0

    def to_json(self) -> dict:
        """JSON has no infinity: an unset best loss is written as null."""
        return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in asdict(self).items()}


@dataclass
class Plan:
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    epochs: int
    budget_s: float = 0.0  # the time budget the steps were planned for (0 = planned from the config)
    step_s: float = 0.0  # the measured seconds per step behind that plan
    # the decay re-laid by the last re-plan: from this step, with this much of it done (optim.decay_progress)
    relaid_at: int = 0
    relaid_progress: float = 0.0

    def move_end(self, step: int, total_steps: int) -> None:
        """End the run at `total_steps` instead, `step` steps being done (a time budget's re-plan).
        Once the decay has begun, what is left of it is re-laid from here; a warm-up under way keeps
        its length (changing it would move the rate up or down mid-ramp)."""
        from cairn.training.optim import decay_progress

        if step > self.warmup_steps:
            self.relaid_progress = decay_progress(step, self.warmup_steps, self.total_steps,
                                                  (self.relaid_at, self.relaid_progress))
            self.relaid_at = step
        self.total_steps, self.warmup_steps = total_steps, min(self.warmup_steps, total_steps)

    def lr(self, step: int, t) -> float:
        """The learning rate of optimizer step `step` (0-based) under this plan."""
        from cairn.training.optim import lr_at

        return lr_at(step, t, self.total_steps, self.warmup_steps, (self.relaid_at, self.relaid_progress))
