"""`grow_to_epochs`: turn a time budget's spare compute into a wider model instead of more epochs.

A budget plans as many steps as fit. On a fast machine and a small dataset that can be ten or
more epochs of the same stories (cpu-10min on a 2-core AVX-512 EPYC: about 11 epochs of the
0.9M-token training split in 10 minutes). Repeated data is worth less with each pass, so past a few
epochs the compute can buy more as parameters than as repetitions. When the measured plan of the
configured model has more than `grow_to_epochs` epochs, the planner picks a wider shape (more
heads of the same size, the MLP in proportion, rounded to 64) whose estimated epochs, at a step
time scaled by its FLOPs per token, stay within `grow_to_epochs`; the build then measures that
model and plans it as any other (`training/build.py`). A small model's step costs more than its FLOPs say
(per-operator overheads), so the estimate errs towards a narrower model and more epochs, never
towards one that fits fewer steps than planned. A run that compiles measures the configured model
without compiling it first (build.py): its eager plan, if it already has too many epochs, chooses
the width (narrower, if anything, than its compiled plan would), and the compiling is spent on the
model that trains.
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

from cairn.config.sections import ModelConfig
from cairn.model.transformer import Transformer
from cairn.checkpoint.schema import Plan

log = logging.getLogger(__name__)

MAX_WIDTH = 4  # the widest candidate, as a multiple of the configured d_model


def wider(cfg: ModelConfig, max_width: int = MAX_WIDTH) -> list[ModelConfig]:
    """The configured shape, then ones with 1, 2, ... more heads of the same size, up to
    `max_width` times its d_model; the MLP keeps its ratio to d_model (rounded to 64, a size the
    matmul kernels like)."""
    head = cfg.d_model // cfg.n_heads
    shapes = [cfg]
    for heads in range(cfg.n_heads + 1, cfg.n_heads * max_width + 1):
        c = copy.deepcopy(cfg)
        c.d_model, c.n_heads = heads * head, heads
        c.d_mlp = max(64, round(cfg.d_mlp * c.d_model / cfg.d_model / 64) * 64)
        shapes.append(c)
    return shapes


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    with torch.device("meta"):
        return Transformer(cfg).flops_per_token(seq_len)


def choose(epochs: list[float], max_epochs: float) -> int:
    """Index of the narrowest candidate whose epochs stay within `max_epochs` (the widest when
    none does); candidates come narrowest first, the configured one first of all."""
    return next((i for i, e in enumerate(epochs) if e <= max_epochs), len(epochs) - 1)


def wider_for_budget(cfg: ModelConfig, seq_len: int, plan: Plan, max_epochs: float,
                     eager: bool = False) -> Optional[ModelConfig]:
    """The shape to train instead of `cfg`, whose measured budget plan is `plan`; None to keep it.
    `eager`: the plan was measured without torch.compile, for a run that compiles."""
    epochs = plan.total_steps / plan.steps_per_epoch
    if epochs <= max_epochs:
        then = "measuring it compiled" if eager else "the configured model"
        log.info(f"time budget: {epochs:.1f} epochs fit, within grow_to_epochs {max_epochs:g}: {then}")
        return None
    shapes = wider(cfg)
    base = flops_per_token(cfg, seq_len)
    estimates = [epochs * base / flops_per_token(s, seq_len) for s in shapes]
    i = choose(estimates, max_epochs)
    chosen = shapes[i]
    how = " without torch.compile" if eager else ""
    log.info(f"time budget: {epochs:.1f} epochs of the configured model{how} would fit, more than grow_to_epochs "
             f"{max_epochs:g}: measuring a wider one, d_model {chosen.d_model} / {chosen.n_heads} heads / MLP "
             f"{chosen.d_mlp} (about {estimates[i]:.1f} epochs by its FLOPs per token)")
    return chosen


def report(plan: Plan, max_epochs: float) -> None:
    epochs = plan.total_steps / plan.steps_per_epoch
    log.info(f"time budget: the wider model gets {plan.total_steps} steps, {epochs:.1f} epochs "
             f"(grow_to_epochs {max_epochs:g})")
