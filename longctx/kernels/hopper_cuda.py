"""The union kernels' passes on Hopper GPUs (sm_90) in CUDA C++ (csrc/ws_fwd.cu, ws_bwd.cu), with
FlashAttention-3's structure: a TMA producer warp giving its registers to two wgmma consumer
warpgroups, over a persistent grid. union.forward and union.backward run them in place of the
Triton (forward) and Gluon (hopper.py, backward) local passes where `use_forward` and
`use_backward` hold, RoPE's rotation of dQ and dK and head_split included, and in place of the
Triton upper passes too where the segments hold their 128-row class tiles (`takes_upper`: the
long preset's); the Triton and Gluon passes stay the path everywhere else. Where the rows of
each pass are, and their weights, is csrc/ws_layout.cuh, which tests/test_ws_layout.py checks on
the CPU.

Why CUDA: Triton 3.6 cannot give a producer warp's registers to the consumers (ptxas C7512), and
the structure needs 240 registers a consumer thread. The kernels are compiled with the CUDA
toolkit's nvcc on first use into LONGCTX_BUILD (default ~/.cache/longctx), one library per source
text, and called through ctypes; without nvcc the Triton pass runs, with one warning.
LONGCTX_CUDA_WATCHDOG=1 builds a debugging version whose mbarrier waits trap, naming the barrier,
instead of hanging (scripts/gpu_check.sh's `ws` and `cuda` stages check the kernels with it first).

Off unless LONGCTX_HOPPER_CUDA=1: the kernels are exact on an H100, but the version measured there
ran below cuDNN's rate on the long preset's segments (259–267 against 364–415 TF/s) and was not
timed against the Triton local pass; this one (half the instructions a key tile, a persistent
grid, head_split, the upper passes) is not yet measured (docs/performance.md).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from . import sm_count
from .hopper import _flat, _hopper

ENABLED = os.environ.get("LONGCTX_HOPPER_CUDA", "0") == "1"
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("ws_fwd.cu", "ws_bwd.cu")]
HEADERS = [Path(__file__).parent / "csrc" / name
           for name in ("ws_common.cuh", "ws_layout.cuh", "ws_fwd_tile.cuh", "ws_bwd_tile.cuh")]
FLAGS = ["-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "--shared", "-Xcompiler", "-fPIC",
         "-Xptxas", "-v"]
# A debugging build: a wait on an mbarrier that has not completed after ~2^24 tries prints the
# barrier and traps (the launch fails) instead of hanging (ws_common.cuh's bar_wait).
WATCHDOG = os.environ.get("LONGCTX_CUDA_WATCHDOG", "0") == "1"
if WATCHDOG:
    FLAGS.append(f"-DWS_WATCHDOG={1 << 24}")
MODES = ("sequential", "pipelined", "ping-pong")  # ws_fwd.cu's Mode, in order
ROWS = 128  # query rows a CTA's item: segments must be whole items
MAX_SPLIT = 4  # head_split's branches: a tensor map each for dilations 1, 2, 4, 8 (ws_common.cuh)


def nvcc() -> str | None:
    """The CUDA toolkit's compiler: on PATH, under CUDA_HOME, or in /usr/local/cuda."""
    for path in (shutil.which("nvcc"), Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"):
        if path and Path(path).is_file():
            return str(path)
    return None


def target() -> Path:
    """Where build puts the library: named by the digest of the sources and FLAGS, so that an
    edited source or the watchdog build is another file."""
    text = b"".join(path.read_bytes() for path in [*SOURCES, *HEADERS])
    digest = hashlib.sha256(text + " ".join(FLAGS).encode()).hexdigest()[:12]
    return Path(os.environ.get("LONGCTX_BUILD", Path.home() / ".cache" / "longctx")) / f"ws-{digest}.so"


def build() -> tuple[Path, str]:
    """(the shared library, ptxas' report if this call compiled it): compiled once per source
    text and flags into LONGCTX_BUILD (default ~/.cache/longctx). Several processes may build at
    once (DDP ranks): each compiles to its own temporary file and renames it into place."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("no nvcc (the CUDA toolkit's compiler) on PATH, under CUDA_HOME or in /usr/local/cuda")
    lib = target()
    if lib.exists():
        return lib, ""
    folder = lib.parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        part = Path(tmp) / lib.name
        done = subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(part)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"nvcc failed on {', '.join(p.name for p in SOURCES)}:\n{done.stderr}")
        os.replace(part, lib)
    return lib, done.stderr


_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int, ctypes.c_float
# The entry points' argument types, in the order of their C prototypes (the .cu files' extern "C"
# functions, which tests/test_hopper_cuda.py reads to check these against them); each returns int.
SIGNATURES = {
    # q, k, v, their row strides, out, its row stride, lse, B, T, H, L, causal, scale, branches, split, mode,
    # ctas, stream
    "ws_fwd": [_P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _I32, _I32, _I32, _I32, _I32, _F32, _I32, _I32, _I32, _I32,
               _P],
    # q, k, v, their row strides, dO, its row stride, STATS, out, its row stride, lse, RoPE's cos and sin,
    # two gradients, their row stride, B, T, H, L, causal, scale, branches, split, dq, overlap, ctas, stream
    "ws_bwd": [_P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _I64, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32,
               _I32, _F32, _I32, _I32, _I32, _I32, _I32, _P],
    # q, k, v, their row strides, out, its row stride, lse, B, T, H, L, causal, scale, branches, ctas, stream
    "ws_fwd_upper": [_P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _I32, _I32, _I32, _I32, _I32, _F32, _I32, _I32, _P],
    # q, k, v, their row strides, dO, its row stride, STATS, RoPE's cos and sin, two gradients, their row
    # stride, B, T, H, L, causal, scale, branches, dq, ctas, stream
    "ws_bwd_upper": [_P, _P, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I32,
                     _F32, _I32, _I32, _I32, _P],
}


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The kernels' library with its entry points' argument types (SIGNATURES)."""
    lib = ctypes.CDLL(str(build()[0]))
    for name, types in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = _I32, types
    return lib


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the library builds and loads here; warns once, with the reason, where it does not."""
    try:
        library()
    except (RuntimeError, OSError) as e:
        warnings.warn(f"LONGCTX_HOPPER_CUDA=1 but the CUDA kernels are unavailable, so the other local passes run: {e}")
        return False
    return True


def readable(*xs: torch.Tensor) -> bool:
    """Whether these (B, T, H, 64) bf16 tensors are rows the kernels' TMA maps read in place."""
    return all(x.dtype == torch.bfloat16 and x.shape[-1] == 64 and _flat(x) for x in xs)


def takes(lay) -> bool:
    """Whether the kernels compute the union layout `lay`: segments of whole 128-row items, and at
    most five branches' weight terms, or head_split over at most MAX_SPLIT branches."""
    return lay.L % ROWS == 0 and lay.n <= (MAX_SPLIT if lay.split else 5)


def takes_upper(lay) -> bool:
    """Whether the kernels compute the upper passes of `lay` too (ws_layout.cuh's upper items):
    weight terms of 2 … 5 branches, no head_split, and class tiles of 128 rows 2^(n−1) positions
    apart within a segment (L a multiple of 128·2^(n−1): the long preset's 2,048 for five)."""
    return not lay.split and 2 <= lay.n <= 5 and lay.L % (ROWS << (lay.n - 1)) == 0


def use_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay) -> bool:
    """Whether the union forward's local pass on layout `lay` runs here: switched on, an sm_90 GPU,
    a layout the kernels `take`, bf16 heads of 64 read in place, and the library built."""
    if not (ENABLED and q.is_cuda and _hopper(q.device.index or 0)):
        return False
    if not (takes(lay) and readable(q, k, v)):
        return False
    return available()


def use_backward(q, k, v, dout, grads, lay) -> bool:
    """Whether the union backward's local passes run here: as use_forward, with dO and the
    gradients `readable` too."""
    return use_forward(q, k, v, lay) and readable(dout, *grads)


def _call(fn, *args) -> None:
    err = fn(*args, torch.cuda.current_stream().cuda_stream)
    if err:
        raise RuntimeError(f"{fn.__name__} returned {err} (a CUDA error, or -1: no cuTensorMapEncodeTiled, "
                           "-2: a tensor map refused, -3: shapes)")


def _grid(q: torch.Tensor, ctas: int | None) -> int:
    """The persistent grid's size: ctas, or None for one CTA an SM of q's GPU."""
    return sm_count(q.device.index or 0) if ctas is None else ctas


def _ptr(x: torch.Tensor | None):
    return None if x is None else x.data_ptr()


def _check_forward(q, k, v, out, lse) -> None:
    assert out.is_contiguous() and lse.is_contiguous() and readable(q, k, v), "rows the kernel reads and writes"


def _check_backward(q, k, v, dout, stats, grads, rope) -> None:
    B, T, H, _ = q.shape
    assert stats.shape == (2, B * H, T) and stats.is_contiguous() and readable(q, k, v, dout, *grads)
    assert all(g.stride() == grads[0].stride() for g in grads), "one set of gradient strides"
    assert rope is None or all(x.shape == (T, 32) and x.dtype == torch.float32 and x.is_contiguous() for x in rope)


def attend(q, k, v, out, lse, W: int, scale: float, causal: bool, branches: int, mode: str = "ping-pong",
           ctas: int | None = None, split: int = 0) -> None:
    """out (B, T, H, 64) bf16 and lse (B, T, H) float32 (natural log), both contiguous, of
    attention inside segments of W rows of q/k/v (`readable`), each pair weighted by the union
    local pass's m = min(λ(x), λ(s)) + 1 for `branches` branches (1: no weights). split > 0:
    head_split over that many branches (branches 1): each head attends inside segments of W rows
    2^i apart (its branch i's), and the positions it skips get output 0 and LSE −∞. ctas: the
    persistent grid's size (None: one CTA an SM; 0: one CTA an item); mode: one of MODES."""
    B, T, H, _ = q.shape
    _check_forward(q, k, v, out, lse)
    _call(library().ws_fwd, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), k.stride(1), v.stride(1),
          out.data_ptr(), out.stride(1), lse.data_ptr(), B, T, H, W, int(causal), scale, branches, split,
          MODES.index(mode), _grid(q, ctas))


def gradients(q, k, v, dout, stats, grads, W: int, scale: float, causal: bool, branches: int, dq: bool,
              ctas: int | None = None, out=None, lse=None, rope=None, overlap: bool = False, split: int = 0) -> None:
    """attend's dK and dV into grads (two (B, T, H, 64) bf16 with one set of strides, `readable`
    rows), or with dq its dQ into grads[0], given STATS (2, B·H, T) float32 (log2 LSE and
    Δ = rowsum(dO∘O) by position; under head_split by the branch's row, 2^i positions apart) and dO
    (`readable`); with dq, out and lse (the forward's, both contiguous), the dQ pass writes STATS
    first. rope: (cos, sin) (T, 32) float32 contiguous, by which q and k were rotated (half-split):
    dQ and dK come out rotated back. overlap: the next tile's scores and probabilities under this
    tile's gradient matmuls. ctas and split as in attend (the skipped positions' gradients 0)."""
    B, T, H, _ = q.shape
    _check_backward(q, k, v, dout, stats, grads, rope)
    assert out is None or (dq and out.is_contiguous() and lse.is_contiguous()), "the forward's out and lse, for dQ"
    cos, sin = rope if rope is not None else (None, None)
    _call(library().ws_bwd, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), k.stride(1), v.stride(1),
          dout.data_ptr(), dout.stride(1), stats.data_ptr(), _ptr(out), 0 if out is None else out.stride(1),
          _ptr(lse), _ptr(cos), _ptr(sin), grads[0].data_ptr(), grads[-1].data_ptr(), grads[0].stride(1), B, T, H, W,
          int(causal), scale, branches, split, int(dq), int(overlap), _grid(q, ctas))


def upper_attend(q, k, v, out, lse, W: int, scale: float, causal: bool, branches: int, ctas: int | None = None) -> None:
    """The union forward's upper pass (levels ≥ 2 of `branches` branches, segments of W rows) on
    attend's result: out and lse (as attend's) get the upper levels' keys of the class rows added."""
    B, T, H, _ = q.shape
    _check_forward(q, k, v, out, lse)
    _call(library().ws_fwd_upper, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), k.stride(1), v.stride(1),
          out.data_ptr(), out.stride(1), lse.data_ptr(), B, T, H, W, int(causal), scale, branches, _grid(q, ctas))


def upper_gradients(q, k, v, dout, stats, grads, W: int, scale: float, causal: bool, branches: int, dq: bool,
                    ctas: int | None = None, rope=None) -> None:
    """The union backward's upper passes after gradients' local ones: dQ (dq) or dK and dV added
    to those in grads, from the STATS the local dQ pass wrote; arguments as in gradients."""
    B, T, H, _ = q.shape
    _check_backward(q, k, v, dout, stats, grads, rope)
    cos, sin = rope if rope is not None else (None, None)
    _call(library().ws_bwd_upper, q.data_ptr(), k.data_ptr(), v.data_ptr(), q.stride(1), k.stride(1), v.stride(1),
          dout.data_ptr(), dout.stride(1), stats.data_ptr(), _ptr(cos), _ptr(sin), grads[0].data_ptr(),
          grads[-1].data_ptr(), grads[0].stride(1), B, T, H, W, int(causal), scale, branches, int(dq), _grid(q, ctas))


def _weights(lay) -> tuple[int, int]:
    """(branches, split) for the kernels: lay.n branches' weight terms, or head_split's lay.n branches."""
    return (1, lay.n) if lay.split else (lay.n, 0)


def local_forward(q, k, v, out, lse, lay, is_causal: bool, scale: float) -> None:
    """The union forward's local pass (level 1, with the weight terms of lay.n branches; under
    head_split each head's branch, and nothing after it) into its out (B, T, H, D) and lse
    (B, T, H), which the upper pass then reads."""
    branches, split = _weights(lay)
    attend(q, k, v, out, lse, lay.L, scale, is_causal, branches, split=split)


def local_backward(q, k, v, dout, out, lse, stats, grads, lay, is_causal: bool, scale: float, rope=None) -> None:
    """The union backward's local passes: dQ (writing STATS (2, B·H, T) from the forward's out
    and lse, which the upper passes read too), then dK/dV, into grads (dq, dk, dv); rope as in
    union.backward (dQ and dK rotated back)."""
    dq, dk, dv = grads
    branches, split = _weights(lay)
    gradients(q, k, v, dout, stats, (dq,), lay.L, scale, is_causal, branches, True, out=out, lse=lse, rope=rope,
              split=split)
    gradients(q, k, v, dout, stats, (dk, dv), lay.L, scale, is_causal, branches, False, rope=rope, split=split)


def upper_forward(q, k, v, out, lse, lay, is_causal: bool, scale: float) -> None:
    """The union forward's upper pass (levels ≥ 2, where `takes_upper`) on the local pass's out and lse."""
    upper_attend(q, k, v, out, lse, lay.L, scale, is_causal, lay.n)


def upper_backward(q, k, v, dout, stats, grads, lay, is_causal: bool, scale: float, rope=None) -> None:
    """The union backward's upper passes (where `takes_upper`) after local_backward: dQ, then dK/dV,
    added to grads (dq, dk, dv); rope as in local_backward."""
    dq, dk, dv = grads
    upper_gradients(q, k, v, dout, stats, (dq,), lay.L, scale, is_causal, lay.n, True, rope=rope)
    upper_gradients(q, k, v, dout, stats, (dk, dv), lay.L, scale, is_causal, lay.n, False, rope=rope)
