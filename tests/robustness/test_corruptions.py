"""Corruptions: shape/range/determinism/monotonicity, and the benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustlens.analysis.robustness import CORRUPTIONS, RobustnessInputError, corrupt, corruption_benchmark
from robustlens.analysis.robustness.corruptions import hsv_to_rgb, plasma_fractal, rgb_to_hsv

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
