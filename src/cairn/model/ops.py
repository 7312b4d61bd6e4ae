"""Fused output projection + cross-entropy, computed a chunk of rows at a time.

With a 50257-token vocabulary the logits dominate a small model: for d256 and 2048 tokens a step
they are 412 MB in float32, written by the head, read by log-softmax, written again by its
backward, plus a zero-filled gradient buffer. Here each chunk of rows gets its logits, its
log-sum-exp, its loss and, in the same pass, its gradient (softmax minus one-hot, computed in
place), which is immediately pushed through the two head matmuls. Only one chunk of logits ever
exists. The gradients are produced during the forward pass and handed back in backward, as
Liger-Kernel's fused linear cross-entropy does; when no gradient is needed nothing extra is done.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from cairn.util.labels import IGNORE_INDEX


class _Workspace(threading.local):
    """The chunk temporaries of the head, kept from one call to the next, one set per thread.

    A chunk's [rows, V] logits are larger than glibc's largest mmap threshold (32 MB: 1,024 rows
    of a 50257-token vocabulary are 206 MB in float32), so glibc serves each with its own mmap and
    unmaps it when freed, however the heap is tuned; the next chunk, and every next step, then
    page-faults all of it in again, zero-filled by the kernel (docs/speed.md has the head's time
    before and after, 1.2x to 2.3x faster with that vocabulary on a 2-core EPYC). These buffers
    never leave a call (the loss and the gradients handed to autograd are their own tensors), so
    sharing them between calls, models and autograd graphs is safe; threads get their own, and a
    buffer only grows (rows up to the chunk size). On CUDA the caching allocator already reuses
    blocks, and under torch.compile the compiler plans its buffers, so both allocate afresh."""

    def __init__(self) -> None:
        # by name and dtype: a process that runs float32 and bf16 heads in turn keeps both
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def take(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
             reuse: bool) -> torch.Tensor:
        if not reuse:
            return torch.empty(rows, cols, dtype=dtype, device=device)
        buf = self.buffers.pop((name, dtype), None)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.device != device:
            del buf  # the old buffer is freed before its replacement is made: one at a time at the peak
            buf = torch.empty(rows, cols, dtype=dtype, device=device)
        self.buffers[name, dtype] = buf
        return buf[:rows]


_WORKSPACE = _Workspace()

# MKL's float32 GEMM fills a [rows, V] output faster when it is asked for 512 columns at a time
# (each block of the output then stays in cache while it is written) than for all V at once: the
# float32 head on 2,048 rows against 50,257 columns, d 64 to 768, was 1.20x-1.56x faster scoring
# and 1.12x-1.18x faster training on a 2-core EPYC, with the same sums, bit for bit, at every
# shape (benchmarks/records/head-logit-blocks.json; -mkl-avx2.json with MKL held to AVX2).
# oneDNN's bf16 matmul gained nothing from it, and GPUs (not measured) keep one call, as does a
# vocabulary of one block.
LOGIT_BLOCK = 512

# bf16 logits are widened to float32 for the log-softmax (and its gradient) this many bytes of
# rows at a time (16 rows of a 50257-token vocabulary): the float32 copy is then read and written
# in cache rather than in memory. The bf16 head was 1.01x-1.17x faster than when it widened a
# whole [chunk, V] at once, bit for bit the same, and the widened buffer is 4 MB, not 206 MB
# (benchmarks/records/head-logit-blocks.json)
WIDE_BYTES = 4 << 20


def _blocked_logits(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()
            and not torch.compiler.is_compiling())


def _logits(hc: torch.Tensor, w: torch.Tensor, out: torch.Tensor, blocked: bool) -> torch.Tensor:
    """hc @ w.T into `out` ([rows, V]), a LOGIT_BLOCK of vocabulary columns at a time when `blocked`."""
    if not blocked:
        return torch.mm(hc, w.t(), out=out)
    for v in range(0, w.shape[0], LOGIT_BLOCK):
        torch.mm(hc, w[v:v + LOGIT_BLOCK].t(), out=out[:, v:v + LOGIT_BLOCK])
    return out


def _chunked(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, compute_dtype: torch.dtype,
             need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(summed loss, d loss / d h, d loss / d weight) a chunk of rows at a time; the gradients only
    when `need_grad` (scoring does one matmul per chunk and allocates no gradient)."""
    n = h.shape[0]
    vocab, d = weight.shape
    w = weight.to(compute_dtype)
    wide = torch.promote_types(compute_dtype, torch.float32)
    reuse = h.device.type == "cpu" and not torch.compiler.is_compiling()
    blocked = _blocked_logits(h.device, compute_dtype)
    # widened rows a few at a time on CPUs, so that their float32 copy stays in cache
    step = max(1, WIDE_BYTES // (vocab * wide.itemsize)) if reuse and wide != compute_dtype else chunk
    space = _WORKSPACE
    loss = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    grad_h = torch.empty_like(h) if need_grad else None
    acc = torch.promote_types(weight.dtype, torch.float32)
    # the first chunk writes the weight's gradient, the others add to it: no zero-filled pass over
    # [V, d] (51 MB at d256 and a 50257-token vocabulary); zeros only when there is no chunk at all
    grad_w = (torch.empty if n else torch.zeros)(weight.shape, dtype=acc, device=h.device) if need_grad else None
    for s in range(0, n, chunk):
        hc = h[s:s + chunk].to(compute_dtype)
        rows = hc.shape[0]
        yc = labels[s:s + chunk]
        valid = (yc != IGNORE_INDEX).unsqueeze(1)
        safe = yc.clamp(min=0).unsqueeze(1)
        logits = _logits(hc, w, space.take("logits", rows, vocab, compute_dtype, h.device, reuse), blocked)
        targets = []
        for r in range(0, rows, step):
            part, part_safe = logits[r:r + step], safe[r:r + step]
            # one log-softmax pass, its max, sum of exp and log in float32 (or wider), in place: bf16
            # logits are widened first (CPU kernels are faster on float32 than on bf16 read as float32)
            logp = part if wide == compute_dtype else \
                space.take("wide", part.shape[0], vocab, wide, h.device, reuse).copy_(part)
            torch.log_softmax(logp, dim=-1, out=logp)
            targets.append(logp.gather(1, part_safe))
            if need_grad:
                # d(sum loss)/d(logits) = softmax - onehot, in place, narrowed back into the
                # logits' own buffer (they are spent)
                g = logp.exp_()
                g.scatter_add_(1, part_safe, torch.full_like(targets[-1], -1.0))
                if g.dtype != compute_dtype:
                    part.copy_(g)
        loss -= (torch.cat(targets) * valid).sum()
        if grad_h is not None and grad_w is not None:
            # padding rows are masked on the narrow side (their h rows and their gradient rows,
            # [c, d]), not over [c, V]; no data-dependent branch, so torch.compile traces it whole
            g = logits
            mask = valid.to(compute_dtype)
            grad_h[s:s + chunk] = ((g @ w) * mask).to(h.dtype)
            if compute_dtype == acc:  # beta 0: the first chunk ignores what the empty buffer held
                grad_w.addmm_(g.t(), hc * mask, beta=0 if s == 0 else 1)
            else:  # the bf16 product, rounded as bf16, summed in float32 (widened first: an in-place
                # add of a bf16 tensor to a float32 one was measured slower than the copy and the add)
                narrow = torch.mm(g.t(), hc * mask, out=space.take("grad_w", vocab, d, compute_dtype, h.device, reuse))
                if s == 0:
                    grad_w.copy_(narrow)
                else:
                    grad_w += space.take("grad_w", vocab, d, acc, h.device, reuse).copy_(narrow)
    return loss, grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    # ctx is Any as in torch's own signatures: saved_tensors comes from C++
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                compute_dtype: torch.dtype) -> torch.Tensor:
        loss, grad_h, grad_w = _chunked(h, weight, labels, chunk, compute_dtype, need_grad=True)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None, None]:
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss, grad_w * grad_loss, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = 1024) -> torch.Tensor:
    """sum over rows with label != IGNORE_INDEX of cross_entropy(h @ weight.T, label). h: [N, d].

    Gradients are computed (in the forward pass) only when autograd will want them: under
    `no_grad` or `inference_mode`, or with neither input requiring grad, it is forward work only,
    on the rows that have a target.
    (An autograd.Function's own view, `needs_input_grad`, says True for a parameter even under
    `no_grad`: every scoring pass then did the two gradient matmuls and kept a [V, d] buffer.)"""
    compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) \
        else h.dtype
    with torch.autocast(h.device.type, enabled=False):
        if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
            # scoring: only the rows with a target get logits. Held-out sliding windows label
            # about half their positions as context only, and padding none: the [c, V] matmul
            # and log-softmax of those rows were most of a scoring pass for a large vocabulary
            scored = labels != IGNORE_INDEX
            return _chunked(h[scored], weight, labels[scored], chunk, compute_dtype, need_grad=False)[0]
        return _LinearCrossEntropy.apply(h, weight, labels, chunk, compute_dtype)
