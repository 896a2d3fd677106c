"""RingDilatedAttention: dilated attention with the sequence split over a process group (DESIGN §5).

Shapes: B batch, l = T/P tokens on this rank, H heads, D head dim; g heads and m = l/r kept rows
of a cross-rank branch. Flat buffers are (B, l·H, D) as in improved.py.

Rank p holds tokens p·l … p·l + l − 1. For branch (w, r), with w clipped to T:
- w ≤ l (l % w == 0): every segment lies inside one rank, computed locally like Improved.
- w > l (w % l == 0, l % r == 0): a segment spans m_i = w/l consecutive ranks (fewer for a tail
  segment). Because l % r == 0, head h keeps the local rows ≡ h mod r on every rank, so each
  rank's dilated K/V block is (B, l/r, g, D). Blocks travel around the segment's sub-ring with
  batched isend/irecv, the next one arriving while the current one is attended; results merge
  online in float32 (LongNet Eq. 10). Causal: blocks from later ranks are not computed.
  Backward re-runs the ring: each rank adds its queries' dK/dV to the block's travelling float32
  gradient, which arrives back at its owner after the last step.
A rank never holds more than two K/V blocks of one branch: memory O(T/P).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .base import DilatedAttentionBase
from .branches import Piece, branch_pieces, head_groups
from .improved import (
    acc_dtype,
    backward_pieces,
    flatten_heads,
    forward_pieces,
    fresh_flags,
    merge_into,
    new_accumulators,
    new_grad_accumulators,
    put,
    take,
)
from .kernels import attn_bwd, attn_fwd


@dataclass(frozen=True)
class Ring:
    """A cross-rank piece and its sub-ring: `peers` are global ranks in ring order, `pos` is
    this rank's place in it."""

    piece: Piece
    peers: tuple[int, ...]
    pos: int

    @property
    def next(self) -> int:
        return self.peers[(self.pos + 1) % len(self.peers)]

    @property
    def prev(self) -> int:
        return self.peers[(self.pos - 1) % len(self.peers)]


def ring_layout(shard_len, world, rank, num_heads, segment_lengths, dilation_rates, head_split, global_rank):
    """Split the branches into local pieces and Rings for this rank; raise ValueError for a
    layout the ring cannot serve. Depends only on shapes, so every rank raises identically."""
    T = shard_len * world
    items: list[Piece | Ring] = []
    groups = head_groups(num_heads, len(segment_lengths), head_split)
    for w_cfg, r, heads in zip(segment_lengths, dilation_rates, groups):
        w = min(w_cfg, T)
        if w <= shard_len:
            if shard_len % w and world > 1:
                raise ValueError(
                    f"segment length {w} does not divide the per-rank shard of {shard_len} tokens "
                    f"(T={T} over {world} ranks): a segment would straddle two ranks"
                )
            items.extend(branch_pieces(shard_len, w, r, heads))
            continue
        if w % shard_len or shard_len % r:
            raise ValueError(
                f"segment length {w} spans ranks but the per-rank shard is {shard_len} tokens (T={T} over "
                f"{world} ranks): need segment length % shard == 0 and shard % dilation rate {r} == 0"
            )
        per_seg = w // shard_len
        first = rank // per_seg * per_seg
        peers = tuple(global_rank(p) for p in range(first, min(first + per_seg, world)))
        piece = Piece(0, 1, shard_len, shard_len // r, r, tuple(heads))
        items.append(Ring(piece, peers, rank - first) if len(peers) > 1 else piece)
    return items


def _exchange(send: torch.Tensor, recv: torch.Tensor, ring: Ring, group):
    """Post send-to-next / recv-from-prev; returns the requests to wait on."""
    ops = [dist.P2POp(dist.isend, send, ring.next, group), dist.P2POp(dist.irecv, recv, ring.prev, group)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _ring_forward(q_flat, kv, ring: Ring, num_heads, is_causal, scale, group):
    """Attend this rank's kept queries to every block of the sub-ring.
    kv: (2, B, m·g, D) this rank's dilated K/V rows. Returns o (B, m·g, D), lse (B, m·g) float32."""
    piece, index = ring.piece, ring.piece.flat_index(num_heads, kv.device)
    B, n = kv.shape[1], ring.piece.rows
    qg = take(q_flat, piece, index).transpose(1, 2)
    o_acc = kv.new_zeros(kv.shape[1:], dtype=acc_dtype(kv.dtype))
    lse_acc = kv.new_full(kv.shape[1:3], float("-inf"), dtype=acc_dtype(kv.dtype))
    cur, spare, first = kv, torch.empty_like(kv), True
    for step in range(len(ring.peers)):
        src = (ring.pos - step) % len(ring.peers)
        reqs = _exchange(cur, spare, ring, group) if step < len(ring.peers) - 1 else []
        if not (is_causal and src > ring.pos):
            kg, vg = (x.view(B, n, len(piece.heads), -1).transpose(1, 2) for x in cur)
            o, lse = attn_fwd(qg, kg, vg, is_causal and src == ring.pos, scale)
            merge_into(o_acc, lse_acc, None, o.transpose(1, 2).reshape(o_acc.shape), lse.transpose(1, 2).reshape(B, -1), first)
            first = False
        _wait(reqs)
        cur, spare = spare, cur
    return o_acc, lse_acc


def _ring_backward(flat, lse32, ring: Ring, num_heads, is_causal, scale, group, grads32) -> None:
    """Add this ring piece's dq (local) and dk/dv (after their trip round the ring) to grads32."""
    dout, q, k, v, out = flat
    piece, index = ring.piece, ring.piece.flat_index(num_heads, q.device)
    B, n, g = q.shape[0], piece.rows, len(piece.heads)
    dog, qg, og = (take(x, piece, index).transpose(1, 2) for x in (dout, q, out))
    lg = take(lse32, piece, index).transpose(1, 2)
    cur = torch.stack([take(k, piece, index), take(v, piece, index)]).view(2, B, n * g, -1)
    spare = torch.empty_like(cur)
    dkv = torch.zeros(cur.shape, dtype=acc_dtype(cur.dtype), device=cur.device)
    dkv_in = torch.empty_like(dkv)
    dq = torch.zeros(B, n * g, cur.shape[-1], dtype=dkv.dtype, device=cur.device)
    steps = len(ring.peers)
    for step in range(steps):
        src = (ring.pos - step) % steps
        reqs = _exchange(cur, spare, ring, group) if step < steps - 1 else []
        if not (is_causal and src > ring.pos):
            kg, vg = (x.view(B, n, g, -1).transpose(1, 2) for x in cur)
            gq, gk, gv = attn_bwd(dog, qg, kg, vg, og, lg, is_causal and src == ring.pos, scale)
            dq += gq.transpose(1, 2).reshape(dq.shape)
            dkv[0] += gk.transpose(1, 2).reshape(dq.shape)
            dkv[1] += gv.transpose(1, 2).reshape(dq.shape)
        # The block's gradient follows the block: after the last step it reaches its owner.
        _wait(_exchange(dkv, dkv_in, ring, group))
        _wait(reqs)
        cur, spare = spare, cur
        dkv, dkv_in = dkv_in, dkv
    put(grads32[0], index, dq.to(grads32[0].dtype), add=True)
    put(grads32[1], index, dkv[0].to(grads32[1].dtype), add=True)
    put(grads32[2], index, dkv[1].to(grads32[2].dtype), add=True)


def _split(layout):
    return [x for x in layout if isinstance(x, Piece)], [x for x in layout if isinstance(x, Ring)]


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, is_causal, scale, group):
        H = q.shape[2]
        out32, lse32 = new_accumulators(q)
        q_flat, k_flat, v_flat = flatten_heads(q, k, v)
        pieces = [x.piece if isinstance(x, Ring) else x for x in layout]
        for item, fresh in zip(layout, fresh_flags(pieces)):
            if isinstance(item, Piece):
                forward_pieces(out32, lse32, (q_flat, k_flat, v_flat), H, [item], [fresh], is_causal, scale)
                continue
            index = item.piece.flat_index(H, q.device)
            kv = torch.stack([take(k_flat, item.piece, index), take(v_flat, item.piece, index)]).flatten(2, 3)
            o, lse = _ring_forward(q_flat, kv, item, H, is_causal, scale, group)
            merge_into(out32, lse32, index, o, lse, fresh)
        out = out32.to(q.dtype).view(q.shape)
        ctx.save_for_backward(q, k, v, out, lse32)
        ctx.layout, ctx.is_causal, ctx.scale, ctx.group = layout, is_causal, scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse32 = ctx.saved_tensors
        H = q.shape[2]
        grads32 = new_grad_accumulators(q)
        flat = flatten_heads(dout.contiguous(), q, k, v, out)
        local, rings = _split(ctx.layout)
        backward_pieces(grads32, flat, lse32, H, local, ctx.is_causal, ctx.scale)
        for ring in rings:
            _ring_backward(flat, lse32, ring, H, ctx.is_causal, ctx.scale, ctx.group, grads32)
        dq, dk, dv = (g.to(q.dtype).view(q.shape) for g in grads32)
        return dq, dk, dv, None, None, None, None


class RingDilatedAttention(DilatedAttentionBase):
    """Sequence-parallel dilated attention. See DilatedAttentionBase for the shared arguments.

    Args:
        process_group: the context-parallel group; None means the default group when
            torch.distributed is initialised, else a single rank (then it is exactly
            ImprovedDilatedAttention).

    forward(query, key, value, is_causal=False): this rank's contiguous shard (B, T/P, H, D)
    of each; returns this rank's shard of the output. Every rank of the group must call it
    with the same shapes. flops() counts the whole sequence (all ranks together).
    """

    supports_dropout = False

    def __init__(self, segment_lengths, dilation_rates, *, softmax_scale=None, dropout=0.0, head_split=False,
                 process_group=None):
        super().__init__(
            segment_lengths, dilation_rates, softmax_scale=softmax_scale, dropout=dropout, head_split=head_split
        )
        self.process_group = process_group

    def group_info(self):
        """(group, world size, rank in group, group rank -> global rank)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1, 0, lambda r: r
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group, dist.get_world_size(group), dist.get_rank(group), lambda r: dist.get_global_rank(group, r)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        scale = self._check(query, key, value)
        group, world, rank, global_rank = self.group_info()
        B, l, H, D = query.shape
        layout = ring_layout(
            l, world, rank, H, self.segment_lengths, self.dilation_rates, self.head_split, global_rank
        )
        with self.no_autocast(query):
            return _RingFunction.apply(query, key, value, layout, bool(is_causal), scale, group)
