"""Ablations at equal wall time: each variant of a preset trains under the same --time-budget,
one after another in one run, and is scored on the held-out validation split (bits per byte).

    python benchmarks/scripts/ablate.py --data ../shared/data/tinystories --budget 150s \
        --variant base --variant "gpt2 vocab: --tokenizer gpt2" --variant "lr 6e-3: --lr 6e-3"

A variant is "NAME: --flag value ..." (overrides on top of the preset and of --flags, which every
variant gets first; "base" alone = the preset with --flags).
Each variant first runs a one-step warm-up, so the tokenizer it learns and the token cache it
fills are ready before its clock starts: the timed runs compare training, not one-off caching.
Prints a table (markdown) and, with --json, writes a benchmark record (cairn.bench.record) whose
result holds the settings and one row per variant.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cairn.bench import record


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, flags = text.partition(":")
    return name.strip(), shlex.split(flags)


class Failed(Exception):
    pass


def run(args: list[str], log_path: Path) -> str:
    cmd = [sys.executable, "-m", "cairn", "train", *args, "--no-progress"]
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log.write(proc.stdout)
    if proc.returncode != 0:
        lines = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
        raise Failed(lines[-1] if lines else proc.stdout[-500:])
    return proc.stdout


def score(run_dir: Path, out: str) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in records if r["kind"] == "val" and r.get("full")]
    test = [r for r in records if r["kind"] == "test"]
    trains = [r for r in records if r["kind"] == "train"]
    info = json.loads((run_dir / "run.json").read_text())
    done = re.search(r"done in (\d+)s", out)
    return {
        "val_bits_per_byte": vals[-1]["val_bits_per_byte"] if vals else None,
        "val_loss": vals[-1]["val_loss"] if vals else None,
        "test_bits_per_byte": test[-1]["test_bits_per_byte"] if test else None,
        "steps": info["plan"]["total_steps"],
        "steps_done": trains[-1]["step"] if trains else 0,
        "tokens": trains[-1]["tokens"] if trains else 0,
        "tokens_per_s": sum(r["tokens_per_s"] for r in trains[1:]) / max(len(trains) - 1, 1),
        "parameters": info["parameters"],
        "seconds": int(done.group(1)) if done else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--preset", default="cpu-10min")
    p.add_argument("--budget", default="150s")
    p.add_argument("--flags", default="", help='flags given to every variant before its own: a study\'s base '
                   '(e.g. "--n-layers 4 --lr 1.5e-3")')
    p.add_argument("--variant", action="append", default=[], help='"NAME: --flag value ..." (repeatable)')
    p.add_argument("--json", default="", help="write the results here as JSON")
    p.add_argument("--keep", default="", help="keep the run directories under this folder")
    args = p.parse_args(argv)
    recording = record.start()
    variants = [parse_variant(v) for v in (args.variant or ["base"])]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cairn-ablate-"))
    root.mkdir(parents=True, exist_ok=True)
    results = []
    for name, flags in variants:
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", name).strip("-") or "base"
        base = ["--preset", args.preset, "--data", args.data, *shlex.split(args.flags), *flags]
        warm = root / f"{slug}.warm"
        # one step with the same data/tokenizer settings: fills the caches outside the timed run
        run([*base, "--out", str(warm), "--max-steps", "1", "--time-budget", "", "--end-stories", "0",
             "--test-at-end", "false", "--eval-every", "0", "--checkpoint-every", "0"], root / f"{slug}.warm.log")
        out_dir = root / slug
        start = time.monotonic()
        try:
            out = run([*base, "--out", str(out_dir), "--time-budget", args.budget, "--end-stories", "0"],
                      root / f"{slug}.log")
        except Failed as e:  # e.g. one step does not fit the budget: that is a result too
            results.append({"variant": name, "flags": " ".join(flags), "failed": str(e)})
            print(f"{name}: failed: {e}", flush=True)
            continue
        r = {"variant": name, "flags": " ".join(flags), **score(out_dir, out),
             "wall_s": round(time.monotonic() - start, 1)}
        results.append(r)
        print(f"{name}: val {r['val_bits_per_byte']:.4f} bits/byte, {r['steps_done']} steps, "
              f"{r['tokens']:,} tokens, {r['tokens_per_s']:,.0f} tok/s, {r['wall_s']}s", flush=True)

    base_bpb = next((r["val_bits_per_byte"] for r in results if "failed" not in r), 0.0)
    print("\n| variant | flags | val bits/byte | vs first | steps | tokens | tokens/s | params | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['variant']} | `{r['flags']}` | failed: {r['failed']} | | | | | | |")
            continue
        print(f"| {r['variant']} | `{r['flags'] or '(preset)'}` | {r['val_bits_per_byte']:.4f} | "
              f"{r['val_bits_per_byte'] - base_bpb:+.4f} | {r['steps_done']} | {r['tokens']:,} | "
              f"{r['tokens_per_s']:,.0f} | {r['parameters']:,} | {r['wall_s']} |")
    if args.json:  # the runs are `cairn train` processes with their own threads: the record's are null
        recording.write(args.json, {"preset": args.preset, "flags": args.flags, "budget": args.budget,
                                    "data": args.data, "results": results}, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
