"""AutoAttack-grade evaluation (robustlens.analysis.robustness.autoattack) against hand-computed values,
the reference implementation (pyautoattack = fra31/auto-attack), torchattacks and PGD with restarts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from robustlens.analysis.robustness import autoattack as aa
from robustlens.analysis.robustness._common import RobustnessInputError
from robustlens.analysis.robustness.attacks import ATTACKS, pgd, run_attack
from tests.robustness.counting import CountingModel
from tests.robustness.sample_cnn import load_sample_cnn, robust_of

TOL = 1e-5


# ------------------------------------------------------------------------------------------ helpers


def reference_autoattack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    *,
    n_iter: int = 100,
    n_targets: int = 9,
    queries: int = 5000,
    seed: int = 0,
) -> torch.Tensor:
    """pyautoattack's standard version with the given iterations / targets / queries; returns adv images."""
    pyautoattack = pytest.importorskip("pyautoattack", reason="pyautoattack (fra31/auto-attack) not installed")
    ref = pyautoattack.AutoAttack(
        model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", seed=seed, device="cpu"
    )
    ref.verbose = False
    for attack in (ref.apgd, ref.apgd_targeted):
        attack.n_iter = attack.n_iter_orig = n_iter
        attack.n_iter_2 = max(int(0.22 * n_iter), 1)
        attack.n_iter_min = max(int(0.06 * n_iter), 1)
        attack.size_decr = max(int(0.03 * n_iter), 1)
    ref.apgd_targeted.n_target_classes = n_targets
    ref.fab.n_target_classes = n_targets
    ref.fab.n_iter = n_iter
    ref.square.n_queries = queries
    with torch.random.fork_rng(devices=[]):
        out = ref.run_standard_evaluation(x, y, batch_size=len(x))
    return out[0] if isinstance(out, tuple) else out  # pyautoattack 0.2 returns (adv, adv_labels)


@pytest.fixture(scope="module")
def sample_cnn():
    return load_sample_cnn(8)


# --------------------------------------------------------------------------------------- losses


def test_dlr_hand_computed():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 1.0, -2.0]])
    labels = torch.tensor([0, 1, 0])
    # sorted: (3, 2, 1, 0) -> z_π1 - z_π3 = 2; (5, 1, 1, -2) -> 5 - 1 = 4
    expected = torch.tensor([-(1 - 3) / 2, -(3 - 2) / 2, -(5 - 1) / 4])
    torch.testing.assert_close(aa.dlr_loss(logits, labels), expected)
    # shift and scale invariant
    torch.testing.assert_close(aa.dlr_loss(7 * logits + 3, labels), expected)


def test_dlr_targeted_hand_computed():
    logits = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.0, 2.0, 6.0, 1.0]])
    labels = torch.tensor([0, 2])
    targets = torch.tensor([2, 1])
    # row 0: -(4 - 3) / (4 - (2 + 1)/2) = -0.4 ; row 1: sorted (6, 2, 1, 0): -(6 - 2) / (6 - 0.5) = -8/11
    expected = torch.tensor([-1 / 2.5, -4 / 5.5])
    torch.testing.assert_close(aa.dlr_loss_targeted(logits, labels, targets), expected)


def test_dlr_matches_reference_code():
    pyautoattack = pytest.importorskip("pyautoattack", reason="pyautoattack (fra31/auto-attack) not installed")
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 10, generator=g) * 3
    labels = torch.randint(0, 10, (64,), generator=g)
    targets = (labels + torch.randint(1, 10, (64,), generator=g)) % 10
    ref = APGDAttack(nn.Identity(), eps=0.1)
    torch.testing.assert_close(aa.dlr_loss(logits, labels), ref.dlr_loss(logits, labels))
    ref_t = APGDAttack_targeted(nn.Identity(), eps=0.1)
    ref_t.y_target = targets
    torch.testing.assert_close(aa.dlr_loss_targeted(logits, labels, targets), ref_t.dlr_loss_targeted(logits, labels))
    assert pyautoattack.__version__


def test_dlr_rejects_too_few_classes():
    with pytest.raises(RobustnessInputError, match="K >= 3"):
        aa.dlr_loss(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RobustnessInputError, match="K >= 4"):
        aa.dlr_loss_targeted(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long))


# ----------------------------------------------------------------------------------- checkpoints


def test_checkpoints_published_for_100_iterations():
    # Croce & Hein 2020: p0 = 0, p1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), w_j = ceil(p_j N)
    assert aa.apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


@pytest.mark.parametrize("n_iter", [10, 37, 100, 250])
def test_checkpoints_follow_reference_schedule(n_iter):
    pytest.importorskip("pyautoattack", reason="pyautoattack (fra31/auto-attack) not installed")
    from pyautoattack.autopgd_base import APGDAttack

    ref = APGDAttack(nn.Identity(), eps=0.1, n_iter=n_iter)
    points, k, counter = [0], ref.n_iter_2, 0
    for i in range(n_iter):  # the reference's own counter logic (attack_single_run)
        counter += 1
        if counter == k:
            points.append(i + 1)
            k = max(k - ref.size_decr, ref.n_iter_min)
            counter = 0
    assert aa.apgd_checkpoints(n_iter) == points


# ------------------------------------------------------------------------------ FAB projection


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_hyperplane_projection_minimal_and_feasible(norm):
    pytest.importorskip("pyautoattack", reason="pyautoattack (fra31/auto-attack) not installed")
    from pyautoattack.fab_projections import projection_l2, projection_linf

    g = torch.Generator().manual_seed(1)
    n, d = 200, 50
    t = torch.rand(n, d, generator=g)
    w = torch.randn(n, d, generator=g) * (torch.rand(n, d, generator=g) > 0.2)
    b = (w * torch.rand(n, d, generator=g)).sum(1) * 1.5  # some out of reach inside the box
    ours = aa._hyperplane_projection(t, w, b, norm).double()
    ref = (projection_linf if norm == "linf" else projection_l2)(t.clone(), w.clone(), b.clone()).double()
    # inside the box
    assert float((t.double() + ours).min()) >= -1e-6 and float((t.double() + ours).max()) <= 1 + 1e-6
    reach_ours = (w.double() * (t.double() + ours)).sum(1) - b.double()
    reach_ref = (w.double() * (t.double() + ref)).sum(1) - b.double()
    feasible = reach_ref.abs() < 1e-3
    assert int(feasible.sum()) > n // 3
    # on the hyperplane wherever the reference reaches it ...
    assert float(reach_ours[feasible].abs().max()) < 1e-3
    # ... never with a larger perturbation
    size = (lambda v: v.abs().amax(1)) if norm == "linf" else (lambda v: v.norm(dim=1))
    assert bool((size(ours)[feasible] <= size(ref)[feasible] * (1 + 1e-4) + 1e-6).all())
    # and elsewhere at least as close to it
    assert bool((reach_ours[~feasible].abs() <= reach_ref[~feasible].abs() + 1e-4).all())


# ---------------------------------------------------------------------------------- constraints


def _size(adv, x, norm):
    d = (adv - x).reshape(len(x), -1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm,eps", [("linf", 0.06), ("l2", 0.4)])
def test_every_attack_stays_within_eps_and_box(tiny_task, norm, eps):
    x, y = tiny_task.x_test[:24], tiny_task.y_test[:24]
    model = tiny_task.model
    runs = {
        "apgd-ce": aa.apgd(model, x, y, eps, norm=norm, loss="ce", n_iter=20),
        "apgd-dlr": aa.apgd(model, x, y, eps, norm=norm, loss="dlr", n_iter=20, n_restarts=2),
        "apgd-t": aa.apgd(model, x, y, eps, norm=norm, loss="dlr-targeted", n_iter=20, n_target_classes=3),
        "fab-t": aa.fab_targeted(model, x, y, eps, norm=norm, n_iter=20, n_target_classes=3, n_restarts=2),
        "square": aa.square(model, x, y, eps, norm=norm, n_queries=150),
        "autoattack": aa.auto_attack(
            model, x, y, eps, norm=norm, n_iter=20, n_target_classes=3, square_queries=150
        ).adv,
    }
    broke_any = False
    for name, adv in runs.items():
        assert adv.shape == x.shape, name
        assert float(adv.min()) >= 0 and float(adv.max()) <= 1, name
        assert float(_size(adv, x, norm).max()) <= eps * (1 + TOL), name
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y
        changed = (adv != x).reshape(len(x), -1).any(1)
        assert bool((changed <= fooled).all()), f"{name} returned a non-adversarial perturbation"
        broke_any |= bool(fooled.any())
    assert broke_any
    # the cascade is at least as strong as each of its members alone
    with torch.no_grad():
        cascade_robust = model(runs["autoattack"]).argmax(1) == y
        for name in ("apgd-ce", "apgd-t", "fab-t", "square"):
            assert int(cascade_robust.sum()) <= int((model(runs[name]).argmax(1) == y).sum()), name


def test_seeded_and_input_untouched(tiny_task):
    x, y = tiny_task.x_test[:16].clone(), tiny_task.y_test[:16]
    before = x.clone()
    a = aa.auto_attack(tiny_task.model, x, y, 0.05, n_iter=10, n_target_classes=2, square_queries=50, seed=4)
    b = aa.auto_attack(tiny_task.model, x, y, 0.05, n_iter=10, n_target_classes=2, square_queries=50, seed=4)
    assert torch.equal(x, before)
    assert torch.equal(a.adv, b.adv)
    assert np.array_equal(a.forward_passes, b.forward_passes)


def test_result_fields_consistent(tiny_task):
    model = tiny_task.model
    x, y = tiny_task.x_test[:20], tiny_task.y_test[:20].clone()
    y[:2] = (y[:2] + 1) % 4  # two clean errors
    res = aa.auto_attack(model, x, y, 0.07, n_iter=15, n_target_classes=3, square_queries=60)
    assert list(res.robust_after) == list(aa.STANDARD_ATTACKS)
    assert not res.clean_correct[:2].any() and set(res.broken_by[:2]) == {"clean"}
    assert np.array_equal(res.robust, res.broken_by == "")
    assert np.array_equal(res.robust, robust_of(model, x, y, res.adv, 0.07, "linf"))
    masks = list(res.robust_after.values())
    for before, after in zip([res.clean_correct] + masks[:-1], masks, strict=True):
        assert bool((after <= before).all())  # cumulative
    assert np.array_equal(masks[-1], res.robust)
    for name, mask in res.robust_after.items():
        prev = [res.clean_correct] + masks
        i = list(res.robust_after).index(name)
        assert np.array_equal(prev[i] & ~mask, res.broken_by == name)
    assert res.settings["norm"] == "linf" and res.settings["attacks"] == list(aa.STANDARD_ATTACKS)
    assert (res.forward_passes >= 1).all() and (res.backward_passes >= 0).all()
    assert set(res.seconds) >= {"clean", "total", *aa.STANDARD_ATTACKS}
    with pytest.raises(RobustnessInputError, match="unknown attack"):
        aa.auto_attack(model, x, y, 0.1, attacks=["pgd"])
    with pytest.raises(RobustnessInputError, match="norm"):
        aa.auto_attack(model, x, y, 0.1, norm="l1")
    with pytest.raises(RobustnessInputError, match="loss"):
        aa.apgd(model, x, y, 0.1, loss="hinge")


def test_pass_counter_is_exact(tiny_task):
    counted = CountingModel(tiny_task.model)
    x, y = tiny_task.x_test[:24], tiny_task.y_test[:24]
    res = aa.auto_attack(counted, x, y, 0.06, n_iter=20, n_target_classes=3, square_queries=100, batch_size=10)
    assert int(res.forward_passes.sum()) == counted.forward_count
    assert int(res.backward_passes.sum()) == counted.backward_count
    counted.forward_count = counted.backward_count = 0
    counter = aa.PassCounter.zeros(24)
    aa.apgd(counted, x, y, 0.06, loss="dlr-targeted", n_iter=20, n_target_classes=3, counter=counter)
    assert int(counter.forward.sum()) == counted.forward_count
    assert int(counter.backward.sum()) == counted.backward_count


def test_registry_entries(tiny_task):
    x, y = tiny_task.x_test[:12], tiny_task.y_test[:12]
    for name in ("apgd_ce", "apgd_t", "fab_t", "square_l2", "autoattack_linf", "autoattack_l2"):
        assert name in ATTACKS
    for name in ("fgsm", "pgd_linf", "pgd_l2", "deepfool", "cw_l2", "square_linf"):  # kept
        assert name in ATTACKS
    res = run_attack(tiny_task.model, x, y, "autoattack_linf", 0.06, n_iter=15, n_target_classes=3, square_queries=50)
    direct = aa.auto_attack(
        tiny_task.model, x, y, 0.06, n_iter=15, n_target_classes=3, square_queries=50, seed=torch.Generator()
    )  # any seed: the robust set must agree within a sample
    assert abs(res.robust_accuracy - direct.robust_accuracy) <= 1 / 12 + 1e-9
    assert res.within_budget.all()
    res_l2 = run_attack(tiny_task.model, x, y, "square_l2", 0.5, n_queries=50)
    assert res_l2.norm == "l2" and res_l2.within_budget.all()


# ----------------------------------------------------------------- against the reference (tiny task)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.35)])
def test_matches_reference_with_fewer_passes_tiny(tiny_task, norm, eps):
    x, y = tiny_task.x_test[:32], tiny_task.y_test[:32]
    settings = dict(n_iter=30, n_targets=3, queries=200)
    counted = CountingModel(tiny_task.model)
    ref_adv = reference_autoattack(counted, x, y, eps, norm, **settings)
    ref_robust = robust_of(tiny_task.model, x, y, ref_adv, eps, norm)
    ref_fw, ref_bw = counted.forward_count, counted.backward_count
    ours = aa.auto_attack(tiny_task.model, x, y, eps, norm=norm, n_iter=30, n_target_classes=3, square_queries=200)
    assert 0 < ref_robust.mean() < 1
    assert ours.robust.mean() <= ref_robust.mean() + 1 / 32 + 1e-9
    assert ours.forward_passes.sum() <= ref_fw
    assert ours.backward_passes.sum() <= ref_bw


# ------------------------------------------------------------------------------ sample CNN


@pytest.mark.slow
def test_sample_cnn_not_weaker_than_reference_and_pgd(sample_cnn):
    model, x, y = sample_cnn
    eps, norm = 4 / 255, "linf"
    counted = CountingModel(model)
    ref_adv = reference_autoattack(counted, x, y, eps, norm, n_iter=25, n_targets=3, queries=300)
    ref_robust = robust_of(model, x, y, ref_adv, eps, norm)
    ours = aa.auto_attack(model, x, y, eps, norm=norm, n_iter=25, n_target_classes=3, square_queries=300)
    assert np.array_equal(ours.robust, robust_of(model, x, y, ours.adv, eps, norm))
    assert ours.robust.sum() <= ref_robust.sum() + 1
    assert ours.forward_passes.sum() <= counted.forward_count
    assert ours.backward_passes.sum() <= counted.backward_count
    pgd_adv = pgd(model, x, y, eps, steps=50, random_start=True, restarts=3, random_state=0)
    pgd_robust = robust_of(model, x, y, pgd_adv, eps, norm)
    assert ours.robust.sum() <= pgd_robust.sum()


def _torchattacks_or_skip():
    try:
        import torchattacks
    except ImportError:
        pytest.skip("torchattacks is not importable (install it with pip install --no-deps torchattacks==3.5.1)")
    return torchattacks


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 0.35)])
@pytest.mark.slow
def test_tiny_not_weaker_than_torchattacks_full_settings(tiny_task, norm, eps):
    """Both at their standard settings (ours: 100 iterations; torchattacks: its defaults), Square shortened to
    1,000 queries in both, on the tiny task."""
    torchattacks = _torchattacks_or_skip()
    model, x, y = tiny_task.model, tiny_task.x_test[:24], tiny_task.y_test[:24]
    with torch.random.fork_rng(devices=[]):
        ta = torchattacks.AutoAttack(
            model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", n_classes=4, seed=0
        )
        ta._autoattack.attacks[-1].n_queries = 1000
        ta_adv = ta(x, y)
    ta_robust = robust_of(model, x, y, ta_adv, eps, norm)
    ours = aa.auto_attack(model, x, y, eps, norm=norm, square_queries=1000)
    assert 0 < ta_robust.sum() < len(x)
    assert ours.robust.sum() <= ta_robust.sum()


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255)])
@pytest.mark.slow
def test_sample_cnn_not_weaker_than_torchattacks(sample_cnn, norm, eps):
    """torchattacks' AutoAttack at its own settings (10 iterations, all 9 other classes as targets) against ours
    with 25 iterations (ours is the AutoAttack-grade default, 100; at 10 iterations single marginal samples go
    either way with the seed); Square shortened to 300 queries in both to keep the test fast (the benchmark
    runs both at full settings)."""
    torchattacks = _torchattacks_or_skip()
    model, x, y = sample_cnn
    with torch.random.fork_rng(devices=[]):
        ta = torchattacks.AutoAttack(
            model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", n_classes=10, seed=0
        )
        square_attack = ta._autoattack.attacks[-1]
        assert type(square_attack).__name__ == "Square" and square_attack.n_queries == 5000
        square_attack.n_queries = 300
        ta_adv = ta(x, y)
    ta_robust = robust_of(model, x, y, ta_adv, eps, norm)
    ours = aa.auto_attack(model, x, y, eps, norm=norm, n_iter=25, n_target_classes=9, square_queries=300)
    assert ours.clean_correct.sum() > 0
    assert ours.robust.sum() <= ta_robust.sum()
