"""`--tracker trackio`: the run's metrics, config, precision and plan in a Trackio run.

Trackio keeps a project's runs in one SQLite file in `$TRACKIO_DIR`; when that is not set, cairn
points it at `RUN/trackio/` (`TRACKIO_DIR=RUN/trackio trackio show --project cairn` shows it). The
project is "cairn", the run named as the cairn run and the time it started. A resumed cairn run
continues the same Trackio run (its name is kept in `RUN/trackers.json`). `$TRACKIO_SPACE_ID` or
`$TRACKIO_SERVER_URL` send it to a Hugging Face Space or a Trackio server instead, as Trackio does.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cairn.trackers.base import TrackedRun, scalars
from cairn.util.errors import CairnError

if TYPE_CHECKING:  # trackio is optional: imported on use
    from trackio.run import Run

log = logging.getLogger(__name__)

INSTALL_HINT = "the trackio tracker needs trackio: pip install 'cairn-lm[trackio]'"
PROJECT = "cairn"


def _use_dir(path: Path) -> None:
    """Point Trackio's storage at `path`. Trackio reads TRACKIO_DIR once, when imported, into module
    constants; setting the variable would also move every later run of this process, so the
    constants of its loaded modules are set instead."""
    places = {"TRACKIO_DIR": path, "MEDIA_DIR": path / "media", "ARTIFACTS_DIR": path / "artifacts"}
    for name, module in list(sys.modules.items()):
        if name == "trackio" or name.startswith("trackio."):
            for constant, value in places.items():
                if isinstance(getattr(module, constant, None), Path):
                    setattr(module, constant, value)


class TrackioTracker:
    def __init__(self) -> None:
        self.run: Optional[Run] = None

    def start(self, run: TrackedRun) -> dict:
        try:
            import trackio
            import trackio.sqlite_storage  # noqa: F401 - loaded now, so _use_dir reaches its TRACKIO_DIR
        except ImportError:
            raise CairnError(INSTALL_HINT) from None
        saved_name = run.saved.get("name")
        if not os.environ.get("TRACKIO_DIR"):
            _use_dir((run.path / "trackio").resolve())
        # Trackio resumes a run by its name (the newest of that name): a new one gets a name of its own
        name = saved_name if isinstance(saved_name, str) else f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        with contextlib.redirect_stdout(io.StringIO()):  # its banner and dashboard hints: cairn says one line
            self.run = trackio.init(project=PROJECT, name=name,
                                    config={**run.config, "run": run.info}, resume="must" if saved_name else "never",
                                    embed=False, auto_log_cpu=False, auto_log_gpu=False)
        where = os.environ.get("TRACKIO_DIR") or str((run.path / "trackio").resolve())
        log.info(f"trackio: run {self.run.name} {'continued' if saved_name else 'started'} in project {PROJECT} "
                 f"({where}; see it with: trackio show --project {PROJECT})")
        return {"project": PROJECT, "name": self.run.name, "id": self.run.id}

    def log(self, record: dict) -> None:
        assert self.run is not None, "start() first"
        values = scalars(record)
        if values:
            self.run.log(values, step=int(record["step"]))

    def finish(self, ok: bool) -> None:
        if self.run is None:
            return
        import trackio
        from trackio import context_vars

        with contextlib.redirect_stdout(io.StringIO()):
            if context_vars.current_run.get() is self.run:
                trackio.finish()  # also forgets it, or trackio finishes it again (and says so) at exit
            else:
                self.run.finish()
        self.run = None
