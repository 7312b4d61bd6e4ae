"""Checking a checkpoint before anything of it is loaded: state.json field by field (the checks
`schema` declares with each saved field), the weights' names, shapes and dtypes against the model
they must fit, the optimizer's state against its parameters, and the random generators' states.

A damaged checkpoint must be refused with a line that says which field is wrong, never half-loaded
or turned into a traceback (or, worse, accepted: a negative step would name its next checkpoint
after an existing one and overwrite it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch

from cairn.checkpoint.schema import Check, Plan, TrainState, checks, whole

STATE, _ = checks(TrainState)
PLAN, PLAN_OPTIONAL = checks(Plan)


def _fields(table: Any, spec: dict[str, Check], where: str,
            optional: Optional[dict[str, Check]] = None) -> Optional[str]:
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
    if whole(1, 1 << 20)(world):
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


def _generator_state(v: Any) -> bool:
    """A CPU generator's state as torch saves it: a 1-D uint8 tensor of the size this torch uses."""
    size = torch.get_rng_state().numel()
    return isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.dim() == 1 and v.numel() == size


def torch_rng_problem(state: Any) -> Optional[str]:
    """Whether a trainer.pt holds valid torch random-generator states (the process's, or every rank's)."""
    if not isinstance(state, dict):
        return "it is not a table"
    ranks = state.get("rank_rng")
    if ranks is not None:
        if not (isinstance(ranks, list) and ranks and all(isinstance(r, dict) and _generator_state(r.get("torch"))
                                                           for r in ranks)):
            return "rank_rng is not a list of every rank's generator state"
        return None
    if not _generator_state(state.get("torch_rng")):
        return "torch_rng is not a generator state"
    cuda = state.get("cuda_rng")
    if cuda is not None and not (isinstance(cuda, list) and all(isinstance(c, torch.Tensor) for c in cuda)):
        return "cuda_rng is not a list of generator states"
    return None
