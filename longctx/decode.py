"""Incremental decoding with a bounded dilated-attention KV cache (docs/design.md#decoding).

Shapes: B batch, H heads, D head dim, E model width; a layer's cache holds R rows a head.

A query at position t of head h attends, in branch i, only to the rows of its own segment
[⌊t/w_i⌋·w_i, t] that head h keeps (those ≡ h mod r_i within the segment), and only when it
keeps t itself. So a layer keeps, per head, the current segment's kept K/V rows of each branch
it runs: ⌈w_i / r_i⌉ slots per branch, R = Σ_i ⌈w_i / r_i⌉ rows a head in all (the branches a
head does not run, under head_split, are never valid), whatever the context length.

Row j of branch i holds the segment's j-th kept position of that head: a new position writes
its slot, and a slot is valid while j ≤ the current position's slot, so a segment boundary
needs no reset: the old segment's rows above the new slot are masked until overwritten. The
branches' rows are separate copies, so one softmax over all valid rows is the softmax over the
multiset union of the branches' keys, i.e. LongNet Eq. 10 (docs/design.md#the-merge-longnet-eq-10).
Every step is a fixed sequence of tensor operations on a position held in a device tensor, so
it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention.layout import default_scale, head_groups
from .kernels import compiled_triton
from .kernels import decode as decode_kernel
from .model import LongNetLM, MultiheadAdapter, bound_rotation


class LayerCache:
    """The cache of one attention layer of `op`'s layout (segment_lengths, dilation_rates,
    head_split) for `num_heads` heads: k and v (B, H, R, D) in `dtype`, and the layout of its rows.

    Per branch i (of nb): width[i] = w_i, rate[i] = r_i, start[i] its first row; per head
    runs[i, h] whether head h runs branch i and offset[i, h] = h mod r_i. Per row: its branch and
    its slot j within the branch."""

    def __init__(self, op, num_heads: int, head_dim: int, batch: int, dtype: torch.dtype, device):
        ws, rs = op.segment_lengths, op.dilation_rates
        groups = head_groups(num_heads, len(ws), op.head_split)
        self.scale = default_scale(head_dim, op.softmax_scale)
        slots = [-(-w // r) for w, r in zip(ws, rs)]
        self.rows_per_head = sum(slots)
        as_long = dict(dtype=torch.long, device=device)
        self.width, self.rate = torch.tensor(ws, **as_long), torch.tensor(rs, **as_long)
        self.start = torch.tensor([sum(slots[:i]) for i in range(len(ws))], **as_long)
        heads = torch.arange(num_heads, **as_long)
        self.runs = torch.stack([torch.isin(heads, torch.tensor(list(g), **as_long)) for g in groups])  # (nb, H)
        self.offset = heads[None, :] % self.rate[:, None]  # (nb, H)
        self.row_branch = torch.cat([torch.full((n,), i, **as_long) for i, n in enumerate(slots)])  # (R,)
        self.row_slot = torch.cat([torch.arange(n, **as_long) for n in slots])  # (R,)
        self.full = 1 in rs  # every position is kept by some branch: no head is ever left empty
        shape = (batch, num_heads, self.rows_per_head, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def same_layout(self, other: "LayerCache") -> bool:
        """Whether other's rows are laid out as this one's (then one locate() serves both)."""
        mine, theirs = (self.width, self.rate, self.runs, self.start), (other.width, other.rate, other.runs, other.start)
        return self.k.shape == other.k.shape and all(torch.equal(a, b) for a, b in zip(mine, theirs))

    def locate(self, t: torch.Tensor):
        """For position t (a 0-dim long tensor): whether each head keeps t in each branch (nb, H),
        the row it goes to there (nb, H), and the rows valid for a query at t (H, R)."""
        u = (t % self.width)[:, None]  # t's index within its segment, per branch
        kept = self.runs & (u % self.rate[:, None] == self.offset)
        slot = (u - self.offset).div(self.rate[:, None], rounding_mode="floor")
        branch = self.row_branch
        valid = (kept[branch] & (self.row_slot[:, None] <= slot[branch])).T.contiguous()
        return kept, self.start[:, None] + slot.clamp(min=0), valid

    def write(self, k: torch.Tensor, v: torch.Tensor, kept: torch.Tensor, rows: torch.Tensor) -> None:
        """Store a position's k and v (B, H, D) in the rows (nb, H) of the branches whose heads
        keep it (kept (nb, H), from locate)."""
        if compiled_triton(k.device):  # one launch, not a gather, a select and a scatter per tensor
            decode_kernel.store(k, v, self.k, self.v, kept, rows)
            return
        heads = torch.arange(k.shape[1], device=k.device).expand_as(rows)
        for cache, new in ((self.k, k), (self.v, v)):
            old = cache[:, heads, rows]  # (B, nb, H, D)
            cache[:, heads, rows] = torch.where(kept[None, :, :, None], new[:, None].to(cache.dtype), old)

    def attend(self, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Softmax attention of q (B, H, D) over the valid rows (H, R): (B, H, D), 0 for a head
        with none (possible only without an r = 1 branch). On CUDA, the split-rows kernel: a
        fused attention call runs one program per head over all R rows, most SMs idle."""
        if compiled_triton(q.device) and self.k.dtype in (torch.float16, torch.bfloat16):
            return decode_kernel.attend(q, self.k, self.v, valid, self.scale)
        if self.full:
            out = F.scaled_dot_product_attention(q[:, :, None].to(self.k.dtype), self.k, self.v,
                                                 attn_mask=valid[None, :, None, :], scale=self.scale)
            return out[:, :, 0].to(q.dtype)
        scores = torch.einsum("bhd,bhrd->bhr", q.float(), self.k.float()) * self.scale
        scores = scores.masked_fill(~valid[None], float("-inf"))
        top = scores.amax(-1, keepdim=True)
        weights = torch.exp(scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top)))
        total = weights.sum(-1, keepdim=True)
        out = torch.einsum("bhr,bhrd->bhd", weights, self.v.float()) / total.clamp(min=torch.finfo(torch.float32).tiny)
        return out.to(q.dtype)

    def fill(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Store the kept rows of the segments holding position length − 1, from a prompt's k
        and v (B, length, H, D): what a decode step at `length` may read."""
        heads = torch.arange(self.k.shape[1], device=k.device)[:, None]
        ends = [*self.start[1:].tolist(), self.rows_per_head]
        for i, (first, end) in enumerate(zip(self.start.tolist(), ends)):  # every head at once: one gather a branch
            w, r = int(self.width[i]), int(self.rate[i])
            s0 = (length - 1) // w * w
            pos = s0 + self.offset[i][:, None] + r * torch.arange(end - first, device=k.device)  # (H, slots)
            ok = (self.runs[i][:, None] & (pos < length))[None, :, :, None]  # rows the prompt has reached
            pos = pos.clamp(max=length - 1)
            for cache, new in ((self.k, k), (self.v, v)):
                rows = cache[:, :, first:end]
                rows.copy_(torch.where(ok, new[:, pos, heads].to(cache.dtype), rows))


def core_op(attn):
    """The core op of a block's attention (CoreAttention's op, or a multihead module's)."""
    return attn.attn.attention if isinstance(attn, MultiheadAdapter) else attn.op


def qkv_of(attn, h: torch.Tensor, rope):
    """q, k, v (B, l, H, D) of the block's attention input h (B, l, E), q and k rotated."""
    if isinstance(attn, MultiheadAdapter):
        q, k, v = attn.attn._project(h, h, h)
    else:
        q, k, v = attn.qkv(h).unflatten(-1, (3, attn.n_heads, -1)).unbind(2)
    return rope(q), rope(k), v


def attention_output(attn, out: torch.Tensor) -> torch.Tensor:
    """The block's attention output (B, 1, E) from the heads' (B, H, D)."""
    out = out[:, None].flatten(-2)
    if isinstance(attn, MultiheadAdapter):
        m = attn.attn
        return m.out_proj(m.norm(out) if m.norm is not None else out)
    return attn.proj(out)


class Decoder:
    """A LongNetLM's prefill and one-token steps over LayerCaches, for `batch` sequences of equal
    length. prefill(idx (B, P)) -> the last position's logits (B, V); step(token (B,)) -> the
    next position's logits (B, V). The next position lives in a device tensor (`t`), so step can
    be captured in a CUDA graph (capture() before prefill: it runs the step twice)."""

    def __init__(self, model: LongNetLM, batch: int, dtype: torch.dtype, device):
        self.model = model
        dim = model.dim // model.n_heads
        self.caches = [LayerCache(core_op(b.attn), model.n_heads, dim, batch, dtype, device) for b in model.blocks]
        # Every layer of a LongNetLM has the same layout: the step locates its position once.
        self.shared = all(self.caches[0].same_layout(c) for c in self.caches[1:])
        self.t = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    @torch.no_grad()
    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """Run the prompt through the model's own forward (the fast op), keeping each layer's
        rotated k and v rows that the decode steps will read."""
        length = idx.shape[1]

        def keep(cache):
            def hook(attn, args):
                _, k, v = qkv_of(attn, *args)
                cache.fill(k, v, length)
            return hook

        handles = [b.attn.register_forward_pre_hook(keep(c)) for b, c in zip(self.model.blocks, self.caches)]
        try:
            h = self.model.features(idx)
        finally:
            for handle in handles:
                handle.remove()
        self.t.fill_(length)
        return self.model.head(h[:, -1])

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        model = self.model
        x = model.embed(token[:, None])
        if model.residual_dtype is not None:
            x = x.to(model.residual_dtype)
        angles = (self.t.float() * model.rotary.inv_freq)[None, None, None, :]
        rope = bound_rotation(angles.cos(), angles.sin())
        shared = self.caches[0].locate(self.t) if self.shared else None
        for block, cache in zip(model.blocks, self.caches):
            q, k, v = qkv_of(block.attn, block.norm1(x), rope)
            kept, rows, valid = shared or cache.locate(self.t)
            cache.write(k[:, 0], v[:, 0], kept, rows)
            out = cache.attend(q[:, 0], valid)
            h, y = block.norm2.add(x, attention_output(block.attn, out))
            x = h + block.mlp(y)
        self.t += 1
        return model.head(model.norm(x))[:, 0]

    @torch.no_grad()
    def step(self, token: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            return self._step(token)
        self.token.copy_(token)
        self.graph.replay()
        return self.logits

    @torch.no_grad()
    def capture(self) -> None:
        """Capture the step in a CUDA graph (warm-up on a side stream first), then clear the
        caches and position it ran on."""
        self.token = torch.zeros(self.caches[0].k.shape[0], dtype=torch.long, device=self.t.device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(self.token)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step(self.token)
        for cache in self.caches:
            cache.k.zero_()
            cache.v.zero_()
        self.t.zero_()
