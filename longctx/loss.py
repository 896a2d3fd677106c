"""The LM head and its cross-entropy without (T, V) logits: token chunks, gradients in forward.

Shapes: N tokens (batch and time flattened), E model width, V vocabulary.

A 1M-token step with a 32,000-token vocabulary would hold float32 logits of 128 GB, and their
gradient as much again. Here the head runs over chunks of tokens whose logits fit a fixed budget
(CHUNK_ELEMENTS), and each chunk's gradient is made at once from its softmax, while its logits
are at hand (the loss is the last op of the step, so its gradient with respect to each logit,
softmax − one-hot over N, is known up to the incoming scalar): what is kept for backward is the
gradient of the hidden states (N, E) and of the head's weight (V, E, float32), never logits, and
backward only scales them. No matmul is recomputed. The same value and gradients as
F.cross_entropy(F.linear(h, w), targets) (tests/test_loss.py).
"""
from __future__ import annotations

import torch

# Logits per chunk: 2^27 float32 values, 512 MiB (4,194 tokens at a 32K vocabulary, all of a
# 32K-token window at 256).
CHUNK_ELEMENTS = 1 << 27


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, reduction, chunk):
        n = h.shape[0]
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
        with torch.autocast(h.device.type, enabled=False):
            hc, wc = h.to(dtype), weight.to(dtype)
            scale = 1.0 / n if reduction == "mean" else 1.0
            need_h, need_w = ctx.needs_input_grad[:2]
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            for s in range(0, n, chunk):
                e = min(n, s + chunk)
                t = targets[s:e]
                # One pass from the matmul's output to float32 log-probabilities (the fewest
                # bytes over the (n_c, V) chunk: it dominates the head's time), in place after.
                logp = torch.log_softmax(hc[s:e] @ wc.T, dim=-1, dtype=torch.float32)
                total -= logp.gather(1, t[:, None]).sum()
                if need_h or need_w:
                    probs = logp.exp_()
                    probs[torch.arange(e - s, device=h.device), t] -= 1.0
                    d = probs.to(dtype)  # the 1/N of a mean is applied to the small results
                    if need_h:
                        grad_h[s:e] = (d @ wc).mul_(scale)
                    if need_w:
                        grad_w.add_((d.T @ hc[s:e]).float(), alpha=scale)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w) if g is not None))
        ctx.has = (need_h, need_w)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_out):
        grads = iter(ctx.saved_tensors)
        grad_h = next(grads) * grad_out if ctx.has[0] else None
        grad_w = (next(grads) * grad_out).to(ctx.weight_dtype) if ctx.has[1] else None
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         chunk: int | None = None) -> torch.Tensor:
    """cross_entropy(h @ weight.T, targets) for h (N, E), weight (V, E), targets (N,) long, in
    float32, mean or sum over the tokens; matmuls in autocast's dtype when it is on."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(h, weight, targets, reduction, chunk)


def head_argmax(h: torch.Tensor, weight: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """argmax over the vocabulary of h @ weight.T, (N,) long, a chunk of tokens at a time."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    return torch.cat([(h[s : s + chunk] @ weight.T.to(h.dtype)).argmax(-1) for s in range(0, h.shape[0], chunk)])
