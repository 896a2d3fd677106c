"""Does cuDNN take an additive score bias for free? The dedup plan (scripts/dedup_probe.py) needs
log(count) added to each score; this times cuDNN with and without a bias on its call shapes.

Usage: python scripts/bias_probe.py  (GPU only)
"""

import torch
from kernel_probe import bench  # scripts/ is on sys.path when this runs as a script

from longctx.attention.kernels import _no_dropout_rng

aten = torch.ops.aten


def fwd(q, k, v, bias, causal):
    return aten._scaled_dot_product_cudnn_attention(q, k, v, bias, True, 0.0, causal, False, scale=0.125)[:2]


def bwd(do, q, k, v, o, lse, bias, causal):
    seed, off = _no_dropout_rng(q.device)
    return aten._scaled_dot_product_cudnn_attention_backward(do, q, k, v, o, lse, seed, off, bias, None, None,
                                                             q.shape[2], k.shape[2], 0.0, causal, scale=0.125)[:3]


def check(causal):
    n, h, L = 2, 1, 256
    q, k, v, do = (torch.randn(n, h, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    bias = torch.log(torch.randint(1, 6, (1, 1, L, L), device="cuda").float()).to(torch.bfloat16)
    o, lse = fwd(q, k, v, bias.expand(n, h, L, L), causal)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    s = qr @ kr.transpose(-1, -2) * 0.125 + bias.double()
    if causal:
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device="cuda").tril(), float("-inf"))
    ref = torch.softmax(s, -1) @ vr
    ref.backward(do.double())
    g = bwd(do, q, k, v, o, lse, bias.expand(n, h, L, L), causal)
    errs = [(a.double() - b).abs().max().item() for a, b in zip([o, *g], [ref, qr.grad, kr.grad, vr.grad])]
    print(f"bias check causal={causal}: max |err| out {errs[0]:.1e} dq {errs[1]:.1e} dk {errs[2]:.1e} dv {errs[3]:.1e}")


def case(n, h, L, causal, T):
    x = [torch.randn(n, L, h, 64, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(4)]
    q, k, v, do = x
    bias1 = torch.randn(1, 1, L, L, device="cuda", dtype=torch.bfloat16)
    biash = torch.randn(1, h, L, L, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, calls in (
        ("one call, no bias", [(q, k, v, do, None)]),
        ("per head, no bias", [(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], do[:, i:i + 1], None) for i in range(h)]),
        ("per head, bias (1,1,L,L)", [(q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1], do[:, i:i + 1],
                                       bias1.expand(n, 1, L, L)) for i in range(h)]),
        ("one call, bias (1,H,L,L)", [(q, k, v, do, biash.expand(n, h, L, L))]),
    ):
        try:
            outs = [fwd(a, b, c, bb, causal) for a, b, c, _, bb in calls]
            f = bench(lambda: [fwd(a, b, c, bb, causal) for a, b, c, _, bb in calls])
            g = bench(lambda: [bwd(d, a, b, c, o, l, bb, causal) for (a, b, c, d, bb), (o, l) in zip(calls, outs)])
            rows.append(f"{name}: fwd {f:.3f} bwd {g:.3f} total {f + g:.3f} ms")
        except Exception as e:
            rows.append(f"{name}: {type(e).__name__} {str(e)[:150]}")
    print(f"T={T} N={n} H={h} L={L} causal={causal}:\n  " + "\n  ".join(rows))


def main():
    check(True)
    check(False)
    for T in (65536, 262144):
        case(T // 2048, 12, 2048, True, T)     # level 1 (branch 1's segments)
        case(T // 4096, 6, 1024, False, T)     # level 2's new pairs, one of its two head groups


if __name__ == "__main__":
    main()
