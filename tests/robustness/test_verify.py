"""Formal verification (IBP, CROWN): soundness against sampling, attacks and exact MILP solving.

Ground truths used here are independent of the verifier: the true margin at random points of the
threat set and at PGD points (a certified lower bound may never exceed them), and the exact minimum
margin of small ReLU networks solved as a mixed-integer linear program with ``scipy.optimize.milp``
(big-M encoding of every ReLU; big-M bounds from IBP, which are sound).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import LinearConstraint, milp
from torch import nn

from robustlens.analysis.ingest.model import ModelConfig, NormalizedModel
from robustlens.analysis.robustness.attacks import pgd
from robustlens.analysis.robustness.verify import (
    AffineLayer,
    ChannelAffineLayer,
    UnsupportedModelError,
    VerificationResult,
    crown_bounds,
    extract_layers,
    forward_layers,
    ibp_bounds,
    margin_lower_bounds,
    margin_specification,
    verify,
)
from robustlens.errors import ValidationError

SAMPLE = Path(__file__).resolve().parents[2] / "sample_data"


# ------------------------------------------------------------------------------------------ helpers


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _mlp(sizes: list[int], seed: int) -> nn.Sequential:
    def build():
        mods: list[nn.Module] = [nn.Flatten()]
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            mods.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)

    return _seeded(seed, build)


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """True margins ``logit_y - logit_j`` ``(B, K)`` (``inf`` at ``j == y``)."""
    with torch.no_grad():
        logits = model(x).double()
    m = logits.gather(1, y[:, None]) - logits
    m[torch.arange(len(y)), y] = float("inf")
    return m


def _dense(layer: AffineLayer) -> tuple[np.ndarray, np.ndarray]:
    """Dense matrix ``(out, in)`` and offset ``(out,)`` of an affine layer (float64)."""
    n_in, n_out = int(np.prod(layer.in_shape)), int(np.prod(layer.out_shape))
    eye = torch.eye(n_out, dtype=torch.float64).reshape(n_out, *layer.out_shape)
    w = layer.backward(eye).reshape(n_out, n_in)
    return w.numpy(), layer.offset.reshape(-1).double().numpy()


def _exact_min_margins(layers, x0: torch.Tensor, y: int, eps: float) -> np.ndarray:
    """Exact ``min logit_y - logit_j`` over the L∞ ball ∩ [0, 1] for every ``j`` (``inf`` at ``y``), by MILP.

    ``layers``: float64 chain of affine layers and ReLUs (consecutive affine layers are composed).
    """
    x = x0[None].double()
    lo, hi = (x - eps).clamp(0, 1).reshape(-1).numpy(), (x + eps).clamp(0, 1).reshape(-1).numpy()
    # variables: input, then per ReLU block: z (pre), a (post), d (binary)
    var_lo, var_hi, integ = list(lo), list(hi), [0] * lo.size
    rows = []
    cur = list(range(lo.size))  # indices of the variables holding the current activation
    n_vars = lo.size
    pending = (np.eye(lo.size), np.zeros(lo.size))  # affine map applied to `cur` not yet materialized
    for i, layer in enumerate(layers):
        if isinstance(layer, AffineLayer):
            w, b = _dense(layer)
            pending = (w @ pending[0], w @ pending[1] + b)
            continue
        assert layer.kind == "relu"
        pre_lo, pre_hi = ibp_bounds(layers[:i], x, eps)
        pre_lo, pre_hi = pre_lo.reshape(-1).numpy(), pre_hi.reshape(-1).numpy()
        n = pre_lo.size
        z, a, d = range(n_vars, n_vars + n), range(n_vars + n, n_vars + 2 * n), range(n_vars + 2 * n, n_vars + 3 * n)
        n_vars += 3 * n
        var_lo += list(pre_lo) + [0.0] * n + [0.0] * n
        var_hi += list(pre_hi) + list(np.maximum(pre_hi, 0)) + [1.0] * n
        integ += [0] * (2 * n) + [1] * n
        w, b = pending
        for k in range(n):
            rows.append(({z[k]: -1.0, **{c: w[k, j] for j, c in enumerate(cur) if w[k, j] != 0}}, -b[k], -b[k]))
            rows.append(({a[k]: 1.0, z[k]: -1.0}, 0.0, np.inf))  # a >= z
            rows.append(({a[k]: 1.0, z[k]: -1.0, d[k]: -pre_lo[k]}, -np.inf, -pre_lo[k]))  # a <= z - l(1-d)
            rows.append(({a[k]: 1.0, d[k]: -max(pre_hi[k], 0.0)}, -np.inf, 0.0))  # a <= u d
        cur = list(a)
        pending = (np.eye(n), np.zeros(n))
    w, b = pending
    mat = np.zeros((len(rows), n_vars))
    for r, (coefs, _, _) in enumerate(rows):
        for c, v in coefs.items():
            mat[r, c] = v
    cons = LinearConstraint(mat, [r[1] for r in rows], [r[2] for r in rows])
    out = np.full(w.shape[0], np.inf)
    for j in range(w.shape[0]):
        if j == y:
            continue
        obj = np.zeros(n_vars)
        obj[cur] = w[y] - w[j]
        res = milp(
            obj, constraints=cons, integrality=np.array(integ), bounds=(var_lo, var_hi), options={"mip_rel_gap": 1e-9}
        )
        assert res.success, res.message
        out[j] = res.fun + b[y] - b[j]
    return out


def _random_ball_points(x: torch.Tensor, eps: float, n: int, norm: str, seed: int) -> torch.Tensor:
    """``n`` points of the threat set around one image ``x`` (C, H, W): half random vertices, half uniform."""
    g = torch.Generator().manual_seed(seed)
    d = x.numel()
    if norm == "linf":
        signs = torch.randint(0, 2, (n // 2, d), generator=g).double() * 2 - 1
        uni = torch.rand((n - n // 2, d), generator=g, dtype=torch.float64) * 2 - 1
        delta = torch.cat([signs, uni]) * eps
    else:
        direction = torch.randn((n, d), generator=g, dtype=torch.float64)
        direction /= direction.norm(dim=1, keepdim=True)
        radius = eps * torch.rand((n, 1), generator=g, dtype=torch.float64) ** (1.0 / d)
        radius[: n // 2] = eps
        delta = direction * radius
    pts = (x.reshape(1, -1).double() + delta).clamp(0, 1)  # clipping keeps a point inside the ball
    return pts.reshape(n, *x.shape)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_verified(tiny_task):
    """The tiny task's network behind an explicit normalization wrapper (same function as TinyMLP)."""
    wrapped = NormalizedModel(
        tiny_task.model.net, ModelConfig(input_size=(8, 8), channels=1, mean=[0.5], std=[0.25], classes=None, extra={})
    )
    return wrapped, tiny_task.x_test[:24], tiny_task.y_test[:24]


def _small_convnet(seed: int, pool: str = "max") -> nn.Module:
    def build():
        pool_layer = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            pool_layer,
            nn.Conv2d(4, 6, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 2 * 2, 12),
            nn.ReLU(),
            nn.Linear(12, 3),
        )

    model = _seeded(seed, build)
    bn = model[1]
    g = torch.Generator().manual_seed(seed + 100)
    bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(4, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(4, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------------------- tests


def test_margin_bounds_sound_at_random_and_attack_points(tiny_verified):
    model, x, y = tiny_verified
    eps = 0.03
    ibp = margin_lower_bounds(model, x, y, eps, method="ibp")
    crown = margin_lower_bounds(model, x, y, eps, method="crown")
    finite = np.isfinite(ibp)
    assert (ibp[finite] <= crown[finite] + 1e-6).all()
    adv = pgd(model, x, y, eps, steps=20, random_start=True, restarts=2, random_state=0)
    adv_margin = _margins(model, adv, y).numpy()
    assert (crown <= adv_margin + 1e-4).all()
    broken = adv_margin.min(1) <= 0
    verified = crown.min(1) > 0
    assert not (verified & broken).any()
    assert 0 < verified.sum() < len(y), "pick eps so that the test is informative"
    for b in range(4):
        pts = _random_ball_points(x[b], eps, 10_000, "linf", seed=b).float()
        true = _margins(model, pts, y[b].repeat(len(pts))).numpy().min(0)
        assert (crown[b] <= true + 1e-4).all(), (b, crown[b], true)
        # the bound is not vacuous: within a sensible distance of the sampled minimum
        other = np.arange(len(true)) != int(y[b])
        gap = true[other] - crown[b][other]
        assert gap.max() < 50


def test_l2_bounds_sound_at_random_points(tiny_verified):
    model, x, y = tiny_verified
    eps = 0.3
    ibp = margin_lower_bounds(model, x[:6], y[:6], eps, method="ibp", norm="l2")
    crown = margin_lower_bounds(model, x[:6], y[:6], eps, method="crown", norm="l2")
    linf_crown = margin_lower_bounds(model, x[:6], y[:6], eps, method="crown", norm="linf")
    finite = np.isfinite(crown)
    assert (ibp[finite] <= crown[finite] + 1e-6).all()
    # the L2 ball of radius eps is inside the L∞ ball of radius eps: its bound can only be tighter
    assert (linf_crown[finite] <= crown[finite] + 1e-5).all()
    for b in range(3):
        pts = _random_ball_points(x[b], eps, 10_000, "l2", seed=10 + b).float()
        true = _margins(model, pts, y[b].repeat(len(pts))).numpy().min(0)
        assert (crown[b] <= true + 1e-4).all()
    adv = pgd(model, x[:6], y[:6], eps, norm="l2", steps=20, random_start=True, restarts=2, random_state=1)
    assert (crown <= _margins(model, adv, y[:6]).numpy() + 1e-4).all()


@pytest.mark.parametrize("sizes", [[2, 4, 4, 2], [4, 8, 8, 3]])
def test_bounds_below_exact_milp_minimum(sizes):
    gaps_ibp, gaps_crown, gaps_alpha = [], [], []
    for seed in range(4):
        model = _mlp(sizes, seed)
        layers = [layer.to(torch.device("cpu"), torch.float64) for layer in extract_layers(model, (1, 1, sizes[0]))]
        g = torch.Generator().manual_seed(seed)
        x = torch.rand((3, 1, 1, sizes[0]), generator=g, dtype=torch.float64)
        y = model(x.float()).argmax(1)
        for eps in (0.05, 0.2):
            ibp = margin_lower_bounds(layers, x, y, eps, method="ibp")
            crown = margin_lower_bounds(layers, x, y, eps, method="crown")
            alpha = margin_lower_bounds(layers, x, y, eps, method="alpha-crown")
            for b in range(len(x)):
                exact = _exact_min_margins(layers, x[b], int(y[b]), eps)
                mask = np.isfinite(exact)
                assert (alpha[b][mask] <= exact[mask] + 1e-6).all(), (seed, eps, alpha[b], exact)
                assert (ibp[b][mask] <= crown[b][mask] + 1e-9).all()
                assert (crown[b][mask] <= alpha[b][mask] + 1e-9).all()
                # the exact minimum is attained by some point: no sampled point goes below it
                pts = _random_ball_points(x[b, 0], eps, 2000, "linf", seed=b).reshape(-1, 1, 1, sizes[0])
                sampled = _margins(model.double(), pts, y[b].repeat(len(pts))).numpy().min(0)
                model.float()
                assert (exact[mask] <= sampled[mask] + 1e-6).all()
                gaps_ibp.append(float((exact[mask] - ibp[b][mask]).mean()))
                gaps_crown.append(float((exact[mask] - crown[b][mask]).mean()))
                gaps_alpha.append(float((exact[mask] - alpha[b][mask]).mean()))
    # CROWN (margin specification, backward relaxation) is clearly tighter than IBP on average,
    # and optimizing the slopes (α-CROWN) tightens it further
    assert np.mean(gaps_crown) < 0.8 * np.mean(gaps_ibp), (np.mean(gaps_crown), np.mean(gaps_ibp))
    assert np.mean(gaps_alpha) < np.mean(gaps_crown), (np.mean(gaps_alpha), np.mean(gaps_crown))


def test_raw_crown_tighter_than_ibp_on_average():
    """``crown_bounds`` on its own (not intersected with IBP) gives tighter logit intervals than IBP."""
    model = _mlp([6, 16, 16, 4], 3)
    layers = extract_layers(model, (1, 1, 6))
    x = torch.rand((16, 1, 1, 6), generator=torch.Generator().manual_seed(0))
    lo_i, hi_i = ibp_bounds(layers, x, 0.1)
    lo_c, hi_c = crown_bounds(layers, x, 0.1)
    assert float((hi_c - lo_c).mean()) < float((hi_i - lo_i).mean())
    with torch.no_grad():
        logits = model(x)
    assert (lo_c <= logits + 1e-5).all() and (hi_c >= logits - 1e-5).all()
    # margin specification: bounds of C @ logits, C = e_y - e_j
    y = logits.argmax(1)
    c = margin_specification(y, 4)
    lo_m, hi_m = crown_bounds(layers, x, 0.1, C=c)
    true = (c @ logits.unsqueeze(2)).squeeze(2)
    assert (lo_m <= true + 1e-5).all() and (hi_m >= true - 1e-5).all()
    assert float((lo_m - (lo_c.gather(1, y[:, None]) - hi_c)).mean()) > 0  # spec-aware beats subtraction


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_convnet_sound_and_exact_for_avgpool(pool):
    model = _small_convnet(1, pool)
    layers = extract_layers(model, (1, 8, 8))
    g = torch.Generator().manual_seed(2)
    x = torch.rand((8, 1, 8, 8), generator=g)
    with torch.no_grad():
        assert torch.allclose(forward_layers(layers, x), model(x), atol=1e-5)
    y = model(x).argmax(1)
    eps = 0.02
    ibp = margin_lower_bounds(model, x, y, eps, method="ibp")
    crown = margin_lower_bounds(model, x, y, eps, method="crown")
    assert (ibp[np.isfinite(ibp)] <= crown[np.isfinite(crown)] + 1e-6).all()
    adv = pgd(model, x, y, eps, steps=20, random_start=True, random_state=0)
    assert (crown <= _margins(model, adv, y).numpy() + 1e-4).all()
    for b in range(3):
        pts = _random_ball_points(x[b], eps, 10_000, "linf", seed=b).float()
        true = _margins(model, pts, y[b].repeat(len(pts))).numpy().min(0)
        assert (crown[b] <= true + 1e-4).all()
    if pool == "avg":  # a chain of affine layers and ReLUs: compare with the exact MILP minimum
        layers64 = [layer.to(torch.device("cpu"), torch.float64) for layer in layers]
        crown64 = margin_lower_bounds(layers64, x[:2].double(), y[:2], eps, method="crown")
        for b in range(2):
            exact = _exact_min_margins(layers64, x[b].double(), int(y[b]), eps)
            mask = np.isfinite(exact)
            assert (crown64[b][mask] <= exact[mask] + 1e-6).all()


def test_batchnorm_folding_gives_identical_logits():
    model = _small_convnet(5)
    layers = extract_layers(model, (1, 8, 8))
    assert not any(isinstance(layer, ChannelAffineLayer) for layer in layers), "BN after a conv is folded"
    assert any("+1" in layer.name for layer in layers)
    x = torch.rand((16, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(forward_layers(layers, x), model(x), atol=1e-5)
    x = x[:, :, :6, :6]
    # a batch norm that follows no conv/linear (here: first layer) stays a per-channel affine layer
    first = _seeded(0, lambda: nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(36, 3)))
    first[0].running_mean.fill_(0.3)
    first[0].running_var.fill_(2.0)
    layers = extract_layers(first, (1, 6, 6))
    assert isinstance(layers[0], ChannelAffineLayer)
    with torch.no_grad():
        assert torch.allclose(forward_layers(layers, x), first(x), atol=1e-5)


class _WithLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten(2)
        self.rnn = nn.LSTM(36, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.rnn(self.flat(x))
        return self.head(out[:, -1])


def test_unsupported_layers_are_named(tiny_task):
    sig = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.Sigmoid(), nn.Linear(8, 3))
    with pytest.raises(UnsupportedModelError, match=r"layer '2' \(Sigmoid\)"):
        extract_layers(sig, (1, 6, 6))
    with pytest.raises(UnsupportedModelError, match=r"layer 'rnn' \(LSTM\)"):
        extract_layers(_WithLSTM(), (1, 6, 6))
    with pytest.raises(UnsupportedModelError, match=r"layer '1' \(Sigmoid\)"):
        verify(
            torch.jit.script(nn.Sequential(nn.Flatten(), nn.Sigmoid(), nn.Linear(36, 3))),
            torch.rand(2, 1, 6, 6),
            [0, 1],
            [0.01],
        )
    assert issubclass(UnsupportedModelError, ValidationError)
    # normalization computed inside forward is invisible to a module walk: detected, and for
    # TorchScript the operations are named
    with pytest.raises(UnsupportedModelError, match="differs from the model's logits"):
        extract_layers(tiny_task.model, (1, 8, 8))
    with pytest.raises(UnsupportedModelError, match="aten::sub"):
        extract_layers(torch.jit.script(tiny_task.model), (1, 8, 8))


def test_sample_cnn_supported_and_verified_accuracy_consistent():
    from robustlens.analysis.ingest.model import load_model, load_model_config

    config = load_model_config(SAMPLE / "model.json")
    model = load_model("model.pt", config, config.classes, base_dir=SAMPLE)
    layers = extract_layers(model, (1, 28, 28))
    import pandas as pd
    from PIL import Image

    table = pd.read_csv(SAMPLE / "labels.csv").iloc[:8]
    images = torch.stack(
        [
            torch.from_numpy(np.asarray(Image.open(SAMPLE / p).convert("L"), dtype=np.float32) / 255.0)[None]
            for p in table["path"]
        ]
    )
    labels = torch.tensor([config.classes.index(c) for c in table["label"]])
    with torch.no_grad():
        logits = model(images)
        assert float((forward_layers(layers, images) - logits).abs().max()) < 1e-4
    # a normally trained CNN is certifiable only at small radii (IBP intervals grow ~10x per conv layer);
    # refine_budget=0 keeps the test fast (interval pre-activation bounds, CROWN on the margins)
    eps_grid = [0.0, 0.05 / 255, 0.1 / 255, 1 / 255]
    result = verify(model, images, labels, eps_grid, method="both", refine_budget=0)
    assert isinstance(result, VerificationResult)
    clean = (logits.argmax(1) == labels).numpy()
    np.testing.assert_array_equal(result.clean_correct, clean)
    for method in ("ibp", "crown"):
        acc = result.verified_accuracy[method]
        assert acc[0] == pytest.approx(clean.mean())
        assert (np.diff(acc) <= 1e-12).all(), acc
        # verified at a larger radius implies verified at a smaller one, per sample
        assert (result.verified[method][1:] <= result.verified[method][:-1]).all()
    assert (result.verified["ibp"] <= result.verified["crown"]).all()
    assert result.verified_accuracy["crown"][1] > result.verified_accuracy["ibp"][1]  # CROWN certifies more
    for e, eps in enumerate(eps_grid[1:], start=1):
        adv = pgd(model, images, labels, eps, steps=10, random_start=True, random_state=0)
        with torch.no_grad():
            robust = (model(adv).argmax(1) == labels).numpy()
        assert not (result.verified["crown"][e] & ~robust).any(), "verified but broken by PGD"
    frame = result.to_frame()
    assert list(frame.columns[:4]) == ["method", "norm", "eps", "verified_accuracy"]
    assert len(frame) == 2 * len(eps_grid)


def test_input_validation():
    model = _mlp([4, 5, 2], 0)
    x = torch.rand(3, 1, 1, 4)
    with pytest.raises(ValidationError, match="method"):
        verify(model, x, [0, 1, 0], [0.1], method="milp")
    with pytest.raises(ValidationError, match="eps"):
        verify(model, x, [0, 1, 0], [-0.1])
    with pytest.raises(ValidationError, match="labels"):
        verify(model, x, [0, 1], [0.1])
    with pytest.raises(ValidationError, match=r"\[0, 1\]"):
        verify(model, x * 3, [0, 1, 0], [0.1])
