"""Probe: tools/kernels/ws_bwd.cu, the dK/dV pass of ws_fwd.cu's problem with the same
producer/consumer structure in CUDA C++, against the Gluon dK/dV kernel (the op's on Hopper,
longctx/kernels/hopper_kernels.py) and cuDNN's whole backward on the same segments.

`python tools/kernels/ws_bwd_probe.py [--lengths 32768 131072] [--segments 2048] [--full] [--branches 5]`
checks dK and dV against float32 autograd of the definition (gluon_bwd_probe.reference) on
q/k/v views of one fused projection, with and without the long preset's weight terms, then times
the CUDA and Gluon dK/dV passes (STATS written once by the Gluon dQ kernel) and cuDNN's backward
(dQ, dK and dV), printing TFLOP/s: 8·D per pair and head for a dK/dV pass's four matmuls, 10·D
for a whole backward's five.
"""
import argparse
import math
import sys

import torch

from gluon_bwd_probe import backward as gluon_backward, cudnn_backward, reference
from gluon_probe import LOG2E, forward as gluon_forward, pairs, timed
from ws_probe import Kernel


def stats_of(out, lse, dout):
    """STATS (2, B·H, T) float32: log2 LSE and Δ = rowsum(dO∘O) by position, from (B, T, H[, D])."""
    B, T, H = lse.shape
    delta = (dout.float() * out.float()).sum(-1)
    return torch.stack([lse * LOG2E, delta]).permute(0, 1, 3, 2).reshape(2, B * H, T).contiguous()


def check(kernel, H: int, scale: float, causal: bool) -> bool:
    """dK and dV against the float32 reference, B = 2, T = 1,024, W = 512 and 1,024, without weights
    and with five branches'; the bound on max |g − ref| / max |ref| is twice cuDNN's (its
    unweighted backward against the same reference) plus 1e-3."""
    ok = True
    qkv = torch.randn(2, 1024, 3, H, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(2, 1024, H, 64, device="cuda", dtype=torch.bfloat16)
    gap = lambda g, r: (g.float() - r).abs().max().item() / r.abs().max().item()
    for W in (512, 1024):
        _, _, _, dk1, dv1 = reference(q, k, v, dout, W, scale, causal)
        packed = [x.contiguous() for x in (q, k, v, dout)]
        _, cdk, cdv = (g.transpose(1, 2).reshape(q.shape) for g in cudnn_backward(*packed, W, scale, causal)())
        bound = 2 * max(gap(cdk, dk1), gap(cdv, dv1)) + 1e-3
        for branches in (1, 5):
            out, lse, _, dk_ref, dv_ref = reference(q, k, v, dout, W, scale, causal, branches)
            dk, dv = kernel.dkdv(q, k, v, dout, stats_of(out, lse, dout), W, scale, causal, branches)
            e_k, e_v = gap(dk, dk_ref), gap(dv, dv_ref)
            good = max(e_k, e_v) <= bound
            ok &= good
            print(f"check W={W} {'causal' if causal else 'full'} branches={branches}: max |g - ref| / max |ref| "
                  f"dk {e_k:.1e}, dv {e_v:.1e} (bound {bound:.1e}): {'ok' if good else 'WRONG'}", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    p.add_argument("--branches", type=int, default=1, help="the union local pass's weight terms (5: the long preset's)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, causal, n = args.heads, not args.full, args.branches
    scale = 1 / math.sqrt(64)
    kernel = Kernel()
    if not check(kernel, H, scale, causal):
        sys.exit("ws_dkdv is wrong: not timed")
    for T in args.lengths:
        q, k, v, dout = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for W in args.segments:
            count = pairs(T, W, 1, causal) * 64 * H
            out, lse = gluon_forward(q, k, v, W, scale, 128, 2, 1, causal, n)
            grads = tuple(torch.zeros_like(q) for _ in range(3))
            stats = torch.zeros((2, H, T), device=q.device)
            gluon_backward(q, k, v, dout, out, lse, W, scale, 64, 2, 1, causal, n, ("dq",), grads, stats=stats)
            cells = {"cudnn backward": (cudnn_backward(q, k, v, dout, W, scale, causal), 10 * count),
                     "gluon dkdv": (lambda: gluon_backward(q, k, v, dout, out, lse, W, scale, 64, 2, 1, causal, n,
                                                           ("dkdv",), grads, stats=stats), 8 * count),
                     "cuda dkdv": (lambda: kernel.dkdv(q, k, v, dout, stats, W, scale, causal, n), 8 * count)}
            line = ", ".join(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF/s"
                             for name, (fn, flops) in cells.items() for t in [timed(fn)])
            print(f"T={T} W={W} branches={n} {'causal' if causal else 'full'}: {line}", flush=True)


if __name__ == "__main__":
    main()
