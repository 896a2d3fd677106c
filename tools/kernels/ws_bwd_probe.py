"""Probe: longctx/kernels/csrc/ws_bwd.cu (hopper_cuda.gradients), the backward of ws_fwd.cu's
problem (a dK/dV pass and a dQ pass) with the same producer/consumer structure in CUDA C++,
against the Gluon passes (the op's on Hopper, longctx/kernels/hopper_kernels.py) and cuDNN's
whole backward on the same segments.

`python tools/kernels/ws_bwd_probe.py [--lengths 32768 131072] [--segments 2048] [--full] [--branches 5]`
checks dQ, dK and dV against float32 autograd of the definition (gluon_bwd_probe.reference) on
q/k/v views of one fused projection, with and without the long preset's weight terms, then times
each pass and both, CUDA and Gluon (STATS written once by the Gluon dQ kernel), and cuDNN's
backward, printing TFLOP/s: 10·D per pair and head for a whole backward's five matmuls (both
passes recompute S and dP), 8·D for dK/dV's four, 6·D for dQ's three.
"""
import argparse
import math
import sys

import torch

from gluon_bwd_probe import backward as gluon_backward, cudnn_backward, reference
from gluon_probe import LOG2E, forward as gluon_forward, pairs, timed
from longctx.kernels.hopper_cuda import gradients


def backward(q, k, v, dout, stats, W: int, scale: float, causal: bool, branches: int, dq: bool = False,
             ctas: int = 0, overlap: bool = False) -> tuple:
    """(dK, dV), or with dq (dQ,), on new (B, T, H, 64) bf16 tensors: hopper_cuda.gradients."""
    grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(1 if dq else 2))
    gradients(q, k, v, dout, stats, grads, W, scale, causal, branches, dq, ctas, overlap=overlap)
    return grads


def stats_of(out, lse, dout):
    """STATS (2, B·H, T) float32: log2 LSE and Δ = rowsum(dO∘O) by position, from (B, T, H[, D])."""
    B, T, H = lse.shape
    delta = (dout.float() * out.float()).sum(-1)
    return torch.stack([lse * LOG2E, delta]).permute(0, 1, 3, 2).reshape(2, B * H, T).contiguous()


def check(H: int, scale: float, causal: bool) -> bool:
    """dQ, dK and dV against the float32 reference, B = 2, T = 1,024, W = 512 and 1,024, without
    weights and with five branches', one CTA an item and a persistent grid of 7 (a CTA's items
    wrap every buffer at both parities); the bound on max |g − ref| / max |ref| is twice cuDNN's
    (its unweighted backward against the same reference) plus 1e-3; each pass also with OVERLAP.
    Also the dQ pass that makes STATS itself from O and the LSE (hopper_cuda.local_backward's):
    its STATS against stats_of's within 1e-4 (relative to the largest), its dQ as the other's."""
    ok = True
    qkv = torch.randn(2, 1024, 3, H, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(2, 1024, H, 64, device="cuda", dtype=torch.bfloat16)
    gap = lambda g, r: (g.float() - r).abs().max().item() / r.abs().max().item()
    for W in (512, 1024):
        exact = reference(q, k, v, dout, W, scale, causal)[2:]
        packed = [x.contiguous() for x in (q, k, v, dout)]
        cudnn = (g.transpose(1, 2).reshape(q.shape) for g in cudnn_backward(*packed, W, scale, causal)())
        bound = 2 * max(gap(g, r) for g, r in zip(cudnn, exact)) + 1e-3
        for branches, ctas, overlap in ((1, 0, False), (1, 7, False), (5, 0, False), (5, 7, False), (1, 7, True),
                                        (5, 0, True), (5, 7, True)):
            out, lse, *ref = reference(q, k, v, dout, W, scale, causal, branches)
            stats = stats_of(out, lse, dout)
            got = backward(q, k, v, dout, stats, W, scale, causal, branches, dq=True, ctas=ctas, overlap=overlap)
            got += backward(q, k, v, dout, stats, W, scale, causal, branches, ctas=ctas, overlap=overlap)
            gaps = [gap(g, r) for g, r in zip(got, ref)]
            good = max(gaps) <= bound
            ok &= good
            print(f"check W={W} {'causal' if causal else 'full'} branches={branches} ctas={ctas} overlap={overlap}: "
                  "max |g - ref| / max |ref| "
                  + ", ".join(f"{name} {e:.1e}" for name, e in zip(("dq", "dk", "dv"), gaps))
                  + f" (bound {bound:.1e}): {'ok' if good else 'WRONG'}", flush=True)
            if ctas and not overlap:
                o = out.to(torch.bfloat16)  # the op's own output, which Δ is taken from
                made = torch.full_like(stats, float("nan"))
                dq = torch.empty_like(q)
                gradients(q, k, v, dout, made, (dq,), W, scale, causal, branches, True, ctas, out=o,
                          lse=lse.contiguous())
                want = stats_of(o.float(), lse, dout)
                e_stats = ((made - want).abs().amax(dim=(1, 2)) / want.abs().amax(dim=(1, 2))).max().item()
                good = e_stats <= 1e-4 and gap(dq, ref[0]) <= bound
                ok &= good
                print(f"check W={W} branches={branches} ctas={ctas} STATS made by dQ: max error {e_stats:.1e}, "
                      f"dq {gap(dq, ref[0]):.1e}: {'ok' if good else 'WRONG'}", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    p.add_argument("--branches", type=int, default=1, help="the union local pass's weight terms (5: the long preset's)")
    p.add_argument("--check-only", action="store_true", help="the checks, not the timings")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    H, causal, n = args.heads, not args.full, args.branches
    scale = 1 / math.sqrt(64)
    if not check(H, scale, causal):
        sys.exit("ws_bwd is wrong: not timed")
    if args.check_only:
        return
    for T in args.lengths:
        q, k, v, dout = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for W in args.segments:
            count = pairs(T, W, 1, causal) * 64 * H
            out, lse = gluon_forward(q, k, v, W, scale, 128, 2, 1, causal, n)
            grads = tuple(torch.zeros_like(q) for _ in range(3))
            stats = torch.zeros((2, H, T), device=q.device)
            gluon_backward(q, k, v, dout, out, lse, W, scale, 64, 2, 1, causal, n, ("dq",), grads, stats=stats)
            gluon = lambda which: gluon_backward(q, k, v, dout, out, lse, W, scale, 64, 2, 1, causal, n, which,
                                                 grads, stats=stats)
            cuda = lambda dq, ctas=0, overlap=False: backward(q, k, v, dout, stats, W, scale, causal, n, dq, ctas,
                                                              overlap)
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            cells = {"cudnn backward": (cudnn_backward(q, k, v, dout, W, scale, causal), 10 * count),
                     "gluon dq": (lambda: gluon(("dq",)), 6 * count),
                     "gluon dkdv": (lambda: gluon(("dkdv",)), 8 * count),
                     "gluon both": (lambda: gluon(("dq", "dkdv")), 10 * count),
                     "cuda dq": (lambda: cuda(True), 6 * count),
                     "cuda dkdv": (lambda: cuda(False), 8 * count),
                     "cuda both": (lambda: (cuda(True), cuda(False)), 10 * count),
                     "cuda dq persistent": (lambda: cuda(True, sms), 6 * count),
                     "cuda dkdv persistent": (lambda: cuda(False, sms), 8 * count),
                     "cuda dq overlap persistent": (lambda: cuda(True, sms, True), 6 * count),
                     "cuda dkdv overlap persistent": (lambda: cuda(False, sms, True), 8 * count)}
            line = ", ".join(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF/s"
                             for name, (fn, flops) in cells.items() for t in [timed(fn)])
            print(f"T={T} W={W} branches={n} {'causal' if causal else 'full'}: {line}", flush=True)


if __name__ == "__main__":
    main()
