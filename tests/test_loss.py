"""The chunked LM head and cross-entropy against the plain F.cross_entropy(F.linear(h, w), t):
the same value and gradients (float32, CPU), through the tied embedding too."""
import pytest
import torch
import torch.nn.functional as F

from longctx.loss import head_argmax, linear_cross_entropy
from longctx.model import LongNetLM
from longctx.attention import DilatedAttention


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [7, 50, 1000])
def test_equals_the_plain_head_and_loss(reduction, chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(97, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 97, (50,), generator=g)
    ours = linear_cross_entropy(h, w, t, reduction, chunk)
    (gh, gw) = torch.autograd.grad(ours * 1.7, (h, w))
    plain = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
    (ph, pw) = torch.autograd.grad(plain * 1.7, (h, w))
    torch.testing.assert_close(ours, plain)
    torch.testing.assert_close(gh, ph)
    torch.testing.assert_close(gw, pw)
    assert torch.equal(head_argmax(h.detach(), w.detach(), chunk), F.linear(h, w).argmax(-1))


def test_through_the_models_tied_embedding():
    torch.manual_seed(0)
    model = LongNetLM(300, 32, 2, 4, DilatedAttention, dict(segment_lengths=[8, 16], dilation_rates=[1, 2]))
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    model.loss(model.features(x), y).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x).flatten(0, 1), y.reshape(-1)).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, msg=n)


def test_no_gradient_is_made_when_none_is_needed():
    h, w, t = torch.randn(10, 4), torch.randn(20, 4), torch.randint(0, 20, (10,))
    with torch.no_grad():
        value = linear_cross_entropy(h, w, t, "sum", 3)
    assert value.grad_fn is None
    torch.testing.assert_close(value, F.cross_entropy(h @ w.T, t, reduction="sum"))
