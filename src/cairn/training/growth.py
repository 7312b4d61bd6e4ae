"""`grow_to_epochs`: turn a time budget's spare compute into a wider model instead of more epochs.

A budget plans as many steps as fit. On a fast machine and a small dataset that can be ten or
more epochs of the same stories, and the last of them overfit (a 10-minute CPU run of cpu-10min
on 0.9M training tokens). Repeating data is worth less with each pass, so past a few epochs the
compute buys more as parameters than as repetitions. Before training starts, the planner times one
eager step of the configured model and of wider ones (more heads of the same size, the MLP grown
in proportion), estimates how many epochs each would get from the budget, and trains the
narrowest one that stays within `grow_to_epochs` (the widest candidate when none does). The
estimate uses eager steps, which a compiled model beats, so the plan measured afterwards may give
somewhat more epochs; the log says both.
"""

from __future__ import annotations

import copy
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import ModelConfig, RunConfig
from ..model import build_model
from ..ops import IGNORE_INDEX
from ..runtime import autocast

log = logging.getLogger(__name__)

MAX_WIDTH = 4  # the widest candidate, as a multiple of the configured d_model
TIMED_STEPS = 3  # after one warm-up step


@dataclass
class Candidate:
    model: ModelConfig
    step_s: float  # one eager training step, measured
    epochs: float  # what the budget would give it (an estimate)


def wider(cfg: ModelConfig, max_width: int = MAX_WIDTH) -> list[ModelConfig]:
    """The configured shape, then ones with 1, 2, ... more heads of the same size, up to
    `max_width` times its d_model; the MLP keeps its ratio to d_model (rounded to 16)."""
    head = cfg.d_model // cfg.n_heads
    shapes = [cfg]
    for heads in range(cfg.n_heads + 1, cfg.n_heads * max_width + 1):
        c = copy.deepcopy(cfg)
        c.d_model, c.n_heads = heads * head, heads
        c.d_mlp = max(16, round(cfg.d_mlp * c.d_model / cfg.d_model / 16) * 16)
        shapes.append(c)
    return shapes


def choose(candidates: list[Candidate], max_epochs: float) -> Candidate:
    """The narrowest candidate whose epochs stay within `max_epochs`; the widest when none does.
    Candidates come narrowest first, the configured one first of all."""
    for c in candidates:
        if c.epochs <= max_epochs:
            return c
    return candidates[-1]


def step_seconds(model_cfg: ModelConfig, batch: dict, device: torch.device, precision: str,
                 story_mask: Optional[Callable] = None) -> float:
    """The median time of an eager forward, backward and AdamW step of a fresh model of this shape."""
    model = build_model(model_cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = batch["input_ids"].to(device), batch["labels"].to(device)
    n = max(int((y != IGNORE_INDEX).sum()), 1)
    times = []
    for _ in range(TIMED_STEPS + 1):
        began = time.perf_counter()
        with autocast(device, precision):
            loss_sum, _ = model(x, labels=y, stories=story_mask(x) if story_mask else None)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def grow(cfg: RunConfig, dist, precision: str, batch: dict, eot_id: int, steps_per_epoch: int,
         seconds_left: float) -> Optional[ModelConfig]:
    """The model shape to train under the budget, or None to keep the configured one. Leaves the
    torch RNG as it found it (the caller builds the chosen model from the same seeded state)."""
    t = cfg.train
    rng = torch.get_rng_state()
    mask = (lambda x: (x == eot_id).cumsum(1)) if cfg.data.story_mask else None
    candidates = []
    try:
        for shape in wider(cfg.model):
            step_s = dist.sum([step_seconds(shape, batch, dist.device, precision, mask)])[0] / dist.world
            epochs = seconds_left / (step_s * steps_per_epoch)
            candidates.append(Candidate(shape, step_s, epochs))
            if epochs <= t.grow_to_epochs:
                break  # wider ones would only get fewer
    finally:
        torch.set_rng_state(rng)
    chosen, base = choose(candidates, t.grow_to_epochs), candidates[0]
    if chosen is base:
        log.info(f"time budget: about {base.epochs:.1f} epochs fit (grow_to_epochs {t.grow_to_epochs:g}): "
                 "the configured model")
        return None
    m = chosen.model
    log.info(f"time budget: about {base.epochs:.1f} epochs of the configured model would fit, more than "
             f"grow_to_epochs {t.grow_to_epochs:g}: training a wider one, d_model {m.d_model} / {m.n_heads} heads / "
             f"MLP {m.d_mlp} (about {chosen.epochs:.1f} epochs; eager steps measured: {base.step_s * 1e3:.1f} ms "
             f"configured, {chosen.step_s * 1e3:.1f} ms chosen)")
    return m
