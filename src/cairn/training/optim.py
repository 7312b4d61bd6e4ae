"""AdamW with weight decay on matrices only, and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """Decay every parameter with two or more dimensions (linear weights, embeddings); not biases
    or LayerNorm gains, which decay would only pull towards zero for no regularising benefit."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel is one launch per step instead of one per tensor; it exists for GPUs.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=fused)


def warmup_steps(t: TrainConfig, total_steps: int) -> int:
    if t.warmup_steps >= 0:
        return min(t.warmup_steps, total_steps)
    return int(round(t.warmup_frac * total_steps))


def lr_at(step: int, t: TrainConfig, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0 to lr over the
    warm-up steps, then "linear" (the tutorial's) or "cosine" decay to min_lr at total_steps, or
    "constant". A warm-up as long as the run never decays; that is allowed but not a default."""
    warm = warmup_steps(t, total_steps)
    if step < warm:
        return t.lr * (step + 1) / warm  # reaches lr on the last warm-up step
    if t.schedule == "constant" or total_steps <= warm:
        return t.lr
    progress = min(1.0, (step - warm) / (total_steps - warm))
    if t.schedule == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1.0 - progress)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
