"""The one-pass combine kernels (longctx/kernels/combine.py) against references built here
from docs/design.md#the-math (row j of head h in segment s sits at start + s·w + (h mod r) + j·r) and LongNet
Eq. 10. Without a GPU they run in Triton's interpreter (tests/conftest.py)."""
import pytest
import torch

from longctx.attention import ImprovedDilatedAttention, pieces
from longctx.attention.layout import plan
from longctx.kernels import SUPPORTED, combine
from reference import reference_attention

pytestmark = pytest.mark.skipif(not SUPPORTED, reason="needs Triton >= 3.6 (installed by the test extra)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (B, T, H, D, segment_lengths, dilation_rates, head_split)
LAYOUTS = [
    (2, 128, 12, 16, (16, 32, 64, 128), (1, 2, 4, 8), False),  # LongNet's geometry, 12 heads
    (1, 77, 6, 24, (16, 32, 100), (1, 2, 8), False),  # tails, a clipped segment, D not a power of 2
    (2, 30, 5, 8, (8, 16), (2, 4), False),  # no dilation 1: rows no piece keeps
    (1, 40, 6, 8, (8, 16, 32), (1, 2, 4), True),  # head_split: disjoint pieces
]
IDS = [f"B{c[0]}-T{c[1]}-H{c[2]}-D{c[3]}-r{c[5]}-split{int(c[6])}" for c in LAYOUTS]


def strided_pieces(T, H, ws, rs, head_split):
    pieces = plan(T, H, ws, rs, head_split)
    assert all(p.strided for p in pieces)
    return pieces


def piece_rows(B, p, D, gen, dtype):
    """A random (N, g, m, D) piece tensor laid out like cuDNN's output, (N, m, g, D) in memory."""
    x = torch.randn(B * p.num_segments, p.rows, len(p.heads), D, generator=gen, dtype=torch.float64)
    return x.to(dtype).transpose(1, 2).to(DEVICE)


def positions(p):
    """(S, g, m) positions of the piece's rows and (g,) heads, from the design's rule."""
    s = torch.arange(p.num_segments)[:, None, None]
    heads = torch.tensor(p.heads)
    j = torch.arange(p.rows)[None, None, :]
    return p.start + s * p.seg_len + (heads % p.r)[None, :, None] + j * p.r, heads


def scatter(B, T, H, p, rows, fill):
    """Piece rows (N, g, m, *rest) placed at their (b, t, h) in a (B, T, H, *rest) float64 tensor."""
    out = torch.full((B, T, H, *rows.shape[3:]), fill, dtype=torch.float64)
    pos, heads = positions(p)
    out[:, pos, heads[None, :, None].expand_as(pos)] = rows.double().cpu().unflatten(0, (B, -1))
    return out


def eq10_reference(B, T, H, pieces, outs, lses):
    """LongNet Eq. 10 in float64 over the pieces' rows placed by the design's rule: (out, lse, kept)."""
    every_lse = torch.stack([scatter(B, T, H, p, l, float("-inf")) for p, l in zip(pieces, lses)])
    every_out = torch.stack([scatter(B, T, H, p, o, 0.0) for p, o in zip(pieces, outs)])
    ref_lse = torch.logsumexp(every_lse, 0)
    kept = torch.isfinite(ref_lse)
    weights = torch.where(kept, torch.exp(every_lse - ref_lse), 0.0)
    return (weights[..., None] * every_out).sum(0), ref_lse, kept


def check_merge(out, lse, ref, ref_lse, kept):
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32 and out.is_contiguous()
    assert torch.equal(torch.isfinite(lse).cpu(), kept)
    torch.testing.assert_close(lse.cpu().double()[kept], ref_lse[kept], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.cpu().double(), ref.to(torch.bfloat16).double(), rtol=0, atol=2 ** -7 * ref.abs().max().item())
    assert torch.equal(out.cpu()[~kept], torch.zeros_like(out.cpu()[~kept]))


def random_pieces(B, T, H, D, pieces, seed):
    """Each piece's bf16 output, float32 LSE and float32 gradient rows, random."""
    gen = torch.Generator().manual_seed(seed)
    outs = [piece_rows(B, p, D, gen, torch.bfloat16) for p in pieces]
    lses = [(3 * torch.randn(B * p.num_segments, len(p.heads), p.rows, generator=gen)).to(DEVICE) for p in pieces]
    return outs, lses, [piece_rows(B, p, D, gen, torch.float32) for p in pieces]


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_merge_is_eq10_over_covering_pieces(layout):
    B, T, H, D, ws, rs, head_split = layout
    pieces = strided_pieces(T, H, ws, rs, head_split)
    outs, lses, _ = random_pieces(B, T, H, D, pieces, 0)
    like = torch.empty(B, T, H, D, dtype=torch.bfloat16, device=DEVICE)
    out, lse = combine.merge_pieces(like, pieces, outs, lses)
    ref, ref_lse, kept = eq10_reference(B, T, H, pieces, outs, lses)
    assert (head_split or not kept.all()) == (kept.sum(-1) < H).any()  # the layouts test what they claim
    check_merge(out, lse, ref, ref_lse, kept)


@pytest.mark.parametrize("layout", LAYOUTS, ids=IDS)
def test_sum_adds_every_piece_once(layout):
    B, T, H, D, ws, rs, head_split = layout
    pieces = strided_pieces(T, H, ws, rs, head_split)
    _, _, parts = random_pieces(B, T, H, D, pieces, 1)
    like = torch.empty(B, T, H, D, device=DEVICE)
    total = combine.sum_pieces(like, pieces, parts)
    ref = sum(scatter(B, T, H, p, g, 0.0) for p, g in zip(pieces, parts))
    torch.testing.assert_close(total.cpu().double(), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T", [40, pytest.param(2**20 + 2**16, marks=pytest.mark.skipif(DEVICE == "cpu", reason="GPU only: "
                                                 "too many programs for the interpreter; T = 40 runs the same path"))])
def test_many_position_blocks_per_head(monkeypatch, T):
    """16 positions a program: several programs per (batch, head), numbered head, then position
    block, then batch (combine.launch_grid). At 1M + 64K positions that is more blocks than CUDA
    allows in a grid's second dimension, where a 1.3M-token training step failed
    on an H100."""
    B, H, D, ws, rs = 2, 3, 8, (8, 16), (1, 2)
    monkeypatch.setattr(combine, "INTERPRETED", False)  # on CPU still interpreted, now with small tiles
    monkeypatch.setattr(combine, "MERGE_TILE", 16 * D)
    monkeypatch.setattr(combine, "SUM_TILE", 16 * D)
    pieces = strided_pieces(T, H, ws, rs, False)
    outs, lses, parts = random_pieces(B, T, H, D, pieces, 4)
    like = torch.empty(B, T, H, D, dtype=torch.bfloat16, device=DEVICE)
    check_merge(*combine.merge_pieces(like, pieces, outs, lses), *eq10_reference(B, T, H, pieces, outs, lses))
    total = combine.sum_pieces(like.float(), pieces, parts)
    torch.testing.assert_close(total.cpu().double(), sum(scatter(B, T, H, p, g, 0.0) for p, g in zip(pieces, parts)),
                               rtol=1e-6, atol=1e-6)


CASES = [  # (T, H, D, segment_lengths, dilation_rates): every piece strided
    (37, 4, 16, [8, 16, 32], [1, 2, 4]),
    (30, 5, 8, [8, 16], [2, 4]),
    (64, 12, 16, [16, 32, 64], [1, 2, 4]),
]


@pytest.fixture
def through_combine(monkeypatch):
    """Make the op combine its pieces here (on CPU: in the interpreter), counting the calls."""
    calls = []
    for name in ("merge_pieces", "sum_pieces"):
        real = getattr(combine, name)
        monkeypatch.setattr(combine, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    monkeypatch.setattr(combine, "available", lambda device: True)
    return calls


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-H{c[1]}-r{c[4]}")
def test_op_through_combine_matches_reference(through_combine, case, causal):
    T, H, D, ws, rs = case
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, T, H, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    grad_out = torch.randn(2, T, H, D, generator=gen).to(DEVICE)
    out = ImprovedDilatedAttention(ws, rs)(q, k, v, is_causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert through_combine == ["merge_pieces"] + ["sum_pieces"] * 3

    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, ws, rs, causal)
    ref_grads = torch.autograd.grad(ref, leaves, grad_out.double())
    torch.testing.assert_close(out, ref.float())
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg.float())


def test_disjoint_and_float64_pieces_do_not_combine(through_combine):
    """head_split writes each piece's rows directly, float64 keeps float64 accumulators."""
    T, H, D, ws, rs = 37, 4, 16, [8, 16, 32], [1, 2, 4]
    for dtype, head_split in ((torch.float32, True), (torch.float64, False)):
        q, k, v = (torch.randn(1, T, H, D, dtype=dtype, device=DEVICE, requires_grad=True) for _ in range(3))
        ImprovedDilatedAttention(ws, rs, head_split=head_split)(q, k, v).sum().backward()
    assert through_combine == []
    q = torch.randn(1, T, H, D, device=DEVICE)
    assert pieces.use_combine(q, *pieces.pieces_of(T, H, tuple(ws), tuple(rs), False))


def test_ring_at_one_rank_is_exactly_improved_through_combine(through_combine):
    from longctx.attention import RingDilatedAttention

    T, H, D, ws, rs = 40, 4, 8, [8, 16, 64], [1, 2, 4]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, T, H, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    a = ImprovedDilatedAttention(ws, rs)(q, k, v, is_causal=True)
    b = RingDilatedAttention(ws, rs)(q, k, v, is_causal=True)
    assert torch.equal(a, b)
    da, db = (torch.autograd.grad(o, (q, k, v), torch.ones_like(o)) for o in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(da, db))
    assert through_combine == ["merge_pieces"] * 2 + ["sum_pieces"] * 6
