"""ImprovedDilatedAttention: the same function as DilatedAttention, fast.

Shapes: B batch, T sequence length, H heads, D head dim; N = B·segments, g heads of a piece,
m kept rows per segment. Flat token-major buffers are (B, T·H, D) views of (B, T, H, D), so a
(position, head) pair is one row index p·H + h and a whole piece is one index_select.

Per piece (branches.py: at most three per branch, one for full segments): one gather of q/k/v
(none for dilation 1 over all heads: a plain view), one attention call that returns the LSE
(kernels.py), one float32 online merge into the running output and LSE (LongNet Eq. 10). No
Python loop over segments or heads. The custom autograd.Function saves only q, k, v, the merged
output and its LSE; backward recomputes each piece with the kernel's backward against the merged
output/LSE, which is the exact gradient (DESIGN §3).
"""
from __future__ import annotations

import torch

from .base import DilatedAttentionBase
from .branches import Piece, plan
from .kernels import attn_bwd, attn_fwd


def take(flat: torch.Tensor, piece: Piece, index: torch.Tensor | None) -> torch.Tensor:
    """Rows of a piece from a flat (B, T·H, *rest) buffer, as (B·S, m, g, *rest)."""
    B = flat.shape[0]
    n = piece.numel_rows
    rows = flat[:, :n] if index is None else flat.index_select(1, index)
    return rows.reshape(B * piece.num_segments, piece.rows, len(piece.heads), *flat.shape[2:])


def put(flat: torch.Tensor, index: torch.Tensor | None, rows: torch.Tensor, add: bool = False) -> None:
    """Write (or add) (B, n, *rest) rows back into a flat (B, T·H, *rest) buffer."""
    if index is None:
        dst = flat[:, : rows.shape[1]]
        dst.add_(rows) if add else dst.copy_(rows)
    elif add:
        flat.index_add_(1, index, rows)
    else:
        flat.index_copy_(1, index, rows)


def to_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, g, m, ...) kernel layout -> (B, S·m·g, ...) flat rows."""
    x = x.transpose(1, 2)
    return x.reshape(batch, -1, *x.shape[3:])


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulation precision: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_into(out32: torch.Tensor, lse32: torch.Tensor, index, o: torch.Tensor, lse: torch.Tensor, fresh: bool) -> None:
    """Online LSE merge (LongNet Eq. 10) of one piece into the running float32 output/LSE.
    out32: (B, T·H, D); lse32: (B, T·H); o: (B, n, D); lse: (B, n). `fresh`: no earlier piece
    touched these rows, so the merge is a plain write."""
    o, lse = o.to(out32.dtype), lse.to(out32.dtype)
    if fresh:
        put(out32, index, o)
        put(lse32, index, lse)
        return
    n = o.shape[1]
    old_o = out32[:, :n] if index is None else out32.index_select(1, index)
    old_lse = lse32[:, :n] if index is None else lse32.index_select(1, index)
    new_lse = torch.logaddexp(old_lse, lse)  # lse is finite on every kept row
    new_o = old_o * torch.exp(old_lse - new_lse)[..., None] + o * torch.exp(lse - new_lse)[..., None]
    put(out32, index, new_o)
    put(lse32, index, new_lse)


def fresh_flags(pieces: list[Piece]) -> list[bool]:
    """True for a piece whose heads no earlier piece touched (its rows are still empty)."""
    seen: set[int] = set()
    flags = []
    for p in pieces:
        flags.append(seen.isdisjoint(p.heads))
        seen.update(p.heads)
    return flags


def dilated_forward(q, k, v, pieces, is_causal, scale):
    """Forward over all pieces. q/k/v: (B, T, H, D). Returns out (B, T, H, D) in q's dtype and
    lse (B, T·H) float32 (−inf on rows no branch keeps)."""
    B, T, H, D = q.shape
    flat = [x.reshape(B, T * H, D) for x in (q, k, v)]
    out32 = q.new_zeros(B, T * H, D, dtype=acc_dtype(q.dtype))
    lse32 = q.new_full((B, T * H), float("-inf"), dtype=acc_dtype(q.dtype))
    for piece, fresh in zip(pieces, fresh_flags(pieces)):
        index = piece.flat_index(H, q.device)
        qg, kg, vg = (take(x, piece, index).transpose(1, 2) for x in flat)  # (N, g, m, D)
        o, lse = attn_fwd(qg, kg, vg, is_causal, scale)
        merge_into(out32, lse32, index, to_rows(o, B), to_rows(lse, B), fresh)
    return out32.to(q.dtype).view(B, T, H, D), lse32


def dilated_backward(dout, q, k, v, out, lse32, pieces, is_causal, scale):
    """Exact gradients given the merged out (B, T, H, D) and lse32 (B, T·H)."""
    B, T, H, D = q.shape
    flat = [x.reshape(B, T * H, D) for x in (dout, q, k, v, out)]
    grads = [torch.zeros(B, T * H, D, dtype=acc_dtype(q.dtype), device=q.device) for _ in range(3)]
    for piece in pieces:
        index = piece.flat_index(H, q.device)
        dog, qg, kg, vg, og = (take(x, piece, index).transpose(1, 2) for x in flat)
        lg = take(lse32, piece, index).transpose(1, 2)
        for acc, g in zip(grads, attn_bwd(dog, qg, kg, vg, og, lg, is_causal, scale)):
            put(acc, index, to_rows(g, B).to(acc.dtype), add=True)
    return [g.to(q.dtype).view(B, T, H, D) for g in grads]


class _DilatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pieces, is_causal, scale):
        out, lse32 = dilated_forward(q, k, v, pieces, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse32)
        ctx.pieces, ctx.is_causal, ctx.scale = pieces, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse32 = ctx.saved_tensors
        dq, dk, dv = dilated_backward(dout, q, k, v, out, lse32, ctx.pieces, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None, None


class ImprovedDilatedAttention(DilatedAttentionBase):
    """Fast dilated attention (same function as DilatedAttention). See DilatedAttentionBase.

    forward(query, key, value, is_causal=False): (B, T, H, D) each -> (B, T, H, D).
    Attention-probability dropout is not supported (the fused kernels' dropout RNG state would
    have to be replayed per piece in backward): dropout > 0 raises NotImplementedError.
    """

    def __init__(self, segment_lengths, dilation_rates, *, softmax_scale=None, dropout=0.0, head_split=False):
        super().__init__(
            segment_lengths, dilation_rates, softmax_scale=softmax_scale, dropout=dropout, head_split=head_split
        )
        if self.dropout > 0:
            raise NotImplementedError(
                f"{type(self).__name__} does not support attention dropout (dropout={dropout}); "
                "use DilatedAttention, or dropout on the residual path"
            )

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        scale = self._check(query, key, value)
        B, T, H, D = query.shape
        pieces = plan(T, H, self.segment_lengths, self.dilation_rates, self.head_split)
        with self.no_autocast(query):
            return _DilatedFunction.apply(query, key, value, pieces, bool(is_causal), scale)
