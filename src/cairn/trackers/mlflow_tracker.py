"""`--tracker mlflow`: the run's metrics, config, precision and plan in an MLflow run.

The tracking store is `$MLFLOW_TRACKING_URI` when set (a server, `sqlite:///...`, a directory);
otherwise `RUN/mlruns`, a file store (mlflow-skinny alone can write it; MLflow keeps the file store
in maintenance mode, so cairn allows it with MLFLOW_ALLOW_FILE_STORE=true unless that is set):
`mlflow ui --backend-store-uri RUN/mlruns` shows it. The experiment is `$MLFLOW_EXPERIMENT_NAME`
(or `$MLFLOW_EXPERIMENT_ID`), default "cairn". A resumed cairn run continues the same MLflow run
(its id and store are kept in `RUN/trackers.json`).

The config and run.json go in as parameters (`model.d_model`, `run.precision`, `run.plan.total_steps`);
MLflow never changes a parameter once logged, so a resumed run logs only those it has not.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Optional

from cairn.trackers.base import TrackedRun, flatten, record_time, scalars
from cairn.util.errors import CairnError

if TYPE_CHECKING:  # mlflow is optional: imported on use
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

INSTALL_HINT = "the mlflow tracker needs the MLflow client: pip install 'cairn-lm[mlflow]'"
MAX_PARAM_CHARS = 6000  # MLflow refuses longer parameter values
BATCH_PARAMS = 100  # MLflow takes at most 100 parameters per batch


class MlflowTracker:
    def __init__(self) -> None:
        self.client: Optional[MlflowClient] = None
        self.run_id = ""

    def start(self, run: TrackedRun) -> dict:
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise CairnError(INSTALL_HINT) from None
        saved_uri, saved_id = run.saved.get("tracking_uri"), run.saved.get("run_id")
        uri = saved_uri if isinstance(saved_uri, str) and saved_id else os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run.path / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        client = MlflowClient(tracking_uri=uri)
        if isinstance(saved_id, str) and saved_id:
            client.get_run(saved_id)  # raises if the store does not hold it
            client.update_run(saved_id, status="RUNNING")
            self.run_id, logged = saved_id, set(client.get_run(saved_id).data.params)
        else:
            self.run_id, logged = client.create_run(_experiment(client), run_name=run.name).info.run_id, set()
        self.client = client
        params = [Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten({**run.config, "run": run.info}).items()
                  if k not in logged]
        for i in range(0, len(params), BATCH_PARAMS):
            client.log_batch(self.run_id, params=params[i:i + BATCH_PARAMS])
        log.info(f"mlflow: run {self.run_id} {'continued' if saved_id else 'started'} in {uri}")
        return {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, record: dict) -> None:
        assert self.client is not None, "start() first"
        from mlflow.entities import Metric

        values = scalars(record)
        if values:
            t = record_time(record)
            ms = int(1000 * (t if t is not None else time.time()))
            step = int(record["step"])
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ms, step) for k, v in values.items()])

    def finish(self, ok: bool) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")
            self.client = None


def _experiment(client: MlflowClient) -> str:
    """The experiment's id: $MLFLOW_EXPERIMENT_ID, else $MLFLOW_EXPERIMENT_NAME's or "cairn"'s (made if new)."""
    given = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if given:
        return given
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "cairn"
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found is not None else client.create_experiment(name)
