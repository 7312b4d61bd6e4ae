"""Where a cairn training step spends its time: torch.profiler over a few steps of `cairn bench`'s
cairn step (forward under autocast, backward, clipping, AdamW), the operators by self CPU time.

    PYTHONPATH=src python benchmarks/scripts/profile_step.py --precision bf16 \\
        --out benchmarks/records/profile-d256-bf16.json
    PYTHONPATH=src python benchmarks/scripts/profile_step.py --preset cpu-10min --precision bf16 \\
        --out benchmarks/records/profile-cpu-10min-bf16.json

Shape flags as `cairn bench` (default d256 / 4 layers / 8 heads / GPT-2 vocabulary / 256 tokens /
batch 8). Also prints the share of the step in matmuls (aten::mm, addmm, bmm, linear's kernels).
--out writes a benchmark record (cairn.bench.record): the summary and the table as printed, line by
line, with the step's time, model FLOP/s and matmul share as numbers.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from cairn.bench import record
from cairn.bench.speed import make_step, mean_loss, resolve_shape
from cairn.config.sections import OptimConfig
from cairn.model.transformer import Transformer
from cairn.runtime.device import autocast, set_threads
from cairn.training.optim import make_optimizer
from cairn.util.host import cpu_info

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::_weight_int8pack_mm", "mkldnn")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in ("--d-model", "--n-layers", "--n-heads", "--seq-len", "--batch-size", "--vocab-size"):
        p.add_argument(flag, type=int)
    p.add_argument("--preset")
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core, as training)")
    p.add_argument("--out", help="also write the record here (JSON)")
    a = p.parse_args()
    a.tutorial_batch, a.rounds, a.generate = 1, 0, 0  # resolve_shape checks these `cairn bench` flags too
    recording = record.start()
    set_threads(a.threads)
    shape = resolve_shape(a)
    device = torch.device("cpu")
    torch.manual_seed(0)
    mc = shape.model
    x = torch.randint(0, mc.vocab_size, (shape.batch, shape.seq))
    y = torch.randint(0, mc.vocab_size, (shape.batch, shape.seq))
    m = Transformer(mc)
    opt = make_optimizer(m, OptimConfig(), 1e-4, device)
    step = make_step(m, opt, lambda: mean_loss(m, x, y), lambda: autocast(device, a.precision))
    step()
    step()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(a.steps):
            step()
    wall = (time.perf_counter() - t) / a.steps
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMULS))
    flops = m.flops_per_token(shape.seq) * shape.batch * shape.seq
    what = (f"cairn step, {a.precision}, d{mc.d_model} L{mc.n_layers} H{mc.n_heads} T{shape.seq} B{shape.batch} "
            f"V{mc.vocab_size}{' (' + a.preset + ')' if a.preset else ''}")
    load = recording.load_at_start
    head = (f"{what}; {torch.get_num_threads()} threads; torch {torch.__version__}; {cpu_info()[0]}; "
            f"load average {'unknown' if load is None else f'{load:.1f}'} at the start\n"
            f"{wall:.3f} s/step under the profiler ({flops / wall / 1e9:.1f} model GFLOP/s); "
            f"matmul kernels {mm / max(total, 1):.0%} of self CPU time\n")
    table = events.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=40)
    print(head + table)
    if a.out:
        recording.write(a.out, {"step": what, "precision": a.precision, "steps": a.steps, "s_per_step": wall,
                                "model_gflops_per_s": flops / wall / 1e9,
                                "matmul_share_of_self_cpu": mm / max(total, 1),
                                "summary": head.splitlines(), "table": table.splitlines()},
                        threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
