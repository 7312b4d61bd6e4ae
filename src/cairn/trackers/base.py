"""The one interface of an experiment tracker (`Tracker`), what it is told about a run, and the
names of the metrics every tracker logs.

A tracker gets what `metrics.jsonl` gets, record by record (`log`), after `start` has told it about
the run: its directory, name, config, what it computes in (precision) and its step plan. `start`
returns what the tracker needs to continue the same run when training resumes (a run id), which
`fanout.Trackers` keeps in `RUN/trackers.json`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol

# every tracker by name, in the order the docs list them
NAMES = ("tensorboard", "wandb", "mlflow", "trackio", "csv")

# record kind -> {record key: the metric's name in a tracker}; keys a record lacks (or holds as null) are skipped
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
    """The named scalars of one metrics record: {name: value}; empty for kinds without scalars."""
    out: dict[str, float] = {}
    for key, tag in TAGS.get(record.get("kind", ""), {}).items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # absent or null (a non-finite loss is written as null)
        out[tag] = float(value)
    return out


def record_time(record: dict) -> Optional[float]:
    """The record's wall time (seconds since the epoch), when it carries a finite one."""
    t = record.get("time")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) else None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"model": {"d_model": 64}} -> {"model.d_model": 64}, for trackers whose parameters are flat."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


@dataclass
class TrackedRun:
    """What a tracker is told about the run when it starts."""
    path: Path  # the run directory: trackers keep their files inside it unless their environment says otherwise
    name: str  # the run's name (config `name`)
    config: dict  # the resolved config, by section
    info: dict  # run.json: precision and why, the step plan, parameters, device, data
    step: int  # the optimizer step the run starts from: 0, or the checkpoint's step on resume
    saved: dict = field(default_factory=dict)  # what this tracker's `start` returned before (resume), else {}


class Tracker(Protocol):
    """One experiment tracker. Every method may raise: `Trackers` turns that into one warning."""

    def start(self, run: TrackedRun) -> dict:
        """Open the tracker's run (or continue the one in `run.saved`) and log the config, precision
        and plan. Returns what continuing this run later needs (JSON-able), e.g. {"id": ...}."""
        ...

    def log(self, record: dict) -> None:
        """One metrics record, as metrics.jsonl holds it: "kind" (train, val, test, ...), "step", values."""
        ...

    def finish(self, ok: bool) -> None:
        """Close the run; `ok` is False when training ended with an error."""
        ...
