"""Untargeted evasion attacks on image classifiers, batched in torch.

All attacks take a model (``nn.Module``: ``(B, C, H, W)`` images in ``[0, 1]`` -> logits ``(B, K)``,
normalization inside the model), images ``(B, C, H, W)`` in ``[0, 1]`` and integer labels ``(B,)``,
and return adversarial images of the same shape in ``[0, 1]`` on the images' device. The model is
put in eval mode for the call (previous per-module modes restored). The loss of the gradient attacks
is cross-entropy on the logits; "untargeted" means: move away from ``labels``.

==============  =======  ===============================================================================
registry name   norm     attack
==============  =======  ===============================================================================
fgsm            L∞       :func:`fgsm` — one signed-gradient step of size ``eps`` (Goodfellow et al. 2015)
pgd_linf        L∞       :func:`pgd` — projected gradient descent (Madry et al. 2018)
pgd_l2          L2       :func:`pgd` with ``norm="l2"``
deepfool        L2       :func:`deepfool` — minimal L2 (Moosavi-Dezfooli et al. 2016); ``eps`` is a budget
cw_l2           L2       :func:`carlini_wagner_l2` — minimal L2 (Carlini & Wagner 2017); ``eps`` is a budget
square_linf     L∞       :func:`square_attack` — score-based black box (Andriushchenko et al. 2020)
==============  =======  ===============================================================================

FGSM and PGD follow the Adversarial Robustness Toolbox (ART 1.20) update order exactly: step
``x <- clip(x + step·d, 0, 1)`` with ``d = sign(g)`` (L∞) or ``g/‖g‖₂`` (L2, zero if ``g = 0``), then
project the total perturbation on the ε-ball (L∞: elementwise clip; L2: rescale by
``min(1, ε/‖δ‖₂)``), no clip after the projection (it stays in ``[0, 1]`` by convexity).

Cross-entropy precision: the softmax/cross-entropy on top of the logits is evaluated in float64.
In float32, a sample whose logit margin exceeds ~17 has ``softmax_y`` rounded to exactly 1, so the
gradient loses its true-class term (``p_y - 1 = 0``) and points in an arbitrary direction (ART has
this); in float64 the same loss keeps an accurate gradient up to margins of ~36. Where float32 is not
saturated the two agree to rounding, and FGSM/PGD reproduce ART's adversarial examples.

Entry points for the rest of the engine: :func:`run_attack` (uniform call by name, returns an
:class:`AttackResult`), :func:`robust_accuracy_curve` (worst case over attacks on an ε grid) and
:func:`curve_from_breaks` (the same curve from breaks already computed — the workspace run's attacks; both
share :func:`breaking_budget`, whose "never broken" is NaN).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ._common import (
    RobustnessInputError,
    check_fraction,
    check_images,
    check_int,
    check_labels,
    check_model,
    check_norm,
    check_positive,
    eval_mode,
    flat_norms,
    logit_margin,
    logits_of,
    make_generator,
    model_device,
    predict_labels,
    square_p,
)
from .autoattack import registry_adapter as _aa_adapter

#: Slack on the ε-ball membership test of an adversarial example (float rounding).
BUDGET_TOL = 1e-5
#: DeepFool stops on a sample once its label's logit trails by more than this (relative to 1 + max |logit|).
FLIP_TOL = 1e-4


# ------------------------------------------------------------------------------------- internals


def _setup(model: object, images: object, labels: object) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Validate (model, images, labels); labels returned as int64 on the images' device."""
    check_model(model)
    check_images(images)
    assert isinstance(images, torch.Tensor)
    y = check_labels(labels, images.shape[0], images.device)
    return model, images.detach(), y  # type: ignore[return-value]


def _ce_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gradient ``(B, C, H, W)`` of the summed cross-entropy of ``model(x)`` w.r.t. ``x`` (zeros if x is not used).

    The softmax/cross-entropy part runs in float64 (see the module docstring), the model in its own dtype.
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        wide = logits if logits.device.type == "mps" else logits.double()
        loss = F.cross_entropy(wide, y, reduction="sum")
    if not loss.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(loss, x)
    return grad.detach()


def _l2_unit(grad: torch.Tensor) -> torch.Tensor:
    """Per-sample ``g / ‖g‖₂`` (0 where ``g = 0``), computed as ART does: ``|g|·(1/‖g‖)·sign(g)``."""
    flat = grad.reshape(grad.shape[0], -1)
    q = flat.norm(p=2, dim=1, keepdim=True)
    inv = torch.where(q == 0, q, 1.0 / torch.where(q == 0, torch.ones_like(q), q))
    return (flat.abs() * inv).reshape(grad.shape) * grad.sign()


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project perturbations ``(B, ...)`` on the ``norm`` ball of radius ``eps`` (L2 by rescaling)."""
    if norm == "linf":
        return delta.sign() * torch.minimum(delta.abs(), torch.full_like(delta, eps))
    flat = delta.reshape(delta.shape[0], -1)
    n = flat.norm(p=2, dim=1, keepdim=True)
    scale = torch.where(n == 0, n, torch.clamp(eps / torch.where(n == 0, torch.ones_like(n), n), max=1.0))
    return (flat * scale).reshape(delta.shape)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """Uniform random point of the ``norm`` ε-ball around each sample of ``x``, clipped to ``[0, 1]``."""
    b = x.shape[0]
    d = x[0].numel()
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=torch.float32)
        delta = (2 * u - 1) * eps
    else:
        g = torch.randn((b, d), generator=generator, device=generator.device, dtype=torch.float64)
        g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)
        r = torch.rand((b, 1), generator=generator, device=generator.device, dtype=torch.float64) ** (1.0 / d)
        delta = (g * r * eps).reshape(x.shape)
    return (x + delta.to(x)).clamp(0, 1)


# ---------------------------------------------------------------------------------------- attacks


def fgsm(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | np.ndarray, eps: float) -> torch.Tensor:
    """Fast gradient sign method (L∞).

    Parameters
    ----------
    model:
        ``nn.Module``, ``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)``.
    images:
        ``(B, C, H, W)`` clean images in ``[0, 1]``.
    labels:
        ``(B,)`` classes to move away from (true labels).
    eps:
        L∞ budget (pixel units, ``>= 0``).

    Returns
    -------
    torch.Tensor
        ``clip(x + eps·sign(∇ₓ CE), 0, 1)``, shape of ``images``.
    """
    model, x, y = _setup(model, images, labels)
    eps = check_positive(eps, "eps", allow_zero=True)
    with eval_mode(model):
        grad = _ce_grad(model, x, y)
    adv = (x + eps * grad.sign()).clamp(0, 1)
    return x + _project(adv - x, eps, "linf")


def pgd(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    step_size: float | None = None,
    steps: int = 10,
    random_start: bool = False,
    restarts: int = 1,
    random_state: int | torch.Generator | None = 0,
) -> torch.Tensor:
    """Projected gradient descent on the cross-entropy (L∞ or L2), ART's update order.

    Parameters
    ----------
    model, images, labels:
        As :func:`fgsm`.
    eps:
        Budget in the chosen norm (pixel units, ``>= 0``).
    norm:
        ``"linf"`` (signed gradient steps) or ``"l2"`` (L2-normalized gradient steps).
    step_size:
        Step length per iteration in the chosen norm; default ``2.5·eps/steps`` (Madry et al.).
    steps:
        Number of iterations (``>= 1``).
    random_start:
        Start from a uniform random point of the ε-ball instead of the clean image.
    restarts:
        Number of runs, each from a fresh random start (only used with ``random_start``); a sample
        keeps the first run's result that misclassifies it, else the last run's.
    random_state:
        Seed / generator for the random starts.

    Returns
    -------
    torch.Tensor
        Adversarial images, ``‖x_adv - x‖ <= eps`` in ``norm``, values in ``[0, 1]``.
    """
    model, x, y = _setup(model, images, labels)
    norm = check_norm(norm)
    eps = check_positive(eps, "eps", allow_zero=True)
    steps = check_int(steps, "steps")
    restarts = check_int(restarts, "restarts")
    step = 2.5 * eps / steps if step_size is None else check_positive(step_size, "step_size")
    gen = make_generator(random_state, "pgd") if random_start else None
    if not random_start:
        restarts = 1
    best = x.clone()
    fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with eval_mode(model):
        for _ in range(restarts):
            adv = _random_start(x, eps, norm, gen) if gen is not None else x.clone()
            for _ in range(steps):
                grad = _ce_grad(model, adv, y)
                direction = grad.sign() if norm == "linf" else _l2_unit(grad)
                adv = (adv + step * direction).clamp(0, 1)
                adv = x + _project(adv - x, eps, norm)
            if restarts == 1:
                return adv.detach()
            now = predict_labels(model, adv) != y
            take = ~fooled
            best[take] = adv[take]
            fooled |= now
            if bool(fooled.all()):
                break
    return best.detach()


def _logits_nograd(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits ``(B, K)`` of ``x`` without gradient tracking."""
    with torch.no_grad():
        return logits_of(model, x).detach()


def _class_grads(model: torch.nn.Module, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(B, K)`` at ``x`` and gradients ``(B, M, C, H, W)`` of logits ``classes[b, m]`` w.r.t. ``x``."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        picked = logits.gather(1, classes)  # (B, M)
        grads = []
        for m in range(classes.shape[1]):
            if picked.requires_grad:
                (g,) = torch.autograd.grad(picked[:, m].sum(), x, retain_graph=m + 1 < classes.shape[1])
            else:
                g = torch.zeros_like(x)
            grads.append(g)
    return logits.detach(), torch.stack(grads, dim=1).detach()


def deepfool(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    overshoot: float = 0.02,
    max_iter: int = 50,
    candidates: int | None = 10,
) -> torch.Tensor:
    """DeepFool, minimal L2 (Moosavi-Dezfooli et al. 2016).

    Each iteration linearizes the logits at the current point and takes the smallest step that
    reaches the nearest linearized boundary between ``labels`` and another candidate class:
    ``r = (|f_l| + 1e-4)/‖w_l‖² · w_l``; the total ``r_tot`` is applied as
    ``x_adv = clip(x + (1 + overshoot)·r_tot, 0, 1)`` and the loop stops per sample once
    ``argmax model(x_adv) != label`` by a margin beyond float rounding (:data:`FLIP_TOL`).

    Parameters
    ----------
    model, images:
        As :func:`fgsm`.
    labels:
        ``(B,)`` classes to move away from; pass the clean predictions to reproduce the original
        algorithm. Samples already not predicted as their label are returned unchanged.
    overshoot:
        Relative overshoot (``>= 0``), 0.02 as in the paper.
    max_iter:
        Iteration cap per sample.
    candidates:
        Number of classes considered (the label plus the top-scoring others at the clean image);
        ``None`` = all classes.

    Returns
    -------
    torch.Tensor
        Adversarial images (unbounded L2; failures after ``max_iter`` are returned as reached).
    """
    model, x, y = _setup(model, images, labels)
    overshoot = check_positive(overshoot, "overshoot", allow_zero=True)
    max_iter = check_int(max_iter, "max_iter")
    b = x.shape[0]
    flat_dim = x[0].numel()
    with eval_mode(model):
        clean_logits = _logits_nograd(model, x)
        k = clean_logits.shape[1]
        m = k if candidates is None else min(check_int(candidates, "candidates", minimum=2), k)
        ranking = clean_logits.clone()
        ranking.scatter_(1, y[:, None], float("inf"))
        classes = ranking.topk(m, dim=1).indices  # (B, m); column 0 = label
        r_tot = torch.zeros_like(x)
        adv = x.clone()
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        for it in range(max_iter + 1):  # the last pass only checks the final iterate
            idx = active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            logits, grads = _class_grads(model, adv[idx], classes[idx])
            # Stop only once the label trails by more than float rounding: with box clipping the last step can
            # land *on* the boundary, where the predicted class flips with the batch the point is evaluated in.
            still = logit_margin(logits, y[idx]) > -FLIP_TOL * (1 + logits.abs().amax(dim=1))
            active[idx[~still]] = False
            idx, logits, grads = idx[still], logits[still], grads[still]
            if idx.numel() == 0 or it == max_iter:
                break
            f_all = logits.gather(1, classes[idx])  # (n, m)
            f = f_all[:, 1:] - f_all[:, :1]  # (n, m-1)
            w = (grads[:, 1:] - grads[:, :1]).reshape(idx.numel(), m - 1, flat_dim)
            w_norm = w.norm(dim=2) + 1e-8
            dist = f.abs() / w_norm
            l_best = dist.argmin(dim=1)
            ar = torch.arange(idx.numel(), device=x.device)
            coef = (f[ar, l_best].abs() + 1e-4) / w_norm[ar, l_best] ** 2
            r = (coef[:, None] * w[ar, l_best]).reshape((idx.numel(),) + x.shape[1:])
            r_tot[idx] = r_tot[idx] + r
            adv[idx] = (x[idx] + (1 + overshoot) * r_tot[idx]).clamp(0, 1)
    return adv.detach()


def carlini_wagner_l2(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    confidence: float = 0.0,
    initial_const: float = 1e-2,
    binary_search_steps: int = 9,
    max_iter: int = 100,
    learning_rate: float = 1e-2,
    abort_early: bool = True,
) -> torch.Tensor:
    """Carlini–Wagner L2 attack (untargeted), Adam in tanh space with a binary search over ``c``.

    Minimizes ``‖x' - x‖₂² + c·max(Z_y - max_{j≠y} Z_j + κ, 0)`` over ``x' = (tanh(w) + 1)/2``; per
    sample, ``c`` is halved towards the last success or multiplied by 10 until the first success.
    The best (smallest-L2) adversarial seen is returned; samples never fooled come back unchanged.

    Parameters
    ----------
    model, images, labels:
        As :func:`fgsm` (``labels``: classes to move away from).
    confidence:
        κ ``>= 0``: required logit margin of the adversarial class.
    initial_const:
        First ``c`` of the binary search.
    binary_search_steps:
        Number of ``c`` values tried per sample.
    max_iter:
        Adam steps per ``c``.
    learning_rate:
        Adam learning rate.
    abort_early:
        Stop the Adam loop of a ``c`` when the total loss stops decreasing (checked every
        ``max_iter // 10`` steps).

    Returns
    -------
    torch.Tensor
        Adversarial images (unbounded L2).
    """
    model, x, y = _setup(model, images, labels)
    confidence = check_positive(confidence, "confidence", allow_zero=True)
    initial_const = check_positive(initial_const, "initial_const")
    binary_search_steps = check_int(binary_search_steps, "binary_search_steps")
    max_iter = check_int(max_iter, "max_iter")
    learning_rate = check_positive(learning_rate, "learning_rate")
    b = x.shape[0]
    dims = tuple(range(1, x.ndim))
    w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
    lower = torch.zeros(b, dtype=torch.float64, device=x.device)
    upper = torch.full((b,), 1e10, dtype=torch.float64, device=x.device)
    const = torch.full((b,), initial_const, dtype=torch.float64, device=x.device)
    best_l2 = torch.full((b,), float("inf"), device=x.device)
    best_adv = x.clone()
    check_every = max(max_iter // 10, 1)
    with eval_mode(model):
        n_classes = _logits_nograd(model, x[:1]).shape[1]
        onehot = F.one_hot(y, n_classes).to(x.dtype)
        for _ in range(binary_search_steps):
            modifier = torch.zeros_like(x, requires_grad=True)
            opt = torch.optim.Adam([modifier], lr=learning_rate)
            succeeded = torch.zeros(b, dtype=torch.bool, device=x.device)
            c = const.to(x.dtype)
            prev = float("inf")
            for it in range(max_iter):
                with torch.enable_grad():
                    adv = (torch.tanh(w0 + modifier) + 1) / 2
                    logits = logits_of(model, adv)
                    real = (logits * onehot).sum(dim=1)
                    other = (logits - 1e9 * onehot).amax(dim=1)
                    l2 = (adv - x).pow(2).sum(dim=dims)
                    loss = (l2 + c * (real - other + confidence).clamp_min(0)).sum()
                    opt.zero_grad()
                    if loss.requires_grad:
                        loss.backward()
                        opt.step()
                with torch.no_grad():
                    ok = other > real + confidence
                    better = ok & (l2 < best_l2)
                    best_l2 = torch.where(better, l2.detach(), best_l2)
                    best_adv[better] = adv.detach()[better]
                    succeeded |= ok
                if abort_early and it % check_every == 0:
                    cur = float(loss.detach())
                    if cur > prev * 0.9999:
                        break
                    prev = cur
            upper = torch.where(succeeded, torch.minimum(upper, const), upper)
            lower = torch.where(succeeded, lower, torch.maximum(lower, const))
            const = torch.where(upper < 1e9, (lower + upper) / 2, const * 10)
    return best_adv.detach()


def _p_selection(p_init: float, it: int, n_iters: int) -> float:
    """Square attack's schedule of the fraction of pixels changed (original code, rescaled to ``n_iters``)."""
    return square_p(p_init, int(it / n_iters * 10000))


def square_attack(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    max_iter: int = 1000,
    p_init: float = 0.8,
    random_state: int | torch.Generator | None = 0,
) -> torch.Tensor:
    """Square attack (L∞), score-based black box: random search over square windows, margin loss.

    Only logits are queried (no gradients). Start: vertical stripes of ``±eps``; each iteration
    sets, per still-robust sample, a random ``s×s`` window of the perturbation to ``±eps`` (one sign
    per channel) and keeps it if the margin ``Z_y - max_{j≠y} Z_j`` decreases; a sample stops once its
    margin is negative. ``s`` follows the original schedule ``p`` (fraction of pixels).

    Parameters
    ----------
    model, images, labels:
        As :func:`fgsm`.
    eps:
        L∞ budget (``> 0``).
    norm:
        ``"linf"`` only (the L2 variant is not implemented).
    max_iter:
        Iterations (one model query per robust sample each).
    p_init:
        Initial fraction of pixels changed per window, in ``(0, 1)``.
    random_state:
        Seed / generator.

    Returns
    -------
    torch.Tensor
        Adversarial images, ``‖x_adv - x‖∞ <= eps``.
    """
    model, x, y = _setup(model, images, labels)
    if check_norm(norm) != "linf":
        raise RobustnessInputError(f"square_attack supports norm='linf' only; got {norm!r}")
    eps = check_positive(eps, "eps")
    max_iter = check_int(max_iter, "max_iter")
    p_init = check_fraction(p_init, "p_init")
    gen = make_generator(random_state, "square")
    b, c, h, w = x.shape
    dev = x.device

    def signs(shape: tuple[int, ...]) -> torch.Tensor:
        r = torch.randint(0, 2, shape, generator=gen, device=gen.device)
        return (2 * r - 1).to(device=dev, dtype=x.dtype)

    with eval_mode(model), torch.no_grad():
        best = (x + eps * signs((b, c, 1, w))).clamp(0, 1)
        margin = logit_margin(logits_of(model, best), y)
        rows = torch.arange(h, device=dev)
        cols = torch.arange(w, device=dev)
        for i in range(max_iter):
            idx = (margin > 0).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            n = idx.numel()
            x0, xb = x[idx], best[idx]
            p = _p_selection(p_init, i, max_iter)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), min(h, w))
            top = torch.randint(0, h - s + 1, (n,), generator=gen, device=gen.device).to(dev)
            left = torch.randint(0, w - s + 1, (n,), generator=gen, device=gen.device).to(dev)
            win = ((rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s))[:, :, None] & (
                (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)
            )[:, None, :]
            win = win[:, None].expand(n, c, h, w)
            delta = xb - x0
            new_vals = eps * signs((n, c, 1, 1))
            cand = (x0 + torch.where(win, new_vals.expand(n, c, h, w), delta)).clamp(0, 1)
            for _ in range(10):  # resample a window that would not change the image (as the original)
                same = ((cand - xb).abs() < 1e-7).reshape(n, -1).all(dim=1)
                if not bool(same.any()):
                    break
                new_vals = torch.where(same[:, None, None, None], eps * signs((n, c, 1, 1)), new_vals)
                cand = (x0 + torch.where(win, new_vals.expand(n, c, h, w), delta)).clamp(0, 1)
            new_margin = logit_margin(logits_of(model, cand), y[idx])
            improved = new_margin < margin[idx]
            best[idx[improved]] = cand[improved]
            margin[idx] = torch.where(improved, new_margin, margin[idx])
    return best.detach()


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class AttackSpec:
    """How :func:`run_attack` calls an attack.

    Attributes
    ----------
    fn:
        The attack function.
    norm:
        Threat-model norm, ``"linf"`` or ``"l2"``.
    minimal:
        True for minimal-norm attacks (DeepFool, C&W) that take no ``eps``: given an ``eps``, their
        results beyond it are discarded.
    randomized:
        Whether the function takes ``random_state``.
    """

    fn: Callable[..., torch.Tensor]
    norm: str
    minimal: bool = False
    randomized: bool = False


def _pgd_linf(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, **kw: Any
) -> torch.Tensor:
    return pgd(model, images, labels, eps, norm="linf", **kw)


def _pgd_l2(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, **kw: Any) -> torch.Tensor:
    return pgd(model, images, labels, eps, norm="l2", **kw)


#: name -> :class:`AttackSpec`.
ATTACKS: dict[str, AttackSpec] = {
    "fgsm": AttackSpec(fgsm, "linf"),
    "pgd_linf": AttackSpec(_pgd_linf, "linf", randomized=True),
    "pgd_l2": AttackSpec(_pgd_l2, "l2", randomized=True),
    "deepfool": AttackSpec(deepfool, "l2", minimal=True),
    "cw_l2": AttackSpec(carlini_wagner_l2, "l2", minimal=True),
    "square_linf": AttackSpec(square_attack, "linf", randomized=True),
    # AutoAttack-grade attacks (autoattack.py); run_attack's params go to apgd / fab_targeted / square / auto_attack
    "apgd_ce": AttackSpec(_aa_adapter("apgd-ce", "linf"), "linf", randomized=True),
    "apgd_dlr": AttackSpec(_aa_adapter("apgd-dlr", "linf"), "linf", randomized=True),
    "apgd_t": AttackSpec(_aa_adapter("apgd-t", "linf"), "linf", randomized=True),
    "fab_t": AttackSpec(_aa_adapter("fab-t", "linf"), "linf", randomized=True),
    "apgd_ce_l2": AttackSpec(_aa_adapter("apgd-ce", "l2"), "l2", randomized=True),
    "apgd_dlr_l2": AttackSpec(_aa_adapter("apgd-dlr", "l2"), "l2", randomized=True),
    "apgd_t_l2": AttackSpec(_aa_adapter("apgd-t", "l2"), "l2", randomized=True),
    "fab_t_l2": AttackSpec(_aa_adapter("fab-t", "l2"), "l2", randomized=True),
    "square_l2": AttackSpec(_aa_adapter("square", "l2"), "l2", randomized=True),
    "autoattack_linf": AttackSpec(_aa_adapter("autoattack", "linf"), "linf", randomized=True),
    "autoattack_l2": AttackSpec(_aa_adapter("autoattack", "l2"), "l2", randomized=True),
}


@dataclass
class AttackResult:
    """Outcome of :func:`run_attack` on ``N`` samples.

    Attributes
    ----------
    name, norm, eps:
        Attack, its norm and the budget (``None`` for an unbounded minimal-norm run).
    adv_images:
        ``(N, C, H, W)`` tensor on the input images' device; for a minimal-norm attack with ``eps``,
        samples whose adversarial exceeds ``eps`` are reset to the clean image.
    labels, clean_preds, adv_preds:
        ``(N,)`` int arrays.
    l2, linf:
        ``(N,)`` float arrays, norms of ``adv_images - images``.
    clean_correct:
        ``(N,)`` bool, ``clean_preds == labels``.
    within_budget:
        ``(N,)`` bool, perturbation of ``adv_images`` ``<= eps`` (+ :data:`BUDGET_TOL`) in the attack's
        norm (all True without ``eps``, and after the reset of a minimal-norm attack).
    success:
        ``(N,)`` bool: clean-correct, within budget, and ``adv_preds != clean_preds``.
    success_rate:
        ``success.sum() / clean_correct.sum()`` (NaN when no sample is clean-correct).
    robust_accuracy:
        Fraction of all samples that are clean-correct and not successfully attacked.
    """

    name: str
    norm: str
    eps: float | None
    adv_images: torch.Tensor
    labels: np.ndarray
    clean_preds: np.ndarray
    adv_preds: np.ndarray
    l2: np.ndarray
    linf: np.ndarray
    clean_correct: np.ndarray
    within_budget: np.ndarray
    success: np.ndarray
    success_rate: float
    robust_accuracy: float
    params: dict[str, Any] = field(default_factory=dict)


def _check_attack_name(name: object) -> AttackSpec:
    if name not in ATTACKS:
        raise RobustnessInputError(f"unknown attack {name!r}; expected one of {sorted(ATTACKS)}")
    return ATTACKS[str(name)]


def evaluate_adversarial(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    adv: torch.Tensor,
    norm: str,
    eps: float | None,
    *,
    name: str = "custom",
    reset_outside: bool = False,
    batch_size: int | None = None,
    params: dict[str, Any] | None = None,
) -> AttackResult:
    """Score adversarial images ``adv`` against clean ``images`` (both ``(N, C, H, W)``) -> :class:`AttackResult`.

    ``reset_outside``: replace adversarials beyond ``eps`` by the clean image (minimal-norm attacks).
    The model must be in eval mode already; everything runs on the images' device.
    """
    if adv.shape != images.shape:
        raise RobustnessInputError(
            f"attack {name!r} must return images of shape {tuple(images.shape)}; got {tuple(adv.shape)}"
        )
    adv = adv.detach().to(images).clamp(0, 1)
    l2, linf = flat_norms(adv - images)
    size = linf if norm == "linf" else l2
    if eps is None:
        within = torch.ones_like(size, dtype=torch.bool)
    else:
        within = within_budget(size, eps)
        if reset_outside:
            adv = torch.where(within[:, None, None, None], adv, images)
            l2, linf = flat_norms(adv - images)
            within = torch.ones_like(within)
    clean = predict_labels(model, images, batch_size)
    advp = predict_labels(model, adv, batch_size)
    correct = clean == labels
    success = correct & within & (advp != clean)
    n_correct = int(correct.sum())
    return AttackResult(
        name=name,
        norm=norm,
        eps=eps,
        adv_images=adv,
        labels=labels.cpu().numpy(),
        clean_preds=clean.cpu().numpy(),
        adv_preds=advp.cpu().numpy(),
        l2=l2.cpu().numpy(),
        linf=linf.cpu().numpy(),
        clean_correct=correct.cpu().numpy(),
        within_budget=within.cpu().numpy(),
        success=success.cpu().numpy(),
        success_rate=float(success.sum()) / n_correct if n_correct else float("nan"),
        robust_accuracy=float((correct & ~success).float().mean()),
        params=dict(params or {}),
    )


def run_attack(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    name: str,
    eps: float | None = None,
    *,
    random_state: int = 0,
    batch_size: int | None = None,
    **params: Any,
) -> AttackResult:
    """Run a registered attack by name and score it.

    Parameters
    ----------
    model:
        ``nn.Module``, ``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)``; images are moved to its device.
    images:
        ``(N, C, H, W)`` in ``[0, 1]``.
    labels:
        ``(N,)`` true classes.
    name:
        Key of :data:`ATTACKS`.
    eps:
        Budget in the attack's norm. Required for bounded attacks; optional for minimal-norm ones
        (DeepFool, C&W), whose adversarials beyond ``eps`` are then discarded (reset to clean).
    random_state:
        Seed for randomized attacks (each chunk gets a seed derived from it and its index).
    batch_size:
        Attack this many samples at a time (``None`` = all at once).
    **params:
        Extra keyword arguments of the attack function (e.g. ``steps``, ``step_size``, ``max_iter``).

    Returns
    -------
    AttackResult
        Success = prediction differs from the clean prediction, counted over clean-correct samples
        and within budget.
    """
    spec = _check_attack_name(name)
    check_model(model)
    check_images(images)
    n = images.shape[0]
    if eps is None and not spec.minimal:
        raise RobustnessInputError(f"attack {name!r} needs eps (its {spec.norm} budget); got None")
    if eps is not None:
        eps = check_positive(eps, "eps", allow_zero=True)
    if batch_size is not None:
        batch_size = check_int(batch_size, "batch_size")
    if "random_state" in params:
        raise RobustnessInputError("pass random_state as run_attack's own argument, not inside params")
    device = model_device(model, images.device)
    y = check_labels(labels, n, device)

    def attack_chunk(xb: torch.Tensor, yb: torch.Tensor, ci: int) -> torch.Tensor:
        kwargs = dict(params)
        if spec.randomized:
            kwargs["random_state"] = make_generator(int(random_state), name, ci)
        if spec.minimal:
            return spec.fn(model, xb, yb, **kwargs)
        if eps == 0:
            return xb.clone()
        return spec.fn(model, xb, yb, eps, **kwargs)

    return attack_in_chunks(
        model,
        images,
        y,
        attack_chunk,
        spec.norm,
        eps,
        name=name,
        reset_outside=spec.minimal,
        batch_size=batch_size,
        params=params,
    )


def attack_in_chunks(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attack_chunk: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    norm: str,
    eps: float | None,
    *,
    name: str,
    reset_outside: bool = False,
    batch_size: int | None = None,
    params: dict[str, Any] | None = None,
) -> AttackResult:
    """Attack ``images`` ``(N, C, H, W)`` chunk by chunk in eval mode and score the result on ``model``.

    ``labels`` ``(N,)`` on the model's device; ``attack_chunk(x_chunk, y_chunk, chunk_index)`` returns the
    chunk's adversarials ``(n, C, H, W)``; chunks of ``batch_size`` samples (``None`` = one chunk). Scored by
    :func:`evaluate_adversarial` (``norm``, ``eps``, ``name``, ``reset_outside``, ``params``); the adversarial
    images are returned on the images' device. The frame of :func:`run_attack` and of the run's loss-objective
    PGD.
    """
    x = images.detach().to(labels.device)
    chunk = x.shape[0] if batch_size is None else batch_size
    with eval_mode(model):
        advs = [
            attack_chunk(x[start : start + chunk], labels[start : start + chunk], ci)
            for ci, start in enumerate(range(0, x.shape[0], chunk))
        ]
        result = evaluate_adversarial(
            model,
            x,
            labels,
            torch.cat(advs),
            norm,
            eps,
            name=name,
            reset_outside=reset_outside,
            batch_size=batch_size,
            params=params,
        )
    result.adv_images = result.adv_images.to(images.device)
    return result


# ---------------------------------------------------------------------------- robust accuracy


def within_budget(size: Any, eps: float) -> Any:
    """``size <= eps`` up to :data:`BUDGET_TOL` (relative and absolute), elementwise on an array or tensor."""
    return size <= eps * (1 + BUDGET_TOL) + BUDGET_TOL


def breaking_budget(broken: np.ndarray, eps: np.ndarray, clean_correct: np.ndarray) -> np.ndarray:
    """Smallest budget at which each sample was broken.

    Parameters
    ----------
    broken:
        ``(E, N)`` bool: an attack found an adversarial of sample ``n`` within budget ``eps[e]``.
    eps:
        ``(E,)`` budgets, ascending.
    clean_correct:
        ``(N,)`` bool: the model classifies the clean sample correctly.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` float: the first budget of ``eps`` at which the sample is broken; ``0`` for clean errors;
        **NaN when never broken** on the grid (the convention of every robustness result: the per-sample
        table's ``rob_min_*_eps`` too).
    """
    broken = np.asarray(broken, dtype=bool)
    out = np.full(broken.shape[1], np.nan)
    ever = broken.any(axis=0)
    out[ever] = np.asarray(eps, dtype=float)[broken.argmax(axis=0)[ever]]
    out[~np.asarray(clean_correct, dtype=bool)] = 0.0
    return out


#: Columns of :meth:`RobustAccuracyCurve.records` (the run's ``robustness_curves`` adds ``kind``).
CURVE_RECORD_COLUMNS = [
    "norm",
    "attack",
    "eps",
    "robust_accuracy",
    "success_rate",
    "n_samples",
    "robust_accuracy_ci_low",
    "robust_accuracy_ci_high",
]


@dataclass
class RobustAccuracyCurve:
    """Result of :func:`robust_accuracy_curve` / :func:`curve_from_breaks` (``E`` budgets, ``N`` samples).

    Attributes
    ----------
    norm:
        Shared norm of the attacks.
    eps:
        ``(E,)`` budgets, ascending.
    attacks:
        Attack names, in the order given.
    robust_accuracy:
        ``(E,)``: fraction of samples clean-correct and surviving *every* attack at that budget.
    per_attack_accuracy:
        DataFrame indexed by ``eps``, one column per attack (accuracy under that attack alone), plus
        ``worst_case`` (= ``robust_accuracy``).
    robust:
        ``(E, N)`` bool.
    breaking_eps:
        ``(N,)`` smallest budget of the grid at which the sample is not robust; 0 for clean errors,
        NaN if robust at every budget (see :func:`breaking_budget`).
    min_norm:
        ``(N,)`` smallest perturbation norm found by the minimal-norm attacks (DeepFool, C&W) that
        changes the prediction; 0 for clean errors, NaN where none succeeded or none was run.
    clean_accuracy:
        Accuracy on the clean images.
    broken_counts:
        DataFrame indexed by ``eps``, columns as ``per_attack_accuracy``: samples clean-correct and broken by
        that attack (``worst_case``: by any attack) at that budget.
    n_correct:
        Clean-correct samples.
    """

    norm: str
    eps: np.ndarray
    attacks: list[str]
    robust_accuracy: np.ndarray
    per_attack_accuracy: pd.DataFrame
    robust: np.ndarray
    breaking_eps: np.ndarray
    min_norm: np.ndarray
    clean_accuracy: float
    broken_counts: pd.DataFrame = field(default_factory=pd.DataFrame)
    n_correct: int = 0

    @property
    def n_samples(self) -> int:
        """``N``."""
        return int(self.robust.shape[1])

    def rates(self, attack: str = "worst_case") -> dict[str, np.ndarray]:
        """Per budget ``(E,)`` for ``attack`` (or ``"worst_case"``): ``broken`` (counts), ``robust_accuracy``
        (``(n_correct - broken) / N``), ``success_rate`` (``broken / n_correct``; NaN without clean-correct
        samples) and its Wilson 95 % interval ``ci_low`` / ``ci_high`` (NaN for ``N = 0``)."""
        from robustlens.analysis.stages.evaluation import wilson_interval

        broken = self.broken_counts[attack].to_numpy(dtype=np.int64)
        n, correct = self.n_samples, self.n_correct
        with np.errstate(divide="ignore", invalid="ignore"):
            robust = (correct - broken) / n if n else np.full(broken.shape, np.nan)
            success = broken / correct if correct else np.full(broken.shape, np.nan)
        low, high = (
            wilson_interval(correct - broken, np.full(broken.shape, n))
            if n
            else (np.full(broken.shape, np.nan), np.full(broken.shape, np.nan))
        )
        return {"broken": broken, "robust_accuracy": robust, "success_rate": success, "ci_low": low, "ci_high": high}

    def records(self, ran: Mapping[str, np.ndarray] | None = None) -> list[dict[str, Any]]:
        """Long-format rows (:data:`CURVE_RECORD_COLUMNS`): every attack, then ``worst_case``, at every budget
        (an attack only where ``ran[attack]`` ``(E,)`` is true, when given)."""
        rows = []
        for attack in [*self.attacks, "worst_case"]:
            at = None if ran is None or attack == "worst_case" else ran.get(attack)
            rate = self.rates(attack)
            for e, eps in enumerate(self.eps):
                if at is not None and not at[e]:
                    continue
                rows.append(
                    {
                        "norm": self.norm,
                        "attack": attack,
                        "eps": float(eps),
                        "robust_accuracy": float(rate["robust_accuracy"][e]),
                        "success_rate": float(rate["success_rate"][e]),
                        "n_samples": self.n_samples,
                        "robust_accuracy_ci_low": float(rate["ci_low"][e]),
                        "robust_accuracy_ci_high": float(rate["ci_high"][e]),
                    }
                )
        return rows


def curve_from_breaks(
    broken: Mapping[str, np.ndarray],
    eps: Sequence[float] | np.ndarray,
    clean_correct: np.ndarray,
    *,
    norm: str,
    min_norm: np.ndarray | None = None,
) -> RobustAccuracyCurve:
    """The robust-accuracy curve of attacks already run: the one computation behind :func:`robust_accuracy_curve`
    and the workspace robustness run.

    Parameters
    ----------
    broken:
        Attack name -> ``(E, N)`` bool: the attack found an adversarial of sample ``n`` within ``eps[e]``
        (entries of clean errors are ignored). Attacks whose adversarials are valid at every larger budget
        too may pass their breaks closed upwards in ε; nothing here assumes it.
    eps:
        ``(E,)`` budgets, ascending.
    clean_correct:
        ``(N,)`` bool.
    norm:
        Threat model of the attacks (``"linf"`` / ``"l2"``).
    min_norm:
        ``(N,)`` smallest successful perturbation of the minimal-norm attacks (NaN: none); default all NaN.
        Clean errors are set to 0.

    Returns
    -------
    RobustAccuracyCurve
        A sample counts robust at ε only if it is clean-correct and survives every attack at ε; its
        ``breaking_eps`` is NaN when it is never broken.
    """
    grid = np.asarray(eps, dtype=float)
    correct = np.asarray(clean_correct, dtype=bool)
    n = correct.shape[0]
    names = list(broken)
    hits = {name: np.asarray(broken[name], dtype=bool) & correct[None, :] for name in names}
    for name, h in hits.items():
        if h.shape != (grid.size, n):
            raise RobustnessInputError(f"broken[{name!r}] must have shape {(grid.size, n)}; got {h.shape}")
    any_hit = np.logical_or.reduce(list(hits.values())) if hits else np.zeros((grid.size, n), dtype=bool)
    robust = correct[None, :] & ~any_hit  # (E, N)
    index = pd.Index(grid, name="eps")
    counts = pd.DataFrame(
        {**{name: h.sum(axis=1) for name, h in hits.items()}, "worst_case": any_hit.sum(axis=1)}, index=index
    )
    per_attack = pd.DataFrame(
        {**{name: (correct[None, :] & ~h).mean(axis=1) for name, h in hits.items()}, "worst_case": robust.mean(axis=1)},
        index=index,
    )
    sizes = np.full(n, np.nan) if min_norm is None else np.array(min_norm, dtype=float)
    sizes[~correct] = 0.0
    return RobustAccuracyCurve(
        norm=norm,
        eps=grid,
        attacks=names,
        robust_accuracy=robust.mean(axis=1),
        per_attack_accuracy=per_attack,
        robust=robust,
        breaking_eps=breaking_budget(any_hit, grid, correct),
        min_norm=sizes,
        clean_accuracy=float(correct.mean()) if n else float("nan"),
        broken_counts=counts,
        n_correct=int(correct.sum()),
    )


AttackRequest = str | tuple[str, Mapping[str, Any]]


def robust_accuracy_curve(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    attacks: Sequence[AttackRequest],
    eps_list: Sequence[float],
    *,
    random_state: int = 0,
    batch_size: int | None = None,
) -> RobustAccuracyCurve:
    """Worst-case robust accuracy over several attacks on a grid of budgets.

    Parameters
    ----------
    model, images, labels:
        As :func:`run_attack`.
    attacks:
        Attack names, or ``(name, params)`` pairs; all must share one norm (L∞ or L2).
        Minimal-norm attacks (DeepFool, C&W) run once, unbounded, and are thresholded per budget.
    eps_list:
        Budgets (``>= 0``) in that norm; sorted ascending in the result.
    random_state:
        Seed passed to every randomized attack run.
    batch_size:
        Chunk size of the attack runs.

    Returns
    -------
    RobustAccuracyCurve
        A sample counts robust at ε only if it is clean-correct and survives every attack at ε (built by
        :func:`curve_from_breaks`; ``breaking_eps`` is NaN for a sample never broken).
    """
    check_model(model)
    check_images(images)
    if not attacks:
        raise RobustnessInputError("attacks must name at least one attack; got an empty list")
    requests: list[tuple[str, dict[str, Any]]] = []
    for a in attacks:
        if isinstance(a, str):
            requests.append((a, {}))
        elif isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], str) and isinstance(a[1], Mapping):
            requests.append((a[0], dict(a[1])))
        else:
            raise RobustnessInputError(f"each attack must be a name or a (name, params) pair; got {a!r}")
    specs = [_check_attack_name(nm) for nm, _ in requests]
    norms = {s.norm for s in specs}
    if len(norms) != 1:
        raise RobustnessInputError(
            "all attacks of a robust-accuracy curve must share one norm; got "
            + ", ".join(f"{nm} ({s.norm})" for (nm, _), s in zip(requests, specs, strict=True))
        )
    norm = norms.pop()
    eps_arr = np.array(sorted(check_positive(e, "eps", allow_zero=True) for e in eps_list), dtype=float)
    if eps_arr.size == 0:
        raise RobustnessInputError("eps_list must hold at least one budget; got an empty list")
    n = images.shape[0]
    labels_np = check_labels(labels, n, torch.device("cpu")).numpy()
    labels_used = [nm if sum(r[0] == nm for r in requests) == 1 else f"{nm}#{i}" for i, (nm, _) in enumerate(requests)]

    broken = np.zeros((len(requests), eps_arr.size, n), dtype=bool)
    min_norm = np.full(n, np.nan)
    clean_correct: np.ndarray | None = None
    for a_i, ((nm, params), spec) in enumerate(zip(requests, specs, strict=True)):
        if spec.minimal:
            res = run_attack(
                model, images, labels_np, nm, None, random_state=random_state, batch_size=batch_size, **params
            )
            size = res.l2 if norm == "l2" else res.linf
            for e_i, e in enumerate(eps_arr):
                broken[a_i, e_i] = res.success & within_budget(size, e)
            found = np.where(res.success, size, np.nan)
            min_norm = np.fmin(min_norm, found)
            clean_correct = res.clean_correct
        else:
            for e_i, e in enumerate(eps_arr):
                res = run_attack(
                    model, images, labels_np, nm, float(e), random_state=random_state, batch_size=batch_size, **params
                )
                broken[a_i, e_i] = res.success
                clean_correct = res.clean_correct
    assert clean_correct is not None
    return curve_from_breaks(
        dict(zip(labels_used, broken, strict=True)), eps_arr, clean_correct, norm=norm, min_norm=min_norm
    )
