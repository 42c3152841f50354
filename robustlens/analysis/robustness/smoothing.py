"""Randomized smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019, CERTIFY).

The smoothed classifier is ``g(x) = argmax_c P(f(x + ε) = c)`` with ``ε ~ N(0, σ² I)`` added in
``[0, 1]`` pixel space (no clipping, as in the paper; normalization stays inside the model). For
each image, CERTIFY

1. draws ``n0`` noisy copies and takes the most frequent class ``ĉ`` (selection);
2. draws ``n`` fresh noisy copies and counts ``k`` = how many are classified ``ĉ`` (estimation);
3. computes the one-sided Clopper–Pearson lower confidence bound ``p_lower`` of ``P(f(x+ε) = ĉ)`` at
   level ``1 - α``: ``p_lower = Beta.ppf(α; k, n - k + 1)`` (0 when ``k = 0``);
4. abstains (class ``-1``) if ``p_lower < 1/2``, else certifies class ``ĉ`` with L2 radius
   ``R = σ·Φ⁻¹(p_lower)``: with probability ``>= 1 - α`` over the sampling, ``g`` predicts ``ĉ``
   everywhere in the L2 ball of radius ``R`` around ``x``.

Honest CPU defaults: ``n0 = 100``, ``n = 1000``, ``α = 0.001`` (the paper uses ``n = 100 000`` for its
tables; with ``n = 1000`` and ``α = 0.001`` the largest certifiable radius is
``σ·Φ⁻¹(0.001^(1/1000)) ≈ 2.46·σ``, against ``≈ 3.81·σ`` with ``n = 100 000``). Each image
costs ``n0 + n`` forward passes, in chunks of ``batch_size`` noisy copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import beta, norm

from ._common import (
    RobustnessInputError,
    check_fraction,
    check_images,
    check_int,
    check_labels,
    check_model,
    check_positive,
    check_seed,
    eval_mode,
    logits_of,
    make_generator,
    model_device,
)

DEFAULT_N0 = 100
DEFAULT_N = 1000
DEFAULT_ALPHA = 0.001
DEFAULT_BATCH_SIZE = 500


def clopper_pearson_lower(k: np.ndarray | int, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson lower bound of a binomial proportion at confidence ``1 - alpha``.

    Parameters
    ----------
    k:
        Successes (int or array of ints in ``[0, n]``).
    n:
        Trials (``>= 1``).
    alpha:
        Error level in ``(0, 1)``.

    Returns
    -------
    numpy.ndarray
        ``Beta.ppf(alpha; k, n - k + 1)``, 0 where ``k = 0``; shape of ``k``. For ``k = n`` this is
        ``alpha^(1/n)``. Equals the lower end of the two-sided exact interval at level ``1 - 2·alpha``.
    """
    n = check_int(n, "n")
    alpha = check_fraction(alpha, "alpha")
    k_arr = np.asarray(k)
    if k_arr.dtype.kind not in "iu" or (k_arr.size and (k_arr.min() < 0 or k_arr.max() > n)):
        raise RobustnessInputError(f"k must be integers in [0, {n}]; got {k!r}")
    k_f = k_arr.astype(float)
    with np.errstate(invalid="ignore"):
        lower = beta.ppf(alpha, np.maximum(k_f, 1.0), n - k_f + 1)
    return np.where(k_arr == 0, 0.0, lower)


def certified_radius(p_lower: np.ndarray | float, sigma: float) -> np.ndarray:
    """L2 radius ``σ·Φ⁻¹(p_lower)`` where ``p_lower >= 1/2``, else 0 (abstain); shape of ``p_lower``."""
    p = np.asarray(p_lower, dtype=float)
    with np.errstate(divide="ignore"):
        r = sigma * norm.ppf(p)
    return np.where(p >= 0.5, r, 0.0)


@dataclass
class CertifyResult:
    """Per-image output of :func:`certify` (``N`` images).

    Attributes
    ----------
    prediction:
        ``(N,)`` int: certified class, ``-1`` where abstained.
    radius:
        ``(N,)`` float: certified L2 radius (pixel units), 0 where abstained.
    abstain:
        ``(N,)`` bool.
    p_lower:
        ``(N,)`` Clopper–Pearson lower bound of the top-class probability.
    top_class:
        ``(N,)`` class selected from the ``n0`` samples (reported even when abstaining).
    counts:
        ``(N,)`` ``k``: estimation samples classified as ``top_class``.
    sigma, n0, n, alpha:
        Settings used.
    """

    prediction: np.ndarray
    radius: np.ndarray
    abstain: np.ndarray
    p_lower: np.ndarray
    top_class: np.ndarray
    counts: np.ndarray
    sigma: float
    n0: int
    n: int
    alpha: float

    @property
    def abstention_rate(self) -> float:
        """Fraction of images abstained on."""
        return abstention_rate(self.abstain)

    def certified_accuracy(self, labels: np.ndarray | torch.Tensor, radius_grid: np.ndarray) -> np.ndarray:
        """Certified accuracy at each radius of ``radius_grid`` given true ``labels`` ``(N,)``."""
        y = check_labels(labels, self.prediction.shape[0], torch.device("cpu")).numpy()
        return certified_accuracy_curve(self.radius, (self.prediction == y) & ~self.abstain, radius_grid)


def _class_counts(
    model: torch.nn.Module,
    image: torch.Tensor,
    num: int,
    sigma: float,
    batch_size: int,
    num_classes: int,
    generator: torch.Generator,
) -> np.ndarray:
    """Counts ``(num_classes,)`` of the predictions on ``num`` Gaussian-noised copies of ``image`` ``(C, H, W)``."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    remaining = num
    while remaining > 0:
        b = min(batch_size, remaining)
        noise = torch.randn(
            (b,) + tuple(image.shape), generator=generator, device=generator.device, dtype=torch.float32
        ).to(image)
        preds = logits_of(model, image[None] + sigma * noise).argmax(dim=1).cpu()
        counts += torch.bincount(preds, minlength=num_classes)[:num_classes]
        remaining -= b
    return counts.numpy()


def certify(
    model: torch.nn.Module,
    images: torch.Tensor,
    sigma: float,
    *,
    n0: int = DEFAULT_N0,
    n: int = DEFAULT_N,
    alpha: float = DEFAULT_ALPHA,
    batch_size: int = DEFAULT_BATCH_SIZE,
    random_state: int = 0,
) -> CertifyResult:
    """CERTIFY of Cohen et al. (2019) for every image.

    Parameters
    ----------
    model:
        Base classifier ``f``: ``nn.Module``, ``(B, C, H, W)`` -> logits ``(B, K)``; eval mode; images are
        moved to its device.
    images:
        ``(N, C, H, W)`` in ``[0, 1]``.
    sigma:
        Noise standard deviation in ``[0, 1]`` pixel units (``> 0``).
    n0:
        Selection samples per image.
    n:
        Estimation samples per image.
    alpha:
        Failure probability of the certificate, in ``(0, 1)``.
    batch_size:
        Noisy copies per forward pass.
    random_state:
        Seed; image ``i`` uses noise seeded by ``(random_state, i)``, so results do not depend on
        which other images are certified.

    Returns
    -------
    CertifyResult
    """
    check_model(model)
    check_images(images)
    sigma = check_positive(sigma, "sigma")
    n0 = check_int(n0, "n0")
    n = check_int(n, "n")
    alpha = check_fraction(alpha, "alpha")
    batch_size = check_int(batch_size, "batch_size")
    check_seed(random_state)
    device = model_device(model, images.device)
    count = images.shape[0]
    top = np.empty(count, dtype=np.int64)
    k = np.empty(count, dtype=np.int64)
    with eval_mode(model), torch.no_grad():
        num_classes = logits_of(model, images[:1].to(device)).shape[1]
        for i in range(count):
            img = images[i].to(device)
            gen = make_generator(int(random_state), "certify", i)
            top[i] = int(np.argmax(_class_counts(model, img, n0, sigma, batch_size, num_classes, gen)))
            k[i] = _class_counts(model, img, n, sigma, batch_size, num_classes, gen)[top[i]]
    p_lower = clopper_pearson_lower(k, n, alpha)
    abstain = p_lower < 0.5
    radius = certified_radius(p_lower, sigma)
    return CertifyResult(
        prediction=np.where(abstain, -1, top),
        radius=np.where(abstain, 0.0, radius),
        abstain=abstain,
        p_lower=p_lower,
        top_class=top,
        counts=k,
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
    )


def certified_accuracy_curve(radii: np.ndarray, correct: np.ndarray, radius_grid: np.ndarray) -> np.ndarray:
    """Certified accuracy at each radius: fraction of samples with ``correct`` and ``radius >= r``.

    Parameters
    ----------
    radii:
        ``(N,)`` certified radii (abstained samples: any value, they must have ``correct = False``).
    correct:
        ``(N,)`` bool: certified (not abstained) and the certified class equals the true label.
    radius_grid:
        ``(R,)`` radii at which to evaluate.

    Returns
    -------
    numpy.ndarray
        ``(R,)`` certified accuracies in ``[0, 1]`` (non-increasing in the radius).
    """
    r = np.asarray(radii, dtype=float)
    c = np.asarray(correct)
    grid = np.asarray(radius_grid, dtype=float)
    if r.ndim != 1 or c.shape != r.shape:
        raise RobustnessInputError(f"radii and correct must be 1-D of equal length; got {r.shape} and {c.shape}")
    if c.dtype != bool:
        raise RobustnessInputError(f"correct must be a boolean array; got dtype {c.dtype}")
    if grid.ndim != 1:
        raise RobustnessInputError(f"radius_grid must be 1-D; got shape {grid.shape}")
    if r.size == 0:
        return np.full(grid.shape, np.nan)
    return ((c[None, :]) & (r[None, :] >= grid[:, None])).mean(axis=1)


def radius_grid(sigma: float, n: int, alpha: float, *, step: float | None = None) -> np.ndarray:
    """Radii at which a certified-accuracy curve is worth evaluating: ``0, step, 2·step, …`` up to the largest
    radius CERTIFY can give with ``n`` estimation samples, ``σ·Φ⁻¹(α^(1/n))`` (``k = n``).

    Parameters
    ----------
    sigma, n, alpha:
        Noise level and CERTIFY's estimation samples and error level, as in :func:`certify`.
    step:
        Spacing (default ``σ/10``).

    Returns
    -------
    numpy.ndarray
        ``(R,)`` ascending radii, rounded to 10 decimals.
    """
    sigma = check_positive(sigma, "sigma")
    n = check_int(n, "n")
    alpha = check_positive(alpha, "alpha")
    largest = sigma * float(norm.ppf(alpha ** (1.0 / n)))  # Clopper–Pearson lower bound at k = n
    step = sigma / 10 if step is None else check_positive(step, "step")
    return np.round(np.arange(0.0, largest + step, step), 10)


def abstention_rate(abstain: np.ndarray) -> float:
    """Fraction of ``True`` in the ``(N,)`` abstain flags (NaN for ``N = 0``)."""
    a = np.asarray(abstain, dtype=bool)
    return float(a.mean()) if a.size else float("nan")
