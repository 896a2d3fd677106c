"""The LM's memory-saving pieces compute the same function as their plain forms."""
import math

import pytest
import torch
import torch.nn.functional as F

from longctx.attention import (DilatedAttention, ImprovedDilatedAttention, ImprovedMultiheadDilatedAttention, RingDilatedAttention,
                               RingMultiheadDilatedAttention)
from longctx.model import LongNetLM, Rotary, SwiGLU


def rope_by_hand(x, offset, base=10000.0):
    """RoPE written from its definition: pair (i, i + D/2) rotated by angle pos · base^(−2i/D)."""
    B, T, H, D = x.shape
    out = torch.empty_like(x)
    for t in range(T):
        for i in range(D // 2):
            theta = (offset + t) * base ** (-2 * i / D)
            c, s = math.cos(theta), math.sin(theta)
            a, b = x[:, t, :, i], x[:, t, :, i + D // 2]
            out[:, t, :, i] = a * c - b * s
            out[:, t, :, i + D // 2] = b * c + a * s
    return out


def test_rotary_matches_definition_and_its_gradient_is_the_inverse_rotation():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    rope = Rotary(8)
    y = rope(x, offset=7)
    torch.testing.assert_close(y, rope_by_hand(x.detach(), 7), rtol=1e-6, atol=1e-6)  # float32 angles
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    xx = x.detach().clone().requires_grad_()
    (gref,) = torch.autograd.grad(rope_by_hand(xx, 7), xx, g)
    torch.testing.assert_close(gx, gref, rtol=1e-6, atol=1e-6)


def test_rotary_rounds_once_in_low_precision():
    x = torch.randn(1, 16, 2, 64).to(torch.bfloat16)
    y = Rotary(64)(x, offset=100)
    exact = rope_by_hand(x.double(), 100)
    assert y.dtype == torch.bfloat16
    assert (y.double() - exact).abs().max() <= (exact.to(torch.bfloat16).double() - exact).abs().max() * 1.01 + 1e-6


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_lm_computes_rope_angles_once_per_forward(monkeypatch, checkpointing):
    """Every block (and its recompute) rotates with the angles made once per forward, at the
    caller's global offset."""
    offsets, calls = [], []
    real = Rotary.angles
    monkeypatch.setattr(Rotary, "angles", lambda self, l, offset, device: offsets.append(offset) or real(self, l, offset, device))
    monkeypatch.setattr(torch.Tensor, "cos", lambda x, _cos=torch.Tensor.cos: calls.append(x.shape) or _cos(x))
    model = LongNetLM(256, 32, 3, 4, ImprovedDilatedAttention, dict(segment_lengths=[8, 16], dilation_rates=[1, 2]),
                      activation_checkpointing=checkpointing)
    model(torch.randint(0, 256, (1, 16)), pos_offset=48).sum().backward()
    assert offsets == [48] and calls == [(1, 16, 1, 4)]


def test_chunked_swiglu_equals_whole_sequence():
    torch.manual_seed(0)
    whole, chunked = SwiGLU(16, 40), SwiGLU(16, 40, chunk_tokens=7)
    chunked.load_state_dict(whole.state_dict())
    x = torch.randn(2, 30, 16, dtype=torch.float64, requires_grad=True)
    whole.double(), chunked.double()
    ys = [m(x) for m in (whole, chunked)]
    torch.testing.assert_close(ys[1], ys[0])
    g = torch.randn_like(ys[0])
    grads = [torch.autograd.grad(y, [x, *m.parameters()], g) for y, m in zip(ys, (whole, chunked))]
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lm_with_mlp_chunks_trains_identically(checkpointing):
    """Chunking the MLP (inside block checkpointing or not) changes no loss or gradient."""
    def build(chunk):
        torch.manual_seed(0)
        return LongNetLM(256, 32, 2, 4, ImprovedDilatedAttention, dict(segment_lengths=[8, 16], dilation_rates=[1, 2]),
                         activation_checkpointing=checkpointing, mlp_chunk_tokens=chunk).double()

    idx = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (build(None), build(16)):
        loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].reshape(-1))
        results.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("cls, checkpointing", [
    (ImprovedDilatedAttention, False), (ImprovedDilatedAttention, True), (RingDilatedAttention, False),
    (ImprovedMultiheadDilatedAttention, False), (RingMultiheadDilatedAttention, False),
], ids=["improved", "improved-checkpointed", "ring", "improved_multihead", "ring_multihead"])
def test_compiled_model_is_one_graph_with_the_same_loss_and_gradients(cls, checkpointing):
    """The attention op is one custom-op node: torch.compile traces the model whole (no graph
    break), and the compiled model, through AOTAutograd (the op's fake tensors and its backward
    registration), gives the eager loss and gradients. Activation checkpointing is traced
    inside the graph too (what CUDA-graph trees need, model.Block). The ring variants on one
    rank run the same op (their multi-rank ring is eager, outside the graph)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 2, 4, cls,
                      dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4]), activation_checkpointing=checkpointing)
    idx = torch.randint(0, 256, (1, 37))
    explained = torch._dynamo.explain(model)(idx)
    assert explained.graph_count == 1 and not explained.break_reasons, explained
    params = list(model.parameters())
    eager_loss = model(idx).logsumexp(-1).mean()
    eager_grads = torch.autograd.grad(eager_loss, params)
    loss = torch.compile(model, backend="aot_eager")(idx).logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_checkpointed_block_keeps_only_its_input_for_backward(device):
    """A checkpointed block, compiled with the partitioner Inductor uses, keeps for backward what
    eager keeps: its input (and the parameters and RoPE angles, alive anyway). Everything inside
    is recomputed, the SwiGLU chunks' own checkpoints included. Under torch 2.11 the compiled
    block also saved the rotated q and k (3 GiB a block at 1M tokens):
    the ops inside an autograd.Function were not tagged as part of the checkpoint."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LongNetLM(256, 32, 1, 4, ImprovedDilatedAttention, dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4]),
                      activation_checkpointing=True, mlp_chunk_tokens=16).to(device)
    block = model.blocks[0]
    block.compile(backend="aot_eager_decomp_partition")
    x = torch.randn(1, 64, 32, device=device, requires_grad=True)
    rope = model.rotary.rotation(64, 0, device)
    allowed = {t.untyped_storage().data_ptr() for t in (x, rope.keywords["cos"], rope.keywords["sin"], *block.parameters())}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = block(x, rope)
    extra = [tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in allowed]
    assert any(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    assert not extra, f"the compiled block saved activations beyond its input: {extra}"
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("cls, dropout, device", [
    (ImprovedDilatedAttention, 0.0, "cpu"), (DilatedAttention, 0.2, "cpu"),
    pytest.param(ImprovedDilatedAttention, 0.0, "cuda", marks=pytest.mark.gpu),
], ids=["improved", "dilated-dropout", "improved-cuda"])
def test_offloaded_checkpoints_give_the_loss_and_gradients_of_the_plain_model(cls, dropout, device):
    """model.offload_checkpoints recomputes each block from its kept input, under the forward's
    autocast and RNG state: the same loss and gradients as the model without checkpointing (with
    attention dropout, a recompute that drew new masks would give other gradients). On a GPU the
    inputs go through pinned host memory and the side stream; its backward kernels may add in
    another order, so there the gradients are compared by relative norm."""
    kw = dict(segment_lengths=[8, 16, 32], dilation_rates=[1, 2, 4], dropout=dropout)
    torch.manual_seed(0)
    plain = LongNetLM(256, 32, 3, 4, cls, kw, mlp_chunk_tokens=16).to(device)
    offloaded = LongNetLM(256, 32, 3, 4, cls, kw, activation_checkpointing=True, mlp_chunk_tokens=16,
                          offload_checkpoints=True).to(device)
    offloaded.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 65), device=device)
    results = []
    for model in (plain, offloaded):
        model.train()
        torch.manual_seed(1)
        with torch.autocast(device, torch.bfloat16):
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    (loss, grads), (loss_off, grads_off) = results
    torch.testing.assert_close(loss_off, loss)
    for a, b in zip(grads_off, grads):
        if device == "cpu":
            torch.testing.assert_close(a, b)
        else:
            assert (a - b).norm() <= 1e-2 * b.norm(), ((a - b).norm(), b.norm())
    assert all(g.abs().sum() > 0 for g in grads_off)


def test_offloaded_checkpoints_need_checkpointing_and_eager_blocks():
    kw = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
    with pytest.raises(ValueError, match="model.offload_checkpoints=true.*activation_checkpointing=true"):
        LongNetLM(256, 32, 1, 4, ImprovedDilatedAttention, kw, offload_checkpoints=True)
    from longctx.lit_module import LongContextLM
    with pytest.raises(NotImplementedError, match="offload_checkpoints.*compile=false"):
        LongContextLM(segment_lengths=[8, 16], dilation_rates=[1, 2], seq_len=32, activation_checkpointing=True,
                      offload_checkpoints=True, compile=True)


@pytest.mark.parametrize("cls, checkpointing, device", [
    (ImprovedDilatedAttention, False, "cpu"), (ImprovedDilatedAttention, True, "cpu"),
    (ImprovedMultiheadDilatedAttention, False, "cpu"),
    pytest.param(ImprovedDilatedAttention, False, "cuda", marks=pytest.mark.gpu),
], ids=["core", "core-checkpointed", "multihead", "core-cuda"])
def test_bfloat16_residual_stream(cls, checkpointing, device):
    """residual_dtype=torch.bfloat16 under bf16 autocast: every block takes and returns bfloat16
    (a checkpointed block saves its input as such, half the bytes), and the loss and gradients
    stay within bf16 rounding of the float32 stream's. Without it the stream is float32."""
    torch.manual_seed(0)
    kw = dict(segment_lengths=[8, 16], dilation_rates=[1, 2])
    ref = LongNetLM(256, 32, 3, 4, cls, kw, activation_checkpointing=checkpointing).to(device)
    low = LongNetLM(256, 32, 3, 4, cls, kw, activation_checkpointing=checkpointing,
                    residual_dtype=torch.bfloat16).to(device)
    low.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 256, (2, 33), device=device)
    results = []
    for model in (ref, low):
        seen, saved = [], []
        hooks = [b.register_forward_hook(lambda m, a, out: seen.append((a[0], out.dtype))) for b in model.blocks]
        with torch.autocast(device, torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            loss = F.cross_entropy(model(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
        for h in hooks:
            h.remove()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        inputs = {x.untyped_storage().data_ptr() for x, _ in seen}
        kept = {t.dtype for t in saved if t.untyped_storage().data_ptr() in inputs}
        results.append((loss.detach(), grads, [(x.dtype, out) for x, out in seen], kept))
    (loss_ref, grads_ref, seen_ref, saved_ref), (loss_low, grads_low, seen_low, saved_low) = results
    assert seen_ref == [(torch.float32, torch.float32)] * 3
    assert seen_low == [(torch.bfloat16, torch.bfloat16)] * 3
    if checkpointing:  # what a checkpointed block keeps: its input, in the stream's dtype
        assert saved_ref == {torch.float32} and saved_low == {torch.bfloat16}
    with pytest.raises(ValueError, match="residual_dtype=torch.bfloat16 needs torch.bfloat16 parameters or torch.autocast"):
        low(idx[:, :-1])  # float32 parameters, no autocast: the matmuls would get mixed dtypes
    torch.testing.assert_close(loss_low, loss_ref, rtol=2e-2, atol=0)
    for a, b in zip(grads_low, grads_ref):
        assert a.dtype == b.dtype == torch.float32  # the parameters' gradients stay float32
        assert (a - b).norm() <= 5e-2 * b.norm(), ((a - b).norm(), b.norm())
