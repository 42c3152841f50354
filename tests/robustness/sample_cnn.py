"""What the AutoAttack tests and benchmarks/bench_autoattack.py share to compare robustlens with the reference
on the same batch: the shipped sample model and images as tensors, and the per-sample re-scoring of adversarial
images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "sample_data"
#: Relative and absolute slack on the ε of :func:`robust_of` (float rounding of the attacks' projections).
EPS_TOL = 1e-5


def load_sample_cnn(n: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The sample Fashion-MNIST CNN (normalization inside, eval mode, parameters frozen) and its first ``n``
    images of ``labels.csv``: ``(model, x (n, 1, H, W) float32 in [0, 1], y (n,) int64 class indices)``."""
    from PIL import Image

    from robustlens.analysis.ingest.model import load_model, load_model_config

    classes = json.loads((SAMPLE_DATA / "model.json").read_text())["classes"]
    model = load_model(SAMPLE_DATA / "model.pt", load_model_config(SAMPLE_DATA / "model.json"), classes).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    with open(SAMPLE_DATA / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    x = np.stack([np.asarray(Image.open(SAMPLE_DATA / r["path"]).convert("L"), dtype=np.float32) / 255 for r in rows])
    y = torch.tensor([classes.index(r["label"]) for r in rows])
    return model, torch.from_numpy(x)[:, None], y


def robust_of(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, adv: torch.Tensor, eps: float, norm: str
) -> np.ndarray:
    """Per-sample robustness of ``adv``, ``(n,)`` bool: clean-correct and (``adv`` not a valid image within ``eps``
    of ``x`` in ``norm`` ("linf" or "l2"), or still correct)."""
    with torch.no_grad():
        clean_ok = model(x).argmax(1) == y
        adv_ok = model(adv).argmax(1) == y
    d = (adv - x).reshape(len(x), -1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    valid = (size <= eps * (1 + EPS_TOL) + EPS_TOL) & (adv.min() >= 0) & (adv.max() <= 1)
    return (clean_ok & (adv_ok | ~valid)).numpy()
