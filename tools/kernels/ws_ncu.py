"""Probe for ncu: each CUDA local pass (longctx/kernels/hopper_cuda.py) and cuDNN's forward and
backward launched twice on one problem, nothing else between them, so that a profiler filtered
by kernel name sees the same work from each (the second launch of each is the one to read); with
several branches and segments of at least 128·2^(n−1) rows, the upper passes too, CUDA's and the
Triton union kernels' (`_upper`).

`ncu --kernel-name regex:'ws_|cudnn|flash|_upper' --section SpeedOfLight --section WarpStateStats
 --section InstructionStats python tools/kernels/ws_ncu.py [--length 32768] [--segment 2048]
 [--branches 5] [--full]` (scripts/gpu_check.sh's `ncu` stage). The CUDA forward runs ping-pong
on a persistent grid (the op's), the backward passes plain and with `overlap`. Each name is
printed before its launches, so the profile's order reads against it.
"""
import argparse
import math

import torch

from gluon_bwd_probe import cudnn_backward
from gluon_probe import segments_sdpa
from longctx.kernels import union
from longctx.kernels.hopper_cuda import attend, gradients, takes_upper, upper_attend, upper_gradients


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=32768)
    p.add_argument("--segment", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--branches", type=int, default=5, help="weight terms of this many branches (5: the long preset's)")
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    args = p.parse_args(argv)
    from torch.nn.attention import SDPBackend
    T, W, H, n, causal = args.length, args.segment, args.heads, args.branches, not args.full
    scale = 1 / math.sqrt(64)
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out = torch.empty_like(q)
    lse = torch.empty(1, T, H, device="cuda")
    stats = torch.empty(2, H, T, device="cuda")
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    cudnn_bwd = cudnn_backward(q, k, v, dout, W, scale, causal)
    launches = {
        "cudnn forward": lambda: segments_sdpa(q, k, v, W, scale, SDPBackend.CUDNN_ATTENTION, causal),
        "cuda forward (ping-pong, persistent)": lambda: attend(q, k, v, out, lse, W, scale, causal, n),
        "cudnn backward": cudnn_bwd,
        "cuda dq (makes STATS)": lambda: gradients(q, k, v, dout, stats, (dq,), W, scale, causal, n, True, out=out,
                                                   lse=lse),
        "cuda dkdv": lambda: gradients(q, k, v, dout, stats, (dk, dv), W, scale, causal, n, False),
        "cuda dq overlap": lambda: gradients(q, k, v, dout, stats, (dq,), W, scale, causal, n, True, overlap=True),
        "cuda dkdv overlap": lambda: gradients(q, k, v, dout, stats, (dk, dv), W, scale, causal, n, False,
                                               overlap=True),
    }
    lay = union.layout(T, H, 64, [W << i for i in range(n)], [1 << i for i in range(n)], False)
    if n > 1 and lay is not None and takes_upper(lay):
        launches.update(upper_launches(q, k, v, dout, out, lse, stats, (dq, dk, dv), lay, scale, causal))
    for name, fn in launches.items():
        print(f"== {name}: T={T} W={W} heads={H} branches={n} {'causal' if causal else 'full'}", flush=True)
        for _ in range(2):
            fn()
        torch.cuda.synchronize()


def upper_launches(q, k, v, dout, out, lse, stats, grads, lay, scale, causal) -> dict:
    """The upper passes (levels ≥ 2), CUDA's and the Triton union kernels', on the local passes'
    results above (each launch adds to them again, which changes values, not work)."""
    dq, dk, dv = grads
    triton = lambda name: union.triton_backward(name, dout, q, k, v, out, lse, stats, grads, lay, causal, scale,
                                                ("upper",))
    return {
        "cuda upper forward": lambda: upper_attend(q, k, v, out, lse, lay.L, scale, causal, lay.n),
        "triton upper forward": lambda: union.triton_forward(q, k, v, out, lse, lay, causal, scale, ("upper",)),
        "cuda upper dq": lambda: upper_gradients(q, k, v, dout, stats, (dq,), lay.L, scale, causal, lay.n, True),
        "triton upper dq": lambda: triton("dq"),
        "cuda upper dkdv": lambda: upper_gradients(q, k, v, dout, stats, (dk, dv), lay.L, scale, causal, lay.n, False),
        "triton upper dkdv": lambda: triton("dkdv"),
    }


if __name__ == "__main__":
    main()
