"""TensorBoard logging of training metrics: the same records as `metrics.jsonl`, as scalars.

`TensorBoardLogger(run_dir)` writes event files into `RUN/tensorboard/` with PyTorch's own
`torch.utils.tensorboard.SummaryWriter` (which needs the `tensorboard` package:
`pip install 'cairn-lm[tensorboard]'`); view them with `tensorboard --logdir RUN/tensorboard`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from cairn.util.errors import CairnError

INSTALL_HINT = "TensorBoard logging needs the tensorboard package: pip install 'cairn-lm[tensorboard]'"

# record kind -> {record key: TensorBoard tag}; keys a record lacks (or holds as null) are skipped
TAGS: dict[str, dict[str, str]] = {
    "train": {
        "train_loss": "train/loss",
        "train_perplexity": "train/perplexity",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s",
        "mfu": "train/mfu",
    },
    "val": {
        "val_loss": "val/loss",
        "val_perplexity": "val/perplexity",
        "val_bits_per_byte": "val/bits_per_byte",
    },
    "test": {
        "test_loss": "test/loss",
        "test_perplexity": "test/perplexity",
        "test_bits_per_byte": "test/bits_per_byte",
    },
}


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of one metrics record: {tag: value}; empty for unknown kinds."""
    out: dict[str, float] = {}
    for key, tag in TAGS.get(record.get("kind", ""), {}).items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent or null (a non-finite loss is written as null)
        out[tag] = float(value)
    return out


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
        walltime = record.get("time")
        walltime = float(walltime) if isinstance(walltime, (int, float)) and math.isfinite(walltime) else None
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
