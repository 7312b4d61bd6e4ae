"""The fused head before and after it kept its chunk buffers, side by side in one process.

For each shape (d x V), precision (fp32, or bf16 autocast) and mode (forward + backward as a
training step runs it, or forward only under no_grad as scoring does), every variant is timed in
alternating rounds (A B C A B C ...) on the same rows, so that other work on the machine slows all
of them alike; the table gives each variant's median and its ratio to `before` (the median of the
per-round ratios). Variants:

- `before`: the head as it was (a fresh [chunk, V] logits tensor, a second one for log-softmax's
  output, per chunk), with its 1,024-row chunks;
- `before-cN`: the same head with N-row chunks, small enough to keep each temporary under glibc's
  largest mmap threshold (32 MB), so that the heap serves and keeps them;
- `after`: model/ops.py as it is (its chunk buffers kept between chunks and calls), 1,024-row
  chunks (with small chunks as well its time was measured to be about before-cN's).

The process tunes glibc as cairn's processes do (runtime/device.py: keep_freed_memory) unless
--default-malloc. The losses and gradients of `after` must equal `before`'s bit for bit.

    python benchmarks/scripts/head_alloc.py --json benchmarks/records/head-alloc.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable, Optional

import torch

from cairn.bench import record
from cairn.model import ops
from cairn.runtime.device import keep_freed_memory, set_threads
from cairn.util.labels import IGNORE_INDEX

Chunked = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.dtype, bool],
                   tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]]


def before_chunked(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                   compute_dtype: torch.dtype, need_grad: bool
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """model/ops.py's _chunked as of commit 4efa182, unchanged."""
    n = h.shape[0]
    w = weight.to(compute_dtype)
    loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    grad_h = torch.empty_like(h) if need_grad else None
    acc = torch.promote_types(weight.dtype, torch.float32)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=h.device) if need_grad else None
    for s in range(0, n, chunk):
        hc = h[s:s + chunk].to(compute_dtype)
        yc = labels[s:s + chunk]
        valid = (yc != IGNORE_INDEX).unsqueeze(1)
        safe = yc.clamp(min=0).unsqueeze(1)
        logits = hc @ w.t()
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        del logits
        target = logp.gather(1, safe)
        loss -= (target * valid).sum()
        if grad_h is not None and grad_w is not None:
            g = logp.exp_()
            g.scatter_add_(1, safe, torch.full_like(target, -1.0))
            g = g.to(compute_dtype)
            mask = valid.to(compute_dtype)
            grad_h[s:s + chunk] = ((g @ w) * mask).to(h.dtype)
            if compute_dtype == acc:
                grad_w.addmm_(g.t(), hc * mask)
            else:
                grad_w += (g.t() @ (hc * mask)).to(acc)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


AFTER: Chunked = ops._chunked


def run_head(impl: Chunked, chunk: int, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, precision: str,
             backward: bool) -> tuple[torch.Tensor, ...]:
    """One call of the head through linear_cross_entropy with `impl` as its chunk loop; with
    `backward`, its gradients as a training step takes them."""
    ops._chunked = impl  # type: ignore[assignment]  # linear_cross_entropy looks it up at each call
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            if not backward:
                with torch.no_grad():
                    return (ops.linear_cross_entropy(h, w, y, chunk=chunk),)
            hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
            loss = ops.linear_cross_entropy(hg, wg, y, chunk=chunk)
        loss.backward()
        assert hg.grad is not None and wg.grad is not None
        return loss.detach(), hg.grad, wg.grad
    finally:
        ops._chunked = AFTER  # type: ignore[assignment]


def variants(chunks: list[int]) -> dict[str, tuple[Chunked, int]]:
    out: dict[str, tuple[Chunked, int]] = {"before": (before_chunked, 1024)}
    out.update({f"before-c{c}": (before_chunked, c) for c in chunks})
    out["after"] = (AFTER, 1024)
    return out


def measure(d: int, vocab: int, rows: int, precision: str, backward: bool, rounds: int,
            chunks: list[int]) -> dict[str, Any]:
    torch.manual_seed(0)
    h = torch.randn(rows, d)
    w = torch.randn(vocab, d) * d ** -0.5
    y = torch.randint(0, vocab, (rows,))
    y[::7] = IGNORE_INDEX  # some rows without a target, as padding and context-only positions have
    vs = variants(chunks)
    outs = {name: run_head(impl, c, h, w, y, precision, backward) for name, (impl, c) in vs.items()}  # untimed
    same = all(torch.equal(a, b) for a, b in zip(outs["before"], outs["after"]))
    times: dict[str, list[float]] = {name: [] for name in vs}
    for _ in range(rounds):
        for name, (impl, c) in vs.items():
            t = time.perf_counter()
            run_head(impl, c, h, w, y, precision, backward)
            times[name].append(time.perf_counter() - t)
    flops = 2 * rows * d * vocab * (3 if backward else 1)
    res: dict[str, Any] = {"d_model": d, "vocab": vocab, "rows": rows, "precision": precision,
                           "mode": "forward+backward" if backward else "forward", "after_equals_before": same,
                           "variants": {}}
    for name in vs:
        med = statistics.median(times[name])
        ratio = statistics.median(b / t for b, t in zip(times["before"], times[name]))
        res["variants"][name] = {"median_s": med, "gflops": flops / med / 1e9, "speedup_vs_before": ratio,
                                 "times_s": times[name]}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=4096, help="rows (tokens) through the head per call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--d-models", default="128,256")
    p.add_argument("--vocabs", default="4096,50257")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--chunks", default="128", help="smaller chunk sizes to time the head before with")
    p.add_argument("--default-malloc", action="store_true", help="leave glibc's allocator as it starts")
    p.add_argument("--json", default="")
    a = p.parse_args()
    recording = record.start()
    set_threads(0)
    tuned = False if a.default_malloc else keep_freed_memory()
    chunks = [int(c) for c in a.chunks.split(",") if c]
    results = []
    for vocab in (int(v) for v in a.vocabs.split(",")):
        for d in (int(v) for v in a.d_models.split(",")):
            for precision in a.precisions.split(","):
                for backward in (True, False):
                    r = measure(d, vocab, a.rows, precision, backward, a.rounds, chunks)
                    results.append(r)
                    cells = "  ".join(f"{n} {v['median_s'] * 1e3:.0f} ms ({v['speedup_vs_before']:.2f}x)"
                                      for n, v in r["variants"].items())
                    print(f"d{d} V{vocab} {precision} {r['mode']}: {cells}; after == before: "
                          f"{r['after_equals_before']}", flush=True)
    if a.json:
        recording.write(a.json, {"keep_freed_memory": tuned, "rounds": a.rounds, "rows": a.rows, "shapes": results},
                        threads=torch.get_num_threads())
    return 0


if __name__ == "__main__":
    sys.exit(main())
