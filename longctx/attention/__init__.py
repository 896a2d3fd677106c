"""Dilated attention (LongNet) in six variants; docs/design.md has the math they all compute.

By role: base.py (the core ops' constructor, checks and FLOPs), layout.py (branches, the pieces
one kernel call serves, FLOPs), reference.py (DilatedAttention: the math in plain PyTorch),
sdpa.py (PyTorch's fused attention kernels called for their log-sum-exp), pieces.py (the
per-piece engine), improved.py (ImprovedDilatedAttention: the fast op), ring.py (sequence
parallel), multihead.py (the (B, T, E) modules), rotary.py (the fast op on a fused q/k/v
projection with RoPE inside), registry.py (the variants by name and what each declares). The
Triton kernels live in longctx/kernels.
"""
from __future__ import annotations

from .base import DilatedAttentionBase
from .improved import ImprovedDilatedAttention
from .multihead import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention, RingMultiheadDilatedAttention
from .reference import DilatedAttention
from .registry import REGISTRY, Variant, build_attention, resolve, variant
from .ring import RingDilatedAttention

__all__ = [
    "DilatedAttentionBase",
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "REGISTRY",
    "Variant",
    "build_attention",
    "resolve",
    "variant",
]
