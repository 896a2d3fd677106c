"""longctx/kernels/fused.py's Triton kernels (SwiGLU, RoPE) against float64 expressions written here from
their definitions, and the model with them against the model without. Without a GPU the kernels
run in Triton's interpreter (tests/conftest.py)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import compiled_targets
import longctx.kernels
from longctx.kernels import fused
from longctx.attention import ImprovedDilatedAttention
from longctx.model import LongNetLM

pytestmark = pytest.mark.skipif(fused.triton is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def swiglu_ref(x):
    """silu(g)·u = g·u / (1 + exp(−g)), in float64."""
    g, u = x.double().chunk(2, dim=-1)
    return g * u / (1 + torch.exp(-g))


def rope_ref(x, angles):
    """Rotate each (x[j], x[j + D/2]) pair by its angle, in float64."""
    x1, x2 = x.double().chunk(2, dim=-1)
    c, s = angles.double().cos(), angles.double().sin()
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("hidden", [48, 2100], ids=["one-block", "two-blocks"])
def test_swiglu_matches_its_definition(dtype, tol, hidden):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 3, 2 * hidden, generator=g) * 3).to(DEVICE, dtype).requires_grad_()
    dout = torch.randn(2, 3, hidden, generator=g).to(DEVICE, dtype)
    out = fused.swiglu(x)
    (dx,) = torch.autograd.grad(out, x, dout)
    xr = x.detach().double().requires_grad_()
    ref = swiglu_ref(xr)
    (dref,) = torch.autograd.grad(ref, xr, dout.double())
    assert out.dtype == dtype and out.shape == (2, 3, hidden)
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (dx.double() - dref).abs().max() <= tol * dref.abs().max()


def test_swiglu_rejects_an_odd_width():
    with pytest.raises(ValueError, match="must be even"):
        fused.swiglu(torch.zeros(2, 5, device=DEVICE))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)], ids=["float32", "bfloat16"])
def test_rope_matches_its_definition_on_a_strided_view(dtype, tol):
    """q as the model gets it: a view of a fused (B, l, 3, H, D) projection (no unit head stride
    contiguity), with gradients: backward is the inverse rotation."""
    B, L, H, D = 2, 7, 3, 10
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(DEVICE, dtype).requires_grad_()
    angles = torch.outer(torch.arange(5, 5 + L, dtype=torch.float32), 0.3 ** torch.arange(D // 2))[None, :, None, :]
    angles = angles.to(DEVICE)
    q = qkv.unbind(2)[0]
    out = fused.rope(q, angles.cos(), angles.sin())
    dout = torch.randn(B, L, H, D, generator=g).to(DEVICE, dtype)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    qr = qkv.detach().double().requires_grad_()
    ref = rope_ref(qr.unbind(2)[0], angles)
    (dref,) = torch.autograd.grad(ref, qr, dout.double())
    assert out.dtype == dtype and out.is_contiguous()
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max()
    assert (dqkv.double() - dref).abs().max() <= tol * dref.abs().max()
    assert dqkv[:, :, 1:].abs().max() == 0  # k and v get no gradient from q's rotation


def rms_norm_ref(h, w, eps):
    """h / sqrt(mean(h²) + eps) · w over the last dim, in float64."""
    h = h.double()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.double()


@pytest.mark.parametrize("add", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("dtypes, tol", [((torch.float32, torch.float32), 1e-6),
                                         ((torch.float32, torch.bfloat16), 1e-6),
                                         ((torch.bfloat16, torch.bfloat16), 1e-2)], ids=["float32", "mixed", "bfloat16"])
@pytest.mark.parametrize("width", [48, 100], ids=["pow2-block", "masked"])
def test_rms_norm_matches_its_definition(add, dtypes, tol, width):
    """rms_norm and add_rms_norm (h = x + a in the promoted dtype, then the norm of h) with their
    gradients: x's, a's (the norm's plus what reaches h from its other use, gh) and the weight's,
    summed over 11 rows (on the CPU the backward runs six programs of two rows, the last ragged)."""
    x_dtype, a_dtype = dtypes
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, 11, width, generator=g) * 2).to(DEVICE, x_dtype).requires_grad_()
    a = torch.randn(1, 11, width, generator=g).to(DEVICE, a_dtype).requires_grad_()
    w = (1 + torch.randn(width, generator=g) / 4).to(DEVICE).requires_grad_()
    gy, gh = (torch.randn(1, 11, width, generator=g).to(DEVICE) for _ in range(2))
    if add:
        h, y = fused.add_rms_norm(x, a, w, 1e-5)
        loss = (y.double() * gy.double()).sum() + (h.double() * gh.double()).sum()
        grads = torch.autograd.grad(loss, [x, a, w])
    else:
        h, y = x, fused.rms_norm(x, w, 1e-5)
        grads = torch.autograd.grad((y.double() * gy.double()).sum(), [x, w])
    xr, ar, wr = (t.detach().double().requires_grad_() for t in (x, a, w))
    hr = (xr + ar).to(h.dtype).double() if add else xr  # the sum is rounded to the stream's dtype
    yr = rms_norm_ref(hr, wr, 1e-5)
    ref_loss = (yr * gy.double()).sum() + ((hr * gh.double()).sum() if add else 0)
    refs = torch.autograd.grad(ref_loss, [xr, ar, wr] if add else [xr, wr])
    assert y.dtype == x_dtype and h.dtype == torch.promote_types(x_dtype, a_dtype if add else x_dtype)
    assert (y.double() - yr).abs().max() <= tol * yr.abs().max()
    if add:  # the sum rounded once to h's dtype (Triton's interpreter may round a bfloat16 one ulp off)
        torch.testing.assert_close(h.double(), hr, rtol=2 ** -7 if h.dtype == torch.bfloat16 else 0, atol=0)
    for got, want, t in zip(grads, refs, [x, a, w] if add else [x, w]):  # each rounded to its input's dtype
        assert got.dtype == t.dtype
        assert (got.double() - want).abs().max() <= (1e-2 if t.dtype == torch.bfloat16 else tol) * want.abs().max()


def test_rms_norm_returns_rows_in_autocast_dtype():
    """Under autocast the normalised rows come out in autocast's dtype (the next matmul would
    cast them to it), computed from float32 rows with a float32 weight."""
    x = torch.randn(3, 40, device=DEVICE)
    w = torch.rand(40, device=DEVICE) + 0.5
    with torch.autocast(torch.device(DEVICE).type, torch.bfloat16):
        y = fused.rms_norm(x, w, 1e-5)
        h, y2 = fused.add_rms_norm(x, x, w, 1e-5)
    assert y.dtype == y2.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(y, rms_norm_ref(x, w, 1e-5).to(torch.bfloat16), rtol=0, atol=0.02)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_model_with_fused_kernels_matches_the_plain_model(monkeypatch, checkpointing):
    """The same LongNetLM (float32) with and without the fused kernels: the same loss and
    gradients. On CPU the kernels are forced on (the interpreter runs them)."""
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 2, 4, ImprovedDilatedAttention,
                      dict(segment_lengths=[8, 16], dilation_rates=[1, 2]), mlp_hidden=40,
                      activation_checkpointing=checkpointing).to(DEVICE)
    idx = torch.randint(0, 256, (1, 21), device=DEVICE)
    results, calls = [], []
    for use in (False, True):
        monkeypatch.setattr(fused, "available", lambda x, use=use: calls.append(use) or use)
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[0, 1:])
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    # per block: q and k rotated, one SwiGLU, norm1 (x) and norm2 with its add (x and a), each
    # once more when checkpointing recomputes the block; then the final norm
    assert calls.count(True) == 2 * 6 * (1 + checkpointing) + 1
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compiled_model_runs_swiglu_as_custom_ops_and_matches_the_plain_model(monkeypatch):
    """Under torch.compile the model calls SwiGLU's kernels as custom ops (one node each way, the
    fake implementations giving the shapes) and keeps RoPE's plain expression: the same loss and
    gradients as the eager model without the kernels."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 2, 4, ImprovedDilatedAttention,
                      dict(segment_lengths=[8, 16], dilation_rates=[1, 2]), mlp_hidden=40).to(DEVICE)
    idx = torch.randint(0, 256, (1, 21), device=DEVICE)
    params = list(model.parameters())
    monkeypatch.setattr(fused, "available", lambda x: False)
    plain = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[0, 1:])
    plain_grads = torch.autograd.grad(plain, params)
    monkeypatch.setattr(fused, "available", lambda x: True)
    logits, targets = compiled_targets(model, idx[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), idx[0, 1:])
    grads = torch.autograd.grad(loss, params)
    assert targets.count(torch.ops.longctx.swiglu.default) == 2  # one a block
    assert not any("rope" in str(t) for t in targets)
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_kernels_are_for_gpu_tensors_only(monkeypatch):
    """available(): a CUDA tensor of a float dtype, with Triton compiled (not interpreted), in
    eager mode and under torch.compile alike (the model picks which kernels to use there)."""
    monkeypatch.setattr(longctx.kernels, "SUPPORTED", True)
    monkeypatch.setattr(longctx.kernels, "INTERPRETED", False)
    gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert fused.available(gpu)
    assert not fused.available(SimpleNamespace(device=torch.device("cuda"), dtype=torch.float64))
    assert not fused.available(torch.zeros(2))  # CPU
    monkeypatch.setattr(fused, "ENABLED", False)  # LONGCTX_FUSED=0
    assert not fused.available(gpu)
