"""The attention variants by name, and what the model and the trainer need to know of each.

A variant is declared once, by its class:
- a *core op* subclasses DilatedAttentionBase: forward(q, k, v, is_causal) on (B, T, H, D)
  tensors; the LM block wraps it in its own projections (model.CoreAttention);
- a *multihead module* subclasses MultiheadDilatedAttention: forward(x) on (B, T, E), its core op
  in `attention_cls`; it *is* the block's attention (model.MultiheadAdapter).
A core op's class also says `context_parallel` (it takes a process group and this rank's shard of
the sequence: the ring) and `fused_rope` (the block may run it on its fused q/k/v projection with
RoPE inside the op, rotary.py). `variant(cls)` reads all of that for model.py, lit_module.py,
rotary.py and the benchmark; REGISTRY names the six shipped variants. A class of the user's,
given by its class path, works the same when it subclasses one of the two bases
(docs/extending.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

from torch import nn

from .base import DilatedAttentionBase
from .improved import ImprovedDilatedAttention
from .multihead import ImprovedMultiheadDilatedAttention, MultiheadDilatedAttention, RingMultiheadDilatedAttention
from .reference import DilatedAttention
from .ring import RingDilatedAttention

REGISTRY: dict[str, type[nn.Module]] = {
    "dilated": DilatedAttention,
    "improved_dilated": ImprovedDilatedAttention,
    "multihead_dilated": MultiheadDilatedAttention,
    "improved_multihead_dilated": ImprovedMultiheadDilatedAttention,
    "ring_dilated": RingDilatedAttention,
    "ring_multihead_dilated": RingMultiheadDilatedAttention,
}
NAMES = {cls: name for name, cls in REGISTRY.items()}


@dataclass(frozen=True)
class Variant:
    """What a variant's class declares. name: its registry name, or the class's own for a
    user's; core: its core op's class (cls itself, or a multihead module's attention_cls);
    multihead: a (B, T, E) module rather than a core op; context_parallel and
    fused_rope: its core op's (see the module docstring)."""

    name: str
    cls: type[nn.Module]
    core: type[DilatedAttentionBase]
    multihead: bool
    context_parallel: bool
    fused_rope: bool


def is_variant(cls) -> bool:
    return isinstance(cls, type) and issubclass(cls, (DilatedAttentionBase, MultiheadDilatedAttention))


def variant(cls: type[nn.Module]) -> Variant:
    assert is_variant(cls), f"{cls} is not an attention variant"
    multihead = issubclass(cls, MultiheadDilatedAttention)
    core = cls.attention_cls if multihead else cls
    return Variant(NAMES.get(cls, cls.__name__), cls, core, multihead, core.context_parallel,
                   core.fused_rope and not multihead)


def resolve(class_path: str) -> Variant:
    """A registry name ("improved_dilated") or a class path ("longctx.attention.RingDilatedAttention",
    "my_package.MyAttention") -> its Variant; ValueError naming the valid choices otherwise."""
    if class_path in REGISTRY:
        return variant(REGISTRY[class_path])
    module_name, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not is_variant(cls):
        raise ValueError(f"model.attention.class_path={class_path!r} is not an attention variant: use one of "
                         f"{sorted(REGISTRY)}, their classes in longctx.attention, or the class path of a subclass of "
                         "longctx.attention.DilatedAttentionBase or MultiheadDilatedAttention")
    return variant(cls)


def build_attention(name: str, **kwargs) -> nn.Module:
    """Build a variant by name (see REGISTRY); unknown names raise ValueError listing the valid ones."""
    if name not in REGISTRY:
        raise ValueError(f"unknown attention name {name!r}: valid names are {sorted(REGISTRY)}")
    return REGISTRY[name](**kwargs)
