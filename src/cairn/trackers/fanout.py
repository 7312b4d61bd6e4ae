"""`Trackers`: the run's trackers fed as one, and their runs kept for resuming in `RUN/trackers.json`.

A tracker that fails (its client missing, a server unreachable, bad credentials, an error mid-run)
costs one warning line and is dropped: training never stops for a tracker.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

from cairn.trackers.base import TrackedRun, Tracker
from cairn.util import files

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"


def factories() -> dict[str, Callable[[], Tracker]]:
    # each module imports its client only in start(): naming a tracker costs nothing until it is used
    from cairn.trackers.csv_tracker import CsvTracker
    from cairn.trackers.mlflow_tracker import MlflowTracker
    from cairn.trackers.tensorboard import TensorBoardTracker
    from cairn.trackers.trackio_tracker import TrackioTracker
    from cairn.trackers.wandb_tracker import WandbTracker

    return {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker,
            "trackio": TrackioTracker, "csv": CsvTracker}


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Trackers:
    """Several trackers fed as one: each record goes to every tracker still working."""

    def __init__(self, path: Path, trackers: dict[str, Tracker], state: dict[str, dict]):
        self.path = Path(path)
        self.live = trackers
        self.state = state

    @classmethod
    def open(cls, names: list[str], run: TrackedRun,
             made_by: Optional[dict[str, Callable[[], Tracker]]] = None) -> "Trackers":
        """Start the named trackers for `run`, each continuing its run from `RUN/trackers.json` if
        that holds one; those that fail to start are warned about and left out."""
        made = made_by if made_by is not None else factories()
        state = read_state(run.path)
        live: dict[str, Tracker] = {}
        for name in names:
            try:
                tracker = made[name]()
                saved = state.get(name, {})
                state[name] = tracker.start(TrackedRun(run.path, run.name, run.config, run.info, run.step,
                                                       dict(saved)))
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                log.warning(f"tracker {name} did not start ({_one_line(e)}): training goes on without it")
                continue
            live[name] = tracker
        trackers = cls(run.path, live, state)
        trackers.save_state()
        return trackers

    def save_state(self) -> None:
        kept = {name: s for name, s in self.state.items() if s}
        if kept:
            try:
                files.write_text(self.path / STATE_FILE, json.dumps(kept, indent=1, default=str) + "\n")
            except OSError as e:
                log.warning(f"cannot write {self.path / STATE_FILE} ({_one_line(e)}): a resumed run will open "
                            "new tracker runs")

    def log(self, record: dict) -> None:
        for name, tracker in list(self.live.items()):
            try:
                tracker.log(record)
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                self._drop(name, e)

    def finish(self, ok: bool = True) -> None:
        for name, tracker in list(self.live.items()):
            try:
                tracker.finish(ok)
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                log.warning(f"tracker {name} did not finish cleanly ({_one_line(e)})")
        self.live = {}

    def _drop(self, name: str, error: Exception) -> None:
        tracker = self.live.pop(name)
        log.warning(f"tracker {name} failed ({_one_line(error)}): training goes on without it")
        try:
            tracker.finish(False)
        except Exception:  # noqa: BLE001 - it has already failed once: one warning is enough
            pass


def read_state(run_dir: Path) -> dict[str, dict]:
    """RUN/trackers.json: each tracker's record of its run, {} when there is none (or it is unreadable)."""
    path = Path(run_dir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning(f"cannot read {path} ({_one_line(e)}): trackers open new runs")
        return {}
    return {k: v for k, v in state.items() if isinstance(v, dict)} if isinstance(state, dict) else {}
