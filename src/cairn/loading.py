"""Load a trained model from a run directory or a checkpoint, for evaluation and generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, from_dict, validate
from .errors import CairnError
from .model import Transformer
from .runtime import pick_device
from .tokenizer import get_tokenizer
from .training import checkpoint as ckpt


@dataclass
class Loaded:
    model: Transformer
    config: RunConfig
    tokenizer: object
    path: Path
    meta: dict
    device: torch.device


def load(path: str | Path, device: str = "auto") -> Loaded:
    """A run directory (its final checkpoint, else its newest) or one checkpoint directory."""
    c = ckpt.read_checkpoint(ckpt.resolve(path))
    try:
        raw = c.meta["config"]
        if not isinstance(raw, dict) or not all(isinstance(raw.get(s, {}), dict) for s in ("model", "data", "train")):
            raise CairnError("not a table of settings")
        cfg = validate(from_dict(raw))
    except KeyError as e:
        raise CairnError(f"{c.path}/state.json holds no valid config (no {e} entry): use another checkpoint") from None
    except CairnError as e:
        raise CairnError(f"{c.path}/state.json holds no valid config ({e}): use another checkpoint") from None
    tokenizer = get_tokenizer(cfg.tokenizer)
    dev = pick_device(device)
    model = Transformer(cfg.model)
    try:
        model.load_state_dict(c.model_state())
    except RuntimeError as e:
        raise CairnError(f"{c.path}: weights do not fit the saved model config ({str(e).splitlines()[0].strip()}): "
                         "use another checkpoint") from None
    return Loaded(model.to(dev).eval(), cfg, tokenizer, c.path, c.meta, dev)
