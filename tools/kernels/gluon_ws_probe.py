"""Probe: gluon_probe.py's forward with its loads moved to a producer warp (warp specialisation).

The same problem and math as gluon_probe.py (attention inside segments, causal or not, a dilated
branch's rows read in place through the (B·T/R, R·H·D) view). Here one warpgroup computes (64
query rows: wgmma, softmax, the O update) and one extra warp only issues the TMA loads of K and V
into a ring of stages. The two hand stages back and forth through mbarriers: ready (the TMA's
bytes landed) and empty (the warpgroup's QKᵀ, for K, or PV, for V, has retired), so the loads
run as far ahead as the ring allows without the compute warps spending instructions on them.
One warpgroup only: an mbarrier arrival comes from one thread, which knows that its own
warpgroup's wgmma retired, not another's.

`python tools/kernels/gluon_ws_probe.py [--lengths ...] [--segments ...] [--rates ...]`: checks
against the float32 reference of gluon_probe.py, then times this kernel, gluon_probe.py's and
cuDNN in one process. CUDA with compute capability 9.0 only.
"""
import argparse
import math

import torch
from torch.nn.attention import SDPBackend
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                             warpgroup_mma_init, warpgroup_mma_wait)

import gluon_probe
from gluon_probe import (LOG2E, _barriers, _buffers, _diagonal, _finish, _softmax, _tile, _weights, descriptors,
                         kept, mma_layout, pairs, reference, segments_sdpa, timed)


@gluon.jit
def _loads(k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, row, lo, col, n,
           STAGES: gl.constexpr):
    """The producer warp: K_j then V_j into stage j mod STAGES, each once its previous tile there
    is released (the first pass waits on the phase before a fresh barrier's: it passes)."""
    BN: gl.constexpr = k_desc.block_type.shape[0]
    for j in range(n):
        stage = j % STAGES
        phase = (j // STAGES) & 1
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_ready.index(stage), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row + lo + j * BN, col], k_ready.index(stage), k_smem.index(stage))
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_ready.index(stage), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [row + lo + j * BN, col], v_ready.index(stage), v_smem.index(stage))


@gluon.jit
def _compute(q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, h, q0, lo, n, qk_scale,
             STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
    """The warpgroup: gluon_probe._fwd's loop, releasing each stage instead of reloading it.
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
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        mbarrier.wait(v_ready.index(stage), (j // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        s_cur = warpgroup_mma_wait(1, deps=(s_next,))

    acc, m_i, l_i = _diagonal(s_cur, bias, m_i, l_i, acc, p_op, v_smem, v_ready, qk_scale, q_pos, lo, n, STAGES,
                              CAUSAL, N_BR > 1)
    return acc, m_i, l_i


@gluon.jit
def _fwd_ws(q_desc, k_desc, v_desc, o_desc, lse_ptr, T, H, W, R, h0, nh, qk_scale,
            STAGES: gl.constexpr, CAUSAL: gl.constexpr, N_BR: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = q_desc.block_type.shape[0]
    BN: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    gl.static_assert(BM == BN, "the diagonal tile is the last one")
    gl.static_assert(num_warps == 4, "one warpgroup computes: see the module docstring")

    h, q0, lo, n, off, row, col = _tile(T, H, W, R, h0, nh, BM, D, CAUSAL)

    q_smem, k_smem, v_smem = _buffers(q_desc, k_desc, v_desc, STAGES)
    q_bar = _barriers(1).index(0)
    k_ready, v_ready, k_empty, v_empty = _barriers(STAGES), _barriers(STAGES), _barriers(STAGES), _barriers(STAGES)
    fence_async_shared()  # the barriers' initialisation before the other warps use them
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [row + q0, col], q_bar, q_smem)
    mbarrier.wait(q_bar, 0)

    acc, m_i, l_i = gl.warp_specialize([
        (_compute, (q_smem, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, h, q0, lo, n, qk_scale, STAGES,
                    CAUSAL, N_BR, num_warps)),
        (_loads, (k_desc, v_desc, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, row, lo, col, n, STAGES)),
    ], [1], [24])

    _finish(acc, m_i, l_i, q_smem, o_desc, lse_ptr, row, q0, col, R, off, H, h)


def forward(q, k, v, W: int, scale: float, stages: int = 2, R: int = 1, causal: bool = True, branches: int = 1):
    """gluon_probe.forward's result, by the warp-specialised kernel (64-row tiles)."""
    B, T, H, D = q.shape
    BM = 64
    assert T % W == 0 and W % (BM * R) == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    descs = descriptors((q, k, v, out), R, BM)
    _fwd_ws[(T // R // BM, B * H)](*descs, lse, T // R, H, W // R, R, 0, H, scale * LOG2E, STAGES=stages, CAUSAL=causal,
                                    N_BR=branches, num_warps=4)
    return out, lse


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 0], help="W per case; 0: W = T")
    p.add_argument("--rates", type=int, nargs="+", default=[1, 4])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, D, causal = 12, 64, not args.full
    scale = 1 / math.sqrt(D)
    q, k, v = (torch.randn(2, 1024, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    for R in args.rates:
        ref_out, ref_lse = reference(*(kept(x, R) for x in (q, k, v)), 512 // R, scale, causal)
        for stages in args.stages:
            out, lse = forward(q, k, v, 512, scale, stages, R, causal)
            print(f"check rate {R}, {stages} stages: max |out - ref| "
                  f"{(kept(out, R).float() - ref_out).abs().max().item():.2e}, max |lse - ref| "
                  f"{(kept(lse[..., None], R)[..., 0] - ref_lse).abs().max().item():.2e}", flush=True)
    for T in args.lengths:
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for W in args.segments:
            W = W or T
            for R in args.rates:
                flops = pairs(T, W, R, causal) * 4 * D * H
                packed = [kept(x, R).contiguous() for x in (q, k, v)]
                cells = {"cudnn": lambda: segments_sdpa(*packed, W // R, scale, SDPBackend.CUDNN_ATTENTION, causal),
                         "gluon 64x2": lambda: gluon_probe.forward(q, k, v, W, scale, 64, 2, R, causal)}
                for stages in args.stages:
                    cells[f"ws x{stages}"] = lambda stages=stages: forward(q, k, v, W, scale, stages, R, causal)
                ms = {name: timed(fn) for name, fn in cells.items()}
                line = ", ".join(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF/s" for name, t in ms.items())
                print(f"T={T} W={W} R={R}: {line}", flush=True)


if __name__ == "__main__":
    main()
