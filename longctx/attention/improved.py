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


def forward_pieces(out32, lse32, qkv_flat, num_heads, pieces, fresh, is_causal, scale) -> None:
    """Attend every piece and merge it into out32 (B, T·H, D) / lse32 (B, T·H).
    qkv_flat: q, k, v as (B, T·H, D); fresh: fresh_flags over the same pieces."""
    B = out32.shape[0]
    for piece, is_fresh in zip(pieces, fresh):
        index = piece.flat_index(num_heads, out32.device)
        qg, kg, vg = (take(x, piece, index).transpose(1, 2) for x in qkv_flat)  # (N, g, m, D)
        o, lse = attn_fwd(qg, kg, vg, is_causal, scale)
        merge_into(out32, lse32, index, to_rows(o, B), to_rows(lse, B), is_fresh)


def backward_pieces(grads32, flat, lse32, num_heads, pieces, is_causal, scale) -> None:
    """Add every piece's exact dq/dk/dv into grads32 (3 × (B, T·H, D)).
    flat: dout, q, k, v, merged out as (B, T·H, D); lse32: merged (B, T·H)."""
    B = lse32.shape[0]
    for piece in pieces:
        index = piece.flat_index(num_heads, lse32.device)
        dog, qg, kg, vg, og = (take(x, piece, index).transpose(1, 2) for x in flat)
        lg = take(lse32, piece, index).transpose(1, 2)
        for acc, g in zip(grads32, attn_bwd(dog, qg, kg, vg, og, lg, is_causal, scale)):
            put(acc, index, to_rows(g, B).to(acc.dtype), add=True)


def flatten_heads(*xs: torch.Tensor) -> list[torch.Tensor]:
    """(B, T, H, D) -> (B, T·H, D) (a view when contiguous)."""
    return [x.reshape(x.shape[0], -1, x.shape[-1]) for x in xs]


def new_accumulators(q: torch.Tensor):
    """Running output (B, T·H, D) zeros and LSE (B, T·H) −inf in the merge precision."""
    B, T, H, D = q.shape
    dtype = acc_dtype(q.dtype)
    return q.new_zeros(B, T * H, D, dtype=dtype), q.new_full((B, T * H), float("-inf"), dtype=dtype)


def new_grad_accumulators(q: torch.Tensor) -> list[torch.Tensor]:
    """dq, dk, dv as zeros (B, T·H, D) in the accumulation precision."""
    B, T, H, D = q.shape
    return [q.new_zeros(B, T * H, D, dtype=acc_dtype(q.dtype)) for _ in range(3)]


class _DilatedFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pieces, is_causal, scale):
        out32, lse32 = new_accumulators(q)
        forward_pieces(out32, lse32, flatten_heads(q, k, v), q.shape[2], pieces, fresh_flags(pieces), is_causal, scale)
        out = out32.to(q.dtype).view(q.shape)
        ctx.save_for_backward(q, k, v, out, lse32)
        ctx.pieces, ctx.is_causal, ctx.scale = pieces, is_causal, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse32 = ctx.saved_tensors
        grads32 = new_grad_accumulators(q)
        flat = flatten_heads(dout, q, k, v, out)
        backward_pieces(grads32, flat, lse32, q.shape[2], ctx.pieces, ctx.is_causal, ctx.scale)
        dq, dk, dv = (g.to(q.dtype).view(q.shape) for g in grads32)
        return dq, dk, dv, None, None, None


class ImprovedDilatedAttention(DilatedAttentionBase):
    """Fast dilated attention (same function as DilatedAttention). See DilatedAttentionBase.

    forward(query, key, value, is_causal=False): (B, T, H, D) each -> (B, T, H, D).
    Attention-probability dropout is not supported (the fused kernels' dropout RNG state would
    have to be replayed per piece in backward): dropout > 0 raises NotImplementedError.
    """

    supports_dropout = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        scale = self._check(query, key, value)
        B, T, H, D = query.shape
        pieces = plan(T, H, self.segment_lengths, self.dilation_rates, self.head_split)
        with self.no_autocast(query):
            return _DilatedFunction.apply(query, key, value, pieces, bool(is_causal), scale)
