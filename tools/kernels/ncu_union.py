"""Launch one local pass of the union kernels (long preset, 64K, union.CONFIG) for Nsight Compute.

Each pass's local kernel runs twice after its inputs are made (the first compiles it), so
`ncu -k regex:_fwd_local --launch-skip 1 --launch-count 1` profiles a warm launch. gpu_check.sh's
`ncu` stage runs this under ncu for each pass and prints where the warps stall.

Usage: python tools/kernels/ncu_union.py fwd|dq|dkdv [T]
"""
import sys

import torch

from longctx.kernels import union
from union_probe import CONSTS, LONG, pass_args

if __name__ == "__main__":
    name = sys.argv[1]
    T = int(sys.argv[2]) if len(sys.argv) > 2 else 65536
    q, lay, causal, args = pass_args(T, 1, LONG)
    if name == "dkdv":  # the dK/dV pass reads the statistics that the dQ local pass writes
        union._launch("dq", q, lay, args["dq"], causal, ("local",), **CONSTS["dq"])
    for _ in range(2):
        union._launch(name, q, lay, args[name], causal, ("local",), **CONSTS[name])
    torch.cuda.synchronize()
    print(f"{name} local pass at T={T}, tiles {union.CONFIG[name]}: launched twice")
