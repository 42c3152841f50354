"""A model wrapper that counts per-sample forward passes and backward passes reaching the input (used by the
AutoAttack tests and benchmarks/bench_autoattack.py to compare pass counts with the reference)."""

from __future__ import annotations

import torch
from torch import nn


class _CountBackward(torch.autograd.Function):
    """Identity whose backward adds the batch size to the owner's backward count."""

    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.owner.backward_count += grad.shape[0]
        return grad, None


class CountingModel(nn.Module):
    """Wraps a model and counts per-sample forward passes and backward passes that reach the input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_count = 0
        self.backward_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.forward_count += x.shape[0]
        if x.requires_grad:
            x = _CountBackward.apply(x, self)
        return self.model(x)

    def reset(self) -> None:
        self.forward_count = self.backward_count = 0
