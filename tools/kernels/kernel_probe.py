"""Which LSE-returning attention kernel is fastest on this GPU, and the two ceilings.

Times flash vs cuDNN on the (N, H, L, D) shapes the `long` preset's branches produce, dense
SDPA per backend, a large bf16 matmul and a device copy. Prints a table; run by gpu_check.sh.
"""
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from longctx.attention import sdpa as kernels


def bench(fn, reps=20, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main():
    dev = "cuda"
    x = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: x @ x)
    print(f"matmul 8192^3 bf16: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
    big = torch.randn(2**30, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: big.clone())
    print(f"device copy: {2 * big.numel() * 2 / ms / 1e6:.0f} GB/s")
    x = big = None  # free the memory before the attention shapes
    # Branch shapes at T = 64K, 12 heads of 64: N = T / w segments, L = w / r = 2048 rows each.
    for n, h, L, causal in [(32, 12, 2048, True), (2, 12, 2048, True), (64, 8, 1024, False), (1, 12, 65536, True)]:
        q, k, v, do = (torch.randn(n, L, h, 64, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(4))
        flops = 4 * n * h * 64 * L * L / (2 if causal else 1)
        row = [f"N={n} H={h} L={L} causal={causal}"]
        for backend in ("flash", "cudnn"):
            kernels.CUDA_BACKEND = backend
            try:
                o, lse = kernels.attn_fwd(q, k, v, causal, 0.125)
                f = bench(lambda: kernels.attn_fwd(q, k, v, causal, 0.125))
                b = bench(lambda: kernels.attn_bwd(do, q, k, v, o, lse, causal, 0.125))
                row.append(f"{backend}: fwd {f:.3f} ms ({flops / f / 1e9:.0f} TF/s) bwd {b:.3f} ms ({2.5 * flops / b / 1e9:.0f} TF/s)")
            except Exception as e:
                row.append(f"{backend}: {type(e).__name__} {str(e)[:120]}")
        print(" | ".join(row))
        for name, be in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            try:
                qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
                with sdpa_kernel(be):
                    f = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal))
                    fb = bench(lambda: torch.autograd.grad(F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal), (qq, kk, vv), do))
                print(f"    {name}: fwd {f:.3f} ms ({flops / f / 1e9:.0f} TF/s) fwd+bwd {fb:.3f} ms ({3.5 * flops / fb / 1e9:.0f} TF/s)")
            except Exception as e:
                print(f"    {name}: {type(e).__name__} {str(e)[:120]}")
    kernels.CUDA_BACKEND = "flash"
    sys.stdout.flush()


if __name__ == "__main__":
    main()
