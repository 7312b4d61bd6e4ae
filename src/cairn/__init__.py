"""cairn: train GPT-style language models from scratch."""

from cairn.config.sections import RunConfig
from cairn.version import __version__


def __getattr__(name):
    # `cairn.preset` on first use, so importing any cairn module does not load the presets
    if name == "preset":
        from cairn.config.presets import preset

        return preset
    raise AttributeError(f"module 'cairn' has no attribute {name!r}")


def train(cfg, out_dir, **kwargs):
    from cairn.training import train as _train

    return _train(cfg, out_dir, **kwargs)


def load(path, device="auto"):
    from cairn.checkpoint.load import load as _load

    return _load(path, device)


__all__ = ["RunConfig", "preset", "train", "load", "__version__"]
