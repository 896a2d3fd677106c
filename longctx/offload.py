"""Activation checkpointing whose saved block inputs wait in host memory (`model.offload_checkpoints`).

A checkpointed block keeps only its input for backward, but at 1M tokens that input (the float32
residual stream) is 3 GiB, and the 12 blocks' inputs are 36 GiB of the eager step's 60 GiB peak.
Offloaded, each block's input is copied to pinned host memory on a side stream while the block
computes; in backward, block i's backward first starts the copy of block i − 1's input back to the
GPU, on the side stream, so that it overlaps block i's recompute and backward. The GPU then holds
at most two block inputs at a time.

The backward recomputes the block from the reloaded input, under the autocast and RNG state of
the forward, and returns the gradients of the input and of the block's parameters (which are
inputs of the function, so torch.autograd.grad and gradient hooks see them as usual). Eager only:
the model rejects it with torch.compile (lit_module.py). On the CPU the input stays where it is and
only the recompute runs, which is what the CPU tests check.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per GPU, made on first use."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class Chain:
    """The offloaded blocks of one forward, in order: block i's backward prefetches block i − 1's input."""

    def __init__(self):
        self.blocks: list = []


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A pinned host copy of x, made on the side stream after the work already queued on x."""
    if not x.is_cuda:
        return x.detach()
    side = side_stream(x.device)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    side.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(side):
        host.copy_(x, non_blocking=True)
    x.record_stream(side)  # x's memory is not reused before the copy has read it
    return host


def _prefetch(ctx) -> None:
    """Starts copying ctx's input back to its GPU on the side stream (no-op if started or on CPU)."""
    if ctx.gpu is not None or ctx.device.type != "cuda":
        return
    main, side = torch.cuda.current_stream(ctx.device), side_stream(ctx.device)
    ctx.gpu = torch.empty(ctx.host.shape, dtype=ctx.host.dtype, device=ctx.device)
    side.wait_stream(main)  # the new buffer's memory may still be in use by work queued on main
    with torch.cuda.stream(side):
        ctx.gpu.copy_(ctx.host, non_blocking=True)
    ctx.loaded = torch.cuda.Event()
    ctx.loaded.record(side)


def _reload(ctx) -> torch.Tensor:
    """ctx's input on its device, once the copy back has landed."""
    if ctx.device.type != "cuda":
        return ctx.host
    _prefetch(ctx)
    torch.cuda.current_stream(ctx.device).wait_event(ctx.loaded)
    x, ctx.gpu, ctx.host = ctx.gpu, None, None
    return x


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cuda", "cpu")]


class OffloadedCheckpoint(torch.autograd.Function):
    """y = run(x), keeping only a host copy of x for backward, where run(x) is recomputed."""

    @staticmethod
    def forward(ctx, run: Callable[[torch.Tensor], torch.Tensor], chain: Chain, x: torch.Tensor,
                *params: torch.Tensor) -> torch.Tensor:
        """params: those that run uses, so that their gradients come back through this function."""
        ctx.run, ctx.chain, ctx.index, ctx.device, ctx.params = run, chain, len(chain.blocks), x.device, params
        chain.blocks.append(ctx)
        ctx.autocast = _autocast_state()
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.gpu, ctx.host = None, _to_host(x)
        return run(x)  # autograd.Function.forward runs without grad: nothing inside is saved

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x = _reload(ctx).detach().requires_grad_()
        if ctx.index > 0:
            _prefetch(ctx.chain.blocks[ctx.index - 1])
        devices = [ctx.device] if ctx.cuda_rng is not None else []
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.device)
            for device, enabled, dtype in ctx.autocast:
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            y = ctx.run(x)
        grads = torch.autograd.grad(y, (x, *ctx.params), grad, allow_unused=True)
        ctx.chain.blocks[ctx.index] = None  # this block's context is no longer needed
        return None, None, *grads
