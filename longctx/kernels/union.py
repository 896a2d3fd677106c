"""Dilated attention as one weighted softmax per query, in Triton: each distinct pair scored once.

Shapes: B batch, T sequence length, H heads, D head dim; LSE (B, T, H) float32.

Which layouts. LongNet's: r = 1, 2, 4, …, 2^(n−1) and w_i = L·r_i (every branch keeps L rows a
segment), T a multiple of w_n, every head running every branch (no head_split). Then:
- LongNet Eq. 10 is one softmax over the multiset union of the branches' keys (docs/design.md#the-merge-longnet-eq-10), so a
  pair that m branches share can be scored once with weight m, i.e. log m added to its score;
- head h keeps position x in branches 1 … λ(x) + 1, where λ(x) = #{j < n : x ≡ h (mod 2^j)}
  (offsets nest: h mod r_j is h mod r_i reduced, for r_j | r_i);
- every pair (x, s) of a branch belongs to one *level* a: the first branch whose segment holds
  both. Level 1: the same L-segment; level a > 1: the two halves of one w_a segment, with
  x ≡ s ≡ h (mod r_a). Its weight is m = min(λ(x), λ(s)) + 2 − a (branches a … min + 1 keep it).
So the kernels visit 1 + ½(½ + ¼ + …) of branch 1's pairs instead of 1 + ½ + ¼ + …: 1,504 pairs a
position instead of 1,984 in the causal long preset (76%), and write each output once, with no
per-branch outputs to merge. log m = min(log(λ(x) + 2 − a), log(λ(s) + 2 − a)): a row term, a
column term and one min per score.

Two passes per direction:
- *local*: level 1, contiguous tiles of positions (a causal segment's usual lower triangle);
- *upper*: levels ≥ 2, for positions with λ ≥ 1 only, tiled by *class* (λ = k: positions
  c_k + j·2^(k+1), one residue class, whose tiles need levels 2 … k + 1 and no mask). It starts
  from the local pass's result for its rows (output and LSE, or the gradient) and adds its keys.
Backward is FlashAttention-2's: Δ = rowsum(dO∘O) (in the local dQ pass), then dQ over keys and
dK/dV over queries, each recomputing P = m·exp(z − LSE) against the exact merged LSE.

With head_split (each head in one branch, docs/design.md#head-split) the same layouts need no weights: head h of
branch i keeps the positions ≡ h (mod 2^i) of each segment, L of them, which is the local pass
with its rows stepping by 2^i, and no upper pass. The pieces path would run one cuDNN call per
strided head group and branch (four at the seed's 8 heads); this is one launch per direction.

The kernels are in union_kernels.py, their tiles' geometry in union_tiles.py; on Hopper GPUs
the backward's local passes run hopper.py's Gluon kernels instead (unless LONGCTX_HOPPER=0), and with
LONGCTX_HOPPER_CUDA=1 the local passes of both directions run hopper_cuda.py's CUDA kernels, and the
upper ones too where the segments hold 128-row class tiles (L a multiple of 128·2^(n−1)). They run on
CUDA in fp16/bf16, and on CPU tensors through Triton's interpreter (tests only).
attention/rotary.py runs them on the LM block's fused projection with RoPE inside (backward's
`rope`).
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch

from ..attention.layout import head_groups
from . import LOG2E, SUPPORTED, compiled_triton, hopper, hopper_cuda, sm_count

if SUPPORTED:
    from .union_kernels import KERNELS

# LONGCTX_UNION=0 keeps the per-branch kernels and the combine (for A/B runs).
ENABLED = os.environ.get("LONGCTX_UNION", "1") != "0"

# (rows, columns, warps, stages) per kernel: rows are the program's own tile (queries for fwd and
# dq, keys for dkdv), columns the tile it loops over. Measured on an H100 (tools/kernels/union_probe.py):
# CONFIG on the long preset, where dkdv takes 64 rows since its loop lost ~100 instructions a
# block (an H200: 3 programs an SM, with register_cap, against 255 registers and spills at 128
# rows; 1.66 against 1.74 ms at 64K); with
# head_split (the seed preset at 8K), SPLIT_CONFIG at batch 4, where dq without weights takes 64
# columns (8% faster; 31% slower with the long preset's weights), and SMALL_CONFIG at batch 1,
# where 64-row tiles fill the 132 SMs more evenly (640 tiles, not 320): it is for head_split
# launches that would give an SM fewer than SMALL_TILES tiles of 128 rows.
CONFIG = {"fwd": (128, 64, 4, 4), "dq": (128, 32, 4, 4), "dkdv": (64, 32, 4, 3)}
SPLIT_CONFIG = {"fwd": (128, 64, 4, 4), "dq": (128, 64, 4, 3), "dkdv": (64, 32, 4, 3)}
SMALL_CONFIG = {"fwd": (64, 64, 4, 4), "dq": (64, 64, 4, 3), "dkdv": (64, 32, 4, 3)}
SMALL_TILES = 8


class Layout(NamedTuple):
    """A layout the union kernels take: segment length L a branch, n branches, and whether each
    head runs one branch (head_split) or all of them."""
    L: int
    n: int
    split: bool


def layout(T: int, H: int, D: int, segment_lengths, dilation_rates, head_split: bool) -> Layout | None:
    """The Layout when the union kernels compute this one, else None (see the module docstring;
    also, for the tiles, D a power of two in [16, 128] and L / r_n a multiple of 16 whose tiles
    hold whole periods of λ, 2^(n−1) positions; under head_split, L a multiple of 16). Not one
    branch: with nothing to merge, the op's one cuDNN call over the segments runs faster than
    these kernels (~84% of cuDNN's rate): train.py's dense baseline (w = T, r = 1) took 3,286 ms
    a 128K step through them against cuDNN's 2,727 on an H100."""
    ws, rs = list(segment_lengths), list(dilation_rates)
    n, L = len(rs), ws[0]
    if n == 1 or rs != [1 << i for i in range(n)] or ws != [L << i for i in range(n)] or T % ws[-1]:
        return None
    if D not in (16, 32, 64, 128):
        return None
    if head_split:
        return Layout(L, n, True) if H >= n and L % 16 == 0 else None
    rows = math.gcd(128, L >> (n - 1))  # the tiles' rows (_tiles), which must hold whole periods of λ
    if L % (16 << (n - 1)) or rows % (1 << (n - 1)):
        return None
    return Layout(L, n, False)


def use(q: torch.Tensor, lay) -> bool:
    """Whether the op should run the union kernels on q (B, T, H, D)."""
    return ENABLED and lay is not None and compiled_triton(q.device) and q.dtype in (torch.float16, torch.bfloat16)


def _tiles(name: str, L: int, n: int, config: dict = CONFIG) -> tuple[int, int, int, int]:
    """config[name] fitted to the layout: the rows tile the class positions of one L-segment
    (rows·2^(n−1) divides L) and the columns tile the rows (diagonal blocks) and L / 2."""
    rows, cols, warps, stages = config[name]
    rows = math.gcd(rows, L >> (n - 1))
    cols = math.gcd(max(cols, 1 << (n - 1)), rows)
    assert cols % (1 << (n - 1)) == 0, "column blocks must span whole periods of λ (layout() checks)"
    return rows, cols, warps, stages


def register_cap(name: str, rows: int, warps: int) -> dict:
    """Launch options capping a kernel's registers where that fits one more program an SM: the
    local dK/dV pass at 64 rows and 4 warps takes 181 registers since its tiles run by segment
    (sass_probe; two programs an SM), 168 three, with 40 bytes of stack outside its loops (the upper
    pass and head_split's need no more): the op 1-6% faster on an H100. Across every tiling the
    cap made the 8-warp ones 2-3x slower."""
    return {"maxnreg": 168} if name == "dkdv" and (rows, warps) == (64, 4) else {}


def tile_options(name: str, rows: int, cols: int, warps: int, stages: int) -> dict:
    """A launch's tile constants (dkdv's rows are keys: its BN) and options, register_cap's included."""
    tile = {"BM": rows, "BN": cols} if name != "dkdv" else {"BN": rows, "BM": cols}
    return dict(num_warps=warps, num_stages=stages, **tile, **register_cap(name, rows, warps))


def config_for(x: torch.Tensor, lay: Layout) -> dict:
    """The tiles for a launch on x (B, T, H, D): CONFIG, or with head_split SPLIT_CONFIG, or
    SMALL_CONFIG where few_tiles on x's GPU."""
    if not lay.split:
        return CONFIG
    if x.device.type == "cuda" and few_tiles(*x.shape[:3], lay.n, sm_count(x.device.index)):
        return SMALL_CONFIG
    return SPLIT_CONFIG


def few_tiles(B: int, T: int, H: int, n: int, sms: int) -> bool:
    """Whether head_split over n branches gives an SM fewer than SMALL_TILES tiles of 128 rows
    (head h of branch i keeps T / 2^i rows)."""
    return B * _split_rows(T, H, n) // 128 < SMALL_TILES * sms


@functools.lru_cache(maxsize=256)  # asked at every head_split launch, three a forward+backward
def _split_rows(T: int, H: int, n: int) -> int:
    """Rows a batch element keeps under head_split: Σ over heads of T / 2^(its branch). (The
    threshold stays outside the cache, so SMALL_TILES can change: tests set it to 0.)"""
    return sum(len(heads) * T >> i for i, heads in enumerate(head_groups(H, n, True)))


def _strides(*xs: torch.Tensor) -> list[int]:
    """(B, T, H) strides of each (B, T, H, D) tensor, which must have a unit last stride."""
    assert all(x.stride(-1) == 1 for x in xs), "rows must be contiguous along D"
    return [s for x in xs for s in x.stride()[:3]]


def _launch(name: str, x: torch.Tensor, lay: Layout, args, causal: bool, passes=("local", "upper"), **consts) -> None:
    """Direction `name`'s local pass over (B·H, T / rows) tiles, then (all heads running every
    branch) its upper one over the class tiles; a probe may time them apart with `passes`.
    Under head_split each head runs one branch (no weights, no upper levels): N_BR = 1.
    consts: the direction's own constants (the backward's ROPE)."""
    B, T, H, D = x.shape
    n = 1 if lay.split else lay.n
    rows, cols, warps, stages = _tiles(name, lay.L, n, config_for(x, lay))
    opts = dict(L=lay.L, CAUSAL=causal, D=D, N_BR=n, **consts, **tile_options(name, rows, cols, warps, stages))
    local, upper = KERNELS[name]
    if "local" in passes:
        local[(B * H, T // rows)](*args, SPLIT=lay.n if lay.split else 0, **opts)
    if n > 1 and "upper" in passes:
        upper[(B * H, T // 2 // rows)](*args, **opts)


def triton_forward(q, k, v, out, lse, lay: Layout, is_causal: bool, scale: float, passes=("local", "upper")) -> None:
    """The Triton forward's `passes` of q/k/v into out and lse (forward's, which probes may run apart)."""
    T, H = q.shape[1:3]
    _launch("fwd", q, lay, (q, k, v, out, lse, *_strides(q, k, v), T, H, scale * LOG2E), is_causal, passes)


def triton_backward(name: str, dout, q, k, v, out, lse, stats, grads, lay: Layout, is_causal: bool, scale: float,
                    passes=("local", "upper"), rope=None) -> None:
    """The Triton backward's `passes` of direction `name` ("dq" or "dkdv") into grads (dq, dk, dv),
    as backward runs them (probes may run them apart): dq's local pass writes STATS (2, B·H, T)
    from out and lse, and every other pass reads it; rope as in backward."""
    T, H = q.shape[1:3]
    dq, dk, dv = grads
    cos, sin = rope if rope is not None else (stats, stats)  # read only when ROPE
    rows = (q, k, v, dout, out, lse, stats, dq) if name == "dq" else (q, k, v, dout, stats, dk, dv)
    _launch(name, q, lay, (*rows, cos, sin, *_strides(q, k, v, dout), *_strides(dq), T, H, scale * LOG2E, scale),
            is_causal, passes, ROPE=rope is not None)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lay: Layout, is_causal: bool, scale: float):
    """(out (B, T, H, D) in q's dtype, LSE (B, T, H) float32) of q/k/v (B, T, H, D) on `lay`."""
    B, T, H, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, T, H), dtype=torch.float32, device=q.device)
    passes = ("local", "upper")
    if hopper_cuda.use_forward(q, k, v, lay):  # the local pass in CUDA (LONGCTX_HOPPER_CUDA=1), and the upper one
        hopper_cuda.local_forward(q, k, v, out, lse, lay, is_causal, scale)
        passes = ("upper",)
        if hopper_cuda.takes_upper(lay):
            hopper_cuda.upper_forward(q, k, v, out, lse, lay, is_causal, scale)
            passes = ()
    triton_forward(q, k, v, out, lse, lay, is_causal, scale, passes)
    return out, lse


def backward(dout, q, k, v, out, lse, lay: Layout, is_causal: bool, scale: float, grads=None, rope=None):
    """Exact (dq, dk, dv) (B, T, H, D) of forward, given its out and lse and dout (B, T, H, D).
    grads: the three (B, T, H, D) buffers to write them into, with one set of strides (views of
    one packed gradient, attention/rotary.py), else new contiguous ones. rope: (cos, sin) (T, D/2) float32
    when q and k were rotated by RoPE from inputs the caller differentiates: dq and dk come out
    rotated back, the gradient of those inputs (the kernels' epilogues do it in float32)."""
    B, T, H, D = q.shape
    if grads is None:
        grads = tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    dq, dk, dv = grads
    assert dq.stride() == dk.stride() == dv.stride() and dq.shape == q.shape, "one set of gradient strides"
    stats = torch.empty((2, B * H, T), dtype=torch.float32, device=q.device)  # log2 LSE and Δ, by the dQ pass
    cuda = hopper_cuda.use_backward(q, k, v, dout, grads, lay)  # LONGCTX_HOPPER_CUDA=1
    gluon = not cuda and hopper.use(q, k, v, dout, lay)  # the local passes on Hopper, the upper ones here
    passes = ("upper",) if cuda or gluon else ("local", "upper")
    if cuda:
        hopper_cuda.local_backward(q, k, v, dout, out, lse, stats, grads, lay, is_causal, scale, rope)
        if hopper_cuda.takes_upper(lay):
            hopper_cuda.upper_backward(q, k, v, dout, stats, grads, lay, is_causal, scale, rope)
            passes = ()
    if gluon:
        hopper.local_dq(q, k, v, dout, out, lse, stats, dq, lay, is_causal, scale, rope)
    triton_backward("dq", dout, q, k, v, out, lse, stats, grads, lay, is_causal, scale, passes, rope)
    if gluon:
        hopper.local_dkdv(q, k, v, dout, stats, dk, dv, lay, is_causal, scale, rope)
    triton_backward("dkdv", dout, q, k, v, out, lse, stats, grads, lay, is_causal, scale, passes, rope)
    return dq, dk, dv
