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

With --measure, each run stops after the budget has measured the d192 model the preset grows to
on a 2-core avx512_bf16 EPYC (`--max-steps 30 --d-model 192 --n-heads 3 --d-mlp 512
--grow-to-epochs 0`): the seconds per step and per evaluation batch it would plan with, a few
seconds a run instead of ten minutes, so more rounds fit.
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
COSTS = re.compile(r"time budget \d+s: [\d.]+s used by set-up and measuring; ([\d.]+)s per step, ([\d.]+)s per "
                   r"evaluation batch")
# --measure: the budget's own measuring of the wider model the preset grows to on this CPU, without
# the 10 minutes: the step and the evaluation batch it would plan with
MEASURE = ["--max-steps", "30", "--d-model", "192", "--n-heads", "3", "--d-mlp", "512", "--grow-to-epochs", "0"]


def measure_one(src: Path, data: str, out: Path) -> dict[str, Any]:
    """The time budget's measured step and evaluation batch for the d192 model, in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(src), CAIRN_CACHE=str(out.parent / "measure-cache"))
    cmd = [sys.executable, "-m", "cairn", "train", "--preset", "cpu-10min", "--data", data, "--out", str(out),
           *MEASURE, "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{out.name}: cairn train exited {proc.returncode}: {proc.stderr[-500:]}")
    m = COSTS.search(proc.stdout + proc.stderr)
    assert m is not None, "no time budget line"
    shutil.rmtree(out, ignore_errors=True)
    return {"step_s": float(m.group(1)), "eval_batch_s": float(m.group(2))}


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
    p.add_argument("--measure", action="store_true",
                   help="only the budget's measuring of the d192 model (--max-steps 30), not the 10-minute runs")
    a = p.parse_args()
    recording = start()
    a.work.mkdir(parents=True, exist_ok=True)
    codes: dict[str, Path] = {"before": a.before.resolve(), "after": REPO / "src"}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in codes}
    if a.measure:
        for i in range(a.rounds):
            for name, src in codes.items():
                runs[name].append(measure_one(src, a.data, a.work / f"measure-{name}"))
                print(f"round {i + 1} {name}: {runs[name][-1]}", flush=True)
        if a.json:
            recording.write(a.json, {"command": "cairn train --preset cpu-10min --data DATA --out OUT "
                                                + " ".join(MEASURE) + " --no-progress",
                                     "before_src": str(a.before), "measured": runs}, threads=None)
        return 0
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
