"""Does bf16 autocast train as well as float32? The same run (preset, data, seed, steps) trained
once per precision, one after the other; prints the validation-loss curves side by side and the
final held-out figures, and writes them to --json as a benchmark record (cairn.bench.record).

    python benchmarks/scripts/precision.py --data ../shared/data/tinystories \
        --json benchmarks/records/precision-cpu.json \
        -- --preset cpu-10min --max-steps 300 --time-budget "" --eval-every 50 --compile false --end-stories 0

With the same seed and data both runs see the same batches in the same order. The validation
losses must agree within --tolerance (relative, default 1%) at every evaluation; the script says
whether they do, and exits 1 if not.

Everything after `--` goes to `cairn train` for both runs. bf16 autocast keeps float32 master
weights and optimizer state; the loss's softmax statistics stay in float32 (ops.py). On a CPU
without bf16 instructions the bf16 run is emulated and slow: there it checks numerics, not speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from cairn.bench import record


def train(data: str, out: Path, precision: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "cairn", "train", "--data", data, "--out", str(out), "--precision", precision,
           "--no-progress", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.exit(f"{precision} run failed:\n{proc.stdout[-2000:]}")
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "seconds": time.perf_counter() - t,
        "val": [(r["step"], r["val_loss"], "whole split" if r.get("full") else "sample")
                for r in records if r["kind"] == "val"],
        "train": [(r["step"], r["train_loss"]) for r in records if r["kind"] == "train"],
        "test": next((r for r in records if r["kind"] == "test"), None),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default="")
    p.add_argument("--tolerance", type=float, default=0.01, help="relative, at every evaluation")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then cairn train options for both runs")
    a = p.parse_args()
    extra = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    recording = record.start()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {prec: train(a.data, Path(tmp) / prec, prec, extra) for prec in ("fp32", "bf16")}
    f, b = runs["fp32"], runs["bf16"]
    print(f"{'step':>6} {'val fp32':>9} {'val bf16':>9} {'bf16 - fp32':>12} {'relative':>9}  of")
    rows = []
    for (step, lf, what), (step_b, lb, _) in zip(f["val"], b["val"]):
        assert step == step_b, "the runs evaluated at different steps"
        rows.append({"step": step, "of": what, "fp32": lf, "bf16": lb, "relative": (lb - lf) / lf})
        print(f"{step:>6} {lf:9.4f} {lb:9.4f} {lb - lf:+12.4f} {(lb - lf) / lf:+9.2%}  {what}")
    for name, r in runs.items():
        t = r["test"]
        if t:
            print(f"{name}: test loss {t['test_loss']:.4f}, {t.get('test_bits_per_byte', float('nan')):.4f} "
                  f"bits/byte; {r['seconds']:.0f}s")
    worst = max(abs(r["relative"]) for r in rows) if rows else float("nan")
    agree = bool(rows) and worst <= a.tolerance
    print(f"validation losses {'agree' if agree else 'DO NOT agree'} within {a.tolerance:.1%} at all {len(rows)} "
          f"evaluations (largest difference {worst:.3%})")
    if a.json:
        recording.write(a.json, {"args": extra, "data": a.data, "tolerance": a.tolerance, "agree": agree,
                                 "largest_relative": worst, "validation": rows, "runs": runs},
                        threads=threads_given(extra))
    return 0 if agree else 1


def threads_given(train_args: list[str]) -> Optional[int]:
    """The --num-threads both runs were given; None when they chose their own."""
    if "--num-threads" in train_args[:-1]:
        return int(train_args[train_args.index("--num-threads") + 1])
    return None


if __name__ == "__main__":
    raise SystemExit(main())
