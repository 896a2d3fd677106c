"""The union kernels (longctx/kernels/union.py) on the GPU: tile sweep, then against the op's
per-branch path and dense SDPA.

1. Sweep: at the first length, each pass (fwd, dq, dkdv) under a few (rows, cols, warps, stages)
   tilings, each captured in a CUDA graph; the fastest goes into union.CONFIG for the rest.
2. Per length: forward+backward, graphed, of dense causal SDPA (cuDNN), the op with
   LONGCTX_UNION off (per-branch cuDNN calls and the one-pass combine) and on (union kernels);
   milliseconds, counted TFLOP/s (layout.dilated_flops, backward = 2.5x forward) and the ratio
   to dense; the union's local and upper passes timed apart; with head_split (not causal), also
   dense SDPA on the op's own pairs laid out as one batch of segments.
The long preset's layout: 12 heads of 64, segments 2048 … 32768, dilations 1 … 16, causal, bf16.
`seed`: the seed preset's at 8K instead, with head_split (8 heads, segments 1024 … 4096,
dilations 1 … 4, not causal), at batch 1, 2 and 4.

3. `local`: each direction's local pass alone at 64K under tilings that union.CONFIG cannot
   take (256-row tiles, which the upper pass's class tiles do not allow on the long preset).
4. `rotary`: each pass on contiguous q/k/v, on packed views, and packed with RoPE's rotation
   in the backward (attention/rotary.py).

Usage: python tools/kernels/union_probe.py [lengths...]   (default 65536 131072 262144)
       python tools/kernels/union_probe.py seed
       python tools/kernels/union_probe.py local [T]   (T a multiple of 32768, the largest segment; default 65536)
       python tools/kernels/union_probe.py rotary [T...]   (default 32768)
"""
import sys

import torch
import torch.nn.functional as F

from longctx.kernels import union
from longctx.attention.layout import dilated_flops, head_groups
from longctx.attention.improved import dilated_attention
from longctx.benchmark import graphed, timed

LONG = dict(ws=[2048, 4096, 8192, 16384, 32768], rs=[1, 2, 4, 8, 16], H=12, causal=True, split=False)
SEED = dict(ws=[1024, 2048, 4096], rs=[1, 2, 4], H=8, causal=False, split=True)
D = 64
SWEEP = {  # wider sweeps found (64-row tiles, 8 warps, 2 stages, 16 or 128 columns): slower everywhere
    "fwd": [(128, 64, 4, 4), (128, 64, 4, 3)],
    "dq": [(128, 32, 4, 4), (128, 32, 4, 3)],
    "dkdv": [(128, 32, 4, 3), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 4, 5), (128, 16, 4, 3)],
}

SEED_SWEEP = {  # batch 1 at 8K is ~320 tiles of 128 rows a pass for 132 SMs: 64 rows fill them better
    "fwd": [(64, 64, 4, 4), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 4, 4), (128, 128, 4, 2)],
    "dq": [(64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3)],
    "dkdv": [(64, 32, 4, 3), (64, 32, 4, 4), (64, 64, 4, 3), (128, 32, 4, 3)],
}


def ms(fn):
    """Median milliseconds of fn, captured in a CUDA graph."""
    return timed(graphed(fn), torch.device("cuda"), 3, 20, 20)[0]


def inputs(T, B, H):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]


def pass_args(T, B, spec, packed=False, rope=False, packed_grads=None):
    """(q, layout, causal, each pass's kernel arguments) on fresh inputs, out and lse from the op's
    forward; the dQ pass writes the Δ that the dK/dV pass reads. packed (packed_grads, default
    packed): q/k/v (their gradients) as views of one (B, T, 3, H, D) buffer; rope: with RoPE's
    angles (then launch the backward with ROPE=True)."""
    H = spec["H"]
    q, k, v, do = inputs(T, B, H)
    if packed:
        q, k, v = torch.stack((q, k, v), 2).unbind(2)
    lay, scale, causal = union.layout(T, H, D, spec["ws"], spec["rs"], spec["split"]), D ** -0.5, spec["causal"]
    out, lse = union.forward(q, k, v, lay, causal, scale)
    packed_grads = packed if packed_grads is None else packed_grads
    dq, dk, dv = torch.empty((B, T, 3, H, D), device="cuda", dtype=q.dtype).unbind(2) if packed_grads else \
        (torch.empty_like(q), torch.empty_like(q), torch.empty_like(q))
    stats = torch.empty((2, B * H, T), dtype=torch.float32, device=q.device)
    angles = (stats, stats)  # stands in for cos and sin without RoPE
    if rope:
        angles = tuple(torch.rand(T, D // 2, device="cuda") for _ in range(2))
    strides = union._strides(q, k, v, do, dq)  # dq, dk and dv share their strides
    return q, lay, causal, {
        "fwd": (q, k, v, out, lse, *union._strides(q, k, v), T, H, scale * union.LOG2E),
        "dq": (q, k, v, do, out, lse, stats, dq, *angles, *strides, T, H, scale * union.LOG2E, scale),
        "dkdv": (q, k, v, do, stats, dk, dv, *angles, *strides, T, H, scale * union.LOG2E, scale),
    }


CONSTS = {"fwd": {}, "dq": {"ROPE": False}, "dkdv": {"ROPE": False}}  # each direction's own constants


def rotary(T=32768, B=1, spec=LONG):
    """Each pass graphed, as the op runs it (contiguous q/k/v and gradients), then with q/k/v and
    the gradients as views of packed buffers, with RoPE's rotation in the backward's epilogues
    (attention/rotary.py) or not: what the strides cost, and what the rotation costs."""
    for packed, grads, rope in [(False, False, False), (True, True, False), (False, True, False), (False, True, True),
                                (True, True, True)]:
        q, lay, causal, args = pass_args(T, B, spec, packed, rope, grads)
        times = {f"{name} {which}": ms(lambda name=name, which=which: union._launch(
                     name, q, lay, args[name], causal, (which,), **({} if name == "fwd" else {"ROPE": rope})))
                 for name in args for which in ("local", "upper")}
        print(f"T={T} packed q/k/v {packed}, gradients {grads}, rope {rope}: {sum(times.values()):.3f} ms; "
              + ", ".join(f"{k} {t:.3f}" for k, t in times.items()), flush=True)


def passes(T, B, spec, which=("local", "upper")):
    """Callables for each pass of the union kernels on fresh inputs (`which` of the local and
    upper passes)."""
    q, lay, causal, args = pass_args(T, B, spec)
    return {name: (lambda name=name: union._launch(name, q, lay, args[name], causal, which, **CONSTS[name]))
            for name in args}


LOCAL_SWEEP = {  # (rows, cols, warps, stages), each after union.CONFIG's own, which the others are compared with
    "fwd": [(128, 32, 4, 4), (128, 64, 8, 4), (64, 64, 4, 4), (256, 32, 8, 4)],  # 128 × 32: the pipelined forward's
    "dq": [(128, 64, 8, 3), (256, 32, 8, 3), (256, 64, 8, 2), (128, 64, 4, 3)],
    # dkdv: 64-row tiles with deeper pipelines, for its wait on the next q/dO block (sass_probe:
    # 4 stages 167 registers, 3 programs an SM; 5 stages 226, 2)
    "dkdv": [(64, 32, 4, 4), (64, 32, 4, 5), (256, 32, 8, 3), (128, 32, 4, 4), (128, 64, 8, 2), (256, 16, 8, 3)],
}


def local_sweep(T=65536, B=1, spec=LONG):
    """The long preset's local passes launched with explicit tiles, each graphed (ms and real TF/s
    of the level-1 pairs: causal, L(L+1)/2 pairs a segment, 2 matmul units fwd, 3 dq, 4 dkdv)."""
    H, L = spec["H"], spec["ws"][0]
    _, lay, causal, args = pass_args(T, B, spec)
    pairs = B * H * T // L * L * (L + 1) / 2
    results = {"fwd": args["fwd"][3:4], "dq": args["dq"][7:8], "dkdv": args["dkdv"][5:7]}
    for name, configs in LOCAL_SWEEP.items():
        kernel = union.KERNELS[name][0]
        first = None
        for rows, cols, warps, stages in [union.CONFIG[name], *configs]:
            opts = dict(L=L, CAUSAL=causal, D=D, N_BR=lay.n, SPLIT=0, **CONSTS[name],
                        **union.tile_options(name, rows, cols, warps, stages))
            try:
                t = ms(lambda: kernel[(B * H, T // rows)](*args[name], **opts))
            except Exception as e:  # e.g. out of shared memory for a tiling
                print(f"  {name} {(rows, cols, warps, stages)}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            got = [x.float() for x in results[name]]
            first = first or [x.clone() for x in got]  # the first tiling's result: the others must agree
            err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, first))
            units = {"fwd": 2, "dq": 3, "dkdv": 4}[name]
            print(f"  T={T} local {name:5s} {(rows, cols, warps, stages)}: {t:.3f} ms "
                  f"({units * 2 * D * pairs / t / 1e9:.0f} real TF/s; max diff to the first {err:.1e})", flush=True)


def sweep(T, B=1, spec=LONG, grid=SWEEP):
    fns = passes(T, B, spec)
    for name, configs in grid.items():
        times = []
        lay = union.layout(T, spec["H"], D, spec["ws"], spec["rs"], spec["split"])
        config = union.config_for(torch.empty(B, T, spec["H"], D, device="cuda"), lay)
        for cfg in configs:
            config[name] = cfg
            try:
                times.append((ms(fns[name]), cfg))
            except Exception as e:  # e.g. out of shared memory for a tiling
                print(f"  {name} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
        for t, cfg in sorted(times):
            print(f"  T={T} {name:5s} {cfg}: {t:.3f} ms")
        config[name] = min(times)[1]
    print("best:", config, flush=True)


def compare(T, B=1, spec=LONG):
    H, ws, rs, causal, split = (spec[key] for key in ("H", "ws", "rs", "causal", "split"))
    q, k, v, do = (x.requires_grad_(i < 3) for i, x in enumerate(inputs(T, B, H)))
    counted = 3.5 * dilated_flops(B, T, H, D, tuple(ws), tuple(rs), split, causal)
    dense = 3.5 * 4 * B * H * D * T * T / (2 if causal else 1)

    def step(fn):
        def run():
            q.grad = k.grad = v.grad = None
            fn().backward(do)
        return run
    sdpa = step(lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal)
                .transpose(1, 2))
    op = step(lambda: dilated_attention(q, k, v, ws, rs, split, causal, D ** -0.5)[0])
    t_dense = ms(sdpa)
    union.ENABLED = False
    t_old = ms(op)
    union.ENABLED = True
    t_new = ms(op)
    rate, dense_rate = (lambda t: counted / t / 1e9), dense / t_dense / 1e9
    print(f"T={T} B={B}: dense {t_dense:.3f} ms ({dense_rate:.0f} TF/s); per-branch op {t_old:.3f} ms "
          f"({rate(t_old):.0f} counted TF/s, {rate(t_old) / dense_rate:.0%}); union op {t_new:.3f} ms "
          f"({rate(t_new):.0f}, {rate(t_new) / dense_rate:.0%})", flush=True)
    for which in ("local", "upper")[:1 if split else 2]:
        fns = passes(T, B, spec, (which,))
        print(f"   {which} passes: " + ", ".join(f"{name} {ms(fn):.3f} ms" for name, fn in fns.items()), flush=True)
    if split and not causal:
        t_seg, blocks, L = segments_as_dense(T, B, spec)
        print(f"   dense SDPA on the same pairs, {B * blocks} segments of {L} rows as one batch: {t_seg:.3f} ms "
              f"({rate(t_seg):.0f} counted TF/s, {rate(t_seg) / dense_rate:.0%} of dense)", flush=True)


def split_segments(T, spec):
    """(segments a batch element, rows a segment) of head_split's work: head h of branch i attends
    within each of its T / w_i segments over the w_i / r_i rows it keeps, so the op's pairs are
    those of Σ_i |heads_i|·T / w_i independent dense segments (L rows each in LongNet's layouts)."""
    ws, rs, H = spec["ws"], spec["rs"], spec["H"]
    (L,) = {w // r for w, r in zip(ws, rs)}
    return sum(len(heads) * T // w for heads, w in zip(head_groups(H, len(ws), True), ws)), L


def segments_as_dense(T, B, spec):
    """(ms, segments a batch element, rows a segment) of dense SDPA forward+backward, graphed, on
    head_split's own work laid out as one batch (split_segments). cuDNN's rate on them bounds what
    a kernel of its kind reaches on this work, against its rate over the whole sequence."""
    blocks, L = split_segments(T, spec)
    q, k, v, do = (torch.randn(B, blocks, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=i < 3)
                   for i in range(4))

    def run():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(do)
    return ms(run), blocks, L


if __name__ == "__main__":
    if sys.argv[1:2] == ["local"]:
        local_sweep(*[int(x) for x in sys.argv[2:3]])
    elif sys.argv[1:2] == ["rotary"]:
        for T in [int(x) for x in sys.argv[2:]] or [32768]:
            rotary(T)
    elif sys.argv[1:] == ["seed"]:
        sweep(8192, 4, SEED, SEED_SWEEP)  # SPLIT_CONFIG (from 1,056 tiles of 128 rows on 132 SMs)
        sweep(8192, 1, SEED, SEED_SWEEP)  # SMALL_CONFIG (320)
        for B in (1, 2, 4):
            compare(8192, B, SEED)
    else:
        lengths = [int(x) for x in sys.argv[1:]] or [65536, 131072, 262144]
        sweep(lengths[0])
        for T in lengths:
            compare(T)
