"""Training: `resolve.py` resolves a run's config, `build.py` builds its parts (all its I/O),
`loop.py` trains it."""

from cairn.checkpoint.schema import TrainState
from cairn.training.build import train

__all__ = ["train", "TrainState"]
