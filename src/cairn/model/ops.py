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

from typing import Any, Optional

import torch

from cairn.util.labels import IGNORE_INDEX


def _chunked(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, compute_dtype: torch.dtype,
             need_grad: bool) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(summed loss, d loss / d h, d loss / d weight) a chunk of rows at a time; the gradients only
    when `need_grad` (scoring does one matmul per chunk and allocates no gradient)."""
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
        logits = hc @ w.t()  # [c, V], in compute_dtype
        # one log-softmax pass, its max, sum of exp and log in float32 (or wider): bf16 logits
        # are widened first (CPU kernels are faster on float32 than on bf16 read as float32)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        del logits
        target = logp.gather(1, safe)
        loss -= (target * valid).sum()
        if grad_h is not None and grad_w is not None:
            # d(sum loss)/d(logits) = softmax - onehot, in place. Padding rows are masked on the
            # narrow side (their h rows and their gradient rows, [c, d]), not over [c, V]; no
            # data-dependent branch, so torch.compile traces it whole
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
