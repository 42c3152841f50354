"""Attack-strength self-check (active test) and gradient-masking symptom checks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustlens.analysis.robustness import (
    ATTACKS,
    RobustnessInputError,
    attack_self_check,
    build_active_test_model,
    gradient_masking_checks,
    pgd,
    robustness_self_check,
)
from robustlens.analysis.robustness.attacks import _ce_grad

PARAMS = {
    "pgd_linf": {"steps": 20},
    "pgd_l2": {"steps": 20},
    "square_linf": {"max_iter": 300},
    "cw_l2": {"binary_search_steps": 4, "max_iter": 50, "initial_const": 0.1, "learning_rate": 0.05},
    # Untargeted APGD-DLR (not in the standard cascade) finds 30 of 32 planted L2 examples with one restart.
    "apgd_dlr_l2": {"n_restarts": 2},
}
EPS = {"linf": 0.05, "l2": 0.4}


@pytest.fixture(scope="module")
def data(tiny_task):
    return tiny_task.model, tiny_task.x_test[:32], tiny_task.y_test[:32]


def test_active_model_keeps_clean_predictions_and_has_known_adversarials(data):
    model, x, _ = data
    for norm, eps in EPS.items():
        active, labels, evaluable = build_active_test_model(model, x, eps, norm=norm)
        assert evaluable.all()
        with torch.no_grad():
            assert torch.allclose(active(x), model(x), atol=1e-5)  # boost is exactly 0 at the clean points
            assert torch.equal(labels, model(x).argmax(1))
            x_star = x + active.deltas
            assert float(x_star.min()) >= 0 and float(x_star.max()) <= 1
            size = active.deltas.flatten(1).abs().amax(1) if norm == "linf" else active.deltas.flatten(1).norm(dim=1)
            assert (size <= 0.9 * eps + 1e-6).all()  # strictly inside the ball
            assert (active(x_star).argmax(1) != labels).all()  # ... and adversarial
            # the original model is mostly NOT fooled there: the adversarial comes from the construction
            assert (model(x_star).argmax(1) == labels).float().mean() > 0.5


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_shipped_attack_passes(data, name):
    model, x, _ = data
    eps = EPS[ATTACKS[name].norm]
    res = attack_self_check(model, x, name, eps, attack_params=PARAMS.get(name))
    assert res.passed, f"{name}: success {res.success_rate:.2f} on the active test"
    assert res.n_evaluated == 32 and res.n_excluded == 0
    assert res.to_dict()["attack"] == name


def _return_clean(model, images, labels, eps):
    return images.clone()


def _tiny_step_pgd(model, images, labels, eps):
    return pgd(model, images, labels, eps, steps=1, step_size=0.01 * eps)


def _random_signs(model, images, labels, eps):
    g = torch.Generator().manual_seed(0)
    return (images + eps * (torch.randint(0, 2, images.shape, generator=g) * 2 - 1)).clamp(0, 1)


def _wrong_direction_fgsm(model, images, labels, eps):
    """Descends the loss instead of ascending it."""
    x = images.clone().requires_grad_(True)
    loss = nn.functional.cross_entropy(model(x), labels)
    (g,) = torch.autograd.grad(loss, x)
    return (images - eps * g.sign()).clamp(0, 1)


@pytest.mark.parametrize("broken", [_return_clean, _tiny_step_pgd, _random_signs, _wrong_direction_fgsm])
def test_broken_attacks_fail(data, broken):
    model, x, _ = data
    res = attack_self_check(model, x, broken, EPS["linf"], norm="linf")
    assert not res.passed and res.success_rate < 0.5


def test_out_of_budget_attack_gets_no_credit(data):
    model, x, _ = data

    def cheat(m, images, labels, eps):  # uses 3·eps: finds adversarials but outside the ball
        return pgd(m, images, labels, 3 * eps, steps=10)

    res = attack_self_check(model, x, cheat, EPS["linf"], norm="linf")
    assert not res.passed


def test_self_check_validation(data):
    model, x, _ = data
    with pytest.raises(RobustnessInputError, match="norm"):
        attack_self_check(model, x, _return_clean, 0.05)
    with pytest.raises(RobustnessInputError, match="l2 attack"):
        attack_self_check(model, x, "deepfool", 0.05, norm="linf")
    with pytest.raises(RobustnessInputError, match="eps too large"):
        attack_self_check(model, x, "fgsm", 0.9)


class _Quantized(nn.Module):
    """Rounds the input to 4 gray levels first: zero gradient almost everywhere."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(torch.round(x * 3) / 3)


class _AlwaysDropout(nn.Module):
    """Dropout that stays active in eval mode (a randomized 'defence')."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(nn.functional.dropout(x, 0.3, training=True))


def test_masking_checks_clean_model_not_flagged(data):
    model, x, y = data
    rep = gradient_masking_checks(model, x, y, 0.05, square_iters=200)
    assert not rep.suspicious, rep.messages
    assert rep.zero_grad_fraction == 0.0 and rep.nondeterministic_max_diff == 0.0


def test_masking_checks_detect_zero_gradients(data):
    model, x, y = data
    rep = gradient_masking_checks(_Quantized(model), x, y, 0.1, square_iters=200)
    assert rep.flags["zero_gradients"] and rep.zero_grad_fraction == 1.0
    assert rep.flags["blackbox_beats_whitebox"]
    assert rep.whitebox_success["pgd_linf"] == 0.0 and rep.blackbox_success > 0.2
    assert rep.suspicious and len(rep.messages) == 2


def test_masking_checks_detect_nondeterminism(data):
    model, x, y = data
    rep = gradient_masking_checks(_AlwaysDropout(model), x, y, 0.05, square_iters=100)
    assert rep.flags["nondeterministic"] and rep.nondeterministic_max_diff > 0
    assert not rep.flags["zero_gradients"]
    assert "dropout" in " ".join(rep.messages)


def test_combined_report(data):
    model, x, y = data
    rep = robustness_self_check(model, x[:16], y[:16], 0.05, attack_params=PARAMS)
    assert set(rep.attack_checks) == {"fgsm", "pgd_linf", "square_linf"}
    assert rep.all_attacks_passed and not rep.masking.suspicious
    d = rep.to_dict()
    assert d["masking"]["flags"] == {
        "zero_gradients": False,
        "nondeterministic": False,
        "blackbox_beats_whitebox": False,
    }


def test_confident_model_float64_cross_entropy_keeps_pgd_strong(data):
    """Logit margins of 10–30: float32 softmax saturates (p_y == 1) and a float32 CE gradient loses its
    true-class term; the shipped attacks evaluate the CE in float64, so their gradient keeps the signs of
    an all-float64 reference, and PGD still passes the active test."""
    model, x, y = data
    confident = copy.deepcopy(model)
    with torch.no_grad():
        confident.net[-1].weight.mul_(3.5)
        confident.net[-1].bias.mul_(3.5)
        saturated = torch.softmax(confident(x), dim=1).amax(dim=1) == 1.0
    assert saturated.float().mean() > 0.5

    def grad(net, inp):
        z = inp.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(net(z), y, reduction="sum"), z)
        return g

    reference = grad(copy.deepcopy(confident).double(), x.double())
    agree = lambda g: (g.sign() == reference.sign()).flatten(1).float().mean(dim=1)[saturated]  # noqa: E731
    assert agree(_ce_grad(confident, x, y)).min() >= 0.99
    assert agree(grad(confident, x)).min() < 0.9  # the float32 problem being avoided
    assert attack_self_check(confident, x, "pgd_linf", EPS["linf"], attack_params={"steps": 20}).passed
