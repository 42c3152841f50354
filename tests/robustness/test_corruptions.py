"""Corruptions: shape/range/determinism/monotonicity, and the benchmark."""

from __future__ import annotations

import math

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
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
        "gaussian_blur", "brightness", "contrast", "saturate", "fog", "pixelate", "jpeg_compression",
        "elastic_transform"}


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
@pytest.mark.parametrize("name,channels", [(n, c) for n in sorted(CORRUPTIONS) for c in (1, 3)
                                           if not (n == "saturate" and c == 1)])
def test_severity_monotone_on_average(name, channels, rgb, gray):
    x = rgb if channels == 3 else gray
    dev = [float((corrupt(x, name, s, torch.Generator().manual_seed(0)) - x).abs().mean()) for s in range(1, 6)]
    assert dev[0] > 0
    assert all(a < b for a, b in zip(dev, dev[1:])), f"{name}: mean |corrupted - clean| per severity {dev}"


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
        "corruption", "severity", "accuracy", "error", "relative_error", "flip_rate"]
    with torch.no_grad():
        clean_pred = model(x).argmax(1).numpy()
    assert res.clean_accuracy == pytest.approx(np.mean(clean_pred == y.numpy()))
    np.testing.assert_allclose(res.table["relative_error"], res.table["error"] - res.clean_error)
    np.testing.assert_allclose(res.table["accuracy"] + res.table["error"], 1.0)
    # recompute one cell by hand: the noise of batch i is seeded by (random_state, name, severity, i)
    from robustlens.analysis.robustness._common import make_generator
    preds = []
    for bi, start in enumerate(range(0, 48, 20)):
        cx = CORRUPTIONS["gaussian_noise"](x[start:start + 20], 3, make_generator(0, "gaussian_noise", 3, bi))
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
    for sigma in (0.3, 1.5, 4.0):                                 # elastic's smoothing (reflect, 3σ)
        k = C._gaussian_1d(sigma, max(math.ceil(3 * sigma), 1))
        expected = conv_reference(x, torch.outer(k, k), "reflect")
        torch.testing.assert_close(C._gaussian_blur(x, sigma, 3.0, "reflect"), expected, atol=1e-12, rtol=0)


def pixelate_reference(images: torch.Tensor, severity: int) -> torch.Tensor:
    """The box filter on a grid refined u× (pixelate before it became two matrix products)."""
    c = C.PIXELATE_FACTOR[severity - 1]
    h, w = images.shape[-2:]
    u = max(1, min(8, 256 // max(h, w)))
    fine = images.repeat_interleave(u, dim=-2).repeat_interleave(u, dim=-1)
    small = F.adaptive_avg_pool2d(fine, (max(1, int(h * c)), max(1, int(w * c))))
    back = F.interpolate(small, size=(h * u, w * u), mode="nearest")
    return F.avg_pool2d(back, u).clamp(0, 1)


@pytest.mark.parametrize("shape", [(4, 3, 32, 32), (3, 1, 28, 28), (2, 3, 17, 40), (2, 3, 5, 7), (2, 1, 1, 3)])
def test_pixelate_matrices_equal_refined_grid_box_filter(shape):
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
        torch.testing.assert_close(C.elastic_transform(x, s, torch.Generator().manual_seed(s)), expected,
                                   atol=1e-10, rtol=0)
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


def test_bernoulli_positions_are_independent_bernoulli():
    g = torch.Generator().manual_seed(0)
    reps, n, p = 20000, 12, 0.3
    hits = torch.zeros(reps, n)
    for r in range(reps):
        pos = C._bernoulli_positions(n, p, g)
        assert bool((pos[1:] > pos[:-1]).all()) and (pos.numel() == 0 or (0 <= int(pos.min()) and int(pos.max()) < n))
        hits[r, pos] = 1
    tol = 5 * math.sqrt(p * (1 - p) / reps)
    assert float((hits.mean(0) - p).abs().max()) < tol                           # each position ~ p
    pairs = (hits[:, :-1] * hits[:, 1:]).mean(0)                                  # neighbours independent
    assert float((pairs - p * p).abs().max()) < 5 * math.sqrt(p * p / reps)
    assert float((hits[:, 0] * hits[:, -1]).mean() - p * p) < 5 * math.sqrt(p * p / reps)


def test_fog_mapsize_fits_the_image():
    assert C._fog_mapsize(32, 32) == 32 and C._fog_mapsize(28, 28) == 32
    assert C._fog_mapsize(33, 8) == 64 and C._fog_mapsize(17, 40) == 64 and C._fog_mapsize(1, 1) == 2
    x = natural_like(3, 3, 28)
    assert corrupt(x, "fog", 5, 0).shape == x.shape


def fractal_stats(maps: np.ndarray) -> np.ndarray:
    """Mean, std, mean |horizontal neighbour difference| and mean |difference 8 px apart| of fractal crops."""
    return np.array([maps.mean(), maps.std(), np.abs(np.diff(maps, axis=-1)).mean(),
                     np.abs(maps[..., 8:] - maps[..., :-8]).mean()])


@pytest.mark.parametrize("decay", sorted({d for _, d in C.FOG_PARAMS}))
def test_plasma_fractal_statistics_match_imagecorruptions(decay):
    reference = pytest.importorskip("imagecorruptions.corruptions")
    state = np.random.get_state()
    try:
        np.random.seed(0)
        theirs = np.stack([reference.plasma_fractal(mapsize=32, wibbledecay=decay) for _ in range(400)])
    finally:
        np.random.set_state(state)
    ours = plasma_fractal(400, torch.Generator().manual_seed(0), mapsize=32, wibbledecay=decay).numpy()
    a, b = fractal_stats(ours[:, :28, :28]), fractal_stats(theirs[:, :28, :28])
    np.testing.assert_allclose(a, b, rtol=0.06)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
def test_cuda_matches_cpu_for_a_cpu_generator(rgb):
    for name in sorted(CORRUPTIONS):
        cpu = corrupt(rgb, name, 3, torch.Generator().manual_seed(5))
        gpu = corrupt(rgb.cuda(), name, 3, torch.Generator().manual_seed(5))
        assert gpu.device.type == "cuda" and gpu.shape == rgb.shape, name
        torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4 if name != "jpeg_compression" else 0, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
