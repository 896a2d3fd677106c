"""Multihead dilated attention modules: (B, T, E) in, (B, T, E) out (docs/design.md#the-six-variants).

Shapes: B batch, T sequence length, E embed dim, H heads, D = E / H.

q/k/v projections, the core op, an optional sub-LayerNorm before the output projection and
MAGNETO initialisation (Wang et al. 2022, "Foundation Transformers": xavier-normal with gain
gamma on the value and output projections). All three multihead classes have exactly these
parameters, so a state_dict moves between them with strict=True.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_positive_int
from .improved import ImprovedDilatedAttention
from .reference import DilatedAttention
from .ring import RingDilatedAttention


class MultiheadDilatedAttention(nn.Module):
    """Projections around DilatedAttention; a drop-in for self-attention calls of
    `nn.MultiheadAttention(batch_first=True)` that returns `(out, None)`.

    Args:
        embed_dim: E, divisible by num_heads.
        num_heads: H.
        segment_lengths, dilation_rates, head_split, dropout: as the core op.
        bias: biases on the four projections.
        layer_norm: sub-LayerNorm on the attention output before out_proj (LongNet/MAGNETO).
        layer_norm_eps: its epsilon.
        gamma_init: MAGNETO gain for the value and output projections' xavier-normal init.
        device, dtype: where and in which dtype parameters are created.
    """

    attention_cls: type[nn.Module] = DilatedAttention

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        segment_lengths: Sequence[int],
        dilation_rates: Sequence[int],
        *,
        dropout: float = 0.0,
        bias: bool = True,
        layer_norm: bool = True,
        layer_norm_eps: float = 1e-5,
        gamma_init: float = 1.0,
        head_split: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.gamma_init = gamma_init
        self.attention = self.attention_cls(segment_lengths, dilation_rates, dropout=dropout, head_split=head_split)
        factory = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **factory) if layer_norm else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_normal_(self.q_proj.weight)
        nn.init.xavier_normal_(self.k_proj.weight)
        nn.init.xavier_normal_(self.v_proj.weight, gain=self.gamma_init)
        nn.init.xavier_normal_(self.out_proj.weight, gain=self.gamma_init)
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.norm is not None:
            self.norm.reset_parameters()

    def _check_inputs(self, query, key, value, attn_mask, key_padding_mask, need_weights) -> None:
        if attn_mask is not None or key_padding_mask is not None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot honour attn_mask/key_padding_mask: dilated attention has a fixed "
                "sparsity pattern (use is_causal=True for causal masking, and pack sequences without padding)"
            )
        if need_weights:
            raise NotImplementedError(f"{type(self).__name__} never materialises attention weights: pass need_weights=False")
        param_dtype = self.q_proj.weight.dtype
        for name, x in (("query", query), ("key", key), ("value", value)):
            if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{name} has shape {shape}: expected (batch, seq, embed_dim={self.embed_dim})")
            if x.dtype != param_dtype and not torch.is_autocast_enabled(x.device.type):
                raise ValueError(
                    f"{name} dtype {x.dtype} does not match the parameters' dtype {param_dtype}: cast the module "
                    f"with module.to({x.dtype}) or run it under torch.autocast"
                )
        if not (query.shape == key.shape == value.shape):
            raise ValueError(
                f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} must have "
                "the same shape (dilated attention is self-attention over one sequence)"
            )

    def _project(self, query, key, value):
        """(B, T, E) x3 -> q, k, v as (B, T, H, D)."""
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        return (x.unflatten(-1, (self.num_heads, self.head_dim)) for x in (q, k, v))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        is_causal: bool = False,
        rope: Callable[[torch.Tensor], torch.Tensor] | None = None,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, None]:
        """query/key/value: (B, T, E); key and value default to query. `rope(x)` rotates a
        (B, T, H, D) tensor by its global positions; it is applied to q and k after projection.
        Returns (out (B, T, E), None)."""
        key = query if key is None else key
        value = key if value is None else value
        self._check_inputs(query, key, value, attn_mask, key_padding_mask, need_weights)
        q, k, v = self._project(query, key, value)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = self.attention(q, k, v, is_causal=is_causal).flatten(-2)
        if self.norm is not None:
            out = self.norm(out)
        return self.out_proj(out), None

    def flops(self, batch: int, seq_len: int, is_causal: bool = False) -> int:
        """Forward FLOPs: four E×E projections plus the core op's attention."""
        proj = 4 * 2 * batch * seq_len * self.embed_dim * self.embed_dim
        return proj + self.attention.flops(batch, seq_len, self.num_heads, self.head_dim, is_causal)


class ImprovedMultiheadDilatedAttention(MultiheadDilatedAttention):
    """MultiheadDilatedAttention around ImprovedDilatedAttention. For self-attention the three
    input projections run as one fused matmul over the concatenated weights; the parameters
    stay q_proj/k_proj/v_proj so checkpoints move between the multihead classes."""

    attention_cls = ImprovedDilatedAttention

    def _project(self, query, key, value):
        if not (query is key and key is value):
            return super()._project(query, key, value)
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = None
        if self.q_proj.bias is not None:
            bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv = F.linear(query, weight, bias).unflatten(-1, (3, self.num_heads, self.head_dim))
        return qkv.unbind(-3)


class RingMultiheadDilatedAttention(ImprovedMultiheadDilatedAttention):
    """ImprovedMultiheadDilatedAttention around RingDilatedAttention: takes and returns this
    rank's contiguous (B, T/P, E) shard. `rope` must rotate by global positions (rank p's
    tokens are p·T/P …). Same parameters and state_dict as the other multihead classes.

    Args (beyond MultiheadDilatedAttention's):
        process_group: the context-parallel group (None: default group, or a single rank).
    """

    attention_cls = RingDilatedAttention

    def __init__(self, embed_dim: int, num_heads: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                 *, dropout: float = 0.0, bias: bool = True, layer_norm: bool = True, layer_norm_eps: float = 1e-5,
                 gamma_init: float = 1.0, head_split: bool = False, process_group=None, device=None, dtype=None) -> None:
        super().__init__(
            embed_dim, num_heads, segment_lengths, dilation_rates, dropout=dropout, bias=bias, layer_norm=layer_norm,
            layer_norm_eps=layer_norm_eps, gamma_init=gamma_init, head_split=head_split, device=device, dtype=dtype,
        )
        self.attention = RingDilatedAttention(
            segment_lengths, dilation_rates, dropout=dropout, head_split=head_split, process_group=process_group
        )
