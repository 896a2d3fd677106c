"""Host time of the fast op, eager: how long Python and the launches take per call, against the
GPU time of the same call; and what the custom-op dispatch adds: forward + backward through the
module (EagerDilatedAttention) and through the custom op `longctx::dilated_attention`, and the
forward alone without autograd through the custom op and through `attend` directly.

Usage: python scripts/host_probe.py  (GPU only): the seed layout at 8K and 32K (head_split) and
the long preset at 32K, forward + backward. (cProfile is no help here: run 52 put most of the
host time in torch's custom-op wrapper, which this comparison showed to be an artefact, run 56.)
"""
import statistics
import time

import torch

from longctx.attention import ImprovedDilatedAttention
from longctx.attention.improved import attend, dilated_attention

CASES = [  # name, T, heads, segments, dilations, head_split, causal
    ("seed 8K", 8192, 8, [1024, 2048, 4096], [1, 2, 4], True, False),
    ("seed 32K", 32768, 8, [1024, 2048, 4096], [1, 2, 4], True, False),
    ("long 32K", 32768, 12, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], False, True),
]


def host_ms(fn, reps=20):
    """Median host time of fn() started on an idle GPU."""
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def launch_cost(reps=100):
    """Host µs a launch of the head_split forward kernel (seed 32K): JIT against compiled runner."""
    from longctx.attention import union
    from longctx.attention.union_kernels import _fwd_local

    T, H, D = 32768, 8, 64
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = union.layout(T, H, D, [1024, 2048, 4096], [1, 2, 4], True)
    rows, cols, warps, stages = union._tiles("fwd", lay.L, 1, union.config_for(q, lay))
    outs = [(torch.full_like(q, float("nan")), torch.full((1, T, H), float("nan"), device="cuda")) for _ in range(2)]
    consts = dict(L=lay.L, CAUSAL=False, D=D, N_BR=1, SPLIT=lay.n, BM=rows, BN=cols)
    grid = (H, T // rows)

    def args(i):
        return (q, k, v, *outs[i], *union._strides(q, k, v), T, H, 0.125 * union.LOG2E)

    compiled = _fwd_local[grid](*args(0), **consts, num_warps=warps, num_stages=stages)
    runner = compiled[(*grid, 1)]  # the runner reads three grid dimensions
    named = dict(zip(_fwd_local.arg_names, args(1))) | consts
    ordered = [named[n] for n in _fwd_local.arg_names]
    runner(*ordered)
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    ja, jb = args(0), ordered
    for name, fn in (("JIT", lambda: _fwd_local[grid](*ja, **consts, num_warps=warps, num_stages=stages)),
                     ("compiled runner", lambda: runner(*jb))):
        ts = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            ts.append((time.perf_counter() - t) / reps * 1e6)
        print(f"  launch through the {name}: {statistics.median(ts):.1f} µs host a launch")
    print(f"  same output both ways: {same}")


def main():
    print("Triton launch, seed 32K forward kernel:")
    launch_cost()
    for name, T, H, ws, rs, split, causal in CASES:
        attn = ImprovedDilatedAttention(ws, rs, head_split=split)
        q, k, v = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16)
        fwd, bwd, gpu = [], [], []
        for i in range(25):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a.record()
            out = attn(q, k, v, is_causal=causal)
            t1 = time.perf_counter()
            out.backward(g)
            t2 = time.perf_counter()
            b.record()
            b.synchronize()
            if i >= 5:  # after warm-up
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t2 - t1) * 1e3)
                gpu.append(a.elapsed_time(b))
        print(f"{name}: host fwd {statistics.median(fwd):.3f} ms, host bwd {statistics.median(bwd):.3f} ms, "
              f"GPU (events, fwd+bwd) {statistics.median(gpu):.3f} ms")
        config = (ws, rs, split, causal, 0.125)
        op_step = host_ms(lambda: dilated_attention(q, k, v, *config)[0].backward(g))
        print(f"  forward + backward through the custom op: host {op_step:.3f} ms")
        args = (q.detach(), k.detach(), v.detach(), *config)
        op, direct = host_ms(lambda: dilated_attention(*args)), host_ms(lambda: attend(*args))
        print(f"  forward without autograd: custom op {op:.3f} ms, its Python implementation directly {direct:.3f} ms")


if __name__ == "__main__":
    main()
