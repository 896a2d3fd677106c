"""GPU parity (run on a lent GPU with scripts/gpu_check.sh; skipped on CPU-only machines).
The same rule as the CPU suite: error vs the float64 reference at most 2x the error of the
reference itself computed in the low precision."""
import pytest
import torch

from longctx.attention import DilatedAttention, ImprovedDilatedAttention, RingDilatedAttention, kernels
from reference import reference_attention

pytestmark = pytest.mark.gpu

CASES = [
    (257, 4, 64, [64, 128, 512], [1, 2, 4], False),  # odd T, clipped and tail segments
    (1000, 6, 64, [128, 256], [2, 4], True),  # no dilation 1, head_split
    (2048, 8, 64, [1024, 1024, 1024], [1, 2, 4], False),  # the seed's layout at 2K
    (2048, 8, 128, [512, 2048], [1, 4], False),
    (1024, 16, 64, [256, 1024], [1, 4], False),  # r = 4 over 16 heads: gathered pieces
]


def err(a, b):
    return (a.double() - b).abs().max().item()


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_cls", [ImprovedDilatedAttention, RingDilatedAttention, DilatedAttention], ids=lambda c: c.__name__)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-D{c[2]}" for c in CASES])
def test_gpu_parity(case, causal, op_cls, dtype, backend, monkeypatch):
    monkeypatch.setattr(kernels, "CUDA_BACKEND", backend)
    T, H, D, ws, rs, hs = case
    g = torch.Generator(device="cuda").manual_seed(T)
    q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.float64, generator=g) for _ in range(4))
    low = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    out = op_cls(ws, rs, head_split=hs)(*low, is_causal=causal)
    grads = torch.autograd.grad(out, low, dout.to(dtype))
    exact_in = [x.clone().requires_grad_() for x in (q, k, v)]
    exact = reference_attention(*exact_in, ws, rs, causal, hs)
    exact_grads = torch.autograd.grad(exact, exact_in, dout)
    ref_in = [x.to(dtype).requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_in, ws, rs, causal, hs, dtype=dtype)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert err(out, exact) <= 2 * err(ref, exact) + 1e-6
    for name, gr, rg, eg in zip("qkv", grads, ref_grads, exact_grads):
        assert err(gr, eg) <= 2 * err(rg, eg) + 1e-6, name


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("head_split", [False, True], ids=["merged", "disjoint"])
def test_gpu_fused_qkv_views_batch_two(head_split, backend, monkeypatch):
    """q/k/v as views of one (B, T, 3, H, D) projection, batch 2 with a tail segment (the
    batch and segment axes do not fold into one view there): the kernels read the views."""
    monkeypatch.setattr(kernels, "CUDA_BACKEND", backend)
    T, H, D, ws, rs = 1000, 8, 64, [256, 512], [1, 2]
    g = torch.Generator(device="cuda").manual_seed(7)
    qkv, dout = (torch.randn(2, T, *s, D, device="cuda", dtype=torch.float64, generator=g) for s in ((3, H), (H,)))
    low = qkv.to(torch.bfloat16).requires_grad_()
    out = ImprovedDilatedAttention(ws, rs, head_split=head_split)(*low.unbind(2), is_causal=True)
    (grad,) = torch.autograd.grad(out, low, dout.to(torch.bfloat16))
    exact_in = qkv.clone().requires_grad_()
    exact = reference_attention(*exact_in.unbind(2), ws, rs, True, head_split)
    (exact_grad,) = torch.autograd.grad(exact, exact_in, dout)
    ref_in = qkv.to(torch.bfloat16).requires_grad_()
    ref = reference_attention(*ref_in.unbind(2), ws, rs, True, head_split, dtype=torch.bfloat16)
    (ref_grad,) = torch.autograd.grad(ref, ref_in, dout.to(torch.bfloat16))
    assert err(out, exact) <= 2 * err(ref, exact) + 1e-6
    assert err(grad, exact_grad) <= 2 * err(ref_grad, exact_grad) + 1e-6


@pytest.mark.parametrize("head_split", [False, True], ids=["merged", "disjoint"])
def test_gpu_forward_backward_capture_in_a_cuda_graph(head_split):
    """The op makes no host synchronisation: fwd+bwd captures in a CUDA graph (benchmark
    --cuda-graph, torch.compile's reduce-overhead) and its replay equals the eager result."""
    from longctx.benchmark import graphed

    T, H, D, ws, rs = 4096, 16, 64, [512, 1024, 2048, 4096], [1, 2, 4, 8]  # strided; gathered for r = 4
    g = torch.Generator(device="cuda").manual_seed(11)
    q, k, v, dout = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    op = ImprovedDilatedAttention(ws, rs, head_split=head_split)
    results = []

    def step():
        out = op(q, k, v, is_causal=True)
        results.append((out, *torch.autograd.grad(out, (q, k, v), dout)))

    replay = graphed(step)  # warm-up calls and the capture append; the capture's tensors are last
    captured = results[-1]
    for t in captured:
        t.zero_()
    replay()
    step()
    eager = results[-1]
    torch.cuda.synchronize()
    for name, a, b in zip(["out", "dq", "dk", "dv"], captured, eager):
        torch.testing.assert_close(a, b, msg=name)  # not bitwise: the dQ accumulation uses atomics
