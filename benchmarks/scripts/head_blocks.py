"""The fused head with and without its two cache blockings, side by side in one process:

- `LOGIT_BLOCK` (model/ops.py): float32 logits asked of MKL 512 vocabulary columns at a time
  rather than all V at once;
- `WIDE_BYTES`: bf16 logits widened to float32 for the log-softmax 4 MB of rows at a time rather
  than a whole chunk at once.

`whole` runs model/ops.py with both turned off (one block of every column, one widening of every
row: the head before them); `blocked` runs it as it is. For each shape (d x V), precision
(float32, or bf16 as autocast computes) and mode (forward + gradients as a training step runs it,
or forward only as scoring does), the two alternate (A B A B ...) on the same rows so that other
work on the machine slows both alike; the table gives each one's median and the median of the
per-round ratios. Losses and gradients must be equal bit for bit. The process tunes glibc as
cairn's processes do (runtime/device.py: keep_freed_memory).

    python benchmarks/scripts/head_blocks.py --json benchmarks/records/head-logit-blocks.json

With MKL_ENABLE_INSTRUCTIONS=AVX2 in the environment, MKL's kernels are held to AVX2, the
nearest this script gets to an AVX2-only CPU on an AVX-512 one (ATen's and oneDNN's are not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import torch

from cairn.bench import record
from cairn.model import ops
from cairn.runtime.device import keep_freed_memory, set_threads
from cairn.util.labels import IGNORE_INDEX

SHAPES = ((64, 50257), (256, 50257), (768, 50257), (192, 4096))


def run(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, grad: bool,
        blocked: bool) -> tuple[float, tuple]:
    ops.LOGIT_BLOCK = 512 if blocked else 1 << 30
    ops.WIDE_BYTES = 4 << 20 if blocked else 1 << 62
    start = time.perf_counter()
    out = ops._chunked(h, w, y, 1024, dtype, need_grad=grad)
    return time.perf_counter() - start, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json", default="")
    a = p.parse_args()
    recording = record.start()
    set_threads(0)
    keep_freed_memory(torch.device("cpu"))
    torch.manual_seed(0)
    results: list[dict[str, Any]] = []
    print(f"{'shape':>12} {'dtype':>8} {'mode':>8} {'whole ms':>9} {'blocked ms':>11} {'ratio':>6}  bitwise")
    for d, v in SHAPES:
        h, w = torch.randn(a.rows, d), torch.randn(v, d) * 0.05
        y = torch.randint(0, v, (a.rows,))
        y[::9] = IGNORE_INDEX
        for dtype in (torch.float32, torch.bfloat16):
            for grad in (True, False):
                times: dict[bool, list[float]] = {False: [], True: []}
                outs = {}
                for blocked in (False, True):  # warm-up: buffers and kernels, untimed
                    run(h, w, y, dtype, grad, blocked)
                for _ in range(a.rounds):
                    for blocked in (False, True):
                        t, outs[blocked] = run(h, w, y, dtype, grad, blocked)
                        times[blocked].append(t)
                same = all(torch.equal(x, z) for x, z in zip(outs[False], outs[True]) if x is not None)
                ratio = statistics.median(b / t for b, t in zip(times[False], times[True]))
                row = {"d_model": d, "vocab": v, "dtype": str(dtype).removeprefix("torch."),
                       "mode": "train" if grad else "score", "whole_ms": 1e3 * statistics.median(times[False]),
                       "blocked_ms": 1e3 * statistics.median(times[True]), "ratio": ratio, "bitwise_equal": same,
                       "whole_s": times[False], "blocked_s": times[True]}
                results.append(row)
                print(f"{f'd{d} V{v}':>12} {row['dtype']:>8} {row['mode']:>8} {row['whole_ms']:9.1f} "
                      f"{row['blocked_ms']:11.1f} {ratio:5.2f}x  {same}", flush=True)
    ops.LOGIT_BLOCK, ops.WIDE_BYTES = 512, 4 << 20
    if a.json:
        isa = {k: os.environ[k] for k in ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
               if k in os.environ}
        recording.write(a.json, {"rows": a.rows, "chunk": 1024, "rounds": a.rounds,
                                 "mkl": torch.backends.mkl.is_available(), "isa_environment": isa, "shapes": results},
                        threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
