"""cairn: train GPT-style language models from scratch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from cairn.config.sections import RunConfig
from cairn.version import __version__

if TYPE_CHECKING:
    from cairn.checkpoint.load import Loaded


def __getattr__(name: str) -> Callable[[str], RunConfig]:
    # `cairn.preset` on first use, so importing any cairn module does not load the presets
    if name == "preset":
        from cairn.config.presets import preset

        return preset
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")


def train(cfg: RunConfig, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    from cairn.training import train as _train

    return _train(cfg, out_dir, **kwargs)


def load(path: str | Path, device: str = "auto") -> Loaded:
    from cairn.checkpoint.load import load as _load

    return _load(path, device)


__all__ = ["RunConfig", "preset", "train", "load", "__version__"]
