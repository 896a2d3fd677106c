"""Probe: a Hopper attention forward in Gluon (TMA loads, asynchronous wgmma, the next tile's
QKᵀ in flight while this tile's softmax runs), against cuDNN on the same problem.

The problem is the union kernels' local pass without weights: attention inside segments of W
rows, causal (W = T: dense causal attention) or, with `--full`, not (the seed preset's), q/k/v
(B, T, H, D) as the LM block makes them. Head h may keep only the positions ≡ h (mod R) of each
segment (a dilated branch of rate R). The kernel reads its rows through one TMA descriptor per
tensor over the (B·T/R, R·H·D) view of the memory: a head's kept row is then one [rows, D] box at
column ((h mod R)·H + h)·D, read in place.

One program: a tile of BM queries and one head, a warp per 16 rows (BM = 128: two warpgroups
sharing the K/V stages). Per key tile j: wait for K_{j+1}, issue S_{j+1} = Q K_{j+1}ᵀ
(asynchronous), run the softmax of S_j, wait for both in-flight groups, rescale O, issue O +=
P_j V_j and leave it in flight through the next tile's QKᵀ issue and softmax.
K's stage is reloaded as soon as its QKᵀ retires, V's once its PV retires.

`python tools/kernels/gluon_probe.py [--lengths 32768 131072] [--segments 2048 0] [--rates 1 4] [--full]`
(W 0: W = T): checks the output and LSE against a float32 reference, then times the kernel on
the strided rows, the kernel on a contiguous copy of them, and cuDNN (SDPA on the copy's
segments) and prints TFLOP/s, counting 2·D per pair scored and head for each of the two matmuls.
Against the union kernels it would replace: gluon_compare.py.
CUDA with compute capability 9.0 only.
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

from longctx.kernels.hopper_kernels import _barriers, descriptors, mma_layout

LOG2E = 1.4426950408889634


@gluon.jit
def _weights(q_pos, k0, h, N_BR: gl.constexpr, BN: gl.constexpr):
    """The union kernels' level-1 weight terms of a (queries, BN keys) tile, log2 m with m =
    min(λ(x), λ(s)) + 1 (longctx/kernels/union.py): λ(x) counts the dilations 2 … 2^(N_BR−1)
    that keep x for head h. The same for every key tile: λ has period 2^(N_BR−1), which divides BN."""
    k_pos = k0 + gl.arange(0, BN, gl.SliceLayout(0, q_pos.type.layout.parent))
    lam_q = gl.zeros_like(q_pos)
    lam_k = gl.zeros_like(k_pos)
    for j in gl.static_range(1, N_BR):
        lam_q += (((q_pos ^ h) & ((1 << j) - 1)) == 0).to(gl.int32)
        lam_k += (((k_pos ^ h) & ((1 << j) - 1)) == 0).to(gl.int32)
    return gl.log2((gl.minimum(lam_q[:, None], lam_k[None, :]) + 1).to(gl.float32))


@gluon.jit
def _softmax(s, bias, m_i, l_i, qk_scale, q_pos, k_pos, MASK: gl.constexpr, WEIGHTS: gl.constexpr):
    """Online softmax of one score tile in the log2 domain, with the weight terms (bias) when
    WEIGHTS: (P, alpha, new max, new sum)."""
    s = s * qk_scale
    if WEIGHTS:
        s = s + bias
    if MASK:
        s = gl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    p = gl.exp2(s - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _tile(T, H, W, R, h0, nh, BM: gl.constexpr, D: gl.constexpr, CAUSAL: gl.constexpr):
    """This program's query tile: (head, first row q0, its segment's first row lo, key tiles n
    (causal: up to the diagonal; else the whole segment),
    the head's offset, the batch's first row in the (B·T/R, R·H·D) view, the head's column). T
    and W count a head's kept rows (positions ≡ h mod R): T / R and W / R of the layout's."""
    pid = T // BM - 1 - gl.program_id(0)  # the longest rows first
    bh = gl.program_id(1)  # (batch, one of heads h0 … h0 + nh − 1)
    b = bh // nh
    h = h0 + bh - b * nh
    q0 = pid * BM
    lo = q0 // W * W
    off = h % R  # the head's rows are positions off + j·R
    n = (q0 - lo) // BM + 1 if CAUSAL else W // BM
    return h, q0, lo, n, off, b * T, (off * H + h) * D


@gluon.jit
def _finish(acc, m_i, l_i, q_smem, o_desc, lse_ptr, row, q0, col, R, off, H, h):
    """Write O (through Q's buffer, free once every QKᵀ retired) and LSE in the natural log,
    (B, T, H) as the union kernels write it."""
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, acc.type.layout))[:, None]
    q_smem.store(acc.to(q_smem.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row + q0, col], q_smem)
    q_pos = q0 + gl.arange(0, q_smem.shape[0], m_i.type.layout)
    gl.store(lse_ptr + ((row + q_pos) * R + off) * H + h, (m_i + gl.log2(l_i)) / 1.4426950408889634)
    tma.store_wait(0)


@gluon.jit
def _diagonal(s_cur, bias, m_i, l_i, acc, p_op, v_smem, v_ready, qk_scale, q_pos, lo, n, STAGES: gl.constexpr,
              CAUSAL: gl.constexpr, WEIGHTS: gl.constexpr):
    """The last key tile (causal: on the diagonal, masked): O's last update, every wgmma retired.
    Returns O (unnormalised), the running max and sum."""
    BN: gl.constexpr = v_smem.shape[1]
    last = n - 1
    k_pos = lo + last * BN + gl.arange(0, BN, gl.SliceLayout(0, s_cur.type.layout))
    p, alpha, m_i, l_i = _softmax(s_cur, bias, m_i, l_i, qk_scale, q_pos, k_pos, CAUSAL, WEIGHTS)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]
    p_op = gl.convert_layout(p.to(p_op.dtype), p_op.type.layout)
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
    return acc, m_i, l_i


@gluon.jit
def _buffers(q_desc, k_desc, v_desc, STAGES: gl.constexpr):
    """Shared memory for the program's Q tile and STAGES K and V tiles, in the TMA boxes' layouts."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    return q_smem, k_smem, v_smem


@gluon.jit
def _fwd(q_desc, k_desc, v_desc, o_desc, lse_ptr, T, H, W, R, h0, nh, qk_scale,
         STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    gl.static_assert(BM == BN, "the diagonal tile is the last one")
    dtype: gl.constexpr = q_desc.dtype

    h, q0, lo, n, off, row, col = _tile(T, H, W, R, h0, nh, BM, D, CAUSAL)

    s_layout: gl.constexpr = mma_layout(BN, num_warps)
    o_layout: gl.constexpr = mma_layout(D, num_warps)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem, k_smem, v_smem = _buffers(q_desc, k_desc, v_desc, STAGES)
    q_bar = _barriers(1).index(0)
    k_bar = _barriers(STAGES)
    v_bar = _barriers(STAGES)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row + q0, col], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        go = i < n
        mbarrier.expect(k_bar.index(i), k_desc.block_type.nbytes, pred=go)
        tma.async_copy_global_to_shared(k_desc, [row + lo + i * BN, col], k_bar.index(i), k_smem.index(i), pred=go)
        mbarrier.expect(v_bar.index(i), v_desc.block_type.nbytes, pred=go)
        tma.async_copy_global_to_shared(v_desc, [row + lo + i * BN, col], v_bar.index(i), v_smem.index(i), pred=go)

    zero_s = gl.zeros([BM, BN], gl.float32, s_layout)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s_cur = warpgroup_mma(q_smem, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s_cur = warpgroup_mma_wait(0, deps=(s_cur,))
    # K_0 has been read: its stage takes K_STAGES.
    go = STAGES < n
    mbarrier.expect(k_bar.index(0), k_desc.block_type.nbytes, pred=go)
    tma.async_copy_global_to_shared(k_desc, [row + lo + STAGES * BN, col], k_bar.index(0), k_smem.index(0), pred=go)

    q_pos = q0 + gl.arange(0, BM, s_rows)
    bias = _weights(q_pos, lo, h, N_BR, BN) if N_BR > 1 else 0.0  # N_BR > 1: the long preset's local pass
    m_i = gl.full([BM], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([BM], gl.float32, s_rows)
    acc = warpgroup_mma_init(gl.zeros([BM, D], gl.float32, o_layout))  # the loop carries O as in flight
    p_op = gl.zeros([BM, BN], dtype, p_layout)
    for j in range(n - 1):
        stage = j % STAGES
        nxt = (j + 1) % STAGES
        mbarrier.wait(k_bar.index(nxt), ((j + 1) // STAGES) & 1)
        s_next = warpgroup_mma(q_smem, k_smem.index(nxt).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        p, alpha, m_i, l_i = _softmax(s_cur, bias, m_i, l_i, qk_scale, q_pos, q_pos, False, N_BR > 1)
        # O's update from tile j − 1 retires (p_op stays alive until then), and S_{j+1}, issued
        # before the softmax, with it: waiting for only the older group (num_outstanding=1)
        # makes ptxas serialise every wgmma (C7514: O's registers read inside a pipeline stage).
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        if j > 0:  # V_{j−1} has been read: its stage takes V_{j−1+STAGES}
            prev = (j - 1) % STAGES
            go = j - 1 + STAGES < n
            mbarrier.expect(v_bar.index(prev), v_desc.block_type.nbytes, pred=go)
            tma.async_copy_global_to_shared(v_desc, [row + lo + (j - 1 + STAGES) * BN, col], v_bar.index(prev),
                                            v_smem.index(prev), pred=go)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_bar.index(stage), (j // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        s_cur = warpgroup_mma_wait(1, deps=(s_next,))  # retired already: O's update stays in flight
        # K_{j+1} has been read: its stage takes K_{j+1+STAGES}.
        go = j + 1 + STAGES < n
        mbarrier.expect(k_bar.index(nxt), k_desc.block_type.nbytes, pred=go)
        tma.async_copy_global_to_shared(k_desc, [row + lo + (j + 1 + STAGES) * BN, col], k_bar.index(nxt),
                                        k_smem.index(nxt), pred=go)

    acc, m_i, l_i = _diagonal(s_cur, bias, m_i, l_i, acc, p_op, v_smem, v_bar, qk_scale, q_pos, lo, n, STAGES, CAUSAL,
                              N_BR > 1)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))
    _finish(acc, m_i, l_i, q_smem, o_desc, lse_ptr, row, q0, col, R, off, H, h)


def forward(q, k, v, W: int, scale: float, BM: int = 128, stages: int = 2, R: int = 1, causal: bool = True,
            branches: int = 1, heads: range | None = None, out=None, lse=None):
    """(out, lse) of attention inside segments of W rows (causal or not), head h keeping the positions
    ≡ h (mod R) of each (a dilated branch; the rest of out and lse is left unwritten); q/k/v
    (B, T, H, D) contiguous. BM rows a tile (queries and keys alike), one warp per 16 of them.
    branches > 1: the scores get the union kernels' level-1 weight terms of LongNet's layout of
    that many branches with W as its first segment: the union forward's local pass. heads: run
    only these (contiguous) heads, writing into out and lse if given (head_split's branches)."""
    B, T, H, D = q.shape
    assert T % W == 0 and W % (BM * R) == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device) if lse is None else lse
    heads = heads or range(H)
    descs = descriptors((q, k, v, out), R, BM)
    _fwd[(T // R // BM, B * len(heads))](*descs, lse, T // R, H, W // R, R, heads.start, len(heads), scale * LOG2E,
                                         STAGES=stages, CAUSAL=causal, N_BR=branches, num_warps=BM // 16)
    return out, lse


def segments_sdpa(q, k, v, W: int, scale: float, backend=None, causal: bool = True):
    """SDPA's attention on the (B·T/W, H, W, D) segments: (out (B, T, H, D), None)."""
    B, T, H, D = q.shape
    seg = [x.reshape(B * T // W, W, H, D).transpose(1, 2) for x in (q, k, v)]
    if backend is None:
        out = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale)
        return out.transpose(1, 2).reshape(B, T, H, D), None
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(B, T, H, D), None


def reference(q, k, v, W: int, scale: float, causal: bool = True):
    """float32 output and LSE by the definition, segment by segment."""
    B, T, H, D = q.shape
    qs, ks, vs = (x.float().reshape(B * T // W, W, H, D).transpose(1, 2) for x in (q, k, v))
    s = qs @ ks.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(W, W, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ vs
    return out.transpose(1, 2).reshape(B, T, H, D), lse.transpose(1, 2).reshape(B, T, H)


def kept(x, R: int):
    """The rows each head keeps at rate R, (B, T/R, H, D): x[:, j·R + h mod R, h]."""
    B, T, H, D = x.shape
    h = torch.arange(H, device=x.device)
    return x[:, torch.arange(0, T, R, device=x.device)[:, None] + h % R, h]


def pairs(T: int, W: int, R: int, causal: bool) -> float:
    """(query, key) pairs a head scores: its T/R kept rows in segments of W/R, each segment dense."""
    w = W // R
    return T // W * (w * (w + 1) / 2 if causal else w * w)


def timed(fn, reps: int = 10, calls: int = 10, graph: bool = False) -> float:
    """Median over reps of the mean milliseconds of `calls` back-to-back calls (the launches
    queue ahead of the GPU, so host time between kernels is hidden where the GPU work is the
    longer), after two warm-up calls. graph: the calls captured in one CUDA graph and replayed,
    which leaves no host time at all (short launches: the seed layout's)."""
    fn(), fn()
    run = lambda: [fn() for _ in range(calls)]
    if graph:
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        run = g.replay
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def check(kernels, rates, H: int, scale: float, causal: bool) -> None:
    """Exactness first, on a small case with several segments and tiles (B = 2, T = 1,024, W =
    512): for each rate R, each of kernels(R), {label: fn(q, k, v, W, R) -> (out, lse)}, against
    the float32 reference on the rows each head keeps."""
    q, k, v = (torch.randn(2, 1024, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for R in rates:
        ref_out, ref_lse = reference(*(kept(x, R) for x in (q, k, v)), 512 // R, scale, causal)
        for label, fn in kernels(R).items():
            out, lse = fn(q, k, v, 512, R)
            print(f"check rate {R}, {label}: max |out - ref| {(kept(out, R).float() - ref_out).abs().max().item():.2e}, "
                  f"max |lse - ref| {(kept(lse[..., None], R)[..., 0] - ref_lse).abs().max().item():.2e}", flush=True)


def sweep(lengths, segments, rates, H: int, scale: float, causal: bool, cells) -> None:
    """For each length T, segment W (0: W = T) and rate R, times cuDNN on SDPA over contiguous
    copies of the kept rows' segments and cells(q, k, v, packed, W, R), {label: fn}, in one
    process, and prints each one's TFLOP/s."""
    for T in lengths:
        q, k, v = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for W in segments:
            W = W or T
            for R in rates:
                # A head keeps T/R rows in segments of W/R: its pairs are those of dense attention there.
                flops = pairs(T, W, R, causal) * 4 * 64 * H
                packed = [kept(x, R).contiguous() for x in (q, k, v)]
                fns = {"cudnn": lambda: segments_sdpa(*packed, W // R, scale, SDPBackend.CUDNN_ATTENTION, causal),
                       **cells(q, k, v, packed, W, R)}
                ms = {name: timed(fn) for name, fn in fns.items()}
                line = ", ".join(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF/s" for name, t in ms.items())
                print(f"T={T} W={W} R={R}: {line}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 0], help="W per case; 0: W = T")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--rates", type=int, nargs="+", default=[1, 4],
                   help="dilation rates: each is timed on its strided rows and, as cuDNN is, on a contiguous copy of them")
    p.add_argument("--configs", nargs="+", default=["128x2", "128x3", "64x2", "64x3"],
                   help="tiles as ROWSxSTAGES")
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, causal = args.heads, not args.full
    scale = 1 / math.sqrt(64)
    configs = [tuple(map(int, c.split("x"))) for c in args.configs]
    check(lambda R: {f"{BM}x{stages}": lambda q, k, v, W, R, BM=BM, stages=stages: forward(q, k, v, W, scale, BM,
                                                                                        stages, R, causal)
                     for BM, stages in configs if 512 % (BM * R) == 0}, args.rates, H, scale, causal)

    def cells(q, k, v, packed, W, R):
        out = {}
        for BM, stages in configs:
            out[f"gluon {BM}x{stages}"] = lambda BM=BM, stages=stages: forward(q, k, v, W, scale, BM, stages, R, causal)
            if R > 1:
                out[f"packed {BM}x{stages}"] = lambda BM=BM, stages=stages: forward(*packed, W // R, scale, BM, stages,
                                                                                      1, causal)
        return out

    sweep(args.lengths, args.segments, args.rates, H, scale, causal, cells)


if __name__ == "__main__":
    main()
