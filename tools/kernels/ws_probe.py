"""Probe: longctx/kernels/csrc/ws_fwd.cu (hopper_cuda.py), attention inside segments with
FlashAttention-3's structure in CUDA C++ (a TMA producer warp giving its registers to two wgmma
consumer warpgroups), against cuDNN and the Gluon forward (gluon_probe.py) on the same problem.

The question it answers: on the long preset's level-1 geometry (causal segments of 2,048 rows,
12 heads of 64), where cuDNN reaches ~72% of its whole-sequence rate and the union kernels ~88% of
cuDNN (docs/performance.md), does the producer/consumer split make a kernel faster per FLOP than
cuDNN? The kernel is the union local pass, with or without its weight terms (gluon_probe.py's
problem). Its backward passes (ws_bwd.cu) are checked and timed by ws_bwd_probe.py.

`python tools/kernels/ws_probe.py [--lengths 32768 131072] [--segments 2048 0] [--full]`
(W 0: W = T) builds the kernels with nvcc for sm_90a, checks output and LSE against the float32
reference on q/k/v views of one fused projection, then times every mode, with one CTA an item and
persistent, cuDNN and the Gluon forward, and prints TFLOP/s (2·D per pair scored and head for each
matmul). `--build-only` compiles the kernels and prints ptxas' registers and spills and the SASS'
wgmma and TMA counts, which needs no GPU.
"""
import argparse
import itertools
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

from longctx.kernels.hopper_cuda import MODES, attend, build


def sass_counts(lib: Path) -> dict:
    """Instruction counts of each compiled kernel (the forward by mode, dkdv, dq), from the
    cuobjdump that Triton's package carries."""
    import triton
    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([tool, "--dump-sass", str(lib)], capture_output=True, text=True, check=True).stdout
    counts = {}
    for part in sass.split("Function : ")[1:]:
        header = part.split("\n", 1)[0]
        args = [int(a) for a in re.findall(r"L[bi](\d+)", header.split("kernelI", 1)[1].split("EEv", 1)[0])]
        if "ws_bwd" in header:  # by the template arguments <DQ, OVERLAP, UPPER>
            name = ("dkdv", "dq")[args[0]] + (" overlap" if args[1] else "") + (" upper" if args[2:3] == [1] else "")
        else:  # <MODE, UPPER>
            name = MODES[args[0]] + (" upper" if args[1:2] == [1] else "")
        lines = [line for line in part.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line) and " NOP" not in line]
        count = lambda word: sum(word in line for line in lines)
        counts[name] = {"instructions": len(lines), "HGMMA": count("HGMMA"), "waits on wgmma": count("WARPGROUP.DEPBAR"),
                        "TMA loads": count("UTMALDG"), "exp2": count("MUFU.EX2"), "register moves": count("USETMAXREG")}
    return counts


def forward(q, k, v, W: int, scale: float, causal: bool = True, mode: str = "sequential", branches: int = 1,
            ctas: int = 0):
    """(out (B, T, H, 64) bf16, lse (B, T, H) float32) of hopper_cuda.attend on new tensors."""
    import torch
    B, T, H, D = q.shape
    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    attend(q, k, v, out, lse, W, scale, causal, branches, mode, ctas)
    return out, lse


def check(H: int, scale: float, causal: bool) -> bool:
    """Output and LSE of every mode, without weights and with five branches' (the long
    preset's), against the float32 reference (gluon_bwd_probe.reference: each pair weighted by
    m = min(λ(x), λ(s)) + 1), for q/k/v views of one fused projection, B = 2, T = 1,024, W = 512
    and 1,024, one CTA an item and a persistent grid of 7 (an odd count, so that a CTA's items
    wrap the double-buffered Q and the K/V ring at every parity); the bound is twice cuDNN's own
    output error (unweighted) plus 1e-3."""
    import torch
    from gluon_bwd_probe import reference
    from gluon_probe import segments_sdpa
    from torch.nn.attention import SDPBackend
    ok = True
    qkv = torch.randn(2, 1024, 3, H, 64, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.unbind(2)
    no_grad = torch.zeros_like(q)  # the reference's backward runs too; its gradients are not read
    for W in (512, 1024):
        cudnn, _ = segments_sdpa(*(x.contiguous() for x in (q, k, v)), W, scale, SDPBackend.CUDNN_ATTENTION, causal)
        bound = 2 * (cudnn.float() - reference(q, k, v, no_grad, W, scale, causal)[0]).abs().max().item() + 1e-3
        for branches in (1, 5):
            ref_out, ref_lse = reference(q, k, v, no_grad, W, scale, causal, branches)[:2]
            for mode, ctas in itertools.product(MODES, (0, 7)):
                out, lse = forward(q, k, v, W, scale, causal, mode, branches, ctas)
                e_out, e_lse = (out.float() - ref_out).abs().max().item(), (lse - ref_lse).abs().max().item()
                good = e_out <= bound and e_lse <= 1e-3
                ok &= good
                print(f"check W={W} {'causal' if causal else 'full'} branches={branches} {mode} ctas={ctas}: "
                      f"max |out - ref| {e_out:.2e} (bound {bound:.2e}), "
                      f"max |lse - ref| {e_lse:.2e}: {'ok' if good else 'WRONG'}", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--segments", type=int, nargs="+", default=[2048, 0], help="W per case; 0: W = T")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--full", action="store_true", help="non-causal (the seed preset's), not causal")
    p.add_argument("--branches", type=int, default=1,
                   help="timed with the union local pass's weight terms of this many branches (5: the long preset's)")
    p.add_argument("--build-only", action="store_true", help="compile and count the SASS; no GPU needed")
    p.add_argument("--check-only", action="store_true", help="the checks, not the timings")
    args = p.parse_args(argv)
    if args.build_only:
        lib, report = build()
        print("\n".join(line for line in report.splitlines() if "registers" in line or "spill" in line or "arning" in line))
        print(sass_counts(lib))
        return
    import torch
    from gluon_probe import forward as gluon_forward, sweep
    torch.manual_seed(0)
    causal, scale = not args.full, 1 / math.sqrt(64)
    if not check(args.heads, scale, causal):
        sys.exit("ws_fwd is wrong: not timed")
    if args.check_only:
        return

    def cells(q, k, v, packed, W, R):
        n = args.branches
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = {f"cuda {mode}{' persistent' if ctas else ''}": lambda mode=mode, ctas=ctas:
                forward(q, k, v, W, scale, causal, mode, n, ctas) for mode in MODES for ctas in (0, sms)}
        return {**cuda, "gluon 128x2": lambda: gluon_forward(q, k, v, W, scale, 128, 2, 1, causal, n)}

    sweep(args.lengths, args.segments, [1], args.heads, scale, causal, cells)


if __name__ == "__main__":
    main()
