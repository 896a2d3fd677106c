"""Attention calls that return the log-sum-exp, and their backward, per device.

Shapes: N batch (segments folded in), H heads, L rows, D head dim. Inputs are (N, H, L, D)
tensors (any strides with a unit last dim, e.g. a transposed (N, L, H, D) buffer); outputs are
(N, H, L, D) in the input dtype and lse (N, H, L) float32, natural log of the scaled scores.

The backward takes the *final* output and LSE of the row (after merging branches), not this
call's own: then P = exp(z − L) and D = rowsum(dO ∘ O) are the merged softmax's, and the
gradient is exact (docs/design.md#exact-gradients).

Kernel choice:
- CUDA fp16/bf16: cuDNN's `aten._scaled_dot_product_cudnn_attention` (+ `_backward`), or
  flash (`_scaled_dot_product_flash_attention`) with LONGCTX_CUDA_ATTENTION=flash. On an H100
  (tools/kernels/kernel_probe.py, 2026-11-25) cuDNN ran the long preset's branch shapes at 332 TF/s
  forward and 307 backward against flash's 237 and 216; docs/performance.md has the table.
- CPU: `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`).
- Anything else (fp32/fp64 on CUDA, fp64 on CPU, or a torch without those private ops): an
  explicit float32/float64 matmul path, O(L²) memory per call.
"""
from __future__ import annotations

import os

import torch

_aten = torch.ops.aten
# cuDNN measured ~40% faster than flash on the long preset's branch shapes (H100, 2026-11-25).
CUDA_BACKEND = os.environ.get("LONGCTX_CUDA_ATTENTION", "cudnn")
if CUDA_BACKEND not in ("flash", "cudnn"):
    raise ValueError(f"LONGCTX_CUDA_ATTENTION={CUDA_BACKEND!r} must be 'flash' or 'cudnn'")


def _has(name: str) -> bool:
    return hasattr(_aten, name)


_CPU_FLASH = _has("_scaled_dot_product_flash_attention_for_cpu") and _has(
    "_scaled_dot_product_flash_attention_for_cpu_backward"
)
_CUDA_FLASH = _has("_scaled_dot_product_flash_attention") and _has("_scaled_dot_product_flash_attention_backward")


def _backend(q: torch.Tensor) -> str:
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and _CUDA_FLASH:
        # cuDNN rejects single-row calls (s_q = s_kv = 1): flash serves those.
        return "cuda_flash" if q.shape[2] == 1 or CUDA_BACKEND == "flash" else "cuda_cudnn"
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16, torch.float32) and _CPU_FLASH:
        return "cpu_flash"
    return "math"


def _causal_mask(lq: int, lk: int, device) -> torch.Tensor:
    # Top-left aligned: row i sees keys 0..i (query and key sets start at the same position).
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def _math_fwd(q, k, v, is_causal, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.to(acc)).to(q.dtype), lse


def _math_bwd(dout, q, k, v, out, lse, is_causal, scale):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q_, k_, v_, do_ = q.to(acc), k.to(acc), v.to(acc), dout.to(acc)
    s = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    if is_causal:
        s = s.masked_fill(~_causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    p = torch.exp(s - lse.to(acc)[..., None])
    dv = torch.matmul(p.transpose(-1, -2), do_)
    dp = torch.matmul(do_, v_.transpose(-1, -2))
    delta = (do_ * out.to(acc)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.matmul(ds, k_)
    dk = torch.matmul(ds.transpose(-1, -2), q_)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


def attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float):
    """Softmax attention of (N, H, L, D) q/k/v; returns (out (N, H, L, D), lse (N, H, L) fp32)."""
    backend = _backend(q)
    if backend == "cuda_flash":
        out, lse = _aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal, False, scale=scale)[:2]
        return out, lse
    if backend == "cuda_cudnn":
        out, lse = _aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)[:2]
        return out, lse.view(q.shape[:3])  # cuDNN gives (N, H, L, 1)
    if backend == "cpu_flash":
        return _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return _math_fwd(q, k, v, is_causal, scale)


def _no_dropout_rng(device: torch.device):
    """Placeholder philox (seed, offset) for a backward without dropout: their values are never
    used (dropout 0 drops nothing), so they are left uninitialised, with no kernel launch. Made
    per call, not cached: a tensor kept between calls is a stray allocation in a CUDA-graph pool
    (torch.compile's mode="reduce-overhead" refused the step)."""
    return torch.empty(2, dtype=torch.uint64, device=device), torch.empty((), dtype=torch.uint64, device=device)


def attn_bwd(dout, q, k, v, out, lse, is_causal: bool, scale: float):
    """Gradients (dq, dk, dv) of one call given the merged `out` (N, H, L, D) and `lse` (N, H, L)."""
    backend = _backend(q)
    lq, lk = q.shape[2], k.shape[2]
    if backend == "cuda_flash":
        # None for cum_seq_q/k: the dense (not varlen) kernel.
        seed, offset = _no_dropout_rng(q.device)
        return _aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse.contiguous(), None, None, lq, lk, 0.0, is_causal, seed, offset, scale=scale
        )
    if backend == "cuda_cudnn":
        seed, offset = _no_dropout_rng(q.device)
        return _aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.contiguous().unsqueeze(-1), seed, offset, None, None, None, lq, lk, 0.0,
            is_causal, scale=scale,
        )[:3]
    if backend == "cpu_flash":
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout, q, k, v, out, lse, 0.0, is_causal, scale=scale
        )
    return _math_bwd(dout, q, k, v, out, lse, is_causal, scale)
