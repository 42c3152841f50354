"""Planted-issue datasets built from the real sample images (Fashion-MNIST), for the quality tests.

:func:`build_planted_dataset` writes an ImageFolder tree: ``n_clean`` unmodified real images plus, made
from *other* real images (so no planted image duplicates a clean one):

========================  =========================================================================
planted issue             how
========================  =========================================================================
dark                      pixels × 0.08
light                     0.85 + 0.15 · pixels (over-exposed)
blurry                    Gaussian blur, σ drawn uniformly from [1.5, 2.0]
low_information           blank: half constant, half constant + Gaussian noise σ = 1.5/255, with
                          levels drawn from [0.3, 0.7] (so a blank is not also dark or light)
odd_aspect_ratio          resized to 28×140 or 140×28 (also odd_size: 5× the usual area) and to
                          14×56 / 56×14 (the usual area)
odd_size                  resized to 300×300 and 8×8 (usual aspect ratio)
========================  =========================================================================

Resizing is nearest-neighbour, so that a resized image is not also blurred (a bilinear 10× upscale
would be genuinely blurry).

The ground truth returned maps each issue to the set of sample ids (``<label>/<file name>``) that have it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
ISSUES = ("dark", "light", "blurry", "low_information", "odd_aspect_ratio", "odd_size")


def sample_images() -> pd.DataFrame:
    """``path``, ``label`` of the shipped sample images, in file order."""
    return pd.read_csv(SAMPLE_DATA / "labels.csv").sort_values("path", ignore_index=True)


def load_gray(path: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_DATA / path).convert("L"), dtype=np.float64) / 255.0


def _save(root: Path, label: str, name: str, pixels: np.ndarray, *, mode: str = "L") -> str:
    target = root / label / name
    target.parent.mkdir(parents=True, exist_ok=True)
    array = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(array, mode).save(target)
    return f"{label}/{name}"


def build_planted_dataset(
    root: Path, *, n_clean: int = 600, n_per_issue: int = 30, n_odd: int = 4, random_state: int = 0
) -> tuple[dict[str, set[str]], set[str]]:
    """Write the planted dataset under ``root``; return (issue → ids that have it, ids of clean images)."""
    rng = np.random.default_rng(random_state)
    table = sample_images()
    order = rng.permutation(len(table))
    needed = n_clean + 4 * n_per_issue + 2 * n_odd
    if needed > len(table):
        raise ValueError(f"needs {needed} source images, the sample has {len(table)}")
    sources = iter(order)
    truth: dict[str, set[str]] = {issue: set() for issue in ISSUES}
    clean: set[str] = set()

    def take():
        row = table.iloc[next(sources)]
        return row["label"], Path(row["path"]).stem, load_gray(row["path"])

    for _ in range(n_clean):
        label, stem, pixels = take()
        clean.add(_save(root, label, f"{stem}.png", pixels))
    for _ in range(n_per_issue):
        label, stem, pixels = take()
        truth["dark"].add(_save(root, label, f"{stem}_dark.png", pixels * 0.08))
    for _ in range(n_per_issue):
        label, stem, pixels = take()
        truth["light"].add(_save(root, label, f"{stem}_light.png", 0.85 + 0.15 * pixels))
    for _ in range(n_per_issue):
        label, stem, pixels = take()
        sigma = rng.uniform(1.5, 2.0)
        truth["blurry"].add(_save(root, label, f"{stem}_blur.png", ndimage.gaussian_filter(pixels, sigma)))
    for index in range(n_per_issue):
        label, stem, pixels = take()
        level = rng.uniform(0.3, 0.7)
        blank = np.full_like(pixels, level)
        if index % 2:
            blank = blank + rng.normal(0.0, 1.5 / 255.0, size=blank.shape)
        truth["low_information"].add(_save(root, label, f"{stem}_blank.png", blank))
    for index in range(n_odd):
        label, stem, pixels = take()
        size = [(28, 140), (140, 28), (14, 56), (56, 14)][index % 4]  # (width, height)
        resized = np.asarray(Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).resize(size, Image.NEAREST))
        sample_id = _save(root, label, f"{stem}_aspect.png", resized / 255.0)
        truth["odd_aspect_ratio"].add(sample_id)
        if index % 4 < 2:
            truth["odd_size"].add(sample_id)
    for index in range(n_odd):
        label, stem, pixels = take()
        size = [(300, 300), (8, 8)][index % 2]
        resized = np.asarray(Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).resize(size, Image.NEAREST))
        truth["odd_size"].add(_save(root, label, f"{stem}_size.png", resized / 255.0))
    return truth, clean


def copy_real_images(root: Path, count: int, *, offset: int = 0) -> list[str]:
    """Copy ``count`` unmodified sample images (from position ``offset``) into an ImageFolder tree."""
    table = sample_images().iloc[offset : offset + count]
    ids = []
    for path, label in zip(table["path"], table["label"], strict=True):
        target = root / label / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((SAMPLE_DATA / path).read_bytes())
        ids.append(f"{label}/{Path(path).name}")
    return ids
