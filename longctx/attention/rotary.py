"""ImprovedDilatedAttention's union kernels on the block's fused q/k/v projection, with RoPE inside
the op: what model.CoreAttention runs where `applies` holds.

Why: around the op, a compiled 32K step of the LongNet-size
model spent 2.7 ms in four memory-bound kernels of Inductor's: RoPE's rotation of q and k (0.95),
the copy of v into a contiguous tensor (0.41), the rotation's backward (0.92) and the stack of dq,
dk and dv into the projection's gradient (0.42). Here:
- forward: one kernel (fused.rotate_qk) reads q and k from the projection's output qkv
  (B, T, 3, H, D) and writes them rotated into one buffer (2, B, T, H, D); the union kernels read
  those contiguous slots and v from qkv in place (strided rows cost them nothing measurable).
  Backward keeps the rotated q and k and qkv itself (for v): one (B, T, H, D) tensor more
  than the rotated q and k and a copy of v would be, for one copy less;
- backward: the union kernels write dq and dk rotated back (RoPE's backward, in their epilogues,
  in float32) and dv straight into one (B, T, 3, H, D) gradient, the projection's output's.
Measured on an H100: `_rope` 1.26 ms a step, the epilogues 0.3–0.5 ms, the step
1.1–1.4 ms faster (train.py at 32K 62.6 against 63.7 ms in one call); with v read in place
`_rope` takes 0.86 ms.
The same function as model.rotate on q and k and then the op (the GPU tests compare the two);
every other case (another variant or layout, the CPU, float32) runs just that.

Two entry points with one autograd, as improved.py's: a custom op under torch.compile, an
autograd.Function eagerly (host time). LONGCTX_ROTARY=0 turns this path off (for A/B runs).
"""
from __future__ import annotations

import os

import torch

from ..kernels import fused, union, unit_last_stride
from .base import profiler_label

ENABLED = os.environ.get("LONGCTX_ROTARY", "1") != "0"


def applies(op: torch.nn.Module, qkv: torch.Tensor) -> bool:
    """Whether op (a core op) on qkv (B, T, 3, H, D) runs here: a variant that declares
    fused_rope (ImprovedDilatedAttention, and the ring on one rank, which runs Improved's op), on
    a layout and device the union kernels take."""
    if not (ENABLED and op.fused_rope and op.single_rank()):
        return False
    B, T, _, H, D = qkv.shape
    return union.use(qkv, union.layout(T, H, D, op.segment_lengths, op.dilation_rates, op.head_split))


def attention(op, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_causal: bool) -> torch.Tensor:
    """op(rotate(q), rotate(k), v) for q, k, v = qkv.unbind(2), rotated as model.rotate does by
    cos and sin (1, T, 1, D/2) float32: (B, T, H, D) in qkv's dtype. Needs applies(op, qkv)."""
    scale = op._check(*qkv.unbind(2))
    T, D = qkv.shape[1], qkv.shape[-1]
    angles = cos.reshape(T, D // 2).contiguous(), sin.reshape(T, D // 2).contiguous()
    config = (list(op.segment_lengths), list(op.dilation_rates), op.head_split, bool(is_causal), scale)
    with op.no_autocast(qkv):
        if torch.compiler.is_compiling():
            return rotary_dilated_attention(qkv, *angles, *config)[0]
        return EagerRotaryAttention.apply(qkv, *angles, config)


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segment_lengths: list[int],
           dilation_rates: list[int], head_split: bool, is_causal: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, T, H, D), LSE (B, T, H) float32, the rotated q and k (2, B, T, H, D) that
    backward reads, with v from qkv)."""
    T, H, D = qkv.shape[1], qkv.shape[3], qkv.shape[4]
    rotated = fused.rotate_qk(qkv, cos, sin)
    lay = union.layout(T, H, D, segment_lengths, dilation_rates, head_split)
    out, lse = union.forward(*rotated, unit_last_stride(qkv).select(2, 2), lay, is_causal, scale)
    return out, lse, rotated


def attend_backward(dout: torch.Tensor, qkv: torch.Tensor, rotated: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, segment_lengths: list[int],
                    dilation_rates: list[int], head_split: bool, is_causal: bool, scale: float) -> torch.Tensor:
    """The gradient (B, T, 3, H, D) of attend's qkv, given qkv and attend's out, LSE and rotated q and k."""
    B, T, _, H, D = qkv.shape
    dqkv = torch.empty((B, T, 3, H, D), dtype=rotated.dtype, device=rotated.device)
    lay = union.layout(T, H, D, segment_lengths, dilation_rates, head_split)
    union.backward(unit_last_stride(dout), *rotated, unit_last_stride(qkv).select(2, 2), out, lse, lay, is_causal,
                   scale, grads=dqkv.unbind(2), rope=(cos, sin))
    return dqkv


rotary_dilated_attention = torch.library.custom_op("longctx::rotary_dilated_attention", attend, mutates_args=())
rotary_dilated_attention_backward = torch.library.custom_op("longctx::rotary_dilated_attention_backward",
                                                            attend_backward, mutates_args=())


@rotary_dilated_attention.register_fake
def _(qkv, cos, sin, segment_lengths, dilation_rates, head_split, is_causal, scale):
    B, T, _, H, D = qkv.shape
    return qkv.new_empty((B, T, H, D)), qkv.new_empty((B, T, H), dtype=torch.float32), qkv.new_empty((2, B, T, H, D))


@rotary_dilated_attention_backward.register_fake
def _(dout, qkv, rotated, cos, sin, out, lse, segment_lengths, dilation_rates, head_split, is_causal, scale):
    return rotated.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, cos, sin, *config = inputs
    out, lse, rotated = output
    ctx.save_for_backward(qkv, rotated, cos, sin, out, lse)
    ctx.config = config
    ctx.set_materialize_grads(False)  # the LSE and the rotated q and k get no gradient


def _backward(ctx, dout, _dlse, _drotated):
    return rotary_dilated_attention_backward(dout, *ctx.saved_tensors, *ctx.config), None, None, *[None] * len(ctx.config)


rotary_dilated_attention.register_autograd(_backward, setup_context=_setup_context)


class EagerRotaryAttention(torch.autograd.Function):
    """attend with the custom op's autograd, called directly: apply(qkv, cos, sin, config) -> out."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, config):
        with profiler_label("longctx::rotary_dilated_attention"):
            out, lse, rotated = attend(qkv, cos, sin, *config)
        ctx.save_for_backward(qkv, rotated, cos, sin, out, lse)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, dout):
        with profiler_label("longctx::rotary_dilated_attention_backward"):
            return attend_backward(dout, *ctx.saved_tensors, *ctx.config), None, None, None
