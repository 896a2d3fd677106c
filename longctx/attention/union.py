"""Dilated attention as one weighted softmax per query, in Triton: each distinct pair scored once.

Shapes: B batch, T sequence length, H heads, D head dim; LSE and Δ tensors are (B, T, H) float32.

Which layouts. LongNet's: r = 1, 2, 4, …, 2^(n−1) and w_i = L·r_i (every branch keeps L rows a
segment), T a multiple of w_n, every head running every branch (no head_split). Then:
- LongNet Eq. 10 is one softmax over the multiset union of the branches' keys (DESIGN §3), so a
  pair that m branches share can be scored once with weight m, i.e. log m added to its score;
- head h keeps position x in branches 1 … λ(x) + 1, where λ(x) = #{j < n : x ≡ h (mod 2^j)}
  (offsets nest: h mod r_j is h mod r_i reduced, for r_j | r_i);
- every pair (x, s) of a branch belongs to one *level* a: the first branch whose segment holds
  both. Level 1: the same L-segment; level a > 1: the two halves of one w_a segment, with
  x ≡ s ≡ h (mod r_a). Its weight is m = min(λ(x), λ(s)) + 2 − a (branches a … min + 1 keep it).
So the kernels visit 1 + ½(½ + ¼ + …) of branch 1's pairs instead of 1 + ½ + ¼ + …: 1,504 pairs a
position instead of 1,984 in the causal long preset (76%), and write each output once, with no
per-branch outputs to merge. log m = min(log(λ(x) + 2 − a), log(λ(s) + 2 − a)): a row term, a
column term and one min per score.

Two passes per direction:
- *local*: level 1, contiguous tiles of positions (a causal segment's usual lower triangle);
- *upper*: levels ≥ 2, for positions with λ ≥ 1 only, tiled by *class* (λ = k: positions
  c_k + j·2^(k+1), one residue class, whose tiles need levels 2 … k + 1 and no mask). It starts
  from the local pass's result for its rows (output and LSE, or the gradient) and adds its keys.
Backward is FlashAttention-2's: Δ = rowsum(dO∘O) (in the local dQ pass), then dQ over keys and
dK/dV over queries, each recomputing P = m·exp(z − LSE) against the exact merged LSE.

Runs on CUDA in fp16/bf16; on CPU tensors through Triton's interpreter (tests only).
"""
from __future__ import annotations

import math
import os

import torch

from .combine import SUPPORTED, compiled_triton

if SUPPORTED:
    import triton
    import triton.language as tl

# LONGCTX_UNION=0 keeps the per-branch kernels and the combine (for A/B runs).
ENABLED = os.environ.get("LONGCTX_UNION", "1") != "0"

# (rows, columns, warps, stages) per kernel: rows are the program's own tile (queries for fwd and
# dq, keys for dkdv), columns the tile it loops over. Measured on an H100 (scripts/union_probe.py).
CONFIG = {"fwd": (128, 64, 4, 4), "dq": (128, 32, 4, 4), "dkdv": (128, 32, 4, 3)}
LOG2E = 1.4426950408889634


def layout(T: int, H: int, D: int, segment_lengths, dilation_rates, head_split: bool):
    """(L, n) when the union kernels compute this layout, else None (see the module docstring;
    also, for the tiles, D a power of two in [16, 128] and L / r_n a multiple of 16 whose tiles
    hold whole periods of λ, 2^(n−1) positions)."""
    ws, rs = list(segment_lengths), list(dilation_rates)
    n, L = len(rs), ws[0]
    if head_split or rs != [1 << i for i in range(n)] or ws != [L << i for i in range(n)]:
        return None
    rows = math.gcd(128, L >> (n - 1))  # the tiles' rows (_tiles), which must hold whole periods of λ
    if T % ws[-1] or L % (16 << (n - 1)) or rows % (1 << (n - 1)) or D not in (16, 32, 64, 128):
        return None
    return L, n


def use(q: torch.Tensor, lay) -> bool:
    """Whether the op should run the union kernels on q (B, T, H, D)."""
    return ENABLED and lay is not None and compiled_triton(q.device) and q.dtype in (torch.float16, torch.bfloat16)


if SUPPORTED:

    @triton.jit
    def _lam(pos, h, N_BR: tl.constexpr):
        """λ of positions pos (vector) for head h: how many of dilations 2 … 2^(N_BR−1) keep them."""
        lam = tl.zeros(pos.shape, tl.int32)
        for j in tl.static_range(1, N_BR):
            lam += (((pos ^ h) & ((1 << j) - 1)) == 0).to(tl.int32)
        return lam

    @triton.jit
    def _wlog(lam, LEVEL: tl.constexpr):
        """log2 of a position's weight term at LEVEL (its λ + 2 − LEVEL), float32."""
        return tl.log2((lam + 2 - LEVEL).to(tl.float32))

    @triton.jit
    def _rows(ptr, pos, row_stride, D: tl.constexpr):
        """Pointers (len(pos), D) to the rows at positions pos of a (T, D) slice with row stride."""
        return ptr + pos.to(tl.int64)[:, None] * row_stride + tl.arange(0, D)[None, :]

    @triton.jit
    def _class_tile(pid, T, h, BM: tl.constexpr, N_BR: tl.constexpr):
        """Upper-pass tile pid: class k (1 … N_BR − 1, heaviest first) and its BM positions."""
        k = pid * 0
        j = pid * 0
        base = pid * 0
        for i in tl.static_range(N_BR - 1):
            # class N_BR − 1 − i; the last class (i = 0) steps by 2^(N_BR−1), the others by 2^(c+1)
            count = T // ((1 << (N_BR - i - (i == 0))) * BM)
            hit = (pid >= base) & (pid < base + count)
            k = tl.where(hit, N_BR - 1 - i, k)
            j = tl.where(hit, pid - base, j)
            base += count
        last = k == N_BR - 1
        stride = tl.where(last, 1 << k, 2 << k)
        first = tl.where(last, h & ((1 << k) - 1), (h ^ (1 << k)) & ((2 << k) - 1))
        return k, first + stride * j * BM, first + stride * (j * BM + tl.arange(0, BM))

    @triton.jit
    def _level_start(x0, h, a: tl.constexpr, L: tl.constexpr, CAUSAL: tl.constexpr, FROM_KEYS: tl.constexpr):
        """Level a's partners of a tile at x0: (whether any, their first position; they step by 2^(a−1)).
        Causal, queries take the first half's keys and keys the second half's queries."""
        half = (x0 // (L << (a - 2))) % 2
        start = x0 // (L << (a - 1)) * (L << (a - 1)) + (1 - half) * (L << (a - 2)) + (h & ((1 << (a - 1)) - 1))
        if CAUSAL:
            return half == 1 - FROM_KEYS, start
        return half >= 0, start

    @triton.jit
    def _col_weights(start, step, h, k, LEVEL: tl.constexpr, N_BR: tl.constexpr, BN: tl.constexpr):
        """log2 weight terms of the BN looped-over positions start + i·step: the same for every
        block of a loop, since λ has period 2^(N_BR−1) and blocks start BN·step apart, a multiple."""
        lam = _lam(start + tl.arange(0, BN) * step, h, N_BR)
        if LEVEL == 1:
            return _wlog(lam, 1)
        return _wlog(tl.minimum(lam, k), LEVEL)

    @triton.jit
    def _any_level(x0, h, k, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, FROM_KEYS: tl.constexpr):
        """Whether a class-k tile at x0 has partners at any level ≥ 2 (else its program does nothing)."""
        work = k < 0
        for a in tl.static_range(2, N_BR + 1):
            live, start = _level_start(x0, h, a, L, CAUSAL, FROM_KEYS)
            work = work | (live & (a - 1 <= k))
        return work

    @triton.jit
    def _scores(a_rows, b_rows, a_pos, b_pos, a_w, b_w, qk_scale, LEVEL: tl.constexpr, N_BR: tl.constexpr,
                MASK: tl.constexpr, A_IS_Q: tl.constexpr):
        """log2-domain weighted scores (len(a_pos), len(b_pos)) of rows a against rows b; a_w, b_w:
        the two sides' log2 weight terms (level 1: log2 m = min of the two; above: b_w alone)."""
        s = tl.dot(a_rows, tl.trans(b_rows)) * qk_scale
        if N_BR > 1:
            if LEVEL == 1:
                s += tl.minimum(a_w[:, None], b_w[None, :])
            else:
                s += b_w[None, :]
        if MASK:
            keep = (b_pos[None, :] <= a_pos[:, None]) if A_IS_Q else (b_pos[None, :] >= a_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
        return s

    @triton.jit
    def _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, sk, sv, start, step, n_blocks, h, k, qk_scale,
                  LEVEL: tl.constexpr, N_BR: tl.constexpr, MASK: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
        """Online softmax of a query tile over n_blocks blocks of BN keys at start + i·step."""
        k_w = _col_weights(start, step, h, k, LEVEL, N_BR, BN)
        for i in range(n_blocks):
            kpos = start + (i * BN + tl.arange(0, BN)) * step
            kk = tl.load(_rows(kp, kpos, sk, D))
            s = _scores(q, kk, qpos, kpos, q_w, k_w, qk_scale, LEVEL, N_BR, MASK, True)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(kk.dtype), tl.load(_rows(vp, kpos, sv, D)))
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, sk, sv, start, step, n_blocks, h, k, qk_scale,
                 LEVEL: tl.constexpr, N_BR: tl.constexpr, MASK: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
        """Σ dS·K of a query tile over n_blocks blocks of BN keys at start + i·step (unscaled)."""
        k_w = _col_weights(start, step, h, k, LEVEL, N_BR, BN)
        for i in range(n_blocks):
            kpos = start + (i * BN + tl.arange(0, BN)) * step
            kk = tl.load(_rows(kp, kpos, sk, D))
            p = tl.math.exp2(_scores(q, kk, qpos, kpos, q_w, k_w, qk_scale, LEVEL, N_BR, MASK, True) - lse2[:, None])
            dp = tl.dot(do, tl.trans(tl.load(_rows(vp, kpos, sv, D))))
            dq += tl.dot((p * (dp - delta[:, None])).to(kk.dtype), kk)
        return dq

    @triton.jit
    def _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, lsep, deltap, sq, sdo, H, start, step, n_blocks, h, k,
                      qk_scale, LEVEL: tl.constexpr, N_BR: tl.constexpr, MASK: tl.constexpr, BM: tl.constexpr,
                      D: tl.constexpr):
        """dK (unscaled) and dV of a key tile over n_blocks blocks of BM queries at start + i·step."""
        q_w = _col_weights(start, step, h, k, LEVEL, N_BR, BM)
        for i in range(n_blocks):
            qpos = start + (i * BM + tl.arange(0, BM)) * step
            qq = tl.load(_rows(qp, qpos, sq, D))
            do = tl.load(_rows(dop, qpos, sdo, D))
            row = qpos.to(tl.int64) * H
            p = tl.math.exp2(_scores(kk, qq, kpos, qpos, k_w, q_w, qk_scale, LEVEL, N_BR, MASK, False)
                             - tl.load(lsep + row)[None, :] * 1.4426950408889634)
            dv += tl.dot(p.to(qq.dtype), do)
            dp = tl.dot(vv, tl.trans(do))
            dk += tl.dot((p * (dp - tl.load(deltap + row)[None, :])).to(qq.dtype), qq)
        return dk, dv

    @triton.jit
    def _bh(T, H):
        """This program's batch b and head h, and the element offset of (b, 0, h) in a (B, T, H) tensor."""
        b = tl.program_id(0) // H
        h = tl.program_id(0) % H
        return b, h, b.to(tl.int64) * T * H + h

    @triton.jit
    def _head(ptr, b, h, sb, sh):
        """ptr moved to (batch b, position 0, head h) of a (B, T, H, D) tensor with strides sb, sh."""
        return ptr + b.to(tl.int64) * sb + h * sh

    @triton.jit
    def _local_tile(T, L: tl.constexpr, BM: tl.constexpr, CAUSAL: tl.constexpr):
        """Local-pass tile: its segment's first position and its own first position (the
        longest causal rows first, so the heaviest programs start first)."""
        nseg = T // L
        i = tl.program_id(1)
        t = i // nseg
        if CAUSAL:
            t = L // BM - 1 - t
        seg0 = (i % nseg) * L
        return seg0, seg0 + t * BM

    @triton.jit
    def _fwd_local(Q, K, V, O, LSE, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, T, H, qk_scale,
                   L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        seg0, x0 = _local_tile(T, L, BM, CAUSAL)
        qpos = x0 + tl.arange(0, BM)
        kp = _head(K, b, h, skb, skh)
        vp = _head(V, b, h, svb, svh)
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
        q_w = _wlog(_lam(qpos, h, N_BR), 1)
        acc = tl.zeros([BM, D], tl.float32)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        if CAUSAL:
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, x0, 1, BM // BN, h, 0, qk_scale,
                                      1, N_BR, True, BN, D)
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, seg0, 1, (x0 - seg0) // BN, h, 0,
                                      qk_scale, 1, N_BR, False, BN, D)
        else:
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, seg0, 1, L // BN, h, 0, qk_scale,
                                      1, N_BR, False, BN, D)
        tl.store(_rows(O + row0 * D, qpos, H * D, D), (acc / l_i[:, None]).to(O.dtype.element_ty))
        tl.store(LSE + row0 + qpos.to(tl.int64) * H, (m_i + tl.log2(l_i)) / 1.4426950408889634)

    @triton.jit
    def _fwd_upper(Q, K, V, O, LSE, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, T, H, qk_scale,
                   L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        k, x0, qpos = _class_tile(tl.program_id(1), T, h, BM, N_BR)
        if _any_level(x0, h, k, L, N_BR, CAUSAL, 0):
            kp = _head(K, b, h, skb, skh)
            vp = _head(V, b, h, svb, svh)
            q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
            o_rows = _rows(O + row0 * D, qpos, H * D, D)
            lse_rows = LSE + row0 + qpos.to(tl.int64) * H
            acc = tl.load(o_rows).to(tl.float32)  # the local pass's softmax: its weight exp2(m_i)
            m_i = tl.load(lse_rows) * 1.4426950408889634
            l_i = tl.full([BM], 1.0, tl.float32)
            q_w = tl.zeros([BM], tl.float32)  # unused above level 1, where the class fixes the row term
            for a in tl.static_range(2, N_BR + 1):
                live, start = _level_start(x0, h, a, L, CAUSAL, 0)
                if live & (a - 1 <= k):
                    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, start, 1 << (a - 1),
                                              L // 2 // BN, h, k, qk_scale, a, N_BR, False, BN, D)
            tl.store(o_rows, (acc / l_i[:, None]).to(O.dtype.element_ty))
            tl.store(lse_rows, (m_i + tl.log2(l_i)) / 1.4426950408889634)

    @triton.jit
    def _dq_local(Q, K, V, DO, O, LSE, DELTA, DQ, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, T, H,
                  qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        seg0, x0 = _local_tile(T, L, BM, CAUSAL)
        qpos = x0 + tl.arange(0, BM)
        kp = _head(K, b, h, skb, skh)
        vp = _head(V, b, h, svb, svh)
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
        do = tl.load(_rows(_head(DO, b, h, sdb, sdh), qpos, sdt, D))
        stat = row0 + qpos.to(tl.int64) * H
        delta = tl.sum(do.to(tl.float32) * tl.load(_rows(O + row0 * D, qpos, H * D, D)).to(tl.float32), 1)
        tl.store(DELTA + stat, delta)
        lse2 = tl.load(LSE + stat) * 1.4426950408889634
        q_w = _wlog(_lam(qpos, h, N_BR), 1)
        dq = tl.zeros([BM, D], tl.float32)
        if CAUSAL:
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, x0, 1, BM // BN, h, 0, qk_scale,
                          1, N_BR, True, BN, D)
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, seg0, 1, (x0 - seg0) // BN, h, 0,
                          qk_scale, 1, N_BR, False, BN, D)
        else:
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, seg0, 1, L // BN, h, 0, qk_scale,
                          1, N_BR, False, BN, D)
        tl.store(_rows(DQ + row0 * D, qpos, H * D, D), (dq * scale).to(DQ.dtype.element_ty))

    @triton.jit
    def _dq_upper(Q, K, V, DO, O, LSE, DELTA, DQ, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, T, H,
                  qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        k, x0, qpos = _class_tile(tl.program_id(1), T, h, BM, N_BR)
        if _any_level(x0, h, k, L, N_BR, CAUSAL, 0):
            kp = _head(K, b, h, skb, skh)
            vp = _head(V, b, h, svb, svh)
            q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
            do = tl.load(_rows(_head(DO, b, h, sdb, sdh), qpos, sdt, D))
            stat = row0 + qpos.to(tl.int64) * H
            delta = tl.load(DELTA + stat)
            lse2 = tl.load(LSE + stat) * 1.4426950408889634
            dq = tl.zeros([BM, D], tl.float32)
            for a in tl.static_range(2, N_BR + 1):
                live, start = _level_start(x0, h, a, L, CAUSAL, 0)
                if live & (a - 1 <= k):
                    dq = _dq_keys(dq, q, do, lse2, delta, qpos, tl.zeros([BM], tl.float32), kp, vp, skt, svt, start,
                                  1 << (a - 1),
                                  L // 2 // BN, h, k, qk_scale, a, N_BR, False, BN, D)
            dq_rows = _rows(DQ + row0 * D, qpos, H * D, D)
            tl.store(dq_rows, (tl.load(dq_rows).to(tl.float32) + dq * scale).to(DQ.dtype.element_ty))

    @triton.jit
    def _dkdv_local(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                    T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BN: tl.constexpr,
                    BM: tl.constexpr, D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        seg0, x0 = _local_tile(T, L, BN, False)
        kpos = x0 + tl.arange(0, BN)
        kk = tl.load(_rows(_head(K, b, h, skb, skh), kpos, skt, D))
        vv = tl.load(_rows(_head(V, b, h, svb, svh), kpos, svt, D))
        qp = _head(Q, b, h, sqb, sqh)
        dop = _head(DO, b, h, sdb, sdh)
        k_w = _wlog(_lam(kpos, h, N_BR), 1)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        if CAUSAL:
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, LSE + row0, DELTA + row0, sqt, sdt, H, x0, 1,
                                   BN // BM, h, 0, qk_scale, 1, N_BR, True, BM, D)
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, LSE + row0, DELTA + row0, sqt, sdt, H, x0 + BN,
                                   1, (seg0 + L - x0 - BN) // BM, h, 0, qk_scale, 1, N_BR, False, BM, D)
        else:
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, LSE + row0, DELTA + row0, sqt, sdt, H, seg0, 1,
                                   L // BM, h, 0, qk_scale, 1, N_BR, False, BM, D)
        tl.store(_rows(DK + row0 * D, kpos, H * D, D), (dk * scale).to(DK.dtype.element_ty))
        tl.store(_rows(DV + row0 * D, kpos, H * D, D), dv.to(DV.dtype.element_ty))

    @triton.jit
    def _dkdv_upper(Q, K, V, DO, LSE, DELTA, DK, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                    T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BN: tl.constexpr,
                    BM: tl.constexpr, D: tl.constexpr):
        b, h, row0 = _bh(T, H)
        k, x0, kpos = _class_tile(tl.program_id(1), T, h, BN, N_BR)
        if _any_level(x0, h, k, L, N_BR, CAUSAL, 1):
            kk = tl.load(_rows(_head(K, b, h, skb, skh), kpos, skt, D))
            vv = tl.load(_rows(_head(V, b, h, svb, svh), kpos, svt, D))
            qp = _head(Q, b, h, sqb, sqh)
            dop = _head(DO, b, h, sdb, sdh)
            dk = tl.zeros([BN, D], tl.float32)
            dv = tl.zeros([BN, D], tl.float32)
            for a in tl.static_range(2, N_BR + 1):
                live, start = _level_start(x0, h, a, L, CAUSAL, 1)
                if live & (a - 1 <= k):
                    dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, tl.zeros([BN], tl.float32), qp, dop, LSE + row0,
                                           DELTA + row0, sqt, sdt, H, start, 1 << (a - 1), L // 2 // BM, h, k,
                                           qk_scale, a, N_BR, False, BM, D)
            dk_rows = _rows(DK + row0 * D, kpos, H * D, D)
            dv_rows = _rows(DV + row0 * D, kpos, H * D, D)
            tl.store(dk_rows, (tl.load(dk_rows).to(tl.float32) + dk * scale).to(DK.dtype.element_ty))
            tl.store(dv_rows, (tl.load(dv_rows).to(tl.float32) + dv).to(DV.dtype.element_ty))


def _tiles(name: str, L: int, n: int) -> tuple[int, int, int, int]:
    """CONFIG[name] fitted to the layout: the rows tile the class positions of one L-segment
    (rows·2^(n−1) divides L) and the columns tile the rows (diagonal blocks) and L / 2."""
    rows, cols, warps, stages = CONFIG[name]
    rows = math.gcd(rows, L >> (n - 1))
    cols = math.gcd(max(cols, 1 << (n - 1)), rows)
    assert cols % (1 << (n - 1)) == 0, "column blocks must span whole periods of λ (layout() checks)"
    return rows, cols, warps, stages


def _strides(*xs: torch.Tensor) -> list[int]:
    """(B, T, H) strides of each (B, T, H, D) tensor, which must have a unit last stride."""
    assert all(x.stride(-1) == 1 for x in xs), "rows must be contiguous along D"
    return [s for x in xs for s in x.stride()[:3]]


def _launch(local, upper, name, x, n, args, meta, passes=("local", "upper")):
    """The local pass over (B·H, T / rows) tiles, then the upper one over the class tiles (a
    probe may time them apart with `passes`)."""
    B, T, H, _ = x.shape
    rows, cols, warps, stages = _tiles(name, meta["L"], n)
    tile = {"BM": rows, "BN": cols} if name != "dkdv" else {"BN": rows, "BM": cols}
    opts = dict(meta, N_BR=n, num_warps=warps, num_stages=stages, **tile)
    if "local" in passes:
        local[(B * H, T // rows)](*args, **opts)
    if n > 1 and "upper" in passes:
        upper[(B * H, T // 2 // rows)](*args, **opts)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, L: int, n: int, is_causal: bool, scale: float):
    """(out (B, T, H, D) in q's dtype, LSE (B, T, H) float32) of q/k/v (B, T, H, D) on layout (L, n)."""
    B, T, H, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = q.new_empty((B, T, H), dtype=torch.float32)
    args = (q, k, v, out, lse, *_strides(q, k, v), T, H, scale * LOG2E)
    _launch(_fwd_local, _fwd_upper, "fwd", q, n, args, dict(L=L, CAUSAL=is_causal, D=D))
    return out, lse


def backward(dout, q, k, v, out, lse, L: int, n: int, is_causal: bool, scale: float):
    """Exact (dq, dk, dv) (B, T, H, D) of forward, given its out and lse and dout (B, T, H, D)."""
    B, T, H, D = q.shape
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    delta = torch.empty_like(lse)
    meta = dict(L=L, CAUSAL=is_causal, D=D)
    strides = _strides(q, k, v, dout)
    _launch(_dq_local, _dq_upper, "dq", q, n,
            (q, k, v, dout, out, lse, delta, dq, *strides, T, H, scale * LOG2E, scale), meta)
    _launch(_dkdv_local, _dkdv_upper, "dkdv", q, n,
            (q, k, v, dout, lse, delta, dk, dv, *strides, T, H, scale * LOG2E, scale), meta)
    return dq, dk, dv
