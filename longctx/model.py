"""A decoder-only LM whose attention layer is any of the six dilated-attention variants.

Shapes: B batch, l tokens held here (T, or T/P under context parallelism), E model width,
H heads, D = E / H, V vocab. Plain nn.Module: no Lightning, no torch.distributed (the ring
variants receive their process group from outside, see lit_module.py).

Embedding -> n_layers × [RMSNorm -> attention -> residual, RMSNorm -> SwiGLU -> residual] ->
RMSNorm -> tied head. RoPE rotates q and k by *global* positions: a context-parallel rank
passes `pos_offset` = its first token's index (docs/design.md#the-ring).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import rotary, variant
from .attention.base import DilatedAttentionBase
from .attention.multihead import MultiheadDilatedAttention
from .kernels import fused
from .loss import linear_cross_entropy
from .offload import Chain, OffloadedCheckpoint

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.norm_available(x, self.weight):  # eager on a GPU: one Triton kernel each way
            return fused.rms_norm(x, self.weight, self.eps)
        # The weight in x's dtype: a bfloat16 residual stream under autocast (LongNetLM's
        # residual_dtype) would otherwise leave the fused kernel for the composite one.
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)

    def add(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + a, this norm of it): the residual add and the norm after it, as one kernel each
        way when eager on a GPU (fused.add_rms_norm), else the plain sum and forward."""
        if fused.norm_available(x, self.weight, a):
            return fused.add_rms_norm(x, a, self.weight, self.eps)
        h = x + a
        return h, self(h)


def rotate_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """(x1·cos − x2·sin, x2·cos + x1·sin) of x's two halves (…, D), computed in float32 and
    rounded once to x's dtype, with one float32 half-size temporary."""
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.empty_like(x)
    out1, out2 = out.chunk(2, dim=-1)
    acc = x1 * cos  # float32 (cos is)
    out1.copy_(acc.addcmul_(x2, sin, value=-1))
    torch.mul(x2, cos, out=acc)
    out2.copy_(acc.addcmul_(x1, sin))
    return out


class _Rotate(torch.autograd.Function):
    """RoPE rotation whose backward is the inverse rotation: it saves the angles only (at 1M
    tokens autograd through the plain expression held several float32 copies of q and k)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate_halves(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return rotate_halves(grad, cos, -sin), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE rotation of x (B, l, H, D) by angles whose cos and sin are (1, l, 1, D/2): one Triton
    kernel each way when eager on a GPU (kernels/fused.py), else these float32 expressions. Under
    torch.compile a plain expression, which Inductor fuses: torch 2.11 does not tag the ops inside
    an autograd.Function as part of an enclosing checkpoint, so a compiled checkpointed block
    saved _Rotate's outputs, the rotated q and k (3 GiB a block at 1M tokens). Not
    rotate_halves: it writes into chunk views, which only works without autograd (inside _Rotate)."""
    if torch.compiler.is_compiling():
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)
    if fused.available(x):
        return fused.rope(x, cos, sin)
    return _Rotate.apply(x, cos, sin)


def bound_rotation(cos: torch.Tensor, sin: torch.Tensor) -> functools.partial:
    """rotate with its angles bound: the `rope` each block gets. CoreAttention reads the keywords
    cos and sin back, to hand them to a fused op."""
    return functools.partial(rotate, cos=cos, sin=sin)


class Rotary(nn.Module):
    """RoPE (Su et al. 2021), half-split convention, angles in float32 for the positions in use,
    computed once per forward pass and shared by every block (no table kept between passes:
    at 1M tokens it would hold 256 MB)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", self._frequencies(None), persistent=False)

    def _frequencies(self, device) -> torch.Tensor:
        return self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) casts buffers too; bfloat16 frequencies would turn position
        # 1M into a different angle than training used: they stay float32, made again exactly.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self._frequencies(self.inv_freq.device)
        return self

    def angles(self, seq_len: int, offset: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (1, seq_len, 1, D/2) of the angles at global positions offset … offset +
        seq_len − 1. Computed once per forward: made per block for q and for k, they took 2.9 ms
        of a 32K training step on an H100."""
        pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)[None, :, None, :]
        return angles.cos(), angles.sin()

    def rotation(self, seq_len: int, offset: int, device) -> functools.partial:
        """rope(x) for x (B, seq_len, H, D) at global positions offset … offset + seq_len − 1."""
        return bound_rotation(*self.angles(seq_len, offset, device))

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (B, l, H, D) at global positions offset … offset + l − 1."""
        return self.rotation(x.shape[1], offset, x.device)(x)


class CoreAttention(nn.Module):
    """The block's own projections around a core op (DilatedAttention & co.)."""

    def __init__(self, dim: int, n_heads: int, op: DilatedAttentionBase):
        super().__init__()
        self.n_heads, self.op = n_heads, op
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        """rope: Rotary.rotation's partial of rotate."""
        qkv = self.qkv(x).unflatten(-1, (3, self.n_heads, -1))
        if rotary.applies(self.op, qkv):  # RoPE inside the op, no copies around it
            out = rotary.attention(self.op, qkv, rope.keywords["cos"], rope.keywords["sin"], True)
        else:
            q, k, v = qkv.unbind(2)
            # A copy of v lets the fused projection output go once q and k are rotated: saved for
            # backward as a view, v would keep all three alive.
            out = self.op(rope(q), rope(k), v.contiguous(), is_causal=True)
        return self.proj(out.flatten(-2))

    def flops(self, batch: int, seq_len: int) -> int:
        E = self.proj.in_features
        return 8 * batch * seq_len * E * E + self.op.flops(batch, seq_len, self.n_heads, E // self.n_heads, True)


class MultiheadAdapter(nn.Module):
    """A multihead variant *as* the block's attention."""

    def __init__(self, module: MultiheadDilatedAttention):
        super().__init__()
        self.attn = module

    def forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        return self.attn(x, is_causal=True, rope=rope)[0]

    def flops(self, batch: int, seq_len: int) -> int:
        return self.attn.flops(batch, seq_len, is_causal=True)


class SwiGLU(nn.Module):
    """down(silu(gate) · up). With `chunk_tokens`, training runs it over chunks of that many
    tokens, each recomputed in backward: its (chunk, 2·hidden) activations are then the only
    ones alive, instead of the whole sequence's 2.7·hidden·T values (~17 GB per block at 1M)."""

    def __init__(self, dim: int, hidden: int, chunk_tokens: int | None = None):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.chunk_tokens = chunk_tokens

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if fused.available(gate_up):  # on a GPU: one Triton kernel each way, eager or compiled (fused.py)
            return self.down(fused.swiglu(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, l, E) -> (B, l, E)."""
        if not (self.chunk_tokens and x.shape[1] > self.chunk_tokens and torch.is_grad_enabled()):
            return self._mlp(x)
        return torch.cat([checkpoint(self._mlp, c, use_reentrant=False) for c in x.split(self.chunk_tokens, dim=1)], 1)


class Block(nn.Module):
    """Pre-norm block. With `checkpointing`, training keeps only the block's input and recomputes
    the rest in backward. The checkpoint is inside forward, so a compiled block holds its own
    recompute: torch.compile's CUDA-graph trees (mode="reduce-overhead") failed on a compiled
    block checkpointed from outside, its forward graph replayed again during backward."""

    def __init__(self, dim: int, attention: nn.Module, mlp_hidden: int, eps: float, mlp_chunk_tokens: int | None = None,
                 checkpointing: bool = False):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim, eps), attention
        self.norm2, self.mlp = RMSNorm(dim, eps), SwiGLU(dim, mlp_hidden, mlp_chunk_tokens)
        self.checkpointing = checkpointing

    def forward(self, x: torch.Tensor, rope, offload: Chain | None = None) -> torch.Tensor:
        """offload: checkpoint with the input kept in host memory (offload.py) instead."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            if offload is not None:
                return OffloadedCheckpoint.apply(functools.partial(self._forward, rope=rope), offload, x,
                                                 *self.parameters())
            return checkpoint(self._forward, x, rope, use_reentrant=False)
        return self._forward(x, rope)

    def _forward(self, x: torch.Tensor, rope) -> torch.Tensor:
        h, y = self.norm2.add(x, self.attn(self.norm1(x), rope))
        return h + self.mlp(y)


class LongNetLM(nn.Module):
    """Decoder LM. `attention_cls` is one of the six variants; `attention_kwargs` are its
    constructor arguments other than embed_dim/num_heads (given here for the multihead ones).
    `mlp_chunk_tokens`: run each SwiGLU over chunks of this many tokens in training (SwiGLU).
    `offload_checkpoints`: with activation checkpointing, keep each block's saved input in host
    memory (offload.py); eager only.
    `residual_dtype`: the residual stream's dtype (the embedding's output is cast to it, and each
    block's sum keeps it). None keeps the embedding's, the parameters' dtype: float32 under
    mixed precision. torch.bfloat16 needs bfloat16 autocast (or bfloat16 parameters); it halves
    the bytes of every RMSNorm kernel and of each checkpointed block's saved input.

    forward(idx (B, l) long, pos_offset=0) -> logits (B, l, V) float32; features(idx) -> the
    final normed hidden states (B, l, E), which loss() takes to the tied head and the
    cross-entropy a chunk of tokens at a time (loss.py: no (l, V) logits).
    """

    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, attention_cls: type[nn.Module],
                 attention_kwargs: dict, mlp_hidden: int | None = None, rope_base: float = 10000.0,
                 norm_eps: float = 1e-5, activation_checkpointing: bool = False, mlp_chunk_tokens: int | None = None,
                 offload_checkpoints: bool = False, residual_dtype: torch.dtype | None = None):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"model.d_model={dim} is not divisible by model.n_heads={n_heads}")
        if offload_checkpoints and not activation_checkpointing:
            raise ValueError("model.offload_checkpoints=true offloads the checkpointed blocks' inputs: it needs "
                             "model.activation_checkpointing=true")
        self.offload_checkpoints, self.residual_dtype = offload_checkpoints, residual_dtype
        self.dim, self.n_heads, self.vocab_size = dim, n_heads, vocab_size
        mlp_hidden = mlp_hidden or 64 * ((8 * dim // 3 + 63) // 64)
        self.embed = nn.Embedding(vocab_size, dim)
        self.rotary = Rotary(dim // n_heads, rope_base)
        self.blocks = nn.ModuleList(
            Block(dim, self._attention(attention_cls, attention_kwargs), mlp_hidden, norm_eps, mlp_chunk_tokens,
                  activation_checkpointing)
            for _ in range(n_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.apply(self._init)

    def _attention(self, cls, kwargs) -> nn.Module:
        if variant(cls).multihead:
            return MultiheadAdapter(cls(self.dim, self.n_heads, **kwargs))
        return CoreAttention(self.dim, self.n_heads, cls(**kwargs))

    @staticmethod
    def _init(module: nn.Module) -> None:
        # GPT-2 style for the LM's own layers. apply() visits children first, so a multihead
        # variant's reset_parameters() runs last and it keeps its MAGNETO init.
        if isinstance(module, MultiheadDilatedAttention):
            module.reset_parameters()
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, idx: torch.Tensor, pos_offset: int = 0) -> torch.Tensor:
        return self.head(self.features(idx, pos_offset))

    def features(self, idx: torch.Tensor, pos_offset: int = 0) -> torch.Tensor:
        return self.trunk(idx, *self.rotary.angles(idx.shape[1], pos_offset, idx.device))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (…, V) float32 of hidden states h (…, E): the tied embedding."""
        return F.linear(h, self.embed.weight).float()

    def loss(self, h: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the head on h (B, l, E) against targets (B, l), mean or sum over
        the tokens, without materialising the logits (loss.linear_cross_entropy)."""
        return linear_cross_entropy(h.flatten(0, 1), self.embed.weight, targets.reshape(-1), reduction)

    def trunk(self, idx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """features given RoPE's angles (Rotary.angles): what torch.compile takes as one graph
        (lit_module.py). With the angles inside that graph, Inductor recomputed their cos and sin
        in every block's rotation kernels (5.1 against 1.9 ms of a 32K step on an H100)."""
        x = self.embed(idx)
        want, kind = self.residual_dtype, x.device.type
        if want is not None and x.dtype != want:
            if not (torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) == want):
                raise ValueError(f"residual_dtype={want} needs {want} parameters or torch.autocast({kind!r}, {want}); "
                                 f"the parameters are {x.dtype} and autocast is off or another dtype")
            x = x.to(want)
        rope = bound_rotation(cos, sin)
        chain = Chain() if self.offload_checkpoints and self.training and torch.is_grad_enabled() else None
        for block in self.blocks:
            x = block(x, rope, chain)
        return self.norm(x)

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """idx (B, P) -> (B, P + max_new_tokens), decoding with the bounded dilated KV cache;
        options as longctx.generate.generate's (temperature, top_k, top_p, seed, graph)."""
        from .generate import generate

        return generate(self, idx, max_new_tokens, **options)

    def flops(self, batch: int, seq_len: int) -> int:
        """Forward FLOPs of one (batch, seq_len) sequence: matmuls 2·params·tokens, the
        attention variants' own count, and the tied head."""
        tokens = batch * seq_len
        mlp = sum(2 * tokens * p.numel() for b in self.blocks for p in b.mlp.parameters())
        attn = sum(b.attn.flops(batch, seq_len) for b in self.blocks)
        return mlp + attn + 2 * tokens * self.dim * self.vocab_size
