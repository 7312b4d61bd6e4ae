"""Training: `build.py` prepares a run (all its I/O), `loop.py` trains it."""

from .build import train
from .state import TrainState

__all__ = ["train", "TrainState"]
