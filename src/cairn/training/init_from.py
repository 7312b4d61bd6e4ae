"""`cairn train --init-from RUN`: a new run that starts from another run's weights.

The architecture and the tokenizer are the other run's: its model section replaces the new
config's (a model setting given on the command line that differs is refused, naming the field),
and its tokenizer is used as it is (a `bpe:N` run's own copy, RUN/tokenizer). Everything else is
new: the data, the optimizer, the schedule, the counters. The config records the checkpoint it
started from (`init_from`), so a resumed or restarted run knows it too.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from cairn.checkpoint import store as ckpt
from cairn.config.sections import RunConfig
from cairn.config.io import field_index
from cairn.util.errors import CairnError, option
from cairn.checkpoint.load import saved_config
from cairn.data.run_tokenizer import RUN_COPY, check_same
from cairn.model.transformer import Transformer
from cairn.tokenizer.base import TOKENIZER_FILE, Tokenizer

log = logging.getLogger(__name__)


def _checkpoint(spec: str) -> ckpt.Checkpoint:
    try:
        return ckpt.read_checkpoint(ckpt.resolve(spec))
    except CairnError as e:
        raise CairnError(f"{option('init_from')} {spec!r}: {e.raw()}") from None


def _tokenizer_spec(c: ckpt.Checkpoint, base: RunConfig) -> str:
    """What names the base's tokenizer for the new run: gpt2, or the directory of its copy."""
    if base.tokenizer == "gpt2":
        return "gpt2"
    places = [c.path / RUN_COPY]
    if c.path.parent.name == "checkpoints":
        places.append(c.path.parent.parent / RUN_COPY)
    places.append(Path(base.tokenizer))
    for place in places:
        if (place / TOKENIZER_FILE).is_file():
            return str(place.resolve())
    raise CairnError(f"{option('init_from')} {c.path}: its tokenizer ({base.tokenizer!r}) is gone and its run keeps "
                     "no copy "
                     f"({RUN_COPY}/): put the tokenizer directory back")


def apply(cfg: RunConfig, given: Iterable[str] = ()) -> RunConfig:
    """`cfg` made to start from `cfg.init_from`: the base's model and tokenizer, the checkpoint's
    path recorded. `given`: the settings named on the command line; a model setting or tokenizer
    among them that differs from the base's is refused."""
    c = _checkpoint(cfg.init_from)
    base = saved_config(c)
    index = field_index()
    sections = {index[k.replace("-", "_")][1]: index[k.replace("-", "_")][0] for k in given
                if k.replace("-", "_") in index}
    for name, value in asdict(base.model).items():
        if sections.get(name) == "model" and name != "vocab_size" and getattr(cfg.model, name) != value:
            raise CairnError(f"--{name.replace('_', '-')} {getattr(cfg.model, name)} conflicts with the model of "
                             f"{option('init_from')} {c.path} ({name} = {value}): the architecture comes from that "
                             "run; drop "
                             f"--{name.replace('_', '-')}")
    if "tokenizer" in sections and cfg.tokenizer != base.tokenizer:
        raise CairnError(f"{option('tokenizer')} {cfg.tokenizer!r} differs from the tokenizer of "
                         f"{option('init_from')} {c.path} "
                         f"({base.tokenizer!r}): its weights only read its own tokens; drop {option('tokenizer')}")
    cfg.model = base.model
    cfg.tokenizer = _tokenizer_spec(c, base)
    resolved = str(c.path.resolve())
    if base.lora.lora_rank and cfg.lora.lora_rank and cfg.init_from != resolved:
        log.info(f"--init-from {c.path}: its LoRA adapters are merged into its weights, new adapters are trained")
    cfg.init_from = resolved
    return cfg


def load_initial_weights(model: Transformer, cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """Put the weights of `cfg.init_from` into `model` (a run's LoRA adapters merged first)."""
    from cairn.checkpoint.load import load

    c = _checkpoint(cfg.init_from)
    base = saved_config(c)
    diff = [f"{k} ({v} there, {getattr(cfg.model, k)} here)" for k, v in asdict(base.model).items()
            if getattr(cfg.model, k) != v]
    if diff:
        raise CairnError(f"{option('init_from')} {c.path}: the model config differs: {', '.join(diff)}; the "
                         "architecture "
                         "comes from that run: leave the model settings out")
    check_same(tokenizer, c.meta.get("tokenizer"), c.path)
    loaded = load(c.path, "cpu", merge=True)
    model.load_weights(loaded.model.weights())
    step = c.meta.get("state", {}).get("step") if isinstance(c.meta.get("state"), dict) else None
    log.info(f"init: weights from {c.path}{f' (step {step})' if step is not None else ''}; fresh optimizer and "
             "schedule")
