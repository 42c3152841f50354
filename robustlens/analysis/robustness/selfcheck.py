"""Is the attack strong enough, and does the model mask gradients? (legacy per-attack checks)

Superseded for the validity verdict by :func:`robustlens.analysis.robustness.validity.validity_diagnostics`:
the checks here use an absolute zero-gradient tolerance (a tiny gradient leak passes), a black-box
comparison with little power, and an active test that plants its adversarial *outside* the network
(masking inside the model is invisible to it). They are kept as per-attack self-checks of the
attack implementations; ``validity`` is what decides whether a robust accuracy can be trusted.

Attack-strength self-check ("active test")
-------------------------------------------
Following the idea of Zimmermann et al. (NeurIPS 2022, "Increasing Confidence in Adversarial
Robustness Evaluations"), an attack is run on a *modified* model for which an adversarial example
is known to exist inside the ε-ball of every evaluated sample; an attack that fails to find one
there is too weak (or broken) for evaluations at that ε.

Construction (:class:`ActiveTestModel`). For each sample ``x_j`` with clean prediction ``y_j`` of
the original model ``f``:

* a direction ``δ_j``: random signs drawn on a coarse grid of blocks (``max(1, min(H, W)//4)`` px,
  one sign per channel and block, so block-wise search such as Square can align with it), forced to
  point inwards where a pixel is within the amplitude of 0 or 1; amplitude ``0.9·ε`` per pixel for
  L∞ (``‖δ‖∞ = 0.9ε``) or ``0.9·ε/√D`` for L2 (``‖δ‖₂ = 0.9ε``). Hence ``x*_j = x_j + δ_j`` lies in
  ``[0, 1]`` and strictly inside the ε-ball;
* progress along ``δ_j``: ``t_j(z) = ⟨z - x_j, δ_j⟩ / ‖δ_j‖₂²`` (0 at ``x_j``, 1 at ``x*_j``), a linear,
  everywhere-differentiable function whose gradient points straight at ``x*_j``;
* a locality envelope ``e_j(z) = sigmoid((1.5 - ‖z - x_j‖/ε) / 0.05)`` in the threat norm
  (≈1 inside the ε-ball, ≈0 beyond 1.6ε), and the anchor used for an input ``z`` is its L2-nearest
  clean sample, so the modification of one sample does not leak to the others;
* target ``c_j``: the strongest wrong class of ``f`` at ``x*_j``; the modified logits are
  ``g(z) = f(z) + B_j·t_j(z)·e_j(z)·(onehot(c_j) - onehot(y_j))``.

``B_j = strength · B_req,j`` where ``B_req,j`` is the smallest boost that makes ``c_j`` win at ``x*_j``
by a logit margin of 1 (``strength = 2``: along the straight path the prediction flips near
``t ≈ 1/2``). Why an adversarial example is guaranteed: at ``z = x_j`` the boost is exactly 0, so
``g`` predicts ``y_j`` like ``f``; at ``x*_j`` (inside the ball) ``g`` predicts ``c_j ≠ y_j`` by
construction; this is *verified numerically* for every sample, and samples where it does not hold
(e.g. duplicated images sharing an anchor) are excluded and counted. The attack is run on ``g`` with
labels ``y_j``; success needs a changed prediction within the budget; the check passes when the
success rate over the evaluable samples is at least ``threshold`` (default 0.95).

Gradient-masking symptoms (:func:`gradient_masking_checks`)
------------------------------------------------------------
* zero input gradients of the logit margin (and of the cross-entropy, reported) on a batch;
* non-deterministic forward: two forwards of the same input in eval mode differ;
* a black-box attack (Square, L∞) succeeding clearly more often than the white-box ones (FGSM, PGD)
  at the same ε.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
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
    logits_of,
    make_generator,
    model_device,
    nearest_anchor,
    predict_logits,
)
from .attacks import ATTACKS, AttackResult, evaluate_adversarial, run_attack

#: Envelope of the active-test modification: full strength up to ENVELOPE_RADIUS·ε, width ENVELOPE_WIDTH·ε.
ENVELOPE_RADIUS = 1.5
ENVELOPE_WIDTH = 0.05
#: Fraction of ε used for the known adversarial direction.
ANCHOR_FRACTION = 0.9
#: Logit margin by which the target class wins at the known adversarial point (before ``strength``).
ANCHOR_MARGIN = 1.0


# ------------------------------------------------------------------------------- active test model


class ActiveTestModel(torch.nn.Module):
    """``f`` plus a local, linear-ramp logit boost towards a wrong class around each anchor sample.

    Built by :func:`build_active_test_model`; see the module docstring for the construction.
    Buffers (all indexed by anchor ``j``): ``anchors`` ``(N, C, H, W)`` clean images, ``deltas``
    ``(N, C, H, W)`` known adversarial directions, ``source`` / ``target`` ``(N,)`` classes,
    ``boost`` ``(N,)`` logit scale; ``eps`` and ``norm`` the threat model.
    """

    anchors: torch.Tensor
    deltas: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor
    boost: torch.Tensor

    def __init__(
        self,
        base: torch.nn.Module,
        anchors: torch.Tensor,
        deltas: torch.Tensor,
        source: torch.Tensor,
        target: torch.Tensor,
        boost: torch.Tensor,
        eps: float,
        norm: str,
    ):
        super().__init__()
        self.base = base
        self.register_buffer("anchors", anchors.detach().clone())
        self.register_buffer("deltas", deltas.detach().clone())
        self.register_buffer("source", source.detach().clone())
        self.register_buffer("target", target.detach().clone())
        self.register_buffer("boost", boost.detach().clone())
        self.eps = float(eps)
        self.norm = norm

    def ramp(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-anchor index ``(B,)`` and boost ``B_j·t_j(z)·e_j(z)`` ``(B,)`` for inputs ``z`` ``(B, C, H, W)``.

        The anchor is chosen without gradient (piecewise constant); the boost is differentiable in ``z``.
        """
        j, u, d = nearest_anchor(z, self.anchors, self.deltas)
        t = (u * d).sum(dim=1) / d.pow(2).sum(dim=1)
        size = u.abs().amax(dim=1) if self.norm == "linf" else u.norm(dim=1)
        env = torch.sigmoid((ENVELOPE_RADIUS - size / self.eps) / ENVELOPE_WIDTH)
        return j, self.boost[j] * t * env

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of ``f`` with the boost added to the target and removed from the source class."""
        logits = self.base(z)
        j, amount = self.ramp(z)
        k = logits.shape[1]
        direction = F.one_hot(self.target[j], k).to(logits) - F.one_hot(self.source[j], k).to(logits)
        return logits + amount[:, None] * direction


def _anchor_directions(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """Known adversarial directions ``δ`` ``(N, C, H, W)`` (block-random signs, inward at the borders)."""
    n, c, h, w = x.shape
    amp = ANCHOR_FRACTION * eps if norm == "linf" else ANCHOR_FRACTION * eps / math.sqrt(c * h * w)
    if amp > 0.5:
        limit = 0.5 / ANCHOR_FRACTION if norm == "linf" else 0.5 * math.sqrt(c * h * w) / ANCHOR_FRACTION
        raise RobustnessInputError(
            f"eps too large for the active test: the known adversarial needs a per-pixel amplitude <= 0.5, "
            f"i.e. eps <= {limit:.4g} for norm={norm}; got eps={eps}"
        )
    block = max(1, min(h, w) // 4)
    coarse = (
        torch.randint(0, 2, (n, c, -(-h // block), -(-w // block)), generator=generator, device=generator.device).to(
            device=x.device, dtype=x.dtype
        )
        * 2
        - 1
    )
    s = coarse.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :h, :w]
    s = torch.where(x < amp, torch.ones_like(s), torch.where(x > 1 - amp, -torch.ones_like(s), s))
    return amp * s


def build_active_test_model(
    model: torch.nn.Module,
    images: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    strength: float = 2.0,
    random_state: int = 0,
) -> tuple[ActiveTestModel, torch.Tensor, torch.Tensor]:
    """Build the active-test model around ``images``.

    Parameters
    ----------
    model:
        Original classifier ``f`` (``(B, C, H, W)`` -> ``(B, K)``).
    images:
        ``(N, C, H, W)`` anchor samples in ``[0, 1]``, on the model's device.
    eps:
        Budget of the threat model (``> 0``).
    norm:
        ``"linf"`` or ``"l2"``.
    strength:
        Multiple (``>= 1``) of the minimal boost that makes the known point adversarial.
    random_state:
        Seed of the directions.

    Returns
    -------
    (ActiveTestModel, labels, evaluable)
        ``labels`` ``(N,)``: clean predictions of ``f`` (= of the active model); ``evaluable`` ``(N,)``
        bool: the known point ``x + δ`` is verified adversarial for the active model.
    """
    norm = check_norm(norm)
    eps = check_positive(eps, "eps")
    strength = check_positive(strength, "strength")
    if strength < 1:
        raise RobustnessInputError(f"strength must be >= 1; got {strength}")
    x = images.detach()
    gen = make_generator(random_state, "active-test")
    deltas = _anchor_directions(x, eps, norm, gen)
    x_star = x + deltas
    with eval_mode(model), torch.no_grad():
        clean_logits = predict_logits(model, x)
        star_logits = predict_logits(model, x_star)
    y = clean_logits.argmax(dim=1)
    masked = star_logits.scatter(1, y[:, None], float("-inf"))
    target = masked.argmax(dim=1)
    f_t = star_logits.gather(1, target[:, None]).squeeze(1)
    f_y = star_logits.gather(1, y[:, None]).squeeze(1)
    others = masked.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    others = torch.where(torch.isfinite(others), others, f_t)  # K == 2: no third class
    size = (
        deltas.reshape(x.shape[0], -1).abs().amax(dim=1)
        if norm == "linf"
        else deltas.reshape(x.shape[0], -1).norm(dim=1)
    )
    env = torch.sigmoid((ENVELOPE_RADIUS - size / eps) / ENVELOPE_WIDTH)
    need = torch.maximum((others - f_t + ANCHOR_MARGIN), (f_y - f_t + ANCHOR_MARGIN) / 2).clamp_min(0) / env
    boost = strength * need + 1e-3
    active = ActiveTestModel(model, x, deltas, y, target, boost, eps, norm)
    with eval_mode(active), torch.no_grad():
        ok_star = predict_logits(active, x_star).argmax(dim=1) == target
        ok_clean = predict_logits(active, x).argmax(dim=1) == y
    return active, y, ok_star & ok_clean


@dataclass
class SelfCheckResult:
    """Outcome of :func:`attack_self_check`.

    Attributes
    ----------
    attack, norm, eps:
        What was checked.
    passed:
        ``success_rate >= threshold`` (False when nothing could be evaluated).
    success_rate:
        Success of the attack on the active model over the evaluable samples.
    threshold:
        Required success rate.
    n_evaluated, n_excluded:
        Samples whose known adversarial was verified / could not be verified.
    success:
        ``(N,)`` bool per sample (False for excluded ones).
    """

    attack: str
    norm: str
    eps: float
    passed: bool
    success_rate: float
    threshold: float
    n_evaluated: int
    n_excluded: int
    success: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``success`` as a list)."""
        d = asdict(self)
        d["success"] = self.success.tolist()
        return d


AttackFn = Callable[..., torch.Tensor]


def attack_self_check(
    model: torch.nn.Module,
    images: torch.Tensor,
    attack: str | AttackFn,
    eps: float,
    *,
    norm: str | None = None,
    threshold: float = 0.95,
    strength: float = 2.0,
    attack_params: Mapping[str, Any] | None = None,
    random_state: int = 0,
    batch_size: int | None = None,
) -> SelfCheckResult:
    """Active test of an attack: it must find the adversarial examples known to exist.

    Parameters
    ----------
    model:
        Classifier ``f`` (``(B, C, H, W)`` -> logits ``(B, K)``); images are moved to its device.
    images:
        ``(N, C, H, W)`` in ``[0, 1]`` (a few dozen suffice).
    attack:
        Name in :data:`~robustlens.analysis.robustness.attacks.ATTACKS`, or a callable
        ``attack(model, images, labels, eps, **attack_params) -> adv_images`` (then ``norm`` is required).
    eps:
        Budget (``> 0``) in the attack's norm.
    norm:
        ``"linf"`` / ``"l2"``; taken from the registry for named attacks (must agree if given).
    threshold:
        Minimal success rate to pass, in ``(0, 1]``.
    strength:
        See :func:`build_active_test_model`.
    attack_params:
        Extra keyword arguments of the attack.
    random_state:
        Seed of the construction and of randomized attacks.
    batch_size:
        Chunk size for named attacks.
    """
    check_model(model)
    check_images(images)
    eps = check_positive(eps, "eps")
    threshold = check_positive(threshold, "threshold")
    if threshold > 1:
        raise RobustnessInputError(f"threshold must be in (0, 1]; got {threshold}")
    params = dict(attack_params or {})
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise RobustnessInputError(f"unknown attack {attack!r}; expected one of {sorted(ATTACKS)} or a callable")
        spec_norm = ATTACKS[attack].norm
        if norm is not None and check_norm(norm) != spec_norm:
            raise RobustnessInputError(f"attack {attack!r} is an {spec_norm} attack; got norm={norm!r}")
        norm_used, label = spec_norm, attack
    elif callable(attack):
        if norm is None:
            raise RobustnessInputError("norm ('linf' or 'l2') is required when attack is a callable")
        norm_used, label = check_norm(norm), getattr(attack, "__name__", "custom")
    else:
        raise RobustnessInputError(f"attack must be a registered name or a callable; got {type(attack).__name__}")
    device = model_device(model, images.device)
    x = images.detach().to(device)
    active, y, evaluable = build_active_test_model(
        model, x, eps, norm=norm_used, strength=strength, random_state=random_state
    )
    if isinstance(attack, str):
        result: AttackResult = run_attack(
            active, x, y, attack, eps, random_state=random_state, batch_size=batch_size, **params
        )
    else:
        with eval_mode(active):
            adv = attack(active, x, y, eps, **params)
            if not isinstance(adv, torch.Tensor):
                raise RobustnessInputError(f"attack {label!r} must return a torch.Tensor; got {type(adv).__name__}")
            result = evaluate_adversarial(active, x, y, adv.to(x), norm_used, eps, name=label)
    ev = evaluable.cpu().numpy()
    success = result.success & ev
    n_eval = int(ev.sum())
    rate = float(success.sum()) / n_eval if n_eval else float("nan")
    return SelfCheckResult(
        attack=label,
        norm=norm_used,
        eps=eps,
        passed=bool(n_eval and rate >= threshold),
        success_rate=rate,
        threshold=threshold,
        n_evaluated=n_eval,
        n_excluded=int((~ev).sum()),
        success=success,
    )


# ------------------------------------------------------------------------- gradient masking checks


@dataclass
class GradientMaskingReport:
    """Outcome of :func:`gradient_masking_checks`.

    Attributes
    ----------
    zero_grad_fraction:
        Fraction of samples whose input gradient of the logit margin ``Z_y - max_{j≠y} Z_j`` has L2
        norm ``<= zero_grad_tol``.
    zero_grad_fraction_ce:
        Same for the cross-entropy (can also be 0 from a saturated softmax, so only reported).
    nondeterministic_max_diff:
        Largest absolute logit difference between two forwards of the same batch.
    whitebox_success:
        Success rate per white-box attack (``None`` entries are not run).
    blackbox_success:
        Success rate of Square (``None`` when not run, e.g. for L2).
    blackbox_only_fraction:
        Fraction of clean-correct samples broken by Square but by no white-box attack.
    flags:
        ``zero_gradients``, ``nondeterministic``, ``blackbox_beats_whitebox``.
    suspicious:
        Any flag set.
    messages:
        Human-readable explanation of each raised flag.
    """

    zero_grad_fraction: float
    zero_grad_fraction_ce: float
    nondeterministic_max_diff: float
    whitebox_success: dict[str, float]
    blackbox_success: float | None
    blackbox_only_fraction: float | None
    flags: dict[str, bool]
    suspicious: bool
    messages: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return asdict(self)


def _input_grad_norms(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample L2 norms ``(B,)``, ``(B,)`` of the input gradients of the logit margin and of the cross-entropy."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = logits_of(model, xg)
        real = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        margin = (real - other).sum()
        ce = F.cross_entropy(logits, y, reduction="sum")
        if not logits.requires_grad:
            zero = torch.zeros(x.shape[0], device=x.device)
            return zero, zero
        (g_margin,) = torch.autograd.grad(margin, xg, retain_graph=True)
        (g_ce,) = torch.autograd.grad(ce, xg)
    return g_margin.reshape(x.shape[0], -1).norm(dim=1), g_ce.reshape(x.shape[0], -1).norm(dim=1)


def gradient_masking_checks(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    pgd_steps: int = 20,
    square_iters: int = 500,
    zero_grad_tol: float = 1e-12,
    zero_grad_max_fraction: float = 0.1,
    nondeterminism_tol: float = 1e-5,
    blackbox_margin: float = 0.05,
    random_state: int = 0,
) -> GradientMaskingReport:
    """Symptoms of gradient masking / obfuscation on a batch.

    Parameters
    ----------
    model:
        Classifier (``(B, C, H, W)`` -> logits ``(B, K)``); eval mode; images moved to its device.
    images:
        ``(N, C, H, W)`` in ``[0, 1]``.
    labels:
        ``(N,)`` true classes.
    eps:
        Budget of the attack comparison (``> 0``), in ``norm``.
    norm:
        ``"linf"`` (FGSM + PGD vs Square) or ``"l2"`` (PGD-L2 only; no black-box comparison).
    pgd_steps:
        PGD iterations (step ``2.5·eps/pgd_steps``).
    square_iters:
        Square attack iterations.
    zero_grad_tol:
        Gradient L2 norm at or below which a sample's gradient counts as zero.
    zero_grad_max_fraction:
        Flag ``zero_gradients`` when more than this fraction of samples has a zero gradient.
    nondeterminism_tol:
        Flag ``nondeterministic`` when two forwards differ by more than
        ``tol·(1 + max|logit|)``.
    blackbox_margin:
        Flag ``blackbox_beats_whitebox`` when Square's success rate exceeds the best white-box one by
        more than this, or it breaks more than this fraction of samples no white-box attack broke.
    random_state:
        Seed of the attacks.
    """
    check_model(model)
    check_images(images)
    norm = check_norm(norm)
    eps = check_positive(eps, "eps")
    pgd_steps = check_int(pgd_steps, "pgd_steps")
    square_iters = check_int(square_iters, "square_iters")
    device = model_device(model, images.device)
    x = images.detach().to(device)
    y = check_labels(labels, x.shape[0], device)
    with eval_mode(model):
        g_margin, g_ce = _input_grad_norms(model, x, y)
        with torch.no_grad():
            first = logits_of(model, x)
            second = logits_of(model, x)
    zero_frac = float((g_margin <= zero_grad_tol).float().mean())
    zero_frac_ce = float((g_ce <= zero_grad_tol).float().mean())
    max_diff = float((first - second).abs().max())
    scale = float(first.abs().max())

    white: dict[str, AttackResult] = {}
    if norm == "linf":
        white["fgsm"] = run_attack(model, x, y, "fgsm", eps)
        white["pgd_linf"] = run_attack(model, x, y, "pgd_linf", eps, steps=pgd_steps, random_state=random_state)
    else:
        white["pgd_l2"] = run_attack(model, x, y, "pgd_l2", eps, steps=pgd_steps, random_state=random_state)
    black = (
        run_attack(model, x, y, "square_linf", eps, max_iter=square_iters, random_state=random_state)
        if norm == "linf"
        else None
    )

    def rate(r: AttackResult) -> float:
        return 0.0 if math.isnan(r.success_rate) else r.success_rate

    white_rates = {k: rate(v) for k, v in white.items()}
    best_white = max(white_rates.values())
    flags = {
        "zero_gradients": zero_frac > zero_grad_max_fraction,
        "nondeterministic": max_diff > nondeterminism_tol * (1 + scale),
        "blackbox_beats_whitebox": False,
    }
    black_rate = black_only = None
    if black is not None:
        black_rate = rate(black)
        any_white = np.zeros_like(black.success)
        for r in white.values():
            any_white |= r.success
        correct = black.clean_correct
        black_only = float((black.success & ~any_white).sum() / correct.sum()) if correct.any() else 0.0
        flags["blackbox_beats_whitebox"] = black_rate > best_white + blackbox_margin or black_only > blackbox_margin
    messages = []
    if flags["zero_gradients"]:
        messages.append(
            f"{zero_frac:.0%} of samples have a zero input gradient of the logit margin "
            "(quantization, thresholding or non-differentiable preprocessing?)"
        )
    if flags["nondeterministic"]:
        messages.append(
            f"two forwards of the same input differ by up to {max_diff:.3g} in eval mode "
            "(randomness active at inference, e.g. dropout or random transforms)"
        )
    if flags["blackbox_beats_whitebox"]:
        messages.append(
            f"black-box Square succeeds on {black_rate:.0%} vs {best_white:.0%} for the best white-box "
            f"attack at eps={eps} ({black_only:.0%} of samples only broken by Square): "
            "gradients are likely misleading"
        )
    return GradientMaskingReport(
        zero_grad_fraction=zero_frac,
        zero_grad_fraction_ce=zero_frac_ce,
        nondeterministic_max_diff=max_diff,
        whitebox_success=white_rates,
        blackbox_success=black_rate,
        blackbox_only_fraction=black_only,
        flags=flags,
        suspicious=any(flags.values()),
        messages=messages,
    )


# ------------------------------------------------------------------------------------ combined


@dataclass
class RobustnessSelfCheckReport:
    """All attack active tests at one budget plus the gradient-masking checks."""

    norm: str
    eps: float
    attack_checks: dict[str, SelfCheckResult]
    masking: GradientMaskingReport
    all_attacks_passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict."""
        return {
            "norm": self.norm,
            "eps": self.eps,
            "all_attacks_passed": self.all_attacks_passed,
            "attack_checks": {k: v.to_dict() for k, v in self.attack_checks.items()},
            "masking": self.masking.to_dict(),
        }


#: The attacks checked by default: the fast previews. The AutoAttack cascade is judged by the validity
#: diagnostics (:mod:`.validity`), whose active test plants its adversarial inside the model's input path.
PREVIEW_ATTACKS = ("fgsm", "pgd_linf", "pgd_l2", "deepfool", "cw_l2", "square_linf")


def robustness_self_check(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    attacks: Sequence[str] | Mapping[str, str | AttackFn] | None = None,
    attack_params: Mapping[str, Mapping[str, Any]] | None = None,
    threshold: float = 0.95,
    random_state: int = 0,
    batch_size: int | None = None,
    attack_samples: int | None = None,
    masking_samples: int | None = None,
    masking_params: Mapping[str, Any] | None = None,
    on_check: Callable[[], None] | None = None,
) -> RobustnessSelfCheckReport:
    """Run :func:`attack_self_check` for every preview attack of ``norm`` (or ``attacks``) and
    :func:`gradient_masking_checks`, all at budget ``eps``.

    Parameters
    ----------
    model, images, labels:
        Classifier, ``(N, C, H, W)`` images in ``[0, 1]`` and their ``(N,)`` true classes.
    eps, norm:
        Budget and threat model of every check.
    attacks:
        Attack names (default: the :data:`PREVIEW_ATTACKS` of ``norm``), or a mapping from the name a check is
        reported under to a registered name or a callable ``attack(model, images, labels, eps, **params)`` (checked
        in ``norm``; e.g. an attack with another loss).
    attack_params:
        Attack name -> extra keyword arguments.
    threshold, random_state, batch_size:
        As in :func:`attack_self_check` (``random_state`` also seeds the masking checks' attacks).
    attack_samples, masking_samples:
        Use only the first ``attack_samples`` images for the active tests and the first ``masking_samples`` for
        the gradient-masking checks (default: all).
    masking_params:
        Extra keyword arguments of :func:`gradient_masking_checks` (e.g. ``pgd_steps``, ``square_iters``).
    on_check:
        Called after each active test and after the masking checks (e.g. a progress bar's update).
    """
    norm = check_norm(norm)
    if attacks is None:
        attacks = [k for k in PREVIEW_ATTACKS if ATTACKS[k].norm == norm]
    chosen = dict(attacks) if isinstance(attacks, Mapping) else {a: a for a in attacks}
    params = attack_params or {}
    checked = images[:attack_samples]
    checks = {}
    for name, attack in chosen.items():
        checks[name] = attack_self_check(
            model,
            checked,
            attack,
            eps,
            norm=None if isinstance(attack, str) else norm,
            threshold=threshold,
            random_state=random_state,
            attack_params=params.get(name),
            batch_size=batch_size,
        )
        if on_check is not None:
            on_check()
    masking = gradient_masking_checks(
        model,
        images[:masking_samples],
        labels[:masking_samples],
        eps,
        norm=norm,
        random_state=random_state,
        **dict(masking_params or {}),
    )
    if on_check is not None:
        on_check()
    return RobustnessSelfCheckReport(
        norm=norm,
        eps=float(eps),
        attack_checks=checks,
        masking=masking,
        all_attacks_passed=all(c.passed for c in checks.values()),
    )
