"""An independent dense reference for dilated attention, built straight from docs/design.md#the-math with
explicit (query, key) position masks. It shares no code with longctx.attention.

Branch i contributes, for head h, the key set {same segment, both indices ≡ h mod r_i inside the
segment, key <= query if causal}. Merging branches with the LSE rule equals softmax attention
over the multiset union of those key sets, i.e. softmax(scores + log(count)) where count[h,q,k]
is the number of branches that pair q with k.
"""
from __future__ import annotations

import math

import torch


def split_heads(num_heads: int, num_branches: int, head_split: bool) -> list[list[int]]:
    if not head_split:
        return [list(range(num_heads)) for _ in range(num_branches)]
    sizes = [num_heads // num_branches + (1 if i < num_heads % num_branches else 0) for i in range(num_branches)]
    starts = [sum(sizes[:i]) for i in range(num_branches)]
    return [list(range(s, s + n)) for s, n in zip(starts, sizes)]


def pair_counts(seq_len, num_heads, segment_lengths, dilation_rates, is_causal, head_split) -> torch.Tensor:
    """(H, T, T) number of branches in which query t attends key u, for head h."""
    counts = torch.zeros(num_heads, seq_len, seq_len, dtype=torch.float64)
    t = torch.arange(seq_len)
    groups = split_heads(num_heads, len(segment_lengths), head_split)
    for w, r, heads in zip(segment_lengths, dilation_rates, groups):
        w = min(w, seq_len)
        segment, inside = t // w, t % w
        same_segment = segment[:, None] == segment[None, :]
        for h in heads:
            kept = inside % r == h % r
            mask = same_segment & kept[:, None] & kept[None, :]
            if is_causal:
                mask &= t[None, :] <= t[:, None]
            counts[h] += mask
    return counts


def reference_attention(q, k, v, segment_lengths, dilation_rates, is_causal=False, head_split=False, scale=None,
                        dtype=torch.float64):
    """q/k/v: (B, T, H, D). Computes in `dtype` (float64 for the oracle, or a low precision to
    measure how much error that precision itself costs). Returns (B, T, H, D) in `dtype`."""
    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (x.to(dtype) for x in (q, k, v))
    counts = pair_counts(T, H, segment_lengths, dilation_rates, is_causal, head_split).to(q.device)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores + torch.log(counts).to(dtype)  # log 0 = -inf removes the pair
    has_key = (counts > 0).any(-1)[None, :, :, None]  # (1, H, T, 1)
    scores = torch.where(has_key, scores, torch.zeros_like(scores))
    p = torch.softmax(scores.float() if dtype in (torch.float16, torch.bfloat16) else scores, dim=-1).to(dtype)
    p = torch.where(has_key, p, torch.zeros_like(p))
    return torch.einsum("bhqk,bkhd->bqhd", p, v)
