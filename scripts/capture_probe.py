"""Does ImprovedDilatedAttention fwd+bwd capture in a CUDA graph after it has run eagerly?

python scripts/capture_probe.py ORDER — ORDER is `fresh` (no call before the capture's warm-up,
as the benchmark does), `eager` (one eager fwd+bwd on the default stream first) or `eager-sync`
(the same, then torch.cuda.synchronize()). LONGCTX_CUDA_ATTENTION picks the kernel. Run 11
(docs/performance.md) saw `eager` fail with cudaErrorStreamCaptureInvalidated. Prints one line.
"""
import sys

import torch

from longctx.attention import ImprovedDilatedAttention, kernels
from longctx.benchmark import graphed


def main():
    order = sys.argv[1] if len(sys.argv) > 1 else "eager"
    T, H, D = 4096, 12, 64
    op = ImprovedDilatedAttention([512, 1024, 2048, 4096], [1, 2, 4, 8])
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(op(q, k, v, is_causal=True), (q, k, v), dout)

    if order.startswith("eager"):
        step()
        if order == "eager-sync":
            torch.cuda.synchronize()
    try:
        graphed(step)()
        torch.cuda.synchronize()
        result = "captured and replayed"
    except Exception as e:  # report, do not raise: the point is which orders fail
        result = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    print(f"capture after {order!r} ({kernels.CUDA_BACKEND}): {result}")


if __name__ == "__main__":
    main()
