"""ImprovedDilatedAttention: the same function as DilatedAttention, fast.

Shapes: B batch, T sequence length, H heads, D head dim; LSE (B, T, H) float32 (pieces.py says
why not (B, H, T)).

LongNet's own layouts (r = 1, 2, 4, …, w_i = L·r_i) run on the GPU as one weighted softmax per
query in Triton, each distinct (query, key) pair scored once (kernels/union.py; with head_split,
one strided softmax per head). Every other layout, device or dtype runs the per-piece engine
(pieces.py): one LSE-returning kernel call per piece of the plan, merged by LongNet Eq. 10.
The op saves q, k, v, the merged output and LSE; backward recomputes each part against the
merged output and LSE, which is the exact gradient (docs/design.md#exact-gradients).
"""
from __future__ import annotations

import torch

from ..kernels import combine, union, unit_last_stride
from .base import DilatedAttentionBase, profiler_label
from .layout import index_scope
from .pieces import (acc_dtype, attend_pieces, backward_pieces, finish_grads, forward_pieces, new_output, piece_grads,
                     pieces_of, sum_grads, use_combine)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: list[int], dilation_rates: list[int],
           head_split: bool, is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dilated attention of q/k/v (B, T, H, D): (out (B, T, H, D) in q's dtype, merged LSE (B, T, H))."""
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    lay = union.layout(*q.shape[1:], segment_lengths, dilation_rates, head_split)
    if union.use(q, lay):
        return union.forward(q, k, v, lay, is_causal, scale)
    pieces, fresh = pieces_of(*q.shape[1:3], tuple(segment_lengths), tuple(dilation_rates), head_split)
    if use_combine(q, pieces, fresh):
        return combine.merge_pieces(q, pieces, *attend_pieces(q, k, v, pieces, is_causal, scale))
    out, lse = new_output(q, pieces[0], all(fresh))
    with index_scope():
        forward_pieces(out, lse, q, k, v, pieces, fresh, is_causal, scale)
    return out.to(q.dtype), lse


def attend_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, segment_lengths: list[int], dilation_rates: list[int], head_split: bool,
                    is_causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact (dq, dk, dv) of attend given its merged out and lse, and dout (all (B, T, H, D))."""
    q, k, v = (unit_last_stride(x) for x in (q, k, v))
    lay = union.layout(*q.shape[1:], segment_lengths, dilation_rates, head_split)
    if union.use(q, lay):
        return union.backward(unit_last_stride(dout), q, k, v, out, lse, lay, is_causal, scale)
    pieces, fresh = pieces_of(*q.shape[1:3], tuple(segment_lengths), tuple(dilation_rates), head_split)
    saved = (unit_last_stride(dout), q, k, v, out)
    if use_combine(q, pieces, fresh):
        return tuple(sum_grads(q, pieces, [piece_grads(saved, lse, p, is_causal, scale) for p in pieces]))
    grads = [None, None, None]  # backward visits the pieces in forward's order, so `fresh` holds
    dtype = q.dtype if all(fresh) else acc_dtype(q.dtype)
    with index_scope():
        backward_pieces(grads, saved, lse, pieces, fresh, is_causal, scale, dtype)
    return tuple(finish_grads(grads, q))


# Two entry points to attend, with the same autograd (it saves q, k, v, out and LSE):
# - a torch.library custom op, for torch.compile: one opaque node with no graph break (Dynamo
#   traced the Python loop as one small graph per piece and recompiled past its limit), so a
#   compiled block, and a CUDA-graph-captured one
#   (mode="reduce-overhead"), includes it. Its fake implementations give the real outputs'
#   shapes, dtypes and (contiguous) strides;
# - a torch.autograd.Function, for eager calls: the custom op's dispatch and autograd wrapper
#   took 4-36% of the op's host time a forward+backward, and eager calls at 8K-32K are bound
#   by host time.
dilated_attention = torch.library.custom_op("longctx::dilated_attention", attend, mutates_args=())
dilated_attention_backward = torch.library.custom_op("longctx::dilated_attention_backward", attend_backward,
                                                     mutates_args=())


@dilated_attention.register_fake
def _(q, k, v, segment_lengths, dilation_rates, head_split, is_causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@dilated_attention_backward.register_fake
def _(dout, q, k, v, out, lse, segment_lengths, dilation_rates, head_split, is_causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, *config = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.config = config
    ctx.set_materialize_grads(False)  # the LSE output gets no gradient


def _backward(ctx, dout, _dlse):
    return (*dilated_attention_backward(dout, *ctx.saved_tensors, *ctx.config), *[None] * len(ctx.config))


dilated_attention.register_autograd(_backward, setup_context=_setup_context)


class EagerDilatedAttention(torch.autograd.Function):
    """attend with the custom op's autograd, called directly: apply(q, k, v, config) -> out, with
    config the op's (segment_lengths, dilation_rates, head_split, is_causal, scale) as one tuple.
    Profiler traces name it like the op; the label is only made while a profiler runs. Host cost
    of this wrapper around stub kernels on a 2-core CPU: 180 µs a forward+backward with five
    config arguments, record_function labels and an autocast context every call; 103 µs as it
    is, against 65 µs for a bare autograd.Function."""

    @staticmethod
    def forward(ctx, q, k, v, config):
        with profiler_label("longctx::dilated_attention"):
            out, lse = attend(q, k, v, *config)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        with profiler_label("longctx::dilated_attention_backward"):
            dq, dk, dv = attend_backward(dout, *ctx.saved_tensors, *ctx.config)
        return dq, dk, dv, None


class ImprovedDilatedAttention(DilatedAttentionBase):
    """Fast dilated attention (same function as DilatedAttention). See DilatedAttentionBase.

    forward(query, key, value, is_causal=False): (B, T, H, D) each -> (B, T, H, D). The inputs
    may be strided views (e.g. q/k/v split from a fused projection) with a unit last stride.
    Attention-probability dropout is not supported (the fused kernels' dropout RNG state would
    have to be replayed per piece in backward): dropout > 0 raises NotImplementedError.
    """

    supports_dropout = False
    fused_rope = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        return op_forward(self, query, key, value, is_causal)


def op_forward(module: DilatedAttentionBase, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               is_causal: bool) -> torch.Tensor:
    """The op on `module`'s layout (the custom op under torch.compile, else EagerDilatedAttention):
    ImprovedDilatedAttention's forward, and the ring's on one rank (where the ring is the same
    function, and the op compiles into a block's graph)."""
    scale = module._check(query, key, value)
    ws, rs, split, causal = module.segment_lengths, module.dilation_rates, module.head_split, bool(is_causal)
    if torch.compiler.is_compiling():
        with module.no_autocast(query):
            return dilated_attention(query, key, value, list(ws), list(rs), split, causal, scale)[0]
    config = (ws, rs, split, causal, scale)
    if not torch.is_autocast_enabled(query.device.type):  # skip entering a context that changes nothing
        return EagerDilatedAttention.apply(query, key, value, config)
    with module.no_autocast(query):
        return EagerDilatedAttention.apply(query, key, value, config)
