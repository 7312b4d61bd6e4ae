"""The words task, base vs instruction-tuned runs: how many held-out prompts each one honours.

One story per prompt of --eval (made by benchmarks/words_data.py from stories no run trained on),
sampled with the same seeds for every run (prompt i: seed i, temperature 0.8, top-k 50, at most
300 tokens, through the run's chat template). A story honours its prompt when it contains all three
words, as whole words, case-insensitively (cairn.words_task). Runs given again replace their
entry in --json, so the runs can be scored one at a time.

    python benchmarks/instruct_words.py --eval runs/words-eval.jsonl --run base=runs/base \
        --run full=runs/inst --run lora=runs/inst-lora --json benchmarks/instruct-words.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from cairn.words_task import evaluate_words, words_found


def run_facts(run: Path) -> dict:
    """What the run trained: its steps, last validation loss, init, LoRA and tokens."""
    info = json.loads((run / "run.json").read_text())
    cfg_text = (run / "config.toml").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_loss" in m]
    steps = max((m.get("step", 0) for m in metrics), default=0)
    return {"steps": steps, "val_loss": val[-1]["val_loss"] if val else None,
            "val_bits_per_byte": val[-1].get("val_bits_per_byte") if val else None,
            "init_from": info.get("init_from"), "threads": info.get("threads"),
            "parameters": info.get("parameters"), "format": "sft" if 'format = "sft"' in cfg_text else "text",
            "lora_rank": next((int(line.split("=")[1]) for line in cfg_text.splitlines()
                               if line.startswith("lora_rank")), 0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", required=True, help="JSONL of held-out prompts with their words")
    p.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR")
    p.add_argument("--json", required=True, help="the table (updated in place)")
    p.add_argument("--samples", help="JSONL of every story written (default: next to --json)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on busy shared cores one "
                                                          "thread generates several times faster than two)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.json)
    table = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    samples_path = Path(a.samples) if a.samples else out.with_name(out.stem + "-samples.jsonl")
    old_samples = ([json.loads(line) for line in samples_path.read_text().splitlines()]
                   if samples_path.is_file() else [])
    names = {spec.split("=", 1)[0] for spec in a.run}
    kept = [s for s in old_samples if s["run"] not in names]
    for spec in a.run:
        name, path = spec.split("=", 1)
        started = time.perf_counter()
        r = evaluate_words(path, a.eval, device="cpu", seed=0)
        print(f"{name}: {r['honoured']}/{r['prompts']} honoured ({100 * r['rate']:.1f}%) in "
              f"{time.perf_counter() - started:.0f}s", file=sys.stderr)
        table["runs"][name] = {"run": path, "checkpoint": r["checkpoint"], "prompts": r["prompts"],
                               "honoured": r["honoured"], "rate": r["rate"], "sampling": r["sampling"],
                               **run_facts(Path(path))}
        kept += [{"run": name, **s} for s in r["samples"]]
    for name, entry in table["runs"].items():  # how many single words were used, of all asked for
        mine = [s for s in kept if s["run"] == name]
        entry["words_found"] = sum(words_found(s["story"], s["words"]) for s in mine)
        entry["words_asked"] = sum(len(s["words"]) for s in mine)
    table["eval_data"] = a.eval
    table["hardware"] = (f"{os.cpu_count()}-core {platform.processor() or platform.machine()}, torch "
                         f"{torch.__version__}, shared with other work (load average {os.getloadavg()[0]:.0f})")
    table["date"] = time.strftime("%Y-%m-%d")
    out.write_text(json.dumps(table, indent=1) + "\n")
    samples_path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
