"""Host time of the fast op, eager: how long Python and the launches take per call, against the
GPU time of the same call, and where the host time goes (cProfile, by own time).

Usage: python scripts/host_probe.py  (GPU only): the seed layout at 8K (head_split) and the long
preset at 32K, forward + backward.
"""
import cProfile
import io
import pstats
import statistics
import time

import torch

from longctx.attention import ImprovedDilatedAttention

CASES = [  # name, T, heads, segments, dilations, head_split, causal
    ("seed 8K", 8192, 8, [1024, 2048, 4096], [1, 2, 4], True, False),
    ("long 32K", 32768, 12, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], False, True),
]


def main():
    for name, T, H, ws, rs, split, causal in CASES:
        attn = ImprovedDilatedAttention(ws, rs, head_split=split)
        q, k, v = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16)

        def call():
            out = attn(q, k, v, is_causal=causal)
            t = time.perf_counter()
            out.backward(g)
            return t

        for _ in range(5):
            call()
        torch.cuda.synchronize()
        fwd, bwd, gpu = [], [], []
        for _ in range(20):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a.record()
            t1 = call()
            t2 = time.perf_counter()
            b.record()
            b.synchronize()
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
            gpu.append(a.elapsed_time(b))
        print(f"{name}: host fwd {statistics.median(fwd):.3f} ms, host bwd {statistics.median(bwd):.3f} ms, "
              f"GPU (events, fwd+bwd) {statistics.median(gpu):.3f} ms")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            call()
        prof.disable()
        torch.cuda.synchronize()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        print("\n".join(line for line in s.getvalue().splitlines() if line.strip())[:4000])


if __name__ == "__main__":
    main()
