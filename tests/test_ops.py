import pytest
import torch
import torch.nn.functional as F

from cairn.config import ModelConfig
from cairn.model import Transformer
from reference import lm_loss
from cairn.ops import linear_cross_entropy


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
