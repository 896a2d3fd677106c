"""Fused Triton kernels for the model's eager elementwise work: SwiGLU's silu(gate)·up and RoPE.

Why: an eager training step of the LongNet-size model at 32K spends 43 ms of its 112 in unfused
elementwise kernels (docs/performance.md, run 52), where torch.compile's fused kernels take 15.
Two of the biggest sources are these:
- SwiGLU: gate and up are the two halves of one projection, so every kernel on them reads a
  strided half (ATen's non-vectorised path); forward is silu then mul (and autograd keeps
  silu(gate), one more (l, hidden) tensor), backward two muls, silu's backward and a cat.
  Fused: forward reads gate_up once and writes the product; backward reads gate_up and the
  output's gradient and writes gate_up's gradient, in one pass each, math in float32.
- RoPE: six float32 passes per rotation (model.rotate_halves). Fused: read x and the angles'
  cos/sin, write the rotated x, in one pass.
Under torch.compile SwiGLU's kernels run as custom ops (nothing elementwise to fuse them with);
RoPE keeps its plain expression, which Inductor fuses with the kernels next to it, except where
rotary_attention.py takes RoPE into the attention op (rotate_qk, eager and compiled).

Shapes: x (…, 2·hidden) for SwiGLU; x (B, l, H, D) and cos/sin (1, l, 1, D/2) float32 for RoPE.
Runs on CUDA, and on CPU tensors through Triton's interpreter (tests only: it is slow).
"""
from __future__ import annotations

import os

import torch

from .attention import combine
from .attention.improved import unit_last_stride

triton = combine.triton
tl = combine.tl if triton is not None else None

# LONGCTX_FUSED=0 keeps the plain PyTorch expressions on the GPU too (for A/B runs).
ENABLED = os.environ.get("LONGCTX_FUSED", "1") != "0"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available(x: torch.Tensor) -> bool:
    """Whether the model may use these kernels for x: on CUDA with Triton >= 3.6, in a dtype they
    compute in float32 without loss. Under torch.compile the model takes SwiGLU's (swiglu_op) but
    keeps RoPE's plain expression, which Inductor fuses with its neighbours (model.rotate)."""
    return ENABLED and combine.compiled_triton(x.device) and x.dtype in DTYPES


if triton is not None:

    @triton.jit
    def _swiglu_fwd(x_ptr, out_ptr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
        """out[r, c] = silu(x[r, c]) · x[r, HIDDEN + c]; one program per (row, BLOCK columns)."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < HIDDEN
        g = tl.load(x_ptr + r * 2 * HIDDEN + c, mask=live, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + r * 2 * HIDDEN + HIDDEN + c, mask=live, other=0.0).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(out_ptr + r * HIDDEN + c, h.to(out_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _swiglu_bwd(x_ptr, dout_ptr, dx_ptr, HIDDEN: tl.constexpr, BLOCK: tl.constexpr):
        """d gate = dout · u · silu'(g), d up = dout · silu(g), silu'(g) = σ(g)·(1 + g·(1 − σ(g)))."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = c < HIDDEN
        g = tl.load(x_ptr + r * 2 * HIDDEN + c, mask=live, other=0.0).to(tl.float32)
        u = tl.load(x_ptr + r * 2 * HIDDEN + HIDDEN + c, mask=live, other=0.0).to(tl.float32)
        d = tl.load(dout_ptr + r * HIDDEN + c, mask=live, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(dx_ptr + r * 2 * HIDDEN + c, (d * u * s * (1 + g * (1 - s))).to(dx_ptr.dtype.element_ty), mask=live)
        tl.store(dx_ptr + r * 2 * HIDDEN + HIDDEN + c, (d * g * s).to(dx_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def _rope(x_ptr, cos_ptr, sin_ptr, out_ptr, L, SB, ST, SH, SLOT_STRIDE, SIGN: tl.constexpr, H: tl.constexpr,
              SLOT: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        """One program per position (b, t): every head rotated, (x1·cos − x2·sin, x2·cos + x1·sin),
        with sin negated when SIGN = −1 (the inverse rotation, for backward). x has strides
        (SB, ST, SH, 1); out holds H / SLOT contiguous (B, l, SLOT, 2·HALF) slots SLOT_STRIDE apart
        (one slot: out is contiguous (B, l, H, 2·HALF))."""
        row = tl.program_id(0).to(tl.int64)
        b, t = row // L, row % L
        k = tl.arange(0, BLOCK)  # (head, pair) flattened, H·HALF of them
        live = k < H * HALF
        head, j = k // HALF, k % HALF
        src = x_ptr + b * SB + t * ST + head * SH + j
        x1 = tl.load(src, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=live, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + t * HALF + j, mask=live, other=1.0)
        s = tl.load(sin_ptr + t * HALF + j, mask=live, other=0.0) * SIGN
        dst = out_ptr + (head // SLOT).to(tl.int64) * SLOT_STRIDE + row * SLOT * 2 * HALF + (head % SLOT) * 2 * HALF + j
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(dst + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=live)


def _swiglu_launch(kernel, x: torch.Tensor, *tensors: torch.Tensor) -> None:
    hidden = x.shape[-1] // 2
    block = min(triton.next_power_of_2(hidden), 2048)
    rows = x.numel() // x.shape[-1]
    kernel[(rows, triton.cdiv(hidden, block))](x, *tensors, HIDDEN=hidden, BLOCK=block)


def _swiglu_forward(x: torch.Tensor) -> torch.Tensor:
    out = x.new_empty((*x.shape[:-1], x.shape[-1] // 2))
    _swiglu_launch(_swiglu_fwd, x.contiguous(), out)
    return out


def _swiglu_backward(x: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _swiglu_launch(_swiglu_bwd, x.contiguous(), dout.contiguous(), dx)
    return dx


class _SwiGLU(torch.autograd.Function):
    """Eager: the kernels through autograd directly (a custom op's dispatch costs host time)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)  # only gate_up: the plain expression also keeps silu(gate)
        return _swiglu_forward(x)

    @staticmethod
    def backward(ctx, dout):
        return _swiglu_backward(ctx.saved_tensors[0], dout)


# Compiled: the same kernels as custom ops, one opaque node each way. Nothing elementwise sits
# next to SwiGLU (gate_up comes from a matmul, its output goes to one, and so do the gradients),
# so Inductor loses no fusion; its own backward kernel read the halves through a masked
# concatenation and ran at ~2.4 TB/s (docs/performance.md run 110).
swiglu_op = torch.library.custom_op("longctx::swiglu", _swiglu_forward, mutates_args=())
swiglu_backward_op = torch.library.custom_op("longctx::swiglu_backward", _swiglu_backward, mutates_args=())


@swiglu_op.register_fake
def _(x):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@swiglu_backward_op.register_fake
def _(x, dout):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


swiglu_op.register_autograd(lambda ctx, dout: swiglu_backward_op(ctx.saved_tensors[0], dout),
                            setup_context=_swiglu_setup)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for x = [gate, up] (…, 2·hidden) -> (…, hidden), in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: the last dim of x {tuple(x.shape)} must be even ([gate, up])")
    return swiglu_op(x) if torch.compiler.is_compiling() else _SwiGLU.apply(x)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: int, slots: int = 1) -> torch.Tensor:
    """x (B, L, H, D) rotated, as a new contiguous tensor (B, L, H, D), or with slots > 1
    (slots, B, L, H / slots, D); cos and sin (L, D/2) float32."""
    B, L, H, D = x.shape
    assert x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32
    out = torch.empty((slots, B, L, H // slots, D), dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(H * D // 2)
    _rope[(B * L,)](x, cos, sin, out, L, x.stride(0), x.stride(1), x.stride(2), out[0].numel(), SIGN=sign, H=H,
                    SLOT=H // slots, HALF=D // 2, BLOCK=block)
    return out[0] if slots == 1 else out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(x, cos, sin, 1)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rope_launch(unit_last_stride(grad), cos, sin, -1), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.rotate's rotation of x (B, l, H, D) (unit last stride) by cos/sin (1, l, 1, D/2)
    float32, as one kernel each way; returns a contiguous tensor in x's dtype."""
    B, L, H, D = x.shape
    if D % 2 or cos.shape[-1] != D // 2 or cos.numel() != L * D // 2:
        raise ValueError(f"rope: x {tuple(x.shape)} needs cos/sin of (1, {L}, 1, {D // 2}), got {tuple(cos.shape)}")
    return _Rope.apply(unit_last_stride(x), cos.reshape(L, D // 2), sin.reshape(L, D // 2))


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """qkv (B, l, 3, H, D) with unit last stride -> (2, B, l, H, D), contiguous: q and k rotated
    by cos/sin (l, D/2) float32 as rope does, in one kernel (rotary_attention.py; no autograd). v
    is not read: the attention kernels take it from qkv, strided."""
    B, L, _, H, D = qkv.shape
    if not (qkv.stride(-1) == 1 and qkv.stride(3) == D and qkv.stride(2) == H * D):
        qkv = qkv.contiguous()  # so that the slots fold into the heads, (B, l, 3·H, D) as a view
    return _rope_launch(qkv.flatten(2, 3)[:, :, :2 * H], cos, sin, 1, slots=2)
