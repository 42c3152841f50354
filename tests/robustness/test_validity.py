"""Validity diagnostics against trap models built to look robust.

For every trap the diagnostics must not say "pass", and the worst case they report must be within 5
points of a reference attack written here, independently of :mod:`validity` (straight-through PGD
for the quantizers, transfer from the plain model, margin-loss PGD for the saturated softmax, EOT for
the noisy model). The plain model must pass with the same worst case as the reference.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from robustlens.analysis.robustness import RobustnessInputError
from robustlens.analysis.robustness.validity import (
    StraightThroughModel,
    build_input_path_active_model,
    validity_diagnostics,
)
from tests.robustness.traps import make_traps, quantize_straight_through

EPS = 0.05  # L∞ budget on the tiny 8×8 task: the plain model keeps ~60 % robust accuracy
N = 64
TOLERANCE = 0.05  # "within 5 points"


# ---------------------------------------------------------------------------- reference attacks


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    z = logits.double()
    if kind == "ce":
        return F.cross_entropy(z, y, reduction="sum")
    true = z[torch.arange(len(y)), y]
    other = z.clone()
    other[torch.arange(len(y)), y] = -torch.inf
    return (other.max(dim=1).values - true).sum()


def reference_broken(grad_model, eval_correct, x, y, eps, *, kind="ce", steps=50, restarts=2, draws=1, seed=0):
    """Plain L∞ PGD (Madry: step 2.5ε/steps, uniform random starts); gradient of ``grad_model``, averaged over
    ``draws`` calls (EOT); a sample is broken when ``eval_correct(adv)`` is False for any restart."""
    g = torch.Generator().manual_seed(seed)
    broken = torch.zeros(len(y), dtype=torch.bool)
    step = 2.5 * eps / steps
    for _ in range(restarts):
        adv = (x + (2 * torch.rand(x.shape, generator=g) - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            adv.requires_grad_(True)
            loss = sum(_loss(grad_model(adv), y, kind) for _ in range(draws)) / draws
            (grad,) = torch.autograd.grad(loss, adv)
            with torch.no_grad():
                adv = torch.minimum(torch.maximum(adv + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
        broken |= ~eval_correct(adv.detach())
    return broken


def deterministic_correct(model, y):
    def correct(images):
        with torch.no_grad():
            return model(images).argmax(1) == y

    return correct


def majority_correct(model, y, draws=51):
    def correct(images):
        with torch.no_grad():
            votes = sum((model(images).argmax(1) == y).int() for _ in range(draws))
        return votes * 2 > draws

    return correct


def reference_robust(name, trap, base, x, y):
    """Per-sample robust accuracy under the independent reference attacks for ``name``."""
    torch.manual_seed(1)
    if name == "random_noise":
        correct = majority_correct(trap, y)
        broken = ~correct(x)
        for kind in ("ce", "margin"):
            broken |= reference_broken(trap, correct, x, y, EPS, kind=kind, draws=16, restarts=2)
        return ~broken
    correct = deterministic_correct(trap, y)
    broken = ~correct(x)
    for kind in ("ce", "margin"):
        # transfer from the plain model: adversarials of base, scored on the trap
        broken |= reference_broken(base, correct, x, y, EPS, kind=kind)
        if name in ("quantization", "quantization_leak"):
            broken |= reference_broken(lambda z: base(quantize_straight_through(z)), correct, x, y, EPS, kind=kind)
        else:  # plain model, saturated softmax: white-box on the model itself
            broken |= reference_broken(trap, correct, x, y, EPS, kind=kind)
    return ~broken


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def models(tiny_task):
    return {"plain": tiny_task.model, **make_traps(tiny_task.model)}


@pytest.fixture(scope="module")
def reports(tiny_task, models):
    """Validity report per model (computed once; torch's global RNG only drives the noise trap)."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, model in models.items():
            out[name] = validity_diagnostics(
                model,
                tiny_task.x_test[:N],
                tiny_task.y_test[:N],
                EPS,
                train_images=tiny_task.x_train,
                budget="fast",
                seed=0,
            )
    return out


def _check(report, name):
    return next(c for c in report.checks if c["name"] == name)


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", ["plain", "saturated_softmax", "quantization", "quantization_leak", "random_noise"])
@pytest.mark.slow
def test_worst_case_matches_independent_reference(tiny_task, models, reports, name):
    x, y = tiny_task.x_test[:N], tiny_task.y_test[:N]
    with torch.random.fork_rng(devices=[]):
        ref = reference_robust(name, models[name], tiny_task.model, x, y).numpy()
    report = reports[name]
    assert report.worst_case_robust.shape == (N,) and report.worst_case_robust.dtype == bool
    assert report.worst_case_accuracy == pytest.approx(report.worst_case_robust.mean())
    assert abs(report.worst_case_accuracy - ref.mean()) <= TOLERANCE, (
        f"{name}: worst case {report.worst_case_accuracy:.3f} vs reference {ref.mean():.3f}"
    )
    assert report.worst_case_accuracy <= report.headline_accuracy
    # the worst case is the per-sample minimum over every attack run
    combined = np.logical_and.reduce(list(report.diagnostic_adv.values()))
    assert not (report.worst_case_robust & ~combined).any()


@pytest.mark.slow
def test_plain_model_passes(reports):
    report = reports["plain"]
    assert report.status == "pass", [c for c in report.checks if c["status"] != "pass"]
    assert report.upper_bound_gap <= 1.5 / N


@pytest.mark.parametrize(
    "name,expected",
    [
        ("saturated_softmax", ["gradient_zero_nan_ce"]),
        (
            "quantization",
            [
                "gradient_zero_nan_ce",
                "gradient_zero_nan_dlr",
                "non_differentiable_ops",
                "active_test",
                "unbounded_attack",
                "worst_case_gap",
            ],
        ),
        (
            "quantization_leak",
            [
                "gradient_informative_ce",
                "gradient_informative_dlr",
                "non_differentiable_ops",
                "active_test",
                "worst_case_gap",
            ],
        ),
        ("random_noise", ["randomized"]),
    ],
)
@pytest.mark.slow
def test_each_trap_is_flagged_by_the_right_checks(reports, name, expected):
    report = reports[name]
    assert report.status != "pass"
    flagged = {c["name"] for c in report.checks if c["status"] != "pass"}
    assert set(expected) <= flagged, f"{name}: flagged {sorted(flagged)}"
    if name == "quantization_leak":  # the leak makes gradients nonzero: a zero-test alone would miss it
        assert _check(report, "gradient_zero_nan_ce")["value"] == 0
        assert set(_check(report, "non_differentiable_ops")["value"]) == {"round"}


@pytest.mark.slow
def test_quantization_headline_is_an_upper_bound(reports):
    report = reports["quantization"]
    assert report.status == "fail"
    assert report.upper_bound_gap >= 0.2  # white-box PGD sees a zero gradient and breaks almost nothing
    d = json.loads(json.dumps(report.to_dict()))
    assert d["status"] == "fail" and d["headline_is_upper_bound"] is True
    assert {"name", "status", "value", "threshold", "message"} <= set(d["checks"][0])
    assert d["upper_bound_gap"] == pytest.approx(d["headline_accuracy"] - d["worst_case_accuracy"])


@pytest.mark.slow
def test_weak_headline_mask_is_lowered_and_flagged(tiny_task):
    """A headline from a single FGSM step overstates robustness: the gap is reported and the check fails."""
    model, x, y = tiny_task.model, tiny_task.x_test[:N], tiny_task.y_test[:N]
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    with torch.no_grad():
        mask = ((model(x).argmax(1) == y) & (model((x + EPS * g.sign()).clamp(0, 1)).argmax(1) == y)).numpy()
    report = validity_diagnostics(model, x, y, EPS, robust_mask=mask, train_images=tiny_task.x_train, budget="fast")
    assert report.headline_accuracy == pytest.approx(mask.mean())
    assert not (report.worst_case_robust & ~mask).any()
    assert report.upper_bound_gap > 0.1
    assert _check(report, "worst_case_gap")["status"] == "fail"


def test_straight_through_model_keeps_outputs_and_passes_gradients(tiny_task, models):
    trap, base, x = models["quantization"], tiny_task.model, tiny_task.x_test[:8]
    st = StraightThroughModel(trap)
    xg = x.clone().requires_grad_(True)
    out = st(xg)
    assert torch.equal(out.detach(), trap(x).detach())
    (g,) = torch.autograd.grad(out[:, 0].sum(), xg)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(base(quantize_straight_through(xr))[:, 0].sum(), xr)
    assert torch.allclose(g, g_ref, atol=1e-6) and g.abs().sum() > 0
    assert st.found == {"round"}
    xq = x.clone().requires_grad_(True)
    (g_plain,) = torch.autograd.grad(trap(xq)[:, 0].sum(), xq)
    assert g_plain.abs().sum() == 0  # without BPDA the gradient is exactly zero


def test_active_test_plants_a_reachable_adversarial_in_the_input_path(tiny_task, models):
    x = tiny_task.x_test[:16]
    for name in ("plain", "quantization"):
        active, labels, evaluable = build_input_path_active_model(models[name], x, EPS)
        assert evaluable.sum() >= 12
        with torch.no_grad():
            assert torch.equal(active(x).argmax(1), labels)  # clean predictions kept
            star = x + active.deltas
            assert float((star - x).abs().amax()) <= EPS + 1e-7 and 0 <= float(star.min()) <= float(star.max()) <= 1
            assert (active(star).argmax(1) != labels)[evaluable].all()  # planted adversarial
            assert torch.allclose(active.transform(x), x, atol=1e-6)  # T is the identity at x
    plain = next(c for c in _active_only(tiny_task, models["plain"]) if c["name"] == "active_test")
    assert plain["success"]["strong_ce"] >= 0.9
    assert plain["success"]["weak_fgsm"] <= 0.5 and plain["success"]["weak_square100"] <= 0.5


def _active_only(tiny_task, model):
    from robustlens.analysis.robustness.validity import BUDGETS, _active_check

    return [_active_check(model, tiny_task.x_test[:N], EPS, "linf", BUDGETS["fast"], 0, False)]


@pytest.mark.slow
def test_active_test_fails_when_masking_is_inside_the_model(reports):
    check = _check(reports["quantization"], "active_test")
    assert check["status"] == "fail" and check["value"] < 0.5


def test_bad_inputs_are_rejected(tiny_task):
    model, x, y = tiny_task.model, tiny_task.x_test[:4], tiny_task.y_test[:4]
    with pytest.raises(RobustnessInputError, match="robust_mask"):
        validity_diagnostics(model, x, y, EPS, robust_mask=np.ones(3, dtype=bool))
    with pytest.raises(RobustnessInputError, match="budget"):
        validity_diagnostics(model, x, y, EPS, budget="huge")
    with pytest.raises(RobustnessInputError, match="eps"):
        validity_diagnostics(model, x, y, -1.0)
    with pytest.raises(RobustnessInputError, match="norm"):
        validity_diagnostics(model, x, y, EPS, norm="l1")


@pytest.mark.slow
def test_l2_threat_model(tiny_task, models):
    """L2: the plain model passes; the quantizer is caught and its worst case falls to the plain model's level."""
    x, y = tiny_task.x_test[:32], tiny_task.y_test[:32]
    plain = validity_diagnostics(models["plain"], x, y, 0.4, norm="l2", train_images=tiny_task.x_train, budget="fast")
    trap = validity_diagnostics(
        models["quantization"], x, y, 0.4, norm="l2", train_images=tiny_task.x_train, budget="fast"
    )
    assert plain.status == "pass", [c for c in plain.checks if c["status"] != "pass"]
    assert trap.status == "fail" and trap.headline_accuracy - trap.worst_case_accuracy >= 0.3
    assert abs(trap.worst_case_accuracy - plain.worst_case_accuracy) <= TOLERANCE + 1.5 / 32
    assert "square" in trap.diagnostic_adv and "nes" in trap.diagnostic_adv  # the L2 black boxes ran
