"""Probe: tools/kernels/ws_fwd.cu, attention inside segments with FlashAttention-3's structure in
CUDA C++ (a TMA producer warp giving its registers to two wgmma consumer warpgroups), against
cuDNN and the Gluon forward (gluon_probe.py) on the same problem.

The question it answers: on the long preset's level-1 geometry (causal segments of 2,048 rows,
12 heads of 64), where cuDNN reaches ~72% of its whole-sequence rate and the union kernels ~88% of
cuDNN (docs/performance.md), does the producer/consumer split make a kernel faster per FLOP than
cuDNN? The kernel is the union local pass, with or without its weight terms (gluon_probe.py's
problem). Its backward passes (ws_bwd.cu) are checked and timed by ws_bwd_probe.py.

`python tools/kernels/ws_probe.py [--lengths 32768 131072] [--segments 2048 0] [--full]`
(W 0: W = T) builds the kernel with nvcc for sm_90a, checks output and LSE against the float32
reference on q/k/v views of one fused projection, then times it, cuDNN and the Gluon forward, and
prints TFLOP/s (2·D per pair scored and head for each matmul). `--build-only` compiles both
kernels and prints ptxas' registers and spills and the SASS' wgmma and TMA counts, which needs
no GPU.
"""
import argparse
import ctypes
import hashlib
import itertools
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SOURCES = [HERE / "ws_fwd.cu", HERE / "ws_bwd.cu"]  # one library; both include ws_common.cuh
MODES = ("sequential", "pipelined", "ping-pong")  # ws_fwd.cu's Mode, in order
FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--shared", "-Xcompiler", "-fPIC",
         "-Xptxas", "-v"]


def build() -> Path:
    """The shared library, compiled once per source text into LONGCTX_BUILD (default
    ~/.cache/longctx); ptxas' report printed when it compiles."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    text = b"".join(path.read_bytes() for path in [*SOURCES, HERE / "ws_common.cuh"])
    digest = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:12]
    folder = Path(os.environ.get("LONGCTX_BUILD", Path.home() / ".cache" / "longctx"))
    lib = folder / f"ws-{digest}.so"
    if not lib.exists():
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([nvcc, *FLAGS, *map(str, SOURCES), "-o", str(lib)], capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"nvcc failed:\n{done.stderr}")
        print("\n".join(line for line in done.stderr.splitlines() if "registers" in line or "spill" in line
                        or "arning" in line), flush=True)
    return lib


def sass_counts(lib: Path) -> dict:
    """Instruction counts of each compiled kernel (the forward by mode, dkdv, dq), from the
    cuobjdump that Triton's package carries."""
    import triton
    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump")
    sass = subprocess.run([tool, "--dump-sass", str(lib)], capture_output=True, text=True, check=True).stdout
    counts = {}
    for part in sass.split("Function : ")[1:]:
        header = part.split("\n", 1)[0]
        # by the mangled template argument
        name = (("dkdv", "dq")[int(header.split("ILb", 1)[1][0])] if "ws_bwd" in header
                else MODES[int(header.split("ILi", 1)[1][0])])
        lines = [line for line in part.splitlines()
                 if line.strip().startswith("/*") and "*/" in line[:16] and " NOP" not in line]
        count = lambda word: sum(word in line for line in lines)
        counts[name] = {"instructions": len(lines), "HGMMA": count("HGMMA"), "waits on wgmma": count("WARPGROUP.DEPBAR"),
                        "TMA loads": count("UTMALDG"), "exp2": count("MUFU.EX2"), "register moves": count("USETMAXREG")}
    return counts


def _tma_rows(q, k, v, *more) -> None:
    """Raises unless q/k/v (and `more`, dO) are bf16 (B, T, H, 64) rows that one TMA map reads in
    place (longctx.kernels.hopper._flat: heads adjacent, batches T rows apart, 16-byte rows), q/k/v
    with one set of strides (the kernels take one row stride for the three)."""
    import torch
    from longctx.kernels.hopper import _flat
    if q.shape[-1] != 64 or q.dtype != torch.bfloat16 or any(x.stride() != q.stride() for x in (k, v)) \
            or not all(_flat(x) for x in (q, k, v, *more)):
        raise ValueError(f"q/k/v/dO: bf16 heads of 64 read in place, q/k/v with one set of strides; got {q.dtype} "
                         f"{tuple(q.shape)}, strides {[x.stride() for x in (q, k, v, *more)]}")


class Kernel:
    def __init__(self):
        self.lib = ctypes.CDLL(str(build()))
        self.lib.ws_fwd.restype = ctypes.c_int
        ptr, i64, i32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int
        # q, k, v, their row stride, out, its row stride, lse, B, T, H, L, causal, scale, branches, mode, ctas,
        # stream
        self.lib.ws_fwd.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, i32, i32, i32, i32, i32, ctypes.c_float, i32,
                                    i32, i32, ptr]
        self.lib.ws_bwd.restype = ctypes.c_int
        # q, k, v, their row stride, dO, its row stride, STATS, two gradients, their row stride, B, T, H, L,
        # causal, scale, branches, dq, ctas, stream
        self.lib.ws_bwd.argtypes = [ptr, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i32, i32, i32, i32, i32,
                                    ctypes.c_float, i32, i32, i32, ptr]

    def __call__(self, q, k, v, W: int, scale: float, causal: bool = True, mode: str = "sequential",
                 branches: int = 1, ctas: int = 0):
        """(out (B, T, H, 64) bf16, lse (B, T, H) float32) of attention inside segments of W rows;
        q/k/v (B, T, H, 64) bf16 with heads contiguous and positions equally far apart in all three
        (contiguous tensors or one fused projection's views). mode: one of MODES (ws_fwd.cu's Mode).
        branches > 1 (at most 5): the union local pass's weight terms for LongNet's layout of that
        many branches. ctas > 0: a persistent grid of that many CTAs; 0: one CTA a 128-row tile."""
        import torch
        B, T, H, D = q.shape
        _tma_rows(q, k, v)
        out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        err = self.lib.ws_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), out.data_ptr(), out.stride(1),
                              lse.data_ptr(), B, T, H, W, int(causal), scale, branches, MODES.index(mode), ctas,
                              torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"ws_fwd returned {err} (T={T}, W={W}, H={H})")
        return out, lse

    def backward(self, q, k, v, dout, stats, W: int, scale: float, causal: bool = True, branches: int = 1,
                 dq: bool = False, ctas: int = 0):
        """(dK, dV), or with dq (dQ,), (B, T, H, 64) bf16, of __call__'s attention; q/k/v as there,
        dO (B, T, H, 64) bf16 with heads contiguous, STATS (2, B·H, T) float32: log2 LSE and
        Δ = rowsum(dO∘O) by position. ctas as in __call__."""
        import torch
        B, T, H, D = q.shape
        _tma_rows(q, k, v, dout)
        if stats.shape != (2, B * H, T) or not stats.is_contiguous():
            raise ValueError(f"STATS: (2, B·H, T) = {(2, B * H, T)} contiguous, got {tuple(stats.shape)}")
        grads = [torch.empty(B, T, H, D, dtype=q.dtype, device=q.device) for _ in range(1 if dq else 2)]
        err = self.lib.ws_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), dout.data_ptr(), dout.stride(1),
                              stats.data_ptr(), grads[0].data_ptr(), grads[-1].data_ptr(), grads[0].stride(1), B, T,
                              H, W, int(causal), scale, branches, int(dq), ctas,
                              torch.cuda.current_stream().cuda_stream)
        if err:
            raise RuntimeError(f"ws_bwd returned {err} (T={T}, W={W}, H={H}, dq={dq})")
        return tuple(grads)


def check(kernel, H: int, scale: float, causal: bool) -> bool:
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
                out, lse = kernel(q, k, v, W, scale, causal, mode, branches, ctas)
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
    args = p.parse_args(argv)
    if args.build_only:
        print(sass_counts(build()))
        return
    import torch
    from gluon_probe import forward as gluon_forward, sweep
    torch.manual_seed(0)
    causal, scale = not args.full, 1 / math.sqrt(64)
    kernel = Kernel()
    if not check(kernel, args.heads, scale, causal):
        sys.exit("ws_fwd is wrong: not timed")

    def cells(q, k, v, packed, W, R):
        n = args.branches
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        cuda = {f"cuda {mode}{' persistent' if ctas else ''}": lambda mode=mode, ctas=ctas:
                kernel(q, k, v, W, scale, causal, mode, n, ctas) for mode in MODES for ctas in (0, sms)}
        return {**cuda, "gluon 128x2": lambda: gluon_forward(q, k, v, W, scale, 128, 2, 1, causal, n)}

    sweep(args.lengths, args.segments, [1], args.heads, scale, causal, cells)


if __name__ == "__main__":
    main()
