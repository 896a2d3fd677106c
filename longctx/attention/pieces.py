"""The per-piece engine of ImprovedDilatedAttention (and the ring's local pieces): read a piece's
rows, attend them with an LSE-returning kernel (sdpa.py), merge the results (LongNet Eq. 10) and
sum the gradients.

Shapes: B batch, T sequence length, H heads, D head dim; a piece has S segments, g heads and m
kept rows per segment; N = B·S. LSE tensors are (B, T, H), not the (B, H, T) of the kernels'
convention: laid out like the (B, T, H, D) output, a piece's LSE rows are a strided view with
batch and segment folded into one stride (N), as its output rows are; in (B, H, T) they fold
only when H = 1.

Few gathers. A strided piece (layout.py: heads h0, h0 + step, … of one branch whose offsets
step evenly too, over its full segments or its tail) keeps rows start + s·w + (h mod r) + j·r:
in a (B, T, H, D) tensor that is one strided view (B, S, g, m, D), `rows_view`. The attention
kernels read such views in place (no copy kernel, the same speed as contiguous input, for cuDNN
and flash on an H100), and results go back through the same views. A branch that would need
many strided pieces runs as gathered pieces instead: one index gather of its T·H/r rows and
one call. Then:
- pieces that share no (position, head) (head_split, or a single branch) write their output
  and LSE straight into the result in the input dtype, and their gradients likewise: a merge of
  one term is the term itself, so this is exactly the float32 merge, rounded once;
- otherwise, on a GPU with Triton and every piece strided, all pieces' outputs (and, in
  backward, gradients) are kept and combined in one pass (kernels/combine.py: LongNet Eq. 10
  in float32 registers, rounded once);
- else the pieces merge online in float32 (LongNet Eq. 10), and gradients add into float32
  accumulators, allocated only after the first piece's backward kernel and converted one at a
  time at the end.
Backward runs the kernel's backward per piece against the merged output and LSE, which is the
exact gradient (docs/design.md#exact-gradients).
"""
from __future__ import annotations

import functools

import torch

from ..kernels import combine
from .layout import Piece, plan
from .sdpa import attn_bwd, attn_fwd


def rows_view(x: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A strided piece's rows of x (B, T, H, *rest), as a view (B, S, g, m, *rest)."""
    sB, sT, sH = x.stride()[:3]
    size = (x.shape[0], piece.num_segments, len(piece.heads), piece.rows, *x.shape[3:])
    head = piece.head_step * sH + piece.offset_step * sT  # next head, and its rows' first position
    stride = (sB, piece.seg_len * sT, head, piece.r * sT, *x.stride()[3:])
    offset = x.storage_offset() + (piece.start + piece.offset) * sT + piece.heads[0] * sH
    return x.as_strided(size, stride, offset)


def read_rows(x: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The piece's rows of x (B, T, H, *rest) as (B, S, g, m, *rest): a view for a strided
    piece, else a gathered copy (write it back with commit_rows)."""
    if piece.strided:
        return rows_view(x, piece)
    pos, heads = piece.index(x.device)
    return x[:, pos, heads]


def commit_rows(x: torch.Tensor, piece: Piece, rows: torch.Tensor) -> None:
    """Store rows read with read_rows (and changed in place) back into x."""
    if not piece.strided:
        pos, heads = piece.index(x.device)
        x[:, pos, heads] = rows


def write_rows(x: torch.Tensor, piece: Piece, rows: torch.Tensor) -> None:
    """Write rows (B, S, g, m, *rest), cast to x's dtype, as the piece's rows of x."""
    if piece.strided:
        rows_view(x, piece).copy_(rows)
    else:
        commit_rows(x, piece, rows.to(x.dtype))


def kernel_rows(x: torch.Tensor, piece: Piece) -> torch.Tensor:
    """A kernel's (N, g, m, D) input: a view, or a copy (gathered, or B and S do not fold)."""
    return read_rows(x, piece).flatten(0, 1)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merge and gradient accumulation precision: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fresh_flags(pieces) -> list[bool]:
    """True for a piece whose heads no piece of another branch touched before it. Pieces of one
    branch never share a (position, head), so a fresh piece's rows are still untouched."""
    seen: dict[int, set[int]] = {}
    flags = []
    for p in pieces:
        flags.append(all(seen.get(h, {p.branch}) == {p.branch} for h in p.heads))
        for h in p.heads:
            seen.setdefault(h, set()).add(p.branch)
    return flags


def merge_into(acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, fresh: bool) -> None:
    """Online LSE merge (LongNet Eq. 10) of one result into a running output and LSE, in
    place. acc (…, D), lse_acc (…): views into the running buffers; o, lse: same shapes. `fresh`:
    nothing was merged into these rows yet, so the merge is a plain write."""
    if fresh:
        acc.copy_(o)
        lse_acc.copy_(lse)
        return
    new_lse = torch.logaddexp(lse_acc, lse)  # lse is finite on every kept row
    acc.mul_(torch.exp(lse_acc - new_lse).unsqueeze(-1))
    acc.addcmul_(o, torch.exp(lse - new_lse).unsqueeze(-1))
    lse_acc.copy_(new_lse)


def new_output(q: torch.Tensor, first: Piece, disjoint: bool):
    """Output (B, T, H, D) and LSE (B, T, H) buffers: zeros / −inf unless `first` covers them.
    The output is in q's dtype when the pieces are disjoint (no merge), else float32."""
    B, T, H, D = q.shape
    lse_dtype = acc_dtype(q.dtype)
    if first.covers(T, H):
        return q.new_empty(q.shape, dtype=q.dtype if disjoint else lse_dtype), q.new_empty((B, T, H), dtype=lse_dtype)
    out = q.new_zeros(q.shape, dtype=q.dtype if disjoint else lse_dtype)
    return out, q.new_full((B, T, H), float("-inf"), dtype=lse_dtype)


def merge_piece(out, lse, piece: Piece, o: torch.Tensor, lse_p: torch.Tensor, fresh: bool) -> None:
    """Merge one piece's o (B, S, g, m, D) and lse_p (B, S, g, m) into out (B, T, H, D) and
    lse (B, T, H)."""
    if fresh:  # nothing merged into these rows yet: write them
        write_rows(out, piece, o)
        write_rows(lse, piece, lse_p)
        return
    acc, lse_acc = read_rows(out, piece), read_rows(lse, piece)
    merge_into(acc, lse_acc, o, lse_p, False)
    commit_rows(out, piece, acc)
    commit_rows(lse, piece, lse_acc)


def attend_piece(q, k, v, piece: Piece, is_causal, scale):
    """One piece's kernel output (N, g, m, D) and LSE (N, g, m) from q/k/v (B, T, H, D)."""
    return attn_fwd(kernel_rows(q, piece), kernel_rows(k, piece), kernel_rows(v, piece), is_causal, scale)


def piece_grads(saved, lse, piece: Piece, is_causal, scale) -> list[torch.Tensor]:
    """One piece's [dq, dk, dv] (N, g, m, D); saved and lse as in backward_pieces."""
    return list(attn_bwd(*(kernel_rows(x, piece) for x in saved), kernel_rows(lse, piece), is_causal, scale))


def forward_pieces(out, lse, q, k, v, pieces, fresh, is_causal, scale) -> None:
    """Attend every piece of q/k/v (B, T, H, D) and merge it into out (B, T, H, D) and
    lse (B, T, H); fresh: fresh_flags over the same pieces."""
    B = q.shape[0]
    for piece, is_fresh in zip(pieces, fresh):
        o, lse_p = attend_piece(q, k, v, piece, is_causal, scale)
        merge_piece(out, lse, piece, o.unflatten(0, (B, -1)), lse_p.unflatten(0, (B, -1)), is_fresh)


def use_combine(q: torch.Tensor, pieces, fresh) -> bool:
    """Whether to combine all pieces at once (kernels/combine.py): on a GPU with Triton, when pieces
    share rows (disjoint ones write their rows directly) and all are strided views."""
    return (combine.available(q.device) and q.dtype != torch.float64 and not all(fresh)
            and all(p.strided for p in pieces))


def attend_pieces(q, k, v, pieces, is_causal, scale) -> tuple[list, list]:
    """Every piece's kernel output (N, g, m, D) and LSE (N, g, m), for combine.merge_pieces."""
    outs, lses = [], []
    for piece in pieces:
        o, lse = attend_piece(q, k, v, piece, is_causal, scale)
        outs.append(o)
        lses.append(lse)
    return outs, lses


def sum_grads(like: torch.Tensor, pieces, parts: list) -> list[torch.Tensor]:
    """(dq, dk, dv) (B, T, H, D) in like's dtype, each summed over all pieces at once
    (combine.sum_pieces) from parts[i], piece i's [dq, dk, dv]. A gradient's parts are freed
    once it is summed."""
    grads = []
    for i in range(3):
        grads.append(combine.sum_pieces(like, pieces, [part[i] for part in parts]))
        for part in parts:
            part[i] = None
    return grads


def write_grad(grads: list, i: int, piece: Piece, g: torch.Tensor, fresh: bool, like: torch.Tensor, dtype) -> None:
    """Write (fresh) or add one piece's gradient (N, g, m, D) into grads[i] (B, T, H, D),
    allocating it at the first write: after the piece's backward kernel has freed its workspace."""
    if grads[i] is None:
        B, T, H, _ = like.shape
        grads[i] = (like.new_empty if piece.covers(T, H) else like.new_zeros)(like.shape, dtype=dtype)
    g = g.unflatten(0, (like.shape[0], -1))
    if fresh:
        write_rows(grads[i], piece, g)
        return
    dst = read_rows(grads[i], piece)
    dst.add_(g)
    commit_rows(grads[i], piece, dst)


def backward_pieces(grads: list, saved, lse, pieces, fresh, is_causal, scale, dtype) -> None:
    """Write or add every piece's exact dq/dk/dv into grads (3 buffers or None, see write_grad).
    saved: dout, q, k, v, merged out as (B, T, H, D); lse: merged (B, T, H)."""
    q = saved[1]
    for piece, is_fresh in zip(pieces, fresh):
        gs = piece_grads(saved, lse, piece, is_causal, scale)
        for i in range(3):
            write_grad(grads, i, piece, gs[i], is_fresh, q, dtype)
            gs[i] = None  # free each piece gradient once written


def finish_grads(grads: list, like: torch.Tensor) -> list[torch.Tensor]:
    """The three gradients in like's dtype, each float32 buffer freed as soon as converted."""
    for i in range(3):
        grads[i] = like.new_zeros(like.shape) if grads[i] is None else grads[i].to(like.dtype)
    return grads


@functools.lru_cache(maxsize=256)
def pieces_of(T: int, H: int, segment_lengths: tuple, dilation_rates: tuple, head_split: bool):
    """The op's pieces (layout.plan) and their fresh_flags, worked out once per shape."""
    pieces = plan(T, H, segment_lengths, dilation_rates, head_split)
    return pieces, tuple(fresh_flags(pieces))
