"""One optimizer step: the scheduled learning rate, `grad_accum` micro-batches forward and backward,
the global gradient norm clipped, the optimizer's update.

The step's loss is the mean over every real (non-padding) target token of its micro-batches, so
padding and uneven micro-batches never change the weight of a token. Under torchrun each rank
runs its share of the global batch; token counts and losses are summed over ranks, gradients are
reduced once per step (on its last micro-batch).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from cairn.checkpoint.schema import TrainState
from cairn.config.sections import OptimConfig
from cairn.model.ops import IGNORE_INDEX
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast
from cairn.training.distributed import Dist
from cairn.training.optim import Optimizer
from cairn.util.errors import CairnError, option

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    tokens: int  # real target tokens trained on (0 when the update was skipped)


class Stepper:
    def __init__(self, model: Transformer, wrapped: nn.Module, forward: Forward, optimizer: Optimizer, dist: Dist,
                 precision: str, optim: OptimConfig, story_start: Optional[int],
                 newest_checkpoint: Callable[[], Optional[Path]], rows: int):
        """`forward` is the wrapped model, compiled or not; `story_start` the token that starts a
        story when rows attend only within their own stories (the story mask), else None; `rows`
        the rows of a full micro-batch (0: run every batch on `forward`)."""
        self.model, self.wrapped, self.forward, self.optimizer = model, wrapped, forward, optimizer
        self.dist, self.precision, self.optim = dist, precision, optim
        self.story_start, self.newest_checkpoint, self.rows = story_start, newest_checkpoint, rows

    def forward_for(self, x: torch.Tensor) -> Forward:
        """The compiled forward for full micro-batches; the eager one for an epoch's short last batch
        (or a rank's short share of it). Compiling that one shape again cost 14.6 s with an empty
        compile cache (cpu-10min's d192 on a 2-core EPYC, torch 2.13), against 0.026 s for its eager
        step, once an epoch (benchmarks/records/compile-shapes-cpu-10min.json)."""
        return self.wrapped if self.rows and x.shape[0] < self.rows else self.forward

    def __call__(self, micro: list[Batch], lr: float, s: TrainState) -> StepResult:
        """One optimizer step over several micro-batches, at learning rate `lr`; counts it in `s`."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        device, dist = self.dist.device, self.dist
        # the step's real tokens on every rank, so each weighs 1/n_tokens of the step wherever it is
        n_tokens = int(dist.sum([float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro))])[0])
        loss_total = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            x, y = b["input_ids"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True)
            # gradients are reduced across ranks once per step, on its last micro-batch
            with dist.grad_sync(self.wrapped, sync=i == len(micro) - 1):
                forward = self.forward_for(x)
                with autocast(device, self.precision):
                    if self.story_start is not None:  # a story starts at its <|endoftext|> (data/batching.py)
                        loss_sum, _ = forward(x, labels=y, stories=(x == self.story_start).cumsum(1))
                    else:
                        loss_sum, _ = forward(x, labels=y)
                # DDP and FSDP average the ranks' gradients: x world makes that average the token sum
                (loss_sum * dist.world / n_tokens).backward()
            loss_total += loss_sum.detach()
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        grad_norm = dist.clip_grad_norm(self.model.parameters(), clip)
        loss = dist.sum([float(loss_total)])[0] / max(n_tokens, 1)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self.skip(loss, grad_norm, s)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.tokens_seen += n_tokens
        return StepResult(loss, grad_norm, n_tokens)

    def skip(self, loss: float, grad_norm: float, s: TrainState) -> StepResult:
        """A non-finite loss or gradient: skip the update while `skip_nonfinite` allows, else stop."""
        self.optimizer.zero_grad(set_to_none=True)
        allowed = self.optim.skip_nonfinite
        if s.skipped_steps < allowed:
            s.skipped_steps += 1
            s.step += 1  # the batch is used up and the schedule moves on, the weights do not
            log.info(f"step {s.step}: loss {loss} / gradient norm {grad_norm} is not finite: update skipped "
                     f"({s.skipped_steps} of at most {allowed})")
            return StepResult(loss, grad_norm, 0)
        raise CairnError(f"loss {loss} / gradient norm {grad_norm} is not finite at step {s.step + 1}: "
                         f"stopped; the last good checkpoint is {self.newest_checkpoint() or 'none'}; "
                         f"lower {option('schedule.lr')}, raise {option('schedule.warmup_steps')} or allow "
                         f"{option('optim.skip_nonfinite')} N, then resume or restart")
