"""Dilated attention (LongNet) in six variants; see DESIGN §3–§5.

`build_attention(name, **kwargs)` builds a variant from its registry name.
"""
from __future__ import annotations

from torch import nn

from .dilated import DilatedAttention
from .improved import ImprovedDilatedAttention
from .multihead import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention, RingMultiheadDilatedAttention
from .ring import RingDilatedAttention

REGISTRY: dict[str, type[nn.Module]] = {
    "dilated": DilatedAttention,
    "improved_dilated": ImprovedDilatedAttention,
    "multihead_dilated": MultiheadDilatedAttention,
    "improved_multihead_dilated": ImprovedMultiheadDilatedAttention,
    "ring_dilated": RingDilatedAttention,
    "ring_multihead_dilated": RingMultiheadDilatedAttention,
}


def build_attention(name: str, **kwargs) -> nn.Module:
    """Build a variant by name (see REGISTRY); unknown names raise ValueError listing the valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attention name {name!r}: valid names are {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)


__all__ = [
    "DilatedAttention",
    "ImprovedDilatedAttention",
    "MultiheadDilatedAttention",
    "ImprovedMultiheadDilatedAttention",
    "RingDilatedAttention",
    "RingMultiheadDilatedAttention",
    "REGISTRY",
    "build_attention",
]
