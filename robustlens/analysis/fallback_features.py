"""Built-in pixel descriptors: the fallback embedding and the thumbnails used to verify duplicates.

Needs no download and no training. Per image (computed batch-wise in torch):

* a raw descriptor: 16x16 grayscale thumbnail (layout and shape), a 4x4-cell histogram of gradient
  orientations (edges and texture) and a per-channel colour histogram, all from the 16x16 thumbnail. Over
  the whole dataset the raw descriptors are standardised and reduced by PCA to at most 64 dimensions
  (:func:`fit_reduce`); that step needs every image's raw descriptor, so it is refitted on each run (cheap)
  while the per-image raw descriptors are cached by content hash;
* a 32x32 uint8 luminance thumbnail, which the duplicates stage compares pixel by pixel.

What the reduced descriptor is good for: exact and near duplicates, gross visual clusters (brightness,
colour, layout, blank or noise images) and visual outliers. What it is not: a semantic embedding — two
different shirts on the same background may be closer than two views of one shirt, so it must not be
used to judge label quality or semantic similarity.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from robustlens.analysis.loader import stacks_by_shape

#: Bumped whenever the raw descriptor changes, so cached descriptors of an older version are not reused.
FEATURE_VERSION = 2
WORK_SIZE = 32
THUMBNAIL_SIZE = 16
ORIENTATION_BINS = 8
ORIENTATION_CELLS = 4
COLOUR_BINS = 8
#: Images described per tensor pass (see :func:`describe`).
CHUNK = 256
RAW_DIM = THUMBNAIL_SIZE**2 + ORIENTATION_CELLS**2 * ORIENTATION_BINS + 3 * COLOUR_BINS

DESCRIPTION = (
    "Built-in fallback (no model and no imported embeddings): 16x16 grayscale thumbnail + gradient-orientation "
    "histogram + colour histogram, standardised and reduced by PCA. Good for exact / near duplicates, gross "
    "visual clusters (brightness, colour, layout) and visual outliers. NOT a semantic embedding: do not use it "
    "for semantic similarity or label-issue detection; supply a model (--model) or embeddings (--embeddings)."
)

_LUMINANCE = (0.299, 0.587, 0.114)
# Row-major cell index (ORIENTATION_CELLS x ORIENTATION_CELLS grid) of each pixel of the thumbnail.
_CELL_OF_PIXEL = (
    (torch.arange(THUMBNAIL_SIZE) // (THUMBNAIL_SIZE // ORIENTATION_CELLS)).view(-1, 1) * ORIENTATION_CELLS
    + (torch.arange(THUMBNAIL_SIZE) // (THUMBNAIL_SIZE // ORIENTATION_CELLS)).view(1, -1)
).flatten()


def _batched_histogram(bins: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row histograms: ``bins`` ``(B, M)`` int in ``[0, size)`` (optionally weighted) → ``(B, size)``."""
    rows = bins.shape[0]
    offsets = torch.arange(rows, device=bins.device).view(-1, 1) * size
    flat = (bins + offsets).flatten()
    counts = torch.bincount(flat, weights=None if weights is None else weights.flatten().float(), minlength=rows * size)
    return counts.view(rows, size).float()


def _to_work_size(pixels: list[np.ndarray], device: str | torch.device) -> torch.Tensor:
    """Decoded images (``(H, W, C)`` float in ``[0, 1]``, C = 1 or 3) → ``(B, 3, 32, 32)`` RGB tensor.

    Images of equal shape are resized together (antialiased bilinear), so a batch of same-size images
    costs one interpolation call.
    """
    out = torch.empty((len(pixels), 3, WORK_SIZE, WORK_SIZE), dtype=torch.float32, device=device)
    for positions, array in stacks_by_shape(pixels):
        if array.ndim != 4 or array.shape[3] not in (1, 3):
            raise ValueError(f"expected (H, W, 1 or 3) pixels, got shape {array.shape[1:]}")
        stack = torch.from_numpy(array).to(device).permute(0, 3, 1, 2)
        # Grayscale is resized before it is repeated: 3x less work.
        if array.shape[1:3] != (WORK_SIZE, WORK_SIZE):
            stack = F.interpolate(
                stack, size=(WORK_SIZE, WORK_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        if array.shape[3] == 1:
            stack = stack.expand(-1, 3, -1, -1)
        out[torch.as_tensor(positions, device=device)] = stack.clamp(0.0, 1.0)
    return out


def describe(pixels: list[np.ndarray], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Raw descriptors and grayscale thumbnails of a batch of decoded images.

    Parameters
    ----------
    pixels:
        ``B`` decoded images, each ``(H, W, C)`` float32 in ``[0, 1]`` with C = 1 or 3.
    device:
        Torch device for the computation; results stay there.

    Returns
    -------
    raw:
        ``(B, RAW_DIM)`` float32 descriptors (before standardisation and PCA).
    thumbnails:
        ``(B, 32, 32)`` uint8 luminance thumbnails (antialiased resize), used to verify near duplicates.
    """
    if not pixels:
        return (
            torch.empty((0, RAW_DIM), dtype=torch.float32, device=device),
            torch.empty((0, WORK_SIZE, WORK_SIZE), dtype=torch.uint8, device=device),
        )
    if len(pixels) > CHUNK:  # cache-sized pieces: 4,096 images at once run at half the speed of 256
        parts = [describe(pixels[start : start + CHUNK], device) for start in range(0, len(pixels), CHUNK)]
        return torch.cat([raw for raw, _ in parts]), torch.cat([thumbs for _, thumbs in parts])
    rgb = _to_work_size(pixels, device)
    weights = torch.tensor(_LUMINANCE, device=device).view(1, 3, 1, 1)
    gray = (rgb * weights).sum(1, keepdim=True)  # (B, 1, 32, 32)
    thumbnails = (gray[:, 0] * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return _raw_from_work_size(rgb, gray), thumbnails


def raw_descriptors(pixels: list[np.ndarray], device: str | torch.device = "cpu") -> torch.Tensor:
    """Per-image raw descriptor, ``(B, RAW_DIM)`` float32 (see :func:`describe`)."""
    return describe(pixels, device)[0]


def _raw_from_work_size(rgb: torch.Tensor, gray: torch.Tensor) -> torch.Tensor:
    """``(B, 3, 32, 32)`` RGB and ``(B, 1, 32, 32)`` luminance → ``(B, RAW_DIM)`` descriptors.

    Gradients and colours are taken at the thumbnail size (16×16): a coarse descriptor does not need
    more, and it is four times less work than at 32×32.
    """
    device = rgb.device
    gray = F.avg_pool2d(gray, WORK_SIZE // THUMBNAIL_SIZE)
    rgb = F.avg_pool2d(rgb, WORK_SIZE // THUMBNAIL_SIZE)
    thumbnail = gray.flatten(1)

    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device)
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
    gradients = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    magnitude = torch.hypot(gradients[:, 0], gradients[:, 1]).flatten(1)  # (B, 256)
    # Unsigned orientation in [0, pi): an edge and its contrast-reversed copy count the same.
    angle = torch.atan2(gradients[:, 1], gradients[:, 0]).flatten(1).remainder(torch.pi)
    bins = (angle * (ORIENTATION_BINS / torch.pi)).long().clamp_(max=ORIENTATION_BINS - 1)
    cell = _CELL_OF_PIXEL.to(device)  # (256,) cell index of each thumbnail pixel
    orientation = _batched_histogram(
        cell * ORIENTATION_BINS + bins, ORIENTATION_CELLS**2 * ORIENTATION_BINS, weights=magnitude
    )
    # Normalised so that the descriptor measures edge layout, not contrast (contrast is in the thumbnail).
    orientation = orientation / orientation.norm(dim=1, keepdim=True).clamp_min(1e-6)

    levels = (rgb * COLOUR_BINS).long().clamp_(max=COLOUR_BINS - 1).flatten(2)  # (B, 3, 256)
    channel_offset = torch.arange(3, device=device).view(1, 3, 1) * COLOUR_BINS
    colour = _batched_histogram((levels + channel_offset).flatten(1), 3 * COLOUR_BINS) / (THUMBNAIL_SIZE**2)
    return torch.cat([thumbnail, orientation, colour], dim=1)


def fit_reduce(raw: np.ndarray, dim: int = 64) -> np.ndarray:
    """Standardise raw descriptors and project them on their top principal components.

    Parameters
    ----------
    raw:
        ``(N, RAW_DIM)`` raw descriptors of the whole dataset.
    dim:
        Largest output dimension; the result has ``min(dim, RAW_DIM, max(N - 1, 1))`` columns.

    Returns
    -------
    ``(N, d)`` float32 PCA scores (not L2-normalised). Component signs are fixed (largest loading
    positive) so the result is deterministic.
    """
    if raw.ndim != 2:
        raise ValueError(f"raw descriptors must be 2-D (N, D), got shape {raw.shape}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    n, width = raw.shape
    # Column statistics in float64; the (N, D) work in float32 (half the memory traffic of float64; the
    # covariance of standardised values loses ~1e-6 relative, far below what PCA directions need).
    data = np.asarray(raw, dtype=np.float32)
    mean = data.mean(0, dtype=np.float64) if n else np.zeros(width)
    scale = np.sqrt(np.square(data - mean.astype(np.float32)).mean(0, dtype=np.float64)) if n else np.ones(width)
    # Constant features (e.g. colour bins of a grayscale dataset) carry no information; keep them at zero.
    scale = np.where(scale > 1e-8, scale, 1.0)
    standard = (data - mean.astype(np.float32)) / scale.astype(np.float32)
    keep = min(dim, width, max(n - 1, 1))
    covariance = (standard.T @ standard).astype(np.float64) / max(n - 1, 1)
    # A few-hundred-wide eigenproblem is fastest on one BLAS thread (multi-threaded OpenBLAS spins and
    # was measured 10-20x slower on a busy 2-core machine).
    with threadpool_limits(1, user_api="blas"):
        _, vectors = np.linalg.eigh(covariance)  # ascending eigenvalues
    components = vectors[:, ::-1][:, :keep]
    signs = np.sign(components[np.abs(components).argmax(0), np.arange(keep)])
    components = components * np.where(signs == 0, 1.0, signs)
    return standard @ components.astype(np.float32)
