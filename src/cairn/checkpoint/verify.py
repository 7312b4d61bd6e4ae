"""Checking a checkpoint before anything of it is loaded: state.json field by field, and the
weights' names, shapes and dtypes against the model they must fit.

A damaged checkpoint must be refused with a line that says which field is wrong, never half-loaded
or turned into a traceback (or, worse, accepted: a negative step would name its next checkpoint
after an existing one and overwrite it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

BIG = 10**15  # no counter of a real run comes near it


def _whole(lo: int = 0, hi: int = BIG) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if not isinstance(v, int) or isinstance(v, bool):
            return "must be a whole number"
        return None if lo <= v <= hi else f"must be from {lo} to {hi:.0e}"
    return check


def _number(allow_none: bool = False) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if v is None and allow_none:
            return None
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return "must be a finite number" + (" or null" if allow_none else "")
        return None
    return check


STATE = {"step": _whole(), "epoch": _whole(), "batch_in_epoch": _whole(), "best_val_loss": _number(allow_none=True),
         "bad_evals": _whole(), "tokens_seen": _whole(), "last_eval_step": _whole(-1), "skipped_steps": _whole(),
         "window_loss_sum": _number(), "window_tokens": _whole(), "epoch_loss_sum": _number(),
         "epoch_tokens": _whole()}
PLAN = {"micro_batches_per_epoch": _whole(1), "steps_per_epoch": _whole(1), "total_steps": _whole(),
        "warmup_steps": _whole(), "epochs": _whole(1), "budget_s": _number(), "step_s": _number()}
# fields a checkpoint may lack (those written before they existed), with their checks
PLAN_OPTIONAL = {"relaid_at": _whole(), "relaid_progress": _number()}


def _fields(table: dict, spec: dict, where: str, optional: Optional[dict] = None) -> Optional[str]:
    if not isinstance(table, dict):
        return f"{where} must be a table"
    optional = optional or {}
    for key, check in {**spec, **optional}.items():
        if key not in table:
            if key in optional:
                continue
            return f"{where}.{key} is missing"
        problem = check(table[key])
        if problem:
            return f"{where}.{key} {problem}, got {table[key]!r}"
    extra = sorted(set(table) - set(spec) - set(optional))
    return f"{where} holds unknown fields {extra}" if extra else None


def _words(v: Any, n: int) -> bool:
    """A list of n unsigned 32-bit words (a Mersenne Twister's state)."""
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and 0 <= x < 2**32 for x in v)


def _rng(rng: Any) -> Optional[str]:
    if not isinstance(rng, dict):
        return "rng must be a table"
    py, np_ = rng.get("python"), rng.get("numpy")
    if not (isinstance(py, list) and len(py) == 3 and isinstance(py[0], int) and _words(py[1], 625)
            and (py[2] is None or isinstance(py[2], float))):
        return "rng.python is not Python's random state"
    if not (isinstance(np_, list) and len(np_) == 5 and np_[0] == "MT19937" and _words(np_[1], 624)
            and isinstance(np_[2], int) and 0 <= np_[2] <= 624 and np_[3] in (0, 1)
            and isinstance(np_[4], (int, float)) and math.isfinite(np_[4])):
        return "rng.numpy is not NumPy's random state"
    return None


def state_problem(meta: dict) -> Optional[str]:
    """What is wrong with a resumable checkpoint's state.json, or None."""
    for problem in (_fields(meta.get("state"), STATE, "state"), _fields(meta.get("plan"), PLAN, "plan", PLAN_OPTIONAL),
                    _rng(meta.get("rng"))):
        if problem:
            return problem
    if not isinstance(meta.get("config"), dict):
        return "config must be a table"
    tok = meta.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("name"), str)):
        return "tokenizer must be a table with a name"
    world = meta.get("world_size", 1)
    if _whole(1, 1 << 20)(world):
        return f"world_size must be a whole number from 1, got {world!r}"
    if meta["state"]["batch_in_epoch"] > meta["plan"]["micro_batches_per_epoch"]:
        return (f"state.batch_in_epoch ({meta['state']['batch_in_epoch']}) is past the epoch's "
                f"{meta['plan']['micro_batches_per_epoch']} batches")
    return None


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def tensors_problem(weights_file: Path, expected: dict[str, torch.Tensor]) -> Optional[str]:
    """Whether the tensors in a safetensors file are exactly `expected`'s, by name, shape and
    dtype, read from its header alone. None when they are; the first difference otherwise."""
    from safetensors import safe_open

    with safe_open(str(weights_file), "pt") as f:
        found = {k: (list(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    for name, t in expected.items():
        shape, dtype = found[name]
        if shape != list(t.shape):
            return f"{name} has shape {shape}, the model needs {list(t.shape)}"
        if dtype != _DTYPES.get(t.dtype, str(t.dtype)):
            return f"{name} is {dtype}, the model needs {_DTYPES.get(t.dtype, t.dtype)}"
    return None


def optimizer_problem(optimizer_state: Any, params: dict[str, torch.Tensor]) -> Optional[str]:
    """Whether an optimizer state (keyed by parameter name) fits the model's parameters: every
    per-parameter tensor with more than one element has its parameter's shape."""
    if not isinstance(optimizer_state, dict) or not isinstance(optimizer_state.get("state"), dict):
        return "the optimizer state is not a table"
    for name, entry in optimizer_state["state"].items():
        if isinstance(name, str) and name not in params:
            return f"the optimizer state names {name!r}, which the model does not have"
        if not isinstance(entry, dict):
            return f"the optimizer state of {name!r} is not a table"
        param = params.get(name) if isinstance(name, str) else None
        for key, value in entry.items():
            if param is not None and isinstance(value, torch.Tensor) and value.numel() > 1 \
                    and tuple(value.shape) != tuple(param.shape):
                return f"{name}.{key} has shape {list(value.shape)}, the parameter {list(param.shape)}"
    return None
