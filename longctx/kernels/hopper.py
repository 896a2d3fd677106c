"""The union kernels' local backward passes (dQ, then dK/dV) on Hopper GPUs (sm_90): Gluon code
with TMA loads and asynchronous wgmma (hopper_kernels.py), which union.backward runs in place of
the Triton local passes where `use` holds; the Triton kernels stay the path everywhere else
(other GPUs, head_split, head dims other than 64, the CPU interpreter, and LONGCTX_HOPPER=0), and
run the upper passes in every case.

Why: the local passes are the longest of the op's six (on an H200 at 128K, Triton's dK/dV 2.28
and dQ 1.56 of 7.36 ms fwd+bwd), and Triton's versions of their loops run about half their
instructions with no tensor-core matmul in flight (tools/kernels/sass_probe.py dkdv local long:
117 of 227 a 64 × 32 block), since Triton waits for every wgmma before reading its result. The
Gluon loops issue S and dP together and keep the gradient updates in flight under the next
tile's softmax: for sm_90 the dK/dV loop compiles to ~330 instructions a 64 × 64 block, none
outside a running wgmma (`sass_probe.py gluon_dkdv 64 3 union`), the dQ loop to ~280, 87 of them
while dP is awaited. Each chain of matmuls and exponentials is still latency-bound at two
programs an SM, so the gain is modest: with both passes the op's fwd+bwd is 4–8% faster on an
H100 at 64K, 128K and 1M (0–9% at 256K) and the LM's 32K step 2% (docs/performance.md). Both
kernels take their tiles a segment at a time (hopper_kernels._geometry), as the Triton passes
do: taken tile-major, the programs in flight at 1M read K/V of ~260 segments at once, past L2,
and the op was slower.

The path is on by default; LONGCTX_HOPPER=0 turns it off (the Triton local passes, e.g. to
compare the two).
"""
from __future__ import annotations

import functools
import os

import torch

from . import LOG2E, compiled_triton

ENABLED = os.environ.get("LONGCTX_HOPPER", "1") != "0"
ROWS, STAGES = 64, 3  # keys a program, the query ring's depth (2 ran slower): 244 registers, two programs an SM


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Gluon module (imported on first use: Gluon's TMA and wgmma need a Hopper GPU), or None
    where this Triton has no Gluon."""
    try:
        from . import hopper_kernels
    except ImportError:
        return None
    return hopper_kernels


@functools.lru_cache(maxsize=None)
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def _flat(x: torch.Tensor) -> bool:
    """Whether x (B, T, H, D) reads as rows of one TMA view: heads adjacent (stride D), batches
    T rows apart, 16-byte aligned rows."""
    B, T, H, D = x.shape
    sb, st, sh, sd = x.stride()
    return sd == 1 and sh == D and (B == 1 or sb == T * st) and st * x.element_size() % 16 == 0 \
        and x.data_ptr() % 16 == 0


def use(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lay) -> bool:
    """Whether the local backward passes of the union kernels' layout `lay` on these (B, T, H, D)
    tensors run here: an sm_90 GPU, heads of 64, all heads running every branch, rows the TMA
    descriptors can read in place, segments of whole 64-row tiles."""
    if not (ENABLED and compiled_triton(q.device) and _hopper(q.device.index or 0)):
        return False
    if lay.split or q.shape[-1] != 64 or lay.L % ROWS or not all(_flat(x) for x in (q, k, v, dout)):
        return False
    return _kernels() is not None


def _launch(kernel, q, k, v, dout, pointers, grad, stats, lay, is_causal: bool, scale: float, rope) -> None:
    """One of hopper_kernels' backward kernels over (T / ROWS, B·H) tiles of a head: q/k/v/dO
    through TMA descriptors, then the kernel's own pointers, STATS, RoPE's tables and the
    gradients' (B, T, H) strides (those of `grad`, which all three gradients share)."""
    B, T, H, D = q.shape
    descs = _kernels().descriptors((q, k, v, dout), 1, ROWS)
    cos, sin = rope if rope is not None else (stats, stats)  # read only when ROPE
    kernel[(T // ROWS, B * H)](*descs, *pointers, stats, cos, sin, *grad.stride()[:3], T, H, lay.L, 1, 0, H, B * H,
                               scale * LOG2E, scale, STAGES=STAGES, CAUSAL=is_causal, N_BR=lay.n,
                               ROPE=rope is not None, num_warps=4)


def local_dq(q, k, v, dout, out, lse, stats, dq, lay, is_causal: bool, scale: float, rope=None) -> None:
    """The union backward's local dQ pass (level 1, with the weight terms of lay.n branches) into
    dq (B, T, H, D), writing STATS (2, B·H, T): log2 LSE and Δ by position, from the forward's
    out (B, T, H, D) and lse (B, T, H), both contiguous; rope as in local_dkdv."""
    assert out.is_contiguous() and lse.is_contiguous(), "the forward's own out and lse"
    _launch(_kernels().dq, q, k, v, dout, (out, lse, dq), dq, stats, lay, is_causal, scale, rope)


def local_dkdv(q, k, v, dout, stats, dk, dv, lay, is_causal: bool, scale: float, rope=None) -> None:
    """The union backward's local dK/dV pass (level 1, with the weight terms of lay.n branches)
    into dk and dv (B, T, H, D, one set of strides), from STATS (2, B·H, T) that the local dQ
    pass wrote; rope: (cos, sin) (T, D/2) float32, dK rotated back as union_kernels._put does."""
    _launch(_kernels().dkdv, q, k, v, dout, (dk, dv), dk, stats, lay, is_causal, scale, rope)
