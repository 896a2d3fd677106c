"""The constructor, validation and FLOP count every core dilated-attention op shares.

Shapes: B batch, T sequence length, H heads, D head dim.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn

from .layout import default_scale, dilated_flops, head_groups, validate_branches, validate_common, validate_qkv


class DilatedAttentionBase(nn.Module):
    """Common surface of the core ops: `forward(query, key, value, is_causal=False)` on
    (B, T, H, D) tensors, returning (B, T, H, D) in the query's dtype.

    Args:
        segment_lengths: w_1..w_k, one per branch; a w larger than T is clipped to T.
        dilation_rates: r_1..r_k; r_i must divide w_i.
        softmax_scale: defaults to 1/sqrt(D).
        dropout: attention-probability dropout in [0, 1), training mode only.
        head_split: run each branch on its own contiguous group of heads (k× fewer FLOPs)
            instead of every head running every branch.
    """

    # The fused paths cannot replay the kernels' dropout RNG per piece in backward.
    supports_dropout = True
    # What the LM and the trainer read (registry.Variant). context_parallel: the op takes a
    # `process_group` attribute and this rank's contiguous shard of the sequence. fused_rope: the
    # block may run the op's math on its fused q/k/v projection with RoPE inside (rotary.py),
    # bypassing forward: a subclass that changes the math must leave it False.
    context_parallel = False
    fused_rope = False

    def __init__(
        self,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        softmax_scale: float | None = None,
        dropout: float = 0.0,
        head_split: bool = False,
    ) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = validate_branches(segment_lengths, dilation_rates)
        validate_common(softmax_scale, dropout)
        self.softmax_scale = softmax_scale
        self.dropout = float(dropout)
        self.head_split = bool(head_split)
        if self.dropout > 0 and not self.supports_dropout:
            raise NotImplementedError(
                f"{type(self).__name__} does not support attention dropout (dropout={dropout}); "
                "use DilatedAttention, or dropout on the residual path"
            )

    def _check(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> float:
        """Validate inputs; return the softmax scale. The ops compute in the inputs' dtype with
        float32 merges, so callers run them with autocast disabled (see no_autocast)."""
        validate_qkv(query, key, value)
        head_groups(query.shape[2], len(self.segment_lengths), self.head_split)
        return default_scale(query.shape[-1], self.softmax_scale)

    @staticmethod
    def no_autocast(tensor: torch.Tensor):
        """A context that turns autocast off on the tensor's device: under autocast the inputs
        already have the compute dtype, and the float32 merge must stay float32."""
        return torch.autocast(tensor.device.type, enabled=False)

    @classmethod
    def check_shard(cls, shard_len: int, world: int, num_heads: int, segment_lengths, dilation_rates,
                    head_split: bool) -> None:
        """A context-parallel op's rules for `world` ranks holding `shard_len` tokens each
        (ValueError when they fail), checked on every rank before any communication."""

    def single_rank(self) -> bool:
        """Whether this call sees the whole sequence (always, but for a context-parallel op whose
        group has several ranks)."""
        return True

    def flops(self, batch: int, seq_len: int, num_heads: int, head_dim: int, is_causal: bool = False) -> int:
        """Forward FLOPs (docs/design.md#flops); backward is conventionally 2.5× this."""
        return dilated_flops(
            batch, seq_len, num_heads, head_dim, self.segment_lengths, self.dilation_rates, self.head_split, is_causal
        )

    def extra_repr(self) -> str:
        return (
            f"segment_lengths={list(self.segment_lengths)}, dilation_rates={list(self.dilation_rates)}, "
            f"head_split={self.head_split}, dropout={self.dropout}"
        )


def profiler_label(name: str):
    """torch.profiler.record_function(name) while a profiler runs, else nothing: the label costs
    host time on every call, and eager calls at 8K-32K are bound by host time."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
