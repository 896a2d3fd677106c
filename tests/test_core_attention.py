"""DilatedAttention and ImprovedDilatedAttention against the independent mask reference."""
import pytest
import torch

from longctx.attention import DilatedAttention, ImprovedDilatedAttention, RingDilatedAttention, build_attention
from longctx.attention import sdpa
from longctx.attention.improved import dilated_attention
from longctx.attention.layout import MAX_STRIDED_PIECES, plan
from longctx.attention.pieces import read_rows
from reference import pair_counts, reference_attention

OPS = [DilatedAttention, ImprovedDilatedAttention]


def seed_layout(T):
    return [min(s, T // 2) for s in (1024, 2048, 4096)], [1, 2, 4]


# (T, H, D, segment_lengths, dilation_rates)
CASES = [
    (37, 4, 16, [8, 16, 32], [1, 2, 4]),  # odd T, not a multiple of any segment
    (12, 3, 8, [16, 64], [1, 4]),  # T shorter than every segment (clipped; 12 % 4 == 0)
    (30, 5, 8, [8, 16], [2, 4]),  # no dilation 1: uncovered rows
    (50, 4, 8, [24], [3]),  # tail of 2 rows with dilation 3, clipped tail per head
    (1, 2, 8, [4, 8], [1, 2]),  # a single token
    (64, 8, 64, *seed_layout(64)),  # the seed's layout at small T
    (96, 8, 64, *seed_layout(96)),
    (23, 6, 8, [5, 10], [5, 2]),  # clipped tail where w % r != 0 after clipping
    (40, 13, 8, [16, 32], [1, 4]),  # r = 4 over 13 heads: 4 offsets and 4 runs, so gathered
]
IDS = [f"T{c[0]}-H{c[1]}-w{c[3]}-r{c[4]}" for c in CASES]


def make_qkv(B, T, H, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, T, H, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for _ in range(3)]


def run(op, q, k, v, causal, grad_out):
    out = op(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, grads


def reference(q, k, v, ws, rs, causal, head_split, dtype=torch.float64):
    qq, kk, vv = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = reference_attention(qq, kk, vv, ws, rs, causal, head_split, dtype=dtype)
    return out, (qq, kk, vv)


@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("head_split", [False, True], ids=["all_heads", "head_split"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_reference_fp32(op_cls, head_split, causal, case):
    T, H, D, ws, rs = case
    if head_split and H < len(ws):
        pytest.skip("head_split needs H >= branches (its error is tested separately)")
    q, k, v = make_qkv(2, T, H, D)
    grad_out = torch.randn(2, T, H, D, dtype=torch.float64).float()
    out, grads = run(op_cls(ws, rs, head_split=head_split), q, k, v, causal, grad_out)
    ref, leaves = reference(q, k, v, ws, rs, causal, head_split)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    torch.testing.assert_close(out, ref.float())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg.float())


LAYOUTS = [  # (T, H, segment_lengths, dilation_rates, head_split)
    (65536, 12, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], False),  # LongNet at 64K
    (8192, 8, [1024, 2048, 4096], [1, 2, 4], True),  # the seed preset
    *((c[0], c[1], c[3], c[4], hs) for c in CASES for hs in (False, True) if not hs or c[1] >= len(c[3])),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda x: f"T{x[0]}-H{x[1]}-r{x[3]}-split{int(x[4])}")
def test_pieces_select_the_kept_rows_once(layout):
    """Every piece's rows, read as a strided view or gathered, are the (position, head) pairs
    that the design keeps (position within its segment ≡ h mod r), and the pieces of a branch
    cover each kept pair exactly once."""
    T, H, ws, rs, head_split = layout
    pieces = plan(T, H, tuple(ws), tuple(rs), head_split)
    x = torch.arange(T * H, dtype=torch.float64).view(1, T, H, 1)  # value = position·H + head
    seen = torch.zeros(len(ws), T, H, dtype=torch.long)
    for p in pieces:
        ids = read_rows(x, p).flatten().long()
        pos, head = ids // H, ids % H
        w = min(ws[p.branch], T)
        assert ((pos % w) % p.r == head % p.r).all()
        assert set(head.tolist()) == set(p.heads)
        seen[p.branch].index_put_((pos, head), torch.ones_like(pos), accumulate=True)
    counts = pair_counts(T, H, ws, rs, False, head_split) if T <= 100 else None
    for i, (w, r) in enumerate(zip(ws, rs)):
        heads = {h for p in pieces if p.branch == i for h in p.heads}
        t = torch.arange(T)[:, None]
        kept = ((t % min(w, T)) % r == torch.arange(H)[None] % r) & torch.isin(torch.arange(H), torch.tensor(sorted(heads)))
        assert torch.equal(seen[i], kept.long())
    if counts is not None:  # a pair is attended iff its row was kept in some branch
        assert torch.equal(seen.sum(0).T > 0, counts.diagonal(dim1=1, dim2=2) > 0)


def test_longnet_layouts_have_no_gathers():
    """12 heads with r = 2^i: each branch is at most MAX_STRIDED_PIECES strided views; r = 16
    (offsets 0..11 over heads 0..11) is a single view."""
    ws, rs = tuple(2048 * 2**i for i in range(10)), tuple(2**i for i in range(10))
    pieces = plan(1 << 20, 12, ws, rs, False)
    assert all(p.strided for p in pieces)
    per_branch = [sum(p.branch == i for p in pieces) for i in range(10)]
    assert per_branch == [1, 2, 3, 2] + [1] * 6 and max(per_branch) <= MAX_STRIDED_PIECES


@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
def test_uncovered_rows_are_zero_with_finite_gradients(op_cls):
    T, H, D, ws, rs = 30, 5, 8, [8, 16], [2, 4]
    counts = pair_counts(T, H, ws, rs, False, False)
    uncovered = (counts.sum(-1) == 0).T  # (T, H)
    assert uncovered.any(), "the layout must leave some rows uncovered for this test to mean anything"
    q, k, v = make_qkv(1, T, H, D)
    out, grads = run(op_cls(ws, rs), q, k, v, False, torch.ones(1, T, H, D))
    assert torch.equal(out[0][uncovered], torch.zeros_like(out[0][uncovered]))
    assert not torch.equal(out[0][~uncovered], torch.zeros_like(out[0][~uncovered]))
    for g in grads:
        assert torch.isfinite(g).all()
    assert torch.equal(grads[0][0][uncovered], torch.zeros_like(grads[0][0][uncovered]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("head_split", [False, True], ids=["merged", "disjoint"])
def test_low_precision_within_twice_reference_error(dtype, op_cls, causal, head_split):
    # head_split: no two branches share a (row, head), so Improved writes results in the input
    # dtype with no float32 merge; without it every row merges several branches in float32.
    T, H, D = 64, 8, 64
    ws, rs = seed_layout(T)
    q, k, v = make_qkv(2, T, H, D, dtype=dtype, seed=1)
    grad_out = torch.randn(2, T, H, D, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out, grads = run(op_cls(ws, rs, head_split=head_split), q, k, v, causal, grad_out.to(dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    exact, leaves64 = reference(q, k, v, ws, rs, causal, head_split)
    exact_grads = torch.autograd.grad(exact, leaves64, grad_out)
    low, leaves_low = reference(q, k, v, ws, rs, causal, head_split, dtype=dtype)
    low_grads = torch.autograd.grad(low, leaves_low, grad_out.to(dtype))

    def err(a, b):
        return (a.double() - b).abs().max().item()

    assert err(out, exact) <= 2 * err(low, exact) + 1e-6
    for g, lg, eg in zip(grads, low_grads, exact_grads):
        assert err(g, eg) <= 2 * err(lg, eg) + 1e-6


@pytest.mark.parametrize("head_split", [False, True])
def test_strided_inputs_and_expanded_gradient(head_split):
    """q/k/v split from one fused (B, T, 3, H, D) projection are read in place, and an expanded
    output gradient (from .sum()) is accepted: same results as contiguous inputs."""
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, T, 3, H, D, generator=g, requires_grad=True)
    op = ImprovedDilatedAttention(ws, rs, head_split=head_split)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = op(q, k, v, is_causal=True)
    out.sum().backward()
    leaves = [x.detach().contiguous().requires_grad_() for x in (q, k, v)]
    out_c = op(*leaves, is_causal=True)
    grads_c = torch.autograd.grad(out_c, leaves, torch.ones_like(out_c))
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)
    torch.testing.assert_close(qkv.grad, torch.stack(grads_c, 2), rtol=0, atol=0)
    ref, ref_leaves = reference(*leaves, ws, rs, True, head_split)
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    torch.testing.assert_close(qkv.grad, torch.stack(ref_grads, 2).float())


@pytest.mark.parametrize("head_split", [False, True], ids=["merged", "disjoint"])
def test_custom_op_registration(head_split):
    """torch.library.opcheck: schema, fake tensors (shapes, dtypes, strides) and autograd
    registration agree with the real op, on contiguous and on fused-projection inputs."""
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    qkv = torch.randn(2, T, 3, H, D, requires_grad=True)
    for q, k, v in (make_qkv(2, T, H, D), qkv.unbind(2)):
        results = torch.library.opcheck(dilated_attention, (q, k, v, ws, rs, head_split, True, 0.25))
        assert results and set(results.values()) == {"SUCCESS"}, results


def test_eager_calls_turn_autocast_off_inside_the_op(monkeypatch):
    """The eager entry point enters no_autocast only when autocast is on (host time): the op's
    body must still run with autocast off (its float32 merge stays float32), and give the same
    result as without autocast."""
    from longctx.attention import improved
    seen = []
    attend = improved.attend
    monkeypatch.setattr(improved, "attend", lambda *a: seen.append(torch.is_autocast_enabled("cpu")) or attend(*a))
    q, k, v = make_qkv(2, 37, 4, 16)
    attn = ImprovedDilatedAttention([8, 16, 32], [1, 2, 4])
    plain = attn(q, k, v, is_causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = attn(q, k, v, is_causal=True)
    assert seen == [False, False]
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=0, atol=0)


def test_eager_calls_skip_the_custom_op_with_the_same_results():
    """Eager module calls run `attend` through EagerDilatedAttention (the custom op's dispatch
    was 10-23% of the op's host time); torch.compile sees the custom
    op. Both give the same output and gradients: they share attend and attend_backward."""
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    q, k, v = make_qkv(2, T, H, D)
    g = torch.randn(2, T, H, D)
    out = ImprovedDilatedAttention(ws, rs)(q, k, v, is_causal=True)
    assert type(out.grad_fn).__name__ == "EagerDilatedAttentionBackward"
    grads = torch.autograd.grad(out, (q, k, v), g)
    out_op = dilated_attention(q, k, v, ws, rs, False, True, D ** -0.5)[0]
    assert "EagerDilatedAttention" not in type(out_op.grad_fn).__name__
    grads_op = torch.autograd.grad(out_op, (q, k, v), g)
    torch.testing.assert_close(out, out_op, rtol=0, atol=0)
    for a, b in zip(grads, grads_op):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_math_fallback_matches_fused_kernel(monkeypatch):
    """The public fallback (explicit matmuls) computes the same as the private fused op."""
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    q, k, v = make_qkv(2, T, H, D)
    g = torch.randn(2, T, H, D)
    op = ImprovedDilatedAttention(ws, rs)
    fused = run(op, q, k, v, True, g)
    monkeypatch.setattr(sdpa, "_backend", lambda q: "math")
    math_ = run(op, q, k, v, True, g)
    torch.testing.assert_close(fused[0], math_[0])
    for a, b in zip(fused[1], math_[1]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
def test_float64_inputs_match_reference_tightly(op_cls):
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    q, k, v = make_qkv(1, T, H, D, dtype=torch.float64)
    out = op_cls(ws, rs)(q, k, v, is_causal=True)
    ref = reference_attention(q, k, v, ws, rs, True)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("head_split", [False, True])
@pytest.mark.parametrize("T", [64, 37, 12])
def test_flops_count_kept_pairs(head_split, T):
    H, D, ws, rs = 4, 16, [8, 16, 32], [1, 2, 4]
    op = ImprovedDilatedAttention(ws, rs, head_split=head_split)
    pairs = int(pair_counts(T, H, ws, rs, False, head_split).sum())
    assert op.flops(3, T, H, D) == 4 * 3 * D * pairs
    assert op.flops(3, T, H, D, is_causal=True) == op.flops(3, T, H, D) // 2


def test_flops_formula_when_segments_divide():
    op = DilatedAttention([2048, 4096], [1, 2])
    T, H, D = 8192, 12, 64
    expected = 4 * H * D * sum((T // w) * (w // r) ** 2 for w, r in zip([2048, 4096], [1, 2]))
    assert op.flops(1, T, H, D) == expected


def test_dropout_reference_only_in_training():
    q, k, v = make_qkv(1, 16, 2, 8)
    op = DilatedAttention([8], [1], dropout=0.5)
    op.eval()
    torch.testing.assert_close(op(q, k, v), reference_attention(q, k, v, [8], [1]).float())
    op.train()
    torch.manual_seed(0)
    assert not torch.allclose(op(q, k, v), op.eval()(q, k, v))
    for cls in (ImprovedDilatedAttention, RingDilatedAttention):
        with pytest.raises(NotImplementedError, match=f"{cls.__name__} does not support attention dropout"):
            cls([8], [1], dropout=0.1)


def test_registry():
    assert isinstance(build_attention("improved_dilated", segment_lengths=[4], dilation_rates=[1]), ImprovedDilatedAttention)
    with pytest.raises(ValueError, match=r"unknown attention name 'nope'.*'dilated'"):
        build_attention("nope", segment_lengths=[4], dilation_rates=[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(segment_lengths=[], dilation_rates=[]), "must be non-empty"),
        (dict(segment_lengths=[8, 16], dilation_rates=[1]), "has 2 entries .* but dilation_rates has 1"),
        (dict(segment_lengths=[0], dilation_rates=[1]), "segment length 0 must be an integer >= 1"),
        (dict(segment_lengths=[8], dilation_rates=[-2]), "dilation rate -2 must be an integer >= 1"),
        (dict(segment_lengths=[8.5], dilation_rates=[1]), "segment length 8.5 must be an integer"),
        (dict(segment_lengths=[3000], dilation_rates=[7]), "segment length 3000 is not divisible by dilation rate 7"),
        (dict(segment_lengths=[8], dilation_rates=[1], dropout=1.0), r"dropout=1.0 must be in \[0, 1\)"),
        (dict(segment_lengths=[8], dilation_rates=[1], dropout=-0.1), r"dropout=-0.1 must be in \[0, 1\)"),
        (dict(segment_lengths=[8], dilation_rates=[1], softmax_scale=0.0), "softmax_scale=0.0 must be None or a positive"),
        (dict(segment_lengths=8, dilation_rates=[1]), "must be lists of integers"),
    ],
)
@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
def test_constructor_errors(op_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        op_cls(**kwargs)


@pytest.mark.parametrize("op_cls", OPS, ids=lambda c: c.__name__)
def test_input_errors(op_cls):
    op = op_cls([8], [1])
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"query has shape \(8, 2, 4\): expected 4 dims"):
        op(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="must have the same shape"):
        op(x, x[:, :4], x[:, :4])
    with pytest.raises(ValueError, match="dtypes torch.float32/torch.float16/torch.float32 must match"):
        op(x, x.half(), x)
    with pytest.raises(ValueError, match="dtype torch.int64 is not supported"):
        op(x.long(), x.long(), x.long())
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        op(x, None, x)
    with pytest.raises(ValueError, match="head_split=True needs num_heads >= number of branches: got 2 heads for 3"):
        op_cls([8, 8, 8], [1, 1, 1], head_split=True)(x, x, x)
