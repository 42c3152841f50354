"""Formal verification of ReLU networks: interval bound propagation (IBP) and CROWN.

A certificate here holds for *every* input of the threat set, unlike randomized smoothing's
probabilistic one: sample ``b`` is *verified* at radius ``ε`` when a sound lower bound of the logit
margin ``logit_y(x') - logit_j(x')`` is ``> 0`` for every class ``j != y`` and every ``x'`` in

* ``{x' : ‖x' - x‖∞ <= ε} ∩ [0, 1]^d`` (``norm="linf"``), or
* ``{x' : ‖x' - x‖₂ <= ε} ∩ [0, 1]^d`` (``norm="l2"``).

Methods
-------
* **IBP** (Gowal et al. 2018): intervals pushed layer by layer (center/radius form for affine layers);
  the trailing affine layers are composed with the margin specification before concretization
  ("elision of the last layer"), and for L2 the first non-diagonal affine layer is bounded exactly
  through the dual norm (``ε‖row‖₂``).
* **CROWN** (Zhang et al. 2018): linear lower/upper relaxations of every ReLU, propagated backward
  from the margin specification ``C`` (``e_y - e_j`` for every ``j``) to the input, then concretized
  over the threat set (Hölder: ``‖·‖₁`` dual of L∞, ``‖·‖₂`` dual of L2; the ``[0, 1]`` box is used
  as well). Pre-activation bounds of every ReLU come from backward CROWN too (only for the neurons
  that IBP leaves unstable), intersected with the IBP ones; the ReLU lower slope is CROWN's adaptive
  choice (1 if ``u > -l`` else 0).

Supported networks are chains of: input normalization ``(x - mean) / std`` (per-channel affine),
``Linear``, ``Conv2d`` (zero padding), ``BatchNorm1d/2d`` in eval mode (folded into the preceding
``Conv2d``/``Linear`` when directly after one, else a per-channel affine layer), ``ReLU``,
``AvgPool2d``/``AdaptiveAvgPool2d`` (exact, linear), ``MaxPool2d`` (sound relaxation: lower bound by
the window input with the largest lower bound, upper bound by the largest upper bound, exact when one
input dominates its window), ``Flatten``, ``Dropout``/``Identity`` (no-ops in eval mode). Models are
``nn.Module`` trees or TorchScript modules; :func:`extract_layers` walks their children and checks
that the reconstructed chain reproduces the model's logits, raising :class:`UnsupportedModelError`
naming the layer or operation otherwise.

Bounds are computed in the dtype of the images (float32 by default; pass float64 images or
``dtype=torch.float64`` for tighter floating-point agreement). They are sound for the real-valued
network; float rounding (~1e-6 relative in float32) is not modelled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import grad as nn_grad

from robustlens.errors import ValidationError

if TYPE_CHECKING:
    import pandas as pd

from ._common import check_images, check_int, check_labels, check_norm, check_positive, eval_mode, model_device

__all__ = [
    "UnsupportedModelError",
    "Layer",
    "extract_layers",
    "forward_layers",
    "ibp_bounds",
    "crown_bounds",
    "margin_lower_bounds",
    "margin_specification",
    "verify",
    "VerificationResult",
]

#: Approximate number of floats one backward-propagated coefficient tensor may hold (memory cap, ~64 MiB f32).
_MAX_COEFF_FLOATS = 1 << 24
METHODS = ("ibp", "crown", "alpha-crown")
#: Default cost cap of :func:`verify`'s CROWN pre-activation bounds (coefficient floats per sample).
DEFAULT_REFINE_BUDGET = 1e7


class UnsupportedModelError(ValidationError):
    """The model contains a layer or operation that the verifier cannot bound (the message names it)."""


# ============================================================================================ layers


class Layer:
    """One step of a feed-forward chain; ``in_shape``/``out_shape`` exclude the batch dimension.

    ``kind`` is ``"affine"`` (``y = L(x) + offset`` with ``L`` linear), ``"relu"`` or ``"maxpool"``.
    """

    kind = "affine"
    #: An affine layer whose linear part is diagonal (elementwise scaling or a reshape).
    diagonal = False

    def __init__(self, name: str):
        self.name = name
        self.in_shape: tuple[int, ...] = ()
        self.out_shape: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def ibp(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval ``[lo, hi]`` of the input ``(B, *in_shape)`` -> interval of the output."""
        raise NotImplementedError

    def to(self, device: torch.device, dtype: torch.dtype) -> Layer:
        """Copy with every tensor on ``device`` in ``dtype``."""
        new = object.__new__(type(self))
        for k, v in self.__dict__.items():
            floating = isinstance(v, torch.Tensor) and v.is_floating_point()
            new.__dict__[k] = (
                v.to(device=device, dtype=dtype) if floating else (v.to(device) if isinstance(v, torch.Tensor) else v)
            )
        return new

    def describe(self) -> str:
        return f"{type(self).__name__}({self.name}: {self.in_shape} -> {self.out_shape})"

    def __repr__(self) -> str:
        return self.describe()


class AffineLayer(Layer):
    """``y = linear(x) + offset``; ``offset`` has shape ``out_shape`` (the output at ``x = 0``)."""

    offset: torch.Tensor

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part with every weight replaced by its absolute value."""
        raise NotImplementedError

    def sq_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        """The linear part with squared weights (``None`` if not available)."""
        return None

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        """Transpose: coefficients ``(N, *out_shape)`` on the output -> ``(N, *in_shape)`` on the input."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset

    def ibp(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        center, radius = (hi + lo) / 2, (hi - lo) / 2
        c, r = self.forward(center), self.abs_linear(radius)
        return c - r, c + r

    def finalize(self, in_shape: tuple[int, ...]) -> None:
        self.in_shape = tuple(in_shape)
        zero = torch.zeros((1, *in_shape), dtype=self._dtype(), device=self._device())
        self.offset = torch.zeros(0)
        self.offset = self._offset_from(zero)
        self.out_shape = tuple(self.offset.shape)

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _dtype(self) -> torch.dtype:
        for v in self.__dict__.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return v.dtype
        return torch.float32

    def _device(self) -> torch.device:
        for v in self.__dict__.values():
            if isinstance(v, torch.Tensor):
                return v.device
        return torch.device("cpu")


def _weight_and_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached copies of a layer's ``weight`` ``(O, ...)`` and ``bias`` ``(O,)`` (zeros where it has none)."""
    if bias is None:
        return weight.detach().clone(), torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    return weight.detach().clone(), bias.detach().clone()


class LinearLayer(AffineLayer):
    """``y = x @ weight.T + bias``; ``weight (O, I)``, input ``(B, I)``."""

    def __init__(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(weight, bias)

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        return self.bias.clone()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.abs().T

    def sq_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        return x @ self.weight.square().T

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a @ self.weight


class Conv2dLayer(AffineLayer):
    """2-D convolution with zero padding; input ``(B, C, H, W)``."""

    def __init__(
        self,
        name: str,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: Any,
        padding: Any,
        dilation: Any,
        groups: int,
    ):
        super().__init__(name)
        self.weight, self.bias = _weight_and_bias(weight, bias)
        self.stride, self.padding, self.dilation, self.groups = tuple(stride), tuple(padding), tuple(dilation), groups

    def _conv(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        out = self._conv(zero, self.weight)[0]
        return out + self.bias.view(-1, 1, 1)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight)

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv(x, self.weight.abs())

    def sq_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        return self._conv(x, self.weight.square())

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return nn_grad.conv2d_input(
            (a.shape[0], *self.in_shape), self.weight, a, self.stride, self.padding, self.dilation, self.groups
        )


class ChannelAffineLayer(AffineLayer):
    """``y[:, c] = scale[c] * x[:, c] + shift[c]`` (input normalization, unfolded batch norm)."""

    diagonal = True

    def __init__(self, name: str, scale: torch.Tensor, shift: torch.Tensor):
        super().__init__(name)
        self.scale = scale.detach().clone().reshape(-1)
        self.shift = shift.detach().clone().reshape(-1)

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(-1, *([1] * (len(self.in_shape) - 1)))

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        if self.scale.numel() not in (1, self.in_shape[0]):
            raise UnsupportedModelError(
                f"layer '{self.name}' has {self.scale.numel()} channels but its input has shape {self.in_shape}"
            )
        return (zero[0] + self._view(self.shift)).expand(self.in_shape).clone()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.scale)

    def abs_linear(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._view(self.scale.abs())

    def sq_linear(self, x: torch.Tensor) -> torch.Tensor | None:
        return x * self._view(self.scale.square())

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self._view(self.scale)


class ReshapeLayer(AffineLayer):
    """``Flatten`` (any reshape that keeps the element order)."""

    diagonal = True

    def __init__(self, name: str, out_shape: tuple[int, ...]):
        super().__init__(name)
        self.target = tuple(out_shape)

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        return zero.reshape(self.target)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.target)

    abs_linear = linear
    sq_linear = linear

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], *self.in_shape)


class PoolLinearLayer(AffineLayer):
    """A linear pooling with non-negative weights (``AvgPool2d``, ``AdaptiveAvgPool2d``)."""

    def __init__(self, name: str, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__(name)
        self.fn = fn

    def _offset_from(self, zero: torch.Tensor) -> torch.Tensor:
        return self.fn(zero)[0] * 0

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    abs_linear = linear

    def backward(self, a: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            probe = torch.zeros((a.shape[0], *self.in_shape), dtype=a.dtype, device=a.device, requires_grad=True)
            (grad,) = torch.autograd.grad(self.fn(probe), probe, grad_outputs=a)
        return grad


class ReLULayer(Layer):
    kind = "relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_min(0)

    def ibp(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lo.clamp_min(0), hi.clamp_min(0)


class MaxPool2dLayer(Layer):
    """``MaxPool2d``; bounded by the relaxation described in the module docstring."""

    kind = "maxpool"

    def __init__(self, name: str, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool):
        super().__init__(name)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation, self.ceil_mode = tuple(padding), tuple(dilation), bool(ceil_mode)

    def _pool(self, x: torch.Tensor, return_indices: bool = False) -> Any:
        pool: Any = F.max_pool2d  # torch's stubs do not cover tuple sizes with return_indices
        return pool(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode, return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._pool(x)

    def ibp(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pool(lo), self._pool(hi)

    def relaxation(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For input bounds ``(B, C, H, W)``: index ``(B, C, Ho*Wo)`` of the window input with the largest lower
        bound, whether that input dominates its window ``(B, C, Ho, Wo)`` (then max = it exactly), and the
        constant upper bound ``(B, C, Ho, Wo)`` (largest upper bound of the window)."""
        lmax, idx = self._pool(lo, return_indices=True)
        umax = self._pool(hi)
        simple = self.kernel_size == self.stride and self.padding == (0, 0) and self.dilation == (1, 1)
        if simple:
            flat_hi = hi.flatten(2).clone()
            flat_hi.scatter_(2, idx.flatten(2), float("-inf"))
            other = self._pool(flat_hi.view_as(hi))
            dominated = lmax >= other
        else:  # overlapping windows: no domination shortcut (still sound)
            dominated = torch.zeros_like(lmax, dtype=torch.bool)
        return idx.flatten(2), dominated, umax


# ======================================================================================= extraction


def _type_name(module: nn.Module) -> str:
    return getattr(module, "original_name", None) or type(module).__name__


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1])) if len(v) == 2 else (int(v[0]), int(v[0]))
    return int(v), int(v)


def _tensor_attr(module: nn.Module, name: str) -> torch.Tensor | None:
    v = getattr(module, name, None)
    return v if isinstance(v, torch.Tensor) else None


_SKIPPED = {"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout", "Identity"}
_CONTAINERS = {"Sequential"}


def _walk(module: Any, name: str, out: list[tuple[str, nn.Module]]) -> None:
    """Append ``(qualified name, leaf module)`` in execution order (children in registration order)."""
    tname = _type_name(module)
    if tname == "NormalizedModel" and hasattr(module, "model") and hasattr(module, "mean"):
        out.append((f"{name}.normalize" if name else "normalize", module))
        _walk(module.model, f"{name}.model" if name else "model", out)
        index = _tensor_attr(module, "output_index")
        if index is not None and index.numel():
            out.append((f"{name}.output_index" if name else "output_index", module))
        return
    children = list(module.named_children())
    if tname in _LEAVES or tname in _SKIPPED or not children:
        out.append((name or tname, module))
        return
    for child_name, child in children:
        _walk(child, f"{name}.{child_name}" if name else child_name, out)


def _convert(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    """Layers for one leaf module (empty for no-ops); may fold into ``previous[-1]`` in place."""
    tname = _type_name(module)
    if tname == "NormalizedModel":
        if name.endswith("output_index"):
            index = module.output_index.long()
            k = in_shape[0]
            weight = torch.eye(k, dtype=torch.float32, device=index.device)[index]
            return [LinearLayer(name, weight, None)]
        mean, std = module.mean.reshape(-1).float(), module.std.reshape(-1).float()
        return [ChannelAffineLayer(name, 1.0 / std, -mean / std)]
    if tname in _SKIPPED:
        return []
    handler = _LEAVES.get(tname)
    if handler is None:
        hint = (
            "a layer whose forward is not a chain of supported layers"
            if list(module.named_children())
            else "an unsupported layer"
        )
        raise UnsupportedModelError(
            f"layer '{name}' ({tname}) is not supported by formal verification ({hint}); supported: "
            f"{', '.join(sorted(_LEAVES))}, Dropout, Identity, input normalization"
        )
    return handler(name, module, in_shape, previous)


def _linear_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    return [LinearLayer(name, module.weight.float(), _tensor_attr(module, "bias"))]


def _conv_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    mode = getattr(module, "padding_mode", "zeros")
    if mode != "zeros":
        raise UnsupportedModelError(f"layer '{name}' (Conv2d) uses padding_mode='{mode}'; only 'zeros' is supported")
    padding = module.padding
    if isinstance(padding, str):
        k = _pair(module.kernel_size)
        d = _pair(module.dilation)
        if padding == "valid":
            padding = (0, 0)
        elif all((di * (ki - 1)) % 2 == 0 for ki, di in zip(k, d, strict=True)) and _pair(module.stride) == (1, 1):
            padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d, strict=True))
        else:
            raise UnsupportedModelError(f"layer '{name}' (Conv2d) uses asymmetric padding='{padding}'")
    return [
        Conv2dLayer(
            name,
            module.weight.float(),
            _tensor_attr(module, "bias"),
            _pair(module.stride),
            _pair(padding),
            _pair(module.dilation),
            int(module.groups),
        )
    ]


def _batchnorm_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    mean, var = _tensor_attr(module, "running_mean"), _tensor_attr(module, "running_var")
    if mean is None or var is None:
        raise UnsupportedModelError(
            f"layer '{name}' ({_type_name(module)}) has no running statistics "
            "(track_running_stats=False uses batch statistics, which is not a fixed function)"
        )
    gamma = _tensor_attr(module, "weight")
    beta = _tensor_attr(module, "bias")
    scale = 1.0 / torch.sqrt(var.float() + float(module.eps))
    if gamma is not None:
        scale = scale * gamma.float()
    shift = -mean.float() * scale + (beta.float() if beta is not None else 0.0)
    last = previous[-1] if previous else None
    if isinstance(last, (Conv2dLayer, LinearLayer)) and last.weight.shape[0] == scale.numel():
        fold_batchnorm(last, scale, shift)
        last.name = f"{last.name}+{name}"
        return []
    return [ChannelAffineLayer(name, scale, shift)]


def fold_batchnorm(layer: Conv2dLayer | LinearLayer, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Fold an eval-mode batch norm ``y = scale * x + shift`` (per output channel) into ``layer`` in place."""
    view = (-1,) + (1,) * (layer.weight.ndim - 1)
    layer.weight = layer.weight * scale.view(view).to(layer.weight)
    layer.bias = layer.bias * scale.to(layer.bias) + shift.to(layer.bias)


def _flatten_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    start, end = int(getattr(module, "start_dim", 1)), int(getattr(module, "end_dim", -1))
    full = (1, *in_shape)
    out = torch.empty(full, device="meta").flatten(start, end).shape[1:]
    return [ReshapeLayer(name, tuple(out))]


def _relu_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    return [ReLULayer(name)]


def _pool_window(module: Any) -> tuple[tuple[int, int], tuple[int, int]]:
    """Kernel size and stride of a 2-D pooling module (stride ``None`` or empty = the kernel size, as in torch)."""
    k = _pair(module.kernel_size)
    stride = module.stride
    return k, k if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)


def _maxpool_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    if bool(getattr(module, "return_indices", False)):
        raise UnsupportedModelError(f"layer '{name}' (MaxPool2d) returns indices")
    k, s = _pool_window(module)
    return [MaxPool2dLayer(name, k, s, _pair(module.padding), _pair(module.dilation), bool(module.ceil_mode))]


def _avgpool_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    k, s = _pool_window(module)
    p, ceil, include = _pair(module.padding), bool(module.ceil_mode), bool(module.count_include_pad)
    div = getattr(module, "divisor_override", None)

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, k, s, p, ceil, include, div)

    return [PoolLinearLayer(name, fn)]


def _adaptive_avgpool_handler(name: str, module: Any, in_shape: tuple[int, ...], previous: list[Layer]) -> list[Layer]:
    size = module.output_size

    def fn(x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, size)

    return [PoolLinearLayer(name, fn)]


_LEAVES = {
    "Linear": _linear_handler,
    "Conv2d": _conv_handler,
    "BatchNorm1d": _batchnorm_handler,
    "BatchNorm2d": _batchnorm_handler,
    "ReLU": _relu_handler,
    "MaxPool2d": _maxpool_handler,
    "AvgPool2d": _avgpool_handler,
    "AdaptiveAvgPool2d": _adaptive_avgpool_handler,
    "Flatten": _flatten_handler,
}


def _graph_ops(module: nn.Module) -> list[str]:
    """Non-call operations a TorchScript module's own forward performs (e.g. ``aten::sub``), else ``[]``."""
    found: list[str] = []
    for sub_name, sub in [("", module), *module.named_modules()]:
        tname = _type_name(sub)
        if tname in _LEAVES or tname in _SKIPPED:
            continue
        graph = getattr(sub, "graph", None)
        if graph is None:
            continue
        try:
            nodes = list(graph.nodes())
        except (RuntimeError, AttributeError):
            continue
        for node in nodes:
            kind = node.kind()
            if not kind.startswith("prim::") and f"{kind}" not in found:
                found.append(f"{kind} in '{sub_name or tname}'")
    return found


def extract_layers(
    model: nn.Module, input_shape: tuple[int, ...] | torch.Size, *, random_state: int = 0, atol: float = 1e-4
) -> list[Layer]:
    """Turn ``model`` into a chain of :class:`Layer` objects that the bound computations understand.

    Parameters
    ----------
    model:
        ``nn.Module`` or TorchScript module mapping ``(B, *input_shape)`` images in ``[0, 1]`` to logits
        ``(B, K)``; a :class:`~robustlens.analysis.ingest.model.NormalizedModel` contributes its
        normalization (and output reordering) as layers.
    input_shape:
        Shape of one input, ``(C, H, W)`` (a leading batch dimension is ignored when 4 values are given).
    random_state:
        Seed of the random probe inputs used to check the chain against the model.
    atol:
        Allowed max abs difference of the logits, relative to ``max(1, max |logit|)``.

    Returns
    -------
    list[Layer]
        Float32 layers on the model's device; ``forward_layers(layers, x)`` equals ``model(x)``.

    Raises
    ------
    UnsupportedModelError
        Naming the first unsupported layer, or the operations the forward does outside its layers.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 4:
        shape = shape[1:]
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise UnsupportedModelError(f"input_shape must be (C, H, W); got {tuple(input_shape)}")
    device = model_device(model, torch.device("cpu"))
    leaves: list[tuple[str, nn.Module]] = []
    _walk(model, "", leaves)
    layers: list[Layer] = []
    current = shape
    with eval_mode(model), torch.no_grad():
        for name, module in leaves:
            for layer in _convert(name, module, current, layers):
                layer = layer.to(device, torch.float32)
                if isinstance(layer, AffineLayer):
                    try:
                        layer.finalize(current)
                    except RuntimeError as exc:
                        raise UnsupportedModelError(
                            f"layer '{name}' ({_type_name(module)}) does not accept the output of the previous "
                            f"layers, shape {current}: {str(exc).splitlines()[0]}; the model's forward probably "
                            "does more than call its layers in order"
                        ) from exc
                else:
                    layer.in_shape = current
                    try:
                        layer.out_shape = tuple(layer.forward(torch.zeros((1, *current), device=device)).shape[1:])
                    except RuntimeError as exc:
                        raise UnsupportedModelError(
                            f"layer '{name}' ({_type_name(module)}) does not accept shape {current}: "
                            f"{str(exc).splitlines()[0]}"
                        ) from exc
                layers.append(layer)
                current = layer.out_shape
            # a folded batch norm changes the previous layer's offset
            if layers and isinstance(layers[-1], AffineLayer):
                layers[-1].finalize(layers[-1].in_shape)
        if len(current) != 1:
            raise UnsupportedModelError(f"the layers of the model end with shape {current}, not logits (K,)")
        gen = torch.Generator().manual_seed(int(random_state))
        probe = torch.rand((4, *shape), generator=gen).to(device)
        expected = model(probe)
        if not isinstance(expected, torch.Tensor) or expected.ndim != 2:
            raise UnsupportedModelError("the model must return logits of shape (B, K)")
        got = forward_layers(layers, probe)
        scale = max(1.0, float(expected.abs().max()))
        diff = float((got - expected.float()).abs().max()) if got.shape == expected.shape else math.inf
    if not diff <= atol * scale:
        ops = _graph_ops(model)
        detail = (
            f"its forward performs operations outside its layers: {', '.join(ops[:6])}"
            if ops
            else "its forward does more than call its layers in registration order (e.g. arithmetic, "
            "residual connections or reordered calls)"
        )
        raise UnsupportedModelError(
            f"the model cannot be verified as a chain of layers: {detail}; the reconstructed chain "
            f"[{', '.join(layer.name for layer in layers)}] differs from the model's logits by {diff:.3g}"
        )
    return layers


def forward_layers(layers: list[Layer], x: torch.Tensor) -> torch.Tensor:
    """Run the chain on ``x`` ``(B, *in_shape)``: logits ``(B, K)``."""
    for layer in layers:
        x = layer.forward(x)
    return x


# ========================================================================================== bounds


def _input_box(x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The coordinate box containing the threat set (the ε-ball ∩ ``[0, 1]``)."""
    return (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def _concretize(a: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Lower bound ``(B, S)`` of ``a · x'`` over the threat set around ``x``; ``a`` is ``(B, S, *in_shape)``."""
    a = a.flatten(2)
    xf = x.flatten(1).unsqueeze(2)
    lo, hi = _input_box(x.flatten(1), eps, norm)
    center, radius = ((lo + hi) / 2).unsqueeze(2), ((hi - lo) / 2).unsqueeze(2)
    box = torch.bmm(a, center).squeeze(2) - torch.bmm(a.abs(), radius).squeeze(2)
    if norm == "linf":
        return box
    ball = torch.bmm(a, xf).squeeze(2) - eps * a.norm(dim=2)
    return torch.maximum(box, ball)


def _l2_first_affine(layers: list[Layer], x: torch.Tensor, eps: float) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """Exact L2-ball bounds of the output of the first non-diagonal affine layer (diagonal ones before it).

    Returns ``(index after that layer, lower, upper)`` or ``None`` if the chain does not start that way.
    """
    ones = torch.ones_like(x)
    h = x
    for i, layer in enumerate(layers):
        if not isinstance(layer, AffineLayer):
            return None
        sq = layer.sq_linear(ones)
        if sq is None:
            return None
        h, ones = layer.forward(h), sq
        if not layer.diagonal:
            radius = eps * ones.clamp_min(0).sqrt()
            return i + 1, h - radius, h + radius
    return None


def _interval_bounds(
    layers: list[Layer], x: torch.Tensor, eps: float, norm: str, upto: int | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """IBP bounds of the input of every layer (entry ``i``) and of the output (entry ``len(layers)``)."""
    upto = len(layers) if upto is None else upto
    lo, hi = _input_box(x, eps, norm)
    bounds = [(lo, hi)]
    exact_l2 = _l2_first_affine(layers, x, eps) if norm == "l2" else None
    for i, layer in enumerate(layers[:upto]):
        lo, hi = layer.ibp(lo, hi)
        if exact_l2 is not None and exact_l2[0] == i + 1:
            lo, hi = torch.maximum(lo, exact_l2[1]), torch.minimum(hi, exact_l2[2])
        bounds.append((lo, hi))
    return bounds


def _relu_relaxation(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CROWN's ReLU relaxation: lower slope, upper slope and upper intercept (shapes of ``lo``)."""
    active = lo >= 0
    unstable = (lo < 0) & (hi > 0)
    denom = torch.where(unstable, hi - lo, torch.ones_like(hi))
    up_slope = torch.where(active, torch.ones_like(lo), torch.where(unstable, hi / denom, torch.zeros_like(lo)))
    up_icpt = torch.where(unstable, -lo * up_slope, torch.zeros_like(lo))
    low_slope = torch.where(active, torch.ones_like(lo), (unstable & (hi > -lo)).to(lo.dtype))
    return low_slope, up_slope, up_icpt


def _backward_lower(
    layers: list[Layer],
    bounds: list[tuple[torch.Tensor, torch.Tensor]],
    end: int,
    a: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    norm: str,
    alphas: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Lower bound ``(B, S)`` of ``a · h_end(x')`` over the threat set, ``h_end`` the output of ``layers[:end]``:
    :func:`_backward_pass` down to the input, concretized over the threat set."""
    coefficients, bias = _backward_pass(layers, bounds, end, a, 0, alphas)
    return _concretize(coefficients, x, eps, norm) + bias


def _backward_pass(
    layers: list[Layer],
    bounds: list[tuple[torch.Tensor, torch.Tensor]],
    end: int,
    a: torch.Tensor,
    start: int,
    alphas: dict[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward linear bound of ``a · h_end`` (``h_end`` the output of ``layers[:end]``) in terms of the input of
    layer ``start``: ``(coefficients, bias)`` with ``a · h_end >= coefficients · h_start + bias``.

    ``a`` is ``(B, S, *layers[end-1].out_shape)``; ``bounds[i]`` bounds the input of layer ``i``.
    ``alphas[i]`` (``(B, S, *shape)``, clamped to ``[0, 1]``) replaces the lower slopes of the unstable
    neurons of ReLU ``i`` (α-CROWN; any slope in ``[0, 1]`` is a valid lower bound of a ReLU).
    """
    batch, spec = a.shape[:2]
    bias = torch.zeros((batch, spec), dtype=a.dtype, device=a.device)
    for i in range(end - 1, start - 1, -1):
        layer = layers[i]
        if isinstance(layer, AffineLayer):
            bias = bias + (a * layer.offset).flatten(2).sum(2)
            a = layer.backward(a.reshape(batch * spec, *layer.out_shape)).reshape(batch, spec, *layer.in_shape)
        elif layer.kind == "relu":
            lo, hi = bounds[i]
            low_slope, up_slope, up_icpt = _relu_relaxation(lo, hi)
            low_slope = low_slope.unsqueeze(1)
            if alphas is not None and i in alphas:
                unstable = ((lo < 0) & (hi > 0)).unsqueeze(1)
                low_slope = torch.where(unstable, alphas[i].clamp(0, 1), low_slope)
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            bias = bias + (neg * up_icpt.unsqueeze(1)).flatten(2).sum(2)
            a = pos * low_slope + neg * up_slope.unsqueeze(1)
        elif isinstance(layer, MaxPool2dLayer):
            lo, hi = bounds[i]
            idx, dominated, umax = layer.relaxation(lo, hi)
            pos, neg = a.clamp_min(0), a.clamp_max(0)
            dom = dominated.unsqueeze(1).to(a.dtype)
            bias = bias + (neg * (1 - dom) * umax.unsqueeze(1)).flatten(2).sum(2)
            coeff = (pos + neg * dom).flatten(3)
            c, h, w = layer.in_shape
            out = torch.zeros((batch, spec, c, h * w), dtype=a.dtype, device=a.device)
            out.scatter_add_(3, idx.unsqueeze(1).expand(-1, spec, -1, -1), coeff)
            a = out.view(batch, spec, c, h, w)
        else:  # pragma: no cover - extract_layers only builds the kinds above
            raise UnsupportedModelError(f"layer '{layer.name}' cannot be bounded")
    return a, bias


def _max_width(layers: list[Layer], end: int) -> int:
    return max([math.prod(layer.in_shape) for layer in layers[:end]] + [math.prod(layers[end - 1].out_shape)])


def _chunked_lower(
    layers: list[Layer],
    bounds: list[tuple[torch.Tensor, torch.Tensor]],
    end: int,
    a: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    norm: str,
) -> torch.Tensor:
    """:func:`_backward_lower` over chunks of the specification dimension (memory cap)."""
    batch, spec = a.shape[:2]
    per = max(1, _MAX_COEFF_FLOATS // max(1, batch * _max_width(layers, end)))
    if spec <= per:
        return _backward_lower(layers, bounds, end, a, x, eps, norm)
    return torch.cat(
        [_backward_lower(layers, bounds, end, a[:, s : s + per], x, eps, norm) for s in range(0, spec, per)], dim=1
    )


def _alpha_crown_lower(
    layers: list[Layer],
    bounds: list[tuple[torch.Tensor, torch.Tensor]],
    c: torch.Tensor,
    x: torch.Tensor,
    eps: float,
    norm: str,
    start_lower: torch.Tensor,
    *,
    steps: int = 20,
    lr: float = 0.1,
) -> torch.Tensor:
    """α-CROWN on the final specification: optimize the lower ReLU slopes (one per neuron and spec row) by Adam.

    Intermediate bounds stay those of CROWN. Every iterate is a sound bound, so the elementwise best over
    the iterations (and ``start_lower``, e.g. CROWN's own) is returned, ``(B, S)``. Rows already positive in
    ``start_lower`` are not optimized further (their samples are verified).
    """
    batch, spec = c.shape[:2]
    best = start_lower.clone()
    todo = ~(best > 0).all(1)
    if steps < 1 or not bool(todo.any()):
        return best
    rows = todo.nonzero().squeeze(1)
    sub_bounds = [(lo[rows], hi[rows]) for lo, hi in bounds]
    sub_c, sub_x = c[rows], x[rows]
    alphas = {}
    for i, layer in enumerate(layers):
        if layer.kind == "relu":
            lo, hi = sub_bounds[i]
            init = _relu_relaxation(lo, hi)[0].unsqueeze(1).expand(-1, spec, *([-1] * lo.ndim)[1:])
            alphas[i] = init.clone().requires_grad_(True)
    if not alphas:
        return best
    # plain Adam written out (torch.optim's first use imports torch._dynamo, seconds on a busy machine)
    params = list(alphas.values())
    m1 = [torch.zeros_like(t) for t in params]
    m2 = [torch.zeros_like(t) for t in params]
    beta1, beta2 = 0.9, 0.999
    sub_best = best[rows]
    with torch.enable_grad():
        for step in range(1, steps + 1):
            low = _backward_lower(layers, sub_bounds, len(layers), sub_c, sub_x, eps, norm, alphas=alphas)
            sub_best = torch.maximum(sub_best, low.detach())
            grads = torch.autograd.grad(low.sum(), params)
            with torch.no_grad():
                for t, g, a1, a2 in zip(params, grads, m1, m2, strict=True):
                    a1.mul_(beta1).add_(g, alpha=1 - beta1)
                    a2.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                    denom = (a2 / (1 - beta2**step)).sqrt_().add_(1e-8)
                    t.addcdiv_(a1, denom, value=lr / (1 - beta1**step))  # ascent on the bound
                    t.clamp_(0, 1)
        with torch.no_grad():
            low = _backward_lower(layers, sub_bounds, len(layers), sub_c, sub_x, eps, norm, alphas=alphas)
    best[rows] = torch.maximum(sub_best, low)
    return best


def _exact_by_ibp(layers: list[Layer], end: int) -> bool:
    """True if IBP is exact for the output of ``layers[:end]`` (one non-diagonal affine layer at most)."""
    if any(not isinstance(layer, AffineLayer) for layer in layers[:end]):
        return False
    return sum(not layer.diagonal for layer in layers[:end]) <= 1


def _crown_refine(
    layers: list[Layer],
    bounds: list[tuple[torch.Tensor, torch.Tensor]],
    end: int,
    x: torch.Tensor,
    eps: float,
    norm: str,
    budget: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tighten ``bounds[end]`` (input of a ReLU) with backward CROWN on the neurons IBP leaves unstable.

    With ``budget`` (coefficient floats per sample), a layer whose refinement would move more than that
    keeps its interval bounds (CROWN-IBP for that layer: sound, looser, much cheaper on wide conv layers).
    """
    lo, hi = bounds[end]
    batch = lo.shape[0]
    flat_lo, flat_hi = lo.flatten(1), hi.flatten(1)
    unstable = (flat_lo < 0) & (flat_hi > 0)
    counts = unstable.sum(1)
    s = int(counts.max()) if batch else 0
    if s == 0:
        return lo, hi
    if budget is not None:
        volume = 2 * float(counts.double().mean()) * sum(math.prod(layer.in_shape) for layer in layers[:end])
        if volume > budget:
            return lo, hi
    order = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :s]  # unstable first
    valid = torch.arange(s, device=lo.device).unsqueeze(0) < counts.unsqueeze(1)
    n = flat_lo.shape[1]
    shape = layers[end - 1].out_shape
    per = max(1, _MAX_COEFF_FLOATS // max(1, 2 * batch * _max_width(layers, end)))
    new_lo, new_hi = flat_lo.clone(), flat_hi.clone()
    for c0 in range(0, s, per):
        idx = order[:, c0 : c0 + per]
        k = idx.shape[1]
        a = torch.zeros((batch, k, n), dtype=lo.dtype, device=lo.device)
        a.scatter_(2, idx.unsqueeze(2), valid[:, c0 : c0 + per].unsqueeze(2).to(lo.dtype))
        a = torch.cat([a, -a], dim=1).view(batch, 2 * k, *shape)
        res = _backward_lower(layers, bounds, end, a, x, eps, norm)
        low, up = res[:, :k], -res[:, k:]
        ok = valid[:, c0 : c0 + per]
        cur_lo, cur_hi = new_lo.gather(1, idx), new_hi.gather(1, idx)
        new_lo.scatter_(1, idx, torch.where(ok, torch.maximum(cur_lo, low), cur_lo))
        new_hi.scatter_(1, idx, torch.where(ok, torch.minimum(cur_hi, up), cur_hi))
    return new_lo.view_as(lo), new_hi.view_as(hi)


def _crown_intermediate(
    layers: list[Layer], x: torch.Tensor, eps: float, norm: str, budget: float | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Bounds of every layer's input: IBP, tightened by CROWN at every ReLU input."""
    lo, hi = _input_box(x, eps, norm)
    bounds = [(lo, hi)]
    exact_l2 = _l2_first_affine(layers, x, eps) if norm == "l2" else None
    for i, layer in enumerate(layers):
        if layer.kind == "relu" and i > 0 and not _exact_by_ibp(layers, i):
            bounds[i] = _crown_refine(layers, bounds, i, x, eps, norm, budget)
        lo, hi = layer.ibp(*bounds[i])
        if exact_l2 is not None and exact_l2[0] == i + 1:
            lo, hi = torch.maximum(lo, exact_l2[1]), torch.minimum(hi, exact_l2[2])
        bounds.append((lo, hi))
    return bounds


def _as_input(layers: list[Layer], x: torch.Tensor, eps: float, norm: str) -> tuple[torch.Tensor, float, str]:
    if not layers:
        raise UnsupportedModelError("the layer list is empty")
    norm = check_norm(norm)
    eps = check_positive(eps, "eps", allow_zero=True)
    if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != tuple(layers[0].in_shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValidationError(f"x must be a tensor of shape (B, {', '.join(map(str, layers[0].in_shape))}); got {got}")
    return x, eps, norm


def _cast(layers: list[Layer], x: torch.Tensor) -> list[Layer]:
    probe = next(
        (
            v
            for layer in layers
            for v in layer.__dict__.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
        ),
        None,
    )
    if probe is not None and probe.dtype == x.dtype and probe.device == x.device:
        return layers
    return [layer.to(x.device, x.dtype) for layer in layers]


@torch.no_grad()
def ibp_bounds(
    layers: list[Layer], x: torch.Tensor, eps: float, *, norm: str = "linf"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval bound propagation: lower and upper bounds ``(B, K)`` of the logits over the threat set.

    Parameters
    ----------
    layers:
        From :func:`extract_layers`.
    x:
        ``(B, *in_shape)`` clean inputs in ``[0, 1]``; the bounds are computed in ``x.dtype``.
    eps:
        Radius ``>= 0`` of the ``norm`` ball (pixel units); the ball is intersected with ``[0, 1]``.
    norm:
        ``"linf"`` or ``"l2"``.
    """
    x, eps, norm = _as_input(layers, x, eps, norm)
    layers = _cast(layers, x)
    return _interval_bounds(layers, x, eps, norm)[-1]


def margin_specification(labels: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``C`` ``(B, K, K)`` with row ``j`` = ``e_y - e_j``: ``C @ logits`` is the margin vector (row ``y`` is 0)."""
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    return eye[labels].unsqueeze(1) - eye.unsqueeze(0)


def _spec(c: torch.Tensor | None, batch: int, k: int, like: torch.Tensor) -> torch.Tensor:
    if c is None:
        return torch.eye(k, dtype=like.dtype, device=like.device).expand(batch, k, k)
    c = torch.as_tensor(c).to(device=like.device, dtype=like.dtype)
    if c.ndim == 2:
        c = c.expand(batch, *c.shape)
    if c.ndim != 3 or c.shape[0] != batch or c.shape[2] != k:
        raise ValidationError(f"C must have shape (S, {k}) or ({batch}, S, {k}); got {tuple(c.shape)}")
    return c


@torch.no_grad()
def crown_bounds(
    layers: list[Layer],
    x: torch.Tensor,
    eps: float,
    *,
    norm: str = "linf",
    C: torch.Tensor | None = None,  # noqa: N803 - the matrix C of CROWN
) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN: lower and upper bounds ``(B, S)`` of ``C @ logits`` over the threat set.

    Parameters
    ----------
    layers, x, eps, norm:
        As :func:`ibp_bounds`.
    C:
        Specification ``(S, K)`` or ``(B, S, K)`` (default: identity, i.e. bounds of the logits).
        For verification use :func:`margin_specification` (``e_y - e_j``), which is much tighter than
        subtracting bounds of separate logits.
    """
    x, eps, norm = _as_input(layers, x, eps, norm)
    layers = _cast(layers, x)
    bounds = _crown_intermediate(layers, x, eps, norm)
    k = layers[-1].out_shape[0]
    c = _spec(C, x.shape[0], k, x)
    s = c.shape[1]
    res = _chunked_lower(layers, bounds, len(layers), torch.cat([c, -c], dim=1), x, eps, norm)
    return res[:, :s], -res[:, s:]


def _ibp_spec_lower(layers: list[Layer], x: torch.Tensor, eps: float, norm: str, c: torch.Tensor) -> torch.Tensor:
    """IBP lower bound ``(B, S)`` of ``c @ logits``, the trailing affine layers composed with ``c``."""
    bounds = _interval_bounds(layers, x, eps, norm)
    start = len(layers)
    while start > 0 and isinstance(layers[start - 1], AffineLayer):
        start -= 1
    if start == 0:  # a purely affine model: exact backward bound
        return _backward_lower(layers, bounds, len(layers), c, x, eps, norm)
    a, bias = _backward_pass(layers, bounds, len(layers), c, start)
    lo, hi = bounds[start]
    center, radius = ((lo + hi) / 2).flatten(1).unsqueeze(2), ((hi - lo) / 2).flatten(1).unsqueeze(2)
    a = a.flatten(2)
    return torch.bmm(a, center).squeeze(2) - torch.bmm(a.abs(), radius).squeeze(2) + bias


def _to_layers(model_or_layers: nn.Module | list[Layer], images: torch.Tensor) -> list[Layer]:
    if isinstance(model_or_layers, list):
        if not all(isinstance(layer, Layer) for layer in model_or_layers):
            raise ValidationError("model_or_layers must be an nn.Module or a list of Layer from extract_layers")
        return model_or_layers
    return extract_layers(model_or_layers, tuple(images.shape[1:]))


def _check_method(method: object, allowed: tuple[str, ...]) -> str:
    if method not in allowed:
        raise ValidationError(f"method must be one of {', '.join(repr(m) for m in allowed)}; got {method!r}")
    return str(method)


@torch.no_grad()
def margin_lower_bounds(
    model_or_layers: nn.Module | list[Layer],
    images: torch.Tensor,
    labels: Any,
    eps: float,
    *,
    method: str = "crown",
    norm: str = "linf",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    alpha_steps: int = 20,
    refine_budget: float | None = None,
) -> np.ndarray:
    """Certified lower bounds of the margins ``logit_y(x') - logit_j(x')`` over the threat set.

    Parameters
    ----------
    model_or_layers:
        A supported model (see :func:`extract_layers`) or its layer list.
    images:
        ``(B, C, H, W)`` clean images in ``[0, 1]``.
    labels:
        ``(B,)`` classes ``y`` whose margins are bounded.
    eps:
        Radius ``>= 0`` (pixel units).
    method:
        ``"crown"`` (backward linear bounds; never looser than IBP: the two are intersected), ``"ibp"``, or
        ``"alpha-crown"`` (CROWN whose final lower ReLU slopes are optimized; never looser than CROWN).
    norm:
        ``"linf"`` or ``"l2"``.
    batch_size:
        Images per batch.
    dtype:
        Arithmetic dtype (default: that of ``images``).
    alpha_steps:
        Adam steps of ``"alpha-crown"``.
    refine_budget:
        Cost cap of the CROWN pre-activation bounds: a ReLU layer whose refinement would propagate more
        than this many coefficient floats per sample (2 × unstable neurons × widths of the layers below)
        keeps its interval bounds. ``None``: every layer is refined (full CROWN; slow on wide conv nets).

    Returns
    -------
    numpy.ndarray
        ``(B, K)`` float64; entry ``(b, j)`` is ``<= min over the threat set of logit_y - logit_j``;
        ``inf`` for ``j == y``. Sample ``b`` is verified iff the row minimum is ``> 0``.
    """
    method = _check_method(method, METHODS)
    images = check_images(images)
    eps = check_positive(eps, "eps", allow_zero=True)
    norm = check_norm(norm)
    batch_size = check_int(batch_size, "batch_size")
    layers = _to_layers(model_or_layers, images)
    k = layers[-1].out_shape[0]
    device = layers[0].offset.device if isinstance(layers[0], AffineLayer) else images.device
    y = check_labels(labels, images.shape[0], device, num_classes=k)
    dtype = dtype or images.dtype
    x_all = images.to(device=device, dtype=dtype)
    layers = _cast(layers, x_all)
    out = []
    for s in range(0, x_all.shape[0], batch_size):
        x, yb = x_all[s : s + batch_size], y[s : s + batch_size]
        c = margin_specification(yb, k, dtype)
        low = _ibp_spec_lower(layers, x, eps, norm, c)
        if method in ("crown", "alpha-crown"):
            bounds = _crown_intermediate(layers, x, eps, norm, refine_budget)
            low = torch.maximum(low, _chunked_lower(layers, bounds, len(layers), c, x, eps, norm))
            if method == "alpha-crown":
                low = _alpha_crown_lower(layers, bounds, c, x, eps, norm, low, steps=alpha_steps)
        low = low.double()
        low[torch.arange(x.shape[0], device=device), yb] = math.inf
        out.append(low.cpu().numpy())
    return np.concatenate(out, axis=0)


# ====================================================================================== verification


@dataclass
class VerificationResult:
    """Per-sample verified robustness at every ε.

    Attributes
    ----------
    eps:
        ``(E,)`` radii, in the order given.
    verified:
        Method -> ``(E, B)`` bool: sample certified (correct and margin lower bound ``> 0``) at ``eps[e]``.
    clean_correct:
        ``(B,)`` bool: the model classifies the clean image correctly.
    verified_accuracy:
        Method -> ``(E,)`` fraction of the ``B`` samples verified.
    seconds:
        Method -> wall seconds spent on that method over all ε.
    margin_lower:
        Method -> ``(E, B)`` certified lower bound of ``min_j≠y logit_y - logit_j``; ``NaN`` where not
        computed (misclassified samples, and samples not certified at a smaller ε are not tried again: a
        larger threat set only loosens the bounds), and a weaker method's bound where that one already
        certified the sample.
    norm:
        ``"linf"`` or ``"l2"``.
    """

    eps: np.ndarray
    verified: dict[str, np.ndarray]
    clean_correct: np.ndarray
    verified_accuracy: dict[str, np.ndarray]
    seconds: dict[str, float]
    margin_lower: dict[str, np.ndarray] = field(default_factory=dict)
    norm: str = "linf"

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (method, ε) with ``method, norm, eps, verified_accuracy, n_verified, n,
        clean_accuracy, seconds`` (seconds: the method's time for that ε)."""
        import pandas as pd

        rows = []
        n = int(self.clean_correct.shape[0])
        for method, ver in self.verified.items():
            per_eps = self.seconds_per_eps.get(method, np.full(len(self.eps), np.nan))
            for e, eps in enumerate(self.eps):
                rows.append(
                    {
                        "method": method,
                        "norm": self.norm,
                        "eps": float(eps),
                        "verified_accuracy": float(self.verified_accuracy[method][e]),
                        "n_verified": int(ver[e].sum()),
                        "n": n,
                        "clean_accuracy": float(self.clean_correct.mean()) if n else float("nan"),
                        "seconds": float(per_eps[e]),
                    }
                )
        return pd.DataFrame(
            rows, columns=["method", "norm", "eps", "verified_accuracy", "n_verified", "n", "clean_accuracy", "seconds"]
        )

    seconds_per_eps: dict[str, np.ndarray] = field(default_factory=dict)


def verify(
    model: nn.Module,
    images: torch.Tensor,
    labels: Any,
    eps_grid: Any,
    *,
    method: str = "crown",
    norm: str = "linf",
    batch_size: int = 64,
    dtype: torch.dtype | None = None,
    refine_budget: float | None = DEFAULT_REFINE_BUDGET,
) -> VerificationResult:
    """Verified robustness of every sample at every ε of ``eps_grid`` (IBP and/or CROWN).

    Parameters
    ----------
    model:
        A supported ReLU network (see :func:`extract_layers`), ``[0, 1]`` images -> logits.
    images:
        ``(B, C, H, W)`` clean images in ``[0, 1]``.
    labels:
        ``(B,)`` true classes.
    eps_grid:
        Radii ``>= 0`` (pixel units).
    method:
        ``"crown"``, ``"ibp"``, ``"alpha-crown"``, ``"both"`` (IBP and CROWN) or ``"all"`` (the three).
    norm:
        ``"linf"`` or ``"l2"``.
    batch_size:
        Images per bound computation.
    dtype:
        Arithmetic dtype (default float32).
    refine_budget:
        See :func:`margin_lower_bounds`. On the sample CNN (two busy CPU cores, ε ≤ 0.5/255) the default
        costs ~1-2 s per image and ε and refines the second conv layer but not the third; ``0`` (interval
        pre-activation bounds, CROWN on the margins) is ~20x faster and looser; ``None`` is full CROWN
        (tightest, ~4x slower than the default).

    Samples are tried from the smallest ε up; one not certified at a radius is not tried at larger ones
    (reported not verified there), and a sample certified by a weaker method at a radius is not recomputed
    by a stronger one.

    Raises
    ------
    UnsupportedModelError
        If the model has a layer the verifier cannot bound (named in the message).
    """
    method = _check_method(method, ("crown", "ibp", "alpha-crown", "both", "all"))
    methods = {"both": ["ibp", "crown"], "all": list(METHODS)}.get(method, [method])
    images = check_images(images)
    norm = check_norm(norm)
    eps_arr = np.asarray(
        [check_positive(e, "eps", allow_zero=True) for e in np.atleast_1d(np.asarray(eps_grid, dtype=object))],
        dtype=np.float64,
    )
    if eps_arr.size == 0:
        raise ValidationError("eps_grid must hold at least one radius")
    dtype = dtype or torch.float32
    layers = extract_layers(model, tuple(images.shape[1:]))
    device = model_device(model, images.device)
    k = layers[-1].out_shape[0]
    y = check_labels(labels, images.shape[0], device, num_classes=k)
    with eval_mode(model), torch.no_grad():
        clean = torch.cat(
            [model(images[s : s + batch_size].to(device)).argmax(1) for s in range(0, images.shape[0], batch_size)]
        )
    correct = (clean == y).cpu().numpy()
    verified: dict[str, Any] = {}
    accuracy: dict[str, Any] = {}
    seconds: dict[str, Any] = {}
    per_eps: dict[str, Any] = {}
    margins: dict[str, Any] = {}
    x_all = images.to(dtype)
    order = np.argsort(eps_arr, kind="stable")
    for m in methods:
        ver = np.zeros((eps_arr.size, images.shape[0]), dtype=bool)
        mar = np.full((eps_arr.size, images.shape[0]), np.nan)
        times = np.zeros(eps_arr.size)
        candidates = correct.copy()
        for e in order:
            eps = float(eps_arr[e])
            t0 = time.perf_counter()
            # verified by a weaker method (computed before this one) at this ε: verified here too
            known = np.zeros_like(correct)
            for weaker in verified:
                known |= verified[weaker][e]
                mar[e, verified[weaker][e]] = margins[weaker][e, verified[weaker][e]]
            todo = np.nonzero(candidates & ~known)[0]
            if todo.size:
                sel = torch.from_numpy(todo).to(x_all.device)
                low = margin_lower_bounds(
                    layers,
                    x_all.index_select(0, sel),
                    y.index_select(0, sel.to(y.device)),
                    float(eps),
                    method=m,
                    norm=norm,
                    batch_size=batch_size,
                    refine_budget=refine_budget,
                )
                mar[e, todo] = low.min(axis=1)
            ver[e] = candidates & (known | (np.nan_to_num(mar[e], nan=-np.inf) > 0))
            candidates = ver[e].copy()  # a sample not certified at ε is not tried at larger radii
            times[e] = time.perf_counter() - t0
        verified[m], margins[m], per_eps[m] = ver, mar, times
        accuracy[m] = ver.mean(axis=1) if images.shape[0] else np.zeros(eps_arr.size)
        seconds[m] = float(times.sum())
    return VerificationResult(
        eps=eps_arr,
        verified=verified,
        clean_correct=correct,
        verified_accuracy=accuracy,
        seconds=seconds,
        margin_lower=margins,
        norm=norm,
        seconds_per_eps=per_eps,
    )
