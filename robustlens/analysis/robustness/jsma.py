"""Jacobian-based saliency map attack (JSMA, Papernot et al. 2016): an L0 attack, batched.

Each step changes exactly two input features (the pair with the largest saliency towards the target
class) by ``theta`` and removes them from the search domain; a sample stops once the model predicts
its target, when no admissible pair is left, or after ``floor(gamma · n / 2)`` steps, so that at most
``gamma · n`` of its ``n`` features change (its L0 distance is ≤ ``gamma · n``).

The saliency of a pair ``(p, q)`` follows the paper (eqs. 8–10) and torchattacks' ``JSMA`` term for
term: ``α = ∂Z_t/∂x_p + ∂Z_t/∂x_q`` (target logit), ``β = Σ_{j≠t} (∂Z_j/∂x_p + ∂Z_j/∂x_q)``; for an
increasing attack (``theta > 0``) admissible pairs have ``α > 0`` and ``β < 0``, saliency ``α·|β|``
(signs swapped for ``theta < 0``). Two differences from torchattacks, both deliberate: the whole batch
is processed at once (two backward passes per step give ``∂Z_t/∂x`` and ``∂ΣZ/∂x``, instead of one
backward pass per class and per image), and a sample with no admissible pair stops instead of
changing feature 0 twice. torchattacks' step count ``ceil(gamma · n / 2)`` can change
``gamma · n + 1`` features; ours never exceeds ``gamma · n``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._common import RobustnessInputError, check_images, check_labels, check_model, eval_mode, logits_of

#: Largest number of pair-saliency entries (batch × features²) held at once (float32: 4 bytes each).
PAIR_BUDGET = 2**25


@dataclass
class JSMAResult:
    """Outcome of :func:`jsma` on ``B`` samples.

    Attributes
    ----------
    adv:
        ``(B, C, H, W)`` adversarial images in ``[0, 1]``.
    targets:
        ``(B,)`` int64, the class each sample was pushed towards.
    success:
        ``(B,)`` bool, the model predicts the target on ``adv``.
    l0:
        ``(B,)`` int64, number of input features that differ between ``adv`` and the image.
    steps:
        ``(B,)`` int64, saliency steps taken (two features each).
    """

    adv: torch.Tensor
    targets: np.ndarray
    success: np.ndarray
    l0: np.ndarray
    steps: np.ndarray


def choose_targets(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, target: str | object, num_classes: int
) -> torch.Tensor:
    """Target class per sample: ``"next"`` = ``(label + 1) mod K`` (torchattacks' default), ``"second"`` = the
    most likely class other than the label, or an explicit ``(B,)`` integer tensor/array."""
    if isinstance(target, str):
        if target == "next":
            return (labels + 1) % num_classes
        if target == "second":
            with torch.no_grad():
                logits = logits_of(model, images).clone()
            logits[torch.arange(len(labels), device=logits.device), labels] = -torch.inf
            return logits.argmax(1)
    raise RobustnessInputError(f"target must be 'next', 'second' or a (B,) array of classes; got {target!r}")


def _pair_choice(
    target_grad: torch.Tensor, others_grad: torch.Tensor, domain: torch.Tensor, increasing: bool, layers: int = 3
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Most salient admissible feature pair per sample, without materialising all ``n²`` pairs.

    ``target_grad``, ``others_grad``: ``(b, n)``; ``domain``: ``(b, n)`` bool (features still allowed).
    Returns ``(p, q, found)``, each ``(b,)`` with ``p < q``; ``found`` is False where no admissible pair exists.

    With ``a = ±∂Z_t`` and ``c = ∓Σ_{j≠t}∂Z_j`` (signs by direction; features outside the domain pushed down by
    twice the largest magnitude, torchattacks' arithmetic, so values match it exactly), a pair is admissible
    when ``a_p + a_q > 0`` and ``c_p + c_q > 0``, and its saliency is ``(a_p + a_q)(c_p + c_q)``: increasing in
    ``(a_q, c_q)`` (also after rounding). So if a feature ``r ≠ q`` dominates ``p`` (``a_r ≥ a_p``,
    ``c_r ≥ c_p``), the pair ``(r, q)`` is at least as salient as ``(p, q)``: both members of the best pair lie
    in the first two Pareto layers of the points ``(a, c)``. The exact search runs over the first ``layers``
    layers (a few dozen features instead of ``n``), in the original index order, so the first maximum is the
    pair the full ``n × n`` map gives (barring exactly tied saliencies of unrelated pairs).
    """
    b, n = target_grad.shape
    sign = 1.0 if increasing else -1.0
    outside = (~domain).to(target_grad.dtype) * 2.0
    a = sign * target_grad - outside * target_grad.abs().amax(dim=1, keepdim=True)
    c = -sign * others_grad - outside * others_grad.abs().amax(dim=1, keepdim=True)
    neg = torch.tensor(-torch.inf, dtype=a.dtype, device=a.device)

    def best_among(idx: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best admissible pair among columns ``idx`` (b, m), sorted ascending; ``valid`` masks padding."""
        ai, ci = a.gather(1, idx), c.gather(1, idx)
        alpha = ai[:, None, :] + ai[:, :, None]
        gamma_ = ci[:, None, :] + ci[:, :, None]
        ok = (alpha > 0) & (gamma_ > 0) & valid[:, None, :] & valid[:, :, None]
        ok &= idx[:, :, None] < idx[:, None, :]
        sal = torch.where(ok, alpha * gamma_, neg)
        m = idx.shape[1]
        flat = sal.reshape(b, -1)
        best = flat.argmax(dim=1)
        value = flat.gather(1, best[:, None]).squeeze(1)
        i = torch.div(best, m, rounding_mode="floor")
        return idx.gather(1, i[:, None]).squeeze(1), idx.gather(1, (best - i * m)[:, None]).squeeze(1), value

    keep = _pareto_layers(a, c, domain, layers)
    m = int(keep.sum(dim=1).max())
    if m < 2:
        zero = torch.zeros(b, dtype=torch.int64, device=a.device)
        return zero, zero, torch.zeros(b, dtype=torch.bool, device=a.device)
    order = torch.where(keep, torch.arange(n, device=a.device).expand(b, n), n)  # kept first, in index order
    idx = order.sort(dim=1).values[:, :m]
    valid = idx < n
    p, q, value = best_among(idx.clamp(max=n - 1), valid)
    return p, q, torch.isfinite(value)


def _pareto_layers(a: torch.Tensor, c: torch.Tensor, domain: torch.Tensor, layers: int) -> torch.Tensor:
    """``(b, n)`` bool: features of ``domain`` in the first ``layers`` Pareto layers of the points ``(a, c)``
    (maximising both). A superset is harmless: ties on ``a`` keep every point whose ``c`` is not below the best
    ``c`` of the strictly earlier points in the ``(a desc, c desc)`` order."""
    b, n = a.shape
    neg = torch.tensor(-torch.inf, dtype=a.dtype, device=a.device)
    live = domain.clone()
    chosen = torch.zeros_like(domain)
    for _ in range(layers):
        aa = torch.where(live, a, neg)
        cc = torch.where(live, c, neg)
        by_c = cc.argsort(dim=1, descending=True, stable=True)
        by_a = aa.gather(1, by_c).argsort(dim=1, descending=True, stable=True)
        order = by_c.gather(1, by_a)
        c_sorted = cc.gather(1, order)
        best_before = torch.cat(
            [torch.full((b, 1), -torch.inf, dtype=a.dtype, device=a.device), c_sorted.cummax(dim=1).values[:, :-1]],
            dim=1,
        )
        front_sorted = (c_sorted >= best_before) & torch.isfinite(c_sorted)
        front = torch.zeros_like(domain).scatter_(1, order, front_sorted) & live
        chosen |= front
        live &= ~front
    return chosen


def _gradients(model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``∂Z_t/∂x`` and ``Σ_{j≠t} ∂Z_j/∂x``, each ``(b, n)``, from two backward passes over the batch."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, x)
        picked = logits.gather(1, targets[:, None]).sum()
        total = logits.sum()
        (g_target,) = torch.autograd.grad(picked, x, retain_graph=True)
        (g_total,) = torch.autograd.grad(total, x)
    b = x.shape[0]
    g_target = g_target.reshape(b, -1)
    return g_target, g_total.reshape(b, -1) - g_target


def jsma(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    theta: float = 1.0,
    gamma: float = 0.1,
    target: str | object = "second",
    batch_size: int | None = None,
) -> JSMAResult:
    """Targeted JSMA on a batch.

    Parameters
    ----------
    model:
        ``(B, C, H, W)`` images in ``[0, 1]`` -> logits ``(B, K)``; evaluated in eval mode.
    images:
        ``(B, C, H, W)`` float images in ``[0, 1]``.
    labels:
        ``(B,)`` true classes (used to choose targets).
    theta:
        Change applied to each chosen feature (clipped to ``[0, 1]``); ``> 0`` raises features, ``< 0`` lowers.
    gamma:
        Largest fraction of the ``n = C·H·W`` features that may change (``0 < gamma ≤ 1``).
    target:
        ``"second"`` (most likely wrong class; the untargeted use), ``"next"`` (``label + 1 mod K``,
        torchattacks' default) or a ``(B,)`` array of target classes.
    batch_size:
        Samples processed together; default from :data:`PAIR_BUDGET` (the pair saliency is ``b × n²``).

    Returns
    -------
    JSMAResult
    """
    check_model(model)
    check_images(images)
    if not isinstance(theta, int | float) or isinstance(theta, bool) or theta == 0 or not np.isfinite(theta):
        raise RobustnessInputError(f"theta must be a non-zero finite number; got {theta!r}")
    if not isinstance(gamma, int | float) or isinstance(gamma, bool) or not 0 < gamma <= 1:
        raise RobustnessInputError(f"gamma must be in (0, 1]; got {gamma!r}")
    x0 = images.detach()
    y = check_labels(labels, x0.shape[0], x0.device)
    b_all = x0.shape[0]
    n = x0[0].numel()
    max_steps = int(np.floor(gamma * n / 2 + 1e-9))
    increasing = theta > 0
    if batch_size is None:
        batch_size = max(1, PAIR_BUDGET // max(1, n * n))
    with eval_mode(model):
        with torch.no_grad():
            num_classes = logits_of(model, x0[:1]).shape[1]
        if isinstance(target, str):
            targets = torch.cat(
                [
                    choose_targets(model, x0[s : s + batch_size], y[s : s + batch_size], target, num_classes)
                    for s in range(0, b_all, batch_size)
                ]
            )
        else:
            targets = check_labels(target, b_all, x0.device, name="target", num_classes=num_classes)
        adv = x0.clone()
        steps = torch.zeros(b_all, dtype=torch.int64, device=x0.device)
        for start in range(0, b_all, batch_size):
            sl = slice(start, start + batch_size)
            steps[sl] = _attack_chunk(model, adv[sl], targets[sl], theta, max_steps, increasing)
        with torch.no_grad():
            pred = torch.cat([logits_of(model, adv[s : s + batch_size]).argmax(1) for s in range(0, b_all, batch_size)])
    l0 = (adv != x0).reshape(b_all, -1).sum(1)
    return JSMAResult(
        adv=adv,
        targets=targets.cpu().numpy(),
        success=(pred == targets).cpu().numpy(),
        l0=l0.cpu().numpy(),
        steps=steps.cpu().numpy(),
    )


def _attack_chunk(
    model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, theta: float, max_steps: int, increasing: bool
) -> torch.Tensor:
    """Run JSMA in place on ``x`` (a slice of the result tensor); returns the steps taken per sample."""
    b = x.shape[0]
    flat = x.view(b, -1)
    domain = flat < 0.99 if increasing else flat > 0.01
    steps = torch.zeros(b, dtype=torch.int64, device=x.device)
    with torch.no_grad():
        active = logits_of(model, x).argmax(1) != targets
    active &= domain.any(1)
    for _ in range(max_steps):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        g_t, g_o = _gradients(model, x[idx], targets[idx])
        p, q, found = _pair_choice(g_t, g_o, domain[idx], increasing)
        active[idx[~found]] = False
        idx, p, q = idx[found], p[found], q[found]
        if idx.numel() == 0:
            break
        rows = flat[idx]
        rows.scatter_(1, p[:, None], rows.gather(1, p[:, None]) + theta)
        rows.scatter_(1, q[:, None], rows.gather(1, q[:, None]) + theta)
        flat[idx] = rows.clamp(0, 1)
        domain[idx, p] = False
        domain[idx, q] = False
        steps[idx] += 1
        with torch.no_grad():
            done = logits_of(model, x[idx]).argmax(1) == targets[idx]
        active[idx[done]] = False
        active[idx] &= domain[idx].any(1)
    return steps
