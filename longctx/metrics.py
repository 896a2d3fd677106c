"""Validation metrics, summed over ranks (torchmetrics states): the LM's loss, perplexity and bits
per byte, and the passkey task's accuracy by distance."""
from __future__ import annotations

import math

import torch
from torchmetrics import Metric


class LanguageModelLoss(Metric):
    """Nats, tokens and the UTF-8 bytes those tokens decode to, summed: loss and perplexity per
    token, and bits per byte, which compares models of different tokenizers (a byte model's
    bits per byte is its loss / ln 2)."""

    def __init__(self):
        super().__init__()
        for name in ("nats", "tokens", "bytes"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nats: torch.Tensor, tokens: int, nbytes: torch.Tensor) -> None:
        self.nats += nats.double()
        self.tokens += tokens
        self.bytes += nbytes.double()

    def compute(self) -> dict[str, torch.Tensor]:
        loss = (self.nats / self.tokens.clamp(min=1)).float()
        return {"val/loss": loss, "val/ppl": torch.exp(loss),
                "val/bpb": (self.nats / (math.log(2) * self.bytes.clamp(min=1))).float()}


class BucketAccuracy(Metric):
    """Exact-match accuracy of the scored positions, per distance bucket (summed over ranks)."""

    def __init__(self, buckets: int):
        super().__init__()
        self.add_state("correct", torch.zeros(buckets), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(buckets), dist_reduce_fx="sum")

    def update(self, correct: torch.Tensor, bucket: torch.Tensor) -> None:
        self.correct.index_add_(0, bucket, correct.float())
        self.total.index_add_(0, bucket, torch.ones_like(correct, dtype=torch.float))

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)
