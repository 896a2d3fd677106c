"""The only place process groups are made (docs/design.md#the-ring, #training).

Ranks are laid out context-parallel-major: CP group g holds global ranks g·C … g·C + C − 1, so
the C ranks of one sequence sit on neighbouring GPUs (one node when C ≤ GPUs per node). The
data-parallel rank of a process is its CP group's index.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class Layout:
    world_size: int
    rank: int
    cp_size: int

    @property
    def cp_rank(self) -> int:
        return self.rank % self.cp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size


def check_layout(world_size: int, cp_size: int, is_ring: bool, variant: str) -> None:
    if cp_size < 1:
        raise ValueError(f"model.context_parallel_size={cp_size} must be >= 1")
    if cp_size > 1 and not is_ring:
        raise ValueError(
            f"model.context_parallel_size={cp_size} needs a ring variant (ring_dilated or ring_multihead_dilated); "
            f"{variant} holds the whole sequence on each rank: use context_parallel_size 1"
        )
    if world_size % cp_size:
        raise ValueError(
            f"world size {world_size} is not divisible by model.context_parallel_size={cp_size}"
        )


def context_parallel_group(layout: Layout):
    """Create every CP group (all ranks, same order, as new_group requires) and return this
    rank's; None without torch.distributed. With cp_size 1 each rank gets a group of its own,
    so a ring variant never mistakes the data-parallel world for its ring."""
    if not dist.is_initialized():
        return None
    mine = None
    for g in range(layout.dp_size):
        ranks = list(range(g * layout.cp_size, (g + 1) * layout.cp_size))
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    return mine
