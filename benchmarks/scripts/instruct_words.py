"""The words task, base vs instruction-tuned runs: how many held-out prompts each one honours.

One story per prompt of --eval (made by benchmarks/scripts/words_data.py from stories no run trained on),
sampled with the same seeds for every run (prompt i: seed i, temperature 0.8, top-k 50, at most
300 tokens, through the run's chat template). A story honours its prompt when it contains all three
words, as whole words, case-insensitively (cairn.tasks.words). `prompt_gain` is the log-probability
(nats per token) that a prompt adds to the tokens of its words in the held-out story it was made
from, against another prompt (cairn.tasks.words.prompt_gain; --eval holds the stories, as
words_data.py writes them): how far a run has learned to take the words from its prompt, while the
rate is still 0. --json is a benchmark record (cairn.bench.record) whose result holds one entry per run
under "runs"; runs given again replace their entry, so the runs can be scored one at a time.

    python benchmarks/scripts/instruct_words.py --eval runs/words-eval.jsonl \
        --json benchmarks/records/instruct-words.json \
        --run base=runs/base --what "base=the base run" --run full=runs/inst --run lora=runs/inst-lora
    python benchmarks/scripts/instruct_words.py --json benchmarks/records/instruct-words.json --table base,full,lora
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from cairn.bench import record
from cairn.tasks.words import evaluate_words, words_found
from cairn.util.host import cpu_description


def run_facts(run: Path) -> dict:
    """What the run trained: its steps, last validation loss, init, LoRA and tokens."""
    info = json.loads((run / "run.json").read_text())
    cfg_text = (run / "config.toml").read_text()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [m for m in metrics if "val_loss" in m]
    steps = max((m.get("step", 0) for m in metrics), default=0)
    train = info.get("data", {}).get("splits", {}).get("train", {})
    return {"steps": steps, "train_examples": train.get("stories"), "train_tokens": train.get("tokens"),
            "train_answer_tokens": train.get("answer_tokens"), "val_loss": val[-1]["val_loss"] if val else None,
            "val_bits_per_byte": val[-1].get("val_bits_per_byte") if val else None,
            "init_from": info.get("init_from"), "threads": info.get("threads"),
            "parameters": info.get("parameters"), "format": "sft" if 'format = "sft"' in cfg_text else "text",
            "lora_rank": next((int(line.split("=")[1]) for line in cfg_text.splitlines()
                               if line.startswith("lora_rank")), 0)}


def markdown(table: dict, names: list[str]) -> str:
    """The docs' table of the runs `names`, from the record."""
    lines = ["| run | what it is | steps | prompts | all three words used | single words used | prompt gain "
             "(nats/token) |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        e = table["runs"][name]
        lines.append(f"| `{e['run']}` | {e.get('what', '')} | {e['steps']:,} | {e['prompts']} | "
                     f"{e['honoured']} ({100 * e['rate']:.0f}%) | {e['words_found']} of {e['words_asked']} | "
                     f"{e['prompt_gain']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eval", help="JSONL of held-out prompts with their words (and the stories they came from)")
    p.add_argument("--run", action="append", default=[], metavar="NAME=RUN_DIR")
    p.add_argument("--what", action="append", default=[], metavar="NAME=TEXT", help="what a run is, for the table")
    p.add_argument("--json", required=True, help="the record (updated in place)")
    p.add_argument("--samples", help="JSONL of every story written (default: next to --json)")
    p.add_argument("--table", help="print the markdown table of these runs (comma-separated names) and exit")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on busy shared cores one "
                                                          "thread generates several times faster than two)")
    a = p.parse_args(argv)
    out = Path(a.json)
    table = record.read_result(out) if out.is_file() else {"runs": {}}
    if a.table:
        sys.stdout.write(markdown(table, a.table.split(",")))
        return 0
    if not (a.eval and a.run):
        p.error("give --eval and at least one --run (or --table)")
    recording = record.start()
    torch.set_num_threads(a.threads)
    what = dict(spec.split("=", 1) for spec in a.what)
    samples_path = Path(a.samples) if a.samples else out.with_name(out.stem + "-samples.jsonl")
    old_samples = ([json.loads(line) for line in samples_path.read_text().splitlines()]
                   if samples_path.is_file() else [])
    names = {spec.split("=", 1)[0] for spec in a.run}
    kept = [s for s in old_samples if s["run"] not in names]
    for spec in a.run:
        name, path = spec.split("=", 1)
        started = time.perf_counter()
        load_avg = os.getloadavg()[0]
        r = evaluate_words(path, a.eval, device="cpu")  # seeds 0, 1, ... (WORDS)
        print(f"{name}: {r['honoured']}/{r['prompts']} honoured ({100 * r['rate']:.1f}%), prompt gain "
              f"{r['prompt_gain']:.3f} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        table["runs"][name] = {"run": path, "what": what.get(name, table["runs"].get(name, {}).get("what", "")),
                               "checkpoint": r["checkpoint"], "eval_data": a.eval, "prompts": r["prompts"],
                               "honoured": r["honoured"], "rate": r["rate"], "sampling": r["sampling"],
                               "prompt_gain": r["prompt_gain"], "prompt_gain_tokens": r["prompt_gain_tokens"],
                               **run_facts(Path(path)),
                               "measured": f"{time.strftime('%Y-%m-%d')}, {cpu_description()}, "
                                           f"torch {torch.__version__}, {a.threads} thread(s), load average "
                                           f"{load_avg:.1f} at the start"}
        kept += [{"run": name, **s} for s in r["samples"]]
    for name, entry in table["runs"].items():  # how many single words were used, of all asked for
        mine = [s for s in kept if s["run"] == name]
        entry["words_found"] = sum(words_found(s["story"], s["words"]) for s in mine)
        entry["words_asked"] = sum(len(s["words"]) for s in mine)
    recording.write(out, table, threads=a.threads)
    samples_path.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in kept))
    return 0


if __name__ == "__main__":
    sys.exit(main())
