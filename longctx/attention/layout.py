"""The plan of a dilated-attention layout, shared by every variant (docs/design.md#the-math):
branches, the pieces one attention call each can serve, and the FLOP count.

Shapes: B batch, T sequence length, H heads, D head dim, k number of branches.

A *branch* is one (segment length w, dilation rate r) pair. Inside each segment of w tokens,
head h keeps the positions whose index within the segment is ≡ h mod r. This file turns a branch
into *pieces*: sets of (segment, kept row, head) triples that one attention call can serve:
the full segments, and the tail segment (whose heads keep ceil(t/r) or floor(t/r) rows).
A *strided* piece is one pieces.py reads in place as a view: heads h0, h0 + step, … whose
offsets (h mod r) also step evenly, e.g. the heads sharing one offset, or a run of consecutive
heads whose offsets count up 0, 1, 2, … (then the next head's rows sit one position further).
A branch that would need many such pieces runs as gathered pieces instead (MAX_STRIDED_PIECES).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from ..checks import is_positive_int

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_branches(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check the (segment_lengths, dilation_rates) pair and return them as int tuples."""
    try:
        ws, rs = list(segment_lengths), list(dilation_rates)
    except TypeError:
        raise ValueError(
            f"segment_lengths={segment_lengths!r} and dilation_rates={dilation_rates!r} must be lists of integers"
        ) from None
    if not ws or not rs:
        raise ValueError(f"segment_lengths={ws} and dilation_rates={rs} must be non-empty lists")
    if len(ws) != len(rs):
        raise ValueError(
            f"segment_lengths has {len(ws)} entries {ws} but dilation_rates has {len(rs)} {rs}: "
            "they must have the same length (one pair per branch)"
        )
    for name, values in (("segment length", ws), ("dilation rate", rs)):
        for v in values:
            if not is_positive_int(v):
                raise ValueError(f"{name} {v!r} must be an integer >= 1")
    for w, r in zip(ws, rs):
        if w % r:
            raise ValueError(f"segment length {w} is not divisible by dilation rate {r}")
    return tuple(int(w) for w in ws), tuple(int(r) for r in rs)


def validate_common(softmax_scale: float | None, dropout: float) -> None:
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and softmax_scale > 0):
        raise ValueError(f"softmax_scale={softmax_scale!r} must be None or a positive number")
    if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")


def validate_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """q, k, v: (B, T, H, D), same shape, dtype and device."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} has shape {tuple(t.shape)}: expected 4 dims (batch, seq, heads, head_dim)")
    if not (query.shape == key.shape == value.shape):
        raise ValueError(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
            "must have the same shape (self-attention layout (B, T, H, D))"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"query/key/value dtypes {query.dtype}/{key.dtype}/{value.dtype} must match")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {query.dtype} is not supported: use one of {[str(d) for d in SUPPORTED_DTYPES]}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query/key/value devices {query.device}/{key.device}/{value.device} must match")
    if min(query.shape) < 1:
        raise ValueError(f"query has an empty dimension: shape {tuple(query.shape)}")


def head_groups(num_heads: int, num_branches: int, head_split: bool) -> list[range]:
    """Heads each branch runs on: all heads, or (head_split) contiguous groups as even as
    possible with earlier groups taking the remainder (the original dilated-attention-pytorch)."""
    if not head_split:
        return [range(num_heads)] * num_branches
    if num_heads < num_branches:
        raise ValueError(
            f"head_split=True needs num_heads >= number of branches: got {num_heads} heads for {num_branches} branches"
        )
    base, extra = divmod(num_heads, num_branches)
    groups, start = [], 0
    for i in range(num_branches):
        size = base + (1 if i < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return groups


# A branch that would need more strided pieces than this runs as gathered pieces (one call for
# all its heads): each call costs ~0.3 ms of host time (an H200's profile),
# while a gather moves only the branch's T·H/r rows. 3 keeps every branch of the LongNet
# layouts (12 heads, r = 2^i) strided. LONGCTX_MAX_STRIDED_PIECES overrides it, for A/B runs.
MAX_STRIDED_PIECES = int(os.environ.get("LONGCTX_MAX_STRIDED_PIECES", "3"))


@dataclass(frozen=True)
class Piece:
    """One attention call: heads `heads` of branch `branch` over `num_segments` segments
    starting at `start`, `seg_len` tokens apart, each keeping `rows` rows; row j of head h sits
    at start + s·seg_len + (h mod r) + j·r. A *strided* piece is one strided view of a
    (B, T, H, D) tensor (see `strided`); others are gathered by index."""

    start: int
    num_segments: int
    seg_len: int
    rows: int
    r: int
    heads: tuple[int, ...]
    branch: int = 0

    @functools.cached_property  # asked several times per piece per call
    def strided(self) -> bool:
        """Heads and their offsets both step evenly (offsets never down): one strided view."""
        offsets = [h % self.r for h in self.heads]
        head_steps = {b - a for a, b in zip(self.heads, self.heads[1:])}
        offset_steps = {b - a for a, b in zip(offsets, offsets[1:])}
        return len(head_steps) <= 1 and len(offset_steps) <= 1 and min(offset_steps, default=0) >= 0

    @property
    def offset(self) -> int:
        return self.heads[0] % self.r

    @property
    def head_step(self) -> int:
        return self.heads[1] - self.heads[0] if len(self.heads) > 1 else 1

    @property
    def offset_step(self) -> int:
        """How many positions further the next head's rows start (0 when heads share an offset)."""
        return self.heads[1] % self.r - self.offset if len(self.heads) > 1 else 0

    @property
    def numel_rows(self) -> int:
        return self.num_segments * self.rows * len(self.heads)

    def covers(self, seq_len: int, num_heads: int) -> bool:
        """Whether the piece alone keeps every (position, head) of the sequence."""
        return self.numel_rows == seq_len * num_heads

    def index(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, heads) as two (S, g, m) long tensors on `device`, for gathering: built on
        the device (no blocking copy, nothing held between calls, so CUDA-graph capture and
        torch.compile's CUDA-graph pools see no stray allocation), once per index_scope."""
        device = torch.device(device)
        if _scope is not None and (self, device) in _scope:
            return _scope[self, device]
        heads = _host_heads(self.heads, device.type == "cuda").to(device, non_blocking=True)
        seg = torch.arange(self.num_segments, device=device) * self.seg_len + self.start
        row = torch.arange(self.rows, device=device) * self.r
        pos = seg[:, None, None] + (heads % self.r)[None, :, None] + row[None, None, :]
        index = pos, heads[None, :, None].expand_as(pos)
        if _scope is not None:
            _scope[self, device] = index
        return index


_scope: dict | None = None


@contextlib.contextmanager
def index_scope():
    """Build each gathered piece's index once inside the block (one op call), free it after."""
    global _scope
    outer, _scope = _scope, {} if _scope is None else _scope
    try:
        yield
    finally:
        _scope = outer


@functools.lru_cache(maxsize=512)
def _host_heads(heads: tuple[int, ...], pinned: bool) -> torch.Tensor:
    """A piece's head numbers in host memory (page-locked for CUDA: its copy is asynchronous
    and can be captured in a CUDA graph)."""
    t = torch.tensor(heads, dtype=torch.long)
    return t.pin_memory() if pinned else t


def strided_groups(heads: Sequence[int], r: int) -> list[tuple[int, ...]]:
    """The fewer of two splits of `heads` into strided groups: by shared offset, or into runs of
    consecutive heads whose offsets count up by one (a run ends where h mod r wraps to 0).
    With 12 heads and r = 16 that is one run instead of 12 offsets; ties go by offset."""
    by_offset = [tuple(h for h in heads if h % r == o) for o in sorted({h % r for h in heads})]
    runs: list[list[int]] = []
    for h in heads:
        if runs and h == runs[-1][-1] + 1 and h % r == runs[-1][-1] % r + 1:
            runs[-1].append(h)
        else:
            runs.append([h])
    return min(by_offset, [tuple(run) for run in runs], key=len)


def branch_pieces(seq_len: int, w: int, r: int, heads: Sequence[int], branch: int = 0) -> list[Piece]:
    """Split branch (w, r) over `heads` at length `seq_len` into pieces: the full segments,
    then the tail segment (whose heads keep ceil or floor of tail/r rows), each per strided
    group (strided_groups) or, when that needs more than MAX_STRIDED_PIECES groups, for all
    heads with the same row count at once (gathered)."""
    w = min(w, seq_len)
    n_full, tail = divmod(seq_len, w)
    if w % r:  # only a clipped segment (w = T) can be; it keeps ceil-counted rows like a tail
        n_full, tail = 0, w
    groups = strided_groups(heads, r)
    if len(groups) > MAX_STRIDED_PIECES:
        groups = [tuple(heads)]
    pieces = []
    for hs in groups:
        if n_full:
            pieces.append(Piece(0, n_full, w, w // r, r, hs, branch))
    for hs in groups:
        by_rows: dict[int, list[int]] = {}
        for h in hs:
            rows = (tail - h % r + r - 1) // r if h % r < tail else 0
            if rows:
                by_rows.setdefault(rows, []).append(h)
        for rows, group in sorted(by_rows.items(), reverse=True):
            pieces.append(Piece(n_full * w, 1, tail, rows, r, tuple(group), branch))
    return pieces


@functools.lru_cache(maxsize=256)
def plan(seq_len: int, num_heads: int, segment_lengths: tuple, dilation_rates: tuple, head_split: bool) -> tuple[Piece, ...]:
    """All pieces of all branches, in branch order."""
    groups = head_groups(num_heads, len(segment_lengths), head_split)
    out = []
    for i, (w, r, heads) in enumerate(zip(segment_lengths, dilation_rates, groups)):
        out.extend(branch_pieces(seq_len, w, r, heads, i))
    return tuple(out)


def dilated_flops(batch, seq_len, num_heads, head_dim, segment_lengths, dilation_rates, head_split, is_causal) -> int:
    """Forward FLOPs of dilated attention (docs/design.md#flops): 4·D per (query, key) pair kept, counting
    clipped and tail segments exactly; causal halves the count (the convention used for dense
    causal attention, so ratios against SDPA stay like for like)."""
    total = 0
    for p in plan(seq_len, num_heads, segment_lengths, dilation_rates, head_split):
        total += p.num_segments * len(p.heads) * p.rows * p.rows
    flops = 4 * batch * head_dim * total
    return flops // 2 if is_causal else flops


def dense_flops(batch, seq_len, num_heads, head_dim, is_causal) -> int:
    flops = 4 * batch * num_heads * head_dim * seq_len * seq_len
    return flops // 2 if is_causal else flops


def default_scale(head_dim: int, softmax_scale: float | None) -> float:
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
