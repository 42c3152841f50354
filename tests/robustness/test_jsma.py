"""JSMA (L0): the batched attack against torchattacks' per-image JSMA, and its pair search against the full
n × n saliency map."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torchattacks  # installed --no-deps by the Makefile (test dependency): a missing install must fail
from PIL import Image

from robustlens.analysis.ingest.model import NormalizedModel, load_model_config, load_network
from robustlens.analysis.robustness._common import RobustnessInputError
from robustlens.analysis.robustness.jsma import _pair_choice, jsma
from tests.conftest import SAMPLE_DATA


@pytest.fixture(scope="module")
def sample_cnn():
    config = load_model_config(SAMPLE_DATA / "model.json")
    model = NormalizedModel(load_network("model.pt", base_dir=SAMPLE_DATA), config).eval()
    labels = pd.read_csv(SAMPLE_DATA / "labels.csv").iloc[:10]
    x = np.stack([np.asarray(Image.open(SAMPLE_DATA / p)) for p in labels.path]).astype(np.float32) / 255
    y = torch.tensor([config.classes.index(c) for c in labels.label])
    return model, torch.from_numpy(x)[:, None], y


def full_map_choice(target_grad, others_grad, domain, increasing):
    """torchattacks' saliency_map, written out over the full n × n map (the reference for the pair search)."""
    n = target_grad.shape[1]
    out = []
    for t, o, d in zip(target_grad, others_grad, domain, strict=True):
        coef = (2 if increasing else -2) * (~d).float()
        tt = t - coef * t.abs().max()
        oo = o + coef * o.abs().max()
        alpha = tt[None, :] + tt[:, None]
        beta = oo[None, :] + oo[:, None]
        mask = (alpha > 0) & (beta < 0) if increasing else (alpha < 0) & (beta > 0)
        mask &= ~torch.eye(n, dtype=torch.bool)
        sal = alpha.abs() * beta.abs() * mask
        best = int(sal.flatten().argmax())
        out.append((best // n, best % n, bool(mask.any())))
    return out


@pytest.mark.parametrize("increasing", [True, False])
def test_pair_search_equals_the_full_saliency_map(increasing):
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n = 40 + trial
        t = torch.randn(6, n, generator=g)
        o = torch.randn(6, n, generator=g)
        t[:, :5] = 0.0  # ties, as on constant background pixels
        domain = torch.rand(6, n, generator=g) > 0.3
        p, q, found = _pair_choice(t, o, domain, increasing)
        for k, (rp, rq, rfound) in enumerate(full_map_choice(t, o, domain, increasing)):
            assert bool(found[k]) == rfound
            if rfound:
                assert (int(p[k]), int(q[k])) == (rp, rq), (trial, k)


@pytest.mark.slow
def test_same_adversarial_examples_as_torchattacks(sample_cnn):
    model, x, y = sample_cnn
    gamma = 80 / 784  # gamma·n/2 whole: torchattacks' ceil and our floor give the same step budget
    ours = jsma(model, x, y, gamma=gamma, target="next")
    ref = torchattacks.JSMA(model, theta=1.0, gamma=gamma)(x, y)
    assert torch.equal(ours.adv, ref)
    with torch.no_grad():
        ref_success = (model(ref).argmax(1) == (y + 1) % 10).numpy()
    np.testing.assert_array_equal(ours.success, ref_success)
    assert 0 < ours.success.mean() < 1  # a mix of successes and failures: the comparison has teeth


def test_l0_budget_and_two_features_per_step(sample_cnn):
    model, x, y = sample_cnn
    x, y = x[:6], y[:6]
    n = x[0].numel()
    for gamma, theta in ((0.05, 1.0), (0.1, -1.0)):
        res = jsma(model, x, y, gamma=gamma, theta=theta, target="second")
        assert (res.l0 <= gamma * n).all()
        np.testing.assert_array_equal(res.l0, 2 * res.steps)  # exactly two new features each step
        diff = (res.adv - x).flatten(1)
        assert ((diff >= 0) if theta > 0 else (diff <= 0)).all()
        assert float(res.adv.min()) >= 0 and float(res.adv.max()) <= 1
        with torch.no_grad():
            pred = model(res.adv).argmax(1).numpy()
        np.testing.assert_array_equal(res.success, pred == res.targets)
        assert (res.targets != y.numpy()).all()


def test_untargeted_use_breaks_the_tiny_model(tiny_task):
    res = jsma(tiny_task.model, tiny_task.x_test[:32], tiny_task.y_test[:32], gamma=0.5, target="second")
    assert res.success.mean() >= 0.8


def test_bad_settings_are_named(tiny_task):
    x, y = tiny_task.x_test[:2], tiny_task.y_test[:2]
    with pytest.raises(RobustnessInputError, match="gamma"):
        jsma(tiny_task.model, x, y, gamma=0)
    with pytest.raises(RobustnessInputError, match="theta"):
        jsma(tiny_task.model, x, y, theta=0)
    with pytest.raises(RobustnessInputError, match="target"):
        jsma(tiny_task.model, x, y, target="random")
