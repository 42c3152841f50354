"""ImageNet-C-style common corruptions, batched in torch, for small (~28–32 px) images.

Every corruption maps a batch ``(B, C, H, W)`` of ``[0, 1]`` floats (``C`` = 1 or 3) to a batch of
the same shape, dtype and device, values in ``[0, 1]``. Use :func:`corrupt` (validated entry point)
or the registry :data:`CORRUPTIONS` (name -> ``fn(images, severity, generator)``).
:func:`corruption_benchmark` evaluates a model on a grid of corruptions × severities.

Randomness comes only from the ``torch.Generator`` passed in (random tensors are drawn on the
generator's device and moved to the images' device, so a CPU generator gives the same corruption on
CPU and CUDA).

Severity constants
------------------
Modelled on the CIFAR-10-C constants of Hendrycks & Dietterich (ICLR 2019, ``make_cifar_c.py``),
which were chosen for 32×32 images; blur sizes are in pixels, so they also suit 28×28 images (on
much larger images they are milder than ImageNet-C). Departures from CIFAR-10-C, made so that
severity is monotone in the mean deviation from the clean image, are marked with *.

==================  ==========================================  =============================================
corruption          severities 1..5                             meaning
==================  ==========================================  =============================================
gaussian_noise      0.04, 0.06, 0.08, 0.09, 0.10                std of additive N(0, s²) noise
shot_noise          500, 250, 100, 75, 50                       photons per unit: Poisson(x·s)/s
impulse_noise       0.01, 0.02, 0.03, 0.05, 0.07                fraction of values set to 0 or 1 (½ each)
defocus_blur        (0.3,0.4) (0.4,0.5) (0.5,0.6) (1,0.2)       (disk radius px, 3×3 Gaussian alias-blur σ),
                    (1.5,0.1)                                   as CIFAR-10-C's cv2 code
motion_blur         (10,1) (10,1.5) (10,2) (10,2.5) (12,3)      (radius px, σ px) of a one-sided Gaussian line
                                                                kernel (ImageMagick-style), angle U(-45°, 45°)
                                                                per image; kernel cut at min(radius, ⌈3σ⌉)
zoom_blur           zooms 1.00..1.05, ..1.10, ..1.15,           mean of the image and its centre zooms
                    ..1.20, ..1.25 (step 0.01)                  (bilinear)
gaussian_blur       0.4, 0.6, 0.7, 0.8, 1.0                     σ px, truncated at 4σ, edge pixels repeated
brightness          0.05, 0.10, 0.15, 0.20, 0.30                added to HSV value (grayscale: to the pixel)
contrast            0.75, 0.50, 0.40, 0.30, 0.15                factor towards the per-channel mean
saturate*           (1.5,0) (2,0) (3,0) (5,0.1) (10,0.2)        HSV saturation → clip(s·a + b); CIFAR-10-C's
                                                                levels 1–2 *de*-saturate (0.3, 0.1), which
                                                                breaks monotonicity, so all levels saturate
fog                 (0.2,3) (0.5,3) (0.75,2.5) (1,2) (1.5,1.75) (strength, wibble decay) of a plasma fractal
                                                                of side the smallest power of two >= max(H, W),
                                                                cropped to H×W (32² at 28–32 px, as CIFAR-10-C
                                                                and imagecorruptions)
pixelate*           0.90, 0.80, 0.70, 0.60, 0.45                exact area-weighted box downscale to
                                                                ⌊s·H⌋×⌊s·W⌋ cells and back (as OpenCV
                                                                ``INTER_AREA``; PIL's ``BOX`` of CIFAR-10-C
                                                                instead gives whole pixels to the cell holding
                                                                their centre); CIFAR-10-C's
                                                                0.95, 0.90, 0.85 (30, 28, 27 px at 32 px) change
                                                                the image by nearly the same amount (grid
                                                                alignment dominates; 0.5 aligns with pixel
                                                                edges), so the levels are spread out here
jpeg_compression    80, 65, 58, 50, 40                          JPEG quality of a real Pillow round trip
elastic_transform*  see :data:`ELASTIC_PARAMS`                  random affine + smooth random displacement
==================  ==========================================  =============================================

``elastic_transform``: CIFAR-10-C trades the affine part *down* while the elastic part grows, which
makes its deviation non-monotone; here both grow. Sizes are fractions of ``min(H, W)``: affine control
points move by up to ``(0.02, 0.035, 0.05, 0.065, 0.08)·S`` px, the displacement field has RMS
``(0.01, 0.02, 0.03, 0.04, 0.05)·S`` px and smoothness σ ``(0.06, 0.05, 0.04, 0.035, 0.03)·S`` px.

Notes on channels: ``saturate`` on a 1-channel image returns it unchanged (saturation is not defined
without colour); ``brightness`` on grayscale adds the constant to the pixel value (HSV value of a
gray pixel is the pixel itself). ``jpeg_compression`` is a real codec round trip through Pillow
(mode ``L`` or ``RGB``, Pillow's default 4:2:0 chroma subsampling, as CIFAR-10-C), one image at a
time on the CPU; it includes 8-bit quantization and is deterministic.

Implementation notes (for speed; results equal the direct computations up to float rounding): the
blurs, pixelate and the smoothing of the elastic displacement field are linear filters that are
separable or a sum of a few separable terms, applied as ``A @ x @ B^T`` with small per-axis matrices
that include the border rule; brightness and saturate use closed forms of the HSV round trip;
impulse noise draws only the hit positions (geometric gaps between hits), a sample with the same
distribution as one uniform draw per value.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from ._common import (
    RobustnessInputError,
    check_images,
    check_int,
    check_labels,
    check_model,
    check_seed,
    eval_mode,
    make_generator,
    model_device,
    predict_labels,
)

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

GAUSSIAN_NOISE_STD = (0.04, 0.06, 0.08, 0.09, 0.10)
SHOT_NOISE_PHOTONS = (500.0, 250.0, 100.0, 75.0, 50.0)
IMPULSE_NOISE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)
DEFOCUS_PARAMS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))
MOTION_PARAMS = ((10, 1.0), (10, 1.5), (10, 2.0), (10, 2.5), (12, 3.0))
ZOOM_MAX = (1.05, 1.10, 1.15, 1.20, 1.25)
GAUSSIAN_BLUR_SIGMA = (0.4, 0.6, 0.7, 0.8, 1.0)
BRIGHTNESS_SHIFT = (0.05, 0.10, 0.15, 0.20, 0.30)
CONTRAST_FACTOR = (0.75, 0.50, 0.40, 0.30, 0.15)
SATURATE_PARAMS = ((1.5, 0.0), (2.0, 0.0), (3.0, 0.0), (5.0, 0.1), (10.0, 0.2))
FOG_PARAMS = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))
PIXELATE_FACTOR = (0.90, 0.80, 0.70, 0.60, 0.45)
JPEG_QUALITY = (80, 65, 58, 50, 40)
#: (displacement RMS, displacement smoothness σ, affine control-point jitter), fractions of min(H, W).
ELASTIC_PARAMS = ((0.01, 0.06, 0.02), (0.02, 0.05, 0.035), (0.03, 0.04, 0.05), (0.04, 0.035, 0.065), (0.05, 0.03, 0.08))

CorruptionFn = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]


# ------------------------------------------------------------------------------------- utilities


def _pad_mode(h: int, w: int, pad: int, preferred: str) -> str:
    """``preferred`` padding if the image is large enough for it, else ``"replicate"``."""
    return preferred if preferred != "reflect" or pad < min(h, w) else "replicate"


# Linear filters as matrices. A filter that is separable (or a short sum of separable terms) maps an
# image ``X`` (``H × W``) to ``Σ_r A_r @ X @ B_r^T``; folding the border rule (replicate / reflect
# padding) into the ``H × H`` and ``W × W`` matrices gives exactly what padding + convolution gives, as
# two dense matrix products per term, which on small images is far faster than a 1-channel conv2d.


def _axis_filter_matrix(taps: torch.Tensor, n: int, pad_mode: str) -> torch.Tensor:
    """``(n, n)`` float64 matrix of a 1-D cross-correlation with odd-length ``taps`` on ``n`` samples.

    Row ``i`` gathers ``Σ_t taps[t] · v[src(i + t - r)]`` where ``r = len(taps) // 2`` and ``src``
    maps padded positions back into ``0..n-1`` as ``F.pad`` does (``"replicate"``: clamp,
    ``"reflect"``: mirror without repeating the edge, needs ``r < n``).
    """
    r = taps.shape[0] // 2
    src = torch.arange(n)[:, None] + torch.arange(-r, r + 1)[None, :]
    if pad_mode == "reflect":
        src = src.abs()
        src = torch.where(src > n - 1, 2 * (n - 1) - src, src)
    else:
        src = src.clamp(0, n - 1)
    out = torch.zeros(n, n, dtype=torch.float64)
    return out.scatter_add_(1, src, taps.to(torch.float64).expand(n, -1).contiguous())


@functools.lru_cache(maxsize=256)
def _filter_terms(
    kernel: tuple[tuple[float, ...], ...], h: int, w: int, pad_mode: str, device: torch.device, dtype: torch.dtype
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """``((A_r, B_r), ...)``: padded 2-D cross-correlation with ``kernel`` (odd ``k × k``) = ``Σ A_r X B_r^T``.

    The kernel is split into rank-one terms by SVD (terms below 1e-10 of the largest dropped), so a
    separable kernel costs one term.
    """
    k = torch.tensor(kernel, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(k)
    terms = []
    for r in range(s.shape[0]):
        if s[r] <= 1e-10 * s[0]:
            break
        a = _axis_filter_matrix(u[:, r] * s[r], h, pad_mode)
        b = _axis_filter_matrix(vh[r], w, pad_mode)
        terms.append((a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)))
    return tuple(terms)


def _apply_terms(x: torch.Tensor, terms: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``Σ_r A_r @ x @ B_r^T`` for ``x`` ``(..., H, W)``, ``A_r`` ``(H', H)``, ``B_r`` ``(W', W)``."""
    out = None
    for a, b in terms:
        term = torch.matmul(a, torch.matmul(x, b.T))
        out = term if out is None else out.add_(term)
    if out is None:
        raise RobustnessInputError("_apply_terms needs at least one (A, B) term")
    return out


def _conv_same(x: torch.Tensor, kernel: torch.Tensor, pad_mode: str = "replicate") -> torch.Tensor:
    """Convolve every channel of ``x`` ``(B, C, H, W)`` with one odd-sized 2-D ``kernel`` ``(k, k)`` (same size out).

    Borders as ``F.pad(mode=pad_mode)`` (``"reflect"`` falls back to ``"replicate"`` on images
    smaller than the kernel radius); computed as matrix products (see :func:`_filter_terms`).
    """
    h, w = x.shape[-2:]
    mode = _pad_mode(h, w, kernel.shape[-1] // 2, pad_mode)
    key = tuple(tuple(float(v) for v in row) for row in kernel.to(torch.float64).tolist())
    return _apply_terms(x, _filter_terms(key, h, w, mode, x.device, x.dtype))


def _conv_per_image(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve image ``b`` of ``x`` ``(B, C, H, W)`` (all channels) with ``kernels[b]`` ``(B, k, k)``.

    Borders: replicate padding.
    """
    b, c, h, w = x.shape
    k = kernels.shape[-1]
    pad = k // 2
    xp = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="replicate")
    weight = kernels.to(x).repeat_interleave(c, dim=0).reshape(b * c, 1, k, k)
    return F.conv2d(xp, weight, groups=b * c).reshape(b, c, h, w)


def _gaussian_1d(sigma: float, radius: int) -> torch.Tensor:
    """Normalized 1-D Gaussian of ``sigma`` on ``[-radius, radius]`` (float64)."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    return k / k.sum()


def _gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, pad_mode: str = "replicate") -> torch.Tensor:
    """Separable Gaussian blur of ``x`` ``(B, C, H, W)`` with ``sigma`` px, kernel radius ``ceil(truncate·sigma)``."""
    radius = max(int(math.ceil(truncate * sigma)), 1)
    k = _gaussian_1d(sigma, radius)
    return _conv_same(x, torch.outer(k, k), pad_mode)


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """RGB ``(B, 3, H, W)`` in ``[0, 1]`` -> HSV ``(B, 3, H, W)``, every component in ``[0, 1]`` (hue in turns)."""
    r, g, b = rgb.unbind(dim=1)
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV ``(B, 3, H, W)`` (components in ``[0, 1]``) -> RGB ``(B, 3, H, W)`` in ``[0, 1]``."""
    h, s, v = hsv.unbind(dim=1)
    h6 = (h % 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = []
    for ch in range(3):
        val = torch.zeros_like(v)
        for k, trio in enumerate(choices):
            val = torch.where(i == k, trio[ch], val)
        out.append(val)
    return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------- the corruptions


def gaussian_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise, std :data:`GAUSSIAN_NOISE_STD` [severity-1]; ``(B, C, H, W)`` -> same."""
    std = GAUSSIAN_NOISE_STD[severity - 1]
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=torch.float32)
    noise = noise.to(images)  # a fresh tensor either way (it is ours to overwrite)
    return noise.mul_(std).add_(images).clamp_(0, 1)


def shot_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Poisson (photon) noise ``Poisson(x·s)/s``, ``s`` = :data:`SHOT_NOISE_PHOTONS` [severity-1]."""
    s = SHOT_NOISE_PHOTONS[severity - 1]
    rates = images.detach().to(device=generator.device, dtype=torch.float32) * s
    # torch.poisson is exact (and dominates the time); the rest works in place on its fresh output
    return torch.poisson(rates, generator=generator).div_(s).to(images).clamp_(0, 1)


def impulse_noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Salt-and-pepper noise: a fraction :data:`IMPULSE_NOISE_AMOUNT` [severity-1] of values set to 0 or 1.

    Every value is hit independently with probability ``amount``, a hit being salt (1) or pepper (0)
    with probability ½ each. Sampled sparsely: the gaps between hits (in row-major order) are
    independent geometric variables, so only about ``amount · numel`` random numbers are drawn.
    """
    amount = IMPULSE_NOISE_AMOUNT[severity - 1]
    out = images.clone(memory_format=torch.contiguous_format)
    positions = _bernoulli_positions(out.numel(), amount, generator)
    salt = torch.rand(positions.shape, generator=generator, device=generator.device, dtype=torch.float32) < 0.5
    out.view(-1)[positions.to(out.device)] = salt.to(device=out.device, dtype=out.dtype)
    return out


def _bernoulli_positions(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    """Sorted int64 indices in ``0..n-1``, each index present independently with probability ``p`` (0 < p < 1).

    Gaps between consecutive hits are i.i.d. ``Geometric(p)`` (failures before a success), drawn by
    inversion ``floor(log(U) / log(1 - p))`` in float64 on the generator's device, in chunks until
    the positions pass ``n``.
    """
    log_q = math.log1p(-p)
    mean = n * p
    chunk = max(16, int(mean + 6 * math.sqrt(mean) + 16))
    parts, last = [], -1
    while True:
        u = torch.rand(chunk, generator=generator, device=generator.device, dtype=torch.float64)
        gaps = torch.floor(torch.log1p(-u) / log_q).clamp_max(float(n)).to(torch.int64)
        pos = last + torch.cumsum(gaps + 1, dim=0)
        parts.append(pos)
        last = int(pos[-1])
        if last >= n:
            break
        chunk = max(16, int((n - last) * p + 6 * math.sqrt((n - last) * p) + 16))
    pos = torch.cat(parts)
    return pos[pos < n]


@functools.lru_cache(maxsize=16)
def _defocus_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """Disk of ``radius`` px blurred by a 3×3 Gaussian of ``alias_blur`` (CIFAR-10-C's ``disk``), normalized.

    Cached: do not modify the returned tensor.
    """
    r = max(int(math.ceil(radius)), 1)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk = disk / disk.sum()
    g = _gaussian_1d(alias_blur, 1)
    g2 = torch.outer(g, g)
    k = F.conv2d(F.pad(disk[None, None], (1, 1, 1, 1)), g2.flip(0, 1)[None, None], padding=1)[0, 0]
    return k / k.sum()


def defocus_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Defocus (disk) blur with :data:`DEFOCUS_PARAMS` [severity-1]; reflect-101 borders as cv2."""
    radius, alias = DEFOCUS_PARAMS[severity - 1]
    return _conv_same(images, _defocus_kernel(radius, alias), pad_mode="reflect").clamp_(0, 1)


def _motion_kernels(n: int, radius: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``n`` one-sided Gaussian line kernels ``(n, k, k)``, random angles in ``[-45°, 45°)``, bilinear splat."""
    reach = max(1, min(int(radius), int(math.ceil(3 * sigma))))
    k = 2 * reach + 1
    angles = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64).cpu() * 90 - 45
    angles = angles * math.pi / 180
    d = torch.arange(reach + 1, dtype=torch.float64)
    wts = torch.exp(-(d**2) / (2 * sigma**2))
    px = reach + d[None, :] * torch.cos(angles)[:, None]  # (n, reach+1) column
    py = reach - d[None, :] * torch.sin(angles)[:, None]  # row (image y grows downwards)
    x0, y0 = px.floor(), py.floor()
    fx, fy = px - x0, py - y0
    kern = torch.zeros(n, k * k, dtype=torch.float64)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi = (x0 + dx).clamp(0, k - 1).long()
        yi = (y0 + dy).clamp(0, k - 1).long()
        kern.scatter_add_(1, yi * k + xi, w * wts[None, :])
    kern = kern.reshape(n, k, k)
    return kern / kern.sum(dim=(1, 2), keepdim=True)


def motion_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Motion blur: one-sided Gaussian line kernel :data:`MOTION_PARAMS` [severity-1], random angle per image."""
    radius, sigma = MOTION_PARAMS[severity - 1]
    kernels = _motion_kernels(images.shape[0], radius, sigma, generator)
    return _conv_per_image(images, kernels).clamp(0, 1)


@functools.lru_cache(maxsize=64)
def _zoom_grid(factor: float, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(1, h, w, 2)`` sampling grid of a centre zoom by ``factor`` (``F.affine_grid``, align_corners=False)."""
    theta = torch.tensor([[[1 / factor, 0, 0], [0, 1 / factor, 0]]], dtype=dtype, device=device)
    return F.affine_grid(theta, [1, 1, h, w], align_corners=False)


def _zoom(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Centre zoom by ``factor`` >= 1 (crop the centre 1/factor, resize back), bilinear; same shape."""
    b, _, h, w = images.shape
    grid = _zoom_grid(float(factor), h, w, images.device, images.dtype).expand(b, h, w, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def zoom_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Zoom blur: mean of the image and its zooms 1.00, 1.01, …, :data:`ZOOM_MAX` [severity-1]."""
    zooms = np.arange(1.0, ZOOM_MAX[severity - 1] + 1e-9, 0.01)
    out = images.clone()
    for z in zooms:
        out += _zoom(images, float(z))
    return out.div_(len(zooms) + 1).clamp_(0, 1)


def gaussian_blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian blur, σ = :data:`GAUSSIAN_BLUR_SIGMA` [severity-1] px."""
    return _gaussian_blur(images, GAUSSIAN_BLUR_SIGMA[severity - 1]).clamp_(0, 1)


def brightness(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Brightness: add :data:`BRIGHTNESS_SHIFT` [severity-1] to the HSV value (grayscale: to the pixel).

    Computed without the HSV round trip: with hue and saturation fixed, every RGB channel is
    proportional to the value ``v = max(r, g, b)``, so the result is ``rgb · v'/v`` with
    ``v' = clip(v + c)``, and the gray ``v'`` where ``v <= 0`` (saturation 0 there); equal to the round
    trip through :func:`rgb_to_hsv` / :func:`hsv_to_rgb` up to float rounding.
    """
    c = BRIGHTNESS_SHIFT[severity - 1]
    if images.shape[1] == 1:
        return (images + c).clamp_(0, 1)
    v = images.amax(dim=1, keepdim=True)
    v_new = (v + c).clamp_(0, 1)
    positive = v > 0
    scale = torch.where(positive, v_new / v.clamp_min(torch.finfo(images.dtype).tiny), 0.0)
    offset = torch.where(positive, 0.0, v_new)
    return torch.addcmul(offset, images, scale).clamp_(0, 1)


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Contrast reduction towards the per-image, per-channel mean by :data:`CONTRAST_FACTOR` [severity-1]."""
    c = CONTRAST_FACTOR[severity - 1]
    means = images.mean(dim=(2, 3), keepdim=True)
    return torch.add(means * (1 - c), images, alpha=c).clamp_(0, 1)


def saturate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Saturation: HSV ``s -> clip(s·a + b)`` with :data:`SATURATE_PARAMS` [severity-1]; grayscale unchanged.

    Computed without the HSV round trip: with hue and value fixed, ``v - channel`` is proportional
    to the saturation, so the result is ``v - (s'/s) · (v - rgb)``; a gray pixel (``s = 0``, hue 0 =
    red) becomes ``v · (1, 1 - s', 1 - s')``. Equal to the round trip through :func:`rgb_to_hsv` /
    :func:`hsv_to_rgb` up to float rounding.
    """
    if images.shape[1] == 1:
        return images.clone()
    a, b = SATURATE_PARAMS[severity - 1]
    tiny = torch.finfo(images.dtype).tiny
    minc, maxc = torch.aminmax(images, dim=1, keepdim=True)
    delta = maxc - minc
    s_old = torch.where(maxc > 0, delta / maxc.clamp_min(tiny), 0.0)
    s_new = (s_old * a + b).clamp_(0, 1)
    colored = (delta > 0) & (maxc > 0)
    # s'/s = s'·v/delta; (v - rgb) <= delta keeps the product bounded by s'·v
    ratio = torch.where(colored, s_new * maxc / delta.clamp_min(tiny), 0.0)
    out = torch.addcmul(maxc, ratio, maxc - images, value=-1.0)
    if b > 0:  # gray pixels: (r, g, b) = v · (1, 1 - s', 1 - s')
        out[:, 1:] -= torch.where(colored, 0.0, s_new * maxc)
    return out.clamp_(0, 1)


def plasma_fractal(n: int, generator: torch.Generator, mapsize: int = 256, wibbledecay: float = 3.0) -> torch.Tensor:
    """``n`` diamond-square plasma fractals ``(n, mapsize, mapsize)`` in ``[0, 1]`` (CIFAR-10-C's algorithm).

    ``mapsize`` must be a power of two; ``wibbledecay`` > 1, larger = smoother. float32 (as the
    reference implementations), computed on the generator's device.
    """
    dev = generator.device
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float32, device=dev)
    step = mapsize
    wibble = 100.0

    def wibbled_mean(a: torch.Tensor) -> torch.Tensor:
        u = torch.rand(a.shape, generator=generator, device=dev, dtype=torch.float32)
        return u.mul_(2 * wibble * wibble).add_(a, alpha=0.25).sub_(wibble * wibble)  # a/4 + wibble·U(±wibble)

    while step >= 2:
        half = step // 2
        corner = m[:, 0::step, 0::step]
        sq = corner + corner.roll(-1, dims=1)
        sq = sq + sq.roll(-1, dims=2)
        m[:, half::step, half::step] = wibbled_mean(sq)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled_mean(dr + dr.roll(1, dims=1) + ul + ul.roll(-1, dims=2))
        m[:, half::step, 0::step] = wibbled_mean(dr + dr.roll(1, dims=2) + ul + ul.roll(-1, dims=1))
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def _fog_mapsize(h: int, w: int) -> int:
    """Side of the plasma fractal for an ``h × w`` image: the smallest power of two >= ``max(h, w)``
    (as ``imagecorruptions``; CIFAR-10-C uses 32 for its 32×32 images)."""
    return 1 << max(1, (max(h, w) - 1).bit_length())


def fog(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Fog: add a plasma fractal (strength, decay) = :data:`FOG_PARAMS` [severity-1], rescale by the old max."""
    strength, decay = FOG_PARAMS[severity - 1]
    b, _, h, w = images.shape
    frac = plasma_fractal(b, generator, _fog_mapsize(h, w), decay)[:, None, :h, :w].to(images)
    max_val = images.amax(dim=(1, 2, 3), keepdim=True)
    out = torch.add(images, frac, alpha=strength)
    return out.mul_(max_val / (max_val + strength)).clamp_(0, 1)


def _area_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` float64 area-resampling matrix: output sample ``i`` is the mean of the input over
    ``[i·n_in/n_out, (i+1)·n_in/n_out)``, input samples being unit-width constant intervals."""
    out_edges = torch.arange(n_out + 1, dtype=torch.float64) * n_in / n_out
    in_edges = torch.arange(n_in + 1, dtype=torch.float64)
    overlap = (
        torch.minimum(out_edges[1:, None], in_edges[None, 1:])
        - torch.maximum(out_edges[:-1, None], in_edges[None, :-1])
    ).clamp_min_(0)
    return overlap / overlap.sum(dim=1, keepdim=True)


@functools.lru_cache(maxsize=64)
def _pixelate_matrix(n: int, cells: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(n, n)`` matrix of one axis of :func:`pixelate`: area-average ``n`` pixels into ``cells`` cells,
    then each pixel takes the area-weighted mean of the cells it overlaps (built in float64)."""
    return (_area_matrix(cells, n) @ _area_matrix(n, cells)).to(device=device, dtype=dtype).contiguous()


def pixelate(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Pixelate: area-downscale by :data:`PIXELATE_FACTOR` [severity-1] and area-upscale back.

    Exact fractional box filtering (pixels are constant squares): a cell averages the pixel areas it
    covers, and a pixel averages the cell areas it covers, as OpenCV's ``INTER_AREA`` both ways (PIL's
    ``BOX`` differs: it gives each whole pixel to the cell that holds its centre). The filter is
    separable and linear, so it is applied as ``A_h @ x @ A_w^T`` with the per-axis matrices.
    """
    c = PIXELATE_FACTOR[severity - 1]
    h, w = images.shape[-2:]
    a_h = _pixelate_matrix(h, max(1, int(h * c)), images.device, images.dtype)
    a_w = _pixelate_matrix(w, max(1, int(w * c)), images.device, images.dtype)
    return torch.matmul(a_h, torch.matmul(images, a_w.T)).clamp_(0, 1)


def jpeg_compression(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Real JPEG round trip through Pillow at quality :data:`JPEG_QUALITY` [severity-1] (CPU, per image)."""
    quality = JPEG_QUALITY[severity - 1]
    b, c, h, w = images.shape
    mode = "L" if c == 1 else "RGB"
    pixels = (images.detach().to(device="cpu", dtype=torch.float32).clamp(0, 1) * 255).round_().to(torch.uint8)
    arr = pixels.permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, C) uint8
    out = np.empty(arr.shape, dtype=np.uint8)
    buf = io.BytesIO()
    for i in range(b):
        pil = Image.frombuffer(mode, (w, h), arr[i], "raw", mode, 0, 1)
        buf.seek(0)
        buf.truncate()
        pil.save(buf, format="JPEG", quality=quality)
        # decode with Pillow's JPEG decoder directly (same libjpeg decode as Image.open, less overhead)
        decoded = Image.frombytes(mode, (w, h), buf.getvalue(), "jpeg", mode, "")
        out[i] = np.asarray(decoded).reshape(h, w, c)
    result = torch.from_numpy(out).permute(0, 3, 1, 2)
    return result.to(device=images.device, dtype=images.dtype, memory_format=torch.contiguous_format).div_(255)


def elastic_transform(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Random affine warp composed with a smooth random displacement field, :data:`ELASTIC_PARAMS` [severity-1].

    Output pixel ``p`` samples the input at ``A(p + d(p))`` (bilinear, reflected borders), where ``A``
    moves three control points by ``U(-a, a)`` px and ``d`` is uniform noise blurred by σ and scaled to
    the given RMS (pixels; all three sizes are fractions of ``min(H, W)``).
    """
    rms_f, sigma_f, affine_f = ELASTIC_PARAMS[severity - 1]
    b, _, h, w = images.shape
    size = min(h, w)
    rms, sigma, jitter = rms_f * size, max(sigma_f * size, 0.5), affine_f * size
    dt = torch.float64
    # affine (float64, tiny): solve N with N·[q, 1] = p for the three jittered control points q of the points p
    cy, cx, sq = h / 2.0, w / 2.0, max(size // 3, 1)
    pts = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy + sq]], dtype=dt)
    moved = (
        pts[None]
        + (torch.rand((b, 3, 2), generator=generator, device=generator.device, dtype=dt).cpu() * 2 - 1) * jitter
    )
    lhs = torch.cat([moved, torch.ones(b, 3, 1, dtype=dt)], dim=2)  # (b, 3, 3)
    n_t = torch.linalg.solve(lhs, pts[None].expand(b, 3, 2))  # (b, 3, 2): [x y 1] @ n_t = src
    # fold the pixel -> [-1, 1] grid normalization (align_corners=True) into the affine map
    n_t = n_t * torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], dtype=dt)
    n_t[:, 2] -= 1
    work = torch.promote_types(images.dtype, torch.float32)
    coef = n_t.to(device=images.device, dtype=work)[:, :, None, None, :]  # (b, 3, 1, 1, 2)
    # smooth displacement field with unit RMS, then scaled
    field = torch.rand((b, 2, h, w), generator=generator, device=generator.device, dtype=torch.float32)
    field = field.to(device=images.device, dtype=work).mul_(2).sub_(1)
    field = _gaussian_blur(field, sigma, truncate=3.0, pad_mode="reflect")
    field = field - field.mean(dim=(2, 3), keepdim=True)
    field = field.mul_((rms / math.sqrt(2)) / field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12))
    xs = torch.arange(w, dtype=work, device=images.device)
    ys = torch.arange(h, dtype=work, device=images.device)[:, None]
    px = field[:, 0].add_(xs)[..., None]  # (b, h, w, 1)
    py = field[:, 1].add_(ys)[..., None]
    grid = (px * coef[:, 0] + py * coef[:, 1]).add_(coef[:, 2])  # (b, h, w, 2)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)
    return out.clamp_(0, 1)


#: name -> ``fn(images (B, C, H, W) in [0, 1], severity 1..5, generator) -> corrupted images``.
CORRUPTIONS: dict[str, CorruptionFn] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "motion_blur": motion_blur,
    "zoom_blur": zoom_blur,
    "gaussian_blur": gaussian_blur,
    "brightness": brightness,
    "contrast": contrast,
    "saturate": saturate,
    "fog": fog,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "elastic_transform": elastic_transform,
}


def _check_severity(severity: object) -> int:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or int(severity) not in SEVERITIES:
        raise RobustnessInputError(f"severity must be an integer in 1..5; got {severity!r}")
    return int(severity)


def _check_name(name: object) -> str:
    if name not in CORRUPTIONS:
        raise RobustnessInputError(f"unknown corruption {name!r}; expected one of {sorted(CORRUPTIONS)}")
    return str(name)


def corrupt(
    images: torch.Tensor, name: str, severity: int, generator: torch.Generator | int | None = None
) -> torch.Tensor:
    """Apply one corruption to a batch.

    Parameters
    ----------
    images:
        ``(B, C, H, W)`` float tensor in ``[0, 1]``, ``C`` = 1 (grayscale) or 3 (RGB), any device.
    name:
        Key of :data:`CORRUPTIONS`.
    severity:
        1 (mildest) … 5 (strongest); constants in the module docstring.
    generator:
        Source of randomness: a ``torch.Generator`` (advanced by the call), an int seed, or ``None``
        (= seed 0). Deterministic corruptions ignore it.

    Returns
    -------
    torch.Tensor
        Corrupted images, same shape, dtype and device, values in ``[0, 1]``.
    """
    check_images(images)
    if images.shape[1] not in (1, 3):
        raise RobustnessInputError(f"corruptions need 1 or 3 channels; got images of shape {tuple(images.shape)}")
    name = _check_name(name)
    severity = _check_severity(severity)
    gen = make_generator(generator)
    with torch.no_grad():
        out = CORRUPTIONS[name](images.detach(), severity, gen)
    return out.to(dtype=images.dtype)


# ------------------------------------------------------------------------------------- benchmark


@dataclass
class CorruptionBenchmark:
    """Result of :func:`corruption_benchmark`.

    Attributes
    ----------
    clean_accuracy, clean_error:
        On the uncorrupted images (``error = 1 - accuracy``).
    table:
        One row per (corruption, severity): ``corruption``, ``severity``, ``accuracy``, ``error``,
        ``relative_error`` (= ``error - clean_error``; the "relative corruption error" of
        Hendrycks & Dietterich without the AlexNet normalization) and ``flip_rate`` (fraction of
        samples whose prediction differs from their clean prediction).
    summary:
        One row per corruption: means over the evaluated severities of the ``table`` columns.
    first_flip_severity:
        ``(N, n_corruptions)`` DataFrame: lowest evaluated severity at which the sample's prediction
        differs from its clean prediction, NaN if it never flips.
    clean_predictions:
        ``(N,)`` int array.
    predictions:
        ``(n_corruptions, n_severities, N)`` int array of predictions on the corrupted images,
        axes ordered as ``names`` and ``severities``.
    names, severities:
        What was evaluated, in order.
    """

    clean_accuracy: float
    clean_error: float
    table: pd.DataFrame
    summary: pd.DataFrame
    first_flip_severity: pd.DataFrame
    clean_predictions: np.ndarray
    predictions: np.ndarray
    names: list[str] = field(default_factory=list)
    severities: list[int] = field(default_factory=list)


def corruption_benchmark(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    names: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 128,
    random_state: int = 0,
) -> CorruptionBenchmark:
    """Accuracy, error, relative error and prediction flips of ``model`` under corruptions.

    Parameters
    ----------
    model:
        ``nn.Module`` mapping ``(B, C, H, W)`` images in ``[0, 1]`` to logits ``(B, K)``; run in eval mode
        (previous mode restored afterwards) on its own device (batches are moved there).
    images:
        ``(N, C, H, W)`` float tensor in ``[0, 1]``, ``C`` = 1 or 3.
    labels:
        ``(N,)`` integer class labels.
    names:
        Corruptions to evaluate (keys of :data:`CORRUPTIONS`); ``None`` = all, in registry order.
    severities:
        Severities to evaluate, each in 1..5 (sorted ascending in the result).
    batch_size:
        Images corrupted and classified at a time.
    random_state:
        Seed. The noise of a batch depends on (random_state, corruption name, severity, batch index),
        so it does not depend on which other corruptions are requested, but does depend on ``batch_size``.
    """
    check_model(model)
    check_images(images)
    if images.shape[1] not in (1, 3):
        raise RobustnessInputError(f"corruptions need 1 or 3 channels; got images of shape {tuple(images.shape)}")
    n = images.shape[0]
    labels_t = check_labels(labels, n, torch.device("cpu"))
    names = list(CORRUPTIONS) if names is None else [_check_name(x) for x in names]
    if not names:
        raise RobustnessInputError("names must list at least one corruption; got an empty list")
    sevs = sorted({_check_severity(s) for s in severities})
    if not sevs:
        raise RobustnessInputError("severities must list at least one severity in 1..5; got an empty list")
    batch_size = check_int(batch_size, "batch_size")
    check_seed(random_state)

    device = model_device(model, images.device)
    preds = np.empty((len(names), len(sevs), n), dtype=np.int64)
    with eval_mode(model), torch.no_grad():
        clean_pred = torch.cat(
            [predict_labels(model, images[i : i + batch_size].to(device)).cpu() for i in range(0, n, batch_size)]
        ).numpy()
        for a, name in enumerate(names):
            for s_i, sev in enumerate(sevs):
                for bi, start in enumerate(range(0, n, batch_size)):
                    batch = images[start : start + batch_size].to(device)
                    gen = make_generator(int(random_state), name, sev, bi)
                    corrupted = CORRUPTIONS[name](batch, sev, gen)
                    preds[a, s_i, start : start + batch_size] = predict_labels(model, corrupted).cpu().numpy()

    y = labels_t.numpy()
    clean_err = float(np.mean(clean_pred != y))
    rows = []
    for a, name in enumerate(names):
        for s_i, sev in enumerate(sevs):
            err = float(np.mean(preds[a, s_i] != y))
            rows.append(
                {
                    "corruption": name,
                    "severity": sev,
                    "accuracy": 1.0 - err,
                    "error": err,
                    "relative_error": err - clean_err,
                    "flip_rate": float(np.mean(preds[a, s_i] != clean_pred)),
                }
            )
    table = pd.DataFrame(rows)
    summary = table.drop(columns="severity").groupby("corruption", sort=False).mean().reset_index()
    flips = preds != clean_pred[None, None, :]  # (names, sevs, N)
    first = np.full((n, len(names)), np.nan)
    for a in range(len(names)):
        any_flip = flips[a].any(axis=0)
        first_idx = flips[a].argmax(axis=0)
        first[any_flip, a] = np.asarray(sevs, dtype=float)[first_idx[any_flip]]
    return CorruptionBenchmark(
        clean_accuracy=1.0 - clean_err,
        clean_error=clean_err,
        table=table,
        summary=summary,
        first_flip_severity=pd.DataFrame(first, columns=names),
        clean_predictions=clean_pred,
        predictions=preds,
        names=names,
        severities=sevs,
    )
