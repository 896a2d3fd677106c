"""The union kernels (longctx/attention/union.py) on the GPU: tile sweep, then against the op's
per-branch path and dense SDPA.

1. Sweep: at the first length, each pass (fwd, dq, dkdv) under a few (rows, cols, warps, stages)
   tilings, each captured in a CUDA graph; the fastest goes into union.CONFIG for the rest.
2. Per length: forward+backward, graphed, of dense causal SDPA (cuDNN), the op with
   LONGCTX_UNION off (per-branch cuDNN calls and the one-pass combine) and on (union kernels);
   milliseconds, counted TFLOP/s (branches.dilated_flops, backward = 2.5x forward) and the ratio
   to dense; the union's local and upper passes timed apart.
The long preset's layout: 12 heads of 64, segments 2048 … 32768, dilations 1 … 16, causal, bf16.

Usage: python scripts/union_probe.py [lengths...]   (default 65536 131072 262144)
"""
import sys

import torch
import torch.nn.functional as F

from longctx.attention import union
from longctx.attention.branches import dilated_flops
from longctx.attention.improved import dilated_attention
from longctx.benchmark import graphed, timed

WS, RS, H, D = [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], 12, 64
SWEEP = {  # runs 71-73 swept more (64-row tiles, 8 warps, 2 stages, 16 or 128 columns): slower everywhere
    "fwd": [(128, 64, 4, 4), (128, 64, 4, 3)],
    "dq": [(128, 32, 4, 4), (128, 32, 4, 3)],
    "dkdv": [(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 5), (128, 16, 4, 3)],
}


def ms(fn):
    """Median milliseconds of fn, captured in a CUDA graph."""
    return timed(graphed(fn), torch.device("cuda"), 3, 20, 20)[0]


def inputs(T):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]


def passes(T, which=("local", "upper")):
    """Callables for each pass of the union kernels on fresh inputs (`which` of the local and
    upper passes)."""
    q, k, v, do = inputs(T)
    L, n, scale = WS[0], len(WS), D ** -0.5
    out, lse = union.forward(q, k, v, L, n, True, scale)
    dq, dk, dv, delta = torch.empty_like(q), torch.empty_like(q), torch.empty_like(q), torch.empty_like(lse)
    strides = union._strides(q, k, v, do)
    meta = dict(L=L, CAUSAL=True, D=D)
    dq_args = (q, k, v, do, out, lse, delta, dq, *strides, T, 12, scale * union.LOG2E, scale)
    dkdv_args = (q, k, v, do, lse, delta, dk, dv, *strides, T, 12, scale * union.LOG2E, scale)
    fwd_args = (q, k, v, out, lse, *union._strides(q, k, v), T, 12, scale * union.LOG2E)
    return {
        "fwd": lambda: union._launch(union._fwd_local, union._fwd_upper, "fwd", q, n, fwd_args, meta, which),
        "dq": lambda: union._launch(union._dq_local, union._dq_upper, "dq", q, n, dq_args, meta, which),
        "dkdv": lambda: union._launch(union._dkdv_local, union._dkdv_upper, "dkdv", q, n, dkdv_args, meta, which),
    }


def sweep(T):
    fns = passes(T)
    for name, configs in SWEEP.items():
        times = []
        for cfg in configs:
            union.CONFIG[name] = cfg
            try:
                times.append((ms(fns[name]), cfg))
            except Exception as e:  # e.g. out of shared memory for a tiling
                print(f"  {name} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
        for t, cfg in sorted(times):
            print(f"  T={T} {name:5s} {cfg}: {t:.3f} ms")
        union.CONFIG[name] = min(times)[1]
    print("best:", union.CONFIG, flush=True)


def compare(T):
    q, k, v, do = (x.requires_grad_(i < 3) for i, x in enumerate(inputs(T)))
    counted = 3.5 * dilated_flops(1, T, H, D, tuple(WS), tuple(RS), False, True)
    dense = 3.5 * 4 * H * D * T * T / 2

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return run
    sdpa = step(lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True)
                .transpose(1, 2))
    op = step(lambda: dilated_attention(q, k, v, WS, RS, False, True, D ** -0.5)[0])
    t_dense = ms(sdpa)
    union.ENABLED = False
    t_old = ms(op)
    union.ENABLED = True
    t_new = ms(op)
    rate = lambda t: counted / t / 1e9
    print(f"T={T}: dense {t_dense:.3f} ms ({dense / t_dense / 1e9:.0f} TF/s); per-branch op {t_old:.3f} ms "
          f"({rate(t_old):.0f} counted TF/s, {rate(t_old) / (dense / t_dense / 1e9):.0%}); union op {t_new:.3f} ms "
          f"({rate(t_new):.0f}, {rate(t_new) / (dense / t_dense / 1e9):.0%})", flush=True)
    for which in ("local", "upper"):
        fns = passes(T, (which,))
        print(f"   {which} passes: " + ", ".join(f"{name} {ms(fn):.3f} ms" for name, fn in fns.items()), flush=True)


if __name__ == "__main__":
    lengths = [int(x) for x in sys.argv[1:]] or [65536, 131072, 262144]
    sweep(lengths[0])
    for T in lengths:
        compare(T)
