"""DilatedAttention: the reference. docs/design.md#the-math in plain PyTorch, written to be read.

Shapes: B batch, T sequence length, H heads, D head dim; n segments, m kept rows, g heads.
Every branch computes, per head, softmax attention inside each dilated segment and returns an
output o_i and log-sum-exp lse_i (−inf where the head does not keep the row); the branches are
merged with LongNet Eq. 10 in float32. Autograd differentiates all of it, so the gradient is
exact by construction. ImprovedDilatedAttention and RingDilatedAttention must match this.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import DilatedAttentionBase
from .layout import head_groups


def merge_branches(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """LongNet Eq. 10: O = Σ exp(lse_i − L)·o_i with L = logsumexp_i lse_i.
    outs: k × (B, T, H, D) float32; lses: k × (B, T, H) float32. Rows no branch keeps give 0."""
    lse = torch.stack(lses)  # (k, B, T, H)
    covered = torch.isfinite(lse).any(0)
    # Uncovered rows: make every branch's lse 0 so no −inf − (−inf) NaN appears (even in backward).
    lse = torch.where(covered, lse, torch.zeros_like(lse))
    weights = torch.softmax(lse, dim=0)[..., None]  # (k, B, T, H, 1)
    out = (weights * torch.stack(outs)).sum(0)
    return torch.where(covered[..., None], out, torch.zeros_like(out))


class DilatedAttention(DilatedAttentionBase):
    """Reference dilated attention (LongNet). See DilatedAttentionBase for the arguments.

    forward(query, key, value, is_causal=False): (B, T, H, D) each -> (B, T, H, D).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        scale = self._check(query, key, value)
        with self.no_autocast(query):
            return self._forward(query, key, value, is_causal, scale)

    def _forward(self, query, key, value, is_causal, scale):
        B, T, H, D = query.shape
        acc = torch.float64 if query.dtype == torch.float64 else torch.float32
        groups = head_groups(H, len(self.segment_lengths), self.head_split)
        outs, lses = [], []
        for w, r, heads in zip(self.segment_lengths, self.dilation_rates, groups):
            w = min(w, T)  # clip to the sequence
            o_i = query.new_zeros(B, T, H, D, dtype=acc)
            lse_i = query.new_full((B, T, H), float("-inf"), dtype=acc)
            n_full = T // w
            # Full segments folded into a segment axis, then the shorter tail segment if any.
            spans = [(0, n_full, w)] if n_full else []
            if T % w:
                spans.append((n_full * w, 1, T - n_full * w))
            for start, n, length in spans:
                def seg(x):  # (B, T, ...) -> (B, n, length, ...)
                    return x[:, start : start + n * length].unflatten(1, (n, length))

                for offset in range(r):  # heads sharing this offset keep the same rows
                    hs = [h for h in heads if h % r == offset]
                    if not hs or offset >= length:
                        continue
                    q, k, v = (seg(x)[:, :, offset::r][:, :, :, hs].to(acc) for x in (query, key, value))
                    o, lse = self._attend(q, k, v, is_causal, scale)  # (B, n, m, g, D), (B, n, m, g)
                    seg(o_i)[:, :, offset::r, hs] = o
                    seg(lse_i)[:, :, offset::r, hs] = lse
            outs.append(o_i)
            lses.append(lse_i)
        return merge_branches(outs, lses).to(query.dtype)

    def _attend(self, q, k, v, is_causal, scale):
        """Softmax attention among the kept rows of each segment. q/k/v: (B, n, m, g, D)."""
        s = torch.einsum("bnqgd,bnkgd->bngqk", q, k) * scale
        if is_causal:
            m = q.shape[2]
            s = s.masked_fill(~torch.ones(m, m, dtype=torch.bool, device=q.device).tril(), float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (B, n, g, m)
        p = F.dropout(torch.exp(s - lse[..., None]), self.dropout, self.training)
        o = torch.einsum("bngqk,bnkgd->bnqgd", p, v)
        return o, lse.transpose(-1, -2)
