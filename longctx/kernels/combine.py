"""One-pass combine of every piece's output (or gradient) into the (B, T, H, D) result: Triton.

Shapes: B batch, T sequence length, H heads, D head dim; a piece (attention/layout.py) has S segments,
g heads and m kept rows per segment, and its kernel output is (N = B·S, g, m, D), any strides
with a unit last one; its LSE is (N, g, m).

Why: merging piece by piece into float32 buffers (attention/pieces.py's merge_piece / write_grad) moves
~29 bytes per output element forward and ~65 backward in the LongNet layout, in many passes
(16 of 92 ms of a 32K training step on an H100). Keeping every piece's result
and pulling them together once, in float32 registers, moves ~6 bytes per element forward (read
each covering piece once, write the result) and ~18 backward, and rounds once, as before.

Each program owns one (batch, head) and BLOCK_T positions. For each piece (unrolled: the layout
is a compile-time constant) it works out which of its positions the piece keeps, at which row,
and reads those rows; positions no piece keeps get 0 and LSE −inf, as in the reference.

- forward (`merge_pieces`): LongNet Eq. 10, lse = log Σ_p exp(lse_p), out = Σ_p exp(lse_p − lse)·o_p;
- backward (`sum_pieces`): the gradient of a (position, head) is the sum of its pieces' gradients,
  each already the exact gradient against the merged softmax (attention/sdpa.py).

Runs on CUDA, and on CPU tensors through Triton's interpreter (tests only: it is slow).
"""
from __future__ import annotations

import os

import torch

from . import INTERPRETED, compiled_triton, tl, triton

# LONGCTX_COMBINE=0 keeps the op's piece-by-piece float32 merge on the GPU too (for A/B runs).
ENABLED = os.environ.get("LONGCTX_COMBINE", "1") != "0"


def available(device: torch.device) -> bool:
    """Whether the op should combine with compiled kernels on this device (compiled_triton, and not
    turned off). merge_pieces / sum_pieces also take CPU tensors when INTERPRETED."""
    return ENABLED and compiled_triton(device)


def piece_geometry(p) -> tuple[int, ...]:
    """The compile-time description of a strided piece: its row j of head h0 + i·hs sits at
    start + s·w + off0 + i·offstep + j·r, for s < S, i < g, j < m."""
    assert p.strided, "combine reads pieces through their geometry: gathered pieces have none"
    return (p.heads[0], p.head_step, len(p.heads), p.offset, p.offset_step, p.start, p.seg_len, p.r,
            p.num_segments, p.rows)


if triton is not None:

    @triton.jit
    def _locate(b, h, t, GEOM: tl.constexpr):
        """Where positions t (vector) of head h (scalar) of batch b sit in a piece (GEOM:
        piece_geometry): (hit, n, i, j), the piece keeping them as row j of head i of batch-segment n."""
        h0: tl.constexpr = GEOM[0]
        hs: tl.constexpr = GEOM[1]
        g: tl.constexpr = GEOM[2]
        off0: tl.constexpr = GEOM[3]
        offstep: tl.constexpr = GEOM[4]
        start: tl.constexpr = GEOM[5]
        w: tl.constexpr = GEOM[6]
        r: tl.constexpr = GEOM[7]
        S: tl.constexpr = GEOM[8]
        m: tl.constexpr = GEOM[9]
        i = (h - h0) // hs
        head_hit = (h >= h0) & ((h - h0) % hs == 0) & (i < g)
        u = t - (start + off0) - i * offstep
        s = u // w
        rem = u - s * w
        j = rem // r
        hit = tl.where(head_hit, (u >= 0) & (s < S) & (rem % r == 0) & (j < m), False)  # (Triton 3.9's
        # interpreter rejects a mask made by `&` of a scalar and a vector)
        return hit, (b * S + s).to(tl.int64), i, j.to(tl.int64)

    @triton.jit
    def _offset(hit, n, i, j, STRIDES: tl.constexpr):
        """Element offset of (n, i, j) in a tensor with strides STRIDES = (sN, sg, sm): compile-time
        constants, so Triton sees the rows' alignment and loads them as 16-byte vectors."""
        return tl.where(hit, n * STRIDES[0] + i.to(tl.int64) * STRIDES[1] + j * STRIDES[2], 0)

    @triton.jit
    def _tile(T, H: tl.constexpr, BLOCK_T: tl.constexpr, COLS: tl.constexpr):
        """This program's batch b, head h, positions t (t < T: live), head-dim columns d (the
        first COLS), and the offsets pos of (b, t, h) in a (B, T, H) tensor. Programs are
        numbered head fastest, then position block, then batch (launch_grid)."""
        h = tl.program_id(0) % H
        blocks = tl.cdiv(T, BLOCK_T)
        b = tl.program_id(0) // H // blocks
        t = (tl.program_id(0) // H % blocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        return b, h, t, t < T, tl.arange(0, COLS), (b * T + t).to(tl.int64) * H + h

    @triton.jit
    def _load_rows(ptr, offset, hit, d, D: tl.constexpr):
        """(BLOCK_T, len(d)) float32 columns d of a piece tensor's rows at element offsets `offset`, 0
        where not hit."""
        return tl.load(ptr + offset[:, None] + d[None, :], mask=hit[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _store_rows(ptr, pos, live, d, D: tl.constexpr, rows):
        """Columns d of rows (BLOCK_T, len(d)) into a contiguous (B, T, H, D) tensor at row offsets pos."""
        tl.store(ptr + pos[:, None] * D + d[None, :], rows.to(ptr.dtype.element_ty), mask=live[:, None] & (d < D)[None, :])

    @triton.jit
    def _merge_kernel(out_ptr, lse_ptr, outs, lses, T, H: tl.constexpr, D: tl.constexpr, GEOMS: tl.constexpr,
                      O_STRIDES: tl.constexpr, L_STRIDES: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # Each row as two halves, d and d + half: 4 threads share a row's index math, LSE load and
        # weights instead of 8, a quarter fewer instructions (it did not pay in the sum kernel,
        # whose per-row work is smaller).
        half: tl.constexpr = BLOCK_D // 2
        b, h, t, live, d, pos = _tile(T, H, BLOCK_T, half)
        # Online LongNet Eq. 10: running max LSE, Σ exp(lse_p − top) and Σ exp(lse_p − top)·o_p.
        top = tl.full([BLOCK_T], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_T], tl.float32)
        acc0 = tl.zeros([BLOCK_T, half], tl.float32)
        acc1 = tl.zeros([BLOCK_T, half], tl.float32)
        for p in tl.static_range(len(GEOMS)):
            hit, n, i, j = _locate(b, h, t, tl.constexpr(GEOMS[p]))
            hit = hit & live
            lse_p = tl.load(lses[p] + _offset(hit, n, i, j, tl.constexpr(L_STRIDES[p])), mask=hit, other=float("-inf"))
            row = _offset(hit, n, i, j, tl.constexpr(O_STRIDES[p]))
            new_top = tl.maximum(top, lse_p)
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)  # no piece yet: keep zeros
            rescale = tl.exp(top - shift)
            weight = tl.exp(lse_p - shift)
            acc0 = acc0 * rescale[:, None] + _load_rows(outs[p], row, hit, d, D) * weight[:, None]
            acc1 = acc1 * rescale[:, None] + _load_rows(outs[p], row, hit, d + half, D) * weight[:, None]
            total = total * rescale + weight
            top = new_top
        kept = total > 0  # total >= 1 where any piece keeps the position
        safe = tl.where(kept, total, 1.0)
        tl.store(lse_ptr + pos, tl.where(kept, top + tl.log(safe), float("-inf")), mask=live)
        _store_rows(out_ptr, pos, live, d, D, acc0 / safe[:, None])
        _store_rows(out_ptr, pos, live, d + half, D, acc1 / safe[:, None])

    @triton.jit
    def _sum_kernel(out_ptr, parts, T, H: tl.constexpr, D: tl.constexpr, GEOMS: tl.constexpr, STRIDES: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        b, h, t, live, d, pos = _tile(T, H, BLOCK_T, BLOCK_D)
        acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        for p in tl.static_range(len(GEOMS)):
            hit, n, i, j = _locate(b, h, t, tl.constexpr(GEOMS[p]))
            hit = hit & live
            acc += _load_rows(parts[p], _offset(hit, n, i, j, tl.constexpr(STRIDES[p])), hit, d, D)
        _store_rows(out_ptr, pos, live, d, D, acc)


# Elements (positions × head dim) per program, at 4 warps. Both kernels are bound by instruction
# issue more than by bytes (per-row index math, repeated by the threads sharing a row, and the
# bf16 → float32 unpacking). On an H100 at 32K (a copy of the merge's bytes takes 56 us): the merge, rows in halves, 104 us
# at 4096 (129 at 2048 with whole rows, 156 at 4096); the sum 60 us at 1024 (75 at 4096).
MERGE_TILE, SUM_TILE = 4096, 1024


def launch_grid(B: int, T: int, H: int, block_t: int) -> tuple[int]:
    """One program per (batch, head, block of block_t positions), in one grid dimension: CUDA
    allows 2^31 − 1 blocks there but only 65535 in the others, which ⌈T / 16⌉ passes at 1M tokens."""
    return (B * H * triton.cdiv(T, block_t),)


def _launch(kernel, x: torch.Tensor, *args, tile: int, warps: int = 4, **meta):
    """kernel over x (B, T, H, D): one program per (batch, head) and `tile` elements' positions,
    with `warps` warps; the interpreter runs one program per (batch, head)."""
    B, T, H, D = x.shape
    block_d = triton.next_power_of_2(D)
    block_t = triton.next_power_of_2(T) if INTERPRETED else max(16, tile // block_d)
    kernel[launch_grid(B, T, H, block_t)](x, *args, T, H=H, D=D, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
                                          **meta)


def _strides(tensors, dims: int) -> tuple:
    """Each piece tensor's (sN, sg, sm)."""
    for x in tensors:
        assert x.dim() == dims and (dims == 3 or x.stride(-1) == 1), "piece rows must be contiguous along D"
    return tuple(x.stride()[:3] for x in tensors)


def merge_pieces(like: torch.Tensor, pieces: tuple, outs: list, lses: list):
    """LongNet Eq. 10 over all pieces at once: (out (B, T, H, D) in like's dtype, lse (B, T, H)
    float32) from each piece's output outs[i] (N, g, m, D) and LSE lses[i] (N, g, m)."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    lse = like.new_empty(like.shape[:3], dtype=torch.float32)
    _launch(_merge_kernel, out, lse, tuple(outs), tuple(lses), tile=MERGE_TILE, GEOMS=tuple(map(piece_geometry, pieces)),
            O_STRIDES=_strides(outs, 4), L_STRIDES=_strides(lses, 3))
    return out, lse


def sum_pieces(like: torch.Tensor, pieces: tuple, parts: list) -> torch.Tensor:
    """The (B, T, H, D) sum, in like's dtype, of every piece's rows parts[i] (N, g, m, D)."""
    out = torch.empty_like(like, memory_format=torch.contiguous_format)
    _launch(_sum_kernel, out, tuple(parts), tile=SUM_TILE, GEOMS=tuple(map(piece_geometry, pieces)), STRIDES=_strides(parts, 4))
    return out
