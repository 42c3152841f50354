"""Built-in image metrics, registered through :mod:`robustlens.analysis.metric_registry` like any plugin.

Pixel metrics take a batch ``(B, C, H, W)`` float in ``[0, 1]`` (``C`` = 1 or 3, one size per batch)
and return ``(B,)``; every one is a handful of batched tensor operations, with no loop over images.
Luminance is Rec. 601 luma ``Y = 0.299 R + 0.587 G + 0.114 B`` (the one Pillow's ``"L"`` conversion
uses); for a one-channel image it is the channel itself. Intensities are in ``[0, 1]`` units throughout.

=====================  ==============================================================================
metric                 definition
=====================  ==============================================================================
brightness             mean luminance
contrast               standard deviation of luminance (population, ddof = 0)
sharpness              variance of the 4-neighbour Laplacian of luminance (edges replicated)
high_frequency_ratio   ``sharpness / (64 · contrast²)`` in [0, 1]: the share of the luminance variance
                       the Laplacian keeps, normalised by its largest gain (8), so a checkerboard
                       scores 1, white noise about 0.3, a sharp photo about 0.01-0.1 and a blurred
                       one far less; unlike ``sharpness`` it does not depend on contrast (0 for a
                       constant image)
blur_score             Crété-Roffet et al. (2007) blur effect in [0, 1], higher = blurrier: re-blur
                       luminance with a 9-tap box filter along each axis; per axis
                       ``b = (ΣD_F - Σmax(0, D_F - D_B)) / ΣD_F`` with ``D`` the absolute neighbour
                       differences of the image (F) and of its re-blurred copy (B); the score is the
                       larger of the two axes. A sharp image loses much variation when re-blurred (b
                       near 0); an already blurred one loses little (b near 1). An image with no
                       variation along either axis scores 1
entropy                Shannon entropy (bits, 0..8) of the 256-bin histogram of luminance rounded to
                       8-bit levels
shadow_level           1st percentile of luminance rounded to 8-bit levels, in [0, 1]
highlight_level        99th percentile of luminance rounded to 8-bit levels, in [0, 1]
colorfulness           Hasler & Süsstrunk (2003): ``σ_rgyb + 0.3 μ_rgyb`` with ``rg = R - G``,
                       ``yb = (R + G) / 2 - B`` (0 for grayscale)
saturation             mean HSV saturation ``(max - min) / max`` over pixels (0 where max = 0)
mean_r, mean_g, mean_b mean of each channel (the gray value for one-channel images)
dark_fraction          fraction of pixels with luminance < 0.1
bright_fraction        fraction of pixels with luminance > 0.9
noise                  Immerkær (1996) fast noise standard deviation:
                       ``sqrt(π/2) / (6 (W-2)(H-2)) · Σ|Y * M|`` with the 3×3 mask
                       ``[[1,-2,1],[-2,4,-2],[1,-2,1]]`` (valid region; 0 below 3×3)
grayscale_content      largest difference between channels at any pixel (0 = gray content; 0 for
                       one-channel images)
=====================  ==============================================================================

Record metrics (from ``samples.parquet``, no pixels): ``width``, ``height`` (pixels), ``aspect_ratio``
(width / height), ``area`` (width × height), ``file_size`` (bytes), ``channels`` (1 or 3 after
decoding; see :mod:`robustlens.analysis.images`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from robustlens.analysis.metric_registry import register_metric

LUMA_WEIGHTS = (0.299, 0.587, 0.114)
DARK_LEVEL = 0.1
BRIGHT_LEVEL = 0.9
#: Length of the box filter that re-blurs the image for ``blur_score`` (Crété-Roffet et al. use 9).
BLUR_WINDOW = 9


# -- shared building blocks ------------------------------------------------------------------------
# Several metrics need the same intermediate (luminance, its histogram, its Laplacian). They are computed
# once per batch tensor and kept while that tensor lives; metrics must therefore not modify ``images``
# in place.
_SHARED: dict[int, dict[str, torch.Tensor]] = {}


def shared(images: torch.Tensor, key: str, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute(images)``, computed once per batch tensor ``images`` and ``key``."""
    values = _SHARED.get(id(images))
    if values is None:
        values = _SHARED[id(images)] = {}
        weakref.finalize(images, _SHARED.pop, id(images), None)
    if key not in values:
        values[key] = compute(images)
    return values[key]


def luminance(images: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` → ``(B, H, W)`` Rec. 601 luma (the channel itself when ``C`` = 1)."""
    if images.shape[1] == 1:
        return images[:, 0]
    return shared(
        images, "luminance", lambda x: LUMA_WEIGHTS[0] * x[:, 0] + LUMA_WEIGHTS[1] * x[:, 1] + LUMA_WEIGHTS[2] * x[:, 2]
    )


def _flat(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1)


def _spatial_mean(values: torch.Tensor) -> torch.Tensor:
    return _flat(values).mean(dim=1)


def _spatial_variance(values: torch.Tensor) -> torch.Tensor:
    """Population variance per image (two passes; faster than ``Tensor.var``'s Welford on CPU)."""
    flat = _flat(values)
    return (flat - flat.mean(dim=1, keepdim=True)).square().mean(dim=1)


def luminance_variance(images: torch.Tensor) -> torch.Tensor:
    """``(B,)`` population variance of luminance."""
    return shared(images, "luminance_variance", lambda x: _spatial_variance(luminance(x)))


def luminance_histogram(images: torch.Tensor) -> torch.Tensor:
    """``(B, 256)`` pixel counts of luminance rounded to 8-bit levels, one ``bincount`` for the batch."""

    def compute(x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        levels = (_flat(luminance(x)) * 255.0).round_().clamp_(0, 255).long()
        levels += torch.arange(batch, device=x.device).unsqueeze(1) * 256  # one bin range per image
        return torch.bincount(levels.reshape(-1), minlength=256 * batch).reshape(batch, 256)

    return shared(images, "luminance_histogram", compute)


def laplacian(images: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` 4-neighbour Laplacian of luminance, borders replicated."""

    def compute(x: torch.Tensor) -> torch.Tensor:
        lum = luminance(x)
        padded = F.pad(lum.unsqueeze(1), (1, 1, 1, 1), mode="replicate")[:, 0]
        return padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:] - 4.0 * lum

    return shared(images, "laplacian", compute)


def _second_difference(values: torch.Tensor, dim: int) -> torch.Tensor:
    """``[1, -2, 1]`` along ``dim`` over the valid region (length shrinks by 2)."""
    length = values.shape[dim]
    return (
        values.narrow(dim, 0, length - 2) - 2.0 * values.narrow(dim, 1, length - 2) + values.narrow(dim, 2, length - 2)
    )


def _box_blur(values: torch.Tensor, dim: int, window: int) -> torch.Tensor:
    """Mean over a centred window of ``window`` (odd) samples along ``dim``, borders replicated."""
    half = window // 2
    length = values.shape[dim]
    edge = list(values.shape)
    edge[dim] = half
    padded = torch.cat(
        [values.narrow(dim, 0, 1).expand(edge), values, values.narrow(dim, length - 1, 1).expand(edge)], dim=dim
    )
    total = padded.narrow(dim, 0, length).clone()
    for offset in range(1, window):  # the window's taps, each over the whole batch
        total += padded.narrow(dim, offset, length)
    return total / window


# -- pixel metrics -----------------------------------------------------------------------------------
@register_metric("brightness", description="mean luminance, 0..1", higher_is="brighter")
def brightness(images: torch.Tensor) -> torch.Tensor:
    return _spatial_mean(luminance(images))


@register_metric("contrast", description="standard deviation of luminance, 0..0.5", higher_is="more contrast")
def contrast(images: torch.Tensor) -> torch.Tensor:
    return luminance_variance(images).sqrt()


@register_metric("sharpness", description="variance of the Laplacian of luminance", higher_is="sharper")
def sharpness(images: torch.Tensor) -> torch.Tensor:
    return _spatial_variance(laplacian(images))


@register_metric(
    "high_frequency_ratio",
    description="variance of the Laplacian / (64 × variance), 0..1",
    higher_is="more fine detail",
)
def high_frequency_ratio(images: torch.Tensor) -> torch.Tensor:
    variance = luminance_variance(images)
    ratio = sharpness(images) / (64.0 * variance.clamp(min=torch.finfo(images.dtype).tiny))
    return torch.where(variance > 0, ratio, torch.zeros_like(ratio)).clamp(0.0, 1.0)


@register_metric("blur_score", description="Crété-Roffet blur effect, 0..1", higher_is="blurrier")
def blur_score(images: torch.Tensor) -> torch.Tensor:
    lum = luminance(images)
    per_axis = []
    for dim in (1, 2):  # the two image axes, each over the whole batch
        reblurred = _box_blur(lum, dim, BLUR_WINDOW)
        variation = lum.diff(dim=dim).abs()
        lost = (variation - reblurred.diff(dim=dim).abs()).clamp_(min=0)
        total = _flat(variation).sum(dim=1)
        kept = total - _flat(lost).sum(dim=1)
        per_axis.append(
            torch.where(
                total > 0, kept / total.clamp(min=torch.finfo(lum.dtype).tiny), torch.full_like(total, math.nan)
            )
        )
    return torch.fmax(per_axis[0], per_axis[1]).nan_to_num(nan=1.0).clamp(0.0, 1.0)


@register_metric(
    "entropy", description="entropy of the 256-bin luminance histogram, bits (0..8)", higher_is="more information"
)
def entropy(images: torch.Tensor) -> torch.Tensor:
    counts = luminance_histogram(images).to(torch.float64)
    probabilities = counts / counts.sum(dim=1, keepdim=True)
    return (-torch.special.xlogy(probabilities, probabilities).sum(dim=1) / math.log(2.0)).to(images.dtype)


def luminance_percentiles(images: torch.Tensor, quantiles: tuple[float, ...]) -> torch.Tensor:
    """``(B, len(quantiles))`` percentiles of 8-bit-rounded luminance, in ``[0, 1]``.

    The smallest level whose cumulative pixel share reaches each quantile (numpy's ``"inverted_cdf"``).
    """
    cdf = luminance_histogram(images).cumsum(dim=1).to(torch.float64)
    cdf = cdf / cdf[:, -1:]
    targets = torch.tensor(quantiles, dtype=cdf.dtype, device=cdf.device).expand(cdf.shape[0], -1).contiguous()
    levels = torch.searchsorted(cdf, targets - 1e-9).clamp(max=255)  # tolerance for the division's rounding
    return levels.to(images.dtype) / 255.0


@register_metric("shadow_level", description="1st percentile of luminance, 0..1", higher_is="lighter shadows")
def shadow_level(images: torch.Tensor) -> torch.Tensor:
    return luminance_percentiles(images, (0.01,))[:, 0]


@register_metric("highlight_level", description="99th percentile of luminance, 0..1", higher_is="brighter highlights")
def highlight_level(images: torch.Tensor) -> torch.Tensor:
    return luminance_percentiles(images, (0.99,))[:, 0]


@register_metric(
    "colorfulness", description="Hasler-Süsstrunk colourfulness (intensities 0..1)", higher_is="more colourful"
)
def colorfulness(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.new_zeros(images.shape[0])
    red, green, blue = images[:, 0], images[:, 1], images[:, 2]
    rg = red - green
    yb = 0.5 * (red + green) - blue
    spread = torch.sqrt(_spatial_variance(rg) + _spatial_variance(yb))
    centre = torch.sqrt(_spatial_mean(rg).square() + _spatial_mean(yb).square())
    return spread + 0.3 * centre


@register_metric("saturation", description="mean HSV saturation, 0..1", higher_is="more saturated")
def saturation(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.new_zeros(images.shape[0])
    high = images.amax(dim=1)
    low = images.amin(dim=1)
    value = torch.where(high > 0, (high - low) / high.clamp(min=torch.finfo(images.dtype).tiny), torch.zeros_like(high))
    return _spatial_mean(value)


def _channel_mean(index: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def channel_mean(images: torch.Tensor) -> torch.Tensor:
        channel = images[:, 0] if images.shape[1] == 1 else images[:, index]
        return _spatial_mean(channel)

    channel_mean.__qualname__ = f"channel_mean_{'rgb'[index]}"
    return channel_mean


mean_r = register_metric("mean_r", description="mean red value, 0..1", higher_is="redder")(_channel_mean(0))
mean_g = register_metric("mean_g", description="mean green value, 0..1", higher_is="greener")(_channel_mean(1))
mean_b = register_metric("mean_b", description="mean blue value, 0..1", higher_is="bluer")(_channel_mean(2))


@register_metric(
    "dark_fraction", description=f"fraction of pixels with luminance < {DARK_LEVEL}", higher_is="more dark pixels"
)
def dark_fraction(images: torch.Tensor) -> torch.Tensor:
    return _spatial_mean((luminance(images) < DARK_LEVEL).to(images.dtype))


@register_metric(
    "bright_fraction", description=f"fraction of pixels with luminance > {BRIGHT_LEVEL}", higher_is="more bright pixels"
)
def bright_fraction(images: torch.Tensor) -> torch.Tensor:
    return _spatial_mean((luminance(images) > BRIGHT_LEVEL).to(images.dtype))


@register_metric("noise", description="Immerkær noise standard deviation (intensities 0..1)", higher_is="noisier")
def noise(images: torch.Tensor) -> torch.Tensor:
    batch, _, height, width = images.shape
    if height < 3 or width < 3:
        return images.new_zeros(batch)
    # The 3×3 mask [[1,-2,1],[-2,4,-2],[1,-2,1]] is the outer product of [1,-2,1] with itself.
    response = _second_difference(_second_difference(luminance(images), 1), 2)
    return _flat(response).abs().sum(dim=1) * (math.sqrt(math.pi / 2.0) / (6.0 * (width - 2) * (height - 2)))


@register_metric(
    "grayscale_content", description="largest channel difference at any pixel (0 = gray)", higher_is="more colour"
)
def grayscale_content(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        return images.new_zeros(images.shape[0])
    return _flat(images.amax(dim=1) - images.amin(dim=1)).amax(dim=1)


# -- record metrics ----------------------------------------------------------------------------------
@register_metric("width", description="image width, pixels", higher_is="wider", source="record")
def width(samples: pd.DataFrame) -> np.ndarray:
    return samples["width"].to_numpy(dtype=np.int64)


@register_metric("height", description="image height, pixels", higher_is="taller", source="record")
def height(samples: pd.DataFrame) -> np.ndarray:
    return samples["height"].to_numpy(dtype=np.int64)


@register_metric("aspect_ratio", description="width / height", higher_is="wider", source="record")
def aspect_ratio(samples: pd.DataFrame) -> np.ndarray:
    return samples["width"].to_numpy(dtype=np.float64) / samples["height"].to_numpy(dtype=np.float64)


@register_metric("area", description="width × height, pixels", higher_is="larger", source="record")
def area(samples: pd.DataFrame) -> np.ndarray:
    return samples["width"].to_numpy(dtype=np.int64) * samples["height"].to_numpy(dtype=np.int64)


@register_metric("file_size", description="file size, bytes", higher_is="larger file", source="record")
def file_size(samples: pd.DataFrame) -> np.ndarray:
    return samples["file_size"].to_numpy(dtype=np.int64)


@register_metric(
    "channels", description="decoded channels: 1 (grayscale) or 3 (RGB)", higher_is="colour", source="record"
)
def channels(samples: pd.DataFrame) -> np.ndarray:
    return samples["channels"].to_numpy(dtype=np.int64)
