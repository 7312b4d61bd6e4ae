from .loop import TrainState, train

__all__ = ["train", "TrainState"]
