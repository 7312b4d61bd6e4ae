"""The optimizers (AdamW with weight decay on matrices only; or Muon for the blocks' matrices with
AdamW for the rest) and the learning-rate schedules."""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


class MuonWithAdamW:
    """torch's Muon for the transformer blocks' weight matrices, AdamW for everything else
    (embeddings, the output head, norms, biases), stepped as one optimizer. Muon's
    "match_rms_adamw" scaling gives its updates AdamW's size, so both follow one learning rate and
    one schedule. Checkpoints save both parts, keyed by parameter name (see distributed.py)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw
        self.parts = [muon, adamw]

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        for o in self.parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def _adamw(groups: list[dict], t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel is one launch per step instead of one per tensor; it exists for GPUs.
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, fused=device.type == "cuda")


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device):
    """Decay every parameter with two or more dimensions (linear weights, embeddings); not biases
    or LayerNorm gains, which decay would only pull towards zero for no regularising benefit."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "muon":
        # Muon orthogonalises each update matrix: it is for the hidden layers' matrices only, not
        # for the embedding (a lookup table) or the output head (Keller Jordan; torch's docs)
        hidden = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
        rest = [(n, p) for n, p in named if not (n.startswith("blocks.") and p.dim() == 2)]
        muon = torch.optim.Muon(hidden, lr=t.lr, weight_decay=t.weight_decay, momentum=t.muon_momentum,
                                nesterov=True, adjust_lr_fn="match_rms_adamw")
        groups = [{"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": t.weight_decay},
                  {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0}]
        return MuonWithAdamW(muon, _adamw(groups, t, device))
    decay = [p for _, p in named if p.dim() >= 2]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return _adamw(groups, t, device)


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
