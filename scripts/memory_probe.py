"""Where one block's forward + backward peaks in memory, eager against torch.compile.

`python scripts/memory_probe.py --help` for the options. GPU only. One Block of the
LongNet-size LM (768 wide, 12 heads) as configs/seq/1m.yaml builds it (LongNet layout up to T,
activation checkpointing, the SwiGLU in 128K-token chunks), under bf16 autocast as train.py runs
it, on a float32 input (the residual stream). For each mode it prints the peak memory that the
block's forward and its backward add to what is allocated before the step, and the tensors alive
at the backward's peak, grouped by size and by the innermost frame of our code or of Inductor's
generated code that allocated them (torch.cuda.memory history, replayed), and the tensors that
autograd keeps from the forward for the backward. nochunk: the SwiGLU over the whole sequence.
"""
import argparse
import collections

import torch

from longctx.attention import ImprovedDilatedAttention
from longctx.model import Block, CoreAttention, Rotary

GiB = 2 ** 30


def build(T: int, chunk: int | None) -> Block:
    ws = [w for w in (2048 << i for i in range(12)) if w <= T]
    attention = ImprovedDilatedAttention(segment_lengths=ws, dilation_rates=[1 << i for i in range(len(ws))])
    return Block(768, CoreAttention(768, 12, attention), 2048, 1e-5, chunk, checkpointing=True).cuda()


def where(frames) -> str:
    """The innermost frame in longctx/ or in Inductor's output code, else the innermost one."""
    for f in frames:
        name = f["filename"]
        if "longctx" in name or "torchinductor" in name or "/tmp/" in name:
            return f"{name.rsplit('/', 2)[-1]}:{f['line']} {f['name']}"
    return f"{frames[0]['filename'].rsplit('/', 1)[-1]}:{frames[0]['line']}" if frames else "?"


def live_at_peak(trace) -> tuple[int, list]:
    """Replays alloc / free events: (peak bytes above the trace's start, [(size, where)] alive then)."""
    total = peak = peak_at = 0
    for i, e in enumerate(trace):
        if e["action"] == "alloc":
            total += e["size"]
        elif e["action"] == "free_completed":
            total -= e["size"]
        if total > peak:
            peak, peak_at = total, i
    live = {}
    for e in trace[:peak_at + 1]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
        elif e["action"] == "free_completed":
            live.pop(e["addr"], None)
    return peak, list(live.values())


def run(mode: str, T: int, chunk: int | None) -> None:
    torch.manual_seed(0)
    block = build(T, chunk)
    if mode == "compile":
        block.compile()
    rope = Rotary(64).cuda().rotation(T, 0, "cuda")
    x = torch.randn(1, T, 768, device="cuda", requires_grad=True)
    for record in (False, True):  # the first pass compiles; the second is measured
        x.grad = None
        block.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if record:
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=500_000)
        saved = []

        def pack(t):
            saved.append((tuple(t.shape), t.dtype, t.numel() * t.element_size(), t.untyped_storage().data_ptr()
                          == x.untyped_storage().data_ptr()))
            return t

        with torch.autocast("cuda", torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = block(x, rope)
        torch.cuda.synchronize()
        fwd_peak = torch.cuda.max_memory_allocated() - base
        held = torch.cuda.memory_allocated() - base
        torch.cuda.reset_peak_memory_stats()
        y.backward(torch.ones_like(y))
        torch.cuda.synchronize()
        bwd_peak = torch.cuda.max_memory_allocated() - base
        del y
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    print(f"{mode} T={T}: forward peak +{fwd_peak / GiB:.2f} GiB, held after forward {held / GiB:.2f} GiB, "
          f"backward peak +{bwd_peak / GiB:.2f} GiB (above the {base / GiB:.2f} GiB before the step)")
    big = [s for s in saved if s[2] >= 2 ** 26]
    print(f"  saved for backward: {len(saved)} tensors, {sum(s[2] for s in saved) / GiB:.2f} GiB; of 64 MiB or more: "
          + ", ".join(f"{list(shape)} {str(dtype)[6:]}{' (the input)' if is_x else ''}" for shape, dtype, _, is_x in big))
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, live = live_at_peak(trace)
    groups = collections.Counter()
    counts = collections.Counter()
    for size, at in live:
        groups[(size, at)] += size
        counts[(size, at)] += 1
    print(f"  alive at the traced peak (+{peak / GiB:.2f} GiB), largest groups:")
    for (size, at), nbytes in groups.most_common(14):
        print(f"    {nbytes / GiB:6.2f} GiB = {counts[(size, at)]:3d} x {size / 2 ** 20:8.1f} MiB  {at}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("T", type=int, nargs="?", default=1 << 20, help="sequence length (default 1048576)")
    p.add_argument("modes", nargs="*", choices=["eager", "compile"], default=["eager", "compile"],
                   help="eager, compile or both (default)")
    p.add_argument("--nochunk", action="store_true", help="the SwiGLU over the whole sequence, not in 128K chunks")
    args = p.parse_args(argv)
    T, chunk = args.T, None if args.nochunk else 131072
    for mode in args.modes:
        run(mode, T, chunk)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
