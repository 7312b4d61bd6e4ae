"""The cpu-10min preset's 10 minutes on this checkout and on an older one, alternating on one machine:
how many steps each takes in the same budget, and what they score.

    git worktree add /tmp/before 04bf875
    python benchmarks/scripts/cpu10min_steps.py --data ../shared/data/tinystories --before /tmp/before/src \\
        --rounds 2 --work /tmp/steps --json benchmarks/records/cpu-10min-steps.json

Each run is

    cairn train --preset cpu-10min --data DATA --out WORK/NAME-ROUND --no-progress

in a fresh process on the given code (PYTHONPATH), with an empty token cache (CAIRN_CACHE) and an
empty torch.compile cache (TORCHINDUCTOR_CACHE_DIR), so each pays its own tokenizer, tokens and
compilation inside its budget, as a new user's first run. The order alternates (before, after,
before, after ...) so that the machine's other work slows both alike. From each run's own files:
the width the budget chose, the planned and taken steps, the wall time, the seconds the budget
spent setting up and measuring, and the held-out bits per byte (the run's test record). The run
directories stay under WORK.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from cairn.bench.record import start  # noqa: E402

SETUP = re.compile(r"time budget (\d+)s: ([\d.]+)s used by set-up")


def run_one(src: Path, data: str, out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    caches = out.with_name(out.name + "-caches")
    shutil.rmtree(caches, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(src), CAIRN_CACHE=str(caches / "cairn"),
               TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"))
    cmd = [sys.executable, "-m", "cairn", "train", "--preset", "cpu-10min", "--data", data, "--out", str(out),
           "--no-progress"]
    load = os.getloadavg()[0]
    t = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t
    (out.parent / f"{out.name}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        raise SystemExit(f"{out.name}: cairn train exited {proc.returncode}; see {out.parent / (out.name + '.log')}")
    shutil.rmtree(caches, ignore_errors=True)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = next(m for m in metrics if m["kind"] == "test")
    run = json.loads((out / "run.json").read_text())
    setups = [float(m.group(2)) for m in SETUP.finditer(proc.stdout + proc.stderr)]
    model = tomllib.loads((out / "config.toml").read_text()).get("model", {})
    return {"steps": test["step"], "planned_steps": run["plan"]["total_steps"], "wall_s": wall,
            "setup_and_measuring_s": setups[-1] if setups else None, "parameters": run.get("parameters"),
            "d_model": model.get("d_model"), "test_bits_per_byte": test.get("test_bits_per_byte"),
            "test_loss": test.get("test_loss"), "load_at_start": load, "load_at_end": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--before", type=Path, required=True, help="the older checkout's src folder")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--json", default="")
    a = p.parse_args()
    recording = start()
    a.work.mkdir(parents=True, exist_ok=True)
    codes: dict[str, Path] = {"before": a.before.resolve(), "after": REPO / "src"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    for i in range(a.rounds):
        for name, src in codes.items():
            r = run_one(src, a.data, a.work / f"{name}-{i + 1}")
            runs[name].append(r)
            print(f"round {i + 1} {name}: {r['steps']} steps of d{r['d_model']} in {r['wall_s']:.0f} s "
                  f"(set-up and measuring {r['setup_and_measuring_s']} s), test {r['test_bits_per_byte']:.4f} "
                  f"bits/byte, load {r['load_at_start']:.1f}-{r['load_at_end']:.1f}", flush=True)
    ratio: Optional[float] = None
    if all(runs.values()):
        ratio = sum(r["steps"] for r in runs["after"]) / sum(r["steps"] for r in runs["before"])
    result = {"command": "cairn train --preset cpu-10min --data DATA --out OUT --no-progress",
              "before_src": str(a.before), "runs": runs, "steps_after_over_before": ratio}
    print(json.dumps({"steps_after_over_before": ratio}))
    if a.json:
        recording.write(a.json, result, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
