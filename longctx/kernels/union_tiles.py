"""Where the union kernels' tiles and rows are (union_kernels.py has what they compute; union.py
the math, the layouts and the launches): λ and the weights' log2 terms, a tile's positions on the
local and upper passes, and pointers to rows.

Shapes: B batch, T sequence length, H heads, D head dim; positions are indices into T, and a
tile's rows are positions first + i·step.
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
    groups, as even as possible with earlier groups one larger (layout.head_groups)."""
    base = H // SPLIT
    big = H % SPLIT * (base + 1)  # heads in the larger groups
    return 1 << tl.where(h < big, h // (base + 1), H % SPLIT + (h - big) // base)


@triton.jit
def _local_tile(T, H, h, L: tl.constexpr, BM: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
                BY_SEGMENT: tl.constexpr):
    """Local-pass tile: its segment's first row, its own first row, the rows' step r (1 without
    head_split), and whether it is one of the head's T / (r·BM) tiles (the longest causal rows
    first). BY_SEGMENT (backward): a segment's tiles run consecutively, so L2 keeps the rows they
    share (tile-major kept the H100's DRAM 80-88% busy); else tile-major (the forward, where it was faster)."""
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
