"""Randomized smoothing: Clopper–Pearson bound, radius, abstention, CERTIFY on simple models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from robustlens.analysis.robustness import (
    RobustnessInputError,
    abstention_rate,
    certified_accuracy_curve,
    certified_radius,
    certify,
    clopper_pearson_lower,
    radius_grid,
)


class Constant(nn.Module):
    """Always predicts class ``c`` of ``k``."""

    def __init__(self, c: int, k: int = 3):
        super().__init__()
        self.c, self.k = c, k

    def forward(self, x):
        out = torch.zeros(x.shape[0], self.k, device=x.device)
        out[:, self.c] = 1.0
        return out


class MeanThreshold(nn.Module):
    """Class 1 if the image mean exceeds 0.5, else class 0."""

    def forward(self, x):
        m = x.flatten(1).mean(dim=1) - 0.5
        return torch.stack([-m, m], dim=1) * 100


@pytest.mark.parametrize("n", [1, 10, 100, 1000])
@pytest.mark.parametrize("alpha", [0.001, 0.05])
def test_clopper_pearson_all_successes_closed_form(n, alpha):
    assert clopper_pearson_lower(n, n, alpha) == pytest.approx(alpha ** (1 / n), rel=1e-9)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (1, 10), (5, 10), (9, 10), (480, 1000), (999, 1000), (70, 100)])
@pytest.mark.parametrize("alpha", [0.001, 0.01, 0.05])
def test_clopper_pearson_matches_scipy_exact_interval(k, n, alpha):
    expected = binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low
    assert clopper_pearson_lower(k, n, alpha) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_clopper_pearson_vectorized_and_validated():
    out = clopper_pearson_lower(np.array([0, 50, 100]), 100, 0.01)
    assert out.shape == (3,) and out[0] == 0.0 and 0 < out[1] < 0.5 < out[2] < 1
    with pytest.raises(RobustnessInputError):
        clopper_pearson_lower(101, 100, 0.01)
    with pytest.raises(RobustnessInputError):
        clopper_pearson_lower(5, 100, 1.5)


def test_radius_closed_form_and_abstention():
    sigma = 0.25
    p = np.array([0.3, 0.5, 0.8413447460685429, 0.99])
    r = certified_radius(p, sigma)
    assert r[0] == 0.0 and r[1] == 0.0
    assert r[2] == pytest.approx(sigma * 1.0, rel=1e-9)  # Φ⁻¹(0.8413...) = 1
    assert r[3] == pytest.approx(sigma * norm.ppf(0.99))


def test_certify_constant_model_gets_closed_form_radius():
    x = torch.rand(3, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    sigma, n, alpha = 0.5, 200, 0.001
    res = certify(Constant(2), x, sigma, n0=10, n=n, alpha=alpha, batch_size=64)
    assert (res.prediction == 2).all() and not res.abstain.any()
    assert (res.counts == n).all()
    np.testing.assert_allclose(res.p_lower, alpha ** (1 / n))
    np.testing.assert_allclose(res.radius, sigma * norm.ppf(alpha ** (1 / n)))


def test_certify_abstains_on_the_decision_boundary():
    x = torch.full((2, 1, 4, 4), 0.5)  # the threshold classifier is a coin flip under noise
    res = certify(MeanThreshold(), x, 0.25, n0=20, n=100, alpha=0.01, batch_size=50)
    assert res.abstain.all() and (res.prediction == -1).all() and (res.radius == 0).all()
    assert (res.p_lower < 0.5).all()
    assert res.abstention_rate == 1.0


def test_certify_far_from_boundary_and_seeded():
    x = torch.cat([torch.full((2, 1, 4, 4), 0.9), torch.full((2, 1, 4, 4), 0.1)])
    a = certify(MeanThreshold(), x, 0.25, n0=20, n=100, alpha=0.01, random_state=1)
    b = certify(MeanThreshold(), x, 0.25, n0=20, n=100, alpha=0.01, random_state=1)
    assert np.array_equal(a.counts, b.counts) and np.array_equal(a.radius, b.radius)
    assert list(a.prediction) == [1, 1, 0, 0]
    acc = a.certified_accuracy(np.array([1, 1, 0, 1]), np.array([0.0, 0.1, 10.0]))
    np.testing.assert_allclose(acc, [0.75, 0.75, 0.0])


def test_certify_tiny_model(tiny_task):
    res = certify(tiny_task.model, tiny_task.x_test[:6], 0.12, n0=20, n=100, alpha=0.01, batch_size=60)
    assert res.prediction.shape == (6,) and (res.radius >= 0).all()
    ok = ~res.abstain
    assert (res.radius[ok] > 0).all()


def test_certified_accuracy_curve_and_abstention_rate():
    radii = np.array([0.0, 0.2, 0.5, 1.0])
    correct = np.array([False, True, True, True])
    acc = certified_accuracy_curve(radii, correct, np.array([0.0, 0.2, 0.3, 1.0, 2.0]))
    np.testing.assert_allclose(acc, [0.75, 0.75, 0.5, 0.25, 0.0])
    assert abstention_rate(np.array([True, False, False, False])) == 0.25
    with pytest.raises(RobustnessInputError):
        certified_accuracy_curve(radii, correct.astype(int), np.array([0.0]))


def test_radius_grid_reaches_the_largest_certifiable_radius():
    """Step σ/10 from 0 up to σ·Φ⁻¹(α^(1/n)) (≈ 2.46σ for n = 1000, α = 0.001), the radius of k = n."""
    grid = radius_grid(0.25, 1000, 0.001)
    np.testing.assert_allclose(np.diff(grid), 0.025)
    largest = float(certified_radius(clopper_pearson_lower(1000, 1000, 0.001), 0.25))
    assert grid[0] == 0.0 and grid[-2] < largest <= grid[-1] and largest == pytest.approx(2.4633 * 0.25, rel=1e-4)
    np.testing.assert_allclose(radius_grid(0.5, 100, 0.01, step=0.25)[:3], [0.0, 0.25, 0.5])
