"""One query a head against the decode cache's rows (longctx/decode.py), split across the rows.

A decode step's attention reads every kept row of every head once: a bandwidth-bound matrix-vector
product. One program per (sequence, head) would leave all but B·H SMs idle, so the rows are cut
into chunks of CHUNK, one program each (B·H·⌈R / CHUNK⌉ programs), which return their chunk's
running max, sum and unnormalised output; a second kernel, one program a head, merges the chunks
by the same log-sum-exp rule as the branches (in PyTorch that took a dozen launches, each a few
microseconds of a step that is a few hundred). valid (H, R) says which rows a head may read at
this position.
"""
from __future__ import annotations

import torch

from . import LOG2E, tl, triton

CHUNK = 512  # rows a program; at the 1M layout's 20,480 rows a head, 40 chunks and 480 programs for 12 heads
ROWS = 64  # rows a loop iteration loads
MERGE = 64  # chunks a merge iteration loads (a dense cache at 1M has 2,049 a head)

if triton is not None:
    @triton.jit
    def _chunk(q, k, v, valid, acc_out, stat_out, H, R, scale_log2, sqb, sqh, skb, skh, skr, svb, svh, svr,
               CHUNK: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
        bh = tl.program_id(0)
        part = tl.program_id(1)
        b = bh // H
        h = bh % H
        d = tl.arange(0, D)
        qv = tl.load(q + b * sqb + h * sqh + d).to(tl.float32) * scale_log2
        m = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for r0 in range(part * CHUNK, part * CHUNK + CHUNK, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            inside = rows < R
            ok = tl.load(valid + h * R + rows, mask=inside, other=0) != 0
            kk = tl.load(k + b * skb + h * skh + rows[:, None] * skr + d[None, :], mask=ok[:, None], other=0.0)
            s = tl.where(ok, tl.sum(kk.to(tl.float32) * qv[None, :], 1), float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no valid row yet: nothing to scale
            p = tl.math.exp2(s - shift)
            alpha = tl.math.exp2(m - shift)
            vv = tl.load(v + b * svb + h * svh + rows[:, None] * svr + d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * alpha + tl.sum(p[:, None] * vv.to(tl.float32), 0)
            total = total * alpha + tl.sum(p, 0)
            m = m_new
        slot = bh * tl.num_programs(1) + part
        tl.store(acc_out + slot * D + d, acc)
        tl.store(stat_out + slot * 2, m)
        tl.store(stat_out + slot * 2 + 1, total)


    @triton.jit
    def _merge(acc_in, stat_in, out, parts, D: tl.constexpr, BLOCK: tl.constexpr):
        bh = tl.program_id(0)
        d = tl.arange(0, D)
        top = tl.full((), float("-inf"), tl.float32)
        for p0 in range(0, parts, BLOCK):
            i = p0 + tl.arange(0, BLOCK)
            m = tl.load(stat_in + (bh * parts + i) * 2, mask=i < parts, other=float("-inf"))
            top = tl.maximum(top, tl.max(m, 0))
        shift = tl.where(top == float("-inf"), 0.0, top)  # chunks with no valid row weigh 0
        den = tl.zeros((), tl.float32)
        acc = tl.zeros((D,), tl.float32)
        for p0 in range(0, parts, BLOCK):
            i = p0 + tl.arange(0, BLOCK)
            inside = i < parts
            slot = bh * parts + i
            weight = tl.math.exp2(tl.load(stat_in + slot * 2, mask=inside, other=float("-inf")) - shift)
            den += tl.sum(weight * tl.load(stat_in + slot * 2 + 1, mask=inside, other=0.0), 0)
            acc += tl.sum(weight[:, None] * tl.load(acc_in + slot[:, None] * D + d[None, :], mask=inside[:, None],
                                                    other=0.0), 0)
        den = tl.maximum(den, 1.1754943508222875e-38)  # a head with no valid row: 0
        tl.store(out + bh * D + d, (acc / den).to(out.dtype.element_ty))

    @triton.jit
    def _store(k, v, kc, vc, kept, rows, H, NB, skb, skh, svb, svh, scb, sch, scr, D: tl.constexpr):
        program = tl.program_id(0)  # (b, branch, h)
        b = program // (NB * H)
        i = program % (NB * H)
        h = i % H
        if tl.load(kept + i) != 0:
            row = tl.load(rows + i)
            d = tl.arange(0, D)
            at = b * scb + h * sch + row * scr + d
            tl.store(kc + at, tl.load(k + b * skb + h * skh + d).to(kc.dtype.element_ty))
            tl.store(vc + at, tl.load(v + b * svb + h * svh + d).to(vc.dtype.element_ty))


def _bytes(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as the kernels read it: contiguous bytes (a view, no copy, when it is)."""
    return mask.contiguous().view(torch.uint8)


def store(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kept: torch.Tensor,
          rows: torch.Tensor) -> None:
    """Write a position's k and v (B, H, D) into rows (nb, H) of the caches (B, H, R, D), one
    strided layout for both, where kept (nb, H) says the head keeps it in that branch."""
    B, H, D = k.shape
    nb = kept.shape[0]
    assert k_cache.stride() == v_cache.stride() and k.stride(-1) == v.stride(-1) == 1
    _store[(B * nb * H,)](k, v, k_cache, v_cache, _bytes(kept), rows.contiguous(), H, nb, k.stride(0), k.stride(1),
                          v.stride(0), v.stride(1), *k_cache.stride()[:3], D=D)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of q (B, H, D) over the rows of k, v (B, H, R, D) that valid (H, R) marks:
    (B, H, D) in q's dtype, 0 for a head with no valid row. k and v need a unit last stride."""
    B, H, R, D = k.shape
    parts = -(-R // CHUNK)
    acc = torch.empty((B, H, parts, D), dtype=torch.float32, device=q.device)
    stats = torch.empty((B, H, parts, 2), dtype=torch.float32, device=q.device)
    _chunk[(B * H, parts)](q, k, v, _bytes(valid), acc, stats, H, R, scale * LOG2E,
                           q.stride(0), q.stride(1), *k.stride()[:3], *v.stride()[:3],
                           CHUNK=CHUNK, ROWS=ROWS, D=D)
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    _merge[(B * H,)](acc, stats, out, parts, D=D, BLOCK=MERGE)
    return out
