"""Host time of the fast op, eager: how long Python and the launches take per call, against the
GPU time of the same call; and what the custom-op dispatch adds: forward + backward through the
module (EagerDilatedAttention) and through the custom op `longctx::dilated_attention`, and the
forward alone without autograd through the custom op and through `attend` directly.

Usage: python scripts/host_probe.py  (GPU only): the seed layout at 8K and 32K (head_split) and
the long preset at 32K, forward + backward; `breakdown`: instead, the host µs of each layer of
the eager path at seed 32K, from torch.empty up to autograd, and a Triton launch; `timeline`: one
eager call's host calls, runtime calls and kernels under torch.profiler, in order. (cProfile is
no help here: run 52 put most of the host time in torch's custom-op wrapper, which this
comparison showed to be an artefact, run 56.)
"""
import statistics
import sys
import time

import torch

from longctx.attention import ImprovedDilatedAttention
from longctx.attention.improved import attend, dilated_attention

CASES = [  # name, T, heads, segments, dilations, head_split, causal
    ("seed 8K", 8192, 8, [1024, 2048, 4096], [1, 2, 4], True, False),
    ("seed 32K", 32768, 8, [1024, 2048, 4096], [1, 2, 4], True, False),
    ("long 32K", 32768, 12, [2048, 4096, 8192, 16384, 32768], [1, 2, 4, 8, 16], False, True),
]


def host_ms(fn, reps=20):
    """Median host time of fn() started on an idle GPU."""
    for _ in range(5):
        fn()
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def launch_cost(reps=100):
    """Host µs a launch of the head_split forward kernel (seed 32K): JIT against compiled runner."""
    from longctx.attention import union
    from longctx.attention.union_kernels import _fwd_local

    T, H, D = 32768, 8, 64
    q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    lay = union.layout(T, H, D, [1024, 2048, 4096], [1, 2, 4], True)
    rows, cols, warps, stages = union._tiles("fwd", lay.L, 1, union.config_for(q, lay))
    outs = [(torch.full_like(q, float("nan")), torch.full((1, T, H), float("nan"), device="cuda")) for _ in range(2)]
    consts = dict(L=lay.L, CAUSAL=False, D=D, N_BR=1, SPLIT=lay.n, BM=rows, BN=cols)
    grid = (H, T // rows)

    def args(i):
        return (q, k, v, *outs[i], *union._strides(q, k, v), T, H, 0.125 * union.LOG2E)

    compiled = _fwd_local[grid](*args(0), **consts, num_warps=warps, num_stages=stages)
    runner = compiled[(*grid, 1)]  # the runner reads three grid dimensions
    named = dict(zip(_fwd_local.arg_names, args(1))) | consts
    ordered = [named[n] for n in _fwd_local.arg_names]
    runner(*ordered)
    torch.cuda.synchronize()
    same = all(torch.equal(a, b) for a, b in zip(outs[0], outs[1]))
    ja, jb = args(0), ordered
    for name, fn in (("JIT", lambda: _fwd_local[grid](*ja, **consts, num_warps=warps, num_stages=stages)),
                     ("compiled runner", lambda: runner(*jb))):
        ts = []
        for _ in range(5):
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            ts.append((time.perf_counter() - t) / reps * 1e6)
        print(f"  launch through the {name}: {statistics.median(ts):.1f} µs host a launch")
    print(f"  same output both ways: {same}")


def breakdown(T=32768, H=8, ws=(1024, 2048, 4096), rs=(1, 2, 4)):
    """Host µs of each layer of the eager path, seed layout with head_split, each call started
    on an idle GPU: where a forward+backward's host time goes, from torch.empty up to autograd."""
    from longctx.attention import union
    from longctx.attention.improved import EagerDilatedAttention, attend_backward

    q, k, v, g = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    config = (list(ws), list(rs), True, False, 0.125)
    lay = union.layout(T, H, 64, ws, rs, True)
    out, lse = attend(q, k, v, *config)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    y = EagerDilatedAttention.apply(*leaves, config)
    plain = leaves[0] * 2
    rows = [
        ("torch.empty (1, T, H, 64) bf16", lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device)),
        ("union.layout", lambda: union.layout(T, H, 64, ws, rs, True)),
        ("union.use", lambda: union.use(q, lay)),
        ("union.forward (1 launch, 2 empties)", lambda: union.forward(q, k, v, lay, False, 0.125)),
        ("union.backward (2 launches, 4 empties)", lambda: union.backward(g, q, k, v, out, lse, lay, False, 0.125)),
        ("attend (the forward's dispatch)", lambda: attend(q, k, v, *config)),
        ("attend_backward", lambda: attend_backward(g, q, k, v, out, lse, *config)),
        ("EagerDilatedAttention.apply, grad on", lambda: EagerDilatedAttention.apply(*leaves, config)),
        ("autograd.grad through it", lambda: torch.autograd.grad(y, leaves, g, retain_graph=True)),
        ("autograd.grad through x * 2 (the engine alone)", lambda: torch.autograd.grad(plain, leaves[0], g,
                                                                                       retain_graph=True)),
    ]
    for name, fn in rows:
        print(f"  {name:48s} {host_ms(fn, 50) * 1e3:7.1f} µs host", flush=True)
    engine_split(leaves, g, config)


def engine_split(leaves, g, config):
    """autograd.grad through the op, cut where the engine enters and leaves the op's backward:
    the time to reach it, its body (on the engine's device thread), and the return; against a
    Python Function whose backward is one multiply."""
    from longctx.attention.improved import EagerDilatedAttention

    marks, inside = [], []

    def cut(dout, saved, config):
        """µs of 10 torch.empty calls (each) and of union.backward on the calling thread."""
        from longctx.attention import union
        T, H = dout.shape[1:3]
        t0 = time.perf_counter()
        for _ in range(10):
            torch.empty(dout.shape, dtype=dout.dtype, device=dout.device)
        t1 = time.perf_counter()
        union.backward(dout, *saved, union.layout(T, H, 64, *config[:3]), config[3], config[4])
        t2 = time.perf_counter()
        return (t1 - t0) * 1e5, (t2 - t1) * 1e6

    class Timed(EagerDilatedAttention):
        @staticmethod
        def backward(ctx, dout):
            marks.append(time.perf_counter())
            grads = EagerDilatedAttention.backward(ctx, dout)
            marks.append(time.perf_counter())
            return grads

    class Inner(EagerDilatedAttention):
        @staticmethod
        def backward(ctx, dout):
            inside.append(cut(dout, ctx.saved_tensors, ctx.config))
            return EagerDilatedAttention.backward(ctx, dout)

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, config):
            return x * 2

        @staticmethod
        def backward(ctx, dout):
            marks.append(time.perf_counter())
            grad = dout * 2
            marks.append(time.perf_counter())
            return grad, None

    for name, y, inputs in (("the op", Timed.apply(*leaves, config), leaves),
                            ("x * 2 in a Python Function", Double.apply(leaves[0], config), leaves[:1])):
        parts = []
        for i in range(60):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            torch.autograd.grad(y, inputs, g, retain_graph=True)
            t3 = time.perf_counter()
            if i >= 10:
                parts.append(((marks[0] - t0) * 1e6, (marks[1] - marks[0]) * 1e6, (t3 - marks[1]) * 1e6))
        enter, body, leave = (statistics.median(p[j] for p in parts) for j in range(3))
        print(f"  autograd.grad through {name}: to its backward {enter:.1f} µs, the backward {body:.1f} µs, "
              f"back to the caller {leave:.1f} µs", flush=True)
    y = Inner.apply(*leaves, config)
    saved = (*(x.detach() for x in leaves), y.detach(), torch.zeros(y.shape[:3], device=y.device))
    here = []
    for _ in range(50):
        torch.cuda.synchronize()
        torch.autograd.grad(y, leaves, g, retain_graph=True)
        torch.cuda.synchronize()
        here.append(cut(g, saved, config))
    for name, rows in (("the engine's thread", inside[10:]), ("the caller's thread", here[10:])):
        print(f"  on {name}: torch.empty {statistics.median(r[0] for r in rows):.1f} µs, "
              f"union.backward {statistics.median(r[1] for r in rows):.1f} µs", flush=True)


def timeline(T=32768, device="cuda", reps=3):
    """One eager forward+backward of the benchmark's own cell (seed layout, head_split, batch 1),
    under torch.profiler: every top-level host call, CUDA runtime call and GPU kernel of the last
    of `reps` calls, as µs from the call's start, so the GPU's idle gaps show with what the host
    was doing then (the profiler adds its own host time: read the order and the gaps)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    from longctx.benchmark import make_call

    attn = ImprovedDilatedAttention([1024, 2048, 4096], [1, 2, 4], head_split=True)
    fn = make_call("improved_dilated", attn, 1, T, {"heads": 8, "head_dim": 64}, False, torch.device(device),
                   torch.bfloat16, True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(10):
        fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(reps):
            sync()
            with record_function("call"):
                fn()
            sync()
    events = prof.events()

    def depth(e):
        return 0 if e.cpu_parent is None else 1 + depth(e.cpu_parent)
    call = [e for e in events if e.name == "call" and e.device_type == DeviceType.CPU][-1]
    t0, t1 = call.time_range.start, call.time_range.end
    gpu_end = t1
    rows = []
    for e in events:
        start = e.time_range.start
        if e.device_type == DeviceType.CUDA and t0 <= start <= t1 + 5000:
            kind, gpu_end = "GPU", max(gpu_end, e.time_range.end)
        elif e.device_type == DeviceType.CPU and t0 <= start <= t1 and e.name.startswith(("cuda", "cu")):
            kind = "runtime"
        elif e.device_type == DeviceType.CPU and e is not call and t0 <= start <= t1 and depth(e) <= 2:
            kind = "host"  # the caller's calls and the autograd engine's (its own thread), two levels
        else:
            continue
        rows.append((start - t0, e.time_range.end - start, kind, e.name[:70]))
    print(f"one eager call, seed {T // 1024}K head_split: host {t1 - t0:.0f} µs, last kernel ends at "
          f"{gpu_end - t0:.0f} µs")
    for start, dur, kind, name in sorted(rows):
        print(f"  {start:8.1f} µs {dur:8.1f} µs  {kind:7s} {name}")


def main():
    if sys.argv[1:] == ["timeline"]:
        return timeline()
    if sys.argv[1:] == ["breakdown"]:
        launch_cost()
        return breakdown()
    print("Triton launch, seed 32K forward kernel:")
    launch_cost()
    for name, T, H, ws, rs, split, causal in CASES:
        attn = ImprovedDilatedAttention(ws, rs, head_split=split)
        q, k, v = (torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn(1, T, H, 64, device="cuda", dtype=torch.bfloat16)
        fwd, bwd, gpu = [], [], []
        for i in range(25):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a.record()
            out = attn(q, k, v, is_causal=causal)
            t1 = time.perf_counter()
            out.backward(g)
            t2 = time.perf_counter()
            b.record()
            b.synchronize()
            if i >= 5:  # after warm-up
                fwd.append((t1 - t0) * 1e3)
                bwd.append((t2 - t1) * 1e3)
                gpu.append(a.elapsed_time(b))
        print(f"{name}: host fwd {statistics.median(fwd):.3f} ms, host bwd {statistics.median(bwd):.3f} ms, "
              f"GPU (events, fwd+bwd) {statistics.median(gpu):.3f} ms")
        config = (ws, rs, split, causal, 0.125)
        op_step = host_ms(lambda: dilated_attention(q, k, v, *config)[0].backward(g))
        print(f"  forward + backward through the custom op: host {op_step:.3f} ms")
        args = (q.detach(), k.detach(), v.detach(), *config)
        op, direct = host_ms(lambda: dilated_attention(*args)), host_ms(lambda: attend(*args))
        print(f"  forward without autograd: custom op {op:.3f} ms, its Python implementation directly {direct:.3f} ms")


if __name__ == "__main__":
    main()
