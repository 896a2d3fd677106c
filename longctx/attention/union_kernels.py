"""The union kernels' Triton code (union.py has the math, the layouts and the launches).

Shapes: B batch, T sequence length, H heads, D head dim; LSE (B, T, H) float32, and the
backward's STATS (2, B·H, T) float32: log2 LSE and Δ, contiguous in T, which the dQ local pass
writes for the passes after it (the dK/dV loops read a block of each per iteration: contiguous,
they cost ~100 instructions a block fewer than LSE's stride-H rows, run 96). The loops step
their row pointers by one block rather than recomputing them from the positions (the dQ and
dK/dV loops 8–20% fewer instructions; not the forward's, whose masked loop then spills).
Every kernel's grid is (B·H, tiles); positions are indices into T, and a tile's rows are positions
first + i·step. Under head_split (SPLIT branches, each head in one) every head runs one branch of
dilation r = 2^branch: its local tiles step by r, and the programs past its tiles zero the rows
it does not keep (output 0, LSE −inf, zero gradients: DESIGN §3), so no buffer needs clearing.
"""
import triton
import triton.language as tl


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
    """Online softmax of a query tile over n_blocks blocks of BN keys at start + i·step. (Tried
    and left out: the row max of the raw scores where there are no weights, FlashAttention's
    order, no faster at 8K, runs 76-77; moving the running max only when a row's grew by 2^8,
    to skip most rescales, 8% slower at 64K, run 83.)"""
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
def _stats(STATS, T):
    """This program's rows of the backward's statistics, STATS (2, B·H, T) float32: pointers to
    its log2 LSE and its Δ at position 0 (the dQ local pass writes both, contiguous in T)."""
    lse2 = STATS + tl.program_id(0).to(tl.int64) * T
    return lse2, lse2 + tl.num_programs(0).to(tl.int64) * T


@triton.jit
def _branch_stride(h, H, SPLIT: tl.constexpr):
    """Head h's dilation 2^i under head_split: branch i's heads are the i-th of SPLIT contiguous
    groups, as even as possible with earlier groups one larger (branches.head_groups)."""
    base = H // SPLIT
    big = H % SPLIT * (base + 1)  # heads in the larger groups
    return 1 << tl.where(h < big, h // (base + 1), H % SPLIT + (h - big) // base)


@triton.jit
def _local_tile(T, H, h, L: tl.constexpr, BM: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                BY_SEGMENT: tl.constexpr):
    """Local-pass tile: its segment's first row, its own first row, the rows' step r (1 without
    head_split), and whether it is one of the head's T / (r·BM) tiles (the longest causal rows
    first). BY_SEGMENT (backward): a segment's tiles run consecutively, so L2 keeps the rows they
    share (tile-major kept the H100's DRAM 80-88% busy, run 101); else tile-major (forward, runs 102-104)."""
    r = 1
    if SPLIT > 0:
        r = _branch_stride(h, H, SPLIT)
    nseg = T // (L * r)
    i = tl.program_id(1)
    t = i % (L // BM) if BY_SEGMENT else i // nseg
    if CAUSAL:
        t = L // BM - 1 - t
    seg0 = (i // (L // BM) if BY_SEGMENT else i % nseg) * (L * r) + h % r
    return seg0, seg0 + t * BM * r, r, i < nseg * (L // BM)


@triton.jit
def _unkept(T, h, r, BM: tl.constexpr):
    """The BM positions that a program past the head's tiles zeroes: its share of the T·(r−1)/r
    positions ≢ h (mod r), in order (for r = 1 there are none and no such program)."""
    u = (tl.program_id(1) - T // (r * BM)) * BM + tl.arange(0, BM)
    other = tl.maximum(r - 1, 1)
    o = u % other
    return u // other * r + o + (o >= h % r).to(tl.int32)


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
def _dq_local(Q, K, V, DO, O, LSE, STATS, DQ, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, T, H,
              qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
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
        tl.store(_rows(DQ + row0 * D, qpos, H * D, D), (dq * scale).to(DQ.dtype.element_ty))
    elif SPLIT > 0:
        tl.store(_rows(DQ + row0 * D, _unkept(T, h, r, BM), H * D, D), tl.zeros([BM, D], DQ.dtype.element_ty))


@triton.jit
def _dq_upper(Q, K, V, DO, O, LSE, STATS, DQ, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh, T, H,
              qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, D: tl.constexpr):
    b, h, row0 = _bh(T, H)
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
        dq_rows = _rows(DQ + row0 * D, qpos, H * D, D)
        tl.store(dq_rows, (tl.load(dq_rows).to(tl.float32) + dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _dkdv_local(Q, K, V, DO, STATS, DK, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr,
                SPLIT: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, D: tl.constexpr):
    b, h, row0 = _bh(T, H)
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
        tl.store(_rows(DK + row0 * D, kpos, H * D, D), (dk * scale).to(DK.dtype.element_ty))
        tl.store(_rows(DV + row0 * D, kpos, H * D, D), dv.to(DV.dtype.element_ty))
    elif SPLIT > 0:
        pos = _unkept(T, h, r, BN)
        tl.store(_rows(DK + row0 * D, pos, H * D, D), tl.zeros([BN, D], DK.dtype.element_ty))
        tl.store(_rows(DV + row0 * D, pos, H * D, D), tl.zeros([BN, D], DV.dtype.element_ty))


@triton.jit
def _dkdv_upper(Q, K, V, DO, STATS, DK, DV, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdb, sdt, sdh,
                T, H, qk_scale, scale, L: tl.constexpr, N_BR: tl.constexpr, CAUSAL: tl.constexpr, BN: tl.constexpr,
                BM: tl.constexpr, D: tl.constexpr):
    b, h, row0 = _bh(T, H)
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
        dk_rows = _rows(DK + row0 * D, kpos, H * D, D)
        dv_rows = _rows(DV + row0 * D, kpos, H * D, D)
        tl.store(dk_rows, (tl.load(dk_rows).to(tl.float32) + dk * scale).to(DK.dtype.element_ty))
        tl.store(dv_rows, (tl.load(dv_rows).to(tl.float32) + dv).to(DV.dtype.element_ty))


# Each direction's (local, upper) kernels, by the name union.CONFIG tunes them under.
KERNELS = {"fwd": (_fwd_local, _fwd_upper), "dq": (_dq_local, _dq_upper), "dkdv": (_dkdv_local, _dkdv_upper)}
