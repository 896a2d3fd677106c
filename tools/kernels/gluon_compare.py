"""The Gluon forward (gluon_probe.py) against the Triton union kernels it would replace, on the
presets' own layouts: outputs compared, both timed in one process.

- `--union`: the long preset's local passes (causal 2,048-row segments with the weight terms of
  5 branches): the forward against `union._launch("fwd", passes=("local",))`, then
  gluon_bwd_probe.py's dQ and dK/dV (64-row tiles) against the local dQ and dK/dV passes.
- `--seed`: head_split's seed layout (non-causal, one launch a branch over its heads), against
  `union.forward` and dense cuDNN on the whole sequence, eager and in a CUDA graph (three Gluon
  launches with host-made descriptors are host-bound eager); then forward and backward (64-row
  tiles) against `union.forward` + `union.backward`.

`python tools/kernels/gluon_compare.py --union [--lengths 32768 131072] [--configs 64x2 128x2]`,
`python tools/kernels/gluon_compare.py --seed --lengths 8192 32768`. CUDA, compute capability 9.0.
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gluon_bwd_probe import backward
from gluon_probe import forward, pairs, timed


def long_layout(x, branches: int = 5):
    """The union kernels' Layout of LongNet's `branches` branches from 2,048-row segments (the long
    preset's, at 5) for x (B, T, H, D)."""
    from longctx.kernels import union

    B, T, H, D = x.shape
    return union.layout(T, H, D, [2048 << i for i in range(branches)], [1 << i for i in range(branches)], False)


def union_local(q, k, v, scale: float, branches: int = 5):
    """The union kernels' forward local pass (longctx/kernels/union.py) on LongNet's layout of
    `branches` branches from 2,048-row segments: (out, lse) before the upper levels add theirs."""
    from longctx.kernels import union

    B, T, H, D = q.shape
    lay = long_layout(q, branches)
    out = torch.empty_like(q)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    union.triton_forward(q, k, v, out, lse, lay, True, scale, passes=("local",))
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


SEED = [1024, 2048, 4096], [1, 2, 4]  # head_split's seed layout: segments, dilations


def seed_forward(q, k, v, scale: float, BM: int, stages: int):
    """(out, lse) of head_split's seed layout by the Gluon forward, one launch a branch over its
    group of heads; rows a head does not keep: output 0 and LSE −inf, as the union kernels write them."""
    from longctx.attention.layout import head_groups

    B, T, H, D = q.shape
    out = torch.zeros_like(q)
    lse = torch.full((B, T, H), float("-inf"), device=q.device)
    for w, r, heads in zip(*SEED, head_groups(H, len(SEED[0]), True)):
        forward(q, k, v, w, scale, BM, stages, r, False, 1, heads, out, lse)
    return out, lse


def union_local_backward(q, k, v, do, out, lse, scale: float, which=("dq", "dkdv")):
    """The union kernels' local dQ and dK/dV passes on the long preset's layout (5 branches from
    2,048-row segments) given the forward's out and LSE."""
    from longctx.kernels import union

    B, T, H, D = q.shape
    lay = long_layout(q)
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    stats = torch.empty((2, B * H, T), dtype=torch.float32, device=q.device)
    for name in which:
        union.triton_backward(name, do, q, k, v, out, lse, stats, (dq, dk, dv), lay, True, scale, passes=("local",))
    return dq, dk, dv, stats


def compare_seed_step(lengths, configs, scale: float) -> None:
    """head_split's seed layout, forward and backward: one Gluon launch a
    branch and kernel over its heads, against the union kernels' union.forward + union.backward
    and dense cuDNN on the whole sequence; gradients compared with the union kernels', every cell
    timed eager and in a CUDA graph."""
    from longctx.attention.layout import head_groups
    from longctx.kernels import union

    H, D = 8, 64
    groups = head_groups(H, len(SEED[0]), True)
    for T in lengths:
        for B in (1, 2):
            q, k, v, do = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            lay = union.layout(T, H, D, *SEED, True)

            def ours(BM, stages):
                out, lse = seed_forward(q, k, v, scale, BM, stages)
                grads = tuple(torch.zeros_like(q) for _ in range(3))
                for w, r, heads in zip(*SEED, groups):
                    backward(q, k, v, do, out, lse, w, scale, BM, stages, r, False, 1, grads=grads, heads=heads)
                return grads

            def theirs():
                out, lse = union.forward(q, k, v, lay, False, scale)
                return union.backward(do, q, k, v, out, lse, lay, False, scale)

            seq = [x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v)]

            def dense():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    out = F.scaled_dot_product_attention(*seq, scale=scale)
                return torch.autograd.grad(out, seq, do.transpose(1, 2))

            ref = theirs()
            cells = {"dense cudnn": dense, "triton union": theirs}
            for BM, stages in configs:
                gaps = ", ".join(f"{name} {(g.float() - r.float()).abs().max().item():.1e}"
                                 for name, g, r in zip(("dq", "dk", "dv"), ours(BM, stages), ref))
                print(f"T={T} B={B} {BM}x{stages} against the union kernels: max |g - g'|: {gaps}", flush=True)
                cells[f"gluon {BM}x{stages}"] = lambda BM=BM, stages=stages: ours(BM, stages)
            ms = {name: timed(fn) for name, fn in cells.items()}
            graphed = {name: timed(fn, graph=True) for name, fn in cells.items() if name != "dense cudnn"}
            print(f"T={T} B={B} seed fwd+bwd: " + ", ".join(
                f"{name} {t:.3f} ms" + (f" (graphed {graphed[name]:.3f})" if name in graphed else "")
                for name, t in ms.items()), flush=True)


def compare_union_backward(lengths, configs, H: int, D: int, scale: float) -> None:
    """The Gluon backward kernels (the op's, hopper_kernels.py) with the long preset's weights
    against the union kernels' local dQ and dK/dV passes, given the same forward (Gluon's local
    pass); the dK/dV kernels timed alone read the STATS the Triton dQ pass wrote: gradients
    compared, each kernel and both timed in a CUDA graph."""
    for T in lengths:
        q, k, v, do = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        out, lse = forward(q, k, v, 2048, scale, 64, 2, 1, True, 5)
        *ref, stats = union_local_backward(q, k, v, do, out, lse, scale)
        cells = {f"triton {which}": lambda which=which: union_local_backward(q, k, v, do, out, lse, scale, (which,))
                 for which in ("dq", "dkdv")}
        cells["triton both"] = lambda: union_local_backward(q, k, v, do, out, lse, scale)
        for BM, stages in configs:
            got = backward(q, k, v, do, out, lse, 2048, scale, BM, stages, 1, True, 5)
            gaps = ", ".join(f"{name} {(g.float() - r.float()).abs().max().item():.1e}"
                             for name, g, r in zip(("dq", "dk", "dv"), got, ref))
            print(f"T={T} {BM}x{stages} backward against the Triton local passes: max |g - g'|: {gaps}", flush=True)
            for which in (("dq",), ("dkdv",), ("dq", "dkdv")):
                cells[f"gluon {BM}x{stages} {'both' if len(which) == 2 else which[0]}"] = (
                    lambda which=which, BM=BM, stages=stages: backward(q, k, v, do, out, lse, 2048, scale, BM, stages,
                                                                       1, True, 5, which, stats=stats))
        flops = 2.5 * pairs(T, 2048, 1, True) * 4 * D * H
        ms = {name: timed(fn, graph=True) for name, fn in cells.items()}
        print(f"T={T} local backward, graphed: " + ", ".join(
            f"{name} {t:.3f} ms" + (f" {flops / t / 1e9:.0f} TF/s" if "both" in name else "") for name, t in ms.items()),
            flush=True)


def compare_seed(lengths, configs, scale: float) -> None:
    """head_split's seed layout (8 heads of 64; segments 1,024 / 2,048 / 4,096 at dilations 1 / 2 / 4,
    each branch on its own group of heads; non-causal), batch 1 and 2: one launch a branch over
    its heads, against the union kernels' forward (Triton) and dense cuDNN on the whole sequence.
    Rows a head does not keep: output 0 and LSE −inf, as the union kernels write them."""
    from longctx.kernels import union

    H, D = 8, 64
    for T in lengths:
        for B in (1, 2):
            q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            lay = union.layout(T, H, D, *SEED, True)

            def ours(BM, stages):
                return seed_forward(q, k, v, scale, BM, stages)

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
        compare_union_backward(args.lengths, [c for c in configs if c[0] == 64], 12, 64, 1 / math.sqrt(64))
    if args.seed:
        compare_seed(args.lengths, configs, 1 / math.sqrt(64))
        compare_seed_step(args.lengths, [c for c in configs if c[0] == 64], 1 / math.sqrt(64))
    if not (args.union or args.seed):
        p.error("give --union, --seed or both")


if __name__ == "__main__":
    main()
