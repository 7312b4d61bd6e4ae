"""The cpu-10min preset on corpora 1x, 10x, 100x the shared sample: does it keep its 10 minutes with flat memory?

    python benchmarks/scripts/scale_runs.py --times 1 10 100 --work /tmp/scale [--record NAME]

For each N: write the corpus (`scale_corpus.py`: N sentence-shuffled copies of the sample), then run

    cairn train --preset cpu-10min --data CORPUS --out WORK/runs/Nx --no-progress

with an empty cache (CAIRN_CACHE=WORK/cache-Nx), so the tokenizer is learned and the tokens prepared
inside the run's own 10 minutes, as a new user's first run. While it runs, /proc is read every 0.2 s:
peak RSS (VmHWM, and the largest sum over the process tree), peak RssAnon of the training process
(anonymous memory: the heap, without the memory-mapped token files, which the page cache holds and
can drop), and the tree's proportional anonymous memory (Pss_Anon: a forked worker's pages shared
with its parent counted once). From the run's own files: the set-up seconds the budget measured,
the planned and taken steps, the wall time, and the held-out bits per byte on the run's own test
split (under the budget, a fixed sample of eval.end_test_batches batches of it).
The record goes to benchmarks/records/NAME.json (default scale-cpu-10min.json), with the load average
before and after each run: on a shared machine the steps and bits per byte fall with the load, while the
memory figures and the wall time against the budget do not depend on it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from cairn.bench.record import start  # noqa: E402

SETUP = re.compile(r"time budget (\d+)s: ([\d.]+)s used by set-up")
PLANNED = re.compile(r"plan: (\d+) steps")
DONE = re.compile(r"done in (\d+)s")


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc (no psutil needed)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def status_kb(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0])
    return out


def pss_anon_kb(pid: int) -> int:
    """Proportional anonymous memory: pages a forked worker shares with its parent counted once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_one(times: int, work: Path) -> dict:
    corpus = work / f"corpus-{times}x.jsonl"
    if not corpus.exists():
        subprocess.run([sys.executable, str(REPO / "benchmarks/scripts/scale_corpus.py"), "--times", str(times),
                        "--out", str(corpus)], check=True)
    out = work / "runs" / f"{times}x"
    env = dict(os.environ, CAIRN_CACHE=str(work / f"cache-{times}x"))
    cmd = ["cairn", "train", "--preset", "cpu-10min", "--data", str(corpus), "--out", str(out), "--no-progress"]
    load_before = os.getloadavg()
    start = time.monotonic()
    log_path = work / f"train-{times}x.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        peak_rss = peak_anon = peak_hwm = peak_tree_anon = 0
        while proc.poll() is None:
            pids = tree(proc.pid)
            stats = [status_kb(p) for p in pids]
            main = status_kb(proc.pid)
            peak_rss = max(peak_rss, sum(s.get("VmRSS", 0) for s in stats))
            peak_anon = max(peak_anon, main.get("RssAnon", 0))
            peak_tree_anon = max(peak_tree_anon, sum(pss_anon_kb(p) for p in pids))
            peak_hwm = max(peak_hwm, main.get("VmHWM", peak_hwm))
            time.sleep(0.2)
    wall = time.monotonic() - start
    text = log_path.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"{times}x: cairn train exited {proc.returncode}; see {log_path}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = next(m for m in metrics if m["kind"] == "test")
    steps = test["step"]  # the step the run ended at (its train records come every report_every steps)
    run_json = json.loads((out / "run.json").read_text())
    setup = SETUP.search(text)
    return {
        "times": times,
        "corpus_bytes": corpus.stat().st_size,
        "stories": run_json["data"]["stories_loaded"],
        "train_tokens": run_json["data"]["splits"]["train"]["tokens"],
        "setup_s": float(setup.group(2)) if setup else None,
        "planned_steps": int(PLANNED.search(text).group(1)),  # type: ignore[union-attr]
        "steps": steps,
        "final_steps": run_json["plan"]["total_steps"],
        "wall_s": round(wall, 1),
        "done_in_s": int(DONE.search(text).group(1)),  # type: ignore[union-attr]
        "peak_rss_mb": round(peak_rss / 1024, 1),
        "peak_rss_anon_mb": round(peak_anon / 1024, 1),  # the training process
        "peak_tree_pss_anon_mb": round(peak_tree_anon / 1024, 1),  # it and its workers, shared pages once
        "main_vmhwm_mb": round(peak_hwm / 1024, 1),
        "test_bits_per_byte": test["test_bits_per_byte"],
        "test_tokens": test["test_tokens"],
        "precision": run_json["precision"],
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "command": " ".join(cmd),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--times", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--work", type=Path, required=True, help="where corpora, caches and runs go (~0.5 GB per 100x)")
    p.add_argument("--record", default="scale-cpu-10min")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recording = start()
    rows = []
    for n in args.times:
        row = run_one(n, args.work)
        print(json.dumps(row), flush=True)
        rows.append(row)
        # write after every size, so a long series keeps what it measured
        base = rows[0]
        result = {"runs": rows,
                  "rss_anon_ratio_to_first": [round(r["peak_rss_anon_mb"] / base["peak_rss_anon_mb"], 3) for r in rows]}
        recording.write(REPO / "benchmarks" / "records" / f"{args.record}.json", result, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
