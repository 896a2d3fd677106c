"""longctx/attention/rotary.py (RoPE inside the union op, on the packed q/k/v projection) against
tests/reference.py with RoPE written from its definition. Without a GPU the kernels run in
Triton's interpreter in float32; the GPU tests (test_gpu.py) compare bf16 training with the path
off and on."""
import pytest
import torch

from conftest import compiled_targets
from longctx import model as lm
from longctx.attention import ImprovedDilatedAttention, rotary
from longctx.kernels import SUPPORTED, union
from reference import reference_attention
from test_model import rope_by_hand
from test_union import layouts, poisoned_empty

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs Triton >= 3.6 (installed by the test extra)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def angles(T, D, offset=0):
    """cos and sin (1, T, 1, D/2) float32 of RoPE's angles (t · 10000^(−2i/D)), from the definition."""
    theta = torch.tensor([[(offset + t) * 10000 ** (-2 * i / D) for i in range(D // 2)] for t in range(T)])
    return torch.cos(theta)[None, :, None].float(), torch.sin(theta)[None, :, None].float()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", [
    (1, 256, 5, 16, 64, 3, False, False),  # three levels: the upper passes add to rotated rows
    # head_split: rows a head does not keep get zero gradients; qkv a view whose slots do not fold
    (2, 256, 7, 16, 32, 3, True, True),
], ids=lambda c: f"B{c[0]}-T{c[1]}-H{c[2]}-L{c[4]}-n{c[5]}" + ("-split" if c[6] else "") + ("-padded" if c[7] else ""))
def test_rotary_op_matches_rope_then_the_reference(case, causal):
    """Output and the packed projection's gradient equal RoPE on q and k, then the design's
    attention, differentiated by autograd in float64; every element is written (NaN-filled
    buffers), and the forward keeps q and k rotated, each contiguous (v is read from qkv)."""
    B, T, H, D, L, n, split, padded = case
    ws, rs = layouts(L, n)
    g = torch.Generator().manual_seed(T + H)
    qkv = torch.randn(B, T, 3, H, D, generator=g, dtype=torch.float64).to(DTYPE).double()
    dout = torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(DTYPE).double()
    cos, sin = angles(T, D, offset=5)
    config = (ws, rs, split, causal, 0.3)
    half = [x.reshape(T, D // 2).to(DEVICE) for x in (cos, sin)]
    packed = qkv.to(DEVICE, DTYPE)
    if padded:  # rows of D + 8 elements, v strided in them
        packed = torch.zeros(B, T, 3, H, D + 8, device=DEVICE, dtype=DTYPE)[..., :D].copy_(packed)
    with poisoned_empty(DEVICE):
        out, lse, rotated = rotary.attend(packed, *half, *config)
        dqkv = rotary.attend_backward(dout.to(DEVICE, DTYPE), packed, rotated, *half, out, lse, *config)
    exact_in = qkv.clone().requires_grad_()
    q, k, v = exact_in.unbind(2)
    exact = reference_attention(rope_by_hand(q, 5), rope_by_hand(k, 5), v, ws, rs, causal, head_split=split, scale=0.3)
    (grad,) = torch.autograd.grad(exact, exact_in, dout)
    tol = 1e-5 if DTYPE == torch.float32 else 3e-2
    for name, got, want in [("out", out, exact), *zip(["dq", "dk", "dv"], dqkv.unbind(2), grad.unbind(2))]:
        assert (got.double().cpu() - want).abs().max() <= tol * want.abs().max(), name
    assert dqkv.shape == qkv.shape and rotated.shape == (2, B, T, H, D) and rotated.is_contiguous()
    want = torch.stack([rope_by_hand(qkv[:, :, 0], 5), rope_by_hand(qkv[:, :, 1], 5)])
    assert (rotated.double().cpu() - want).abs().max() <= tol * want.abs().max()


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreted kernels on CPU tensors; test_gpu.py runs it in bf16")
def test_the_model_runs_the_rotary_op_where_it_applies(monkeypatch):
    """CoreAttention takes the rotary path for ImprovedDilatedAttention on a union layout (made to
    apply on the CPU here) and gives the loss and gradients of the model rotating q and k itself;
    with LONGCTX_ROTARY=0 (ENABLED off) it does not take it."""
    calls = []
    monkeypatch.setattr(union, "use", lambda q, lay: lay is not None)  # the union kernels, interpreted
    real = rotary.attend
    monkeypatch.setattr(rotary, "attend", lambda *a: calls.append(a[0].shape) or real(*a))
    torch.manual_seed(0)
    kw = dict(segment_lengths=[32, 64], dilation_rates=[1, 2])
    model = lm.LongNetLM(256, 32, 2, 2, ImprovedDilatedAttention, kw)
    idx = torch.randint(0, 256, (1, 128))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(idx, pos_offset=3).flatten(0, 1), idx.flatten())
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    fused, fused_grads = loss_and_grads()
    assert calls == [(1, 128, 3, 2, 16)] * 2  # both blocks
    monkeypatch.setattr(rotary, "ENABLED", False)
    plain, plain_grads = loss_and_grads()
    assert len(calls) == 2
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_rotary_path_only_for_improved_and_the_single_rank_ring(monkeypatch):
    from longctx.attention import DilatedAttention, RingDilatedAttention

    monkeypatch.setattr(union, "use", lambda q, lay: lay is not None)
    qkv = torch.zeros(1, 128, 3, 2, 16)
    kw = dict(segment_lengths=[32, 64], dilation_rates=[1, 2])
    assert rotary.applies(ImprovedDilatedAttention(**kw), qkv)
    assert rotary.applies(RingDilatedAttention(**kw), qkv)  # no process group: one rank
    assert not rotary.applies(DilatedAttention(**kw), qkv)  # the reference stays plain
    assert not rotary.applies(ImprovedDilatedAttention([32, 96], [1, 3]), qkv)  # not a union layout


@pytest.mark.skipif(DEVICE == "cuda", reason="interpreted kernels on CPU tensors; test_gpu.py runs it in bf16")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_compiled_model_runs_the_rotary_op_as_one_node(monkeypatch, checkpointing):
    """Under torch.compile the rotary path is one custom-op node a block (its fake implementations
    giving the shapes, no graph break, checkpointed blocks included), with the loss and gradients
    of the eager model rotating q and k itself."""
    torch._dynamo.reset()
    monkeypatch.setattr(union, "use", lambda q, lay: lay is not None)
    torch.manual_seed(0)
    model = lm.LongNetLM(256, 32, 2, 2, ImprovedDilatedAttention, dict(segment_lengths=[32, 64], dilation_rates=[1, 2]),
                         activation_checkpointing=checkpointing)
    idx = torch.randint(0, 256, (1, 129))
    params = list(model.parameters())
    monkeypatch.setattr(rotary, "ENABLED", False)
    plain = torch.nn.functional.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[0, 1:])
    plain_grads = torch.autograd.grad(plain, params)
    monkeypatch.setattr(rotary, "ENABLED", True)
    logits, targets = compiled_targets(model, idx[:, :-1])  # the checkpoints' nodes too
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[0, 1:])
    grads = torch.autograd.grad(loss, params)
    assert targets.count(torch.ops.longctx.rotary_dilated_attention.default) == 2  # one a block
    assert torch.ops.longctx.dilated_attention.default not in targets
    torch.testing.assert_close(loss, plain, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
