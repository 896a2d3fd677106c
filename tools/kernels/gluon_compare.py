"""The Gluon forward (gluon_probe.py) against the Triton union kernels it would replace, on the
presets' own layouts: outputs compared, both timed in one process.

- `--union`: the long preset's forward local pass (causal 2,048-row segments with the weight
  terms of 5 branches), against `union._launch("fwd", passes=("local",))`.
- `--seed`: head_split's seed layout (non-causal, one launch a branch over its heads), against
  `union.forward` and dense cuDNN on the whole sequence, eager and in a CUDA graph (three Gluon
  launches with host-made descriptors are host-bound eager).

`python tools/kernels/gluon_compare.py --union [--lengths 32768 131072] [--configs 64x2 128x2]`,
`python tools/kernels/gluon_compare.py --seed --lengths 8192 32768`. CUDA, compute capability 9.0.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gluon_probe import LOG2E, forward, pairs, timed


def union_local(q, k, v, scale: float, branches: int = 5):
    """The union kernels' forward local pass (longctx/kernels/union.py) on LongNet's layout of
    `branches` branches from 2,048-row segments: (out, lse) before the upper levels add theirs."""
    from longctx.kernels import union

    B, T, H, D = q.shape
    lay = union.layout(T, H, D, [2048 << i for i in range(branches)], [1 << i for i in range(branches)], False)
    out = torch.empty_like(q)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    union._launch("fwd", q, lay, (q, k, v, out, lse, *union._strides(q, k, v), T, H, scale * LOG2E), True,
                  passes=("local",))
    return out, lse


def compare_union(lengths, configs, H: int, D: int, scale: float) -> None:
    """The Gluon kernel with the long preset's weights against the union local pass it would
    replace: their outputs and LSE, and their times, on the same inputs."""
    for T in lengths:
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref_out, ref_lse = union_local(q, k, v, scale)
        cells = {"triton local": lambda: union_local(q, k, v, scale)}
        for BM, stages in configs:
            out, lse = forward(q, k, v, 2048, scale, BM, stages, 1, True, 5)
            print(f"T={T} {BM}x{stages} against the Triton local pass: max |out - out'| "
                  f"{(out.float() - ref_out.float()).abs().max().item():.2e}, max |lse - lse'| "
                  f"{(lse - ref_lse).abs().max().item():.2e}", flush=True)
            cells[f"gluon {BM}x{stages}"] = lambda BM=BM, stages=stages: forward(q, k, v, 2048, scale, BM, stages, 1,
                                                                                   True, 5)
        flops = pairs(T, 2048, 1, True) * 4 * D * H
        ms = {name: timed(fn) for name, fn in cells.items()}
        print(f"T={T} local pass: " + ", ".join(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF/s"
                                                 for name, t in ms.items()), flush=True)


def compare_seed(lengths, configs, scale: float) -> None:
    """head_split's seed layout (8 heads of 64; segments 1,024 / 2,048 / 4,096 at dilations 1 / 2 / 4,
    each branch on its own group of heads; non-causal), batch 1 and 2: one launch a branch over
    its heads, against the union kernels' forward (Triton) and dense cuDNN on the whole sequence.
    Rows a head does not keep: output 0 and LSE −inf, as the union kernels write them."""
    from longctx.attention.layout import head_groups
    from longctx.kernels import union

    H, D, ws, rs = 8, 64, [1024, 2048, 4096], [1, 2, 4]
    groups = head_groups(H, len(ws), True)
    for T in lengths:
        for B in (1, 2):
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            lay = union.layout(T, H, D, ws, rs, True)

            def ours(BM, stages):
                out = torch.zeros_like(q)
                lse = torch.full((B, T, H), float("-inf"), device=q.device)
                for w, r, heads in zip(ws, rs, groups):
                    forward(q, k, v, w, scale, BM, stages, r, False, 1, heads, out, lse)
                return out, lse

            ref_out, ref_lse = union.forward(q, k, v, lay, False, scale)
            seq = [x.transpose(1, 2) for x in (q, k, v)]
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cells = {"dense cudnn": lambda: F.scaled_dot_product_attention(*seq, scale=scale)}
                cells["triton union"] = lambda: union.forward(q, k, v, lay, False, scale)
                for BM, stages in configs:
                    out, lse = ours(BM, stages)
                    same_rows = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
                    gap = torch.where(torch.isinf(ref_lse), 0.0, lse - ref_lse).abs().max().item()
                    print(f"T={T} B={B} {BM}x{stages} against the union kernels: max |out - out'| "
                          f"{(out.float() - ref_out.float()).abs().max().item():.2e}, max |lse - lse'| {gap:.2e}, "
                          f"the same rows kept: {same_rows}", flush=True)
                    cells[f"gluon {BM}x{stages}"] = lambda BM=BM, stages=stages: ours(BM, stages)
                ms = {name: timed(fn) for name, fn in cells.items()}
                graphed = {name: timed(fn, graph=True) for name, fn in cells.items()}
            print(f"T={T} B={B} seed forward: " + ", ".join(f"{name} {t:.3f} ms (graphed {graphed[name]:.3f})"
                                                            for name, t in ms.items()), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--union", action="store_true", help="the long preset's local pass")
    p.add_argument("--seed", action="store_true", help="head_split's seed layout")
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--configs", nargs="+", default=["64x2", "128x2"], help="tiles as ROWSxSTAGES")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    configs = [tuple(map(int, c.split("x"))) for c in args.configs]
    if args.union:
        compare_union(args.lengths, configs, 12, 64, 1 / math.sqrt(64))
    if args.seed:
        compare_seed(args.lengths, configs, 1 / math.sqrt(64))
    if not (args.union or args.seed):
        p.error("give --union, --seed or both")


if __name__ == "__main__":
    main()
