"""`--tracker wandb`: the run's metrics, config, precision and plan in a Weights & Biases run.

The run goes to project `$WANDB_PROJECT` (default "cairn"), named as the cairn run; its files go
under `RUN/wandb/` unless `$WANDB_DIR` says where. wandb's own settings apply as usual:
`WANDB_MODE=offline` logs without a network (`wandb sync RUN/wandb/offline-run-*` uploads later),
`WANDB_API_KEY` or `wandb login` gives the credentials, `WANDB_ENTITY` the team. A resumed cairn run
continues the same wandb run (its id is kept in `RUN/trackers.json`, and wandb is asked to resume it).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from cairn.trackers.base import TrackedRun, scalars
from cairn.util.errors import CairnError

if TYPE_CHECKING:  # wandb is optional: imported on use
    from wandb.sdk.wandb_run import Run

log = logging.getLogger(__name__)

INSTALL_HINT = "the wandb tracker needs the wandb client: pip install 'cairn-lm[wandb]'"


class WandbTracker:
    def __init__(self) -> None:
        self.run: Optional[Run] = None

    def start(self, run: TrackedRun) -> dict:
        try:
            import wandb
        except ImportError:
            raise CairnError(INSTALL_HINT) from None
        saved_id = run.saved.get("id")
        where = {} if os.environ.get("WANDB_DIR") else {"dir": str(run.path)}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "cairn", name=run.name,
                              id=saved_id if isinstance(saved_id, str) else None,
                              resume="allow" if saved_id else None,
                              settings=wandb.Settings(silent=True), **where)  # type: ignore[arg-type]
        # a resumed run may change settings (--max-steps): the newest values win
        self.run.config.update({**run.config, "run": run.info}, allow_val_change=True)
        files = Path(self.run.dir).parent
        how = f"offline, upload with: wandb sync {files}" if self.run.offline else self.run.url
        log.info(f"wandb: run {self.run.id} {'continued' if saved_id else 'started'} ({how})")
        return {"id": self.run.id, "project": self.run.project}

    def log(self, record: dict) -> None:
        assert self.run is not None, "start() first"
        values = scalars(record)
        if values:
            # wandb keys its history by step: the train and val records of one step make one row
            self.run.log(values, step=int(record["step"]))

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None
