"""Training: `build.py` prepares a run (all its I/O), `loop.py` trains it."""

from cairn.training.build import train
from cairn.training.state import TrainState

__all__ = ["train", "TrainState"]
