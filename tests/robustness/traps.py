"""Trap models: classifiers built to *look* robust to gradient attacks while being easy to break.

Each wraps a plain classifier ``base`` (``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)``):

* :class:`SaturatedSoftmax` — ``log_softmax(1000·base(x))``: the cross-entropy saturates (zero
  gradient in float64 for confident samples); the DLR / margin loss is unaffected.
* :class:`InputQuantization` — ``base(round(x·L)/L)``: zero gradient almost everywhere.
* :class:`QuantizationLeak` — ``base(round(x·L)/L + a·sin(ω·x))``: the gradient is tiny
  (``a·ω`` times the true one) and its sign flips with every pixel value — nonzero, useless.
* :class:`RandomNoise` — ``base(clip(x + N(0, σ²)))`` at every forward, also in eval mode.

``quantize_straight_through`` is the reference BPDA input map used by the tests (written here, not
taken from the code under test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SaturatedSoftmax(nn.Module):
    def __init__(self, base: nn.Module, scale: float = 1000.0):
        super().__init__()
        self.base, self.scale = base, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.base(x) * self.scale, dim=1)


class InputQuantization(nn.Module):
    def __init__(self, base: nn.Module, levels: int = 16):
        super().__init__()
        self.base, self.levels = base, levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(torch.round(x * self.levels) / self.levels)


class QuantizationLeak(nn.Module):
    def __init__(self, base: nn.Module, levels: int = 16, amplitude: float = 1e-4, frequency: float = 100.0):
        super().__init__()
        self.base, self.levels, self.amplitude, self.frequency = base, levels, amplitude, frequency

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * self.levels) / self.levels
        return self.base(q + self.amplitude * torch.sin(self.frequency * x))


class RandomNoise(nn.Module):
    def __init__(self, base: nn.Module, sigma: float = 0.1):
        super().__init__()
        self.base, self.sigma = base, sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base((x + self.sigma * torch.randn_like(x)).clamp(0, 1))


def quantize_straight_through(x: torch.Tensor, levels: int = 16) -> torch.Tensor:
    """``round(x·L)/L`` in the forward pass, identity in the backward pass."""
    return x + (torch.round(x * levels) / levels - x).detach()


def make_traps(base: nn.Module) -> dict[str, nn.Module]:
    """The four trap models around ``base`` (all in eval mode, no trainable parameters)."""
    traps = {
        "saturated_softmax": SaturatedSoftmax(base),
        "quantization": InputQuantization(base),
        "quantization_leak": QuantizationLeak(base),
        "random_noise": RandomNoise(base),
    }
    for m in traps.values():
        m.eval()
    return traps
