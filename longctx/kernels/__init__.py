"""longctx's Triton kernels and the one switch that says whether they can run.

- combine.py: every piece's output (or gradient) pulled into the (B, T, H, D) result in one pass;
- union.py (union_kernels.py, union_tiles.py): LongNet's layouts as one weighted softmax per
  query, each distinct (query, key) pair scored once: the fast op's forward and backward;
- fused.py: the model's elementwise work (SwiGLU, RoPE, RMSNorm with the residual add).

They run compiled on CUDA with Triton >= 3.6, and on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1, set before Triton is imported: tests/conftest.py does on machines without a
GPU), which is for tests only: far too slow to train. Installs without Triton run the PyTorch
paths.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # installs without Triton keep the PyTorch paths
    triton = tl = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: scores are scaled by log2(e) on the way in

# Tuples of tensors and nested constexpr tuples as kernel arguments: tested with Triton 3.6
# (torch 2.11's) on the GPU, and 3.6 and 3.9 in the interpreter.
SUPPORTED = triton is not None and tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 6)


def compiled_triton(device: torch.device) -> bool:
    """Whether Triton kernels run compiled on this device: CUDA with Triton >= 3.6, not interpreted."""
    return SUPPORTED and device.type == "cuda" and not INTERPRETED


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    """Streaming multiprocessors of CUDA device `index` (asked on launch paths, so cached)."""
    return torch.cuda.get_device_properties(index).multi_processor_count


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x, or a contiguous copy where the kernels cannot read it: they need a unit stride on the
    last (head) dim, which an expanded gradient lacks."""
    return x if x.stride(-1) == 1 and 0 not in x.stride() else x.contiguous()
