"""cairn: train GPT-style language models from scratch."""

__version__ = "0.1.0"

from .config import RunConfig, preset  # noqa: E402


def train(cfg, out_dir, **kwargs):
    from .training import train as _train

    return _train(cfg, out_dir, **kwargs)


def load(path, device="auto"):
    from .loading import load as _load

    return _load(path, device)


__all__ = ["RunConfig", "preset", "train", "load", "__version__"]
