"""The union kernels' local dK/dV pass on Hopper GPUs (sm_90): Gluon code with TMA loads and
asynchronous wgmma (hopper_kernels.py), which union.backward runs in place of the Triton pass
where `use` holds; the Triton kernels stay the path everywhere else (other GPUs, head_split,
head dims other than 64, the CPU interpreter, and by default).

Why this pass: it is the longest of the op's six (at 64K, 1.2–1.5 of ~4.2 ms fwd+bwd on an
H100), and Triton's version of its loop runs about half its instructions with no tensor-core
matmul in flight (tools/kernels/sass_probe.py dkdv local long: 117 of 227 a 64 × 32 block), since
Triton waits for every wgmma before reading its result. The Gluon loop issues Sᵀ and dPᵀ
together and keeps the dV and dK updates in flight under the next tile's softmax: for sm_90 it
compiles to ~330 instructions a 64 × 64 block, none outside a running wgmma
(`sass_probe.py gluon_dkdv 64 3 union`). Measured (docs/performance.md), that made the pass only
6–7% faster: each warpgroup's chain of matmuls and exponentials is latency-bound at two
programs an SM. The op gained 1.5–3% at 64K–128K and lost 0.8% at 256K, so the path is opt-in
(LONGCTX_HOPPER=1) until it is faster at every length.
"""
from __future__ import annotations

import functools
import os

import torch

from . import LOG2E, compiled_triton

ENABLED = os.environ.get("LONGCTX_HOPPER", "0") == "1"
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
    """Whether the local dK/dV pass of the union kernels' layout `lay` on these (B, T, H, D)
    tensors runs here: an sm_90 GPU, heads of 64, all heads running every branch, rows the TMA
    descriptors can read in place, segments of whole 64-row tiles."""
    if not (ENABLED and compiled_triton(q.device) and _hopper(q.device.index or 0)):
        return False
    if lay.split or q.shape[-1] != 64 or lay.L % ROWS or not all(_flat(x) for x in (q, k, v, dout)):
        return False
    return _kernels() is not None


def local_dkdv(q, k, v, dout, stats, dk, dv, lay, is_causal: bool, scale: float, rope=None) -> None:
    """The union backward's local dK/dV pass (level 1, with the weight terms of lay.n branches)
    into dk and dv (B, T, H, D, one set of strides), from STATS (2, B·H, T) that the local dQ
    pass wrote; rope: (cos, sin) (T, D/2) float32, dK rotated back as union_kernels._put does."""
    B, T, H, D = q.shape
    kernels = _kernels()
    descs = kernels.descriptors((q, k, v, dout), 1, ROWS)
    cos, sin = rope if rope is not None else (stats, stats)  # read only when ROPE
    kernels.dkdv[(T // ROWS, B * H)](*descs, dk, dv, stats, cos, sin, *dk.stride()[:3], T, H, lay.L, 1, 0, H, B * H,
                                     scale * LOG2E, scale, STAGES=STAGES, CAUSAL=is_causal, N_BR=lay.n,
                                     ROPE=rope is not None, num_warps=4)
