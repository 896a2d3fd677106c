"""Probe: gluon_probe.py's forward split over two warpgroups by role (warp specialisation), as
FlashAttention-3 splits it, within one program of 8 warps.

The same problem and math as gluon_probe.py (attention inside segments, causal or not, a dilated
branch's rows read in place through the (B·T/R, R·H·D) view). A program takes 128 query rows:
each of two warpgroups (gl.warp_specialize's partitions) computes 64 of them (wgmma, softmax, the
O update) over one ring of 64-row K and V tiles, so each tile is loaded once for 128 queries and
the two warpgroups' matmuls interleave on the tensor cores while either runs its softmax. Ready
barriers complete on a TMA's bytes; empty barriers on two arrivals, one a warpgroup, each made
after that warpgroup's QKᵀ (for K) or PV (for V) retired. The first warpgroup also refills the
ring, one tile behind its own releases (K_j's stage takes K_{j+STAGES}, V_{j−2}'s V_{j−2+STAGES}:
3 stages or more). Causal, the second warpgroup has one tile more (its diagonal); the first
releases it unread once it has landed, which keeps each barrier's arrivals in their phase.

Why not a producer warp: Triton counts its partition as a warpgroup, so 12 warps share an SM's
registers (168 a thread) and ptxas serialised every wgmma (C7512); and a 64-row warpgroup with a
producer warp, measured, ran at under half the plain kernel's rate (docs/lab/runs.md).

`python tools/kernels/gluon_ws_probe.py [--lengths ...] [--segments ...] [--rates ...]`: checks
against the float32 reference of gluon_probe.py, then times this kernel, gluon_probe.py's and
cuDNN in one process. CUDA with compute capability 9.0 only.
"""
import argparse
import math

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_init, warpgroup_mma_wait)

import gluon_probe
from gluon_probe import (LOG2E, _barriers, _buffers, _diagonal, _finish, _softmax, _tile, _weights, check, descriptors,
                         mma_layout, sweep)

# The second warpgroup's registers a thread: a program's 8 warps share an SM's 65,536 registers.
WORKER_REGS = gl.constexpr(248)


@gluon.jit
def _reload(desc, smem, ready, empty, t, n_all, row, lo, col):
    """Tile t (t < n_all) into its stage, t mod STAGES, once both warpgroups released the tile
    before it there (the first pass waits on the phase before a fresh barrier's: it passes)."""
    STAGES: gl.constexpr = smem.shape[0]
    BN: gl.constexpr = desc.block_type.shape[0]
    go = t < n_all
    stage = t % STAGES
    mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1, pred=go)
    mbarrier.expect(ready.index(stage), desc.block_type.nbytes, pred=go)
    tma.async_copy_global_to_shared(desc, [row + lo + t * BN, col], ready.index(stage), smem.index(stage), pred=go)


@gluon.jit
def _compute(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, h, q0, lo, n, n_all, row,
             col, qk_scale, STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, LOADER: gl.constexpr,
             num_warps: gl.constexpr):
    """A warpgroup: gluon_probe._fwd's loop, releasing each stage; the LOADER warpgroup also
    refills them, one tile behind its own releases so as to wait on the other warpgroup's as
    little as possible: at tile j, K_j's stage takes K_{j+STAGES} and V_{j−2}'s takes V_{j−2+STAGES}.
    Returns O (unnormalised), the running max and sum (log2 domain)."""
    BM: gl.constexpr = q_smem.shape[0]
    D: gl.constexpr = q_smem.shape[1]
    BN: gl.constexpr = k_smem.shape[1]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = mma_layout(BN, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    mbarrier.wait(k_ready.index(0), 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
    mbarrier.arrive(k_empty.index(0))

    q_pos = q0 + gl.arange(0, BM, s_rows)
    bias = _weights(q_pos, lo, h, N_BR, BN) if N_BR > 1 else 0.0
    m_i = gl.full([BM], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([BM], gl.float32, s_rows)
    acc = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))
    p_op = gl.zeros([BM, BN], dtype, p_layout)
    for j in range(n - 1):
        stage = j % STAGES
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_ready.index(nxt), ((j + 1) // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p, alpha, m_i, l_i = _softmax(s_cur, bias, m_i, l_i, qk_scale, q_pos, q_pos, False, N_BR > 1)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))  # PV_{j−1} and S_{j+1} retire
        mbarrier.arrive(k_empty.index(nxt))
        mbarrier.arrive(v_empty.index((j + STAGES - 1) % STAGES), pred=j > 0)
        if LOADER:
            _reload(k_desc, k_smem, k_ready, k_empty, j + STAGES, n_all, row, lo, col)
            if j >= 2:
                _reload(v_desc, v_smem, v_ready, v_empty, j - 2 + STAGES, n_all, row, lo, col)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        s_cur = warpgroup_mma_wait(1, deps=(s_next,))

    acc, m_i, l_i = _diagonal(s_cur, bias, m_i, l_i, acc, p_op, v_smem, v_ready, qk_scale, q_pos, lo, n, STAGES,
                              CAUSAL, N_BR > 1)
    # Every wgmma retired: the last two V tiles are released too (the other warpgroup may still
    # need the producer to reuse their stages).
    mbarrier.arrive(v_empty.index((n + STAGES - 2) % STAGES), pred=n > 1)
    mbarrier.arrive(v_empty.index((n - 1) % STAGES))
    if LOADER:  # the tiles the loop did not reach, up to the other warpgroup's last
        for t in range(gl.maximum(n - 1, 0) + STAGES, n_all):
            _reload(k_desc, k_smem, k_ready, k_empty, t, n_all, row, lo, col)
        for t in range(gl.maximum(n - 3, 0) + STAGES, n_all):
            _reload(v_desc, v_smem, v_ready, v_empty, t, n_all, row, lo, col)
    return acc, m_i, l_i


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, o_desc, lse_ptr, h, q0, lo,
              n, n_all, row, col, R, off, H, qk_scale, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
              N_BR: gl.constexpr, LOADER: gl.constexpr, num_warps: gl.constexpr):
    """One warpgroup's 64 query rows from q0: its n key tiles, then the release of the tiles up to
    n_all it does not read (each once landed: the producer has then passed the phase before),
    then its O and LSE written."""
    acc, m_i, l_i = _compute(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, h, q0, lo, n,
                             n_all, row, col, qk_scale, STAGES, CAUSAL, N_BR, LOADER, num_warps)
    for j in range(n, n_all):
        mbarrier.wait(k_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(k_empty.index(j % STAGES))
        mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
        mbarrier.arrive(v_empty.index(j % STAGES))
    _finish(acc, m_i, l_i, q_smem, o_desc, lse_ptr, row, q0, col, R, off, H, h)


@gluon.jit
def _fwd_ws(q_desc, k_desc, v_desc, o_desc, lse_ptr, T, H, W, R, h0, nh, qk_scale,
            STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]  # a warpgroup's rows; the program's are 2·BM
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    gl.static_assert(BM == BN, "the diagonal tile is the last one")
    gl.static_assert(num_warps == 4, "a warpgroup a partition: see the module docstring")
    gl.static_assert(STAGES >= 3, "V is refilled two tiles behind its release")

    h, q0, lo, n, off, row, col = _tile(T, H, W, R, h0, nh, 2 * BM, D, CAUSAL)
    n0 = (q0 - lo) // BN + 1 if CAUSAL else W // BN  # the first warpgroup's key tiles
    n1 = n0 + 1 if CAUSAL else n0

    q_smem, k_smem, v_smem = _buffers(q_desc, k_desc, v_desc, STAGES)
    q_hi = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    q_bar = _barriers(1).index(0)
    k_ready, v_ready = _barriers(STAGES), _barriers(STAGES)
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):  # released by both warpgroups
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()  # the barriers' initialisation before the other warps use them
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row + q0, col], q_bar, q_smem)
    tma.async_copy_global_to_shared(q_desc, [row + q0 + BM, col], q_bar, q_hi)
    for t in gl.static_range(STAGES):
        _reload(k_desc, k_smem, k_ready, k_empty, t, n1, row, lo, col)
        _reload(v_desc, v_smem, v_ready, v_empty, t, n1, row, lo, col)
    mbarrier.wait(q_bar, 0)

    gl.warp_specialize([
        (_consumer, (q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, o_desc, lse_ptr, h,
                     q0, lo, n0, n1, row, col, R, off, H, qk_scale, STAGES, CAUSAL, N_BR, True, num_warps)),
        (_consumer, (q_hi, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, o_desc, lse_ptr, h,
                     q0 + BM, lo, n1, n1, row, col, R, off, H, qk_scale, STAGES, CAUSAL, N_BR, False, num_warps)),
    ], [4], [WORKER_REGS])


def forward(q, k, v, W: int, scale: float, stages: int = 3, R: int = 1, causal: bool = True, branches: int = 1):
    """gluon_probe.forward's result, by the warp-specialised kernel (128 query rows a program,
    64-row tiles)."""
    B, T, H, D = q.shape
    BM = 64
    assert T % W == 0 and W % (2 * BM * R) == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    descs = descriptors((q, k, v, out), R, BM)
    _fwd_ws[(T // R // (2 * BM), B * H)](*descs, lse, T // R, H, W // R, R, 0, H, scale * LOG2E, STAGES=stages,
                                          CAUSAL=causal, N_BR=branches, num_warps=4)
    return out, lse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 0], help="W per case; 0: W = T")
    p.add_argument("--rates", type=int, nargs="+", default=[1, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[3, 4])
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, causal = 12, not args.full
    scale = 1 / math.sqrt(64)
    check(lambda R: {f"{stages} stages": lambda q, k, v, W, R, stages=stages: forward(q, k, v, W, scale, stages, R,
                                                                                     causal)
                     for stages in args.stages}, args.rates, H, scale, causal)
    sweep(args.lengths, args.segments, args.rates, H, scale, causal, lambda q, k, v, packed, W, R: {
        "gluon 64x2": lambda: gluon_probe.forward(q, k, v, W, scale, 64, 2, R, causal),
        **{f"ws x{stages}": lambda stages=stages: forward(q, k, v, W, scale, stages, R, causal)
           for stages in args.stages}})


if __name__ == "__main__":
    main()
