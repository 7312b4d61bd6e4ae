"""Data preparation at scale: one core against every core, on a generated JSONL of >= 500 MB.

    python benchmarks/scripts/prepare.py [--mb 512] [--sample DIR] [--json benchmarks/records/prepare.json]

Builds the file from the shared TinyStories sample repeated (in a temporary folder, deleted at the
end), then runs `cairn prepare` on it in a fresh process per setting (--workers 1, then every
usable core), so each one's peak memory is its own. Reports, per setting: MB/s of input and
tokens/s end to end (fingerprint, both passes, writing), elapsed seconds, the peak resident memory
of the parent and of the largest worker (getrusage), and the peak of their sum (sampled from /proc
every 0.1 s while it runs), and the CPU seconds it used over its elapsed time (the cores it really
got: on a shared machine other jobs take some). Also the single-core tiktoken figure on the sample
(encode only), which bounds what one worker can do. --json writes a benchmark record
(cairn.bench.record); the usable cores are its cpu.cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(os.environ.get("CAIRN_TINYSTORIES", REPO.parent / "shared" / "data" / "tinystories"))


def build_file(sample: Path, out: Path, mb: int) -> tuple[int, int]:
    """Repeat the sample's lines until the file holds at least `mb` MB; return (bytes, stories)."""
    parts = [p.read_bytes() for p in sorted(sample.glob("*.jsonl"))]
    lines = b"".join(part if part.endswith(b"\n") else part + b"\n" for part in parts)
    per_copy = lines.count(b"\n")
    copies = -(-mb * 10**6 // len(lines))
    with open(out, "wb") as f:
        for _ in range(copies):
            f.write(lines)
    return out.stat().st_size, copies * per_copy


def tiktoken_one_core(sample: Path) -> float:
    """MB/s of GPT-2 encoding alone, one story at a time on one core (no parsing, no writing)."""
    from cairn.data import load_texts
    from cairn.tokenizer.base import get_tokenizer

    tok = get_tokenizer("gpt2")
    texts = load_texts(str(sample))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    for t in texts:
        tok.encode(t)
    return n_bytes / 1e6 / (time.perf_counter() - start)


def _tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant, workers included
    return usage.ru_utime + usage.ru_stime


def run_prepare(data: Path, cache: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "cairn", "prepare", "--data", str(data), "--cache-dir", str(cache),
           "--workers", str(workers), "--json"]
    load_before = os.getloadavg()[0]
    cpu_before, wall_before = _children_cpu_s(), time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"bytes": 0}

    def sample() -> None:
        while proc.poll() is None:
            peak["bytes"] = max(peak["bytes"], _tree_rss(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    wall = time.perf_counter() - wall_before  # the whole process: start-up, imports, workers' start-up
    if proc.returncode != 0:
        raise SystemExit(f"cairn prepare --workers {workers} failed ({proc.returncode}): {err.strip()}")
    result = json.loads(out)
    result["peak_rss_total_mb_sampled"] = round(peak["bytes"] / 1e6, 1)
    # CPU time of the run and all its workers: how many cores it really got on a shared machine.
    result["cpu_seconds"] = round(_children_cpu_s() - cpu_before, 1)
    result["process_seconds"] = round(wall, 1)
    result["cores_used"] = round(result["cpu_seconds"] / wall, 2)
    result["load_avg_before"] = round(load_before, 2)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="size of the generated JSONL in MB (default 512)")
    ap.add_argument("--sample", type=Path, default=SAMPLE, help="folder of .jsonl stories to repeat")
    ap.add_argument("--workers", type=int, default=0, help="the parallel setting (default 0: every usable core)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    from cairn.bench import record

    recording = record.start()
    if not list(args.sample.glob("*.jsonl")):
        raise SystemExit(f"no .jsonl files in {args.sample}: pass --sample or set CAIRN_TINYSTORIES")

    from cairn.util.host import usable_cores

    cores = usable_cores()
    tmp = Path(tempfile.mkdtemp(prefix="cairn-bench-prepare-"))
    try:
        data = tmp / "stories.jsonl"
        t0 = time.perf_counter()
        size, stories = build_file(args.sample, data, args.mb)
        print(f"built {data.name}: {size / 1e6:,.1f} MB, {stories:,} stories in {time.perf_counter() - t0:.1f}s",
              flush=True)
        baseline = tiktoken_one_core(args.sample)
        print(f"tiktoken alone, one core: {baseline:.1f} MB/s", flush=True)
        runs = []
        for workers in (1, args.workers or cores):
            r = run_prepare(data, tmp / f"cache-{workers}", workers)
            runs.append(r)
            print(f"--workers {workers}: {r['seconds']:.1f}s, {r['mb_per_s']:.1f} MB/s", flush=True)
            shutil.rmtree(tmp / f"cache-{workers}", ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    one, many = runs
    result = {
        "file_mb": round(size / 1e6, 1), "stories": stories,
        "tiktoken_one_core_mb_per_s": round(baseline, 2),
        "runs": [{k: r[k] for k in ("workers", "seconds", "mb_per_s", "tokens_per_s", "tokens", "peak_rss_mb",
                                    "peak_rss_worker_mb", "peak_rss_total_mb_sampled", "cpu_seconds",
                                    "process_seconds", "cores_used", "load_avg_before")} for r in runs],
        "speedup": round(one["seconds"] / many["seconds"], 2),
        "splits": one["splits"],
        "identical_splits": one["splits"] == many["splits"],
    }
    print(f"\n{'workers':>7} {'seconds':>8} {'MB/s':>7} {'tokens/s':>11} {'parent MB':>10} {'worker MB':>10} "
          f"{'sum MB':>8} {'cores used':>10} {'load':>5}")
    for r in result["runs"]:
        print(f"{r['workers']:>7} {r['seconds']:>8.1f} {r['mb_per_s']:>7.1f} {r['tokens_per_s']:>11,} "
              f"{r['peak_rss_mb']:>10.0f} {r['peak_rss_worker_mb']:>10.0f} {r['peak_rss_total_mb_sampled']:>8.0f} "
              f"{r['cores_used']:>10.2f} {r['load_avg_before']:>5.1f}")
    print(f"speed-up {result['speedup']:.2f}x with {many['workers']} workers on {cores} usable cores "
          f"(file {result['file_mb']:,.0f} MB; tiktoken alone {baseline:.1f} MB/s on one core)")
    print(json.dumps(result, indent=1))
    if args.json:  # `cairn prepare` ran in processes of its own: no torch threads to name
        recording.write(args.json, result, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
