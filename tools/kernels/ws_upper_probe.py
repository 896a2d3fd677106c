"""Probe: the union's upper passes (levels ≥ 2) in CUDA (hopper_cuda.upper_attend, upper_gradients:
ws_fwd.cu's and ws_bwd.cu's upper items) against the Triton union kernels' upper passes, which
the GPU tests check against the reference, on the long preset's layout at its own lengths (the
dense float64 reference of tests/test_gpu.py stops at T = 8,192, short of five branches' 32K).

`python tools/kernels/ws_upper_probe.py [--lengths 32768 65536] [--heads 12] [--segment 2048]
[--branches 5] [--check-only]`: from one local pass's result (the Triton local passes: O, LSE,
STATS and the local gradients), each upper pass run both ways on copies; the outputs within two
bf16 roundings of each other, the LSE within 1e-3, each gradient within 1% of its norm (causal
and not, B 1, T 32K, 4 heads, q/k/v views of one fused projection). Then each pass timed both
ways (median of 10 × 10 back-to-back calls, gluon_probe.timed), in TFLOP/s of the upper pairs
(counted: 4·D a pair forward, 6·D dQ, 8·D dK/dV, as ws_bwd_probe.py counts).
"""
import argparse
import math
import sys

import torch

from gluon_probe import timed
from longctx.kernels import union
from longctx.kernels.hopper_cuda import takes_upper, upper_attend, upper_gradients


def upper_pairs(T: int, H: int, L: int, n: int, causal: bool) -> int:
    """(query, key) pairs the upper passes score, B = 1: per class tile of 128 rows, L/2 keys
    for each live level (ws_layout.cuh's upper items, whose liveness the class's first position
    does not change)."""
    count = 0
    for k in range(1, n):
        shift = k if k == n - 1 else k + 1
        for j in range(T // (128 << shift)):
            x0 = (j * 128) << shift
            count += sum(1 for a in range(2, k + 2) if not causal or x0 // (L << (a - 2)) % 2 == 1)
    return count * 128 * (L // 2) * H


class Problem:
    """q/k/v (views of one fused projection), dO, and the local passes' O, LSE, STATS and
    gradients (Triton's), with the layout; `fresh()` copies what an upper pass adds to."""

    def __init__(self, T: int, H: int, L: int, n: int, causal: bool, scale: float):
        self.lay = union.layout(T, H, 64, [L << i for i in range(n)], [1 << i for i in range(n)], False)
        assert self.lay is not None and takes_upper(self.lay), "a layout the CUDA upper passes take"
        g = torch.Generator(device="cuda").manual_seed(T + n)
        qkv = torch.randn(1, T, 3, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        self.q, self.k, self.v = qkv.unbind(2)
        self.dout = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        self.causal, self.scale = causal, scale
        self.out = torch.empty_like(self.dout)
        self.lse = torch.empty(1, T, H, device="cuda")
        self.stats = torch.empty(2, H, T, device="cuda")
        self.grads = tuple(torch.empty_like(self.dout) for _ in range(3))
        self.triton_forward(self.out, self.lse, ("local",))
        self.triton_backward(self.grads, ("local",))

    def triton_forward(self, out, lse, passes=("upper",)):
        union.triton_forward(self.q, self.k, self.v, out, lse, self.lay, self.causal, self.scale, passes)

    def triton_backward(self, grads, passes=("upper",), which=("dq", "dkdv")):
        for name in which:
            union.triton_backward(name, self.dout, self.q, self.k, self.v, self.out, self.lse, self.stats, grads,
                                  self.lay, self.causal, self.scale, passes)

    def cuda_forward(self, out, lse):
        upper_attend(self.q, self.k, self.v, out, lse, self.lay.L, self.scale, self.causal, self.lay.n)

    def cuda_backward(self, grads, which=("dq", "dkdv")):
        args = (self.q, self.k, self.v, self.dout, self.stats)
        if "dq" in which:
            upper_gradients(*args, grads[:1], self.lay.L, self.scale, self.causal, self.lay.n, True)
        if "dkdv" in which:
            upper_gradients(*args, grads[1:], self.lay.L, self.scale, self.causal, self.lay.n, False)

    def fresh(self):
        return self.out.clone(), self.lse.clone(), tuple(g.clone() for g in self.grads)


def check(L: int, n: int, T: int = 32768, H: int = 4) -> bool:
    ok = True
    for causal in (True, False):
        p = Problem(T, H, L, n, causal, 1 / math.sqrt(64))
        (out_t, lse_t, grads_t), (out_c, lse_c, grads_c) = p.fresh(), p.fresh()
        p.triton_forward(out_t, lse_t)
        p.cuda_forward(out_c, lse_c)
        p.triton_backward(grads_t)
        p.cuda_backward(grads_c)
        torch.cuda.synchronize()
        gaps = {"out": (out_c.float() - out_t.float()).abs().max().item(),
                "lse": (lse_c - lse_t).abs().max().item()}
        gaps.update({name: ((c.float() - t.float()).norm() / t.float().norm()).item()
                     for name, c, t in zip(("dq", "dk", "dv"), grads_c, grads_t)})
        good = (torch.allclose(out_c.float(), out_t.float(), rtol=1.6e-2, atol=2e-3) and gaps["lse"] <= 1e-3
                and all(gaps[g] <= 1e-2 for g in ("dq", "dk", "dv")))
        ok &= good
        print(f"check {'causal' if causal else 'full'} L={L} n={n}: {'ok' if good else 'WRONG'} "
              + " ".join(f"{k} {v:.2e}" for k, v in gaps.items()), flush=True)
    return ok


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--segment", type=int, default=2048)
    parser.add_argument("--branches", type=int, default=5)
    parser.add_argument("--full", action="store_true", help="non-causal, not causal")
    parser.add_argument("--check-only", action="store_true", help="the checks, not the timings")
    args = parser.parse_args(argv)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if not check(args.segment, args.branches):
        sys.exit("the CUDA upper passes differ from the Triton ones")
    if args.check_only:
        return
    causal = not args.full
    for T in args.lengths:
        p = Problem(T, args.heads, args.segment, args.branches, causal, 1 / math.sqrt(64))
        out, lse, grads = p.fresh()
        pairs = upper_pairs(T, args.heads, args.segment, args.branches, causal)
        runs = {
            "forward": (4, lambda: p.triton_forward(out, lse), lambda: p.cuda_forward(out, lse)),
            "dq": (6, lambda: p.triton_backward(grads, which=("dq",)), lambda: p.cuda_backward(grads, ("dq",))),
            "dkdv": (8, lambda: p.triton_backward(grads, which=("dkdv",)), lambda: p.cuda_backward(grads, ("dkdv",))),
        }
        for name, (per_pair, triton, cuda) in runs.items():
            flops = per_pair * 64 * pairs
            t_ms, c_ms = timed(triton), timed(cuda)
            print(f"T={T} heads={args.heads} {'causal' if causal else 'full'} upper {name}: Triton {t_ms:.3f} ms "
                  f"({flops / t_ms / 1e9:.0f} TF/s), CUDA {c_ms:.3f} ms ({flops / c_ms / 1e9:.0f} TF/s): "
                  f"{t_ms / c_ms:.2f}x", flush=True)


if __name__ == "__main__":
    main()
