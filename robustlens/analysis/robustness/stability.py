"""Perturbation stability (ImageNet-P / CIFAR-P, Hendrycks & Dietterich 2019), batched in torch.

A *perturbation sequence* is a short video of an image under a slowly changing perturbation (31 frames,
16 for ``translate``). A stable model keeps its prediction along the sequence. Two measures per sequence:

- **flip probability** (FP): the fraction of frame comparisons whose top-1 prediction differs. Noise
  sequences compare every frame with frame 0 (the clean image; the frames are independent draws); the
  other sequences compare frame ``j`` with frame ``j − d`` (``d`` = ``difficulty``), as the reference
  evaluation code does (``step_size`` chains ``i, i+d, i+2d, …``).
- **top-5 distance** (T5D): the same comparisons, but between the top-5 rankings: with ``σ`` the ranks in the
  second frame of the classes ranked 1..5 in the first, ``Σ_{i=1..5} |(i − 1) − min(σ(i) − 1, 5)|``.

The sequences follow the published CIFAR-P generator (``make_cifar_p.py``): Gaussian noise σ = 0.02, shot noise
(Poisson, 700 photons), speckle noise σ = 0.05, brightness (HSV value + (i − 15)·1.5 %), translate (−7..8 px),
rotate (−15..15°), scale (70 %..130 %), shear (−15..15°), tilt (perspective, −11.25..11.25° about both axes),
Gaussian blur (σ = 0.3 + 0.015 i) and zoom blur (running mean of zooms 1 + 0.004 i). Geometric frames are
bilinear resamples with zero fill, as torchvision's ``affine`` and OpenCV's ``warpPerspective`` give.

Mean corruption error (mCE, ImageNet-C) is :func:`mean_corruption_error`: each corruption's errors summed over
severities, divided by a *stated* baseline's (another model's errors, or none: then the unnormalised mean error
is reported and labelled as such).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._common import (
    RobustnessInputError,
    check_images,
    check_labels,
    check_model,
    eval_mode,
    logits_of,
    make_generator,
)

#: Sequences whose frames are independent noise draws (compared with frame 0).
NOISE_PERTURBATIONS = ("gaussian_noise", "shot_noise", "speckle_noise")


# ------------------------------------------------------------------------------------------ measures


def _comparisons(num_frames: int, noise: bool, difficulty: int) -> tuple[np.ndarray, np.ndarray]:
    """Frame index pairs ``(first, second)`` compared along one sequence (the reference code's order)."""
    if noise:
        second = np.arange(1, num_frames)
        return np.zeros_like(second), second
    firsts, seconds = [], []
    for start in range(min(difficulty, num_frames)):
        chain = np.arange(start, num_frames, difficulty)
        firsts.append(chain[:-1])
        seconds.append(chain[1:])
    return np.concatenate(firsts), np.concatenate(seconds)


def _check_difficulty(difficulty: object) -> int:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int | np.integer) or difficulty < 1:
        raise RobustnessInputError(f"difficulty must be an integer >= 1; got {difficulty!r}")
    return int(difficulty)


def flip_probability(predictions: np.ndarray, *, noise: bool, difficulty: int = 1) -> np.ndarray:
    """Per-sequence flip probability.

    Parameters
    ----------
    predictions:
        ``(N, T)`` integer top-1 predictions, one row per sequence, frames in order (``T >= 2``).
    noise:
        True for noise sequences (every frame compared with frame 0).
    difficulty:
        Frame distance ``d`` of the other sequences (frame ``j`` vs ``j − d``).

    Returns
    -------
    ``(N,)`` float64 in ``[0, 1]``.
    """
    pred = np.asarray(predictions)
    if pred.ndim != 2 or pred.shape[1] < 2:
        raise RobustnessInputError(f"predictions must have shape (N, T) with T >= 2; got {pred.shape}")
    first, second = _comparisons(pred.shape[1], noise, _check_difficulty(difficulty))
    if first.size == 0:
        raise RobustnessInputError(f"difficulty {difficulty} leaves no frame pair in {pred.shape[1]} frames")
    return (pred[:, first] != pred[:, second]).mean(axis=1)


def _ranks(scores: np.ndarray) -> np.ndarray:
    """Rank (1 = highest score; ties by class index, scipy's ``ordinal``) of every class: ``(..., K)``."""
    order = np.argsort(-scores, axis=-1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(1, scores.shape[-1] + 1), axis=-1)
    return ranks


def top5_distance(scores: np.ndarray, *, noise: bool, difficulty: int = 1) -> np.ndarray:
    """Per-sequence mean top-5 distance between compared frames.

    Parameters
    ----------
    scores:
        ``(N, T, K)`` logits or probabilities.
    noise, difficulty:
        As in :func:`flip_probability`.

    Returns
    -------
    ``(N,)`` float64, 0 when the top-5 rankings never change (at most 20 for ``K >= 10``).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 3 or s.shape[1] < 2:
        raise RobustnessInputError(f"scores must have shape (N, T, K) with T >= 2; got {s.shape}")
    first, second = _comparisons(s.shape[1], noise, _check_difficulty(difficulty))
    ranks = _ranks(s)
    k = s.shape[2]
    top = min(5, k)
    leaders = np.argsort(ranks[:, first], axis=-1, kind="stable")[..., :top]  # classes ranked 1..5 in `first`
    sigma = np.take_along_axis(ranks[:, second], leaders, axis=-1)  # their ranks in `second`
    cum = np.minimum(np.arange(k), 5)
    dist = np.abs(cum[:top] - cum[sigma - 1]).sum(axis=-1)
    return dist.mean(axis=1)


# ---------------------------------------------------------------------------------------- sequences


def _affine_frames(x: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """Resample ``x`` ``(N, C, H, W)`` through each 3×3 pixel-coordinate map ``dst -> src`` in ``matrices``
    ``(T, 3, 3)``: bilinear, zero outside; returns ``(N, T, C, H, W)``. Homogeneous (perspective) maps allowed."""
    n, c, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    dst = torch.stack([xs.reshape(-1), ys.reshape(-1), torch.ones(h * w, dtype=torch.float64)])  # (3, HW)
    m = torch.from_numpy(np.asarray(matrices, dtype=np.float64))
    src = m @ dst  # (T, 3, HW)
    sx, sy = src[:, 0] / src[:, 2], src[:, 1] / src[:, 2]
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1).reshape(len(m), h, w, 2)
    grid = grid.to(device=x.device, dtype=x.dtype)
    frames = [
        F.grid_sample(x, grid[t].expand(n, h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
        for t in range(len(m))
    ]
    return torch.stack(frames, dim=1)


def _centered(h: int, w: int, linear: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``dst -> src`` map of the forward transform ``src -> dst``: ``linear`` about the image centre, then ``shift``."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    forward = np.eye(3)
    forward[:2, :2] = linear
    forward[:2, 2] = np.array([cx, cy]) + np.asarray(shift) - linear @ np.array([cx, cy])
    return np.linalg.inv(forward)


def _rotation(deg: float) -> np.ndarray:
    """Counter-clockwise on screen (torchvision's sign) in pixel coordinates, whose y axis points down."""
    r = math.radians(deg)
    return np.array([[math.cos(r), math.sin(r)], [-math.sin(r), math.cos(r)]])


def _shear(deg: float) -> np.ndarray:
    return np.array([[1.0, -math.tan(math.radians(deg))], [0.0, 1.0]])


def _tilt(h: int, w: int, deg: float) -> np.ndarray:
    """``dst -> src`` of the published tilt: rotate about x and y by ``deg``, project at focal ``√(w² + h²)``."""
    phi = theta = math.radians(deg)
    f = math.sqrt(w**2 + h**2)
    p1 = np.array([[1, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1], [0, 0, 1]], dtype=np.float64)
    rx = np.array(
        [
            [1, 0, 0, 0],
            [0, math.cos(theta), -math.sin(theta), 0],
            [0, math.sin(theta), math.cos(theta), 0],
            [0, 0, 0, 1],
        ]
    )
    ry = np.array(
        [[math.cos(phi), 0, -math.sin(phi), 0], [0, 1, 0, 0], [math.sin(phi), 0, math.cos(phi), 0], [0, 0, 0, 1]]
    )
    t = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, f], [0, 0, 0, 1]], dtype=np.float64)
    p2 = np.array([[f, 0, w / 2, 0], [0, f, h / 2, 0], [0, 0, 1, 0]], dtype=np.float64)
    return np.linalg.inv(p2 @ t @ rx @ ry @ p1)


def _gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 7.0) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)``, edges replicated: skimage's ``gaussian`` (scipy
    ``gaussian_filter`` with ``mode="nearest"``) with the published ``truncate=7``."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x)
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, k.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, k.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _brightness(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Add ``delta`` to the HSV value channel (hue and saturation kept): ``rgb · clip(V + δ, 0, 1) / V``."""
    v = x.amax(dim=1, keepdim=True)
    new_v = (v + delta).clamp(0, 1)
    scaled = x * (new_v / v.clamp_min(1e-12))
    return torch.where(v > 0, scaled, new_v.expand_as(x)).clamp(0, 1)


def perturbation_sequence(
    images: torch.Tensor, name: str, *, random_state: int | torch.Generator | None = 0
) -> torch.Tensor:
    """Frames ``(N, T, C, H, W)`` in ``[0, 1]`` of perturbation ``name`` applied to ``images`` ``(N, C, H, W)``.

    Names: keys of :data:`PERTURBATIONS`. Noise sequences start with the clean image (frame 0).
    """
    check_images(images)
    if name not in PERTURBATIONS:
        raise RobustnessInputError(f"unknown perturbation {name!r}; expected one of {list(PERTURBATIONS)}")
    x = images.detach()
    return PERTURBATIONS[name](x, make_generator(random_state, "stability", name)).clamp(0, 1)


def _noise_frames(x: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return torch.stack([x] + [draw(x).clamp(0, 1) for _ in range(30)], dim=1)


def _gaussian_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _noise_frames(x, lambda z: z + 0.02 * torch.randn(z.shape, generator=g, device=g.device).to(z))


def _shot_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _noise_frames(x, lambda z: torch.poisson((z * 700).double().to(g.device), generator=g).to(z) / 700)


def _speckle_noise(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _noise_frames(x, lambda z: z + z * 0.05 * torch.randn(z.shape, generator=g, device=g.device).to(z))


def _brightness_seq(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.stack([_brightness(x, (i - 15) * 1.5 / 100) for i in range(31)], dim=1)


def _warp_sequence(x: torch.Tensor, matrix: Callable[[int, int, int], np.ndarray], frames: range) -> torch.Tensor:
    """``(N, T, C, H, W)``: ``x`` ``(N, C, H, W)`` warped by ``matrix(h, w, i)`` (see :func:`_affine_frames`) for each
    frame ``i`` of ``frames``."""
    h, w = x.shape[-2:]
    return _affine_frames(x, np.stack([matrix(h, w, i) for i in frames]))


def _translate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _warp_sequence(x, lambda h, w, i: _centered(h, w, np.eye(2), (i - 7, 0)), range(16))


def _rotate(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _warp_sequence(x, lambda h, w, i: _centered(h, w, _rotation(i - 15)), range(31))


def _scale(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _warp_sequence(x, lambda h, w, i: _centered(h, w, np.eye(2) * ((i * 2 + 70) / 100)), range(31))


def _shear_seq(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _warp_sequence(x, lambda h, w, i: _centered(h, w, _shear(i - 15)), range(31))


def _tilt_seq(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return _warp_sequence(x, lambda h, w, i: _tilt(h, w, 0.75 * (i - 15)), range(31))


def _gaussian_blur_seq(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.stack([_gaussian_blur(x, 0.3 + 0.015 * i) for i in range(31)], dim=1)


def _zoom_blur(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    zooms = _warp_sequence(x, lambda h, w, i: _centered(h, w, np.eye(2) * (1 + 0.004 * i)), range(1, 31))
    running = torch.cumsum(torch.cat([x[:, None], zooms], dim=1), dim=1)
    return running / torch.arange(1, 32, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1, 1)


#: name -> generator ``(images, torch.Generator) -> (N, T, C, H, W)``.
PERTURBATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "shot_noise": _shot_noise,
    "speckle_noise": _speckle_noise,
    "brightness": _brightness_seq,
    "translate": _translate,
    "rotate": _rotate,
    "scale": _scale,
    "shear": _shear_seq,
    "tilt": _tilt_seq,
    "gaussian_blur": _gaussian_blur_seq,
    "zoom_blur": _zoom_blur,
}
#: The ten sequences of the published test set (CIFAR-P / ImageNet-P; motion blur, snow and spatter need
#: ImageMagick/video tooling and are replaced by speckle noise, shear and Gaussian blur from its validation set).
DEFAULT_PERTURBATIONS = (
    "gaussian_noise",
    "shot_noise",
    "zoom_blur",
    "brightness",
    "translate",
    "rotate",
    "tilt",
    "scale",
    "speckle_noise",
    "shear",
)


# --------------------------------------------------------------------------------------- evaluation


@dataclass
class StabilityResult:
    """Perturbation stability of a model on ``N`` samples.

    Attributes
    ----------
    per_sample:
        One row per sample: ``sample`` (position), ``label``, and per perturbation ``fp_<name>`` (flip probability)
        and ``t5d_<name>`` (top-5 distance); ``fp_mean`` / ``t5d_mean`` average them.
    summary:
        Per perturbation: ``{"flip_probability", "top5_distance", "frames", "noise"}``, plus ``mean_flip_probability``
        and ``mean_top5_distance`` (mFP / mT5D over the perturbations) and ``flip_rate`` entries (FP divided by the
        baseline's, when ``baseline`` was given: mFR).
    difficulty:
        Frame distance of the non-noise comparisons.
    """

    per_sample: pd.DataFrame
    summary: dict[str, Any]
    difficulty: int
    seconds: dict[str, float] = field(default_factory=dict)

    def grouped(self, keys: pd.Series | np.ndarray, name: str = "group") -> pd.DataFrame:
        """Mean FP / T5D per group (a class or slice label per sample), with the group's sample count."""
        frame = self.per_sample.drop(columns=["sample", "label"]).assign(**{name: np.asarray(keys)})
        out = frame.groupby(name, sort=True).mean()
        out.insert(0, "samples", frame.groupby(name, sort=True).size())
        return out.reset_index()


def perturbation_stability(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    perturbations: Sequence[str] = DEFAULT_PERTURBATIONS,
    difficulty: int = 1,
    batch_size: int = 64,
    random_state: int = 0,
    baseline: Mapping[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> StabilityResult:
    """Flip probability and top-5 distance of ``model`` over perturbation sequences of ``images``.

    Parameters
    ----------
    model:
        ``(B, C, H, W)`` images in ``[0, 1]`` -> logits ``(B, K)``; evaluated in eval mode, no gradients.
    images, labels:
        ``(N, C, H, W)`` images in ``[0, 1]``; ``(N,)`` classes (carried into ``per_sample`` for grouping).
    perturbations:
        Keys of :data:`PERTURBATIONS`.
    difficulty:
        Frame distance ``d`` of the non-noise comparisons (the published evaluation uses 1).
    batch_size:
        Images whose whole sequences are predicted together (``batch_size × T`` forward samples).
    random_state:
        Seed of the noise sequences.
    baseline:
        Optional ``{perturbation: flip probability}`` of a baseline model; adds flip rates (FP / baseline FP)
        and their mean (mFR) to the summary.
    progress:
        Optional callback, called with each perturbation name before it runs.
    """
    import time

    check_model(model)
    check_images(images)
    y = check_labels(labels, images.shape[0], images.device)
    unknown = [p for p in perturbations if p not in PERTURBATIONS]
    if unknown:
        raise RobustnessInputError(f"unknown perturbation(s) {unknown}; expected names from {list(PERTURBATIONS)}")
    difficulty = _check_difficulty(difficulty)
    n = images.shape[0]
    columns: dict[str, np.ndarray] = {"sample": np.arange(n), "label": y.cpu().numpy()}
    summary: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with eval_mode(model), torch.no_grad():
        for name in perturbations:
            if progress is not None:
                progress(name)
            start = time.perf_counter()
            noise = name in NOISE_PERTURBATIONS
            fps, t5ds = [], []
            for s in range(0, n, batch_size):
                frames = perturbation_sequence(
                    images[s : s + batch_size], name, random_state=make_generator(random_state, "stability", name, s)
                )
                b, t = frames.shape[:2]
                logits = logits_of(model, frames.reshape(b * t, *frames.shape[2:])).reshape(b, t, -1)
                scores = logits.double().cpu().numpy()
                fps.append(flip_probability(scores.argmax(-1), noise=noise, difficulty=difficulty))
                t5ds.append(top5_distance(scores, noise=noise, difficulty=difficulty))
            columns[f"fp_{name}"] = np.concatenate(fps) if fps else np.zeros(0)
            columns[f"t5d_{name}"] = np.concatenate(t5ds) if t5ds else np.zeros(0)
            summary[name] = {
                "flip_probability": float(columns[f"fp_{name}"].mean()) if n else math.nan,
                "top5_distance": float(columns[f"t5d_{name}"].mean()) if n else math.nan,
                "frames": 16 if name == "translate" else 31,
                "noise": noise,
            }
            seconds[name] = time.perf_counter() - start
    frame = pd.DataFrame(columns)
    fp_cols = [f"fp_{p}" for p in perturbations]
    t5_cols = [f"t5d_{p}" for p in perturbations]
    frame["fp_mean"] = frame[fp_cols].mean(axis=1) if fp_cols else np.nan
    frame["t5d_mean"] = frame[t5_cols].mean(axis=1) if t5_cols else np.nan
    summary["mean_flip_probability"] = float(np.mean([summary[p]["flip_probability"] for p in perturbations]))
    summary["mean_top5_distance"] = float(np.mean([summary[p]["top5_distance"] for p in perturbations]))
    if baseline is not None:
        rates = {}
        for p in perturbations:
            if p not in baseline:
                raise RobustnessInputError(f"baseline has no flip probability for perturbation {p!r}")
            if not baseline[p] > 0:
                raise RobustnessInputError(f"baseline flip probability of {p!r} must be > 0; got {baseline[p]!r}")
            rates[p] = summary[p]["flip_probability"] / float(baseline[p])
        summary["flip_rate"] = rates
        summary["mean_flip_rate"] = float(np.mean(list(rates.values())))
    summary["difficulty"] = difficulty
    return StabilityResult(per_sample=frame, summary=summary, difficulty=difficulty, seconds=seconds)


def mean_corruption_error(
    errors: pd.DataFrame,
    baseline: pd.DataFrame | None = None,
    *,
    clean_error: float | None = None,
    baseline_clean_error: float | None = None,
    baseline_name: str = "none",
) -> dict[str, Any]:
    """mCE (and relative mCE) of ImageNet-C.

    Parameters
    ----------
    errors:
        Top-1 error in ``[0, 1]``, one row per corruption, one column per severity (e.g. 1..5).
    baseline:
        The baseline model's errors in the same layout, or None: then every ``CE`` is the unnormalised mean error
        over severities and the result says ``"baseline": "none (unnormalised)"``.
    clean_error, baseline_clean_error:
        Clean errors, for the relative CE ``Σ_s (E_s − E_clean) / Σ_s (E^b_s − E^b_clean)``.
    baseline_name:
        Name of the baseline, reported with the figures.

    Returns
    -------
    ``{"mce", "ce": {corruption: CE}, "relative_mce", "relative_ce", "baseline"}`` (relative entries only when the
    clean errors are given).
    """
    e = errors.astype(float)
    if e.isna().any().any():
        raise RobustnessInputError("errors has missing values; give every corruption × severity")
    if ((e < 0) | (e > 1)).any().any():
        raise RobustnessInputError("errors must be fractions in [0, 1]")
    out: dict[str, Any] = {}
    if baseline is None:
        ce = e.mean(axis=1)
        out["baseline"] = "none (unnormalised)"
        if clean_error is not None:
            out["relative_ce"] = (e - clean_error).mean(axis=1).to_dict()
    else:
        b = baseline.astype(float).reindex(index=e.index, columns=e.columns)
        if b.isna().any().any():
            raise RobustnessInputError("baseline errors must cover every corruption × severity of errors")
        denom = b.sum(axis=1)
        if (denom <= 0).any():
            raise RobustnessInputError("baseline errors sum to 0 for some corruption; CE is undefined")
        ce = e.sum(axis=1) / denom
        out["baseline"] = baseline_name
        if clean_error is not None and baseline_clean_error is not None:
            rel_denom = (b - baseline_clean_error).sum(axis=1)
            out["relative_ce"] = ((e - clean_error).sum(axis=1) / rel_denom.where(rel_denom != 0)).to_dict()
    out["ce"] = {str(k): float(v) for k, v in ce.items()}
    out["mce"] = float(ce.mean())
    if "relative_ce" in out:
        rel = {str(k): float(v) for k, v in out["relative_ce"].items()}
        out["relative_ce"] = rel
        finite = [v for v in rel.values() if np.isfinite(v)]
        out["relative_mce"] = float(np.mean(finite)) if finite else math.nan
    return out
