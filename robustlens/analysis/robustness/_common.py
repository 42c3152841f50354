"""Shared helpers of the robustness subpackage: input validation, eval mode, batching, seeding.

Conventions used by every module of :mod:`robustlens.analysis.robustness`:

* images are ``torch.Tensor`` of shape ``(B, C, H, W)``, floating point, values in ``[0, 1]``;
  normalization (mean/std) belongs inside the model wrapper, never in this code;
* a model is a ``torch.nn.Module`` mapping such images to logits of shape ``(B, K)``;
  it is put in eval mode for the duration of a call and its previous per-module modes restored;
* randomness comes only from explicit ``random_state`` integers or ``torch.Generator`` objects;
  global RNG state is neither read nor changed;
* computations run on the device of the input tensor (or of the model, for dataset-level entry
  points that move batches to the model).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from robustlens.errors import ValidationError

#: Slack allowed on the ``[0, 1]`` range check (float rounding of upstream pipelines).
RANGE_TOL = 1e-5


class RobustnessInputError(ValidationError, ValueError):
    """Bad input to a robustness entry point (also a ``ValueError`` for callers that expect one)."""


# ----------------------------------------------------------------------------------------- checks


def check_images(images: object, *, name: str = "images") -> torch.Tensor:
    """Validate a batch of images and return it unchanged.

    Parameters
    ----------
    images:
        Expected: floating ``torch.Tensor`` of shape ``(B, C, H, W)`` with ``B >= 1``, finite values
        in ``[0, 1]`` (``RANGE_TOL`` slack).
    name:
        Argument name used in the error message.

    Raises
    ------
    RobustnessInputError
        Saying what was expected and what came.
    """
    expected = f"{name} must be a float torch.Tensor of shape (B, C, H, W) with values in [0, 1]"
    if not isinstance(images, torch.Tensor):
        raise RobustnessInputError(f"{expected}; got {type(images).__name__}")
    if images.ndim != 4:
        raise RobustnessInputError(f"{expected}; got shape {tuple(images.shape)} ({images.ndim} dims)")
    if not images.is_floating_point():
        raise RobustnessInputError(f"{expected}; got dtype {images.dtype}")
    if images.shape[0] == 0 or images.numel() == 0:
        raise RobustnessInputError(f"{expected}; got an empty tensor of shape {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise RobustnessInputError(f"{expected}; got non-finite values (NaN or inf)")
    lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOL or hi > 1 + RANGE_TOL:
        raise RobustnessInputError(
            f"{expected}; got values in [{lo:.4g}, {hi:.4g}] (normalize inside the model, not the data)"
        )
    return images


def check_labels(
    labels: object, n: int, device: torch.device, *, name: str = "labels", num_classes: int | None = None
) -> torch.Tensor:
    """Validate class labels and return them as an ``int64`` tensor on ``device``.

    Parameters
    ----------
    labels:
        Expected: 1-D integer ``torch.Tensor`` / ``numpy.ndarray`` / sequence of length ``n``,
        values in ``[0, num_classes)`` when ``num_classes`` is given (else ``>= 0``).
    n:
        Number of images the labels belong to.
    device:
        Device of the returned tensor.
    """
    if isinstance(labels, torch.Tensor):
        t = labels.detach()
    else:
        try:
            arr = np.asarray(labels)
        except (TypeError, ValueError) as exc:
            raise RobustnessInputError(f"{name} must be a 1-D integer array of length {n}; got {labels!r}") from exc
        if arr.dtype.kind not in "iu":
            raise RobustnessInputError(f"{name} must hold integers; got dtype {arr.dtype}")
        t = torch.from_numpy(arr.astype(np.int64))
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise RobustnessInputError(f"{name} must hold integers; got dtype {t.dtype}")
    if t.ndim != 1 or t.shape[0] != n:
        raise RobustnessInputError(f"{name} must have shape ({n},) to match the images; got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if n and int(t.min()) < 0:
        raise RobustnessInputError(f"{name} must be >= 0; got minimum {int(t.min())}")
    if num_classes is not None and n and int(t.max()) >= num_classes:
        raise RobustnessInputError(
            f"{name} must be < the model's number of classes ({num_classes}); got maximum {int(t.max())}"
        )
    return t


def check_model(model: object) -> torch.nn.Module:
    """Validate that ``model`` is a ``torch.nn.Module`` (mapping ``(B, C, H, W)`` to logits ``(B, K)``)."""
    if not isinstance(model, torch.nn.Module):
        raise RobustnessInputError(
            f"model must be a torch.nn.Module mapping (B, C, H, W) images in [0, 1] to logits (B, K); "
            f"got {type(model).__name__}"
        )
    return model


def check_positive(value: object, name: str, *, allow_zero: bool = False) -> float:
    """Validate a finite real number ``> 0`` (``>= 0`` with ``allow_zero``) and return it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise RobustnessInputError(f"{name} must be a real number; got {type(value).__name__} {value!r}")
    v = float(value)
    ok = np.isfinite(v) and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise RobustnessInputError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite; got {v}")
    return v


def check_fraction(value: object, name: str) -> float:
    """Validate a real number in the open interval ``(0, 1)`` (a significance level, a share) and return it as
    float."""
    v = check_positive(value, name)
    if v >= 1:
        raise RobustnessInputError(f"{name} must be in (0, 1); got {v}")
    return v


def check_seed(value: object, name: str = "random_state") -> None:
    """Refuse anything but an integer seed (bool included) for ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RobustnessInputError(f"{name} must be an int; got {value!r}")


def check_int(value: object, name: str, *, minimum: int = 1) -> int:
    """Validate an integer ``>= minimum`` and return it."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RobustnessInputError(f"{name} must be an integer >= {minimum}; got {type(value).__name__} {value!r}")
    if int(value) < minimum:
        raise RobustnessInputError(f"{name} must be an integer >= {minimum}; got {int(value)}")
    return int(value)


def check_norm(norm: object) -> str:
    """Validate a threat-model norm name: ``"linf"`` or ``"l2"`` (aliases ``"inf"``, ``np.inf``, ``2``)."""
    aliases = {"linf": "linf", "inf": "linf", "l_inf": "linf", "l2": "l2", "2": "l2"}
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        key = "linf" if np.isinf(norm) else ("l2" if norm == 2 else None)
    else:
        key = aliases.get(str(norm).lower())
    if key is None:
        raise RobustnessInputError(f"norm must be 'linf' or 'l2'; got {norm!r}")
    return key


# ------------------------------------------------------------------------------------ model usage


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every submodule of ``model`` in eval mode, restoring each one's previous mode on exit."""
    states = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, was_training in states:
            m.training = was_training


def model_device(model: torch.nn.Module, fallback: torch.device) -> torch.device:
    """Device of the model's first parameter or buffer, else ``fallback``."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return fallback


def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Forward ``images`` ``(B, C, H, W)`` and check the output is logits ``(B, K)``, ``K >= 2``."""
    out = model(images)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0] or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RobustnessInputError(
            f"model must return logits of shape (B, K) with K >= 2 for B = {images.shape[0]} images; got {got}"
        )
    return out


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Logits ``(B, K)`` of ``images`` ``(B, C, H, W)``, computed in chunks of ``batch_size`` (all at once if None).

    The caller is responsible for eval mode; chunks run on the images' device.
    """
    if batch_size is None or batch_size >= images.shape[0]:
        return logits_of(model, images).detach()
    return torch.cat(
        [logits_of(model, images[i : i + batch_size]).detach() for i in range(0, images.shape[0], batch_size)]
    )


def predict_labels(model: torch.nn.Module, images: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Predicted classes ``(B,)`` (argmax of the logits) of ``images`` ``(B, C, H, W)``."""
    return predict_logits(model, images, batch_size).argmax(dim=1)


def flat_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample L2 and L∞ norms ``(B,)``, ``(B,)`` of a perturbation ``(B, ...)``."""
    flat = delta.reshape(delta.shape[0], -1)
    return flat.norm(p=2, dim=1), flat.abs().amax(dim=1)


def square_p(p_init: float, it: int) -> float:
    """Square attack's fraction of pixels per window at query ``it`` (schedule of the original code, 10000 queries).

    ``p_init`` halves at queries 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (``p_init / 512`` after 8000).
    AutoAttack's Square uses it as is; :func:`~robustlens.analysis.robustness.attacks.square_attack` rescales its
    iteration to 10000 queries first.
    """
    for bound, div in (
        (10, 1),
        (50, 2),
        (200, 4),
        (500, 8),
        (1000, 16),
        (2000, 32),
        (4000, 64),
        (6000, 128),
        (8000, 256),
    ):
        if it <= bound:
            return p_init / div
    return p_init / 512


# ---------------------------------------------------------------------------------------- seeding


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``z_y - max_{j≠y} z_j`` per sample ``(B,)`` of logits ``(B, K)`` and true classes ``(B,)``.

    Positive = still correctly classified. The Square attacks' margin loss, DLR's numerator (negated) and the
    run's margin objective (negated).
    """
    real = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return real - other


def nearest_anchor(
    z: torch.Tensor, anchors: torch.Tensor, deltas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Locate inputs among the anchors of a planted test model.

    ``z`` ``(B, C, H, W)``, ``anchors`` and ``deltas`` ``(A, C, H, W)``. Returns ``j`` ``(B,)``, the index of each
    input's nearest anchor (L2, chosen without gradient: piecewise constant), ``u`` ``(B, C·H·W)``, the flattened
    offset ``z - anchors[j]`` (differentiable in ``z``), and ``d`` ``(B, C·H·W)``, the flattened ``deltas[j]``.
    """
    flat = z.reshape(z.shape[0], -1)
    flat_anchors = anchors.reshape(anchors.shape[0], -1)
    with torch.no_grad():
        j = torch.cdist(flat.detach(), flat_anchors).argmin(dim=1)
    return j, flat - flat_anchors[j], deltas.reshape(deltas.shape[0], -1)[j]


def derive_seed(random_state: int, *keys: int | str) -> int:
    """A 63-bit seed derived deterministically from ``random_state`` and ``keys`` (strings hashed by CRC32).

    Used so that e.g. the noise of one (corruption, severity, batch) does not depend on which other
    corruptions were requested.
    """
    parts = [int(random_state) & 0xFFFFFFFF]
    for k in keys:
        parts.append(zlib.crc32(k.encode()) if isinstance(k, str) else int(k) & 0xFFFFFFFF)
    hi, lo = (int(v) for v in np.random.SeedSequence(parts).generate_state(2, dtype=np.uint32))
    return ((hi << 32) | lo) & ((1 << 63) - 1)


def make_generator(random_state: int | torch.Generator | None, *keys: int | str) -> torch.Generator:
    """The given ``torch.Generator``, or a fresh CPU one seeded from ``random_state`` (``None`` = 0) and ``keys``."""
    if isinstance(random_state, torch.Generator):
        return random_state
    if random_state is None:
        random_state = 0
    if isinstance(random_state, bool) or not isinstance(random_state, (int, np.integer)):
        raise RobustnessInputError(
            f"random_state must be an int, a torch.Generator or None; got {type(random_state).__name__}"
        )
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(int(random_state), *keys))
    return g


def rand_like_on(
    shape: tuple[int, ...],
    generator: torch.Generator,
    device: torch.device,
    kind: str = "rand",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random tensor of ``shape`` drawn on the generator's device, returned on ``device``.

    ``kind``: ``"rand"`` (uniform [0, 1)) or ``"randn"`` (standard normal). Drawing on the generator's
    device keeps results identical on CPU and CUDA for a CPU generator.
    """
    fn = torch.rand if kind == "rand" else torch.randn
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)
