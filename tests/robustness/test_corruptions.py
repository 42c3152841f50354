"""Corruptions: shape/range/determinism/monotonicity, the benchmark, fast paths against direct
computations, and each corruption against an independent library implementation on the same inputs."""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustlens.analysis.robustness import CORRUPTIONS, RobustnessInputError, corrupt, corruption_benchmark
from robustlens.analysis.robustness import corruptions as C
from robustlens.analysis.robustness.corruptions import SEVERITIES, hsv_to_rgb, plasma_fractal, rgb_to_hsv

STOCHASTIC = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog", "elastic_transform"}


def natural_like(n: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random images with some texture (closer to photos than white noise), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    x = x + 0.15 * torch.sin(2 * math.pi * (3 * xx + 2 * yy) + phase)
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def rgb():
    return natural_like(12, 3, 32)


@pytest.fixture(scope="module")
def gray():
    return natural_like(12, 1, 28, seed=1)


def test_registry_has_the_fourteen_corruptions():
    assert set(CORRUPTIONS) == {
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "defocus_blur",
        "motion_blur",
        "zoom_blur",
        "gaussian_blur",
        "brightness",
        "contrast",
        "saturate",
        "fog",
        "pixelate",
        "jpeg_compression",
        "elastic_transform",
    }


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_range_determinism(name, channels, rgb, gray):
    x = rgb if channels == 3 else gray
    for severity in (1, 5):
        a = corrupt(x, name, severity, torch.Generator().manual_seed(7))
        b = corrupt(x, name, severity, torch.Generator().manual_seed(7))
        assert a.shape == x.shape and a.dtype == x.dtype and a.device == x.device
        assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
        assert torch.equal(a, b), "same generator seed must give the same corruption"
        assert torch.isfinite(a).all()
    if name in STOCHASTIC:
        c = corrupt(x, name, 3, torch.Generator().manual_seed(8))
        assert not torch.equal(c, corrupt(x, name, 3, torch.Generator().manual_seed(7)))


# saturate on grayscale is the identity (tested below), so that one pair is left out.
@pytest.mark.parametrize(
    "name,channels", [(n, c) for n in sorted(CORRUPTIONS) for c in (1, 3) if not (n == "saturate" and c == 1)]
)
def test_severity_monotone_on_average(name, channels, rgb, gray):
    x = rgb if channels == 3 else gray
    dev = [float((corrupt(x, name, s, torch.Generator().manual_seed(0)) - x).abs().mean()) for s in range(1, 6)]
    assert dev[0] > 0
    assert all(a < b for a, b in zip(dev, dev[1:], strict=False)), (
        f"{name}: mean |corrupted - clean| per severity {dev}"
    )


def test_saturate_grayscale_is_identity(gray):
    assert torch.equal(corrupt(gray, "saturate", 5), gray)


def test_hsv_round_trip(rgb):
    back = hsv_to_rgb(rgb_to_hsv(rgb))
    assert torch.allclose(back, rgb, atol=1e-5)


def test_plasma_fractal_range_and_seed():
    a = plasma_fractal(2, torch.Generator().manual_seed(0), mapsize=64)
    b = plasma_fractal(2, torch.Generator().manual_seed(0), mapsize=64)
    assert torch.equal(a, b) and a.shape == (2, 64, 64)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0


def test_int_seed_and_default_generator(rgb):
    assert torch.equal(corrupt(rgb, "gaussian_noise", 2, 5), corrupt(rgb, "gaussian_noise", 2, 5))
    assert torch.equal(corrupt(rgb, "gaussian_noise", 2), corrupt(rgb, "gaussian_noise", 2, 0))


def test_validation(rgb):
    with pytest.raises(RobustnessInputError, match="unknown corruption"):
        corrupt(rgb, "snow", 1)
    with pytest.raises(RobustnessInputError, match="severity"):
        corrupt(rgb, "fog", 6)
    with pytest.raises(RobustnessInputError, match="1 or 3 channels"):
        corrupt(torch.rand(2, 2, 8, 8), "fog", 1)
    with pytest.raises(RobustnessInputError, match=r"\[0, 1\]"):
        corrupt(rgb * 255, "fog", 1)


def test_corruption_benchmark(tiny_task):
    model, x, y = tiny_task.model, tiny_task.x_test[:48], tiny_task.y_test[:48]
    names = ["gaussian_noise", "contrast", "pixelate"]
    res = corruption_benchmark(model, x, y, names=names, severities=[1, 3, 5], batch_size=20, random_state=0)
    again = corruption_benchmark(model, x, y, names=names, severities=[1, 3, 5], batch_size=20, random_state=0)
    assert np.array_equal(res.predictions, again.predictions)
    assert res.table.shape[0] == 9 and list(res.table.columns) == [
        "corruption",
        "severity",
        "accuracy",
        "error",
        "relative_error",
        "flip_rate",
    ]
    with torch.no_grad():
        clean_pred = model(x).argmax(1).numpy()
    assert res.clean_accuracy == pytest.approx(np.mean(clean_pred == y.numpy()))
    np.testing.assert_allclose(res.table["relative_error"], res.table["error"] - res.clean_error)
    np.testing.assert_allclose(res.table["accuracy"] + res.table["error"], 1.0)
    # recompute one cell by hand: the noise of batch i is seeded by (random_state, name, severity, i)
    from robustlens.analysis.robustness._common import make_generator

    preds = []
    for bi, start in enumerate(range(0, 48, 20)):
        cx = CORRUPTIONS["gaussian_noise"](x[start : start + 20], 3, make_generator(0, "gaussian_noise", 3, bi))
        with torch.no_grad():
            preds.append(model(cx).argmax(1).numpy())
    preds = np.concatenate(preds)
    row = res.table[(res.table.corruption == "gaussian_noise") & (res.table.severity == 3)].iloc[0]
    assert row["flip_rate"] == pytest.approx(np.mean(preds != clean_pred))
    # first flip severity: NaN iff never flips, else the smallest evaluated severity that flips
    ff = res.first_flip_severity
    assert list(ff.columns) == names and ff.shape == (48, 3)
    for a, name in enumerate(names):
        flips = res.predictions[a] != clean_pred[None, :]
        for i in range(48):
            if flips[:, i].any():
                assert ff[name].iloc[i] == [1, 3, 5][int(np.argmax(flips[:, i]))]
            else:
                assert np.isnan(ff[name].iloc[i])
    # stronger contrast reduction hurts at least as much on this model
    acc = res.table.set_index(["corruption", "severity"])["accuracy"]
    assert acc[("contrast", 5)] <= acc[("contrast", 1)]


def test_benchmark_noise_independent_of_other_requested_corruptions(tiny_task):
    model, x, y = tiny_task.model, tiny_task.x_test[:16], tiny_task.y_test[:16]
    alone = corruption_benchmark(model, x, y, names=["shot_noise"], severities=[5])
    both = corruption_benchmark(model, x, y, names=["contrast", "shot_noise"], severities=[5])
    assert np.array_equal(alone.predictions[0], both.predictions[1])


# ------------------------------------------------------------------------------------------------
# The fast implementations against the straightforward ones they replaced (kept here as references).


def special_pixels(dtype=torch.float64) -> torch.Tensor:
    """Random RGB images plus black, gray, white, pure, near-gray and slightly negative pixels."""
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    x[0, :, 0, :4] = 0.0
    x[0, :, 1, :4] = 0.5
    x[0, :, 2, :4] = 1.0
    x[0, :, 3, 0] = torch.tensor([1.0, 0.0, 0.0], dtype=dtype)
    x[0, :, 3, 1] = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)
    x[0, :, 3, 2] = torch.tensor([0.0, 0.0, 1.0], dtype=dtype)
    x[0, :, 4, 0] = torch.tensor([0.3, 0.3 + 1e-6, 0.3], dtype=dtype)
    x[0, :, 4, 1] = torch.tensor([-5e-6, -5e-6, -5e-6], dtype=dtype)
    x[0, :, 4, 2] = torch.tensor([0.2, 0.2, 0.7], dtype=dtype)
    return x


def conv_reference(x: torch.Tensor, kernel: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Pad + 1-channel conv2d, as the blurs were computed before they became matrix products."""
    b, c, h, w = x.shape
    pad = kernel.shape[-1] // 2
    mode = pad_mode if pad_mode != "reflect" or pad < min(h, w) else "replicate"
    xp = F.pad(x.reshape(b * c, 1, h, w), (pad, pad, pad, pad), mode=mode)
    return F.conv2d(xp, kernel.to(x)[None, None]).reshape(b, c, h, w)


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 28, 28), (2, 3, 9, 20), (2, 3, 2, 3)])
def test_blurs_equal_padded_convolution(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    for s in SEVERITIES:
        radius, alias = C.DEFOCUS_PARAMS[s - 1]
        expected = conv_reference(x, C._defocus_kernel(radius, alias), "reflect").clamp(0, 1)
        torch.testing.assert_close(C.defocus_blur(x, s, g), expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(C.defocus_blur(x.float(), s, g), expected.float(), atol=1e-6, rtol=0)
        sigma = C.GAUSSIAN_BLUR_SIGMA[s - 1]
        k = C._gaussian_1d(sigma, max(math.ceil(4 * sigma), 1))
        expected = conv_reference(x, torch.outer(k, k), "replicate").clamp(0, 1)
        torch.testing.assert_close(C.gaussian_blur(x, s, g), expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(C.gaussian_blur(x.float(), s, g), expected.float(), atol=1e-6, rtol=0)
    for sigma in (0.3, 1.5, 4.0):  # elastic's smoothing (reflect, 3σ)
        k = C._gaussian_1d(sigma, max(math.ceil(3 * sigma), 1))
        expected = conv_reference(x, torch.outer(k, k), "reflect")
        torch.testing.assert_close(C._gaussian_blur(x, sigma, 3.0, "reflect"), expected, atol=1e-12, rtol=0)


def area_resample_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) exact area resampling, written pixel by pixel in numpy: output i averages the input
    over [i·n_in/n_out, (i+1)·n_in/n_out), each input sample a unit-width constant interval."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = i * n_in / n_out, (i + 1) * n_in / n_out
        for j in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            m[i, j] = min(hi, j + 1) - max(lo, j)
    return m / m.sum(axis=1, keepdims=True)


def pixelate_reference(images: torch.Tensor, severity: int) -> torch.Tensor:
    """Exact fractional box filter down to ⌊c·H⌋ × ⌊c·W⌋ cells and back, as dense numpy matrices."""
    c = C.PIXELATE_FACTOR[severity - 1]
    h, w = images.shape[-2:]
    hc, wc = max(1, int(h * c)), max(1, int(w * c))
    a_h = area_resample_matrix(hc, h) @ area_resample_matrix(h, hc)
    a_w = area_resample_matrix(wc, w) @ area_resample_matrix(w, wc)
    return torch.from_numpy(np.einsum("ij,bcjk,lk->bcil", a_h, images.double().numpy(), a_w)).clamp(0, 1)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 28, 28), (2, 3, 17, 40), (2, 3, 5, 7), (2, 1, 1, 3)])
def test_pixelate_matrices_equal_exact_area_box_filter(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s in SEVERITIES:
        expected = pixelate_reference(x, s)
        torch.testing.assert_close(C.pixelate(x, s, None), expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(C.pixelate(x.float(), s, None), expected.float(), atol=1e-6, rtol=0)


def test_zoom_blur_equals_per_batch_affine_grids(rgb):
    for s in SEVERITIES:
        zooms = np.arange(1.0, C.ZOOM_MAX[s - 1] + 1e-9, 0.01)
        out = rgb.clone()
        for z in zooms:
            theta = torch.tensor([[1 / z, 0, 0], [0, 1 / z, 0]], dtype=rgb.dtype)
            grid = F.affine_grid(theta.expand(rgb.shape[0], 2, 3), list(rgb.shape), align_corners=False)
            out = out + F.grid_sample(rgb, grid, mode="bilinear", padding_mode="border", align_corners=False)
        expected = (out / (len(zooms) + 1)).clamp(0, 1)
        torch.testing.assert_close(C.zoom_blur(rgb, s, None), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-6)])
def test_brightness_and_saturate_equal_hsv_round_trip(dtype, tol):
    x = special_pixels(dtype)
    for s in SEVERITIES:
        c = C.BRIGHTNESS_SHIFT[s - 1]
        hsv = rgb_to_hsv(x)
        hsv = torch.stack([hsv[:, 0], hsv[:, 1], (hsv[:, 2] + c).clamp(0, 1)], dim=1)
        torch.testing.assert_close(C.brightness(x, s, None), hsv_to_rgb(hsv).clamp(0, 1), atol=tol, rtol=0)
        a, b = C.SATURATE_PARAMS[s - 1]
        hsv = rgb_to_hsv(x)
        hsv = torch.stack([hsv[:, 0], (hsv[:, 1] * a + b).clamp(0, 1), hsv[:, 2]], dim=1)
        torch.testing.assert_close(C.saturate(x, s, None), hsv_to_rgb(hsv).clamp(0, 1), atol=tol, rtol=0)


def test_jpeg_equals_pillow_file_round_trip(rgb, gray):
    import io

    from PIL import Image

    for x in (rgb, gray):
        for s in (1, 5):
            arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            expected = []
            for img in arr:
                pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
                buf = io.BytesIO()
                pil.save(buf, format="JPEG", quality=C.JPEG_QUALITY[s - 1])
                buf.seek(0)
                with Image.open(buf) as decoded:
                    dec = np.asarray(decoded.convert(pil.mode), dtype=np.float32) / 255.0
                expected.append(dec[..., None] if dec.ndim == 2 else dec)
            expected = torch.from_numpy(np.stack(expected)).permute(0, 3, 1, 2)
            assert torch.equal(C.jpeg_compression(x, s, None), expected)


def elastic_reference(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """elastic_transform as it was (float64 throughout, 2-D convolution), same random draws."""
    rms_f, sigma_f, affine_f = C.ELASTIC_PARAMS[severity - 1]
    b, _, h, w = images.shape
    size = min(h, w)
    rms, sigma, jitter = rms_f * size, max(sigma_f * size, 0.5), affine_f * size
    dt = torch.float64
    cy, cx, sq = h / 2.0, w / 2.0, max(size // 3, 1)
    pts = torch.tensor([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy + sq]], dtype=dt)
    moved = pts[None] + (torch.rand((b, 3, 2), generator=generator, dtype=dt) * 2 - 1) * jitter
    n_t = torch.linalg.solve(torch.cat([moved, torch.ones(b, 3, 1, dtype=dt)], dim=2), pts[None].expand(b, 3, 2))
    field = torch.rand((b, 2, h, w), generator=generator, dtype=torch.float32) * 2 - 1
    radius = max(int(math.ceil(3.0 * sigma)), 1)
    k = C._gaussian_1d(sigma, radius)
    field = conv_reference(field.double(), torch.outer(k, k), "reflect")
    field = field - field.mean(dim=(2, 3), keepdim=True)
    field = field / field.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12) * (rms / math.sqrt(2))
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dt), torch.arange(w, dtype=dt), indexing="ij")
    homog = torch.stack([xs[None] + field[:, 0], ys[None] + field[:, 1], torch.ones(b, h, w, dtype=dt)], dim=-1)
    src = homog @ n_t[:, None]
    grid = torch.stack([2 * src[..., 0] / max(w - 1, 1) - 1, 2 * src[..., 1] / max(h - 1, 1) - 1], dim=-1)
    out = F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)
    return out.clamp(0, 1)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 28, 28), (2, 3, 17, 40)])
def test_elastic_equals_float64_convolution_version(shape):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for s in SEVERITIES:
        expected = elastic_reference(x, s, torch.Generator().manual_seed(s))
        torch.testing.assert_close(
            C.elastic_transform(x, s, torch.Generator().manual_seed(s)), expected, atol=1e-10, rtol=0
        )
        got32 = C.elastic_transform(x.float(), s, torch.Generator().manual_seed(s))
        torch.testing.assert_close(got32, expected.float(), atol=5e-5, rtol=0)


def test_impulse_noise_statistics():
    x = torch.full((64, 3, 32, 32), 0.5)
    n = x.numel()
    for s in SEVERITIES:
        amount = C.IMPULSE_NOISE_AMOUNT[s - 1]
        out = C.impulse_noise(x, s, torch.Generator().manual_seed(s))
        hit = out != 0.5
        assert set(out[hit].unique().tolist()) <= {0.0, 1.0}
        frac = float(hit.float().mean())
        assert abs(frac - amount) < 5 * math.sqrt(amount * (1 - amount) / n)
        salt = float((out[hit] == 1).float().mean())
        assert abs(salt - 0.5) < 5 * math.sqrt(0.25 / max(int(hit.sum()), 1))
        # spread evenly (no bias to where the chunks of geometric gaps start or end)
        per_image = hit.flatten(1).float().mean(1)
        assert float(per_image.std()) < 3 * math.sqrt(amount * (1 - amount) / (n / 64))


@pytest.mark.slow
def test_bernoulli_positions_are_independent_bernoulli():
    g = torch.Generator().manual_seed(0)
    reps, n, p = 20000, 12, 0.3
    hits = torch.zeros(reps, n)
    for r in range(reps):
        pos = C._bernoulli_positions(n, p, g)
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or (int(pos.min()) >= 0 and int(pos.max()) < n))
        hits[r, pos] = 1
    tol = 5 * math.sqrt(p * (1 - p) / reps)
    assert float((hits.mean(0) - p).abs().max()) < tol  # each position ~ p
    pairs = (hits[:, :-1] * hits[:, 1:]).mean(0)  # neighbours independent
    assert float((pairs - p * p).abs().max()) < 5 * math.sqrt(p * p / reps)
    assert float((hits[:, 0] * hits[:, -1]).mean() - p * p) < 5 * math.sqrt(p * p / reps)


def test_fog_mapsize_fits_the_image():
    assert C._fog_mapsize(32, 32) == 32 and C._fog_mapsize(28, 28) == 32
    assert C._fog_mapsize(33, 8) == 64 and C._fog_mapsize(17, 40) == 64 and C._fog_mapsize(1, 1) == 2
    x = natural_like(3, 3, 28)
    assert corrupt(x, "fog", 5, 0).shape == x.shape


# ------------------------------------------------------------------------------------------------
# Against independent implementations in the test dependencies (scipy, OpenCV, Pillow, colorsys), on
# the same images and parameters. The few lines of CIFAR-10-C (make_cifar_c.py, also in
# imagecorruptions) that build a kernel or a fractal are copied here; where imagecorruptions is
# installed (the `bench` extra) the copies are checked against it, elsewhere only that check skips.


def reference_images(channels: int, size: int) -> torch.Tensor:
    """4 smooth textured images and 2 white-noise images (every spatial frequency), float64 in [0, 1]."""
    smooth = natural_like(4, channels, size, seed=10 + channels)
    noise = torch.rand(2, channels, size, size, generator=torch.Generator().manual_seed(size))
    return torch.cat([smooth, noise]).double()


IMAGE_KINDS = [(3, 32), (1, 28)]  # (channels, side): CIFAR-like RGB and MNIST-like grayscale


def per_plane(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D numpy function to every (image, channel) plane of ``x``; float64 tensor out."""
    return torch.from_numpy(np.stack([[fn(p) for p in img] for img in x.double().numpy()]).astype(np.float64))


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_gaussian_blur_equals_scipy_and_opencv(channels, size):
    from scipy.ndimage import gaussian_filter

    x = reference_images(channels, size)
    for s in SEVERITIES:
        sigma = C.GAUSSIAN_BLUR_SIGMA[s - 1]
        r = math.ceil(4 * sigma)  # "truncated at 4σ": radius ⌈4σ⌉; "edge pixels repeated" = nearest
        ours = C.gaussian_blur(x, s, None)
        ref = torch.from_numpy(gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode="nearest", radius=r))
        # float64 on both sides, only the summation order differs
        torch.testing.assert_close(ours, ref.clamp(0, 1), atol=1e-12, rtol=0)
        ref_cv = per_plane(
            lambda p, r=r, sigma=sigma: cv2.GaussianBlur(
                p, (2 * r + 1, 2 * r + 1), sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE
            ),
            x,
        )
        torch.testing.assert_close(ours, ref_cv.clamp(0, 1), atol=1e-12, rtol=0)
        # float32 images: float32 rounding of ~20 products per pixel
        torch.testing.assert_close(C.gaussian_blur(x.float(), s, None), ref.float().clamp(0, 1), atol=1e-6, rtol=0)
        # scipy's default cut (radius round(4σ): 2 instead of 3 at σ = 0.6) only drops taps below 1e-5
        default = gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode="nearest", truncate=4.0)
        assert np.abs(ours.numpy() - default).max() < 1e-5


def cifar_c_disk(radius: float, alias_blur: float = 0.1, dtype=np.float32) -> np.ndarray:
    """``disk`` of CIFAR-10-C / imagecorruptions (their code, names aside): the defocus kernel."""
    if radius <= 8:
        grid, ksize = np.arange(-8, 8 + 1), (3, 3)
    else:
        grid, ksize = np.arange(-radius, radius + 1), (5, 5)
    xx, yy = np.meshgrid(grid, grid)
    aliased_disk = np.array((xx**2 + yy**2) <= radius**2, dtype=dtype)
    aliased_disk /= np.sum(aliased_disk)
    return cv2.GaussianBlur(aliased_disk, ksize=ksize, sigmaX=alias_blur)


def test_cifar_c_disk_copy_is_imagecorruptions():
    reference = pytest.importorskip("imagecorruptions.corruptions")
    for radius, alias in C.DEFOCUS_PARAMS:
        np.testing.assert_array_equal(cifar_c_disk(radius, alias), reference.disk(radius, alias))


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_defocus_blur_equals_cifar_c_disk_through_opencv_filter2d(channels, size):
    x = reference_images(channels, size)
    for s in SEVERITIES:
        kernel = cifar_c_disk(*C.DEFOCUS_PARAMS[s - 1])
        # as CIFAR-10-C: cv2.filter2D per channel, default border (reflect-101), then clip
        ref = per_plane(lambda p, k=kernel: cv2.filter2D(p, -1, k), x).clamp(0, 1)
        # the reference kernel is float32 (relative error ~6e-8 per tap on a sum of weight 1)
        torch.testing.assert_close(C.defocus_blur(x, s, None), ref, atol=1e-6, rtol=0)
        torch.testing.assert_close(C.defocus_blur(x.float(), s, None), ref.float(), atol=2e-6, rtol=0)


def test_motion_blur_equals_opencv_filter2d_with_one_sided_gaussian_line_kernels():
    x = reference_images(3, 32)
    b = x.shape[0]
    for s in SEVERITIES:
        radius, sigma = C.MOTION_PARAMS[s - 1]
        kernels = C._motion_kernels(b, radius, sigma, torch.Generator().manual_seed(s)).numpy()
        ref = torch.from_numpy(
            np.stack(
                [
                    [cv2.filter2D(p, -1, kernels[i], borderType=cv2.BORDER_REPLICATE) for p in img]
                    for i, img in enumerate(x.numpy())
                ]
            )
        )
        # float64 both sides (OpenCV may take its DFT path for the larger kernels: ~1e-15 rounding)
        torch.testing.assert_close(
            C.motion_blur(x, s, torch.Generator().manual_seed(s)), ref.clamp(0, 1), atol=1e-10, rtol=0
        )
        # the kernels: ImageMagick-style one-sided Gaussian line, angle U(-45°, 45°) from the first draw,
        # cut at min(radius, ⌈3σ⌉). Bilinear splatting keeps the total weight and the centroid exactly,
        # so the centroid must be (Σ w_d d / Σ w_d) · (cos θ, -sin θ) (rows grow downwards).
        angles = torch.rand(b, generator=torch.Generator().manual_seed(s), dtype=torch.float64).numpy() * 90 - 45
        reach = min(radius, math.ceil(3 * sigma))
        d = np.arange(reach + 1)
        wts = np.exp(-(d**2) / (2 * sigma**2))
        arm = (wts * d).sum() / wts.sum()
        assert kernels.shape == (b, 2 * reach + 1, 2 * reach + 1)
        rows, cols = np.mgrid[: 2 * reach + 1, : 2 * reach + 1] - reach
        for kern, theta in zip(kernels, np.deg2rad(angles), strict=True):
            assert kern.min() >= 0 and kern.sum() == pytest.approx(1.0, abs=1e-12)
            assert (kern * cols).sum() == pytest.approx(arm * math.cos(theta), abs=1e-12)
            assert (kern * rows).sum() == pytest.approx(-arm * math.sin(theta), abs=1e-12)


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_zoom_blur_equals_scipy_affine_transform_centre_zooms(channels, size):
    # The geometry is the exact centre zoom (output pixel p samples the input at c + (p - c)/z, c the
    # centre, bilinear, edges repeated). CIFAR-10-C's clipped_zoom is not used as the reference: it
    # crops ⌈H/z⌉ whole pixels off-centre and resizes corner-aligned (scipy zoom, grid_mode=False),
    # which is the identity for z < 1.032 at 32 px and otherwise shifts by up to half a pixel; its
    # zoom blur differs from the exact one by a mean 0.03–0.05, as much as the corruption itself.
    from scipy.ndimage import affine_transform

    x = reference_images(channels, size)
    a, c = x.numpy(), (size - 1) / 2
    for s in SEVERITIES:
        zooms = np.arange(1.0, C.ZOOM_MAX[s - 1] + 1e-9, 0.01)
        assert len(zooms) == round((C.ZOOM_MAX[s - 1] - 1) / 0.01) + 1  # 1.00 .. ZOOM_MAX
        acc = a.copy()  # CIFAR-10-C's (x + Σ_z zoom_z(x)) / (len(zooms) + 1)
        for z in zooms:
            acc += affine_transform(
                a, np.diag([1, 1, 1 / z, 1 / z]), offset=[0, 0, c - c / z, c - c / z], order=1, mode="nearest"
            )
        ref = torch.from_numpy(acc / (len(zooms) + 1)).clamp(0, 1)
        torch.testing.assert_close(C.zoom_blur(x, s, None), ref, atol=1e-10, rtol=0)
        # float32: the sampling grid itself is float32 (coordinate error ~1e-6 px)
        torch.testing.assert_close(C.zoom_blur(x.float(), s, None), ref.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_elastic_transform_equals_scipy_pipeline_on_the_same_draws(channels, size):
    from scipy.ndimage import gaussian_filter, map_coordinates

    x = reference_images(channels, size)
    a = x.numpy()
    b, h, w = a.shape[0], size, size
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    for s in SEVERITIES:
        rms_f, sigma_f, affine_f = C.ELASTIC_PARAMS[s - 1]
        rms, sigma, jitter = rms_f * size, max(sigma_f * size, 0.5), affine_f * size
        g = torch.Generator().manual_seed(s)  # the same draws, in the same order
        u_affine = torch.rand((b, 3, 2), generator=g, dtype=torch.float64).numpy()
        u_field = torch.rand((b, 2, h, w), generator=g, dtype=torch.float32).numpy().astype(np.float64)
        # displacement: uniform noise, Gaussian-smoothed (3σ cut, reflect-101 = scipy "mirror"), zero
        # mean per component, scaled to the RMS (per image, over both components)
        field = gaussian_filter(u_field * 2 - 1, (0, 0, sigma, sigma), mode="mirror", radius=math.ceil(3 * sigma))
        field -= field.mean(axis=(2, 3), keepdims=True)
        field *= (rms / math.sqrt(2)) / np.sqrt((field**2).mean(axis=(1, 2, 3), keepdims=True))
        cy, cx, sq = h / 2, w / 2, max(size // 3, 1)
        pts = np.array([[cx + sq, cy + sq], [cx + sq, cy - sq], [cx - sq, cy + sq]])
        expected = np.empty_like(a)
        for i in range(b):
            moved = pts + (u_affine[i] * 2 - 1) * jitter
            # the affine map taking the jittered control points back to the originals, as
            # cv2.getAffineTransform (float32-only, so checked to 1e-4) and in float64 by a 3×3 solve
            m = np.linalg.solve(np.c_[moved, np.ones(3)], pts).T
            np.testing.assert_allclose(
                cv2.getAffineTransform(moved.astype(np.float32), pts.astype(np.float32)), m, atol=1e-4
            )
            qx, qy = xx + field[i, 0], yy + field[i, 1]
            src_x = m[0, 0] * qx + m[0, 1] * qy + m[0, 2]
            src_y = m[1, 0] * qx + m[1, 1] * qy + m[1, 2]
            for ch in range(channels):  # bilinear, reflected about the edge pixel centres
                expected[i, ch] = map_coordinates(a[i, ch], [src_y, src_x], order=1, mode="mirror")
        got = C.elastic_transform(x, s, torch.Generator().manual_seed(s))
        torch.testing.assert_close(got, torch.from_numpy(expected).clamp(0, 1), atol=1e-10, rtol=0)


def cifar_c_plasma_fractal(mapsize: int = 256, wibbledecay: float = 3, uniform=np.random.uniform) -> np.ndarray:
    """``plasma_fractal`` of CIFAR-10-C / imagecorruptions (their code, the random source made a parameter)."""
    assert mapsize & (mapsize - 1) == 0
    maparray = np.empty((mapsize, mapsize), dtype=np.float32)
    maparray[0, 0] = 0
    stepsize = mapsize
    wibble = 100

    def wibbledmean(array):
        return array / 4 + wibble * uniform(-wibble, wibble, array.shape)

    def fillsquares():
        cornerref = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum += np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(squareaccum)

    def filldiamonds():
        drgrid = maparray[stepsize // 2 : mapsize : stepsize, stepsize // 2 : mapsize : stepsize]
        ulgrid = maparray[0:mapsize:stepsize, 0:mapsize:stepsize]
        ltsum = (drgrid + np.roll(drgrid, 1, axis=0)) + (ulgrid + np.roll(ulgrid, -1, axis=1))
        maparray[0:mapsize:stepsize, stepsize // 2 : mapsize : stepsize] = wibbledmean(ltsum)
        ttsum = (drgrid + np.roll(drgrid, 1, axis=1)) + (ulgrid + np.roll(ulgrid, -1, axis=0))
        maparray[stepsize // 2 : mapsize : stepsize, 0:mapsize:stepsize] = wibbledmean(ttsum)

    while stepsize >= 2:
        fillsquares()
        filldiamonds()
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    return maparray / maparray.max()


def test_cifar_c_plasma_fractal_copy_is_imagecorruptions():
    reference = pytest.importorskip("imagecorruptions.corruptions")
    state = np.random.get_state()
    try:
        for decay in sorted({d for _, d in C.FOG_PARAMS}):
            np.random.seed(1)
            theirs = reference.plasma_fractal(mapsize=32, wibbledecay=decay)
            np.random.seed(1)
            np.testing.assert_array_equal(cifar_c_plasma_fractal(32, decay), theirs)
    finally:
        np.random.set_state(state)


def fractal_stats(maps: np.ndarray) -> np.ndarray:
    """Mean, std, mean |horizontal neighbour difference| and mean |difference 8 px apart| of fractal crops."""
    return np.array(
        [maps.mean(), maps.std(), np.abs(np.diff(maps, axis=-1)).mean(), np.abs(maps[..., 8:] - maps[..., :-8]).mean()]
    )


@pytest.mark.parametrize("decay", sorted({d for _, d in C.FOG_PARAMS}))
def test_plasma_fractal_statistics_match_cifar_c(decay):
    rng = np.random.default_rng(0)
    theirs = np.stack([cifar_c_plasma_fractal(32, decay, rng.uniform) for _ in range(400)])
    ours = plasma_fractal(400, torch.Generator().manual_seed(0), mapsize=32, wibbledecay=decay).numpy()
    # 400 maps a side: the standard errors of these four statistics are 0.9–1.8 % of their values
    # (bootstrap), 1.3–2.6 % for the difference of two sets, so 6 % is >= 2.3 of those (observed <= 1.7 %)
    np.testing.assert_allclose(fractal_stats(ours[:, :28, :28]), fractal_stats(theirs[:, :28, :28]), rtol=0.06)


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_fog_equals_cifar_c_formula_on_the_same_fractal(channels, size):
    x = reference_images(channels, size)
    a = x.numpy()
    for s in SEVERITIES:
        strength, decay = C.FOG_PARAMS[s - 1]
        frac = plasma_fractal(a.shape[0], torch.Generator().manual_seed(s), C._fog_mapsize(size, size), decay)
        frac = frac.numpy().astype(np.float64)[:, None, :size, :size]
        max_val = a.max(axis=(1, 2, 3), keepdims=True)  # CIFAR-10-C: x.max() of the one image
        ref = np.clip((a + strength * frac) * max_val / (max_val + strength), 0, 1)
        torch.testing.assert_close(
            C.fog(x, s, torch.Generator().manual_seed(s)), torch.from_numpy(ref), atol=1e-12, rtol=0
        )


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_contrast_equals_cifar_c_formula(channels, size):
    x = reference_images(channels, size)
    a = x.numpy()
    for s in SEVERITIES:
        c = C.CONTRAST_FACTOR[s - 1]
        means = a.mean(axis=(2, 3), keepdims=True)  # CIFAR-10-C: np.mean(x, axis=(0, 1)) of H×W×C
        ref = torch.from_numpy(np.clip((a - means) * c + means, 0, 1))
        torch.testing.assert_close(C.contrast(x, s, None), ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(C.contrast(x.float(), s, None), ref.float(), atol=1e-6, rtol=0)


def colorsys_round_trip(x: np.ndarray, fn) -> np.ndarray:
    """Per pixel: ``colorsys.rgb_to_hsv`` -> ``fn(h, s, v)`` -> ``colorsys.hsv_to_rgb``, clipped (CIFAR-10-C
    does the same with skimage's rgb2hsv / hsv2rgb, which share colorsys's conventions)."""
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                out[b, :, i, j] = colorsys.hsv_to_rgb(*fn(*colorsys.rgb_to_hsv(*x[b, :, i, j])))
    return np.clip(out, 0, 1)


def test_brightness_and_saturate_equal_colorsys_hsv_round_trip():
    x = torch.cat([special_pixels().clamp(0, 1)[:3], reference_images(3, 16)[[0, 4]]])
    a = x.numpy()
    for s in SEVERITIES:
        c = C.BRIGHTNESS_SHIFT[s - 1]
        ref = colorsys_round_trip(a, lambda h, sat, v, c=c: (h, sat, min(max(v + c, 0.0), 1.0)))
        # float64 both sides; the near-gray pixel (chroma 1e-6) amplifies rounding in the hue to ~1e-10
        torch.testing.assert_close(C.brightness(x, s, None), torch.from_numpy(ref), atol=1e-9, rtol=0)
        sa, sb = C.SATURATE_PARAMS[s - 1]
        ref = colorsys_round_trip(a, lambda h, sat, v, sa=sa, sb=sb: (h, min(max(sat * sa + sb, 0.0), 1.0), v))
        torch.testing.assert_close(C.saturate(x, s, None), torch.from_numpy(ref), atol=1e-9, rtol=0)
        # grayscale: the HSV value of a gray pixel is the pixel
        gray = x[:, :1]
        torch.testing.assert_close(C.brightness(gray, s, None), (gray + c).clamp(0, 1), atol=0, rtol=0)


def test_jpeg_equals_opencv_codec_round_trip(rgb, gray):
    for x in (rgb, gray):
        arr = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for s in SEVERITIES:
            params = [
                cv2.IMWRITE_JPEG_QUALITY,
                C.JPEG_QUALITY[s - 1],
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
            ]  # documented 4:2:0
            ref = []
            for img in arr:
                plane = np.ascontiguousarray(img[..., ::-1] if img.shape[-1] == 3 else img[..., 0])  # cv2: BGR
                ok, encoded = cv2.imencode(".jpg", plane, params)
                assert ok
                dec = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
                ref.append(dec[..., ::-1] if dec.ndim == 3 else dec[..., None])
            ref = np.stack(ref).astype(np.int64)
            ours = (C.jpeg_compression(x, s, None) * 255).round().to(torch.int64).permute(0, 2, 3, 1).numpy()
            # Both wheels bundle libjpeg-turbo (identical here); allow a stray 1–2 level difference from
            # other builds' DCT/upsampling rounding. The next severity's quality is off by a mean 2–7
            # levels (max 14–50), 4:4:4 sampling by 4–7 levels on RGB: far outside this.
            diff = np.abs(ours - ref)
            assert diff.max() <= 2 and diff.mean() <= 0.05, (s, diff.max(), diff.mean())


def test_gaussian_noise_is_the_drawn_normal_noise_and_has_the_documented_std(rgb):
    from scipy.stats import kstest

    for s in SEVERITIES:
        std = C.GAUSSIAN_NOISE_STD[s - 1]
        z = torch.randn(rgb.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
        assert torch.equal(C.gaussian_noise(rgb, s, torch.Generator().manual_seed(s)), (rgb + std * z).clamp(0, 1))
    x = torch.full((32, 3, 32, 32), 0.5, dtype=torch.float64)  # mid-gray: clipping needs |z| > 5
    n = x.numel()
    for s in SEVERITIES:
        std = C.GAUSSIAN_NOISE_STD[s - 1]
        r = (C.gaussian_noise(x, s, torch.Generator().manual_seed(100 + s)) - 0.5).flatten().numpy()
        # 5 standard errors of the sample mean and of the sample std (n ≈ 1e5)
        assert abs(r.mean()) < 5 * std / math.sqrt(n)
        assert abs(r.std() / std - 1) < 5 / math.sqrt(2 * n)
        assert kstest(r / std, "norm").pvalue > 1e-4


def test_shot_noise_matches_clipped_poisson_moments():
    from scipy.stats import poisson

    levels = (0.02, 0.3, 0.9)  # 0.9: clipped at 1 at the low photon counts
    x = torch.tensor(levels, dtype=torch.float32).view(1, 3, 1, 1).expand(16, 3, 32, 32).contiguous()
    for s in SEVERITIES:
        photons = C.SHOT_NOISE_PHOTONS[s - 1]
        out = C.shot_noise(x, s, torch.Generator().manual_seed(s)).double().numpy()
        counts = out[out < 1] * photons  # below the clip, out = k / photons
        assert np.abs(counts - np.round(counts)).max() < 1e-3
        for ch, level in enumerate(levels):
            vals = out[:, ch].ravel()
            lam = level * photons
            k = np.arange(int(lam + 20 * math.sqrt(lam) + 20))
            pmf = poisson.pmf(k, lam)
            y = np.minimum(k / photons, 1.0)  # E and Var of min(Poisson(x·s)/s, 1)
            mean = (pmf * y).sum()
            var = (pmf * (y - mean) ** 2).sum()
            m4 = (pmf * (y - mean) ** 4).sum()
            # 5 standard errors of the sample mean and variance (16384 values per level)
            assert abs(vals.mean() - mean) < 5 * math.sqrt(var / vals.size), (s, level)
            assert abs(vals.var() - var) < 5 * math.sqrt((m4 - var**2) / vals.size), (s, level)


@pytest.mark.parametrize("channels,size", IMAGE_KINDS)
def test_pixelate_equals_opencv_inter_area_both_ways(channels, size):
    # pixelate is an exact area (fractional box) filter, i.e. cv2.resize INTER_AREA down and up. (PIL's
    # BOX, used by CIFAR-10-C, instead gives each whole pixel to the cell holding its centre: on these
    # images it differs by a mean 0.02-0.03 / max 0.26 (smooth) and 0.04-0.13 / 0.58 (noise).) OpenCV
    # derives its upscale weights from dx·(n/N) in floating point and can misassign a pixel whose edge
    # falls exactly on a cell edge (e.g. 36 -> 40 px); not at these sizes and factors. Other shapes are
    # covered by the exact numpy reference above.
    x = reference_images(channels, size)
    for s in SEVERITIES:
        cells = int(size * C.PIXELATE_FACTOR[s - 1])
        ref = per_plane(
            lambda p, n=cells: cv2.resize(
                cv2.resize(p, (n, n), interpolation=cv2.INTER_AREA), (size, size), interpolation=cv2.INTER_AREA
            ),
            x,
        )
        # OpenCV computes its area weights in float32
        torch.testing.assert_close(C.pixelate(x, s, None), ref.clamp(0, 1), atol=1e-6, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_matches_cpu_for_a_cpu_generator(rgb):
    for name in sorted(CORRUPTIONS):
        cpu = corrupt(rgb, name, 3, torch.Generator().manual_seed(5))
        gpu = corrupt(rgb.cuda(), name, 3, torch.Generator().manual_seed(5))
        assert gpu.device.type == "cuda" and gpu.shape == rgb.shape, name
        torch.testing.assert_close(
            gpu.cpu(),
            cpu,
            atol=1e-4 if name != "jpeg_compression" else 0,
            rtol=0,
            msg=lambda m, name=name: f"{name}: {m}",
        )
