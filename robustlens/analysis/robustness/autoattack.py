"""AutoAttack-grade robustness evaluation (Croce & Hein 2020), batched in torch, seeded, L∞ and L2.

The "standard" AutoAttack cascade runs four complementary attacks, each only on the samples that are
still unbroken after the previous ones:

================  ===========================================================================================
cascade name      attack
================  ===========================================================================================
``apgd-ce``       :func:`apgd` on the cross-entropy, 100 iterations, 1 restart
``apgd-t``        :func:`apgd` on the targeted DLR loss, one run per target among the top-9 other classes
``fab-t``         :func:`fab_targeted` (minimal-norm, Croce & Hein 2020b), 100 iterations, top-9 targets
``square``        :func:`square` (score-based black box, Andriushchenko et al. 2020), 5,000 queries
================  ===========================================================================================

These are the settings of the reference implementation's ``version="standard"`` for ``Linf`` and ``L2``
(github.com/fra31/auto-attack, ``autoattack.py``). The attacks here follow the published algorithms
(APGD: step size ``2ε``, momentum 0.75, checkpoints ``apgd_checkpoints(n_iter)`` where the step size is
halved when fewer than ``rho`` of the steps since the last checkpoint increased the loss or the best loss
did not improve, restarting from the best point) with these implementation choices, none of which can
make an attack weaker on a sample:

* a sample leaves the working batch as soon as it is misclassified (APGD, Square) or as soon as FAB
  has found an adversarial example within ``eps`` (the reference keeps iterating on such samples; their
  outcome cannot change, only the cost);
* the targets of APGD-T / FAB-T are ranked once on the clean logits (the reference recomputes the same
  clean logits once per target);
* FAB reuses the forward pass that checks whether the last step is adversarial as the gradient pass of
  the next step (the reference runs a separate forward);
* Square draws the sign of each window per sample (the reference draws one sign per batch).

Model passes are counted per sample in a :class:`PassCounter`: a forward (or backward) pass on a batch
counts once for every sample in the batch.

Conventions as everywhere in :mod:`robustlens.analysis.robustness`: images ``(B, C, H, W)`` in ``[0, 1]``,
the model maps them to logits ``(B, K)`` with normalization inside, it is put in eval mode for the call,
randomness only from ``seed`` (an int or a ``torch.Generator``), global RNG state untouched.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ._common import (
    RobustnessInputError,
    check_images,
    check_int,
    check_labels,
    check_model,
    check_norm,
    check_positive,
    eval_mode,
    logit_margin,
    logits_of,
    make_generator,
    model_device,
    square_p,
)

#: Names of the attacks of the cascade, in the order of the "standard" version.
STANDARD_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-t", "fab-t", "square")
#: Every attack name :func:`auto_attack` accepts in ``attacks``.
CASCADE_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
_LOSSES = ("ce", "dlr", "dlr-targeted")


# ------------------------------------------------------------------------------------------ counts


@dataclass
class PassCounter:
    """Model passes per sample.

    Attributes
    ----------
    forward:
        ``(B,)`` int64: number of forward passes each sample took part in.
    backward:
        ``(B,)`` int64: number of backward (gradient) passes each sample took part in.
    """

    forward: np.ndarray
    backward: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> PassCounter:
        """A counter of ``n`` samples, all zero."""
        return cls(np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64))

    def add(self, other: PassCounter, index: np.ndarray | None = None) -> None:
        """Add ``other``'s counts, at positions ``index`` (``(len(other),)`` ints) or elementwise."""
        if index is None:
            self.forward += other.forward
            self.backward += other.backward
        else:
            np.add.at(self.forward, index, other.forward)
            np.add.at(self.backward, index, other.backward)


class _Tally:
    """Pass counts kept on the device (no host sync inside attack loops); rows are local sample indices."""

    def __init__(self, n: int, device: torch.device):
        self.fw = torch.zeros(n, dtype=torch.int64, device=device)
        self.bw = torch.zeros(n, dtype=torch.int64, device=device)

    def forward(self, rows: torch.Tensor, backward: bool = False) -> None:
        self.fw[rows] += 1
        if backward:
            self.bw[rows] += 1

    def into(self, counter: PassCounter | None, index: np.ndarray | None = None) -> None:
        if counter is not None:
            counter.add(PassCounter(self.fw.cpu().numpy(), self.bw.cpu().numpy()), index)


def _check_counter(counter: object, n: int) -> PassCounter | None:
    if counter is None:
        return None
    if not isinstance(counter, PassCounter) or counter.forward.shape != (n,) or counter.backward.shape != (n,):
        raise RobustnessInputError(
            f"counter must be a PassCounter of {n} samples (PassCounter.zeros({n})); got {counter!r}"
        )
    return counter


# -------------------------------------------------------------------------------------------- losses


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Untargeted Difference of Logits Ratio loss (Croce & Hein 2020, eq. 6).

    ``DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_π1 - z_π3 + 1e-12)`` with ``z_π1 >= z_π2 >= ...`` the sorted
    logits. Invariant to shifting and scaling the logits; positive once the sample is misclassified.

    Parameters
    ----------
    logits:
        ``(B, K)`` logits, ``K >= 3``.
    labels:
        ``(B,)`` int64 true classes.

    Returns
    -------
    torch.Tensor
        ``(B,)`` loss (to be maximized by an attack).
    """
    if logits.ndim != 2 or logits.shape[1] < 3:
        raise RobustnessInputError(f"dlr_loss needs logits (B, K) with K >= 3; got shape {tuple(logits.shape)}")
    top = logits.topk(3, dim=1).values
    return -logit_margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


def dlr_loss_targeted(logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Targeted DLR loss, as in the reference implementation (fra31/auto-attack ``APGDAttack_targeted``).

    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2 + 1e-12)`` with ``t`` the target class.

    Parameters
    ----------
    logits:
        ``(B, K)`` logits, ``K >= 4``.
    labels:
        ``(B,)`` int64 true classes.
    targets:
        ``(B,)`` int64 target classes.

    Returns
    -------
    torch.Tensor
        ``(B,)`` loss (to be maximized: it grows as ``z_t`` overtakes ``z_y``).
    """
    if logits.ndim != 2 or logits.shape[1] < 4:
        raise RobustnessInputError(
            f"dlr_loss_targeted needs logits (B, K) with K >= 4; got shape {tuple(logits.shape)}"
        )
    top = logits.topk(4, dim=1).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    z_t = logits.gather(1, targets[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _loss_values(logits: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, loss: str) -> torch.Tensor:
    if loss == "ce":
        # float64 keeps the CE gradient accurate on large logit margins (see attacks.py)
        wide = logits if logits.device.type == "mps" else logits.double()
        return F.cross_entropy(wide, y, reduction="none")
    if loss == "dlr":
        return dlr_loss(logits, y)
    assert t is not None
    return dlr_loss_targeted(logits, y, t)


def _loss_grad(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None, loss: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits ``(n, K)``, per-sample loss ``(n,)`` (float32) and its gradient ``(n, C, H, W)`` at ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        values = _loss_values(logits, y, t, loss)
        if values.requires_grad:
            (grad,) = torch.autograd.grad(values.sum(), x)
        else:
            grad = torch.zeros_like(x)
    return logits.detach(), values.detach().float(), grad.detach()


# ---------------------------------------------------------------------------------------- norms


def _view(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (x.ndim - 1))


def _norms(d: torch.Tensor, norm: str) -> torch.Tensor:
    flat = d.reshape(d.shape[0], -1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def _normalize(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d / _view(_norms(d, norm) + 1e-12, d)


def _project_ball(x: torch.Tensor, x0: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Point of the ``norm`` ε-ball around ``x0`` ∩ ``[0, 1]`` (L∞: exact; L2: rescale, then clip)."""
    if norm == "linf":
        return torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    d = x - x0
    n = _view(_norms(d, "l2"), d)
    return (x0 + d / (n + 1e-12) * torch.clamp(n, max=eps)).clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------ APGD


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations at which APGD checks its step size: ``w_j = ⌈p_j·N⌉`` (Croce & Hein 2020, sec. 3.2).

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, evaluated as the
    reference code does (integer window lengths ``⌊0.22N⌋``, decreasing by ``⌊0.03N⌋``, at least
    ``⌊0.06N⌋``, each at least 1), up to ``N``. For ``N = 100``: ``[0, 22, 41, 57, 70, 80, 87, 93, 99]``.
    """
    n_iter = check_int(n_iter, "n_iter")
    window = max(int(0.22 * n_iter), 1)
    shrink = max(int(0.03 * n_iter), 1)
    smallest = max(int(0.06 * n_iter), 1)
    points = [0]
    while points[-1] + window <= n_iter:
        points.append(points[-1] + window)
        window = max(window - shrink, smallest)
    return points


def _apgd_run(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    t: torch.Tensor | None,
    eps: float,
    norm: str,
    loss: str,
    n_iter: int,
    rho: float,
    gen: torch.Generator,
    tally: _Tally,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One APGD run from a random start on ``n`` clean-correct samples.

    Returns ``(adv (n, C, H, W), fooled (n,) bool)``; ``adv`` is the first misclassified iterate where
    fooled, else the clean image. ``rows``: indices of these samples in ``tally``.
    """
    n = x0.shape[0]
    device = x0.device
    shape = (n,) + tuple(x0.shape[1:])
    if norm == "linf":
        r = 2 * torch.rand(shape, generator=gen, device=gen.device) - 1
    else:
        r = torch.randn(shape, generator=gen, device=gen.device)
    x = (x0 + eps * _normalize(r.to(device=device, dtype=x0.dtype), norm)).clamp(0.0, 1.0)
    adv = x0.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=device)

    logits, cur, grad = _loss_grad(model, x, y, t, loss)
    tally.forward(rows, backward=True)
    wrong = logits.argmax(dim=1) != y
    adv[wrong] = x[wrong]
    fooled |= wrong

    # working set: local positions `pos` of the not-yet-fooled samples and their state
    keep = ~wrong
    pos = torch.arange(n, device=device)[keep]
    x0w, yw, tw = x0[keep], y[keep], (t[keep] if t is not None else None)
    x, grad, cur = x[keep], grad[keep], cur[keep]
    x_old = x.clone()
    x_best, grad_best, loss_best = x.clone(), grad.clone(), cur.clone()
    loss_prev = cur.clone()
    n_incr = torch.zeros_like(cur)
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones_like(cur, dtype=torch.bool)
    step = torch.full_like(cur, 2.0 * eps)
    checkpoints = apgd_checkpoints(n_iter)[1:]
    last_check = 0

    for i in range(n_iter):
        if pos.numel() == 0:
            break
        s = _view(step, x)
        if norm == "linf":
            z = _project_ball(x + s * grad.sign(), x0w, eps, norm)
        else:
            z = _project_ball(x + s * _normalize(grad, "l2"), x0w, eps, norm)
        if i > 0:
            z = _project_ball(x + 0.75 * (z - x) + 0.25 * (x - x_old), x0w, eps, norm)
        x_old, x = x, z

        logits, cur, grad = _loss_grad(model, x, yw, tw, loss)
        tally.forward(rows[pos], backward=True)
        wrong = logits.argmax(dim=1) != yw
        if bool(wrong.any()):
            hit = pos[wrong]
            adv[hit] = x[wrong]
            fooled[hit] = True
            keep = ~wrong
            pos, x0w, yw = pos[keep], x0w[keep], yw[keep]
            tw = tw[keep] if tw is not None else None
            x, x_old, grad, cur = x[keep], x_old[keep], grad[keep], cur[keep]
            x_best, grad_best, loss_best = x_best[keep], grad_best[keep], loss_best[keep]
            loss_prev, n_incr, loss_best_last = loss_prev[keep], n_incr[keep], loss_best_last[keep]
            reduced_last, step = reduced_last[keep], step[keep]

        n_incr += (cur > loss_prev).float()
        loss_prev = cur
        better = cur > loss_best
        bv = _view(better, x)
        x_best = torch.where(bv, x, x_best)
        grad_best = torch.where(bv, grad, grad_best)
        loss_best = torch.where(better, cur, loss_best)

        if i + 1 in checkpoints:
            k = i + 1 - last_check
            last_check = i + 1
            reduce = (n_incr <= rho * k) | (~reduced_last & (loss_best_last >= loss_best))
            reduced_last = reduce
            loss_best_last = loss_best.clone()
            step = torch.where(reduce, step / 2, step)
            rv = _view(reduce, x)
            x = torch.where(rv, x_best, x)
            grad = torch.where(rv, grad_best, grad)
            n_incr = torch.zeros_like(n_incr)
    return adv, fooled


def _ranked_targets(clean_logits: torch.Tensor, n_target_classes: int) -> torch.Tensor:
    """``(n, n_target_classes)``: for each sample the 2nd, 3rd, ... highest-scoring classes at the clean image."""
    k = clean_logits.shape[1]
    m = min(n_target_classes + 1, k)
    return clean_logits.topk(m, dim=1).indices[:, 1:]


def _check_targets(n_target_classes: int, k: int, what: str) -> int:
    n_target_classes = check_int(n_target_classes, "n_target_classes")
    if k < 2:
        raise RobustnessInputError(f"{what} needs at least 2 classes; the model returns {k}")
    return min(n_target_classes, k - 1)


def _series_of_runs(
    x0: torch.Tensor,
    n_series: int,
    n_restarts: int,
    one_run: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_series`` series (one per target) of ``n_restarts`` runs, each on the samples no earlier run broke.

    ``x0`` ``(n, C, H, W)``; ``one_run(todo, series, restart) -> (adv, found)`` attacks the rows ``todo`` ``(m,)``
    of ``x0``. Returns ``adv`` ``(n, C, H, W)`` (the first run's adversarial that broke each sample, else ``x0``) and
    ``fooled`` ``(n,)``; stops as soon as every sample is broken.
    """
    adv = x0.clone()
    fooled = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
    for j in range(n_series):
        for r in range(n_restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                return adv, fooled
            a, f = one_run(todo, j, r)
            hit = todo[f]
            adv[hit] = a[f]
            fooled[hit] = True
    return adv, fooled


def _apgd_multi(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    clean_logits: torch.Tensor,
    eps: float,
    norm: str,
    loss: str,
    n_iter: int,
    n_restarts: int,
    n_target_classes: int,
    rho: float,
    gen: torch.Generator,
    tally: _Tally,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """APGD with restarts (and, for ``dlr-targeted``, one series of runs per target) on clean-correct samples."""
    targets = _ranked_targets(clean_logits, n_target_classes) if loss == "dlr-targeted" else None

    def one_run(todo: torch.Tensor, j: int, _restart: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = targets[todo, j] if targets is not None else None
        return _apgd_run(model, x0[todo], y[todo], t, eps, norm, loss, n_iter, rho, gen, tally, rows[todo])

    return _series_of_runs(x0, targets.shape[1] if targets is not None else 1, n_restarts, one_run)


def _prepare(
    model: object,
    images: object,
    labels: object,
    eps: object,
    norm: object,
    seed: object,
    batch_size: object,
    counter: object,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float, str, int, PassCounter | None]:
    check_model(model)
    check_images(images)
    assert isinstance(images, torch.Tensor) and isinstance(model, torch.nn.Module)
    device = model_device(model, images.device)
    x = images.detach().to(device)
    y = check_labels(labels, x.shape[0], device)
    eps = check_positive(eps, "eps", allow_zero=True)
    norm = check_norm(norm)
    if not isinstance(seed, torch.Generator):
        make_generator(seed)  # type: ignore[arg-type]  # validates what came
    n = x.shape[0]
    chunk = n if batch_size is None else check_int(batch_size, "batch_size")
    return model, x, y, eps, norm, chunk, _check_counter(counter, n)


def _chunks(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, n)) for s in range(0, n, max(chunk, 1))]


AttackBody = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, _Tally, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
]


def _on_clean_correct(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    chunk: int,
    counter: PassCounter | None,
    attack: AttackBody,
    check_classes: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """The frame shared by :func:`apgd`, :func:`fab_targeted` and :func:`square`: per chunk of ``chunk`` samples of
    ``x`` ``(B, C, H, W)``, one counted clean forward, ``check_classes(K)`` on the number of classes, then
    ``attack(x0, y0, clean_logits0, tally, rows0) -> (adv, found)`` on the clean-correct rows only (skipped for
    ``eps = 0`` or none). Returns ``(B, C, H, W)``: the attack's adversarial where it found one, else the clean
    image; the passes go into ``counter``.
    """
    n = x.shape[0]
    adv = x.clone()
    tally = _Tally(n, x.device)
    with eval_mode(model):
        for s, e in _chunks(n, chunk):
            rows = torch.arange(s, e, device=x.device)
            with torch.no_grad():
                clean = logits_of(model, x[s:e]).detach()
            tally.forward(rows)
            if check_classes is not None:
                check_classes(clean.shape[1])
            ok = (clean.argmax(dim=1) == y[s:e]).nonzero().squeeze(1)
            if eps == 0 or ok.numel() == 0:
                continue
            a, f = attack(x[s:e][ok], y[s:e][ok], clean[ok], tally, rows[ok])
            adv[s + ok[f]] = a[f]
    tally.into(counter)
    return adv


def apgd(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    loss: str = "ce",
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int = 9,
    rho: float = 0.75,
    seed: int | torch.Generator = 0,
    batch_size: int | None = None,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """Auto-PGD (Croce & Hein 2020): PGD with momentum and an adaptive step size, L∞ or L2.

    Parameters
    ----------
    model:
        ``nn.Module``, ``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)``; images are moved to its device.
    images:
        ``(B, C, H, W)`` clean images in ``[0, 1]``.
    labels:
        ``(B,)`` true classes.
    eps:
        Budget in ``norm`` (pixel units).
    norm:
        ``"linf"`` or ``"l2"``.
    loss:
        ``"ce"`` (cross-entropy), ``"dlr"`` (:func:`dlr_loss`) or ``"dlr-targeted"`` (:func:`dlr_loss_targeted`,
        one series of ``n_restarts`` runs for each of the ``n_target_classes`` highest-scoring other classes,
        i.e. APGD-T).
    n_iter:
        Iterations per run (step-size checkpoints :func:`apgd_checkpoints`).
    n_restarts:
        Runs from fresh random starts (per target for ``dlr-targeted``); each run attacks only the
        samples that no earlier run broke.
    n_target_classes:
        Targets of ``dlr-targeted`` (capped at ``K - 1``).
    rho:
        Step-size halving threshold: fraction of loss-increasing steps at or below which the step is halved.
    seed:
        Seed (int) or ``torch.Generator`` of the random starts.
    batch_size:
        Attack this many samples at a time (``None`` = all at once).
    counter:
        Optional :class:`PassCounter` of ``B`` samples, incremented in place.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)`` on the images' device: the first misclassified iterate where one was found, else
        the clean image (also for samples misclassified to begin with). ``‖adv - x‖ <= eps``, values in ``[0, 1]``.
    """
    model, x, y, eps, norm, chunk, counter = _prepare(model, images, labels, eps, norm, seed, batch_size, counter)
    if loss not in _LOSSES:
        raise RobustnessInputError(f"loss must be one of {list(_LOSSES)}; got {loss!r}")
    n_iter = check_int(n_iter, "n_iter")
    n_restarts = check_int(n_restarts, "n_restarts")
    rho = check_positive(rho, "rho")
    gen = make_generator(seed, "apgd", loss)

    def attack(
        x0: torch.Tensor, y0: torch.Tensor, clean: torch.Tensor, tally: _Tally, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nt = _check_targets(n_target_classes, clean.shape[1], "apgd") if loss == "dlr-targeted" else 1
        return _apgd_multi(model, x0, y0, clean, eps, norm, loss, n_iter, n_restarts, nt, rho, gen, tally, rows)

    adv = _on_clean_correct(
        model, x, y, eps, chunk, counter, attack, check_classes=lambda k: _check_loss_classes(loss, k)
    )
    return adv.to(images.device)


def _check_loss_classes(loss: str, k: int) -> None:
    need = {"ce": 2, "dlr": 3, "dlr-targeted": 4}[loss]
    if k < need:
        raise RobustnessInputError(f"loss {loss!r} needs a model with at least {need} classes; it returns {k}")


# ------------------------------------------------------------------------------------------- FAB


def _hyperplane_projection(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Smallest ``d`` (in ``norm``) with ``w·(t + d) = b`` and ``0 <= t + d <= 1``, rows independent.

    ``t``, ``w``: ``(n, D)``; ``b``: ``(n,)``. Where the hyperplane cannot be reached inside the box, the box
    corner that gets closest to it. Solved exactly: with ``room_i`` the distance to the box in the useful
    direction of coordinate ``i``, the reachable progress ``Σ |w_i| min(λ·u_i, room_i)`` (``u_i = 1`` for L∞,
    ``|w_i|`` for L2: the KKT form ``d = clip(λ·w, box)``) is piecewise linear and increasing in ``λ``; its
    breakpoints are sorted once and the segment holding the required progress is found by counting.
    """
    t64, w64, b64 = t.double(), w.double(), b.double()
    need = b64 - (w64 * t64).sum(dim=1)
    wp = w64 * torch.where(need >= 0, 1.0, -1.0)[:, None]  # orient: the progress wp·d must be |need|
    need = need.abs()
    room = torch.where(wp > 0, 1.0 - t64, t64).clamp_min(0.0)
    aw = wp.abs()
    used = aw > 0
    if norm == "linf":
        slope, brk, unit = aw, room, torch.ones_like(aw)
    else:
        slope, brk, unit = aw * aw, room / torch.where(used, aw, torch.ones_like(aw)), aw
    brk = torch.where(used, brk, torch.zeros_like(brk))
    sat = aw * room
    brk_sorted, order = brk.sort(dim=1)
    slope_sorted, sat_sorted = slope.gather(1, order), sat.gather(1, order)
    sat_cum = sat_sorted.cumsum(dim=1)
    slope_total = slope_sorted.sum(dim=1, keepdim=True)
    slope_tail = slope_total - slope_sorted.cumsum(dim=1)
    progress = sat_cum + brk_sorted * slope_tail  # reachable progress at λ = brk_sorted[:, k]
    k = (progress < need[:, None]).sum(dim=1)  # first segment reaching `need`
    dims = t.shape[1]
    prev = (k - 1).clamp(min=0)[:, None]
    sat_before = torch.where(k > 0, sat_cum.gather(1, prev).squeeze(1), torch.zeros_like(need))
    slope_after = torch.where(k > 0, slope_tail.gather(1, prev).squeeze(1), slope_total.squeeze(1))
    lam = (need - sat_before) / slope_after.clamp_min(1e-300)
    lam = torch.where(k < dims, lam, brk_sorted[:, -1])
    d = torch.sign(wp) * torch.minimum(lam[:, None] * unit, room)
    return torch.where(used, d, torch.zeros_like(d)).to(t.dtype)


def _fab_run(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    norm: str,
    n_iter: int,
    random_start: bool,
    gen: torch.Generator,
    tally: _Tally,
    rows: torch.Tensor,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One targeted FAB run (Croce & Hein 2020b) on clean-correct samples; stops per sample once it finds an
    adversarial example within ``eps``. Returns ``(adv (n, ...), fooled (n,) bool)``.

    Pass economy: while a sample has not yet been adversarial in this run, the gradient pass at the new
    iterate doubles as the check of the previous step (the reference runs a separate forward). At its first
    adversarial iterate beyond ``eps`` it steps back towards the clean image (``beta``) and the next step uses
    the same linearized boundary (``df`` moved to the new point to first order, exact for the linear model);
    from then on it is checked by a separate forward before each gradient pass, as in the reference.
    """
    n = x0.shape[0]
    device = x0.device
    adv = x0.clone()
    fooled = torch.zeros(n, dtype=torch.bool, device=device)
    x1 = x0.clone()
    if random_start:
        shape = tuple(x0.shape)
        r = (
            2 * torch.rand(shape, generator=gen, device=gen.device) - 1
            if norm == "linf"
            else torch.randn(shape, generator=gen, device=gen.device)
        )
        x1 = (x0 + 0.5 * eps * _normalize(r.to(device=device, dtype=x0.dtype), norm)).clamp(0.0, 1.0)
    pos = torch.arange(n, device=device)
    x0w, yw, tw = x0, y, target
    near_boundary = torch.zeros(n, dtype=torch.bool, device=device)  # has been adversarial in this run

    def logits_diff(
        xs: torch.Tensor, ys: torch.Tensor, ts: torch.Tensor, need_grad: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        xs = xs.detach().requires_grad_(need_grad)
        with torch.enable_grad() if need_grad else torch.no_grad():
            logits = logits_of(model, xs)
            diff = logits.gather(1, ts[:, None]).squeeze(1) - logits.gather(1, ys[:, None]).squeeze(1)
            g = None
            if need_grad:
                g = torch.autograd.grad(diff.sum(), xs)[0] if diff.requires_grad else torch.zeros_like(xs)
        return logits.detach(), diff.detach(), (g.detach() if g is not None else None)

    def settle(wrong: torch.Tensor) -> torch.Tensor:
        """Record adversarials within eps among ``wrong`` rows; return the mask of rows to keep."""
        within = wrong & (_norms(x1 - x0w, norm) <= eps)
        hit = pos[within]
        adv[hit] = x1[within]
        fooled[hit] = True
        return ~within

    for it in range(n_iter + 1):
        if pos.numel() == 0:
            break
        check = it > 0 or random_start
        if it == n_iter:  # final check of the last step
            logits, _, _ = logits_diff(x1, yw, tw, False)
            tally.forward(rows[pos])
            settle(logits.argmax(dim=1) != yw)
            break
        if check and bool(near_boundary.any()):
            sel = near_boundary.nonzero().squeeze(1)
            logits, _, _ = logits_diff(x1[sel], yw[sel], tw[sel], False)
            tally.forward(rows[pos[sel]])
            wrong = torch.zeros_like(near_boundary)
            wrong[sel] = logits.argmax(dim=1) != yw[sel]
            keep = settle(wrong)
            far = wrong & keep
            x1 = torch.where(_view(far, x1), x0w + beta * (x1 - x0w), x1)
            pos, x0w, yw, tw, x1, near_boundary = (t[keep] for t in (pos, x0w, yw, tw, x1, near_boundary))
            if pos.numel() == 0:
                break
        logits, df, dg = logits_diff(x1, yw, tw, True)
        tally.forward(rows[pos], backward=True)
        assert dg is not None
        if check:
            wrong = logits.argmax(dim=1) != yw
            keep = settle(wrong)
            first_far = wrong & keep & ~near_boundary
            if bool(first_far.any()):
                back = x0w + beta * (x1 - x0w)
                shift = ((back - x1) * dg).reshape(x1.shape[0], -1).sum(dim=1)
                df = torch.where(first_far, df + shift, df)
                x1 = torch.where(_view(first_far, x1), back, x1)
                near_boundary = near_boundary | first_far
            if not bool(keep.all()):
                pos, x0w, yw, tw, x1, near_boundary = (t[keep] for t in (pos, x0w, yw, tw, x1, near_boundary))
                df, dg = df[keep], dg[keep]
                if pos.numel() == 0:
                    break
        m = x1.shape[0]
        w = dg.reshape(m, -1)
        b = (w * x1.reshape(m, -1)).sum(dim=1) - df  # linearized boundary f_t - f_y = 0
        d = _hyperplane_projection(
            torch.cat((x1.reshape(m, -1), x0w.reshape(m, -1))), torch.cat((w, w)), torch.cat((b, b)), norm
        )
        d1, d2 = d[:m].reshape(x1.shape), d[m:].reshape(x1.shape)
        a1 = _norms(d1, norm).clamp_min(1e-8)
        a2 = _norms(d2, norm).clamp_min(1e-8)
        alpha = _view((a1 / (a1 + a2)).clamp(0.0, alpha_max), x1)
        x1 = ((x1 + eta * d1) * (1 - alpha) + (x0w + eta * d2) * alpha).clamp(0.0, 1.0)
    return adv, fooled


def _fab_multi(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    clean_logits: torch.Tensor,
    eps: float,
    norm: str,
    n_iter: int,
    n_restarts: int,
    n_target_classes: int,
    gen: torch.Generator,
    tally: _Tally,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Targeted FAB with restarts, one series of runs per target, on clean-correct samples."""
    targets = _ranked_targets(clean_logits, n_target_classes)

    def one_run(todo: torch.Tensor, j: int, restart: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _fab_run(
            model, x0[todo], y[todo], targets[todo, j], eps, norm, n_iter, restart > 0, gen, tally, rows[todo]
        )

    return _series_of_runs(x0, targets.shape[1], n_restarts, one_run)


def fab_targeted(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int = 9,
    seed: int | torch.Generator = 0,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """Targeted FAB (Fast Adaptive Boundary, Croce & Hein 2020b), L∞ or L2, as used by AutoAttack ("fab-t").

    Each step linearizes ``z_t - z_y`` at the current point, projects both the current point and the clean
    image on that linearized boundary (exactly, inside the ``[0, 1]`` box: :func:`_hyperplane_projection`),
    and moves to a convex combination biased towards the clean image (``alpha_max = 0.1``, overshoot
    ``eta = 1.05``); after an adversarial step it records the point and steps back (``beta = 0.9``).
    Targets: the ``n_target_classes`` highest-scoring other classes at the clean image, one series of
    ``n_restarts`` runs each (restarts after the first start at a random point at distance ``eps/2``).

    Parameters
    ----------
    model, images, labels, norm, seed, counter:
        As :func:`apgd`.
    eps:
        Budget: a sample counts as broken once FAB finds an adversarial example within ``eps``
        (FAB itself is a minimal-norm attack; it stops on a sample at that point).
    n_iter:
        FAB iterations per run.

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)``: an adversarial example within ``eps`` where one was found, else the clean image.
    """
    model, x, y, eps, norm, _, counter = _prepare(model, images, labels, eps, norm, seed, None, counter)
    n_iter = check_int(n_iter, "n_iter")
    n_restarts = check_int(n_restarts, "n_restarts")
    gen = make_generator(seed, "fab-t")

    def attack(
        x0: torch.Tensor, y0: torch.Tensor, clean: torch.Tensor, tally: _Tally, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nt = _check_targets(n_target_classes, clean.shape[1], "fab_targeted")
        return _fab_multi(model, x0, y0, clean, eps, norm, n_iter, n_restarts, nt, gen, tally, rows)

    adv = _on_clean_correct(
        model,
        x,
        y,
        eps,
        x.shape[0],
        counter,
        attack,
        check_classes=lambda k: _check_targets(n_target_classes, k, "fab_targeted"),
    )
    return adv.to(images.device)


# ---------------------------------------------------------------------------------------- Square


def _rectangles(a: int, b: int) -> torch.Tensor:
    """``(a, b)`` bump of nested rectangles with weights ``1/(k+1)²`` around the centre, unit L2 norm."""
    out = torch.zeros(a, b, dtype=torch.float64)
    r, c = a // 2, b // 2
    for k in range(max(a // 2 + 1, b // 2 + 1)):
        out[max(r, 0) : min(r + 2 * k + 1, a), max(c, 0) : min(c + 2 * k + 1, b)] += 1.0 / (k + 1) ** 2
        r -= 1
        c -= 1
    return out / out.norm().clamp_min(1e-30)


def _square_l2_window(s: int) -> torch.Tensor:
    """``(s, s)`` L2 Square window: positive bump on the top half, negative on the bottom, unit norm."""
    w = torch.cat((_rectangles(s // 2, s), -_rectangles(s - s // 2, s)))
    return (w / w.norm().clamp_min(1e-30)).float()


def _square_run(
    model: torch.nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    n_queries: int,
    p_init: float,
    gen: torch.Generator,
    tally: _Tally,
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x0.shape
    device = x0.device
    n_features = c * h * w

    def rint(high: int) -> int:  # uniform integer in [0, high]
        return int(torch.randint(0, high + 1, (1,), generator=gen, device=gen.device))

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randint(0, 2, shape, generator=gen, device=gen.device) * 2 - 1).to(device=device, dtype=x0.dtype)

    def margin_of(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = logits_of(model, xs)
        return logit_margin(logits, ys).float()

    windows: dict[tuple[int, bool], torch.Tensor] = {}

    def l2_window(s: int) -> torch.Tensor:
        flip = bool(torch.rand(1, generator=gen, device=gen.device) > 0.5)
        if (s, flip) not in windows:
            win = _square_l2_window(s)
            windows[(s, flip)] = (win.t() if flip else win).to(device=device, dtype=x0.dtype).contiguous()
        return windows[(s, flip)]

    if norm == "linf":
        x_best = (x0 + eps * signs((n, c, 1, w))).clamp(0.0, 1.0)
    else:
        s0 = max(h // 5, 1)
        start = (h - 5 * s0) // 2
        delta = torch.zeros_like(x0)
        for i in range(h // s0):
            for j in range(w // s0):
                vh, vw = start + i * s0, start + j * s0
                if vh + s0 > h or vw + s0 > w or vh < 0 or vw < 0:
                    continue
                delta[:, :, vh : vh + s0, vw : vw + s0] += l2_window(s0)[None, None] * signs((n, c, 1, 1))
        x_best = (x0 + eps * _normalize(delta, "l2")).clamp(0.0, 1.0)
    margin = margin_of(x_best, y)
    tally.forward(rows)
    adv = x0.clone()
    fooled = margin <= 0
    adv[fooled] = x_best[fooled]
    keep = ~fooled
    pos, x0w, yw, x_best, margin = torch.arange(n, device=device)[keep], x0[keep], y[keep], x_best[keep], margin[keep]

    for it in range(n_queries):
        if pos.numel() == 0:
            break
        p = square_p(p_init, it)
        m = pos.numel()
        if norm == "linf":
            s = min(max(int(round(math.sqrt(p * n_features / c))), 1), h, w)
            vh, vw = rint(h - s), rint(w - s)
            x_new = x_best.clone()
            x_new[:, :, vh : vh + s, vw : vw + s] = (
                x0w[:, :, vh : vh + s, vw : vw + s] + eps * signs((m, c, 1, 1))
            ).clamp(0.0, 1.0)
        else:
            s = max(int(round(math.sqrt(p * n_features / c))), 3)
            s = min(s + 1 if s % 2 == 0 else s, h, w)
            vh, vw, vh2, vw2 = rint(h - s), rint(w - s), rint(h - s), rint(w - s)
            delta = x_best - x0w
            win1 = delta[:, :, vh : vh + s, vw : vw + s]
            norm_win1 = win1.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            norm_img = _view(_norms(delta, "l2"), delta)
            union = torch.zeros((1, 1, h, w), dtype=x0.dtype, device=device)
            union[:, :, vh : vh + s, vw : vw + s] = 1.0
            union[:, :, vh2 : vh2 + s, vw2 : vw2 + s] = 1.0
            norm_union = (delta * union).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
            new = l2_window(s)[None, None] * signs((m, c, 1, 1)) + win1 / (1e-12 + norm_win1)
            budget = ((eps**2 - norm_img**2).clamp_min(0.0) / c + norm_union**2).sqrt()
            new = new / (1e-12 + new.pow(2).sum(dim=(2, 3), keepdim=True).sqrt()) * budget
            delta = delta.clone()
            delta[:, :, vh2 : vh2 + s, vw2 : vw2 + s] = 0.0
            delta[:, :, vh : vh + s, vw : vw + s] = new
            x_new = (x0w + eps * _normalize(delta, "l2")).clamp(0.0, 1.0)
        new_margin = margin_of(x_new, yw)
        tally.forward(rows[pos])
        better = new_margin < margin
        x_best = torch.where(_view(better, x_best), x_new, x_best)
        margin = torch.where(better, new_margin, margin)
        done = margin <= 0
        if bool(done.any()):
            hit = pos[done]
            adv[hit] = x_best[done]
            fooled[hit] = True
            keep = ~done
            pos, x0w, yw, x_best, margin = pos[keep], x0w[keep], yw[keep], x_best[keep], margin[keep]
    return adv, fooled


def square(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    n_queries: int = 5000,
    p_init: float = 0.8,
    seed: int | torch.Generator = 0,
    counter: PassCounter | None = None,
) -> torch.Tensor:
    """Square attack (Andriushchenko et al. 2020), score-based black box on the margin loss, L∞ or L2.

    L∞: start from vertical ±ε stripes, then each query re-draws a random ``s×s`` window to ``x ± ε`` (one
    sign per sample and channel); L2: start from a grid of ±bumps scaled to ``‖δ‖₂ = ε``, then each query
    moves the perturbation mass of a second window into a new bump in the first, keeping ``‖δ‖₂ = ε``.
    A candidate is kept when it lowers the margin ``z_y - max_{j≠y} z_j``; a sample stops at margin ``<= 0``.
    The window size follows the published schedule of ``p`` (``p_init`` halved at queries 10, 50, 200, 500,
    1000, 2000, 4000, 6000, 8000), as in AutoAttack (not rescaled to ``n_queries``).

    Parameters
    ----------
    model, images, labels, norm, seed, counter:
        As :func:`apgd`.
    eps:
        Budget in ``norm``.
    n_queries:
        Queries per sample (one forward each), besides the initial one.
    p_init:
        Initial fraction of pixels per window (0.8 for L∞ and L2, AutoAttack's setting).

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)``: the adversarial example where one was found, else the clean image.
    """
    model, x, y, eps, norm, _, counter = _prepare(model, images, labels, eps, norm, seed, None, counter)
    n_queries = check_int(n_queries, "n_queries", minimum=0)
    p_init = check_positive(p_init, "p_init")
    gen = make_generator(seed, "square")

    def attack(
        x0: torch.Tensor, y0: torch.Tensor, clean: torch.Tensor, tally: _Tally, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _square_run(model, x0, y0, eps, norm, n_queries, p_init, gen, tally, rows)

    adv = _on_clean_correct(model, x, y, eps, x.shape[0], counter, attack)
    return adv.to(images.device)


# ------------------------------------------------------------------------------------ the cascade


@dataclass
class AutoAttackResult:
    """Outcome of :func:`auto_attack` on ``B`` samples.

    Attributes
    ----------
    adv:
        ``(B, C, H, W)`` on the images' device: for broken samples the adversarial example of the attack that
        broke them (within ``eps`` and ``[0, 1]``), else the clean image.
    clean_correct:
        ``(B,)`` bool, clean prediction equals the label.
    robust:
        ``(B,)`` bool, clean-correct and not broken by any attack of the cascade.
    broken_by:
        ``(B,)`` object: ``""`` if robust, ``"clean"`` if misclassified clean, else the cascade name of the
        attack that broke it (``"apgd-ce"``, ``"apgd-t"``, ``"fab-t"``, ``"square"``, ``"apgd-dlr"``).
    robust_after:
        Attack name -> ``(B,)`` bool: cumulative robust mask after that attack of the cascade (in order).
    forward_passes, backward_passes:
        ``(B,)`` int64 model passes per sample over the whole evaluation (clean and verification passes included).
    seconds:
        Wall time per attack name, plus ``"clean"``, ``"verify"`` and ``"total"``.
    settings:
        Every setting of the run (norm, eps, version, attacks, iterations, restarts, targets, queries, seed...).
    """

    adv: torch.Tensor
    clean_correct: np.ndarray
    robust: np.ndarray
    broken_by: np.ndarray
    robust_after: dict[str, np.ndarray]
    forward_passes: np.ndarray
    backward_passes: np.ndarray
    seconds: dict[str, float]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def robust_accuracy(self) -> float:
        """Fraction of all samples that are robust."""
        return float(self.robust.mean()) if self.robust.size else float("nan")

    @property
    def clean_accuracy(self) -> float:
        """Fraction of all samples classified correctly without attack."""
        return float(self.clean_correct.mean()) if self.clean_correct.size else float("nan")


def auto_attack(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    n_iter: int = 100,
    n_restarts: int = 1,
    n_target_classes: int = 9,
    square_queries: int = 5000,
    seed: int | torch.Generator = 0,
    batch_size: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> AutoAttackResult:
    """AutoAttack (Croce & Hein 2020): the cascade APGD-CE -> APGD-T -> FAB-T -> Square on unbroken samples.

    Parameters
    ----------
    model:
        ``nn.Module``, ``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)`` (``K >= 4`` for the targeted
        attacks); images are moved to its device.
    images:
        ``(B, C, H, W)`` clean images in ``[0, 1]``.
    labels:
        ``(B,)`` true classes.
    eps:
        Budget in ``norm``.
    norm:
        ``"linf"`` or ``"l2"``.
    version:
        ``"standard"`` (the reference's standard version: :data:`STANDARD_ATTACKS`) or ``"custom"``
        (``attacks`` required).
    attacks:
        Cascade to run instead, names from :data:`CASCADE_ATTACKS`, in order (implies ``"custom"``).
    n_iter:
        Iterations of APGD and FAB (100).
    n_restarts:
        Restarts of APGD-CE / APGD-DLR, and per target of APGD-T and FAB-T (1).
    n_target_classes:
        Targets of APGD-T and FAB-T (9; capped at ``K - 1``).
    square_queries:
        Queries of Square (5,000).
    seed:
        Seed (int) or generator; each attack draws from its own generator derived from it.
    batch_size:
        Samples per attack batch (``None`` = all still-unbroken samples at once).
    progress:
        Optional callback ``progress(attack_name, n_robust, n_total)`` called after the clean pass
        (``"clean"``) and after each attack.

    Returns
    -------
    AutoAttackResult
    """
    model, x, y, eps, norm, chunk, _ = _prepare(model, images, labels, eps, norm, seed, batch_size, None)
    if attacks is None:
        if version != "standard":
            raise RobustnessInputError(f"version must be 'standard' (or 'custom' with attacks=[...]); got {version!r}")
        cascade = list(STANDARD_ATTACKS)
    else:
        if isinstance(attacks, str) or not all(isinstance(a, str) for a in attacks) or not len(attacks):
            raise RobustnessInputError(
                f"attacks must be a non-empty list of names from {list(CASCADE_ATTACKS)}; got {attacks!r}"
            )
        bad = [a for a in attacks if a not in CASCADE_ATTACKS]
        if bad:
            raise RobustnessInputError(f"unknown attack(s) {bad}; expected names from {list(CASCADE_ATTACKS)}")
        cascade = list(attacks)
        version = "custom"
    n_iter = check_int(n_iter, "n_iter")
    n_restarts = check_int(n_restarts, "n_restarts")
    n_target_classes = check_int(n_target_classes, "n_target_classes")
    square_queries = check_int(square_queries, "square_queries", minimum=0)
    n = x.shape[0]
    device = x.device
    tally = _Tally(n, device)
    seconds: dict[str, float] = {}
    start_all = time.perf_counter()
    adv = x.clone()
    broken_by = np.full(n, "", dtype=object)
    robust_after: dict[str, np.ndarray] = {}
    with eval_mode(model):
        t0 = time.perf_counter()
        clean_parts = []
        with torch.no_grad():
            for s, e in _chunks(n, chunk):
                clean_parts.append(logits_of(model, x[s:e]).detach())
        clean = torch.cat(clean_parts)
        tally.forward(torch.arange(n, device=device))
        k = clean.shape[1]
        if any(a in ("apgd-t", "fab-t") for a in cascade):
            _check_targets(n_target_classes, k, "auto_attack")
            _check_loss_classes("dlr-targeted", k)
        if "apgd-dlr" in cascade:
            _check_loss_classes("dlr", k)
        nt = min(n_target_classes, k - 1)
        apgd_losses = {"apgd-ce": ("ce", 1), "apgd-dlr": ("dlr", 1), "apgd-t": ("dlr-targeted", nt)}
        robust = clean.argmax(dim=1) == y
        clean_correct = robust.cpu().numpy().copy()
        broken_by[~clean_correct] = "clean"
        seconds["clean"] = time.perf_counter() - t0
        if progress is not None:
            progress("clean", int(robust.sum()), n)

        for name in cascade:
            t0 = time.perf_counter()
            todo_all = robust.nonzero().squeeze(1)
            gen = make_generator(seed, "autoattack", name)
            if eps > 0:
                for s, e in _chunks(todo_all.numel(), chunk):
                    todo = todo_all[s:e]
                    xs, ys, cs = x[todo], y[todo], clean[todo]
                    if name in apgd_losses:
                        loss, n_series = apgd_losses[name]
                        a, f = _apgd_multi(
                            model, xs, ys, cs, eps, norm, loss, n_iter, n_restarts, n_series, 0.75, gen, tally, todo
                        )
                    elif name == "fab-t":
                        a, f = _fab_multi(model, xs, ys, cs, eps, norm, n_iter, n_restarts, nt, gen, tally, todo)
                    else:
                        a, f = _square_run(model, xs, ys, eps, norm, square_queries, 0.8, gen, tally, todo)
                    hit = todo[f]
                    adv[hit] = a[f]
                    robust[hit] = False
                    broken_by[hit.cpu().numpy()] = name
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            robust_after[name] = robust.cpu().numpy().copy()
            if progress is not None:
                progress(name, int(robust.sum()), n)

        # verification: every reported adversarial is misclassified, within eps and in [0, 1] (one forward each)
        t0 = time.perf_counter()
        broken = (~robust & torch.from_numpy(clean_correct).to(device)).nonzero().squeeze(1)
        if broken.numel():
            adv[broken] = _project_ball(adv[broken], x[broken], eps, norm)
            with torch.no_grad():
                pred = torch.cat(
                    [logits_of(model, adv[broken[s:e]]).argmax(dim=1) for s, e in _chunks(broken.numel(), chunk)]
                )
            tally.forward(broken)
            size = _norms(adv[broken] - x[broken], norm)
            invalid = (pred == y[broken]) | (size > eps * (1 + 1e-5) + 1e-6)
            if bool(invalid.any()):  # float flakiness at the decision boundary: the sample stays robust
                undo = broken[invalid]
                robust[undo] = True
                adv[undo] = x[undo]
                broken_by[undo.cpu().numpy()] = ""
                for name in robust_after:
                    robust_after[name][undo.cpu().numpy()] = True
        seconds["verify"] = time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - start_all
    counts = PassCounter.zeros(n)
    tally.into(counts)
    settings = {
        "norm": norm,
        "eps": eps,
        "version": version,
        "attacks": cascade,
        "n_iter": n_iter,
        "n_restarts": n_restarts,
        "n_target_classes": nt,
        "square_queries": square_queries,
        "square_p_init": 0.8,
        "apgd_rho": 0.75,
        "fab": {"alpha_max": 0.1, "eta": 1.05, "beta": 0.9},
        "seed": seed if not isinstance(seed, torch.Generator) else "generator",
        "batch_size": batch_size,
        "n_samples": n,
    }
    return AutoAttackResult(
        adv=adv.to(images.device),
        clean_correct=clean_correct,
        robust=robust.cpu().numpy(),
        broken_by=broken_by,
        robust_after=robust_after,
        forward_passes=counts.forward,
        backward_passes=counts.backward,
        seconds=seconds,
        settings=settings,
    )


# ------------------------------------------------------------------------------------- registry


def registry_adapter(attack: str, norm: str) -> Callable[..., torch.Tensor]:
    """An ``ATTACKS`` entry function (``attacks.py``) for cascade attack ``attack`` (or ``"autoattack"``) in ``norm``.

    The returned function has :func:`~robustlens.analysis.robustness.attacks.run_attack`'s calling convention
    ``fn(model, images, labels, eps, *, random_state, **params)`` and returns the adversarial images.
    """
    if attack not in CASCADE_ATTACKS + ("autoattack",):
        raise RobustnessInputError(f"unknown AutoAttack attack {attack!r}")
    norm = check_norm(norm)

    def run(
        model: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        eps: float,
        *,
        random_state: int | torch.Generator = 0,
        **params: Any,
    ) -> torch.Tensor:
        if attack == "autoattack":
            return auto_attack(model, images, labels, eps, norm=norm, seed=random_state, **params).adv
        if attack == "fab-t":
            return fab_targeted(model, images, labels, eps, norm=norm, seed=random_state, **params)
        if attack == "square":
            return square(model, images, labels, eps, norm=norm, seed=random_state, **params)
        loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[attack]
        return apgd(model, images, labels, eps, norm=norm, loss=loss, seed=random_state, **params)

    run.__name__ = f"{attack.replace('-', '_')}_{norm}"
    run.__doc__ = f"Registry adapter: {attack} ({norm}) from robustlens.analysis.robustness.autoattack."
    return run
