"""The union kernels of this tree against another tree's, on the GPU, in one process.

Each NAME=PATH names a directory that holds another copy of the `longctx` package (e.g. one
`git archive` of an older commit); its union module is loaded under its own name, so its kernels
compile apart from ours. For each layout and each copy: the union forward, and the backward
(dQ then dK/dV passes), each captured in a CUDA graph, timed in turns (ours, theirs, ours, …) so
that the host's drift falls on both; the gradients must agree with ours to bf16's rounding.
The sums of the two graphs run 5-9% above one graph of forward and backward: read the ratios
between trees, not the times against dense SDPA measured elsewhere.

The layouts: the long preset (12 heads of 64, segments 2048 … 32768, causal) at 64K, 128K and
256K, batch 1; the seed preset with head_split (8 heads, segments 1024 … 4096, full) at 8K,
batch 1, 2 and 4.

Usage: python tools/kernels/ab_probe.py [NAME=PATH ...]   (none: this tree's timings alone)
       AB_CASES=256K …: only the cases whose label holds one of these words
"""
import importlib
import os
import statistics
import sys
import types
from pathlib import Path

from longctx.kernels import union
from longctx.benchmark import graphed, timed

from union_probe import D, LONG, SEED, inputs  # the presets' layouts and inputs, as union_probe times them

CASES = [  # (label, B, T, layout)
    *[(f"long {T // 1024}K", 1, T, LONG) for T in (65536, 131072, 262144)],
    *[(f"seed 8K B={B}", B, 8192, SEED) for B in (1, 2, 4)],
]


def load(name: str, path: str):
    """The union module of the longctx package under path, imported as package `name`."""
    package = types.ModuleType(name)  # longctx is a namespace package: no __init__ to run
    package.__path__ = [str(Path(path) / "longctx")]
    sys.modules[name] = package
    return importlib.import_module(f"{name}.attention.union")


def main(others: dict[str, str]) -> None:
    modules = {"this": union, **{name: load(name, path) for name, path in others.items()}}
    words = os.environ.get("AB_CASES", "").split()
    for label, B, T, spec in CASES:
        if words and not any(w in label for w in words):
            continue
        q, k, v, do = inputs(T, B, spec["H"])
        lay = union.layout(T, spec["H"], D, spec["ws"], spec["rs"], spec["split"])
        causal, scale = spec["causal"], D ** -0.5
        fns, grads, saved = {}, {}, {}
        for name, mod in modules.items():
            # out and lse must outlive the backward's graph, which reads them at their addresses (a
            # later capture's empty_cache would unmap them: illegal accesses seen on an H200)
            saved[name] = out, lse = mod.forward(q, k, v, lay, causal, scale)
            grads[name] = mod.backward(do, q, k, v, out, lse, lay, causal, scale)
            fns[name] = (graphed(lambda mod=mod: mod.forward(q, k, v, lay, causal, scale)),
                         graphed(lambda mod=mod, out=out, lse=lse: mod.backward(do, q, k, v, out, lse, lay, causal,
                                                                                   scale)))
        times = {name: ([], []) for name in modules}
        for _ in range(5):  # in turns
            for name, (fwd, bwd) in fns.items():
                times[name][0].append(timed(fwd, q.device, 2, 10, 10)[0])
                times[name][1].append(timed(bwd, q.device, 2, 10, 10)[0])
        base_f, base_b = (statistics.median(t) for t in times["this"])
        for name in modules:
            f, b = (statistics.median(t) for t in times[name])
            err = max(((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
                      for a, r in zip(grads[name], grads["this"]))
            print(f"{label:14s} {name:8s} fwd {f:.3f} ms  bwd {b:.3f} ms  fwd+bwd {f + b:.3f} ms "
                  f"({(f + b) / (base_f + base_b):.3f}x this; gradients' max diff to this {err:.1e})", flush=True)


if __name__ == "__main__":
    if not all("=" in a for a in sys.argv[1:]):
        sys.exit(__doc__)
    main(dict(a.split("=", 1) for a in sys.argv[1:]))
