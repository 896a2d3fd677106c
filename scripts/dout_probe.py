"""Does the upstream gradient's content change the timings? The op (union kernels) and dense SDPA,
forward+backward captured in one CUDA graph, with dO = ones (as longctx.benchmark passes) and dO
random, in turns. Usage: python scripts/dout_probe.py [T ...]   (default 65536)"""
import sys

import torch
import torch.nn.functional as F

from longctx.attention.improved import dilated_attention
from union_probe import D, LONG, inputs, ms

if __name__ == "__main__":
    for T in [int(x) for x in sys.argv[1:]] or [65536]:
        q, k, v, rnd = (x.requires_grad_(i < 3) for i, x in enumerate(inputs(T, 1, LONG["H"])))
        ones = torch.ones_like(rnd)
        fns = {"dense": lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                                               is_causal=True).transpose(1, 2),
               "union": lambda: dilated_attention(q, k, v, LONG["ws"], LONG["rs"], False, True, D ** -0.5)[0]}
        for name, fn in fns.items():
            for label, do in (("ones", ones), ("random", rnd), ("ones", ones), ("random", rnd)):
                t = ms(lambda: torch.autograd.grad(fn(), (q, k, v), do))
                print(f"T={T} {name} dO {label}: {t:.3f} ms", flush=True)
