"""Load a trained model from a run directory or a checkpoint, for evaluation and generation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import RunConfig, from_dict, validate
from .errors import CairnError
from .model import Transformer
from .runtime import pick_device
from .tokenizer import TOKENIZER_FILE, get_tokenizer
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
    saved = c.meta.get("config")
    tokenizer_spec = _tokenizer_dir(c.path, saved.get("tokenizer", "gpt2")) if isinstance(saved, dict) else "gpt2"
    try:
        raw = c.meta["config"]
        if not isinstance(raw, dict) or not all(isinstance(raw.get(s, {}), dict) for s in ("model", "data", "train")):
            raise CairnError("not a table of settings")
        raw = {**raw, "tokenizer": tokenizer_spec}
        cfg = validate(from_dict(raw))
    except KeyError as e:
        raise CairnError(f"{c.path}/state.json holds no valid config (no {e} entry): use another checkpoint") from None
    except CairnError as e:
        raise CairnError(f"{c.path}/state.json holds no valid config ({e}): use another checkpoint") from None
    tokenizer = get_tokenizer(cfg.tokenizer)
    recorded = c.meta.get("tokenizer")
    trained_with = recorded.get("name") if isinstance(recorded, dict) else None
    if trained_with is not None and trained_with != tokenizer.name:
        raise CairnError(f"{c.path} was trained with tokenizer {trained_with!r}, but {cfg.tokenizer!r} holds "
                         f"{tokenizer.name!r}: put the run's tokenizer back (RUN/tokenizer)")
    dev = pick_device(device)
    model = Transformer(cfg.model)
    try:
        model.load_weights(c.model_state())
    except RuntimeError as e:
        raise CairnError(f"{c.path}: weights do not fit the saved model config ({str(e).splitlines()[0].strip()}): "
                         "use another checkpoint") from None
    return Loaded(model.to(dev).eval(), cfg, tokenizer, c.path, c.meta, dev)


def _tokenizer_dir(checkpoint: Path, spec) -> str:
    """Where an own tokenizer is: the copy kept with the checkpoint or its run (RUN/tokenizer) first,
    so a run stays loadable when the directory it was trained with moves; else the path it names."""
    if not isinstance(spec, str) or spec == "gpt2":
        return spec
    candidates = [checkpoint / "tokenizer"]
    if checkpoint.parent.name == "checkpoints":
        candidates.append(checkpoint.parent.parent / "tokenizer")
    for cand in candidates:
        if (cand / TOKENIZER_FILE).is_file():
            return str(cand)
    if not (Path(spec) / TOKENIZER_FILE).is_file():
        raise CairnError(f"{checkpoint} was trained with the tokenizer in {spec!r}, which is gone, and its run "
                         "keeps no copy (RUN/tokenizer): put the tokenizer directory back")
    return spec
