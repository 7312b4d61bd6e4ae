"""What each experiment tracker costs a run: starting it (importing its client included), logging one
metrics record, finishing it. Offline and local only: wandb with WANDB_MODE=offline, MLflow's file
store, Trackio's SQLite file, the CSV file, TensorBoard's event files, each in a fresh run directory.

    python benchmarks/scripts/tracker_overhead.py --records 200 --json benchmarks/records/tracker-overhead.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from cairn.bench import record
from cairn.trackers.base import NAMES, TrackedRun
from cairn.trackers.fanout import factories


def measure(name: str, records: int, where: Path) -> dict[str, float]:
    tracker = factories()[name]()
    run = TrackedRun(where, "overhead", {"model": {"d_model": 64}}, {"precision": "fp32", "plan": {"total_steps": 1}},
                     0)
    began = time.perf_counter()
    tracker.start(run)
    started = time.perf_counter()
    for step in range(1, records + 1):
        tracker.log({"kind": "train", "step": step, "epoch": 1, "train_loss": 5.0 - step / records, "lr": 1e-3,
                     "grad_norm": 1.0, "tokens_per_s": 1e4, "mfu": 0.1, "tokens": step * 512, "time": time.time()})
    logged = time.perf_counter()
    tracker.finish(True)
    done = time.perf_counter()
    return {"start_s": round(started - began, 3), "log_ms_per_record": round(1000 * (logged - started) / records, 3),
            "finish_s": round(done - logged, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200, help="train records logged to each tracker")
    p.add_argument("--json", help="write the benchmark record here")
    a = p.parse_args()
    recording = record.start()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "MLFLOW_TRACKING_URI", "TRACKIO_DIR"):
        os.environ.pop(name, None)  # every tracker in the run directory
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in NAMES:
            where = Path(tmp) / name
            where.mkdir()
            results[name] = measure(name, a.records, where)
            print(name, results[name])
    if a.json:
        recording.write(a.json, {"records": a.records, "wandb_mode": os.environ["WANDB_MODE"], "trackers": results,
                                 "note": "shared 2-core machine: other people's jobs ran at the same time (see load)"},
                        threads=None)


if __name__ == "__main__":
    main()
