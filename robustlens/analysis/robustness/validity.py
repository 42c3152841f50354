"""Validity diagnostics of a robust-accuracy figure: can the number be trusted, and what is the worst case?

A robust accuracy is only an upper bound: it says "the attacks we ran did not break these samples".
Gradient masking (quantized inputs, saturated softmax, randomness, non-differentiable pre-processing)
makes gradient attacks fail while the model stays easy to break. :func:`validity_diagnostics` runs the
checklist of Carlini et al. 2019 ("On Evaluating Adversarial Robustness", §5–7) and the attack-failure
indicators of Pintor et al. 2022 ("Indicators of Attack Failure") on a batch, **and** runs the attacks
that defeat each kind of masking, so that the reported worst case does not depend on the checks being
right: a sample counts as robust only if *every* attack run on it failed.

Checks (each a dict ``{"name", "status", "value", "threshold", "message", ...}``; thresholds are
relative, so they do not depend on the scale of the logits or of the loss):

``gradient_zero_nan_ce`` / ``gradient_zero_nan_dlr``
    fraction of clean-correct samples whose input gradient of the loss (cross-entropy in float64; the
    scale-free DLR loss of Croce & Hein 2020) is exactly zero or not finite.
``gradient_informative_ce`` / ``gradient_informative_dlr``
    per sample, the first-order prediction of the best loss increase at step ``h = ε/4``
    (``h·‖g‖₁`` for L∞, ``h·‖g‖₂`` for L2) is compared with what the loss actually does at that scale:
    the mean absolute change under random steps of the same size and the actual change along the
    steepest-ascent step. For a differentiable model the gradient step beats every random step and the
    random changes stay below the first-order bound; a gradient that is zero, tiny (a ``1e-4`` leak
    behind a quantizer) or pointing nowhere (high-frequency terms) fails one of the two comparisons.
    The value is the fraction of samples failing.
``randomized``
    two forwards of the same batch in eval mode differ; every attack is then evaluated over several
    draws (a sample is robust when the majority of draws classify the adversarial correctly) and an
    EOT attack (gradient of the logits averaged over ``k`` draws) is run.
``non_differentiable_ops``
    rounding / sign / clamp ops applied to a tensor that depends on the input (found by running the
    model under a :class:`torch.overrides.TorchFunctionMode`); a BPDA attack (straight-through
    gradients through those ops) is run. TorchScript models cannot be intercepted: a gradient-free
    NES attack is run instead, and the gradient checks above still see the masking.
``blackbox_vs_whitebox``
    per sample: fraction of clean-correct samples broken by a score-based black-box attack (Square
    with 1,000–5,000 queries for L∞, NES for L2) but by no white-box gradient attack.
``transfer_vs_whitebox``
    same for adversarials transferred from a surrogate (the given one, else a small network distilled
    on the target's predicted labels).
``unbounded_attack``
    a gradient attack with an unbounded budget (L∞ ε = 1, L2 ε = √D) from the clean point must break
    (nearly) every sample.
``monotone_in_eps``
    robust accuracy of the gradient attack on a grid of ε multiples must not increase with ε.
``more_iterations``
    several times more iterations and random restarts must not lower the accuracy noticeably.
``active_test``
    an adversarial example is planted *inside the model's input path*: ``f'(z) = f(T(z))`` where
    ``T`` moves the image towards a confidently classified image of another class once ``z`` has
    progressed far enough along a hidden direction of size ``ε``, in two gated stages, so one
    gradient step gets only half-way. Masking inside ``f`` therefore masks the planted path too. The
    strong white-box attack must find it; a one-step FGSM and Square-100 must not (else the test
    cannot tell a strong attack from a weak one and is reported inconclusive).
``worst_case_gap``
    how much the diagnostic attacks lowered the headline accuracy.

Overall status: ``"fail"`` if any check fails, ``"warn"`` if any warns, else ``"pass"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._common import (
    RobustnessInputError,
    check_images,
    check_labels,
    check_model,
    check_norm,
    check_positive,
    eval_mode,
    logits_of,
    make_generator,
    model_device,
    nearest_anchor,
)
from .attacks import square_attack

_apgd: Callable[..., torch.Tensor] | None
try:  # the AutoAttack-grade APGD, when present, strengthens the white-box baseline
    from .autoattack import apgd as _apgd
except ImportError:  # pragma: no cover - depends on the checkout
    _apgd = None

#: Settings per budget. ``n_iter``: gradient-attack iterations; ``square``: queries of the black box;
#: ``nes_steps``/``nes_samples``: gradient-free attack; ``eot``: draws averaged per EOT gradient;
#: ``draws``: draws per evaluation of a randomized model; ``distill_epochs``: surrogate training.
BUDGETS: dict[str, dict[str, Any]] = {
    "fast": {
        "n_iter": 20,
        "restarts": 1,
        "more_factor": 3,
        "more_restarts": 1,
        "square": 1000,
        "nes_steps": 30,
        "nes_samples": 16,
        "eot": 8,
        "draws": 51,
        "distill_epochs": 30,
        "probes": 8,
        "unbounded_iter": 30,
        "grid": (0.5, 1.0, 2.0, 4.0),
        "active_iter": 40,
        "apgd": False,
    },
    "standard": {
        "n_iter": 100,
        "restarts": 1,
        "more_factor": 3,
        "more_restarts": 3,
        "square": 5000,
        "nes_steps": 100,
        "nes_samples": 48,
        "eot": 16,
        "draws": 51,
        "distill_epochs": 60,
        "probes": 16,
        "unbounded_iter": 100,
        "grid": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
        "active_iter": 100,
        "apgd": True,
    },
}
#: Fraction of samples above which a per-sample symptom warns / fails.
WARN_FRACTION = 0.1
FAIL_FRACTION = 0.3
#: Worst-case gap (fraction of all samples) tolerated silently, and beyond which the check fails.
GAP_WARN = 0.02
GAP_FAIL = 0.05
#: Unbounded attack success needed to pass / to only warn.
UNBOUNDED_PASS = 0.99
UNBOUNDED_WARN = 0.9
#: Active test: strong attack success needed; weak attack success above which the test is inconclusive.
ACTIVE_STRONG = 0.9
ACTIVE_WEAK = 0.5
#: Active test mixing: ``sigmoid(ACTIVE_SLOPE·(S - ACTIVE_CENTER))``; ``S = 2`` at the planted point.
ACTIVE_CENTER = 1.85
ACTIVE_SLOPE = 20.0
#: Partner images of other classes tried per sample by the active test.
PARTNER_CANDIDATES = 8

STRAIGHT_THROUGH_NAMES = (
    "round",
    "floor",
    "ceil",
    "trunc",
    "fix",
    "sign",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "floor_divide",
)


# ------------------------------------------------------------------------------------- losses


def _dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """DLR loss ``(B,)`` of Croce & Hein 2020 (larger = closer to misclassification); margin for K < 3."""
    z = logits.double()
    zy = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], float("-inf")).amax(dim=1)
    if z.shape[1] < 3:
        return other - zy
    top = z.sort(dim=1, descending=True).values
    return (other - zy) / (top[:, 0] - top[:, 2] + 1e-12)


def _loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample loss ``(B,)`` in float64: ``"ce"``, ``"dlr"`` or ``"margin"`` (``max_other - z_y``)."""
    if kind == "ce":
        return F.cross_entropy(logits.double(), y, reduction="none")
    if kind == "dlr":
        return _dlr(logits, y)
    z = logits.double()
    return z.scatter(1, y[:, None], float("-inf")).amax(dim=1) - z.gather(1, y[:, None]).squeeze(1)


def _grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input gradient ``(B, C, H, W)`` of the summed loss and the per-sample loss ``(B,)``."""
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = _loss(logits_of(model, xg), y, kind)
        if not loss.requires_grad:
            return torch.zeros_like(x), loss.detach()
        (g,) = torch.autograd.grad(loss.sum(), xg)
    return g.detach(), loss.detach()


# -------------------------------------------------------------------------------- model views


class _StraightThroughMode(TorchFunctionMode):
    """Replace rounding-like ops on grad-requiring tensors by ``x + (op(x) - x).detach()`` (BPDA).

    The forward values are unchanged; the backward pass treats the op as the identity. Names of the
    intercepted ops are collected in ``found``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()
        self._targets = set()
        for name in STRAIGHT_THROUGH_NAMES:
            for owner in (torch, torch.Tensor):
                fn = getattr(owner, name, None)
                if fn is not None:
                    self._targets.add(fn)
        self._targets.add(torch.Tensor.__floordiv__)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (
            func in self._targets
            and args
            and isinstance(args[0], torch.Tensor)
            and args[0].requires_grad
            and isinstance(out, torch.Tensor)
            and out.is_floating_point()
            and out.shape == args[0].shape
        ):
            x = args[0]
            name = getattr(func, "__name__", str(func))
            if not name.startswith(("clamp", "clip")) or bool((out != x).any()):  # a no-op clamp is harmless
                self.found.add(name)
            if func in (torch.Tensor.__floordiv__, torch.floor_divide, torch.Tensor.floor_divide):
                other = args[1] if len(args) > 1 else kwargs.get("other")
                return x / other + (out - x / other).detach()
            return x + (out - x).detach()
        return out


class StraightThroughModel(nn.Module):
    """``model`` whose rounding / sign / clamp ops pass gradients straight through (BPDA, Athalye et al. 2018).

    Same outputs as ``model``; only the backward pass differs. ``found`` lists the ops intercepted so
    far. Has no effect inside TorchScript code (see :func:`contains_torchscript`).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.base = model
        self.found: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.base(x)
        mode = _StraightThroughMode()
        with mode:
            out = self.base(x)
        self.found |= mode.found
        return out


class EOTModel(nn.Module):
    """Logits ``(B, K)`` averaged over ``draws`` forwards of a randomized ``model`` (expectation over
    transformation, Athalye et al. 2018)."""

    def __init__(self, model: nn.Module, draws: int):
        super().__init__()
        self.base = model
        self.draws = draws

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.base(x) for _ in range(self.draws)]).mean(dim=0)


def contains_torchscript(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule is TorchScript (whose ops a ``TorchFunctionMode`` cannot see)."""
    return any(isinstance(m, (torch.jit.ScriptModule, torch.jit.RecursiveScriptModule)) for m in model.modules())


# --------------------------------------------------------------------------------- evaluation


class _Evaluator:
    """Scores adversarials on the real model: per-sample robust ``(B,)`` bool, majority over draws if randomized."""

    def __init__(self, model: nn.Module, y: torch.Tensor, draws: int, batch: int = 512):
        self.model, self.y, self.draws, self.batch = model, y, draws, batch
        self.forwards = 0

    @torch.no_grad()
    def correct(self, x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        y = self.y if idx is None else self.y[idx]
        votes = torch.zeros(x.shape[0], device=x.device)
        for _ in range(self.draws):
            preds = torch.cat(
                [logits_of(self.model, x[i : i + self.batch]).argmax(1) for i in range(0, x.shape[0], self.batch)]
            )
            votes += (preds == y).float()
            self.forwards += x.shape[0]
        return votes * 2 > self.draws


def _within(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    d = (adv - x).reshape(x.shape[0], -1)
    size = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return (
        (size <= eps * (1 + 1e-5) + 1e-6)
        & (adv.reshape(x.shape[0], -1).amin(1) >= -1e-6)
        & (adv.reshape(x.shape[0], -1).amax(1) <= 1 + 1e-6)
    )


# ------------------------------------------------------------------------------------ attacks


def _project(adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    d = adv - x
    if norm == "linf":
        d = d.clamp(-eps, eps)
    else:
        n = d.reshape(d.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        d = d * (eps / n).clamp(max=1.0).reshape(-1, *([1] * (d.ndim - 1)))
    return (x + d).clamp(0, 1)


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return g.sign()
    n = g.reshape(g.shape[0], -1).norm(dim=1).clamp_min(1e-30)
    return g / n.reshape(-1, *([1] * (g.ndim - 1)))


def _random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(x)
        return (x + (2 * u - 1) * eps).clamp(0, 1)
    g = torch.randn(x.shape, generator=gen, device=gen.device).to(x)
    g = g / g.reshape(x.shape[0], -1).norm(dim=1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    r = torch.rand((x.shape[0], 1, 1, 1), generator=gen, device=gen.device).to(x) ** (1.0 / x[0].numel())
    return _project(x + g * r * eps, x, eps, norm)


def gradient_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: str,
    loss: str = "ce",
    steps: int = 50,
    restarts: int = 1,
    random_start: bool = True,
    stop_on_success: bool = True,
    final: bool = False,
    seed: int = 0,
    grad_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """PGD with a cosine-decayed step (``ε/2 -> ε/50``), best-loss tracking and restarts.

    Parameters
    ----------
    model:
        The *attack view* (the real model, a :class:`StraightThroughModel`, an :class:`EOTModel` or a
        surrogate): it supplies the gradients and, with ``stop_on_success``, decides success.
    images, labels:
        ``(B, C, H, W)`` in ``[0, 1]`` and ``(B,)`` classes to move away from.
    eps, norm:
        Budget and ``"linf"`` / ``"l2"``.
    loss:
        ``"ce"``, ``"dlr"`` or ``"margin"``.
    steps, restarts, random_start:
        Iterations per run, number of runs (each later run starts at a random point of the ball).
    stop_on_success:
        Keep a sample's first point that the view misclassifies (else the highest-loss point).
    final:
        Return the last iterate instead (for randomized views, whose loss values are noisy: a
        "best" point picked from noisy values, or the first noisy success, sits on the boundary).
    seed:
        Seed of the random starts.
    grad_fn:
        ``grad_fn(x_adv, y) -> (grad, loss)`` replacing autograd (e.g. a gradient-free estimate).

    Returns
    -------
    torch.Tensor
        ``(B, C, H, W)`` adversarials within ``eps`` and ``[0, 1]``.
    """
    x, y = images.detach(), labels
    gen = make_generator(seed, "validity-pgd", loss, norm)
    grad_fn = grad_fn or (lambda a, t: _grad(model, a, t, loss))
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in range(restarts):
        adv = _random_start(x, eps, norm, gen) if (random_start or r > 0) else x.clone()
        for t in range(steps + 1):
            active = ~done if stop_on_success else torch.ones_like(done)
            if not bool(active.any()):
                break
            g, lv = grad_fn(adv, y)
            with torch.no_grad():
                if stop_on_success:
                    fooled = logits_of(model, adv).argmax(1) != y
                    newly = fooled & ~done
                    best[newly] = adv[newly]
                    done |= fooled
                better = (lv > best_loss) & ~done
                best[better] = adv[better]
                best_loss = torch.where(better, lv, best_loss)
                if t == steps:
                    break
                alpha = eps * (0.02 + 0.48 * 0.5 * (1 + math.cos(math.pi * t / steps)))
                g = torch.nan_to_num(g)
                adv = _project(adv + alpha * _direction(g, norm), x, eps, norm)
        if stop_on_success and bool(done.all()):
            break
    return adv.detach() if final else best.detach()


def nes_attack(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    *,
    norm: str,
    steps: int = 50,
    samples: int = 24,
    seed: int = 0,
) -> torch.Tensor:
    """Gradient-free PGD on the margin loss with NES gradient estimates (Ilyas et al. 2018), logits only.

    ``samples`` antithetic Gaussian probes of scale ``σ = ε/2`` (per pixel, L∞) or ``ε/(2√D)`` (L2) per
    step and sample; the smoothing scale is of the order of the budget, so quantization steps and
    high-frequency terms below it are averaged out. Returns ``(B, C, H, W)`` adversarials.
    """
    x = images.detach()
    d = x[0].numel()
    sigma = eps / 2 if norm == "linf" else eps / (2 * math.sqrt(d))
    gen = make_generator(seed, "validity-nes", norm)
    half = max(1, samples // 2)

    @torch.no_grad()
    def estimate(adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = adv.shape[0]
        u = torch.randn((half, *adv.shape), generator=gen, device=gen.device).to(adv)
        probes = torch.cat([adv[None] + sigma * u, adv[None] - sigma * u]).clamp(0, 1)
        lv = _loss(logits_of(model, probes.reshape(-1, *adv.shape[1:])), y.repeat(2 * half), "margin")
        lv = lv.reshape(2, half, b).to(adv.dtype)
        diff = (lv[0] - lv[1]).reshape(half, b, *([1] * (adv.ndim - 1)))
        g = (diff * u).mean(0) / (2 * sigma)
        return g, _loss(logits_of(model, adv), y, "margin")

    return gradient_attack(
        model,
        x,
        labels,
        eps,
        norm=norm,
        loss="margin",
        steps=steps,
        restarts=1,
        random_start=False,
        seed=seed,
        grad_fn=estimate,
    )


def _square(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, queries: int, seed: int
) -> torch.Tensor:
    """Square attack, L∞ or L2 (:func:`.autoattack.square`; L∞ falls back to :func:`.attacks.square_attack`)."""
    square: Callable[..., torch.Tensor] | None
    try:
        from .autoattack import square
    except ImportError:  # pragma: no cover - depends on the checkout
        square = None
    if square is not None:
        return square(model, x, y, eps, norm=norm, n_queries=queries, seed=seed)
    if norm == "linf":
        return square_attack(model, x, y, eps, max_iter=queries, random_state=seed)
    return nes_attack(model, x, y, eps, norm=norm, steps=max(20, queries // 50), seed=seed)


# --------------------------------------------------------------------------------- surrogate


class _SurrogateMLP(nn.Module):
    def __init__(self, c: int, h: int, w: int, k: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, k)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - 0.5) / 0.25)


class _SurrogateCNN(nn.Module):
    def __init__(self, c: int, h: int, w: int, k: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(c, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 64), nn.ReLU(), nn.Linear(64, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features((x - 0.5) / 0.25))


def distill_surrogate(
    model: nn.Module, images: torch.Tensor, *, eps: float, norm: str, epochs: int = 40, draws: int = 1, seed: int = 0
) -> nn.Module:
    """Train a small network to imitate ``model``'s predicted labels (a transfer-attack surrogate).

    Training set: ``images`` ``(N, C, H, W)`` plus two copies with uniform noise of size ``ε`` and ``2ε``
    (L∞ units; L2 budgets converted per pixel), all labelled by the target's prediction (majority of
    ``draws`` forwards for a randomized target). MLP for inputs up to 256 values, else a small CNN.
    """
    gen = make_generator(seed, "validity-surrogate")
    x = images.detach()
    c, h, w = x.shape[1:]
    per_pixel = eps if norm == "linf" else eps / math.sqrt(c * h * w)
    noisy = [x]
    for scale in (1.0, 2.0):
        u = torch.rand(x.shape, generator=gen, device=gen.device).to(x)
        noisy.append((x + (2 * u - 1) * per_pixel * scale).clamp(0, 1))
    data = torch.cat(noisy)
    with torch.no_grad(), eval_mode(model):
        logits = torch.stack(
            [
                torch.cat([logits_of(model, data[i : i + 512]) for i in range(0, data.shape[0], 512)])
                for _ in range(draws)
            ]
        )
    k = logits.shape[-1]
    targets = F.one_hot(logits.argmax(-1), k).sum(0).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        net = (_SurrogateMLP if c * h * w <= 256 else _SurrogateCNN)(c, h, w, k).to(x.device)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        n = data.shape[0]
        for _ in range(epochs):
            order = torch.randperm(n, device=x.device)
            for i in range(0, n, 128):
                idx = order[i : i + 128]
                opt.zero_grad()
                F.cross_entropy(net(data[idx]), targets[idx]).backward()
                opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ------------------------------------------------------------------------------- active test


class InputPathActiveModel(nn.Module):
    """``f'(z) = f(T(z))``: an adversarial example planted in the input path of ``f`` (see the module doc).

    For the anchor ``x_j`` nearest to ``z`` (L2, no gradient): ``u = z - x_j``; progress along the
    hidden direction ``δ_j`` on two disjoint pixel halves ``A`` and ``B``:
    ``t_A = ⟨u_A, δ_A⟩/‖δ_A‖²``, ``t_B`` likewise (``δ_j``: random signs per pixel, amplitude ``ε`` for
    L∞ / ``ε/√D`` for L2, pointing inwards at the borders of ``[0, 1]``); two stages
    ``S = t_A + min(relu(t_A - 0.5)/0.4, 1)·t_B``; mixing
    ``m = 0.05·S + 0.95·sigmoid(ACTIVE_SLOPE·(S - ACTIVE_CENTER))``;
    ``T(z) = clip(x_j + m·(a_j - x_j), 0, 1)`` with ``a_j`` the most confidently classified image of
    another class. At ``z = x_j``: ``m = 0``, ``T(x_j) = x_j`` (clean prediction kept); at the planted
    point ``x_j + δ_j`` (on the ε-ball): ``S = 2``, ``m ≈ 0.9``, ``f`` sees (nearly) ``a_j``. The
    gradient of ``t_B`` is exactly zero until ``t_A > 0.5``, so one signed gradient step reaches
    ``t_A = 1``, ``t_B = 0``, ``S = 1``, ``m ≈ 0.05`` and fails by construction; a random search
    (Square) gains nothing from half-aligned windows of per-pixel random signs.
    """

    def __init__(
        self, base: nn.Module, anchors: torch.Tensor, deltas: torch.Tensor, half: torch.Tensor, partners: torch.Tensor
    ):
        super().__init__()
        self.base = base
        self.anchors, self.deltas, self.half_mask, self.partners = anchors, deltas, half, partners

    def mixing(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchor index ``(B,)`` and mixing amount ``m`` ``(B,)`` for inputs ``z`` ``(B, C, H, W)``."""
        j, u, d = nearest_anchor(z, self.anchors, self.deltas)
        a = self.half_mask.reshape(self.half_mask.shape[0], -1)[j]
        da, db = d * a, d * (1 - a)
        t_a = (u * da).sum(1) / da.pow(2).sum(1).clamp_min(1e-30)
        t_b = (u * db).sum(1) / db.pow(2).sum(1).clamp_min(1e-30)
        # the second stage has exactly zero gradient until the first is half done
        gate = torch.minimum(torch.relu(t_a - 0.5) / 0.4, torch.ones_like(t_a))
        s = t_a + gate * t_b
        return j, 0.05 * s + 0.95 * torch.sigmoid(ACTIVE_SLOPE * (s - ACTIVE_CENTER))

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """``T(z)`` ``(B, C, H, W)``."""
        j, m = self.mixing(z)
        x0 = self.anchors[j]
        return (x0 + m.reshape(-1, 1, 1, 1) * (self.partners[j] - x0)).clamp(0, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.base(self.transform(z))


def build_input_path_active_model(
    model: nn.Module, images: torch.Tensor, eps: float, *, norm: str = "linf", seed: int = 0
) -> tuple[InputPathActiveModel, torch.Tensor, torch.Tensor]:
    """Build :class:`InputPathActiveModel` around ``images`` ``(N, C, H, W)`` (on the model's device).

    Returns ``(active, labels, evaluable)``: ``labels`` ``(N,)`` are ``f``'s clean predictions;
    ``evaluable`` ``(N,)`` bool marks samples whose planted point ``x + δ`` is verified adversarial,
    whose clean point keeps its label, and whose one-step point (``t_A = 1``, ``t_B = 0``) keeps its
    label too. Verification uses forwards only, so it holds for gradient-masking models as well.
    """
    x = images.detach()
    n, c, h, w = x.shape
    dim = c * h * w
    gen = make_generator(seed, "validity-active")
    amp = eps if norm == "linf" else eps / math.sqrt(dim)
    signs = torch.randint(0, 2, x.shape, generator=gen, device=gen.device).to(x) * 2 - 1
    signs = torch.where(x < amp, torch.ones_like(signs), torch.where(x > 1 - amp, -torch.ones_like(signs), signs))
    deltas = amp * signs
    half = (torch.rand(x.shape, generator=gen, device=gen.device) < 0.5).to(x)
    with torch.no_grad(), eval_mode(model):
        logits = logits_of(model, x)
        y = logits.argmax(1)
        top2 = logits.topk(2, dim=1).values
        confidence = top2[:, 0] - top2[:, 1]
        # partner: among the most confident images of other classes, the first along whose segment from
        # x_j the margin of y_j never increases (so the loss gradient points along the planted path) and
        # ends negative; checked with forwards only, so masking models get partners too
        other = y[None, :] != y[:, None]
        score = torch.where(other, confidence[None, :].expand(n, n), torch.full((n, n), -math.inf, device=x.device))
        order = score.argsort(dim=1, descending=True)[:, :PARTNER_CANDIDATES]
        has_partner = torch.zeros(n, dtype=torch.bool, device=x.device)
        chosen = torch.zeros(n, dtype=torch.long, device=x.device)
        steps = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], device=x.device)
        for rank in range(order.shape[1]):
            cand = order[:, rank]
            valid = torch.isfinite(score.gather(1, cand[:, None]).squeeze(1)) & ~has_partner
            if not bool(valid.any()):
                continue
            a = x[cand]
            path = (x[None] + steps.reshape(-1, 1, 1, 1, 1) * (a - x)[None]).reshape(-1, c, h, w)
            z = torch.cat([logits_of(model, path[i : i + 512]) for i in range(0, path.shape[0], 512)])
            margins = -_loss(z, y.repeat(len(steps)), "margin").reshape(len(steps), n)
            tol = 1e-6 * (1 + margins.abs().amax(0))
            monotone = ((margins[1:] - margins[:-1]) <= tol).all(0) & (margins[-1] < 0)
            take = valid & monotone
            chosen = torch.where(take, cand, chosen)
            has_partner |= take
    partners = x[chosen]
    active = InputPathActiveModel(model, x, deltas, half, partners)
    one_step = x + deltas * half
    with torch.no_grad(), eval_mode(active):
        ok_clean = logits_of(active, x).argmax(1) == y
        ok_star = logits_of(active, x + deltas).argmax(1) != y
        ok_step = logits_of(active, one_step.clamp(0, 1)).argmax(1) == y
    return active, y, has_partner & ok_clean & ok_star & ok_step


# ------------------------------------------------------------------------------------- report


@dataclass
class ValidityReport:
    """Outcome of :func:`validity_diagnostics` on ``B`` samples.

    Attributes
    ----------
    status:
        ``"pass"`` | ``"warn"`` | ``"fail"``: the worst status of the checks.
    checks:
        One dict per check: ``name``, ``status``, ``value``, ``threshold``, ``message`` (+ details).
    worst_case_robust:
        ``(B,)`` bool: clean-correct and not broken by *any* attack run (including ``robust_mask``).
    worst_case_accuracy:
        ``worst_case_robust.mean()``.
    headline_accuracy:
        The figure being checked: ``robust_mask.mean()`` when given, else the white-box baseline of the
        diagnostics (APGD/PGD with CE and DLR); ``None`` only if neither exists.
    upper_bound_gap:
        ``headline_accuracy - worst_case_accuracy`` (how much the diagnostic attacks lowered it).
    diagnostic_adv:
        Per diagnostic attack, ``(B,)`` bool robust per sample (True = that attack failed on it).
    settings:
        Budget and derived settings (ε, norm, iterations, queries, draws, surrogate kind...).
    """

    status: str
    checks: list[dict]
    worst_case_robust: np.ndarray
    worst_case_accuracy: float
    headline_accuracy: float | None
    upper_bound_gap: float | None
    diagnostic_adv: dict[str, np.ndarray]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict: ``status``, ``checks``, accuracies, per-attack robust accuracy, settings."""
        return {
            "status": self.status,
            "headline_is_upper_bound": self.status != "pass",
            "checks": [_jsonable(c) for c in self.checks],
            "worst_case_accuracy": float(self.worst_case_accuracy),
            "headline_accuracy": None if self.headline_accuracy is None else float(self.headline_accuracy),
            "upper_bound_gap": None if self.upper_bound_gap is None else float(self.upper_bound_gap),
            "n_samples": int(self.worst_case_robust.shape[0]),
            "attack_robust_accuracy": {k: float(np.mean(v)) for k, v in self.diagnostic_adv.items()},
            "settings": _jsonable(self.settings),
        }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def _check(name: str, status: str, value: Any, threshold: Any, message: str, **extra: Any) -> dict:
    return {"name": name, "status": status, "value": value, "threshold": threshold, "message": message, **extra}


def _fraction_status(frac: float) -> str:
    return "fail" if frac > FAIL_FRACTION else ("warn" if frac > WARN_FRACTION else "pass")


# ------------------------------------------------------------------------------ gradient checks


def _gradient_checks(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, probes: int, seed: int, kind: str
) -> list[dict]:
    """``gradient_zero_nan_<kind>`` and ``gradient_informative_<kind>`` on clean-correct samples ``x``, ``y``."""
    b = x.shape[0]
    g, base = _grad(model, x, y, kind)
    flat = g.reshape(b, -1)
    bad = ~torch.isfinite(flat).all(1) | (flat.abs().amax(1) == 0)
    zero_frac = float(bad.float().mean())
    checks = [
        _check(
            f"gradient_zero_nan_{kind}",
            _fraction_status(zero_frac),
            zero_frac,
            WARN_FRACTION,
            f"{zero_frac:.0%} of samples have a zero or non-finite input gradient of the "
            f"{kind.upper()} loss"
            + (" (saturated softmax, quantization or detached pre-processing)" if zero_frac > WARN_FRACTION else ""),
        )
    ]
    h = eps / 4
    gen = make_generator(seed, "validity-probes", kind)
    flat = torch.nan_to_num(flat)
    predicted = h * (flat.abs().sum(1) if norm == "linf" else flat.norm(dim=1))
    changes = []
    with torch.no_grad():
        for _ in range(probes):
            u = (torch.randint(0, 2, x.shape, generator=gen, device=gen.device) * 2 - 1).to(x)
            if norm == "l2":
                u = u / math.sqrt(u[0].numel())
            changes.append((_loss(logits_of(model, (x + h * u).clamp(0, 1)), y, kind) - base).abs())
        random_change = torch.stack(changes).mean(0).float()
        best_random = torch.stack(changes).amax(0).float()
        step = (x + h * _direction(g.nan_to_num(), norm)).clamp(0, 1)
        along = (_loss(logits_of(model, step), y, kind) - base).float()
    moves = (random_change > 0) | (along != 0) | (predicted > 0)
    # the first-order bound must cover what random steps do, and the gradient step must beat them
    uninformative = moves & ((predicted < random_change) | (along < best_random))
    frac = float(uninformative.float().mean())
    ratio = predicted / random_change.clamp_min(1e-30)
    checks.append(
        _check(
            f"gradient_informative_{kind}",
            _fraction_status(frac),
            frac,
            WARN_FRACTION,
            f"{frac:.0%} of samples: the {kind.upper()} gradient does not describe the loss at step ε/4 (first-order "
            "bound below the change under random steps, or the gradient step no better than a random one)",
            median_first_order_over_random=float(ratio.median()) if b else None,
        )
    )
    return checks


# ------------------------------------------------------------------------------------ main entry


def validity_diagnostics(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    *,
    norm: str = "linf",
    robust_mask: np.ndarray | torch.Tensor | None = None,
    surrogate: nn.Module | None = None,
    train_images: torch.Tensor | None = None,
    train_labels: torch.Tensor | np.ndarray | None = None,
    budget: str = "standard",
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> ValidityReport:
    """Check a robust-accuracy evaluation for gradient masking and compute the worst case over all attacks.

    Parameters
    ----------
    model:
        Classifier ``(B, C, H, W)`` in ``[0, 1]`` -> logits ``(B, K)``; evaluated in eval mode.
    images:
        ``(B, C, H, W)`` evaluation images in ``[0, 1]`` (a few dozen to a few hundred).
    labels:
        ``(B,)`` true classes.
    eps:
        Budget of the headline figure (``> 0``) in ``norm``.
    norm:
        ``"linf"`` or ``"l2"``.
    robust_mask:
        ``(B,)`` bool, per-sample robustness claimed by the headline evaluation (clean-correct and not
        broken). It enters the worst case; its mean is the headline accuracy.
    surrogate:
        A model of the same task for the transfer attack; default: one distilled from ``model``.
    train_images:
        ``(M, C, H, W)`` images to distill the surrogate on (default ``images``).
    train_labels:
        Unused for distillation (the target's own predictions are imitated); validated if given.
    budget:
        ``"fast"`` or ``"standard"`` (see :data:`BUDGETS`).
    seed:
        Seed of every random choice.
    progress:
        Called with a short description before each stage.

    Returns
    -------
    ValidityReport
    """
    check_model(model)
    check_images(images)
    norm = check_norm(norm)
    eps = check_positive(eps, "eps")
    if budget not in BUDGETS:
        raise RobustnessInputError(f"budget must be one of {sorted(BUDGETS)}; got {budget!r}")
    cfg = BUDGETS[budget]
    device = model_device(model, images.device)
    x = images.detach().to(device)
    n = x.shape[0]
    y = check_labels(labels, n, device)
    if robust_mask is not None:
        rm = robust_mask.detach().cpu().numpy() if isinstance(robust_mask, torch.Tensor) else np.asarray(robust_mask)
        if rm.shape != (n,) or rm.dtype != bool:
            raise RobustnessInputError(f"robust_mask must be a bool array of shape ({n},); got {rm.dtype} {rm.shape}")
    if train_images is not None:
        check_images(train_images, name="train_images")
        if train_labels is not None:
            check_labels(train_labels, train_images.shape[0], device, name="train_labels")
    if surrogate is not None:
        check_model(surrogate)
    say = progress or (lambda _msg: None)
    checks: list[dict] = []
    robust: dict[str, np.ndarray] = {}
    settings: dict[str, Any] = {"budget": budget, "eps": eps, "norm": norm, "seed": seed, **cfg}

    with eval_mode(model):
        # --- randomness
        say("validity: randomness")
        with torch.no_grad():
            first, second = logits_of(model, x), logits_of(model, x)
        diff = float((first - second).abs().max())
        randomized = diff > 1e-6 * (1 + float(first.abs().max()))
        draws = cfg["draws"] if randomized else 1
        evaluator = _Evaluator(model, y, draws)
        # a randomized model's loss and predictions are noisy: run gradient attacks to the end
        noisy: dict[str, Any] = {"stop_on_success": False, "final": True} if randomized else {}
        clean = evaluator.correct(x).cpu()
        settings["eval_draws"] = draws
        checks.append(
            _check(
                "randomized",
                "warn" if randomized else "pass",
                diff,
                1e-6,
                f"two forwards differ by up to {diff:.3g}: scored by majority over {draws} draws, "
                f"attacked with EOT over {cfg['eot']} draws"
                if randomized
                else "the model is deterministic in eval mode",
                randomized=randomized,
            )
        )

        def score(name: str, adv: torch.Tensor, idx: torch.Tensor, cascade: bool = False) -> np.ndarray:
            """Per-sample robust (B,) for adversarials ``adv`` of the samples ``idx``.

            Samples outside ``idx`` keep their clean status, or with ``cascade`` (an attack run only on
            the samples every earlier attack left robust) the worst case so far.
            """
            out = clean.clone()
            if cascade:
                out &= torch.from_numpy(np.logical_and.reduce(list(robust.values())))
            if idx.numel():
                ok = evaluator.correct(adv, idx) & _within(adv, x[idx], eps_used.get(name, eps), norm)
                out[idx.cpu()] &= ok.cpu()
            robust[name] = out.numpy()
            return robust[name]

        eps_used: dict[str, float] = {}
        cc_idx = clean.nonzero().squeeze(1).to(device)
        xc, yc = x[cc_idx], y[cc_idx]

        # --- gradients (plain model)
        say("validity: gradient checks")
        if cc_idx.numel():
            for kind in ("ce", "dlr"):
                checks += _gradient_checks(model, xc, yc, eps, norm, cfg["probes"], seed, kind)

        # --- white-box baseline (plain gradients)
        say("validity: white-box attacks")
        white_names = []
        for kind in ("ce", "dlr"):
            name = f"pgd_{kind}"
            adv = gradient_attack(
                model,
                xc,
                yc,
                eps,
                norm=norm,
                loss=kind,
                steps=cfg["n_iter"],
                restarts=cfg["restarts"],
                seed=seed,
                **noisy,
            )
            score(name, adv, cc_idx)
            white_names.append(name)
            if cfg["apgd"] and _apgd is not None and not randomized:
                name = f"apgd_{kind}"
                adv = _apgd(model, xc, yc, eps, norm=norm, loss=kind, n_iter=cfg["n_iter"], n_restarts=1, seed=seed)
                score(name, adv, cc_idx)
                white_names.append(name)
        white = np.logical_and.reduce([robust[k] for k in white_names])

        # --- more iterations / restarts
        say("validity: more iterations")
        more = []
        for kind in ("ce", "dlr"):
            name = f"pgd_{kind}_x{cfg['more_factor']}"
            adv = gradient_attack(
                model,
                xc,
                yc,
                eps,
                norm=norm,
                loss=kind,
                steps=cfg["n_iter"] * cfg["more_factor"],
                restarts=cfg["more_restarts"],
                seed=seed + 1,
                **noisy,
            )
            more.append(score(name, adv, cc_idx))
        # "More iterations must not change the result": the result is the figure being checked (the headline's
        # per-sample robustness when given, with the white-box baseline), not the baseline alone.
        base = white & rm if robust_mask is not None else white
        more_all = np.logical_and.reduce(more) & base
        drop = float(base.mean() - more_all.mean())
        checks.append(
            _check(
                "more_iterations",
                "warn" if drop > max(GAP_WARN, 1.5 / n) else "pass",
                drop,
                GAP_WARN,
                f"{cfg['more_factor']}× iterations and {cfg['more_restarts']} restarts lowered the "
                f"{'checked' if robust_mask is not None else 'white-box'} accuracy by {drop:.1%}",
            )
        )

        # --- BPDA (straight-through) or, for TorchScript, a gradient-free attack
        scripted = contains_torchscript(model)
        found: list[str] = []
        st_model = StraightThroughModel(model)
        say("validity: BPDA")  # Python-level ops around a TorchScript core are still intercepted
        _grad(st_model, xc[:1] if cc_idx.numel() else x[:1], (yc if cc_idx.numel() else y)[:1], "ce")
        found = sorted(st_model.found)
        if found:
            view: nn.Module = EOTModel(st_model, cfg["eot"]) if randomized else st_model
            for kind in ("ce", "dlr"):
                adv = gradient_attack(
                    view, xc, yc, eps, norm=norm, loss=kind, steps=cfg["n_iter"], seed=seed + 2, **noisy
                )
                score(f"bpda_{kind}", adv, cc_idx)
        checks.append(
            _check(
                "non_differentiable_ops",
                "warn" if found else "pass",
                found,
                [],
                (
                    f"non-differentiable ops on the input path: {', '.join(found)}; "
                    "attacked with BPDA (straight-through)"
                    if found
                    else "no rounding / sign / clamp ops on the input path"
                )
                + (
                    "; the model contains TorchScript, whose ops cannot be intercepted: "
                    "a gradient-free NES attack is run"
                    if scripted
                    else ""
                ),
                torchscript=scripted,
            )
        )

        # --- EOT
        if randomized:
            say("validity: EOT")
            eot = EOTModel(model, cfg["eot"])
            for kind in ("ce", "dlr"):
                adv = gradient_attack(
                    eot, xc, yc, eps, norm=norm, loss=kind, steps=cfg["n_iter"], seed=seed + 3, **noisy
                )
                score(f"eot_{kind}", adv, cc_idx)

        # --- black box (score-based) on the samples every white-box attack left robust
        say("validity: black-box")
        before_black = np.logical_and.reduce(list(robust.values()))
        still = torch.from_numpy(before_black).nonzero().squeeze(1).to(device)
        if still.numel():
            adv = _square(model, x[still], y[still], eps, norm, cfg["square"], seed)
            score("square", adv, still, cascade=True)
            if scripted or norm == "l2":  # gradient-free stand-in for BPDA / the L2 black box
                adv = nes_attack(
                    model,
                    x[still],
                    y[still],
                    eps,
                    norm=norm,
                    steps=cfg["nes_steps"],
                    samples=cfg["nes_samples"],
                    seed=seed,
                )
                score("nes", adv, still, cascade=True)
        else:
            robust["square"] = np.logical_and.reduce(list(robust.values()))
        black = np.logical_and.reduce([robust[k] for k in ("square", "nes") if k in robust])
        black_only = float((~black & before_black).sum() / max(1, int(clean.sum())))
        checks.append(
            _check(
                "blackbox_vs_whitebox",
                _gap_status(black_only, n),
                black_only,
                GAP_WARN,
                f"{black_only:.1%} of clean-correct samples were broken by a black-box attack (Square "
                f"{cfg['square']} queries{', NES' if 'nes' in robust else ''}) but by no gradient attack",
            )
        )

        # --- transfer
        say("validity: transfer")
        sur = surrogate
        if sur is None:
            sur = distill_surrogate(
                model,
                train_images.to(device) if train_images is not None else x,
                eps=eps,
                norm=norm,
                epochs=cfg["distill_epochs"],
                draws=draws,
                seed=seed,
            )
            settings["surrogate"] = "distilled " + type(sur).__name__.strip("_")
        else:
            settings["surrogate"] = "given " + type(sur).__name__
        with eval_mode(sur):
            tr = []
            for kind in ("ce", "dlr"):
                adv = gradient_attack(
                    sur, xc, yc, eps, norm=norm, loss=kind, steps=cfg["n_iter"], stop_on_success=False, seed=seed + 4
                )
                tr.append(score(f"transfer_{kind}", adv, cc_idx))
        transfer_only = float((~np.logical_and.reduce(tr) & white).sum() / max(1, int(clean.sum())))
        checks.append(
            _check(
                "transfer_vs_whitebox",
                _gap_status(transfer_only, n),
                transfer_only,
                GAP_WARN,
                f"{transfer_only:.1%} of clean-correct samples were broken by adversarials transferred from the "
                f"surrogate but by no white-box gradient attack",
            )
        )

        # --- unbounded
        say("validity: unbounded attack")
        big = 1.0 if norm == "linf" else math.sqrt(x[0].numel())
        ub = []
        for kind in ("ce", "dlr"):
            adv = gradient_attack(
                model,
                xc,
                yc,
                big,
                norm=norm,
                loss=kind,
                steps=cfg["unbounded_iter"],
                random_start=False,
                seed=seed + 5,
                **noisy,
            )
            with torch.no_grad():
                ub.append(~evaluator.correct(adv, cc_idx).cpu().numpy())
        ub_success = float(np.logical_or.reduce(ub).mean()) if cc_idx.numel() else 1.0
        checks.append(
            _check(
                "unbounded_attack",
                "pass" if ub_success >= UNBOUNDED_PASS else ("warn" if ub_success >= UNBOUNDED_WARN else "fail"),
                ub_success,
                UNBOUNDED_PASS,
                f"a gradient attack with an unbounded budget ({norm} ε = {big:.3g}) broke {ub_success:.1%} of the "
                "clean-correct samples (should be ~100%)",
            )
        )

        # --- monotone in eps
        say("validity: ε sweep")
        grid = [m * eps for m in cfg["grid"] if m * eps <= big]
        accs = []
        for e in grid:
            name = f"sweep_{e:.4g}"
            eps_used[name] = e
            adv = gradient_attack(
                model, xc, yc, e, norm=norm, loss="dlr", steps=cfg["n_iter"] // 2, seed=seed + 6, **noisy
            )
            r = score(name, adv, cc_idx)
            del robust[name]  # other budgets do not enter the worst case at eps
            accs.append(float(r.mean()))
        rises = [accs[i + 1] - accs[i] for i in range(len(accs) - 1)]
        worst_rise = max(rises) if rises else 0.0
        checks.append(
            _check(
                "monotone_in_eps",
                "warn" if worst_rise > max(GAP_WARN, 1.5 / n) else "pass",
                worst_rise,
                0.0,
                "robust accuracy "
                + ", ".join(f"{a:.0%}@{e:.3g}" for a, e in zip(accs, grid, strict=True))
                + ("; it rises with ε" if worst_rise > max(GAP_WARN, 1.5 / n) else ""),
                eps_grid=grid,
                accuracy=accs,
            )
        )

        # --- active test in the input path
        say("validity: active test")
        checks.append(_active_check(model, x, eps, norm, cfg, seed, randomized))

    worst = clean.numpy().copy()
    if robust_mask is not None:
        worst &= rm
    for v in robust.values():
        worst &= v
    headline = float(rm.mean()) if robust_mask is not None else float(white.mean())
    settings["headline_source"] = (
        "robust_mask" if robust_mask is not None else "white-box baseline " + "+".join(white_names)
    )
    worst_acc = float(worst.mean())
    gap = headline - worst_acc
    checks.append(
        _check(
            "worst_case_gap",
            _gap_status(gap, n),
            gap,
            GAP_WARN,
            f"the diagnostic attacks lowered the robust accuracy from {headline:.1%} to {worst_acc:.1%}"
            if gap > 0
            else "no diagnostic attack broke a sample the headline evaluation counted as robust",
        )
    )
    order = {"pass": 0, "warn": 1, "fail": 2}
    status = max((c["status"] for c in checks), key=order.__getitem__)
    return ValidityReport(
        status=status,
        checks=checks,
        worst_case_robust=worst,
        worst_case_accuracy=worst_acc,
        headline_accuracy=headline,
        upper_bound_gap=gap,
        diagnostic_adv=robust,
        settings=settings,
    )


def _gap_status(frac: float, n: int) -> str:
    """Status of a fraction of samples lost to a stronger attack (one sample of slack on small batches)."""
    if frac <= max(GAP_WARN, 1.5 / n):
        return "pass"
    return "warn" if frac <= max(GAP_FAIL, 3.5 / n) else "fail"


def _active_check(
    model: nn.Module, x: torch.Tensor, eps: float, norm: str, cfg: dict, seed: int, randomized: bool
) -> dict:
    """Active test: strong white-box (CE / DLR) must find the planted adversarial, FGSM and Square-100 must not."""
    active, ya, ev = build_input_path_active_model(model, x, eps, norm=norm, seed=seed)
    n_eval = int(ev.sum())
    if n_eval == 0:
        return _check(
            "active_test",
            "warn",
            None,
            ACTIVE_STRONG,
            "no sample could carry a planted adversarial (all images predicted as one class?)",
            n_evaluated=0,
        )
    idx = ev.nonzero().squeeze(1)
    xa, yl = x[idx], ya[idx]
    view: nn.Module = EOTModel(active, cfg["eot"]) if randomized else active
    ev_active = _Evaluator(active, yl, cfg["draws"] if randomized else 1)
    rates = {}
    for kind in ("ce", "dlr", "margin"):
        adv = gradient_attack(
            view,
            xa,
            yl,
            eps,
            norm=norm,
            loss=kind,
            steps=cfg["active_iter"],
            random_start=False,
            seed=seed + 7,
            stop_on_success=not randomized,
            final=randomized,
        )
        rates[f"strong_{kind}"] = float((~ev_active.correct(adv) & _within(adv, xa, eps, norm)).float().mean())
    g, _ = _grad(view, xa, yl, "ce")
    fgsm_adv = _project(xa + eps * _direction(g, norm), xa, eps, norm)
    rates["weak_fgsm"] = float((~ev_active.correct(fgsm_adv)).float().mean())
    if norm == "linf":
        sq = square_attack(active, xa, yl, eps, max_iter=100, random_state=seed)
        rates["weak_square100"] = float((~ev_active.correct(sq)).float().mean())
    strong = max(v for k, v in rates.items() if k.startswith("strong"))
    weak = max(v for k, v in rates.items() if k.startswith("weak"))
    if strong < ACTIVE_STRONG:
        status = "fail"
        msg = (
            f"the white-box attack found only {strong:.0%} of the adversarial examples planted inside the model's "
            "input path (masking inside the model hides them)"
        )
    elif weak > ACTIVE_WEAK:
        status = "warn"
        msg = f"inconclusive: a weak attack also found {weak:.0%} of the planted adversarials"
    else:
        status = "pass"
        msg = (
            f"strong attack found {strong:.0%} of the planted adversarials, weak attacks (FGSM, Square-100) {weak:.0%}"
        )
    return _check(
        "active_test",
        status,
        strong,
        ACTIVE_STRONG,
        msg,
        n_evaluated=n_eval,
        n_excluded=int(x.shape[0] - n_eval),
        success=rates,
    )
