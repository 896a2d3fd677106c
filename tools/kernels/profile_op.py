"""Where the time of one ImprovedDilatedAttention forward+backward goes (torch.profiler).

python tools/kernels/profile_op.py [T] [head_split] [seed|long] — defaults: the seed preset at 8K with
head_split. `long`: the benchmark's long preset (12 heads, segments 2048·2^i, dilations 2^i, causal).
Prints the top ops by self CPU time and by CUDA time, and the launch count.
"""
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from longctx.attention import ImprovedDilatedAttention


def main():
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
    head_split = (sys.argv[2] != "0") if len(sys.argv) > 2 else True
    if len(sys.argv) > 3 and sys.argv[3] == "long":
        H, causal = 12, True
        op = ImprovedDilatedAttention([2048 << i for i in range(5)], [1 << i for i in range(5)], head_split=head_split)
    else:
        H, causal = 8, False
        op = ImprovedDilatedAttention([min(s, T // 2) for s in (1024, 2048, 4096)], [1, 2, 4], head_split=head_split)
    q, k, v = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        torch.autograd.grad(op(q, k, v, is_causal=causal), (q, k, v), g)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=18))
    print(events.table(sort_by="self_device_time_total", row_limit=12))
    launches = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 10
    print(f"T={T} head_split={head_split}: {launches:.0f} device kernels per fwd+bwd")


if __name__ == "__main__":
    main()
