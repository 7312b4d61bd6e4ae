"""The optimizers (AdamW with weight decay on matrices only; or Muon for the blocks' matrices with
AdamW for the rest) and the learning-rate schedules."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from cairn.config.sections import OptimConfig, ScheduleConfig


class Float32Muon(torch.optim.Optimizer):
    """torch.optim.Muon's update (Nesterov momentum, 5 quintic Newton-Schulz steps, Moonshot's
    "match_rms_adamw" scale 0.2 * sqrt(max(rows, cols)), decoupled weight decay), with the
    Newton-Schulz products in float32. torch's runs them in bfloat16, which CPUs without bf16
    instructions emulate: 8.1 s per step against 0.8 s for AdamW on a 2-core AMD EPYC (AVX2),
    torch 2.13.0 CPU (benchmarks/records/ablation-cpu-10min.json, stages 1 and 2). On CUDA cairn uses
    torch's own. Same math as torch's (tested against it in float32)."""

    NS = (3.4445, -4.775, 2.0315)

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.1,
                 momentum: float = 0.95, ns_steps: int = 5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))

    @staticmethod
    def orthogonalise(g: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
        a, b, c = Float32Muon.NS
        x = g.float()
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        return x.T if tall else x

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: Muon never re-evaluates the loss
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # torch: buf = mu * buf + (1 - mu) * grad
                update = p.grad.lerp(buf, mu)  # Nesterov
                update = self.orthogonalise(update, group["ns_steps"]).to(p.dtype)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


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


# what `make_optimizer` gives: one of torch's optimizers, or Muon and AdamW stepped as one
Optimizer = torch.optim.Optimizer | MuonWithAdamW


def _adamw(groups: list[dict], t: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    # The fused kernel updates every tensor in one call instead of a dozen elementwise passes per
    # tensor. It exists for GPUs and CPUs; on a 2-core AMD EPYC (torch 2.13.0) it took AdamW's step
    # over the float32 master weights from 31 to 2.4 ms at cpu-10min's shape and from 985 to 140 ms
    # for a d256 GPT-2-vocabulary model (one thread each), to within float rounding of the same update.
    return torch.optim.AdamW(groups, lr=lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=device.type in ("cuda", "cpu"))


def make_optimizer(model: torch.nn.Module, t: OptimConfig, lr: float, device: torch.device) -> Optimizer:
    """Decay every parameter with two or more dimensions (linear weights, embeddings); not biases
    or LayerNorm gains, which decay would only pull towards zero for no regularising benefit."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if t.optimizer == "muon":
        # Muon orthogonalises each update matrix: it is for the hidden layers' matrices only, not
        # for the embedding (a lookup table) or the output head (Keller Jordan; torch's docs)
        hidden = [p for n, p in named if n.startswith("blocks.") and p.dim() == 2]
        rest = [(n, p) for n, p in named if not (n.startswith("blocks.") and p.dim() == 2)]
        muon: torch.optim.Optimizer
        if device.type == "cuda":
            muon = torch.optim.Muon(hidden, lr=lr, weight_decay=t.weight_decay, momentum=t.muon_momentum,
                                    nesterov=True, adjust_lr_fn="match_rms_adamw")
        else:
            muon = Float32Muon(hidden, lr=lr, weight_decay=t.weight_decay, momentum=t.muon_momentum)
        return MuonWithAdamW(muon, _adamw(_adamw_groups(rest, t), t, lr, device))
    return _adamw(_adamw_groups(named, t), t, lr, device)


def _adamw_groups(named: list[tuple[str, torch.nn.Parameter]], t: OptimConfig) -> list[dict]:
    embed_wd = t.weight_decay if t.embed_weight_decay < 0 else t.embed_weight_decay
    own_group = t.embed_lr_scale != 1.0 or embed_wd != t.weight_decay
    embed = [p for n, p in named if n == "wte.weight"] if own_group else []
    decay = [p for _, p in named if p.dim() >= 2 and not any(p is e for e in embed)]
    no_decay = [p for _, p in named if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embed:
        # a row of the embedding is updated only when its token is in the batch, so it sees far
        # fewer updates than the matrices it feeds; a separate group (absent when it has nothing of
        # its own, so older checkpoints still load) lets it move faster. Decoupled decay shrinks
        # it by lr * scale * decay every step, its token seen or not.
        groups.append({"params": embed, "weight_decay": embed_wd, "lr_scale": t.embed_lr_scale})
    return groups


def warmup_steps(t: ScheduleConfig, total_steps: int) -> int:
    if t.warmup_steps >= 0:
        return min(t.warmup_steps, total_steps)
    return int(round(t.warmup_frac * total_steps))


def lr_at(step: int, t: ScheduleConfig, total_steps: int, warmup: int | None = None,
          relaid: tuple[int, float] = (0, 0.0)) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up from 0 to lr over the
    warm-up steps (`warmup`, by default as the config sets it for `total_steps`), then "linear"
    (the tutorial's) or "cosine" decay to min_lr at total_steps, or "constant". A warm-up as long
    as the run never decays; that is allowed but not a default. `relaid`: see `decay_progress`."""
    warm = warmup_steps(t, total_steps) if warmup is None else warmup
    if step < warm:
        return t.lr * (step + 1) / warm  # reaches lr on the last warm-up step
    if t.schedule == "constant" or total_steps <= warm:
        return t.lr
    progress = decay_progress(step, warm, total_steps, relaid)
    if t.schedule == "linear":
        return t.min_lr + (t.lr - t.min_lr) * (1.0 - progress)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def decay_progress(step: int, warm: int, total_steps: int, relaid: tuple[int, float] = (0, 0.0)) -> float:
    """How far the decay has gone at `step`, from 0 (its start) to 1 (min_lr at total_steps).

    When a time budget's re-plan moves the end of a run at step k, the rest of the decay is
    re-laid from where it stood: `relaid` = (k, progress at k), and the progress then runs evenly
    from there to 1 at the new total. The rate in force at k stays, and it only ever falls after
    it (a decay stretched around its own step would raise it)."""
    at, done = relaid
    if at and step >= at:
        return min(1.0, done + (1.0 - done) * (step - at) / max(total_steps - at, 1))
    return min(1.0, max(0.0, (step - warm) / (total_steps - warm)))
