import math

import pytest
import torch
import torch.nn.functional as F

from cairn.config.sections import ModelConfig
from cairn.model.transformer import Transformer
from reference import lm_loss
from cairn.model.ops import linear_cross_entropy


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_fused_linear_cross_entropy_matches_unfused_values_and_gradients(chunk):
    torch.manual_seed(0)
    h = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 300, (50,))
    y[[3, 17, 40]] = -100  # padding
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 0.37, (h, w))
    out = linear_cross_entropy(h, w, y, chunk=chunk)
    fh, fw = torch.autograd.grad(out * 0.37, (h, w))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fh, gh, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(fw, gw, rtol=1e-9, atol=1e-12)


def test_model_fused_loss_equals_loss_over_logits():
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=211, d_model=32, n_layers=2, n_heads=4, d_mlp=64, context_len=20))
    x = torch.randint(0, 211, (3, 20))
    y = torch.randint(0, 211, (3, 20))
    y[2, 12:] = -100
    s_ref, n_ref = lm_loss(m(x), y)
    g_ref = torch.autograd.grad(s_ref, list(m.parameters()))
    s, n = m(x, labels=y)
    g = torch.autograd.grad(s, list(m.parameters()))
    assert n == n_ref == 52
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_no_gradient_work_without_grad():
    h = torch.randn(10, 8)
    w = torch.randn(40, 8)
    y = torch.randint(0, 40, (10,))
    with torch.no_grad():
        out = linear_cross_entropy(h, w, y)
    assert out.grad_fn is None
    assert out.item() == pytest.approx(F.cross_entropy(h @ w.t(), y, reduction="sum").item(), rel=1e-5)


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op run, with the shapes of the tensors it returns."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        self.seen.append((str(func.overloadpacket), [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_scoring_a_parameter_head_does_forward_work_only(context):
    """A model's head is a parameter (it requires grad) and scoring runs under no_grad or
    inference_mode: one matmul per chunk, and no [V, d] or [N, d] gradient buffer."""
    h, y = torch.randn(40, 8), torch.randint(0, 50, (40,))
    w = torch.nn.Parameter(torch.randn(50, 8))
    with context(), _Ops() as ops:
        out = linear_cross_entropy(h, w, y, chunk=16)
    matmuls = [name for name, _ in ops.seen if name in ("aten.mm", "aten.addmm", "aten.bmm", "aten.matmul")]
    assert len(matmuls) == 3  # 40 rows in chunks of 16: one logits matmul each
    made = {"aten.zeros", "aten.empty", "aten.empty_like", "aten.zeros_like", "aten.new_zeros", "aten.new_empty"}
    assert not any(name in made and shape in ((50, 8), (40, 8)) for name, shapes in ops.seen for shape in shapes)
    assert out.item() == pytest.approx(F.cross_entropy(h @ w.detach().t(), y, reduction="sum").item(), rel=1e-5)
    with _Ops() as ops:  # the check can fail: training does the gradient work, in the forward pass
        linear_cross_entropy(h, w, y, chunk=16)
    assert sum(name in ("aten.mm", "aten.addmm_") for name, _ in ops.seen) == 9
    assert any(name in made and (50, 8) in shapes for name, shapes in ops.seen)


@pytest.mark.parametrize("chunk", [24, 1024])
def test_fused_linear_cross_entropy_under_bf16_autocast_is_within_bf16_rounding(chunk):
    """Under bf16 autocast the matmuls run in bf16 (8 significant bits, unit roundoff 2^-8 = 0.4%)
    and the log-sum-exp, loss and gradient accumulation in float32. Against the float64 answer for
    the same bf16-rounded h and W, the summed loss must be within 1e-3 relative (each logit's
    rounding error is random in sign and averages out over rows: measured 2e-6 to 4e-5) and the
    gradients within 1% of their norm (each is a bf16 product of the rounded softmax: measured
    0.25%). The gradients come back float32, the master weights' dtype."""
    torch.manual_seed(0)
    h = torch.randn(64, 64, requires_grad=True)
    w = (torch.randn(5000, 64) * 0.3).requires_grad_()
    y = torch.randint(0, 5000, (64,))
    y[[3, 17]] = -100
    hd, wd = (t.detach().bfloat16().double().requires_grad_() for t in (h, w))
    ref = F.cross_entropy(hd @ wd.t(), y, ignore_index=-100, reduction="sum")
    gh, gw = torch.autograd.grad(ref, (hd, wd))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, y, chunk=chunk)
    fh, fw = torch.autograd.grad(out, (h, w))
    assert out.dtype == fh.dtype == fw.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 1e-3 * ref.item()
    for got, want in ((fh, gh), (fw, gw)):
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


def test_bf16_log_sum_exp_accumulates_in_float32():
    """All-zero logits over a 50257-token vocabulary: the loss of each row is exactly ln(50257).
    Summed in bf16, the 50257 exp(0) = 1 terms would stop growing at 256 (bf16 cannot add 1 to
    256), giving ln(256) = 5.5 instead of 10.8."""
    h = torch.zeros(8, 16, requires_grad=True)
    w = torch.randn(50257, 16, requires_grad=True)
    y = torch.randint(0, 50257, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, y)
    assert out.item() == pytest.approx(8 * math.log(50257), rel=1e-6)
    gh, gw = torch.autograd.grad(out, (h, w))
    # softmax is 1/V everywhere, minus one at each target
    expected_gw = torch.zeros(50257, 16)
    torch.testing.assert_close(gw, expected_gw)
    torch.testing.assert_close(gh, ((torch.full((8, 50257), 1 / 50257).scatter_add_(
        1, y[:, None], -torch.ones(8, 1))).bfloat16().float() @ w.bfloat16().float()), rtol=2e-2, atol=1e-3)


class _Made(torch.utils._python_dispatch.TorchDispatchMode):
    """The ops that return new tensors, with their shapes."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[object, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func._schema.is_mutable:
            outs = out if isinstance(out, (tuple, list)) else [out]
            self.made.append((func, [tuple(o.shape) for o in outs if isinstance(o, torch.Tensor)]))
        return out


def _head_outputs(h, w, y, chunk, backward=True):
    if not backward:
        with torch.no_grad():
            return (linear_cross_entropy(h, w, y, chunk=chunk),)
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    out = linear_cross_entropy(hg, wg, y, chunk=chunk)
    return (out.detach(), *torch.autograd.grad(out, (hg, wg)))


@pytest.mark.parametrize("autocast", [False, True])
def test_the_head_keeps_its_chunk_buffers_from_one_call_to_the_next(autocast):
    """On CPUs a [chunk, V] buffer is made once, not for every chunk of every step (glibc maps
    each such block afresh and the kernel zero-fills every page of it again), and reusing it
    changes no bit of the loss or the gradients."""
    torch.manual_seed(0)
    h, w, y = torch.randn(40, 8), torch.randn(50, 8), torch.randint(0, 50, (40,))
    y[[1, 30]] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        first = _head_outputs(h, w, y, chunk=16)
        with _Made() as ops:
            again = _head_outputs(h, w, y, chunk=16)
        scored = _head_outputs(h[:8], w, y[:8], chunk=16, backward=False)  # fewer rows: a view of the buffer
    # a fresh tensor is what an op returns that neither writes into its arguments (mm with out=,
    # copy_, log_softmax with out=, exp_) nor views them (a buffer's first rows)
    fresh = [(str(func), shape) for func, shapes in ops.made for shape in shapes if shape[1:] == (50,)]
    assert fresh == []
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    want = F.cross_entropy(h[:8] @ w.t(), y[:8], ignore_index=-100, reduction="sum")
    assert scored[0].item() == pytest.approx(want.item(), rel=1e-2 if autocast else 1e-5)


def test_the_kept_buffers_follow_the_vocabulary_dtype_and_thread():
    """A head of another vocabulary or precision gets buffers of its own shape, and threads
    scoring at once each their own: every answer is the reference's."""
    import threading

    torch.manual_seed(0)
    cases = [(torch.randn(30, 8, dtype=dt), torch.randn(v, 8, dtype=dt), torch.randint(0, v, (30,)))
             for v, dt in ((50, torch.float32), (70, torch.float32), (50, torch.float64), (90, torch.float32))]
    wants = [F.cross_entropy(h @ w.t(), y, reduction="sum") for h, w, y in cases]
    for (h, w, y), want in zip(cases, wants):
        torch.testing.assert_close(_head_outputs(h, w, y, chunk=16)[0], want.detach())
    errors: list[str] = []

    def score(i: int) -> None:
        for _ in range(30):
            h, w, y = cases[i]
            got = _head_outputs(h, w, y, chunk=7, backward=False)[0]
            if not torch.allclose(got, wants[i]):
                errors.append(f"case {i}: {got.item()} != {wants[i].item()}")

    threads = [threading.Thread(target=score, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("backward", [True, False])
def test_cache_blocking_changes_no_bit_of_the_head(monkeypatch, autocast, backward):
    """float32 logits asked for LOGIT_BLOCK vocabulary columns at a time (a last block short),
    bf16 logits widened WIDE_BYTES of rows at a time (a last part short): the loss and gradients
    equal those of one block and one widening per chunk, bit for bit where rows are widened apart
    (the same arithmetic), to float32 rounding where MKL is asked for narrow blocks (a GEMM may
    pick another kernel for a 7-column block; at the record's 512-column blocks they were equal
    bit for bit), and the reference's."""
    from cairn.model import ops

    torch.manual_seed(0)
    h, w, y = torch.randn(45, 8), torch.randn(50, 8), torch.randint(0, 50, (45,))
    y[[2, 30]] = -100

    def outputs(block: int, wide_bytes: int) -> tuple:
        monkeypatch.setattr(ops, "LOGIT_BLOCK", block)
        monkeypatch.setattr(ops, "WIDE_BYTES", wide_bytes)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return _head_outputs(h, w, y, chunk=16, backward=backward)

    whole = outputs(1 << 30, 1 << 62)
    blocked = outputs(7, 3 * 50 * 4)  # 8 blocks of columns (the last of 1); 3 rows widened at a time
    for a, b in zip(whole, blocked):
        if autocast:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    want = F.cross_entropy(h @ w.t(), y, ignore_index=-100, reduction="sum")
    assert blocked[0].item() == pytest.approx(want.item(), rel=1e-2 if autocast else 1e-5)
    if torch.backends.mkl.is_available() and not autocast:  # the blocked path did run: 8 matmuls a chunk
        with _Ops() as seen:
            outputs(7, 3 * 50 * 4)
        assert sum(name == "aten.mm" for name, _ in seen.seen) >= 8 * 3
