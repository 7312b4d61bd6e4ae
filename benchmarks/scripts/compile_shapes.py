"""What torch.compile costs and gives for the cpu-10min preset's model, from an empty compile cache, as
a new user's first run pays it:

- `first_compiled_s`: the first compiled step of a full batch (4 x 256), which compiles;
- `short_compiled_s`: then the first compiled step of the epoch's short last batch (1 x 256),
  which compiles that shape again; `short_eager_s`: the same batch's step on the eager model, as
  cairn runs it (training/step.py: Stepper.forward_for);
- `compiled_step_s` / `eager_step_s`: the medians of alternating full-batch steps (compiled, eager,
  compiled ...) after both are warm, and their ratio: how much faster a compiled step is, which a
  budgeted run that may grow relies on when it measures the configured model eagerly first
  (training/build.py).

Each width (the preset's d128 and the d192 it grows to on a 2-core avx512_bf16 EPYC) runs in a fresh
process with its own empty TORCHINDUCTOR_CACHE_DIR; steps are real AdamW steps under the run's
precision (bf16 autocast where the CPU has native bf16, as `precision = auto` chose there) with the
story mask, as the preset trains.

    python benchmarks/scripts/compile_shapes.py --json benchmarks/records/compile-shapes-cpu-10min.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

WIDTHS = ((128, 2, 352), (192, 3, 512))  # d_model, heads, d_mlp: the preset's and the one it grows to


def one(d_model: int, heads: int, d_mlp: int, precision: str, rounds: int) -> dict[str, Any]:
    import torch

    from cairn.config.presets import preset
    from cairn.model.transformer import build_model
    from cairn.runtime.device import autocast, keep_freed_memory, set_threads
    from cairn.training.optim import make_optimizer

    set_threads(0)
    cpu = torch.device("cpu")
    keep_freed_memory(cpu)
    cfg = preset("cpu-10min")
    cfg.model.d_model, cfg.model.n_heads, cfg.model.d_mlp = d_model, heads, d_mlp
    torch.manual_seed(0)
    model = build_model(cfg.model, cpu, bytes_per_param=16)
    optimizer = make_optimizer(model, cfg.optim, cfg.schedule.lr, cpu)
    compiled = torch.compile(model)
    T, eot = cfg.data.seq_len, 0

    def step(forward: Any, rows: int) -> float:
        x = torch.randint(0, cfg.model.vocab_size, (rows, T))
        y = torch.randint(0, cfg.model.vocab_size, (rows, T))
        start = time.perf_counter()
        with autocast(cpu, precision):
            loss, _ = forward(x, labels=y, stories=(x == eot).cumsum(1))
        (loss / (rows * T)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step(compiled, 4)
    step(model, 4)  # the eager model's first step (allocations), untimed
    short_compiled = step(compiled, 1)
    short_eager = statistics.median(step(model, 1) for _ in range(5))
    times: dict[str, list[float]] = {"compiled": [], "eager": []}
    for _ in range(rounds):
        times["compiled"].append(step(compiled, 4))
        times["eager"].append(step(model, 4))
    c, e = statistics.median(times["compiled"]), statistics.median(times["eager"])
    return {"d_model": d_model, "n_heads": heads, "d_mlp": d_mlp, "precision": precision,
            "parameters": sum(p.numel() for p in model.parameters()), "first_compiled_s": first,
            "short_compiled_s": short_compiled, "short_eager_s": short_eager, "compiled_step_s": c,
            "eager_step_s": e, "eager_over_compiled": e / c, "rounds": rounds}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=40, help="alternating full-batch steps of each, after warm-up")
    p.add_argument("--json", default="")
    p.add_argument("--one", default="", help=argparse.SUPPRESS)  # d_model,heads,d_mlp,precision: a child process
    a = p.parse_args()
    if a.one:
        d, h, m, precision = a.one.split(",")
        print(json.dumps(one(int(d), int(h), int(m), precision, a.rounds)))
        return 0
    from cairn.bench.record import start
    from cairn.runtime.precision import for_run
    from cairn.config.presets import preset

    import torch

    recording = start()
    cfg = preset("cpu-10min")
    precision = for_run("auto", torch.device("cpu"), cfg.model, cfg.train.batch_size * cfg.data.seq_len, None).precision
    rows = []
    for d, h, m in WIDTHS:
        with tempfile.TemporaryDirectory(prefix="cairn-compile-cache-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            out = subprocess.run([sys.executable, __file__, "--one", f"{d},{h},{m},{precision}", "--rounds",
                                  str(a.rounds)], env=env, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"d{d}: {out.stderr[-800:]}")
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"d{d} {precision}: first compiled step {row['first_compiled_s']:.1f} s; short batch compiled "
              f"{row['short_compiled_s']:.1f} s, eager {row['short_eager_s']:.3f} s; step compiled "
              f"{row['compiled_step_s']:.4f} s, eager {row['eager_step_s']:.4f} s "
              f"({row['eager_over_compiled']:.2f}x)", flush=True)
    if a.json:
        recording.write(a.json, {"preset": "cpu-10min", "batch": [cfg.train.batch_size, cfg.data.seq_len],
                                 "short_batch": [1, cfg.data.seq_len], "widths": rows}, threads=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
