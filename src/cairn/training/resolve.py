"""Resolving a run's config, one way for the command line and for Python callers: preset, then
config file, then `--key value` overrides, then what `init_from` brings (the base run's
architecture and tokenizer), then every check."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from cairn.config.io import apply_overrides
from cairn.config.presets import config_file, preset
from cairn.config.sections import RunConfig, validate
from cairn.training import init_from


def resolve_config(preset_name: Optional[str] = None, file: Optional[str | Path] = None,
                   overrides: Optional[dict[str, object]] = None, base: Optional[RunConfig] = None,
                   continuing: bool = False) -> RunConfig:
    """The config a run trains with. `base` (a saved run's config) stands instead of a preset and a
    file; `overrides` are settings by key (`lr`, `schedule.lr`, `source`, ...); `continuing` a
    resumed or restarted run, whose `init_from` was applied when it began."""
    if base is not None:
        cfg = copy.deepcopy(base)
    else:
        start = preset(preset_name) if preset_name else None
        # without a preset, a `preset = "..."` line in the file picks the base
        cfg = config_file(file, start) if file else (start or RunConfig())
    given: dict[str, object] = dict(overrides or {})
    cfg = apply_overrides(cfg, given)
    return prepare_config(cfg, continuing=continuing, given=given)


def prepare_config(cfg: RunConfig, continuing: bool = False, given: Optional[dict[str, object]] = None) -> RunConfig:
    """`cfg` with what `init_from` brings, checked; the caller's object is not changed. `given`: the
    settings the user named, among which a model setting that differs from the base's is refused.
    Applying it twice changes nothing: a config resolved by `resolve_config` trains as is."""
    cfg = copy.deepcopy(cfg)
    if cfg.init_from and not continuing:
        cfg = init_from.apply(cfg, given or {})
    return validate(cfg)
