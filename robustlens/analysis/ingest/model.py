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

import importlib
import json
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
        payload.update({"input_size": list(self.input_size), "channels": self.channels, "mean": self.mean,
                        "std": self.std})
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
    if (not isinstance(size, list) or len(size) != 2
            or not all(isinstance(v, int) and v > 0 for v in size)):
        raise ValidationError(f"input_size must be [height, width] of positive integers, got {size!r}",
                              file=source, column="input_size")
    channels = payload.get("channels", len(payload["mean"]) if isinstance(payload["mean"], list) else 3)
    if channels not in (1, 3):
        raise ValidationError(f"channels must be 1 or 3, got {channels!r}", file=source, column="channels")
    values = {}
    for key in ("mean", "std"):
        value = payload[key]
        value = [value] * channels if isinstance(value, int | float) else value
        if (not isinstance(value, list) or len(value) != channels
                or not all(isinstance(v, int | float) for v in value)):
            raise ValidationError(f"{key} must be a list of {channels} numbers, got {payload[key]!r}",
                                  file=source, column=key)
        values[key] = [float(v) for v in value]
    if any(s <= 0 for s in values["std"]):
        raise ValidationError(f"std must be positive, got {values['std']}", file=source, column="std")
    classes = payload.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, str) for c in classes)
                                or len(set(classes)) != len(classes)):
        raise ValidationError("classes must be a list of distinct strings", file=source, column="classes")
    known = {"input_size", "channels", "mean", "std", "classes"}
    return ModelConfig(input_size=(size[0], size[1]), channels=int(channels), mean=values["mean"],
                       std=values["std"], classes=classes, extra={k: v for k, v in payload.items() if k not in known})


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

    def __init__(self, model: nn.Module, config: ModelConfig, output_index: list[int] | None = None):
        super().__init__()
        self.model = model
        self.config = config
        shape = (1, config.channels, 1, 1)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(shape))
        self.register_buffer("output_index", torch.tensor(output_index if output_index is not None else [],
                                                          dtype=torch.long))
        self.eval()

    def train(self, mode: bool = True) -> NormalizedModel:
        # Always evaluated, never trained: batch-norm statistics and dropout must not change results.
        self.training = False
        try:
            self.model.train(False)
        except NotImplementedError:
            # torch.export programs cannot switch modes: they run as traced, which is eval mode for a
            # model exported for inference.
            pass
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
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bilinear",
                                                     align_corners=False, antialias=True)
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
            raise ValidationError(f"not a loadable TorchScript file ({exc.__class__.__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''}); save the model with "
                                  "torch.jit.script(model).save(path) or pass a module:function factory",
                                  file=candidate) from exc
    if ":" not in text:
        raise ValidationError(f"model '{text}' is neither an existing TorchScript file nor a "
                              "'module:function' factory")
    module_name, function_name = text.split(":", 1)
    added = str(base_dir) if base_dir is not None else None
    if added and added not in sys.path:
        sys.path.insert(0, added)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValidationError(f"cannot import model factory module '{module_name}': {exc}") from exc
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise ValidationError(f"'{module_name}' has no callable '{function_name}'")
    network = factory()
    if not isinstance(network, nn.Module):
        raise ValidationError(f"factory '{text}' returned {type(network).__name__}, expected torch.nn.Module")
    return network


def load_model(spec: str | Path, config: ModelConfig, classes: list[str], *,
               base_dir: str | Path | None = None, device: str | torch.device = "cpu") -> NormalizedModel:
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
            raise ValidationError(f"class-count mismatch: dataset classes {unknown} are not among the model's "
                                  f"classes {config.classes}", column="classes")
        output_index = [config.classes.index(c) for c in classes]
        if output_index == list(range(len(config.classes))):
            output_index = None
    wrapped = NormalizedModel(network, config, output_index).to(device)
    expected = len(config.classes) if config.classes is not None else len(classes)
    probe = torch.zeros((2, config.channels, *config.input_size), device=device)
    try:
        with torch.no_grad():
            raw = wrapped.model(wrapped.normalize(probe))
    except RuntimeError as exc:
        raise ValidationError(f"the model failed on an input of shape {tuple(probe.shape)} built from its "
                              f"config (input_size, channels): {str(exc).splitlines()[0]}") from exc
    if raw.ndim != 2 or raw.shape[1] != expected:
        raise ValidationError(f"class-count mismatch: the model outputs shape {tuple(raw.shape)}, expected "
                              f"(batch, {expected}) for classes {config.classes or classes}")
    return wrapped
