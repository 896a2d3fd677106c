"""Where the GPU waits in a profiled training step: its idle gaps, and what the host was doing.

`python scripts/trace_gaps.py --help` for the options. Reads the torch.profiler trace that `configs/profile.yaml` writes (*.pt.trace.json, found under
RUN_DIR), takes the profiled steps' GPU kernels and copies, and lists the gaps between them.
Each gap ends with work the host launched late: the script names the launch (the CUDA runtime
call whose correlation id the next kernel carries), how long after the gap began the host
issued it, and the innermost Lightning / user annotations around that call. Prints the GPU-busy
share of the steps and the gaps summed by the annotation that ended them.
"""
from __future__ import annotations

import bisect
import collections
import glob
import argparse
import json
import os

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*.pt.trace.json"), recursive=True), key=os.path.getmtime)
        if not found:
            raise SystemExit(f"no *.pt.trace.json under {path}")
        path = found[-1]
    with open(path) as f:
        return json.load(f)["traceEvents"]


def gaps(events: list[dict], min_gap_us: float = 20.0) -> tuple[float, float, list[dict]]:
    """(busy µs, span µs, gaps), the gaps each {start, length, launch_delay, launch, where}."""
    steps = [e for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep#")]
    lo = min(e["ts"] for e in steps) if steps else float("-inf")
    hi = max(e["ts"] + e["dur"] for e in steps) if steps else float("inf")
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and lo <= e["ts"] <= hi), key=lambda e: e["ts"])
    runtime = {e["args"]["correlation"]: e for e in events
               if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    notes = sorted((e for e in events if e.get("cat") == "user_annotation" and not e["name"].startswith("ProfilerStep")),
                   key=lambda e: e["ts"])
    starts = [e["ts"] for e in notes]
    busy, end, found = 0.0, None, []
    for e in gpu:
        s, f = e["ts"], e["ts"] + e.get("dur", 0)
        if end is not None and s - end >= min_gap_us:
            call = runtime.get(e.get("args", {}).get("correlation"))
            where = []
            if call is not None:  # annotations open at the launch, innermost last
                where = [n["name"] for n in notes[:bisect.bisect_right(starts, call["ts"])]
                         if n["ts"] + n["dur"] >= call["ts"]][-3:]
            found.append({"start": end, "length": s - end, "next": e["name"][:60],
                          "launch": call["name"] if call else "?",
                          "launch_delay": call["ts"] - end if call else float("nan"), "where": where})
        if end is None or s >= end:
            busy += f - s
        elif f > end:
            busy += f - end
        end = f if end is None else max(end, f)
    span = (end - gpu[0]["ts"]) if gpu else 0.0
    return busy, span, found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="a run folder holding a *.pt.trace.json (configs/profile.yaml writes one), or the trace")
    p.add_argument("--min-gap", type=float, default=20.0, help="shortest idle gap to list, µs (default 20)")
    p.add_argument("--top", type=int, default=15, help="how many gaps and annotations to list (default 15)")
    args = p.parse_args(argv)
    path, min_gap, top = args.path, args.min_gap, args.top
    events = load(path)
    busy, span, found = gaps(events, min_gap)
    n = sum(1 for e in events if e.get("cat") == "user_annotation" and e.get("name", "").startswith("ProfilerStep#"))
    idle = sum(g["length"] for g in found)
    print(f"{n} profiled steps: GPU span {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({busy / max(span, 1):.1%}), "
          f"{len(found)} gaps >= {min_gap:g} µs totalling {idle / 1e3:.2f} ms")
    by_where = collections.Counter()
    for g in found:
        by_where[" > ".join(g["where"][-2:]) or g["launch"]] += g["length"]
    for where, t in by_where.most_common(top):
        print(f"  {t / 1e3:8.3f} ms  ended by a launch in {where}")
    print("largest gaps:")
    for g in sorted(found, key=lambda g: -g["length"])[:top]:
        print(f"  {g['length']:8.0f} µs  next {g['next']!r} via {g['launch']} {g['launch_delay']:.0f} µs after the "
              f"GPU went idle, in {' > '.join(g['where']) or '-'}")


if __name__ == "__main__":
    main()
