"""Probe: the backward of gluon_probe.py's problem in Gluon (TMA loads, asynchronous wgmma), dQ
and dK/dV in two kernels as the union kernels split them, against cuDNN.

The problem is gluon_probe.py's: attention inside segments of W rows, causal or not, head h
keeping the positions ≡ h (mod R) (a dilated branch read in place through the (B·T/R, R·H·D)
view), and with N_BR > 1 (R = 1) the union local pass's weight terms. The gradients are
FlashAttention-2's: with P = exp(S − LSE) recomputed against the forward's LSE and Δ = rowsum(dO∘O),
dV = Pᵀ dO, dS = P∘(dO Vᵀ − Δ), dK = scale·dSᵀ Q, dQ = scale·dS K. LSE (log2) and Δ come in as
the union kernels' STATS, (2, B·H, T) float32 by position, which their local dQ pass writes.

Both kernels are the op's own on Hopper (longctx/kernels/hopper_kernels.py, which the union
backward runs for its local passes), here launched on this problem:
- dQ: one program a tile of BM queries; per key tile j, S and dP are issued together, P's
  exponentials run while dP is in flight, dQ += dS Kⱼ runs into the next tile's issue; it
  writes STATS from the forward's O and LSE first;
- dK/dV: one program a tile of BN keys, the same over query tiles (hopper_kernels.py's docstring).

`python tools/kernels/gluon_bwd_probe.py [--lengths 32768 131072] [--segments 2048] [--rates 1 4] [--full] [--union]`:
checks the three gradients against float32 autograd of the definition (--union: with the long
preset's five branches' weights, R = 1, W = 2,048), then times them against cuDNN's backward on
the same (packed) segments. Against the union kernels' passes they would replace:
gluon_compare.py. CUDA, compute capability 9.0 only.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gluon_probe import LOG2E, descriptors, forward, kept, pairs, timed
from longctx.kernels import hopper_kernels


def backward(q, k, v, do, out, lse, W: int, scale: float, BM: int = 64, stages: int = 2, R: int = 1,
             causal: bool = True, branches: int = 1, which=("dq", "dkdv"), grads=None, heads: range | None = None,
             stats=None):
    """(dq, dk, dv) of gluon_probe.forward's attention given its out and lse (B, T, H, D), (B, T, H)
    at the kept positions. The dQ kernel writes STATS (2, B·H, T): log2 LSE and Δ by position,
    which the dK/dV kernel reads (timing dK/dV alone: pass `stats` a dQ call filled). A head's rows
    it does not keep are left as `grads` had them (zeros if not given); `which` launches only some
    of the two kernels; heads: only these (contiguous) ones (head_split's branches)."""
    B, T, H, D = q.shape
    assert T % W == 0 and W % (BM * R) == 0 and (R == 1 or branches == 1)
    grads = grads or tuple(torch.zeros_like(q) for _ in range(3))
    stats = torch.zeros((2, B * H, T), device=q.device) if stats is None else stats
    dq, dk, dv = grads
    descs = descriptors((q, k, v, do), R, BM)
    heads = heads or range(H)
    grid = (T // R // BM, B * len(heads))
    dims = (T // R, H, W // R, R, heads.start, len(heads), B * H, scale * LOG2E, scale)
    consts = dict(STAGES=stages, CAUSAL=causal, N_BR=branches, ROPE=False, num_warps=BM // 16)
    # the op's kernels; no RoPE (stats stands in for cos and sin, unread)
    if "dq" in which:
        hopper_kernels.dq[grid](*descs, out, lse, dq, stats, stats, stats, *dq.stride()[:3], *dims, **consts)
    if "dkdv" in which:
        hopper_kernels.dkdv[grid](*descs, dk, dv, stats, stats, stats, *dk.stride()[:3], *dims, **consts)
    return dq, dk, dv


def lam(pos, h: int, branches: int):
    """λ of positions pos for head h: how many of the dilations 2 … 2^(branches−1) keep them."""
    return sum((((pos ^ h) & ((1 << j) - 1)) == 0).long() for j in range(1, branches))


def reference(q, k, v, do, W: int, scale: float, causal: bool, branches: int = 1):
    """float32 (out, lse, dq, dk, dv) by autograd of the definition, segment by segment, with the
    union local pass's weights m = min(λ(x), λ(s)) + 1 when branches > 1."""
    B, T, H, D = q.shape
    leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    qs, ks, vs = (x.reshape(B * T // W, W, H, D).transpose(1, 2) for x in leaves)
    s = qs @ ks.transpose(-1, -2) * scale
    if branches > 1:
        pos = torch.arange(W, device=q.device)
        lq = torch.stack([lam(pos, h, branches) for h in range(H)])  # (H, W); λ's period divides W
        s = s + torch.log(torch.minimum(lq[:, :, None], lq[:, None, :]) + 1.0).float()
    if causal:
        s = s.masked_fill(torch.ones(W, W, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = (torch.softmax(s, -1) @ vs).transpose(1, 2).reshape(B, T, H, D)
    out.backward(do.float())
    return (out.detach(), lse.transpose(1, 2).reshape(B, T, H), *(x.grad for x in leaves))


def check(configs, H: int, D: int, scale: float, causal: bool, union: bool, rates) -> None:
    torch.manual_seed(0)
    B, T, W = 2, 1024, 512
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for R in ([1] if union else rates):
        branches = 5 if union else 1
        kq, kk, kv, kdo = (kept(x, R) for x in (q, k, v, do))
        _, _, *ref = reference(kq, kk, kv, kdo, W // R, scale, causal, branches)
        out, lse = forward(q, k, v, W, scale, 64, 2, R, causal, branches)
        for BM, stages in configs:
            if W % (BM * R):
                continue
            got = backward(q, k, v, do, out, lse, W, scale, BM, stages, R, causal, branches)
            gaps = ", ".join(f"{name} {(kept(g, R).float() - r).abs().max().item() / r.abs().max().item():.1e}"
                             for name, g, r in zip(("dq", "dk", "dv"), got, ref))
            print(f"check rate {R}, {BM}x{stages}{', weights' if union else ''}: max |g - ref| / max |ref|: {gaps}",
                  flush=True)


def cudnn_backward(q, k, v, do, W: int, scale: float, causal: bool):
    """A function timing cuDNN's backward on the (B·T/W, H, W, D) segments of q/k/v (B, T, H, D)."""
    B, T, H, D = q.shape
    seg = [x.reshape(B * T // W, W, H, D).transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(*seg, is_causal=causal, scale=scale)
    g = do.reshape(B * T // W, W, H, D).transpose(1, 2)
    return lambda: torch.autograd.grad(out, seg, g, retain_graph=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048])
    p.add_argument("--rates", type=int, nargs="+", default=[1, 4])
    p.add_argument("--configs", nargs="+", default=["64x2", "64x3"], help="tiles as ROWSxSTAGES")
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    p.add_argument("--union", action="store_true", help="the long preset's weights (R = 1, W = 2,048)")
    args = p.parse_args(argv)
    H, D, causal = 12, 64, not args.full
    scale = 1 / math.sqrt(D)
    configs = [tuple(map(int, c.split("x"))) for c in args.configs]
    check(configs, H, D, scale, causal, args.union, args.rates)
    for T in args.lengths:
        q, k, v, do = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for W in ([2048] if args.union else args.segments):
            for R in ([1] if args.union else args.rates):
                branches = 5 if args.union else 1
                flops = 2.5 * pairs(T, W, R, causal) * 4 * D * H
                packed = [kept(x, R).contiguous() for x in (q, k, v, do)]
                cells = {"cudnn": cudnn_backward(*packed, W // R, scale, causal)}
                out, lse = forward(q, k, v, W, scale, 64, 2, R, causal, branches)
                grads = tuple(torch.zeros_like(q) for _ in range(3))
                stats = torch.zeros((2, H, T), device=q.device)
                for BM, stages in configs:
                    if W % (BM * R):
                        continue
                    run = lambda which, BM=BM, stages=stages: backward(q, k, v, do, out, lse, W, scale, BM, stages,
                                                                        R, causal, branches, which, grads, stats=stats)
                    run(("dq",))  # STATS for the dK/dV kernel timed alone
                    cells[f"gluon {BM}x{stages} dq"] = lambda run=run: run(("dq",))
                    cells[f"gluon {BM}x{stages} dkdv"] = lambda run=run: run(("dkdv",))
                    cells[f"gluon {BM}x{stages} both"] = lambda run=run: run(("dq", "dkdv"))
                # Kernels in a CUDA graph (seven host-made descriptors a launch), cuDNN's autograd call eager.
                ms = {name: timed(fn, graph=name != "cudnn") for name, fn in cells.items()}
                line = ", ".join(f"{name} {t:.3f} ms" + (f" {flops / t / 1e9:.0f} TF/s" if "both" in name or name ==
                                                          "cudnn" else "") for name, t in ms.items())
                print(f"T={T} W={W} R={R}{' union weights' if args.union else ''} backward: {line}", flush=True)


if __name__ == "__main__":
    main()
