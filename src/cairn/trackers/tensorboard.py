"""TensorBoard logging of training metrics: the same records as `metrics.jsonl`, as scalars.

`TensorBoardLogger(run_dir)` writes event files into `RUN/tensorboard/` with PyTorch's own
`torch.utils.tensorboard.SummaryWriter` (which needs the `tensorboard` package:
`pip install 'cairn-lm[tensorboard]'`); view them with `tensorboard --logdir RUN/tensorboard`.
`TensorBoardTracker` is the same as one of the run's trackers (`--tracker tensorboard`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from cairn.trackers.base import TrackedRun, record_time, scalars
from cairn.util.errors import CairnError

INSTALL_HINT = "TensorBoard logging needs the tensorboard package: pip install 'cairn-lm[tensorboard]'"


def require_tensorboard() -> None:
    """Raise the one-line CairnError now if TensorBoard logging cannot work (check before long work)."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:  # torch raises this when the tensorboard package is missing or too old
        raise CairnError(INSTALL_HINT) from None


class TensorBoardLogger:
    """Writes metrics records as TensorBoard scalars into `run_dir/tensorboard/`.

    `purge_step`: on a resumed run, the checkpoint's step + 1; TensorBoard then hides the events an
    earlier process wrote for that step and later (which the resumed run redoes), as `metrics.jsonl`
    drops those records.
    """

    def __init__(self, run_dir: str | Path, purge_step: Optional[int] = None, flush_secs: int = 10):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing or too old
            raise CairnError(INSTALL_HINT) from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs)

    def write(self, record: dict) -> None:
        """Log one metrics record (kind "train", "val" or "test") at global step record["step"]."""
        values = scalars(record)
        if not values:
            return
        step = int(record.get("step", 0))
        walltime = record_time(record)
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> "TensorBoardLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TensorBoardTracker:
    """TensorBoard as a tracker: the scalars, and the config and run.json as text (`trackers/base.py`)."""

    def __init__(self) -> None:
        self.logger: Optional[TensorBoardLogger] = None

    def start(self, run: TrackedRun) -> dict:
        # purge_step hides events a killed run wrote past the checkpoint, as metrics.jsonl drops them
        self.logger = TensorBoardLogger(run.path, purge_step=run.step + 1)
        for tag, tree in (("config", run.config), ("run", run.info)):
            text = json.dumps(tree, indent=1, default=str)
            self.logger.writer.add_text(tag, "    " + text.replace("\n", "\n    "), global_step=run.step)
        return {}

    def log(self, record: dict) -> None:
        assert self.logger is not None, "start() first"
        self.logger.write(record)

    def finish(self, ok: bool) -> None:
        if self.logger is not None:
            self.logger.close()
