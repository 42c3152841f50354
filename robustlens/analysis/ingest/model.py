"""Load the user's model with its preprocessing config.

A model is a TorchScript file, a ``torch.export`` archive (``.pt2``), or a ``module:function`` factory
that returns an ``nn.Module``.
Its config (JSON) gives the preprocessing::

    {"input_size": [H, W], "channels": 1 or 3, "mean": [...], "std": [...],
     "classes": [...optional: class name of each output...]}

:class:`NormalizedModel` wraps it so every caller (embeddings, attacks, corruptions) feeds images in
``[0, 1]``, shape ``(B, channels, H, W)``, and gets logits in the workspace class order; normalization
happens inside the wrapper, and the wrapper is always in eval mode.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from robustlens.analysis.loader import stacks_by_shape
from robustlens.errors import ValidationError


@dataclass
class ModelConfig:
    """Preprocessing of a model: input size ``(H, W)``, channel count, per-channel mean / std."""

    input_size: tuple[int, int]
    channels: int
    mean: list[float]
    std: list[float]
    classes: list[str] | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        payload = dict(self.extra)
        payload.update(
            {"input_size": list(self.input_size), "channels": self.channels, "mean": self.mean, "std": self.std}
        )
        if self.classes is not None:
            payload["classes"] = self.classes
        return payload


def load_model_config(path: str | Path) -> ModelConfig:
    """Read and validate a model config JSON file."""
    path = Path(path)
    if not path.exists():
        raise ValidationError("model config not found", file=path)
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"not valid JSON: {exc}", file=path) from exc
    if not isinstance(payload, dict):
        raise ValidationError("expected a JSON object", file=path)
    return config_from_dict(payload, source=path)


def config_from_dict(payload: dict, *, source: str | Path = "model config") -> ModelConfig:
    """Validate a config mapping (see the module docstring for its fields)."""
    for key in ("input_size", "mean", "std"):
        if key not in payload:
            raise ValidationError(f"required field '{key}' is missing", file=source, column=key)
    size = payload["input_size"]
    if isinstance(size, int):
        size = [size, size]
    if not isinstance(size, list) or len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValidationError(
            f"input_size must be [height, width] of positive integers, got {size!r}", file=source, column="input_size"
        )
    channels = payload.get("channels", len(payload["mean"]) if isinstance(payload["mean"], list) else 3)
    if channels not in (1, 3):
        raise ValidationError(f"channels must be 1 or 3, got {channels!r}", file=source, column="channels")
    values = {}
    for key in ("mean", "std"):
        value = payload[key]
        value = [value] * channels if isinstance(value, int | float) else value
        if (
            not isinstance(value, list)
            or len(value) != channels
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ):
            raise ValidationError(
                f"{key} must be a list of {channels} numbers, got {payload[key]!r}", file=source, column=key
            )
        if not all(math.isfinite(v) for v in value):
            raise ValidationError(
                f"{key} must hold finite numbers, got {payload[key]!r} (NaN or infinity would "
                "turn every normalized pixel into NaN)",
                file=source,
                column=key,
            )
        values[key] = [float(v) for v in value]
    if any(s <= 0 for s in values["std"]):
        raise ValidationError(f"std must be positive, got {values['std']}", file=source, column="std")
    classes = payload.get("classes")
    if classes is not None and (
        not isinstance(classes, list)
        or not all(isinstance(c, str) for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise ValidationError("classes must be a list of distinct strings", file=source, column="classes")
    known = {"input_size", "channels", "mean", "std", "classes"}
    return ModelConfig(
        input_size=(size[0], size[1]),
        channels=int(channels),
        mean=values["mean"],
        std=values["std"],
        classes=classes,
        extra={k: v for k, v in payload.items() if k not in known},
    )


class NormalizedModel(nn.Module):
    """``[0, 1]`` images in, logits in workspace class order out; normalization inside.

    Parameters
    ----------
    model:
        The user's network: normalized ``(B, C, H, W)`` in, ``(B, K_model)`` logits out.
    config:
        Its preprocessing.
    output_index:
        For each workspace class, the model output column holding it (``None``: same order).
    """

    # Buffers registered in __init__ (moved with the module by ``.to(device)``).
    mean: torch.Tensor
    std: torch.Tensor
    output_index: torch.Tensor

    def __init__(self, model: nn.Module, config: ModelConfig, output_index: list[int] | None = None):
        super().__init__()
        self.model = model
        self.config = config
        shape = (1, config.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(shape))
        self.register_buffer(
            "output_index", torch.tensor(output_index if output_index is not None else [], dtype=torch.long)
        )
        self.eval()

    def train(self, mode: bool = True) -> NormalizedModel:
        # Always evaluated, never trained: batch-norm statistics and dropout must not change results.
        self.training = False
        # torch.export programs cannot switch modes: they run as traced, which is eval mode for a
        # model exported for inference.
        with contextlib.suppress(NotImplementedError):
            self.model.train(False)
        return self

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` in ``[0, 1]`` → the model's normalized input."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.model(self.normalize(images))
        if self.output_index.numel():
            logits = logits.index_select(1, self.output_index)
        return logits


def prepare_images(pixels: list[np.ndarray], config: ModelConfig) -> torch.Tensor:
    """Stack decoded images (``(H, W, C)`` float in ``[0, 1]``) into the model's input layout.

    Images are converted to the model's channel count (luminance for 3 → 1, repetition for 1 → 3)
    and resized to ``config.input_size`` with antialiased bilinear interpolation where needed.
    """
    height, width = config.input_size
    if not pixels:
        return torch.empty((0, config.channels, height, width), dtype=torch.float32)
    out = torch.empty((len(pixels), config.channels, height, width), dtype=torch.float32)
    for positions, stack in stacks_by_shape(pixels):  # images of one shape are converted together
        tensor = torch.from_numpy(stack).permute(0, 3, 1, 2)
        if tensor.shape[1] == 3 and config.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            tensor = (tensor * weights).sum(1, keepdim=True)
        elif tensor.shape[1] == 1 and config.channels == 3:
            tensor = tensor.expand(-1, 3, -1, -1)
        if tuple(tensor.shape[2:]) != (height, width):
            tensor = torch.nn.functional.interpolate(
                tensor, size=(height, width), mode="bilinear", align_corners=False, antialias=True
            )
        out[positions] = tensor
    return out.clamp_(0.0, 1.0)


def load_network(spec: str | Path, *, base_dir: str | Path | None = None) -> nn.Module:
    """Load a TorchScript file, or call a ``module:function`` factory (``base_dir`` joins ``sys.path``)."""
    text = str(spec)
    candidate = Path(text) if base_dir is None or Path(text).is_absolute() else Path(base_dir) / text
    if candidate.suffix == ".pt2":
        if not candidate.exists():
            raise ValidationError("model file not found", file=candidate)
        try:
            return torch.export.load(str(candidate)).module()
        except (RuntimeError, ValueError) as exc:
            raise ValidationError(f"not a loadable torch.export archive: {exc}", file=candidate) from exc
    if candidate.suffix in (".pt", ".pth", ".ts", ".torchscript") or candidate.exists():
        if not candidate.exists():
            raise ValidationError("model file not found", file=candidate)
        try:
            return torch.jit.load(str(candidate), map_location="cpu")
        except (RuntimeError, ValueError) as exc:
            raise ValidationError(
                f"not a loadable TorchScript file ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); save the model with "
                "torch.jit.script(model).save(path) or pass a module:function factory",
                file=candidate,
            ) from exc
    if ":" not in text:
        raise ValidationError(f"model '{text}' is neither an existing TorchScript file nor a 'module:function' factory")
    module_name, function_name = text.split(":", 1)
    added = str(base_dir) if base_dir is not None else None
    if added and added not in sys.path:
        sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"cannot import model factory module '{module_name}': {exc}") from exc
    except SyntaxError as exc:
        raise ValidationError(
            f"model factory module '{module_name}' has a syntax error at line {exc.lineno}: {exc.msg}",
            file=exc.filename,
        ) from exc
    except Exception as exc:
        raise ValidationError(
            f"importing model factory module '{module_name}' raised {type(exc).__name__}: {error_summary(exc)}"
        ) from exc
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValidationError(f"'{module_name}' has no callable '{function_name}'")
    try:
        network = factory()
    except Exception as exc:
        raise ValidationError(f"model factory '{text}' raised {type(exc).__name__}: {error_summary(exc)}") from exc
    if not isinstance(network, nn.Module):
        raise ValidationError(f"factory '{text}' returned {type(network).__name__}, expected torch.nn.Module")
    return network


def load_model(
    spec: str | Path,
    config: ModelConfig,
    classes: list[str],
    *,
    base_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> NormalizedModel:
    """Load a network, wrap it with its preprocessing and check its output against the classes.

    Parameters
    ----------
    spec:
        TorchScript path or ``module:function`` factory.
    config:
        Preprocessing config.
    classes:
        Workspace class order; the model's outputs are mapped to it through ``config.classes``.
    base_dir:
        Directory that relative paths and factory modules are resolved against.
    device:
        Where the wrapped model lives.
    """
    network = load_network(spec, base_dir=base_dir)
    output_index = None
    if config.classes is not None:
        unknown = sorted(set(classes) - set(config.classes))
        if unknown:
            raise ValidationError(
                f"class-count mismatch: dataset classes {unknown} are not among the model's classes {config.classes}",
                column="classes",
            )
        output_index = [config.classes.index(c) for c in classes]
        if output_index == list(range(len(config.classes))):
            output_index = None
    wrapped = NormalizedModel(network, config, output_index).to(device)
    probe = torch.zeros((2, config.channels, *config.input_size), device=device)
    _check_output(wrapped, probe, config, classes)
    return wrapped


def check_model_on_images(
    model: NormalizedModel, pixels: list[np.ndarray], classes: list[str], *, paths: list[str] | None = None
) -> None:
    """Run ``model`` on a real batch of decoded images and reject what would poison the analysis.

    Parameters
    ----------
    model:
        The wrapped model (:func:`load_model`).
    pixels:
        Decoded images, ``(H, W, C)`` floats in ``[0, 1]`` (a few samples of the dataset).
    classes:
        Workspace class order (length K).
    paths:
        Dataset-relative paths of ``pixels``, named in the message when the output is not finite.

    Raises :class:`ValidationError` when the model fails, outputs another shape than ``(B, K)``, or
    outputs NaN / infinity.
    """
    if not pixels:
        return
    batch = prepare_images(pixels, model.config).to(next(iter(model.buffers())).device)
    logits = _check_output(model, batch, model.config, classes, mapped=True)
    finite = torch.isfinite(logits).all(dim=1)
    if not bool(finite.all()):
        first = int(torch.nonzero(~finite)[0, 0])
        where = f" (first: '{paths[first]}')" if paths else ""
        raise ValidationError(
            f"the model outputs NaN or infinite logits for {int((~finite).sum())} of "
            f"{len(pixels)} sample images{where}; check the model and its mean/std"
        )


def _check_output(
    model: NormalizedModel, batch: torch.Tensor, config: ModelConfig, classes: list[str], *, mapped: bool = False
) -> torch.Tensor:
    """Forward ``batch``; raise a :class:`ValidationError` saying what was expected when it fails."""
    expected = len(config.classes) if config.classes is not None else len(classes)
    try:
        with torch.no_grad():
            raw = model.model(model.normalize(batch))
    except Exception as exc:
        accepted = _accepted_input(model.model, batch, exc)
        hint = (
            f"; the model accepts input of shape (batch, {accepted[0]}, {accepted[1]}, {accepted[2]}): set "
            f'"input_size": [{accepted[1]}, {accepted[2]}], "channels": {accepted[0]} in the model config'
            if accepted
            else ""
        )
        raise ValidationError(
            f"the model failed on an input of shape {tuple(batch.shape)} built from its config "
            f"(input_size {list(config.input_size)}, channels {config.channels}){hint}. "
            f"Model error: {error_summary(exc, with_type=True)}"
        ) from exc
    if not isinstance(raw, torch.Tensor) or raw.ndim != 2 or raw.shape[1] != expected:
        shape = tuple(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ValidationError(
            f"class-count mismatch: the model outputs shape {shape}, expected "
            f"(batch, {expected}) for classes {config.classes or classes}"
        )
    if mapped and model.output_index.numel():
        raw = raw.index_select(1, model.output_index)
    return raw


#: Square input sizes tried when the configured one fails, to tell the user what the model expects.
PROBE_SIZES = (8, 16, 28, 32, 48, 64, 96, 112, 128, 160, 224, 256, 299)


def _accepted_input(network: nn.Module, batch: torch.Tensor, error: Exception) -> tuple[int, int, int] | None:
    """``(channels, height, width)`` of a zero batch the network accepts, or ``None`` if no guess works."""
    channels = int(batch.shape[1])
    channel_order = (channels, 3 if channels == 1 else 1)
    candidates: list[tuple[int, int, int]] = []
    # A flattening linear layer names its input width ("mat1 and mat2 shapes cannot be multiplied
    # (2x3072 and 784x10)"): solve channels × side² = 784.
    match = re.search(r"\((\d+)x(\d+) and (\d+)x(\d+)\)", str(error))
    if match:
        features = int(match.group(3))
        for c in channel_order:
            side = math.isqrt(features // c) if features % c == 0 else 0
            if side and side * side * c == features:
                candidates.append((c, side, side))
    candidates += [(c, size, size) for c in channel_order for size in PROBE_SIZES]
    tried = {(channels, int(batch.shape[2]), int(batch.shape[3]))}
    for candidate in candidates:
        if candidate in tried:
            continue
        tried.add(candidate)
        try:
            with torch.no_grad():
                network(torch.zeros((1, *candidate), device=batch.device))
        except Exception:  # noqa: BLE001, S112 - a failed guess is expected; try the next one
            continue
        return candidate
    return None


def error_summary(exc: BaseException, *, with_type: bool = False) -> str:
    """The informative line of an exception message (``with_type``: prefixed by the exception's type).

    TorchScript wraps the real error after a header ("The following operation failed in the
    TorchScript interpreter." and a TorchScript traceback); the last line holds what went wrong, e.g.
    ``builtins.RuntimeError: weights were never loaded``.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if "TorchScript interpreter" in lines[0] or lines[0].startswith("Traceback") else lines[0]
    line = line.removeprefix("builtins.")[:500]
    if with_type and not re.match(r"[\w.]*(Error|Exception|Warning)\b:", line):
        line = f"{type(exc).__name__}: {line}"
    return line
