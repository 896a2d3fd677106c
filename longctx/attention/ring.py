"""RingDilatedAttention: dilated attention with the sequence split over a process group (docs/design.md#the-ring).

Shapes: B batch, l = T/P tokens on this rank, H heads, D head dim; g heads and m = l/r kept rows
of a cross-rank piece. Pieces and their strided row views are pieces.py's.

Rank p holds tokens p·l … p·l + l − 1. For branch (w, r), with w clipped to T:
- w ≤ l (l % w == 0): every segment lies inside one rank, computed locally like Improved.
- w > l (w % l == 0, l % r == 0): a segment spans m_i = w/l consecutive ranks (fewer for a tail
  segment). Because l % r == 0, head h keeps the local rows ≡ h mod r on every rank, so each
  rank's dilated K/V block of a piece's heads is (B, g, l/r, D), one sub-ring pass per piece.
  Blocks travel around the segment's sub-ring with batched isend/irecv, the next one arriving
  while the current one is attended; results merge online in float32 (LongNet Eq. 10). Causal:
  blocks from later ranks are not computed. Backward re-runs the ring: each rank adds its
  queries' dK/dV to the block's travelling float32 gradient, which arrives back at its owner
  after the last step.
A rank never holds more than two K/V blocks of one branch: memory O(T/P).
Local and ring pieces' results (and gradients) then combine as Improved's do: in one pass
(kernels/combine.py) on a GPU with Triton, else merged piece by piece in float32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels import combine, unit_last_stride
from . import pieces as engine
from .base import DilatedAttentionBase
from .improved import op_forward
from .layout import Piece, branch_pieces, head_groups, index_scope
from .sdpa import attn_bwd, attn_fwd


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
    for branch, (w_cfg, r, heads) in enumerate(zip(segment_lengths, dilation_rates, groups)):
        w = min(w_cfg, T)
        if w <= shard_len:
            if shard_len % w and world > 1:
                raise ValueError(
                    f"segment length {w} does not divide the per-rank shard of {shard_len} tokens "
                    f"(T={T} over {world} ranks): a segment would straddle two ranks"
                )
            items.extend(branch_pieces(shard_len, w, r, heads, branch))
            continue
        if w % shard_len or shard_len % r:
            raise ValueError(
                f"segment length {w} spans ranks but the per-rank shard is {shard_len} tokens (T={T} over "
                f"{world} ranks): need segment length % shard == 0 and shard % dilation rate {r} == 0"
            )
        per_seg = w // shard_len
        first = rank // per_seg * per_seg
        peers = tuple(global_rank(p) for p in range(first, min(first + per_seg, world)))
        for piece in branch_pieces(shard_len, shard_len, r, heads, branch):  # strided groups, or gathered
            items.append(Ring(piece, peers, rank - first) if len(peers) > 1 else piece)
    return items


def _exchange(send: torch.Tensor, recv: torch.Tensor, ring: Ring, group):
    """Post send-to-next / recv-from-prev; returns the requests to wait on."""
    ops = [dist.P2POp(dist.isend, send, ring.next, group), dist.P2POp(dist.irecv, recv, ring.prev, group)]
    return dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


def _ring_forward(q, kv, ring: Ring, is_causal, scale, group):
    """Attend this rank's kept queries to every block of the sub-ring. q: (B, l, H, D);
    kv: (2, B, g, m, D) this rank's dilated K/V rows. Returns o (B, g, m, D), lse (B, g, m) float32."""
    qg = engine.kernel_rows(q, ring.piece)
    o_acc = kv.new_zeros(kv.shape[1:], dtype=engine.acc_dtype(kv.dtype))
    lse_acc = kv.new_full(kv.shape[1:4], float("-inf"), dtype=engine.acc_dtype(kv.dtype))
    cur, spare, first = kv, torch.empty_like(kv), True
    for step in range(len(ring.peers)):
        src = (ring.pos - step) % len(ring.peers)
        reqs = _exchange(cur, spare, ring, group) if step < len(ring.peers) - 1 else []
        if not (is_causal and src > ring.pos):
            o, lse = attn_fwd(qg, cur[0], cur[1], is_causal and src == ring.pos, scale)
            engine.merge_into(o_acc, lse_acc, o, lse, first)
            first = False
        _wait(reqs)
        cur, spare = spare, cur
    return o_acc, lse_acc


def _ring_backward(saved, lse, ring: Ring, is_causal, scale, group) -> list[torch.Tensor]:
    """This ring piece's [dq (local), dk, dv (after their trip round the ring)], each (B, g, m, D)
    float32."""
    dout, q, k, v, out = saved
    piece = ring.piece
    dog, qg, og, lg = (engine.kernel_rows(x, piece) for x in (dout, q, out, lse))
    cur = torch.stack([engine.read_rows(k, piece), engine.read_rows(v, piece)]).flatten(1, 2)  # (2, B, g, m, D)
    spare = torch.empty_like(cur)
    dkv = torch.zeros(cur.shape, dtype=engine.acc_dtype(cur.dtype), device=cur.device)
    dkv_in = torch.empty_like(dkv)
    dq = torch.zeros(cur.shape[1:], dtype=dkv.dtype, device=cur.device)
    steps = len(ring.peers)
    for step in range(steps):
        src = (ring.pos - step) % steps
        reqs = _exchange(cur, spare, ring, group) if step < steps - 1 else []
        if not (is_causal and src > ring.pos):
            gq, gk, gv = attn_bwd(dog, qg, cur[0], cur[1], og, lg, is_causal and src == ring.pos, scale)
            dq += gq
            dkv[0] += gk
            dkv[1] += gv
        # The block's gradient follows the block: after the last step it reaches its owner.
        _wait(_exchange(dkv, dkv_in, ring, group))
        _wait(reqs)
        cur, spare = spare, cur
        dkv, dkv_in = dkv_in, dkv
    return [dq, dkv[0], dkv[1]]


def _split(layout):
    return [x for x in layout if isinstance(x, Piece)], [x for x in layout if isinstance(x, Ring)]


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout, is_causal, scale, group):
        q, k, v = (unit_last_stride(x) for x in (q, k, v))
        pieces = [x.piece if isinstance(x, Ring) else x for x in layout]
        fresh = engine.fresh_flags(pieces)
        combined = engine.use_combine(q, pieces, fresh)  # keep every piece's result, merge once at the end
        if not combined:
            out, lse = engine.new_output(q, pieces[0], all(fresh))
        outs, lses = [], []
        with index_scope():
            for item, piece, is_fresh in zip(layout, pieces, fresh):
                if isinstance(item, Piece):
                    o, lse_p = engine.attend_piece(q, k, v, piece, is_causal, scale)
                else:  # (B, g, m, D): the ring piece's one segment per batch row
                    kv = torch.stack([engine.read_rows(k, piece), engine.read_rows(v, piece)]).flatten(1, 2)
                    o, lse_p = _ring_forward(q, kv, item, is_causal, scale, group)
                if combined:
                    outs.append(o)
                    lses.append(lse_p)
                else:
                    engine.merge_piece(out, lse, piece, o.unflatten(0, (q.shape[0], -1)), lse_p.unflatten(0, (q.shape[0], -1)), is_fresh)
        if combined:
            out, lse = combine.merge_pieces(q, pieces, outs, lses)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.layout, ctx.is_causal, ctx.scale, ctx.group = layout, is_causal, scale, group
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        local, rings = _split(ctx.layout)
        # Backward order (local pieces, then rings) decides which writes are fresh.
        pieces = [*local, *(ring.piece for ring in rings)]
        fresh = engine.fresh_flags(pieces)
        dtype = q.dtype if all(fresh) else engine.acc_dtype(q.dtype)
        saved = (unit_last_stride(dout), q, k, v, out)
        ring_grads = (_ring_backward(saved, lse, ring, ctx.is_causal, ctx.scale, ctx.group) for ring in rings)
        if engine.use_combine(q, pieces, fresh):
            local_grads = [engine.piece_grads(saved, lse, p, ctx.is_causal, ctx.scale) for p in local]
            return (*engine.sum_grads(q, pieces, [*local_grads, *ring_grads]), None, None, None, None)
        grads = [None, None, None]
        with index_scope():
            engine.backward_pieces(grads, saved, lse, local, fresh[: len(local)], ctx.is_causal, ctx.scale, dtype)
            for ring, gs, is_fresh in zip(rings, ring_grads, fresh[len(local):]):
                for i in range(3):
                    engine.write_grad(grads, i, ring.piece, gs[i], is_fresh, q, dtype)
        return (*engine.finish_grads(grads, q), None, None, None, None)


class RingDilatedAttention(DilatedAttentionBase):
    """Sequence-parallel dilated attention. See DilatedAttentionBase for the shared arguments.

    Args:
        process_group: the context-parallel group; None means the default group when
            torch.distributed is initialised, else a single rank. On a single rank (a group of
            one) it runs ImprovedDilatedAttention's custom op, whose function it then is.

    forward(query, key, value, is_causal=False): this rank's contiguous shard (B, T/P, H, D)
    of each; returns this rank's shard of the output. Every rank of the group must call it
    with the same shapes. flops() counts the whole sequence (all ranks together).
    """

    supports_dropout = False
    context_parallel = True
    fused_rope = True  # on one rank it is ImprovedDilatedAttention's op

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

    @classmethod
    def check_shard(cls, shard_len, world, num_heads, segment_lengths, dilation_rates, head_split) -> None:
        ring_layout(shard_len, world, 0, num_heads, tuple(segment_lengths), tuple(dilation_rates), head_split,
                    lambda r: r)

    def single_rank(self) -> bool:
        return self.group_info()[1] == 1

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        if self.single_rank():
            # One rank: every piece is local, so this is ImprovedDilatedAttention's op, whose custom
            # op a compiled block keeps in its graph (the ring below breaks it in two and runs
            # eagerly: 97 against 79 ms a 32K step under CUDA graphs on an H100).
            return op_forward(self, query, key, value, is_causal)
        return self._ring_forward(query, key, value, is_causal)

    # Eager inside a compiled model: the ring takes a process group, which a custom op (as
    # ImprovedDilatedAttention's) cannot, and Dynamo would trace its loop one piece at a time.
    @torch.compiler.disable
    def _ring_forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool) -> torch.Tensor:
        scale = self._check(query, key, value)
        group, world, rank, global_rank = self.group_info()
        B, l, H, D = query.shape
        layout = ring_layout(
            l, world, rank, H, self.segment_lengths, self.dilation_rates, self.head_split, global_rank
        )
        with self.no_autocast(query):
            return _RingFunction.apply(query, key, value, layout, bool(is_causal), scale, group)
