"""Load a trained model from a run directory, a checkpoint, a Hugging Face export cairn wrote, or a hub
model id (OWNER/NAME) whose repo holds such an export, for evaluation, generation and export.

Loading never imports the training loop: checkpoints are read by `cairn.checkpoint.store`, the
tokenizer is found by `cairn.data.run_tokenizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cairn.checkpoint import exported, hub
from cairn.checkpoint import store as ckpt
from cairn.data import run_tokenizer
from cairn.config.sections import RunConfig, validate
from cairn.config.io import from_dict
from cairn.util.errors import CairnError
from cairn.model.transformer import Transformer, build_model
from cairn.runtime.device import keep_freed_memory, pick_device
from cairn.tokenizer.base import Tokenizer


@dataclass
class Loaded:
    model: Transformer
    config: RunConfig
    tokenizer: Tokenizer
    path: Path
    meta: dict
    device: torch.device


def load(path: str | Path, device: str = "auto", merge: bool = False) -> Loaded:
    """A run directory (its final checkpoint, else its newest), one checkpoint directory, an export
    directory, or a hub model id. A LoRA run's model carries its adapters (peft's layers), or with
    `merge` has them folded into plain weights."""
    c = find(path)
    cfg = saved_config(c)
    if isinstance(c, exported.ExportCheckpoint):
        tokenizer = exported.tokenizer(c, cfg.tokenizer)
    else:
        tokenizer = run_tokenizer.for_checkpoint(c.path, cfg.tokenizer, c.meta.get("tokenizer"))
    dev = pick_device(device)
    keep_freed_memory(dev)  # scoring and generating on CPUs allocate the same large blocks again and again
    model = build_model(cfg.model, torch.device("cpu"))
    t = cfg.lora
    if t.lora_rank:
        from cairn.model import lora

        model = lora.add_adapters(model, t.lora_rank, t.lora_alpha, t.lora_targets)
    try:
        model.load_weights(c.model_state())
    except RuntimeError as e:
        raise CairnError(f"{c.path}: weights do not fit the saved model config ({str(e).splitlines()[0].strip()}): "
                         "use another checkpoint") from None
    if t.lora_rank and merge:
        from cairn.model import lora

        model = lora.merge(model)
    return Loaded(model.to(dev).eval(), cfg, tokenizer, c.path, c.meta, dev)


def find(path: str | Path) -> ckpt.Checkpoint:
    """The checkpoint `path` names. A local path always wins: only a name that is no local path and
    has the shape OWNER/NAME is looked up as a hub model id (its snapshot in the hub cache)."""
    p = Path(path)
    if not p.exists() and hub.looks_like_repo_id(str(path)):
        p = hub.snapshot(str(path))
        if not exported.is_export(p) and not (p / "state.json").is_file():
            raise CairnError(f"hub model {str(path)!r} was not exported by cairn (its repo has no "
                             f"{exported.META_FILE}): load it with transformers")
    if exported.is_export(p):
        return exported.read(p)
    return ckpt.read_checkpoint(ckpt.resolve(p))


def saved_config(c: ckpt.Checkpoint) -> RunConfig:
    """The config a checkpoint was trained with, checked as a new run's would be."""
    raw = c.meta.get("config")
    try:
        if not isinstance(raw, dict) or not all(isinstance(raw.get(s, {}), dict) for s in ("model", "data", "train")):
            raise CairnError("not a table of settings")
        return validate(from_dict(raw))
    except CairnError as e:
        where = exported.META_FILE if isinstance(c, exported.ExportCheckpoint) else "state.json"
        raise CairnError(f"{c.path}/{where} holds no valid config ({e}): use another checkpoint") from None
