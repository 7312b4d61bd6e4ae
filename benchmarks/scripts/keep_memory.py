"""What keep_freed_memory does for the processes that load a trained run: scoring and generating
with glibc tuned (CAIRN_KEEP_FREED_MEMORY=1, the default) and left as it starts (=0).

The setting is process-wide and cannot be undone, so each measurement is a fresh process, the two
settings alternating (on, off, on, off ...) so that other work on the machine slows both alike.
Each process builds the model (random weights, seeded), tunes the allocator as checkpoint/load.py
does, then times held-out scoring through `cairn eval`'s kernel (eval/metrics.py: evaluate) on
batches of --rows x --seq positions after one untimed batch, and greedy generation with the KV
cache; it counts the minor page faults of the timed scoring. The record gives each setting's
median and the median of the per-round ratios.

    python benchmarks/scripts/keep_memory.py --json benchmarks/records/keep-memory-d256.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

from cairn.bench import record
from cairn.config.sections import ModelConfig
from cairn.eval.metrics import evaluate
from cairn.inference.generate import SamplingConfig, generate_ids
from cairn.model.transformer import Transformer
from cairn.runtime.device import KEEP_FREED_MEMORY_ENV, keep_freed_memory, set_threads

CPU = torch.device("cpu")


def child(a: argparse.Namespace) -> dict[str, Any]:
    set_threads(0)
    kept = keep_freed_memory(CPU)
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=a.d_model, n_layers=a.n_layers, n_heads=a.n_heads, d_mlp=4 * a.d_model,
                      vocab_size=a.vocab, context_len=max(a.seq, 256))
    model = Transformer(cfg).eval()
    table = np.ones(a.vocab, dtype=np.int64)
    batches = [{"input_ids": torch.randint(0, a.vocab, (a.rows, a.seq)),
                "labels": torch.randint(0, a.vocab, (a.rows, a.seq))} for _ in range(a.batches + 1)]
    evaluate(model, batches[:1], CPU, "fp32", table)  # untimed: the first batch maps what the next ones reuse
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.perf_counter()
    evaluate(model, batches[1:], CPU, "fp32", table)
    score_s = time.perf_counter() - t
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    s = SamplingConfig(max_new_tokens=a.generate, temperature=0, stop_at_eot=False)
    list(generate_ids(model, list(range(1, 17)), SamplingConfig(max_new_tokens=4, temperature=0, stop_at_eot=False)))
    t = time.perf_counter()
    list(generate_ids(model, list(range(1, 17)), s))
    gen_s = time.perf_counter() - t
    return {"keep_freed_memory": kept, "score_tokens_per_s": a.batches * a.rows * a.seq / score_s,
            "score_faults_per_batch": faults / a.batches, "generate_tokens_per_s": a.generate / gen_s}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batches", type=int, default=2, help="timed scoring batches per process")
    p.add_argument("--generate", type=int, default=64, help="tokens generated per process")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return 0
    recording = record.start()
    args = [f"--{k.replace('_', '-')}={v}" for k, v in vars(a).items() if k not in ("child", "json")]
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for _ in range(a.rounds):
        for mode in ("on", "off"):
            env = {**os.environ, KEEP_FREED_MEMORY_ENV: "1" if mode == "on" else "0"}
            out = subprocess.run([sys.executable, __file__, *args, "--child"], env=env, capture_output=True,
                                 text=True, check=True)
            runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(mode, runs[mode][-1], flush=True)
    summary: dict[str, Any] = {}
    for key in ("score_tokens_per_s", "generate_tokens_per_s", "score_faults_per_batch"):
        summary[key] = {m: statistics.median(r[key] for r in runs[m]) for m in runs}
        if key != "score_faults_per_batch":
            summary[key]["on_over_off"] = statistics.median(
                on[key] / off[key] for on, off in zip(runs["on"], runs["off"]))
    print(json.dumps(summary, indent=1))
    if a.json:
        recording.write(a.json, {"model": {"d_model": a.d_model, "n_layers": a.n_layers, "vocab": a.vocab},
                                 "score_batch": [a.rows, a.seq], "batches": a.batches, "generate": a.generate,
                                 "rounds": a.rounds, "summary": summary, "runs": runs}, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
