"""Behaviour of the attacks, run_attack and robust_accuracy_curve on the tiny model."""

from __future__ import annotations

import numpy as np
import pandas.testing as pd_testing
import pytest
import torch
from torch import nn

from robustlens.analysis.robustness import (
    ATTACKS,
    RobustnessInputError,
    breaking_budget,
    carlini_wagner_l2,
    curve_from_breaks,
    deepfool,
    fgsm,
    pgd,
    robust_accuracy_curve,
    run_attack,
    square_attack,
)

FAST = {
    "pgd_linf": {"steps": 10},
    "pgd_l2": {"steps": 10},
    "square_linf": {"max_iter": 200},
    "cw_l2": {"binary_search_steps": 4, "max_iter": 50, "initial_const": 0.1, "learning_rate": 0.05},
    "deepfool": {},
    "fgsm": {},
}
# The AutoAttack entries (autoattack.py) at light settings: the tiny task has 4 classes, so 3 target classes.
for _norm in ("", "_l2"):
    FAST.update(
        {
            f"apgd_ce{_norm}": {"n_iter": 20},
            f"apgd_dlr{_norm}": {"n_iter": 20},
            f"apgd_t{_norm}": {"n_iter": 20, "n_target_classes": 3},
            f"fab_t{_norm}": {"n_iter": 20, "n_target_classes": 3},
        }
    )
FAST.update(
    {
        "square_l2": {"n_queries": 200},
        "autoattack_linf": {"n_iter": 20, "n_target_classes": 3, "square_queries": 200},
        "autoattack_l2": {"n_iter": 20, "n_target_classes": 3, "square_queries": 200},
    }
)
EPS = {"linf": 0.1, "l2": 0.6}


@pytest.fixture(scope="module")
def data(tiny_task):
    return tiny_task.model, tiny_task.x_test[:32], tiny_task.y_test[:32]


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_run_attack_shapes_range_budget(data, name):
    model, x, y = data
    spec = ATTACKS[name]
    eps = EPS[spec.norm]
    res = run_attack(model, x, y, name, eps, **FAST[name])
    assert res.adv_images.shape == x.shape and res.adv_images.dtype == x.dtype
    assert float(res.adv_images.min()) >= 0 and float(res.adv_images.max()) <= 1
    size = res.linf if spec.norm == "linf" else res.l2
    assert (size <= eps + 1e-5).all()
    assert res.within_budget.all()
    # success is defined over clean-correct samples as a change of the clean prediction
    assert not (res.success & ~res.clean_correct).any()
    np.testing.assert_array_equal(res.success, res.clean_correct & (res.adv_preds != res.clean_preds))
    assert res.success_rate == pytest.approx(res.success.sum() / res.clean_correct.sum())
    assert res.robust_accuracy == pytest.approx(np.mean(res.clean_correct & ~res.success))
    assert res.success_rate > 0.3, f"{name} should break a fair share of this weak model at eps={eps}"


def test_pgd_stronger_than_fgsm_and_monotone_in_eps(data):
    model, x, y = data
    f = run_attack(model, x, y, "fgsm", 0.05)
    p = run_attack(model, x, y, "pgd_linf", 0.05, steps=20, step_size=0.01)
    p_big = run_attack(model, x, y, "pgd_linf", 0.1, steps=20, step_size=0.02)
    assert p.success_rate >= f.success_rate
    assert p_big.success_rate >= p.success_rate


def test_pgd_random_start_is_seeded(data):
    model, x, y = data
    a = pgd(model, x, y, 0.05, random_start=True, random_state=3)
    b = pgd(model, x, y, 0.05, random_start=True, random_state=3)
    c = pgd(model, x, y, 0.05, random_start=True, random_state=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - x).abs().max()) <= 0.05 + 1e-6
    l2 = pgd(model, x, y, 0.5, norm="l2", random_start=True, restarts=2, random_state=0)
    assert float((l2 - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5


def test_square_is_seeded_and_black_box(data):
    model, x, y = data
    a = square_attack(model, x, y, 0.1, max_iter=50, random_state=1)
    b = square_attack(model, x, y, 0.1, max_iter=50, random_state=1)
    assert torch.equal(a, b)
    with pytest.raises(RobustnessInputError, match="linf"):
        square_attack(model, x, y, 0.1, norm="l2")


def test_minimal_norm_attacks_find_small_perturbations(data):
    model, x, y = data
    df = deepfool(model, x, y)
    cw = carlini_wagner_l2(model, x, y, **FAST["cw_l2"])
    with torch.no_grad():
        assert (model(df).argmax(1) != y).float().mean() >= 0.95
        assert (model(cw).argmax(1) != y).float().mean() >= 0.9
    # a minimal attack's adversarials are much closer than the image range
    assert float((df - x).flatten(1).norm(dim=1).median()) < 2.0


def test_minimal_attack_with_budget_discards_larger_perturbations(data):
    model, x, y = data
    free = run_attack(model, x, y, "deepfool")
    eps = float(np.median(free.l2))
    bounded = run_attack(model, x, y, "deepfool", eps)
    assert (bounded.l2 <= eps * (1 + 1e-5) + 1e-5).all()
    np.testing.assert_array_equal(bounded.success, free.success & (free.l2 <= eps * (1 + 1e-5) + 1e-5))


def test_robust_accuracy_curve_worst_case(data):
    model, x, y = data
    eps_list = [0.0, 0.03, 0.06, 0.1]
    curve = robust_accuracy_curve(
        model, x, y, ["fgsm", ("pgd_linf", {"steps": 10}), ("square_linf", {"max_iter": 100})], eps_list
    )
    assert curve.norm == "linf"
    assert curve.robust_accuracy[0] == pytest.approx(curve.clean_accuracy)
    assert np.all(np.diff(curve.robust_accuracy) <= 1e-12)
    per = curve.per_attack_accuracy
    for col in ("fgsm", "pgd_linf", "square_linf"):
        assert (per["worst_case"].to_numpy() <= per[col].to_numpy() + 1e-12).all()
    # robust at eps == clean-correct and survives all attacks; breaking eps is the first non-robust budget
    for i in range(x.shape[0]):
        col = curve.robust[:, i]
        expected = np.nan if col.all() else curve.eps[np.argmin(col)]  # NaN: never broken (one convention)
        np.testing.assert_equal(curve.breaking_eps[i], expected)
    assert np.isnan(curve.min_norm).all()  # no minimal-norm attack was run


def test_robust_accuracy_curve_l2_with_minimal_attacks(data):
    model, x, y = data
    curve = robust_accuracy_curve(
        model, x, y, ["deepfool", ("cw_l2", FAST["cw_l2"]), ("pgd_l2", {"steps": 10})], [0.25, 0.5, 1.0]
    )
    assert curve.norm == "l2"
    assert np.all(np.diff(curve.robust_accuracy) <= 1e-12)
    found = ~np.isnan(curve.min_norm)
    assert found.mean() > 0.9
    # a sample whose minimal perturbation is within a budget is not robust at that budget
    for e_i, e in enumerate(curve.eps):
        assert not (curve.robust[e_i] & found & (curve.min_norm <= e - 1e-6)).any()


def test_robust_accuracy_curve_rejects_mixed_norms(data):
    model, x, y = data
    with pytest.raises(RobustnessInputError, match="share one norm"):
        robust_accuracy_curve(model, x, y, ["fgsm", "deepfool"], [0.1])


def test_input_validation(data):
    model, x, y = data
    with pytest.raises(RobustnessInputError, match=r"\[0, 1\]"):
        fgsm(model, x * 3, y, 0.1)
    with pytest.raises(RobustnessInputError, match="shape"):
        fgsm(model, x[0], y, 0.1)
    with pytest.raises(RobustnessInputError, match="labels must have shape"):
        fgsm(model, x, y[:3], 0.1)
    with pytest.raises(RobustnessInputError, match="eps"):
        fgsm(model, x, y, -0.1)
    with pytest.raises(RobustnessInputError, match="unknown attack"):
        run_attack(model, x, y, "nope", 0.1)
    with pytest.raises(RobustnessInputError, match="needs eps"):
        run_attack(model, x, y, "pgd_linf")
    with pytest.raises(RobustnessInputError, match="torch.nn.Module"):
        fgsm(lambda t: t, x, y, 0.1)
    with pytest.raises(ValueError):  # RobustnessInputError is also a ValueError
        pgd(model, x, y, 0.1, norm="l1")


class _DropoutNet(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.base(self.drop(x))


def test_attacks_run_in_eval_mode_and_restore_modes(data):
    model, x, y = data
    net = _DropoutNet(model)
    net.train()
    a = fgsm(net, x, y, 0.05)
    b = fgsm(net, x, y, 0.05)
    assert torch.equal(a, b)  # dropout off during the attack
    assert net.training and net.drop.training  # previous mode restored
    assert torch.equal(a, fgsm(model, x, y, 0.05))


def test_batched_run_attack_matches_unbatched_for_deterministic_attacks(data):
    model, x, y = data
    whole = run_attack(model, x, y, "pgd_linf", 0.05, steps=5)
    chunks = run_attack(model, x, y, "pgd_linf", 0.05, steps=5, batch_size=7)
    assert torch.allclose(whole.adv_images, chunks.adv_images, atol=1e-6)


def hand_wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval written out (no library)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def test_curve_from_breaks_on_planted_breaks():
    """The curve of attacks already run (what the workspace run uses): counts, rates, breaking budgets (NaN:
    never broken), Wilson intervals and the per-attack rows where each attack ran, all against planted breaks."""
    eps = np.array([0.1, 0.2, 0.4])
    correct = np.array([True, True, True, True, False])
    a = np.array([[0, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 1, 0, 0, 1]], dtype=bool)  # closed upwards
    b = np.array([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=bool)  # ran only at 0.4
    curve = curve_from_breaks({"a": a, "b": b}, eps, correct, norm="linf", min_norm=np.full(5, np.nan))
    np.testing.assert_array_equal(curve.breaking_eps, [0.2, 0.4, 0.4, np.nan, 0.0])
    assert curve.broken_counts["a"].tolist() == [0, 1, 2] and curve.broken_counts["worst_case"].tolist() == [0, 1, 3]
    np.testing.assert_allclose(curve.robust_accuracy, [4 / 5, 3 / 5, 1 / 5])
    assert curve.n_correct == 4 and curve.clean_accuracy == pytest.approx(0.8)
    assert curve.min_norm[4] == 0.0 and np.isnan(curve.min_norm[:4]).all()
    rate = curve.rates("worst_case")
    np.testing.assert_allclose(rate["success_rate"], [0.0, 0.25, 0.75])
    for e, k in enumerate([4, 3, 1]):
        assert (rate["ci_low"][e], rate["ci_high"][e]) == pytest.approx(hand_wilson(k, 5))
    rows = curve.records(ran={"a": np.ones(3, bool), "b": np.array([False, False, True])})
    assert [(r["attack"], r["eps"]) for r in rows] == [
        ("a", 0.1),
        ("a", 0.2),
        ("a", 0.4),
        ("b", 0.4),
        ("worst_case", 0.1),
        ("worst_case", 0.2),
        ("worst_case", 0.4),
    ]
    assert rows[3]["robust_accuracy"] == pytest.approx(3 / 5) and rows[3]["n_samples"] == 5
    np.testing.assert_array_equal(breaking_budget(a | b, eps, correct), curve.breaking_eps)
    with pytest.raises(RobustnessInputError, match="shape"):
        curve_from_breaks({"a": a[:2]}, eps, correct, norm="linf")


def test_robust_accuracy_curve_is_curve_from_breaks_of_its_runs(data):
    """robust_accuracy_curve = its attacks' breaks through curve_from_breaks (one implementation)."""
    model, x, y = data
    eps_list = [0.03, 0.1]
    curve = robust_accuracy_curve(model, x, y, ["fgsm"], eps_list)
    runs = [run_attack(model, x, y, "fgsm", e) for e in eps_list]
    again = curve_from_breaks(
        {"fgsm": np.stack([r.success for r in runs])}, eps_list, runs[0].clean_correct, norm="linf"
    )
    np.testing.assert_array_equal(curve.breaking_eps, again.breaking_eps)
    pd_testing.assert_frame_equal(curve.per_attack_accuracy, again.per_attack_accuracy)
