"""Probe: the backward of gluon_probe.py's problem in Gluon (TMA loads, asynchronous wgmma), dQ
and dK/dV in two kernels as the union kernels split them, against cuDNN.

The problem is gluon_probe.py's: attention inside segments of W rows, causal or not, head h
keeping the positions ≡ h (mod R) (a dilated branch read in place through the (B·T/R, R·H·D)
view), and with N_BR > 1 (R = 1) the union local pass's weight terms. The gradients are
FlashAttention-2's: with P = exp(S − LSE) recomputed against the forward's LSE and Δ = rowsum(dO∘O),
dV = Pᵀ dO, dS = P∘(dO Vᵀ − Δ), dK = scale·dSᵀ Q, dQ = scale·dS K. LSE (log2) and Δ come in as
the union kernels' STATS, (2, B·H, T) float32 by position, which their local dQ pass writes.

- dK/dV: one program a tile of BM keys and a head; per query tile i, Sᵀ = K Qᵢᵀ and dPᵀ = V dOᵢᵀ
  are issued together, Pᵀ's exponentials run while dPᵀ is in flight, dV += Pᵀ dOᵢ runs while
  dSᵀ is formed, and dK += dSᵀ Qᵢ while the next tile's Sᵀ and dPᵀ are issued. Qᵢ and dOᵢ come
  through a ring of STAGES stages; a stage is reloaded once its tile's four wgmma retired.
- dQ: one program a tile of BM queries; per key tile j, S and dP are issued together, P's
  exponentials run while dP is in flight, dQ += dS Kⱼ runs into the next tile's issue.

`python tools/kernels/gluon_bwd_probe.py [--lengths 32768 131072] [--segments 2048] [--rates 1 4] [--full] [--union]`:
checks the three gradients against float32 autograd of the definition (--union: with the long
preset's five branches' weights, R = 1, W = 2,048), then times them against cuDNN's backward on
the same (packed) segments. Against the union kernels' passes they would replace:
gluon_compare.py. CUDA, compute capability 9.0 only.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_init, warpgroup_mma_wait)

from gluon_probe import LOG2E, _barriers, descriptors, forward, kept, mma_layout, pairs, timed


@gluon.jit
def _geometry(T, H, W, R, h0, nh, BM: gl.constexpr, D: gl.constexpr, Q_TILES: gl.constexpr):
    """This program's tile and head (one of h0 … h0 + nh − 1): (head, first row t0, its segment's first row lo, the head's
    offset, the batch's first row in the (B·T/R, R·H·D) view, the head's column, b·H + h). The most
    work first: dK/dV's first key tiles of a segment (Q_TILES false), dQ's last query tiles."""
    per_seg = W // BM
    segs = T // W
    j = gl.program_id(0) // segs
    lo = (gl.program_id(0) % segs) * W
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
def _dkdv(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, stats_ptr, T, H, W, R, h0, nh, BH, qk_scale, scale,
          STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
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
                                           q_terms, k_pos, t0, qk_scale, stats_ptr, T_all, BH, bh, R, off, q_desc, do_desc,
                                           row, col, False, N_BR > 1)
    dk, dv, pt_op, dst_op = warpgroup_mma_wait(0, deps=(dk, dv, pt_op, dst_op))

    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    k_smem.store((dk * scale).to(dtype))
    v_smem.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [row + k0, col], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [row + k0, col], v_smem)
    tma.store_wait(0)


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
def _dq(q_desc, k_desc, v_desc, do_desc, dq_desc, stats_ptr, T, H, W, R, h0, nh, BH, qk_scale, scale,
        STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    h, q0, lo, off, row, col, bh = _geometry(T, H, W, R, h0, nh, BM, D, True)
    n = (q0 - lo) // BM + 1 if CAUSAL else W // BM

    s_layout: gl.constexpr = mma_layout(BM, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    q_smem, do_smem, k_smem, v_smem, q_bar, ready = _tiles(q_desc, do_desc, k_desc, v_desc, row, q0, lo, col, n,
                                                            STAGES)

    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_pos = q0 + gl.arange(0, BM, rows)
    lse2, delta = _stats(stats_ptr, q0, R, off, bh, T * R, BH, rows, BM, num_warps)
    bias = _terms(q_pos, h, N_BR)  # the queries' weight terms (unused when N_BR = 1)
    k_terms = _terms(lo + gl.arange(0, BM, gl.SliceLayout(0, s_layout)), h, N_BR)
    dq = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
    ds_op = gl.zeros([BM, BM], dtype, a_layout)
    mbarrier.wait(q_bar, 0)
    # The first tile apart, as in _dkdv (masked when causal: a no-op unless it is the diagonal),
    # and causal, the diagonal last.
    dq, ds_op = _dq_step(0, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2, delta, lo,
                         qk_scale, k_desc, v_desc, row, col, CAUSAL, N_BR > 1)
    last = n - 1 if CAUSAL else n
    for j in range(1, last):
        dq, ds_op = _dq_step(j, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2, delta, lo,
                             qk_scale, k_desc, v_desc, row, col, False, N_BR > 1)
    if CAUSAL and n > 1:
        dq, ds_op = _dq_step(last, n, q_smem, do_smem, k_smem, v_smem, ready, dq, ds_op, bias, k_terms, q_pos, lse2, delta, lo,
                             qk_scale, k_desc, v_desc, row, col, True, N_BR > 1)
    dq, ds_op = warpgroup_mma_wait(0, deps=(dq, ds_op))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))
    q_smem.store((dq * scale).to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [row + q0, col], q_smem)
    tma.store_wait(0)


def backward(q, k, v, do, stats, W: int, scale: float, BM: int = 64, stages: int = 2, R: int = 1,
             causal: bool = True, branches: int = 1, which=("dq", "dkdv"), grads=None, heads: range | None = None):
    """(dq, dk, dv) of gluon_probe.forward's attention given STATS (2, B·H, T): log2 LSE and Δ by
    position. A head's rows it does not keep are left as `grads` had them (zeros if not given);
    `which` launches only some of the two kernels (timing); heads: only these (contiguous) ones
    (head_split's branches)."""
    B, T, H, D = q.shape
    assert T % W == 0 and W % (BM * R) == 0 and (R == 1 or branches == 1)
    grads = grads or tuple(torch.zeros_like(q) for _ in range(3))
    dq, dk, dv = grads
    qd, kd, vd, dod, dqd, dkd, dvd = descriptors((q, k, v, do, dq, dk, dv), R, BM)
    heads = heads or range(H)
    grid = (T // R // BM, B * len(heads))
    args = (stats, T // R, H, W // R, R, heads.start, len(heads), B * H, scale * LOG2E, scale)
    consts = dict(STAGES=stages, CAUSAL=causal, N_BR=branches, num_warps=BM // 16)
    if "dq" in which:
        _dq[grid](qd, kd, vd, dod, dqd, *args, **consts)
    if "dkdv" in which:
        _dkdv[grid](qd, kd, vd, dod, dkd, dvd, *args, **consts)
    return dq, dk, dv


def lam(pos, h: int, branches: int):
    """λ of positions pos for head h: how many of the dilations 2 … 2^(branches−1) keep them."""
    return sum((((pos ^ h) & ((1 << j) - 1)) == 0).long() for j in range(1, branches))


def reference(q, k, v, do, W: int, scale: float, causal: bool, branches: int = 1):
    """float32 (out, lse, dq, dk, dv) by autograd of the definition, segment by segment, with the
    union local pass's weights m = min(λ(x), λ(s)) + 1 when branches > 1."""
    B, T, H, D = q.shape
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    qs, ks, vs = (x.reshape(B * T // W, W, H, D).transpose(1, 2) for x in leaves)
    s = qs @ ks.transpose(-1, -2) * scale
    if branches > 1:
        pos = torch.arange(W, device=q.device)
        lq = torch.stack([lam(pos, h, branches) for h in range(H)])  # (H, W); λ's period divides W
        s = s + torch.log(torch.minimum(lq[:, :, None], lq[:, None, :]) + 1.0).float()
    if causal:
        s = s.masked_fill(torch.ones(W, W, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = (torch.softmax(s, -1) @ vs).transpose(1, 2).reshape(B, T, H, D)
    out.backward(do.float())
    return (out.detach(), lse.transpose(1, 2).reshape(B, T, H), *(x.grad for x in leaves))


def stats_of(out, do, lse, R: int = 1):
    """STATS (2, B·H, T·R) by position from kept rows' out, dO (B, T, H, D) and LSE (B, T, H)."""
    B, T, H, _ = out.shape
    stats = torch.zeros((2, B, H, T * R), device=out.device)
    pos = (torch.arange(T, device=out.device)[:, None] * R + torch.arange(H, device=out.device) % R).T  # (H, T)
    idx = pos.expand(B, H, T)
    stats[0].scatter_(2, idx, (lse * LOG2E).transpose(1, 2))
    stats[1].scatter_(2, idx, (out.float() * do.float()).sum(-1).transpose(1, 2))
    return stats.reshape(2, B * H, T * R)


def check(configs, H: int, D: int, scale: float, causal: bool, union: bool, rates) -> None:
    torch.manual_seed(0)
    B, T, W = 2, 1024, 512
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for R in ([1] if union else rates):
        branches = 5 if union else 1
        kq, kk, kv, kdo = (kept(x, R) for x in (q, k, v, do))
        out, lse, *ref = reference(kq, kk, kv, kdo, W // R, scale, causal, branches)
        stats = stats_of(out, kdo, lse, R)
        for BM, stages in configs:
            if W % (BM * R):
                continue
            got = backward(q, k, v, do, stats, W, scale, BM, stages, R, causal, branches)
            gaps = ", ".join(f"{name} {(kept(g, R).float() - r).abs().max().item() / r.abs().max().item():.1e}"
                             for name, g, r in zip(("dq", "dk", "dv"), got, ref))
            print(f"check rate {R}, {BM}x{stages}{', weights' if union else ''}: max |g - ref| / max |ref|: {gaps}",
                  flush=True)


def cudnn_backward(q, k, v, do, W: int, scale: float, causal: bool):
    """A function timing cuDNN's backward on the (B·T/W, H, W, D) segments of q/k/v (B, T, H, D)."""
    B, T, H, D = q.shape
    seg = [x.reshape(B * T // W, W, H, D).transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale)
    g = do.reshape(B * T // W, W, H, D).transpose(1, 2)
    return lambda: torch.autograd.grad(out, seg, g, retain_graph=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048])
    p.add_argument("--rates", type=int, nargs="+", default=[1, 4])
    p.add_argument("--configs", nargs="+", default=["64x2", "64x3"], help="tiles as ROWSxSTAGES")
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    p.add_argument("--union", action="store_true", help="the long preset's weights (R = 1, W = 2,048)")
    args = p.parse_args(argv)
    H, D, causal = 12, 64, not args.full
    scale = 1 / math.sqrt(D)
    configs = [tuple(map(int, c.split("x"))) for c in args.configs]
    check(configs, H, D, scale, causal, args.union, args.rates)
    for T in args.lengths:
        q, k, v, do = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for W in ([2048] if args.union else args.segments):
            for R in ([1] if args.union else args.rates):
                branches = 5 if args.union else 1
                flops = 2.5 * pairs(T, W, R, causal) * 4 * D * H
                packed = [kept(x, R).contiguous() for x in (q, k, v, do)]
                cells = {"cudnn": cudnn_backward(*packed, W // R, scale, causal)}
                out, lse = forward(q, k, v, W, scale, 64, 2, R, causal, branches)
                stats = stats_of(kept(out, R), packed[3], kept(lse[..., None], R)[..., 0], R)
                grads = tuple(torch.zeros_like(q) for _ in range(3))
                for BM, stages in configs:
                    if W % (BM * R):
                        continue
                    run = lambda which, BM=BM, stages=stages: backward(q, k, v, do, stats, W, scale, BM, stages, R,
                                                                        causal, branches, which, grads)
                    cells[f"gluon {BM}x{stages} dq"] = lambda run=run: run(("dq",))
                    cells[f"gluon {BM}x{stages} dkdv"] = lambda run=run: run(("dkdv",))
                    cells[f"gluon {BM}x{stages} both"] = lambda run=run: run(("dq", "dkdv"))
                # Kernels in a CUDA graph (seven host-made descriptors a launch), cuDNN's autograd call eager.
                ms = {name: timed(fn, graph=name != "cudnn") for name, fn in cells.items()}
                line = ", ".join(f"{name} {t:.3f} ms" + (f" {flops / t / 1e9:.0f} TF/s" if "both" in name or name ==
                                                          "cudnn" else "") for name, t in ms.items())
                print(f"T={T} W={W} R={R}{' union weights' if args.union else ''} backward: {line}", flush=True)


if __name__ == "__main__":
    main()
