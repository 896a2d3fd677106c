"""`python -m longctx.benchmark`: time every variant against dense SDPA over batch × length.

Each cell is one (variant, dtype, head_split, batch, length, mode) with mode "fwd" or
"fwd+bwd". CUDA timings use CUDA events after warm-up; the median of the repeats is reported
with min and max. Peak memory is torch.cuda.max_memory_allocated() after
reset_peak_memory_stats(), inputs included (0 on CPU, where it is not measured). TFLOP/s
counts each variant's own flops() (backward = 2.5× forward). An OOM or error is written in its
cell and the run goes on; after an OOM a variant skips the longer lengths.

Ring variants run with the processes the launcher gives (`torchrun --nproc-per-node N -m
longctx.benchmark ...`): each rank holds T/P tokens and rank 0 writes the results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .attention import REGISTRY, variant
from .attention.layout import dense_flops

VARIANTS = ["sdpa", *REGISTRY]


def multihead(name: str) -> bool:
    return name != "sdpa" and variant(REGISTRY[name]).multihead


def context_parallel(name: str) -> bool:
    return name != "sdpa" and variant(REGISTRY[name]).context_parallel
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRESETS = {
    # The grid of the benchmark that started this project (the original dilated-attention-pytorch's):
    # 8 heads of 64, segments [min(s, T//2)], head_split on and off.
    "seed": dict(batch=[1, 2, 4], lengths=[2048, 4096, 8192], heads=8, head_dim=64, segments=[1024, 2048, 4096],
                 dilations=[1, 2, 4], clip_half=True, causal=False, head_split=[False, True]),
    # LongNet-style lengths: 32K up to 1M tokens, causal, batch 1.
    "long": dict(batch=[1], lengths=[2**15, 2**16, 2**17, 2**18, 2**19, 2**20], heads=12, head_dim=64,
                 segments=[2048, 4096, 8192, 16384, 32768], dilations=[1, 2, 4, 8, 16], clip_half=False, causal=True,
                 head_split=[False]),
    # A seconds-long CPU smoke run.
    "tiny": dict(batch=[1], lengths=[64, 128], heads=2, head_dim=16, segments=[16, 32], dilations=[1, 2],
                 clip_half=False, causal=True, head_split=[False, True]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m longctx.benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="seed")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all (ring only under torchrun)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd+bwd"], default=["fwd", "fwd+bwd"])
    p.add_argument("--batch", nargs="+", type=int, help="override the preset's batch sizes")
    p.add_argument("--lengths", nargs="+", type=int, help="override the preset's sequence lengths")
    p.add_argument("--heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--segments", nargs="+", type=int)
    p.add_argument("--dilations", nargs="+", type=int)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--head-split", choices=["off", "on", "both"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=5.0, help="time budget per cell (repeats shrink to fit)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA only: capture each cell's call in a CUDA graph and time its replay, i.e. GPU time "
                        "without Python and launch overhead (what a CUDA-graphed training step sees)")
    p.add_argument("--out", default="bench_out", help="folder for results.json and results.png")
    args = p.parse_args(argv)
    cfg = dict(PRESETS[args.preset])
    for key in ("batch", "lengths", "heads", "head_dim", "segments", "dilations", "causal"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.head_split:
        cfg["head_split"] = {"off": [False], "on": [True], "both": [False, True]}[args.head_split]
    return args, cfg


def layout(cfg, T):
    segs = [min(s, T // 2) if cfg["clip_half"] else s for s in cfg["segments"]]
    return segs, list(cfg["dilations"])


def build(name, cfg, T, head_split, device, dtype):
    if name == "sdpa":
        return None
    segs, dils = layout(cfg, T)
    cls = REGISTRY[name]
    if multihead(name):
        E = cfg["heads"] * cfg["head_dim"]
        return cls(E, cfg["heads"], segs, dils, head_split=head_split, device=device, dtype=dtype)
    return cls(segs, dils, head_split=head_split)


def flops_of(name, module, cfg, B, T, causal):
    H, D = cfg["heads"], cfg["head_dim"]
    if name == "sdpa":
        return dense_flops(B, T, H, D, causal)
    if multihead(name):
        return module.flops(B, T, causal)
    return module.flops(B, T, H, D, causal)


def make_call(name, module, B, T_local, cfg, causal, device, dtype, backward):
    """Returns a zero-argument function running one forward (and backward)."""
    H, D = cfg["heads"], cfg["head_dim"]
    shape = (B, T_local, H * D) if multihead(name) else (B, T_local, H, D)
    inputs = [torch.randn(shape, device=device, dtype=dtype, requires_grad=backward)]
    if not multihead(name):
        inputs += [torch.randn(shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(2)]
    params = list(module.parameters()) if module is not None else []

    def run():
        if name == "sdpa":
            q, k, v = (x.transpose(1, 2) for x in inputs)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        elif multihead(name):
            out = module(inputs[0], is_causal=causal)[0]
        else:
            out = module(*inputs, is_causal=causal)
        if backward:
            torch.autograd.grad(out, inputs + params, torch.ones_like(out))

    return run


def graphed(fn):
    """fn captured in a CUDA graph (after warm-up on a side stream, as capture requires); returns
    the graph's replay. Every tensor fn makes lives in the graph's memory pool."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def timed(fn, device, warmup, repeats, max_seconds):
    """Median/min/max milliseconds of fn over repeats (fewer if one call is slow)."""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.monotonic() + max_seconds
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if time.monotonic() > deadline:
            break
    return statistics.median(times), min(times), max(times), len(times)


def run_cell(name, cfg, B, T, head_split, mode, device, dtype, args, world):
    cell = dict(variant=name, batch=B, seq_len=T, head_split=head_split, mode=mode, dtype=str(dtype).split(".")[-1],
                cuda_graph=bool(args.cuda_graph))
    causal = cfg["causal"]
    T_local = T // world if context_parallel(name) else T
    try:
        module = build(name, cfg, T, head_split, device, dtype)
        fn = make_call(name, module, B, T_local, cfg, causal, device, dtype, mode == "fwd+bwd")
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if args.cuda_graph:
                fn = graphed(fn)
        med, lo, hi, n = timed(fn, device, args.warmup, args.repeats, args.max_seconds)
        flops = flops_of(name, module, cfg, B, T, causal) * (3.5 if mode == "fwd+bwd" else 1.0)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
        cell.update(status="ok", median_ms=med, min_ms=lo, max_ms=hi, repeats=n, peak_mem_mib=peak,
                    tflops=flops / (med * 1e-3) / 1e12 / (world if context_parallel(name) else 1),
                    seq_per_s=B / (med * 1e-3), tokens_per_s=B * T / (med * 1e-3))
    except torch.cuda.OutOfMemoryError:
        cell.update(status="OOM")
    except Exception as e:  # recorded in its cell; the run goes on
        cell.update(status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return cell


def print_table(cells, out=None):
    """The seed's layout: one table per (batch, length), fastest first, with a real memory column."""
    out = out or sys.stdout
    keys = sorted({(c["dtype"], c["mode"], c["head_split"], c["batch"], c["seq_len"]) for c in cells})
    for dtype, mode, hs, B, T in keys:
        rows = [c for c in cells if (c["dtype"], c["mode"], c["head_split"], c["batch"], c["seq_len"]) == (dtype, mode, hs, B, T)]
        rows.sort(key=lambda c: c.get("median_ms", float("inf")))
        graph = ", CUDA graph" if rows[0].get("cuda_graph") else ""
        print(f"\nBatch Size: {B}, Sequence Length: {T}  [{dtype}, {mode}, head_split={hs}{graph}]", file=out)
        print(f"| {'Implementation':<34}| {'Time (ms) median [min-max]':<28}| {'Throughput (seq/s)':>18} | {'TFLOP/s':>8} | {'Memory (MB)':>11} |", file=out)
        print("|" + "-" * 35 + "|" + "-" * 29 + "|" + "-" * 20 + "|" + "-" * 10 + "|" + "-" * 13 + "|", file=out)
        for c in rows:
            if c["status"] != "ok":
                print(f"| {c['variant']:<34}| {c['status'][:27]:<28}| {'':>18} | {'':>8} | {'':>11} |", file=out)
                continue
            t = f"{c['median_ms']:.3f} [{c['min_ms']:.3f}-{c['max_ms']:.3f}]"
            mem = "n/a" if c["peak_mem_mib"] is None else f"{c['peak_mem_mib']:.1f}"
            print(f"| {c['variant']:<34}| {t:<28}| {c['seq_per_s']:>18.1f} | {c['tflops']:>8.3g} | {mem:>11} |", file=out)


def plot(cells, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in cells if c["status"] == "ok" and c["batch"] == min(x["batch"] for x in cells)]
    mode = "fwd+bwd" if any(c["mode"] == "fwd+bwd" for c in ok) else "fwd"
    ok = [c for c in ok if c["mode"] == mode and not c["head_split"]] or [c for c in ok if c["mode"] == mode]
    memory = any(c["peak_mem_mib"] is not None for c in ok)  # measured on a GPU only
    fig, axes = plt.subplots(1, 2 if memory else 1, figsize=(12 if memory else 6.5, 4.5), squeeze=False)
    axes = axes[0]
    for name in dict.fromkeys(c["variant"] for c in ok):
        pts = sorted((c["seq_len"], c["median_ms"], c["peak_mem_mib"]) for c in ok if c["variant"] == name)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        if memory and all(p[2] is not None for p in pts):
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, label in zip(axes, ["time (ms)", "peak memory (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{mode}, batch {ok[0]['batch'] if ok else '?'}, {ok[0]['dtype'] if ok else ''}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args, cfg = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.cuda_graph and (world > 1 or not torch.cuda.is_available()):
        raise NotImplementedError("--cuda-graph needs one process on a CUDA device (the ring's P2P is not captured)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1:
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = int(os.environ.get("RANK", "0"))
    variants = args.variants or ([v for v in VARIANTS if context_parallel(v)] if world > 1 else VARIANTS)
    dtypes = [DTYPES[d] for d in (args.dtypes or (["bf16"] if device.type == "cuda" else ["fp32"]))]
    cells, too_long = [], {}
    for dtype in dtypes:
        for hs in cfg["head_split"]:
            for B in cfg["batch"]:
                for T in cfg["lengths"]:
                    for mode in args.modes:
                        for name in variants:
                            key = (name, dtype, hs, B, mode)
                            if T > too_long.get(key, float("inf")):
                                cells.append(dict(variant=name, batch=B, seq_len=T, head_split=hs, mode=mode,
                                                  dtype=str(dtype).split(".")[-1], status="skipped: OOM at a shorter length"))
                                continue
                            cell = run_cell(name, cfg, B, T, hs, mode, device, dtype, args, world)
                            if cell["status"] == "OOM":
                                too_long[key] = T
                            cells.append(cell)
                            if rank == 0:
                                print(f"  {name:<34} B={B} T={T} hs={hs} {mode:<7} {cell['status']}"
                                      + (f" {cell['median_ms']:.3f} ms" if cell["status"] == "ok" else ""), flush=True)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    torch=torch.__version__, world_size=world, command=" ".join(["python -m longctx.benchmark", *(argv if argv is not None else sys.argv[1:])]),
                    preset=args.preset, config=cfg, warmup=args.warmup, repeats=args.repeats)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(dict(meta=meta, cells=cells), f, indent=1)
        print_table(cells)
        written = [os.path.join(args.out, "results.json")]
        try:
            plot(cells, os.path.join(args.out, "results.png"))
            written.append(os.path.join(args.out, "results.png"))
        except ImportError:
            print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        print(f"wrote {' and '.join(written)}")
    if world > 1:
        torch.distributed.destroy_process_group()
    return cells


if __name__ == "__main__":
    main()
