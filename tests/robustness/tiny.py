"""A tiny deterministic classification task for the robustness tests (no global RNG state touched)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class TinyMLP(nn.Module):
    """``(B, 1, 8, 8)`` in ``[0, 1]`` -> logits ``(B, num_classes)``; normalization inside the model."""

    def __init__(self, num_classes: int = 4, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


@dataclass
class TinyTask:
    model: TinyMLP
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _prototypes(num_classes: int, g: torch.Generator) -> torch.Tensor:
    low = torch.rand(num_classes, 1, 3, 3, generator=g)
    return 0.25 + 0.5 * F.interpolate(low, size=(8, 8), mode="bilinear", align_corners=False)


def _sample(protos: torch.Tensor, n: int, g: torch.Generator, noise: float = 0.12) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % protos.shape[0]
    x = protos[y] + noise * torch.randn(n, 1, 8, 8, generator=g)
    return x.clamp(0, 1), y


def make_tiny_task(
    num_classes: int = 4,
    n_train: int = 256,
    n_test: int = 64,
    steps: int = 100,
    max_margin: float = 12.0,
    seed: int = 0,
) -> TinyTask:
    """Train :class:`TinyMLP` full-batch with Adam on prototype+noise data; everything seeded.

    Afterwards the last layer is scaled down (a temperature, argmax unchanged) so that no test
    sample's logit margin exceeds ``max_margin``: float32 softmax then never saturates, which is
    the regime where a float32 cross-entropy gradient (ART's) is accurate.
    """
    g = torch.Generator().manual_seed(seed)
    protos = _prototypes(num_classes, g)
    x_train, y_train = _sample(protos, n_train, g)
    x_test, y_test = _sample(protos, n_test, g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyMLP(num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        top2 = model(torch.cat([x_train, x_test])).topk(2, dim=1).values
        margin = float((top2[:, 0] - top2[:, 1]).max())
        if margin > max_margin:
            last = model.net[-1]
            last.weight.mul_(max_margin / margin)
            last.bias.mul_(max_margin / margin)
    for p in model.parameters():
        p.requires_grad_(False)
    return TinyTask(model, x_train, y_train, x_test, y_test)
