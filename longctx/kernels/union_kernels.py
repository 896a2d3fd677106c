"""The union kernels' Triton code (union.py has the math, the layouts and the launches).

Shapes: B batch, T sequence length, H heads, D head dim; LSE (B, T, H) float32, and the
backward's STATS (2, B·H, T) float32: log2 LSE and Δ, contiguous in T, which the dQ local pass
writes for the passes after it (the dK/dV loops read a block of each per iteration: contiguous,
they cost ~100 instructions a block fewer than LSE's stride-H rows). The loops step
their row pointers by one block rather than recomputing them from the positions (the dQ and
dK/dV loops 8–20% fewer instructions; not the forward's, whose masked loop then spills).
Every kernel's grid is (B·H, tiles); positions are indices into T, and a tile's rows are positions
first + i·step. Under head_split (SPLIT branches, each head in one) every head runs one branch of
dilation r = 2^branch: its local tiles step by r, and the programs past its tiles zero the rows
it does not keep (output 0, LSE −inf, zero gradients: docs/design.md#the-merge-longnet-eq-10), so no buffer needs clearing.
The backward writes dQ, dK and dV through one set of strides (sgb, sgt, sgh: separate tensors,
or the slots of one packed gradient) and, with ROPE, rotates dQ and dK back first (_put). Where
tiles and rows are is in union_tiles.py.
"""
import triton
import triton.language as tl

from .union_tiles import (_any_level, _bh, _class_tile, _col_weights, _head, _lam, _level_start, _local_tile, _rows,
                          _stats, _unkept, _wlog)


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
    """Online softmax of a query tile over n_blocks blocks of BN keys at start + i·step. (Tried
    and left out: the row max of the raw scores where there are no weights, FlashAttention's
    order, no faster at 8K; moving the running max only when a row's grew by 2^8, to skip most
    rescales, 8% slower at 64K.)"""
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
    kpos = start + tl.arange(0, BN) * step
    k_rows = _rows(kp, kpos, sk, D)
    v_rows = _rows(vp, kpos, sv, D)
    for i in range(n_blocks):
        kk = tl.load(k_rows)
        p = tl.math.exp2(_scores(q, kk, qpos, kpos, q_w, k_w, qk_scale, LEVEL, N_BR, MASK, True) - lse2[:, None])
        dp = tl.dot(do, tl.trans(tl.load(v_rows)))
        dq += tl.dot((p * (dp - delta[:, None])).to(kk.dtype), kk)
        kpos += BN * step
        k_rows += BN * step * sk
        v_rows += BN * step * sv
    return dq


@triton.jit
def _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, lse2p, deltap, sq, sdo, start, step, n_blocks, h, k,
                  qk_scale, LEVEL: tl.constexpr, N_BR: tl.constexpr, MASK: tl.constexpr, BM: tl.constexpr,
                  D: tl.constexpr):
    """dK (unscaled) and dV of a key tile over n_blocks blocks of BM queries at start + i·step."""
    q_w = _col_weights(start, step, h, k, LEVEL, N_BR, BM)
    qpos = start + tl.arange(0, BM) * step
    q_rows = _rows(qp, qpos, sq, D)
    do_rows = _rows(dop, qpos, sdo, D)
    for i in range(n_blocks):
        qq = tl.load(q_rows)
        do = tl.load(do_rows)
        p = tl.math.exp2(_scores(kk, qq, kpos, qpos, k_w, q_w, qk_scale, LEVEL, N_BR, MASK, False)
                         - tl.load(lse2p + qpos)[None, :])
        dv += tl.dot(p.to(qq.dtype), do)
        dp = tl.dot(vv, tl.trans(do))
        dk += tl.dot((p * (dp - tl.load(deltap + qpos)[None, :])).to(qq.dtype), qq)
        qpos += BM * step
        q_rows += BM * step * sq
        do_rows += BM * step * sdo
    return dk, dv


@triton.jit
def _fwd_local(Q, K, V, O, LSE, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, T, H, qk_scale,
               L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, D: tl.constexpr):
    b, h, row0 = _bh(T, H)
    seg0, x0, r, live = _local_tile(T, H, h, L, BM, CAUSAL, SPLIT, False)
    if live:
        qpos = x0 + tl.arange(0, BM) * r
        kp = _head(K, b, h, skb, skh)
        vp = _head(V, b, h, svb, svh)
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
        q_w = _wlog(_lam(qpos, h, N_BR), 1)
        acc = tl.zeros([BM, D], tl.float32)
        m_i = tl.full([BM], float("-inf"), tl.float32)
        l_i = tl.zeros([BM], tl.float32)
        if CAUSAL:
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, x0, r, BM // BN, h, 0,
                                      qk_scale, 1, N_BR, True, BN, D)
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, seg0, r, (x0 - seg0) // r // BN,
                                      h, 0, qk_scale, 1, N_BR, False, BN, D)
        else:
            acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, qpos, q_w, kp, vp, skt, svt, seg0, r, L // BN, h, 0,
                                      qk_scale, 1, N_BR, False, BN, D)
        tl.store(_rows(O + row0 * D, qpos, H * D, D), (acc / l_i[:, None]).to(O.dtype.element_ty))
        tl.store(LSE + row0 + qpos.to(tl.int64) * H, (m_i + tl.log2(l_i)) / 1.4426950408889634)
    elif SPLIT > 0:
        pos = _unkept(T, h, r, BM)
        tl.store(_rows(O + row0 * D, pos, H * D, D), tl.zeros([BM, D], O.dtype.element_ty))
        tl.store(LSE + row0 + pos.to(tl.int64) * H, tl.full([BM], float("-inf"), tl.float32))


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
def _put(ptr, pos, row_stride, g, COS, SIN, ADD: tl.constexpr, ROPE: tl.constexpr, R: tl.constexpr, D: tl.constexpr):
    """Write float32 gradient rows g (R, D) at positions pos of a (T, D) slice with row stride, or
    add them to the rows there (ADD, the upper passes). ROPE: rotate them back by RoPE's angles at
    pos first, which makes them the gradient of the unrotated input (attention/rotary.py rotates
    q and k inside the op): (g1·cos + g2·sin, g2·cos − g1·sin) of g's halves, with COS and SIN
    (T, D/2) float32. A rotation is linear, so the local pass's rows and the upper pass's sum
    rotate alike. Costs 0.03-0.04 ms a layer at 32K on an H100, after the loop."""
    if ROPE:
        g1, g2 = tl.split(tl.permute(tl.reshape(g, (R, 2, D // 2)), (0, 2, 1)))
        half = pos.to(tl.int64)[:, None] * (D // 2) + tl.arange(0, D // 2)[None, :]
        c = tl.load(COS + half)
        s = tl.load(SIN + half)
        first = ptr + pos.to(tl.int64)[:, None] * row_stride + tl.arange(0, D // 2)[None, :]
        g1, g2 = g1 * c + g2 * s, g2 * c - g1 * s
        if ADD:
            g1 += tl.load(first).to(tl.float32)
            g2 += tl.load(first + D // 2).to(tl.float32)
        tl.store(first, g1.to(ptr.dtype.element_ty))
        tl.store(first + D // 2, g2.to(ptr.dtype.element_ty))
    else:
        rows = _rows(ptr, pos, row_stride, D)
        if ADD:
            g += tl.load(rows).to(tl.float32)
        tl.store(rows, g.to(ptr.dtype.element_ty))


@triton.jit
def _dq_local(Q, K, V, DO, O, LSE, STATS, DQ, COS, SIN, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
              sgb, sgt, sgh, T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr,
              SPLIT: tl.constexpr, ROPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    b, h, row0 = _bh(T, H)
    seg0, x0, r, live = _local_tile(T, H, h, L, BM, CAUSAL, SPLIT, True)
    if live:
        qpos = x0 + tl.arange(0, BM) * r
        kp = _head(K, b, h, skb, skh)
        vp = _head(V, b, h, svb, svh)
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
        do = tl.load(_rows(_head(DO, b, h, sdb, sdh), qpos, sdt, D))
        lse2p, deltap = _stats(STATS, T)
        delta = tl.sum(do.to(tl.float32) * tl.load(_rows(O + row0 * D, qpos, H * D, D)).to(tl.float32), 1)
        lse2 = tl.load(LSE + row0 + qpos.to(tl.int64) * H) * 1.4426950408889634
        tl.store(deltap + qpos, delta)
        tl.store(lse2p + qpos, lse2)
        q_w = _wlog(_lam(qpos, h, N_BR), 1)
        dq = tl.zeros([BM, D], tl.float32)
        if CAUSAL:
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, x0, r, BM // BN, h, 0, qk_scale,
                          1, N_BR, True, BN, D)
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, seg0, r, (x0 - seg0) // r // BN, h, 0,
                          qk_scale, 1, N_BR, False, BN, D)
        else:
            dq = _dq_keys(dq, q, do, lse2, delta, qpos, q_w, kp, vp, skt, svt, seg0, r, L // BN, h, 0, qk_scale,
                          1, N_BR, False, BN, D)
        _put(_head(DQ, b, h, sgb, sgh), qpos, sgt, dq * scale, COS, SIN, False, ROPE, BM, D)
    elif SPLIT > 0:
        tl.store(_rows(_head(DQ, b, h, sgb, sgh), _unkept(T, h, r, BM), sgt, D), tl.zeros([BM, D], DQ.dtype.element_ty))


@triton.jit
def _dq_upper(Q, K, V, DO, O, LSE, STATS, DQ, COS, SIN, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
              sgb, sgt, sgh, T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr,
              ROPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    b, h, _ = _bh(T, H)
    k, x0, qpos = _class_tile(tl.program_id(1), T, h, BM, N_BR)
    if _any_level(x0, h, k, L, N_BR, CAUSAL, 0):
        kp = _head(K, b, h, skb, skh)
        vp = _head(V, b, h, svb, svh)
        q = tl.load(_rows(_head(Q, b, h, sqb, sqh), qpos, sqt, D))
        do = tl.load(_rows(_head(DO, b, h, sdb, sdh), qpos, sdt, D))
        lse2p, deltap = _stats(STATS, T)
        delta = tl.load(deltap + qpos)
        lse2 = tl.load(lse2p + qpos)
        dq = tl.zeros([BM, D], tl.float32)
        for a in tl.static_range(2, N_BR + 1):
            live, start = _level_start(x0, h, a, L, CAUSAL, 0)
            if live & (a - 1 <= k):
                dq = _dq_keys(dq, q, do, lse2, delta, qpos, tl.zeros([BM], tl.float32), kp, vp, skt, svt, start,
                              1 << (a - 1),
                              L // 2 // BN, h, k, qk_scale, a, N_BR, False, BN, D)
        _put(_head(DQ, b, h, sgb, sgh), qpos, sgt, dq * scale, COS, SIN, True, ROPE, BM, D)


@triton.jit
def _dkdv_local(Q, K, V, DO, STATS, DK, DV, COS, SIN, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                sgb, sgt, sgh, T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr,
                SPLIT: tl.constexpr, ROPE: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    b, h, _ = _bh(T, H)
    seg0, x0, r, live = _local_tile(T, H, h, L, BN, False, SPLIT, True)
    if live:
        kpos = x0 + tl.arange(0, BN) * r
        kk = tl.load(_rows(_head(K, b, h, skb, skh), kpos, skt, D))
        vv = tl.load(_rows(_head(V, b, h, svb, svh), kpos, svt, D))
        qp = _head(Q, b, h, sqb, sqh)
        dop = _head(DO, b, h, sdb, sdh)
        lse2p, deltap = _stats(STATS, T)
        k_w = _wlog(_lam(kpos, h, N_BR), 1)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        if CAUSAL:
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, lse2p, deltap, sqt, sdt, x0, r,
                                   BN // BM, h, 0, qk_scale, 1, N_BR, True, BM, D)
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, lse2p, deltap, sqt, sdt,
                                   x0 + BN * r, r, (L - (x0 - seg0) // r - BN) // BM, h, 0, qk_scale, 1, N_BR, False,
                                   BM, D)
        else:
            dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, k_w, qp, dop, lse2p, deltap, sqt, sdt, seg0,
                                   r, L // BM, h, 0, qk_scale, 1, N_BR, False, BM, D)
        _put(_head(DK, b, h, sgb, sgh), kpos, sgt, dk * scale, COS, SIN, False, ROPE, BN, D)
        _put(_head(DV, b, h, sgb, sgh), kpos, sgt, dv, COS, SIN, False, False, BN, D)
    elif SPLIT > 0:
        pos = _unkept(T, h, r, BN)
        tl.store(_rows(_head(DK, b, h, sgb, sgh), pos, sgt, D), tl.zeros([BN, D], DK.dtype.element_ty))
        tl.store(_rows(_head(DV, b, h, sgb, sgh), pos, sgt, D), tl.zeros([BN, D], DV.dtype.element_ty))


@triton.jit
def _dkdv_upper(Q, K, V, DO, STATS, DK, DV, COS, SIN, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                sgb, sgt, sgh, T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr,
                ROPE: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    b, h, _ = _bh(T, H)
    k, x0, kpos = _class_tile(tl.program_id(1), T, h, BN, N_BR)
    if _any_level(x0, h, k, L, N_BR, CAUSAL, 1):
        kk = tl.load(_rows(_head(K, b, h, skb, skh), kpos, skt, D))
        vv = tl.load(_rows(_head(V, b, h, svb, svh), kpos, svt, D))
        qp = _head(Q, b, h, sqb, sqh)
        dop = _head(DO, b, h, sdb, sdh)
        lse2p, deltap = _stats(STATS, T)
        dk = tl.zeros([BN, D], tl.float32)
        dv = tl.zeros([BN, D], tl.float32)
        for a in tl.static_range(2, N_BR + 1):
            live, start = _level_start(x0, h, a, L, CAUSAL, 1)
            if live & (a - 1 <= k):
                dk, dv = _dkdv_queries(dk, dv, kk, vv, kpos, tl.zeros([BN], tl.float32), qp, dop, lse2p,
                                       deltap, sqt, sdt, start, 1 << (a - 1), L // 2 // BM, h, k,
                                       qk_scale, a, N_BR, False, BM, D)
        _put(_head(DK, b, h, sgb, sgh), kpos, sgt, dk * scale, COS, SIN, True, ROPE, BN, D)
        _put(_head(DV, b, h, sgb, sgh), kpos, sgt, dv, COS, SIN, True, False, BN, D)


# Each direction's (local, upper) kernels, by the name union.CONFIG tunes them under.
KERNELS = {"fwd": (_fwd_local, _fwd_upper), "dq": (_dq_local, _dq_upper), "dkdv": (_dkdv_local, _dkdv_upper)}
