"""Gluon code for Hopper (sm_90): the union kernels' local dQ and dK/dV passes with TMA loads and
asynchronous wgmma (hopper.py has why and the launch; union.py the math).

Shapes: B batch, T sequence length, H heads, D head dim. A head may keep only the positions
≡ h (mod R) of each segment (a dilated branch); T and W below count a head's kept rows (T / R
and W / R of the layout's). q, k, v and dO come in through TMA descriptors over a
(B·T_all / R, R·row stride) view, where a kept row is one [rows, D] box at column
((h mod R)·H + h)·D; STATS (2, B·H, T_all) float32 holds log2 LSE and Δ by position (the local
dQ pass writes it). Gradients go out through plain stores with (B, T, H) strides, so they may be
slots of one packed gradient.

dK/dV, one program a tile of BM keys and a head: per query tile i, Sᵀ = K Qᵢᵀ and dPᵀ = V dOᵢᵀ
are issued together, Pᵀ's exponentials run while dPᵀ is in flight, dV += Pᵀ dOᵢ runs while dSᵀ
is formed, and dK += dSᵀ Qᵢ while the next tile's Sᵀ and dPᵀ are issued. Qᵢ and dOᵢ come through
a ring of STAGES stages; a stage is reloaded once its tile's four wgmma retired. dQ, one program
a tile of BM queries: the same over key tiles (S and dP issued together, dQ += dS Kⱼ in flight
under the next tile's), after it wrote its queries' STATS from the forward's O and LSE.
tools/kernels/gluon_bwd_probe.py times both against cuDNN.
"""
import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor


def descriptors(tensors, R: int, rows: int):
    """TMA descriptors of (B, T, H, D) tensors, heads adjacent and batches T rows apart
    (hopper._flat), over their (B·T/R, R·row stride) view: row j holds positions j·R … j·R + R − 1,
    so a head's kept row is one [rows, D] box, at column ((h mod R)·H + h)·D where the row stride
    is H·D (R > 1 needs that; at R = 1 any row stride reads in place, a fused projection's slots too)."""
    B, T, H, D = tensors[0].shape
    layout = gl.NVMMASharedLayout.get_default_for([rows, D], gl.bfloat16 if tensors[0].dtype == torch.bfloat16
                                                  else gl.float16)
    return [TensorDescriptor(x, [B * T // R, R * x.stride(1)], [R * x.stride(1), 1], [rows, D], layout)
            for x in tensors]


@gluon.constexpr_function
def mma_layout(n, num_warps):
    """The wgmma accumulator layout of a (rows, n) tile: a warp per 16 rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def row_layout(width, num_warps):
    """A blocked layout for (rows, width) float32 rows stored to global memory, 4 elements a thread."""
    return gl.BlockedLayout([1, 4], [32 // (width // 4), width // 4], [num_warps, 1], [1, 0])


@gluon.jit
def _barriers(COUNT: gl.constexpr):
    """COUNT mbarriers in shared memory, each completing on one arrival (or one TMA's bytes)."""
    bars = gl.allocate_shared_memory(gl.int64, [COUNT, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(COUNT):
        mbarrier.init(bars.index(i), count=1)
    return bars


@gluon.jit
def _geometry(T, H, W, R, h0, nh, BM: gl.constexpr, D: gl.constexpr, Q_TILES: gl.constexpr):
    """This program's tile and head (one of h0 … h0 + nh − 1): (head, first row t0, its segment's
    first row lo, the head's offset, the batch's first row in the descriptors' view, the head's
    column, b·H + h). A segment's tiles one after another, so that L2 keeps the rows they share
    (tile-major, the programs in flight at 1M would stream ~260 segments' rows from memory), the
    most work first within it: dK/dV's first key tiles (Q_TILES false), dQ's last query tiles."""
    per_seg = W // BM
    j = gl.program_id(0) % per_seg
    lo = gl.program_id(0) // per_seg * W
    t0 = lo + (per_seg - 1 - j if Q_TILES else j) * BM
    bh = gl.program_id(1)
    b = bh // nh
    h = h0 + bh - b * nh
    off = h % R
    return h, t0, lo, off, b * T, (off * H + h) * D, b * H + h


@gluon.jit
def _stats(stats_ptr, first, R, off, bh, T_all, BH, layout: gl.constexpr, BM: gl.constexpr,
           num_warps: gl.constexpr):
    """log2 LSE and Δ of the kept rows first … first + BM − 1 of row bh, in `layout`: loaded one
    value a thread (the accumulator's slices would hold 16 copies a thread), then converted."""
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    base = stats_ptr + bh * T_all + (first + gl.arange(0, BM, flat)) * R + off
    return gl.convert_layout(gl.load(base), layout), gl.convert_layout(gl.load(base + BH * T_all), layout)


@gluon.jit
def _terms(pos, h, N_BR: gl.constexpr):
    """The union kernels' level-1 weight terms log2(λ(x) + 1) of positions pos for head h (λ: how
    many of the dilations 2 … 2^(N_BR−1) keep x); a pair's weight term is the min of its two."""
    lam = gl.zeros_like(pos)
    for j in gl.static_range(1, N_BR):
        lam += (((pos ^ h) & ((1 << j) - 1)) == 0).to(gl.int32)
    return gl.log2((lam + 1).to(gl.float32))


@gluon.jit
def _refill(a_desc, b_desc, a_smem, b_smem, ready, tile, n, row, first, col):
    """Ring tile `tile` (rows row + first + tile·rows) into its stage, tile mod STAGES, if tile < n."""
    STAGES: gl.constexpr = a_smem.shape[0]
    BR: gl.constexpr = a_desc.block_type.shape[0]
    go = tile < n
    stage = tile % STAGES
    mbarrier.expect(ready.index(stage), 2 * a_desc.block_type.nbytes, pred=go)
    tma.async_copy_global_to_shared(a_desc, [row + first + tile * BR, col], ready.index(stage), a_smem.index(stage),
                                    pred=go)
    tma.async_copy_global_to_shared(b_desc, [row + first + tile * BR, col], ready.index(stage), b_smem.index(stage),
                                    pred=go)


@gluon.jit
def _tiles(a_desc, b_desc, ra_desc, rb_desc, row, at, ring_at, col, n, STAGES: gl.constexpr):
    """Shared memory for the program's own pair of tiles (at row + at) and a ring of STAGES pairs
    of the tiles it loops over (tile i at row + ring_at + i·rows), with their mbarriers; the pair
    and the ring's first min(n, STAGES) tiles loading. (dK/dV: K and V, then Q and dO; dQ: Q and
    dO, then K and V.)"""
    a_smem = gl.allocate_shared_memory(a_desc.dtype, a_desc.block_type.shape, a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, b_desc.block_type.shape, b_desc.layout)
    ra_smem = gl.allocate_shared_memory(ra_desc.dtype, [STAGES] + ra_desc.block_type.shape, ra_desc.layout)
    rb_smem = gl.allocate_shared_memory(rb_desc.dtype, [STAGES] + rb_desc.block_type.shape, rb_desc.layout)
    bar = _barriers(1).index(0)
    ready = _barriers(STAGES)
    mbarrier.expect(bar, 2 * a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [row + at, col], bar, a_smem)
    tma.async_copy_global_to_shared(b_desc, [row + at, col], bar, b_smem)
    for i in gl.static_range(STAGES):
        _refill(ra_desc, rb_desc, ra_smem, rb_smem, ready, i, n, row, ring_at, col)
    return a_smem, b_smem, ra_smem, rb_smem, bar, ready


@gluon.jit
def _release(bar, ready):
    """Invalidate _tiles' mbarriers once the loop is done with them."""
    STAGES: gl.constexpr = ready.shape[0]
    mbarrier.invalidate(bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def _dkdv_step(i, n, k_smem, v_smem, q_smem, do_smem, ready, dk, dv, pt_op, dst_op, bias, q_terms, k_pos, t0, qk_scale,
               stats_ptr, T_all, BH, bh, R, off, q_desc, do_desc, row, col, MASK: gl.constexpr,
               WEIGHTS: gl.constexpr):
    """Query tile i (t0 + i·BM) against this program's keys; returns (dK, dV, Pᵀ, dSᵀ operands),
    the last update of each left in flight."""
    STAGES: gl.constexpr = q_smem.shape[0]
    BM: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = k_smem.shape[0]
    s_layout: gl.constexpr = bias.type.layout.parent
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    st = i % STAGES
    zero = gl.zeros([BN, BM], gl.float32, s_layout)
    mbarrier.wait(ready.index(st), (i // STAGES) & 1)
    st_t = warpgroup_mma(k_smem, q_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
    dpt = warpgroup_mma(v_smem, do_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
    q_pos = t0 + i * BM + gl.arange(0, BM, cols)
    lse2, delta = _stats(stats_ptr, t0 + i * BM, R, off, bh, T_all, BH, cols, BM, BN // 16)
    # dV, dK of tile i − 1 and Sᵀ retire; dPᵀ stays in flight.
    st_t, dk, dv, pt_op, dst_op = warpgroup_mma_wait(1, deps=(st_t, dk, dv, pt_op, dst_op))
    if i > 0:  # tile i − 1's stage is free: it takes tile i − 1 + STAGES
        _refill(q_desc, do_desc, q_smem, do_smem, ready, i - 1 + STAGES, n, row, t0, col)
    z = st_t * qk_scale - lse2[None, :]
    if WEIGHTS:  # λ's period divides BM: every query tile has the same column terms
        z = z + gl.minimum(bias[:, None], q_terms[None, :])
    if MASK:
        z = gl.where(q_pos[None, :] >= k_pos[:, None], z, float("-inf"))
    pt = gl.exp2(z)
    pt_op = gl.convert_layout(pt.to(q_smem.dtype), pt_op.type.layout)
    dv = warpgroup_mma(pt_op, do_smem.index(st), dv, is_async=True)
    dpt = warpgroup_mma_wait(1, deps=(dpt,))
    dst = pt * (dpt - delta[None, :])
    dst_op = gl.convert_layout(dst.to(q_smem.dtype), dst_op.type.layout)
    dk = warpgroup_mma(dst_op, q_smem.index(st), dk, is_async=True)
    return dk, dv, pt_op, dst_op


@gluon.jit
def _dq_step(j, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2, delta, lo, qk_scale,
             k_desc, v_desc, row, col, MASK: gl.constexpr, WEIGHTS: gl.constexpr):
    """Key tile j (lo + j·BN) against this program's queries; returns (dQ, dS operand), the
    update left in flight."""
    STAGES: gl.constexpr = k_smem.shape[0]
    BN: gl.constexpr = k_smem.shape[1]
    BM: gl.constexpr = q_smem.shape[0]
    s_layout: gl.constexpr = bias.type.layout.parent
    st = j % STAGES
    zero = gl.zeros([BM, BN], gl.float32, s_layout)
    mbarrier.wait(ready.index(st), (j // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
    dp = warpgroup_mma(do_smem, v_smem.index(st).permute((1, 0)), zero, use_acc=False, is_async=True)
    s, dq, ds_op = warpgroup_mma_wait(1, deps=(s, dq, ds_op))  # dQ of tile j − 1 and S retire
    if j > 0:  # tile j − 1's stage is free: it takes tile j − 1 + STAGES
        _refill(k_desc, v_desc, k_smem, v_smem, ready, j - 1 + STAGES, n, row, lo, col)
    z = s * qk_scale - lse2[:, None]
    if WEIGHTS:  # λ's period divides BN: every key tile has the same column terms
        z = z + gl.minimum(bias[:, None], k_terms[None, :])
    if MASK:
        k_pos = lo + j * BN + gl.arange(0, BN, gl.SliceLayout(0, s_layout))
        z = gl.where(k_pos[None, :] <= q_pos[:, None], z, float("-inf"))
    p = gl.exp2(z)
    dp = warpgroup_mma_wait(0, deps=(dp,))  # the only one in flight
    ds = p * (dp - delta[:, None])
    ds_op = gl.convert_layout(ds.to(q_smem.dtype), ds_op.type.layout)
    dq = warpgroup_mma(ds_op, k_smem.index(st), dq, is_async=True)
    return dq, ds_op


@gluon.jit
def _put(g, ptr, pos, row_stride, cos_ptr, sin_ptr, scratch, ROPE: gl.constexpr, num_warps: gl.constexpr):
    """Store float32 gradient rows g (BM, D) at positions pos (BM,) of a (T, D) slice with row
    stride; ROPE: rotated back by RoPE's angles at pos first, (g1·cos + g2·sin, g2·cos − g1·sin)
    of g's halves with cos and sin (T, D/2) float32 (the gradient of the unrotated input, as
    union_kernels._put does). The halves are read back apart through `scratch` (BM, D) float32."""
    D: gl.constexpr = g.shape[1]
    if ROPE:
        layout: gl.constexpr = row_layout(D // 2, num_warps)
        scratch.store(g)
        gl.thread_barrier()
        g1 = scratch.slice(0, D // 2, dim=1).load(layout)
        g2 = scratch.slice(D // 2, D // 2, dim=1).load(layout)
        gl.thread_barrier()  # every half read before the buffer takes the next rows
        at = gl.convert_layout(pos, gl.SliceLayout(1, layout))[:, None]
        half = gl.arange(0, D // 2, gl.SliceLayout(0, layout))[None, :]
        c = gl.load(cos_ptr + at * (D // 2) + half)
        s = gl.load(sin_ptr + at * (D // 2) + half)
        first = ptr + at.to(gl.int64) * row_stride + half
        gl.store(first, (g1 * c + g2 * s).to(ptr.dtype.element_ty))
        gl.store(first + D // 2, (g2 * c - g1 * s).to(ptr.dtype.element_ty))
    else:
        layout: gl.constexpr = row_layout(D, num_warps)
        at = gl.convert_layout(pos, gl.SliceLayout(1, layout))[:, None]
        rows = ptr + at.to(gl.int64) * row_stride + gl.arange(0, D, gl.SliceLayout(0, layout))[None, :]
        gl.store(rows, gl.convert_layout(g, layout).to(ptr.dtype.element_ty))


@gluon.jit
def dkdv(q_desc, k_desc, v_desc, do_desc, dk_ptr, dv_ptr, stats_ptr, cos_ptr, sin_ptr, sgb, sgt, sgh, T, H, W, R, h0,
         nh, BH, qk_scale, scale, STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr,
         ROPE: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of BM keys of one head over the queries of their segment (causal: from the
    keys' own tile on), grid (T / BM, B · nh)."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    h, k0, lo, off, row, col, bh = _geometry(T, H, W, R, h0, nh, BM, D, False)
    t0 = k0 if CAUSAL else lo  # the first query tile: the diagonal one, or the segment's first
    n = (lo + W - t0) // BM
    T_all = T * R

    s_layout: gl.constexpr = mma_layout(BM, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    k_smem, v_smem, q_smem, do_smem, kv_bar, ready = _tiles(k_desc, v_desc, q_desc, do_desc, row, k0, t0, col, n,
                                                             STAGES)

    k_pos = k0 + gl.arange(0, BM, gl.SliceLayout(1, s_layout))
    bias = _terms(k_pos, h, N_BR)  # the keys' weight terms (unused when N_BR = 1)
    q_terms = _terms(t0 + gl.arange(0, BM, gl.SliceLayout(0, s_layout)), h, N_BR)
    dk = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
    dv = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
    pt_op = gl.zeros([BM, BM], dtype, a_layout)
    dst_op = gl.zeros([BM, BM], dtype, a_layout)
    mbarrier.wait(kv_bar, 0)
    # The first tile apart (causal: the diagonal one, masked), so that the loop's accumulators
    # always come from a wgmma: entering it with the zeros, ptxas fences every iteration's wgmma.
    dk, dv, pt_op, dst_op = _dkdv_step(0, n, k_smem, v_smem, q_smem, do_smem, ready, dk, dv, pt_op, dst_op, bias,
                                       q_terms, k_pos, t0, qk_scale, stats_ptr, T_all, BH, bh, R, off, q_desc, do_desc,
                                       row, col, CAUSAL, N_BR > 1)
    for i in range(1, n):
        dk, dv, pt_op, dst_op = _dkdv_step(i, n, k_smem, v_smem, q_smem, do_smem, ready, dk, dv, pt_op, dst_op, bias,
                                           q_terms, k_pos, t0, qk_scale, stats_ptr, T_all, BH, bh, R, off, q_desc,
                                           do_desc, row, col, False, N_BR > 1)
    dk, dv, pt_op, dst_op = warpgroup_mma_wait(0, deps=(dk, dv, pt_op, dst_op))

    _release(kv_bar, ready)
    b = bh // H
    pos = gl.convert_layout(k_pos, gl.SliceLayout(1, o_layout)) * R + off
    scratch = gl.allocate_shared_memory(gl.float32, [BM, D], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    head = b.to(gl.int64) * sgb + h * sgh
    _put(dk * scale, dk_ptr + head, pos, sgt, cos_ptr, sin_ptr, scratch, ROPE, num_warps)
    _put(dv, dv_ptr + head, pos, sgt, cos_ptr, sin_ptr, scratch, False, num_warps)


@gluon.jit
def _row_stats(o_ptr, lse_ptr, do_smem, stats_ptr, pos, h, b, T_all, H, bh, BH, layout: gl.constexpr,
               num_warps: gl.constexpr):
    """log2 LSE and Δ = rowsum(dO∘O) of the queries at positions pos, from the forward's LSE
    (B, T_all, H) and O (B, T_all, H, D), both contiguous, and dO in shared memory: written to
    STATS for the dK/dV passes and returned in `layout`."""
    D: gl.constexpr = do_smem.shape[1]
    rows: gl.constexpr = row_layout(D, num_warps)
    at = (b * T_all + gl.convert_layout(pos, gl.SliceLayout(1, rows))).to(gl.int64) * H + h
    o = gl.load(o_ptr + at[:, None] * D + gl.arange(0, D, gl.SliceLayout(0, rows))[None, :])
    delta = gl.sum(do_smem.load(rows).to(gl.float32) * o.to(gl.float32), axis=1)
    flat: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    lse2 = gl.load(lse_ptr + gl.convert_layout(at, flat)) * 1.4426950408889634
    first = stats_ptr + bh * T_all + gl.convert_layout(pos, flat)
    gl.store(first, lse2)
    gl.store(first + BH * T_all, gl.convert_layout(delta, flat))
    return gl.convert_layout(lse2, layout), gl.convert_layout(delta, layout)


@gluon.jit
def dq(q_desc, k_desc, v_desc, do_desc, o_ptr, lse_ptr, dq_ptr, stats_ptr, cos_ptr, sin_ptr, sgb, sgt, sgh, T, H, W,
       R, h0, nh, BH, qk_scale, scale, STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr,
       ROPE: gl.constexpr, num_warps: gl.constexpr):
    """dQ of BM queries of one head over the keys of their segment (causal: up to their own
    tile), grid (T / BM, B · nh); writes STATS of those queries for the dK/dV passes."""
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    h, q0, lo, off, row, col, bh = _geometry(T, H, W, R, h0, nh, BM, D, True)
    n = (q0 - lo) // BM + 1 if CAUSAL else W // BM
    T_all = T * R

    s_layout: gl.constexpr = mma_layout(BM, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_smem, do_smem, k_smem, v_smem, q_bar, ready = _tiles(q_desc, do_desc, k_desc, v_desc, row, q0, lo, col, n,
                                                            STAGES)

    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_pos = q0 + gl.arange(0, BM, rows)
    bias = _terms(q_pos, h, N_BR)  # the queries' weight terms (unused when N_BR = 1)
    k_terms = _terms(lo + gl.arange(0, BM, gl.SliceLayout(0, s_layout)), h, N_BR)
    b = bh // H
    mbarrier.wait(q_bar, 0)
    lse2, delta = _row_stats(o_ptr, lse_ptr, do_smem, stats_ptr, q_pos * R + off, h, b, T_all, H, bh, BH, rows,
                             num_warps)
    dq = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
    ds_op = gl.zeros([BM, BM], dtype, a_layout)
    # The first tile apart, as in dkdv (masked when causal: a no-op unless it is the diagonal),
    # and causal, the diagonal last.
    dq, ds_op = _dq_step(0, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2, delta, lo,
                         qk_scale, k_desc, v_desc, row, col, CAUSAL, N_BR > 1)
    last = n - 1 if CAUSAL else n
    for j in range(1, last):
        dq, ds_op = _dq_step(j, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2,
                             delta, lo, qk_scale, k_desc, v_desc, row, col, False, N_BR > 1)
    if CAUSAL and n > 1:
        dq, ds_op = _dq_step(last, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2,
                             delta, lo, qk_scale, k_desc, v_desc, row, col, True, N_BR > 1)
    dq, ds_op = warpgroup_mma_wait(0, deps=(dq, ds_op))

    _release(q_bar, ready)
    pos = gl.convert_layout(q_pos, gl.SliceLayout(1, o_layout)) * R + off
    scratch = gl.allocate_shared_memory(gl.float32, [BM, D], gl.SwizzledSharedLayout(1, 1, 1, [1, 0]))
    _put(dq * scale, dq_ptr + b.to(gl.int64) * sgb + h * sgh, pos, sgt, cos_ptr, sin_ptr, scratch, ROPE, num_warps)
