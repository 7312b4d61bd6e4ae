"""What a resumable checkpoint holds, declared once.

A checkpoint is the state of a run's parts, each a `Stateful` (`state_dict` / `load_state_dict`,
as torch's modules and optimizers, and torchtitan's checkpointer): the weights, the optimizer, the
random generators, the counters (`TrainState`) and the step plan (`Plan`). `PARTS` says which file
of the checkpoint directory each part's state goes to; saving and restoring both walk it. The
counters' and the plan's fields carry their own checks, from which `verify` derives the check of a
state.json before anything of it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional, Protocol

BIG = 10**15  # no counter of a real run comes near it
Check = Callable[[Any], Optional[str]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


WEIGHTS, TRAINER, STATE = "model.safetensors", "trainer.pt", "state.json"
# part -> the file its state_dict is written into (several parts share a file, each under its own keys)
# (restored in this order: the counters before the generators, whose fallback seed is the step)
PARTS: dict[str, str] = {"model": WEIGHTS, "counters": STATE, "plan": STATE, "optimizer": TRAINER,
                         "torch_rng": TRAINER, "python_rng": STATE}


def whole(lo: int = 0, hi: int = BIG) -> Check:
    def check(v: Any) -> Optional[str]:
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be a whole number"
        return None if lo <= v <= hi else f"must be from {lo} to {hi:.0e}"
    return check


def number(allow_none: bool = False) -> Check:
    def check(v: Any) -> Optional[str]:
        if v is None and allow_none:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "must be a finite number" + (" or null" if allow_none else "")
        return None
    return check


def counter(default: Any, check: Check, optional: bool = False) -> Any:
    """A saved field, its check, and whether checkpoints written before it existed may lack it."""
    return field(default=default, metadata={"check": check, "optional": optional})


@dataclass
class TrainState:
    """Everything besides weights and optimizer that decides the rest of a run."""
    step: int = counter(0, whole())  # optimizer steps done
    epoch: int = counter(0, whole())  # current epoch (0-based)
    # global micro-batches (of processes x batch_size rows) of this epoch already consumed
    batch_in_epoch: int = counter(0, whole())
    best_val_loss: float = counter(math.inf, number(allow_none=True))
    bad_evals: int = counter(0, whole())  # evaluations since the best one (early stopping)
    tokens_seen: int = counter(0, whole())  # real target tokens trained on
    last_eval_step: int = counter(-1, whole(-1))
    skipped_steps: int = counter(0, whole())  # updates skipped for a non-finite loss
    # running sums behind the logged train losses, so a resumed run logs what the original would
    window_loss_sum: float = counter(0.0, number())
    window_tokens: int = counter(0, whole())
    epoch_loss_sum: float = counter(0.0, number())
    epoch_tokens: int = counter(0, whole())

    def state_dict(self) -> dict[str, Any]:
        """JSON has no infinity: an unset best loss is written as null."""
        return {"state": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                          for k, v in asdict(self).items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raw = dict(state["state"])
        raw["best_val_loss"] = math.inf if raw["best_val_loss"] is None else raw["best_val_loss"]
        for f in fields(self):
            setattr(self, f.name, raw.get(f.name, f.default))


@dataclass
class Plan:
    """The steps a run takes: from its config, or fitted to a time budget (`training.budget`)."""
    micro_batches_per_epoch: int = counter(1, whole(1))
    steps_per_epoch: int = counter(1, whole(1))
    total_steps: int = counter(0, whole())
    warmup_steps: int = counter(0, whole())
    epochs: int = counter(1, whole(1))
    budget_s: float = counter(0.0, number())  # the time budget the steps were planned for (0 = from the config)
    step_s: float = counter(0.0, number())  # the measured seconds per step behind that plan
    # the decay re-laid by the last re-plan: from this step, with this much of it done
    relaid_at: int = counter(0, whole(), optional=True)
    relaid_progress: float = counter(0.0, number(), optional=True)


def checks(cls: type) -> tuple[dict[str, Check], dict[str, Check]]:
    """(required, optional) field checks of a saved dataclass, from its fields' declarations."""
    required = {f.name: f.metadata["check"] for f in fields(cls) if not f.metadata.get("optional")}
    optional = {f.name: f.metadata["check"] for f in fields(cls) if f.metadata.get("optional")}
    return required, optional
