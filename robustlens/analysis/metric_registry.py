"""The one registry of per-image metrics: built-in and user-defined metrics register the same way.

A metric is a function decorated with :func:`register_metric`. Importing the module that holds it is
all it takes for the ``metrics`` stage to compute it (pass the module name in the stage's
``Config(plugins=(...))``); the engine needs no change. The built-ins in
:mod:`robustlens.analysis.builtin_metrics` use this same decorator.

Two kinds of metric, told apart by ``source``:

``"pixels"`` (the default)
    ``f(images: torch.Tensor) -> torch.Tensor``. ``images`` is a batch ``(B, C, H, W)`` of float32
    values in ``[0, 1]``, ``C`` = 1 (grayscale) or 3 (RGB), every image the same size, on the stage's
    device. It returns ``(B,)``, one value per image, computed with batched tensor operations (no Python
    loop over images). Results are cached by image content hash.
``"record"``
    ``f(samples: pandas.DataFrame) -> numpy.ndarray``. ``samples`` is the workspace's sample table
    (``width``, ``height``, ``file_size``, ``channels``, ``meta.*`` ...); it returns ``(N,)``, one value per
    row. Record metrics read no pixels, are cheap, and are recomputed on every run.

Example (a module of your own, e.g. ``my_metrics.py``)::

    import torch
    from robustlens.analysis.metric_registry import register_metric

    @register_metric("red_dominance", description="mean of R minus the mean of G and B",
                     higher_is="redder")
    def red_dominance(images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            return images.new_zeros(images.shape[0])
        return (images[:, 0] - images[:, 1:].mean(dim=1)).mean(dim=(1, 2))

then ``analyze(ws, configs={"metrics": metrics.Config(plugins=("my_metrics",))})``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from robustlens.errors import RobustlensError

SOURCES = ("pixels", "record")
#: Column names the metrics stage writes itself; a metric may not take them.
RESERVED_NAMES = frozenset({"id", "content_hash", "pixel_hash", "phash"})


class MetricRegistryError(RobustlensError, ValueError):
    """A metric registered twice, a bad metric definition, or an unknown metric name."""


@dataclass(frozen=True)
class Metric:
    """One registered metric.

    Attributes
    ----------
    name:
        Column name in ``artifacts/metrics.parquet``.
    function:
        The computation (see the module docstring for its signature per ``source``).
    description:
        One line saying what is measured, in which units.
    higher_is:
        What a higher value means (``"brighter"``, ``"blurrier"``), shown next to the metric.
    source:
        ``"pixels"`` or ``"record"``.
    version:
        Part of the cache key: change it when the computation changes so cached values are recomputed.
    """

    name: str
    function: Callable
    description: str
    higher_is: str
    source: str
    version: str

    @property
    def module(self) -> str:
        """Name of the module that defines the metric's function."""
        return self.function.__module__

    @property
    def origin(self) -> str:
        """``module.qualname`` of the function (where the metric is defined)."""
        return f"{self.function.__module__}.{self.function.__qualname__}"


_REGISTRY: dict[str, Metric] = {}


def register_metric(
    name: str,
    *,
    description: str,
    higher_is: str = "",
    source: str = "pixels",
    version: str = "1",
    replace: bool = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``function`` as metric ``name``; returns the function unchanged.

    Parameters
    ----------
    name:
        Unique metric name (a valid column name; not one of :data:`RESERVED_NAMES`).
    description:
        What the metric measures and its unit / range.
    higher_is:
        What a higher value means, e.g. ``"brighter"``.
    source:
        ``"pixels"`` (batched tensor function) or ``"record"`` (function of the sample table).
    version:
        Bump when the computation changes, so values cached under the old definition are not reused.
    replace:
        Allow replacing a metric of the same name defined elsewhere. Without it a second definition of
        a name raises :class:`MetricRegistryError` (re-importing the module that defines it, e.g. on
        ``importlib.reload``, is not a second definition).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise MetricRegistryError(f"metric name must be an identifier-like string, got {name!r}")
    if name in RESERVED_NAMES:
        raise MetricRegistryError(f"metric name {name!r} is reserved (reserved: {sorted(RESERVED_NAMES)})")
    if source not in SOURCES:
        raise MetricRegistryError(f"metric {name!r}: source must be one of {SOURCES}, got {source!r}")

    def decorator(function: Callable) -> Callable:
        if not callable(function):
            raise MetricRegistryError(f"metric {name!r}: expected a function, got {type(function).__name__}")
        metric = Metric(
            name=name,
            function=function,
            description=description,
            higher_is=higher_is,
            source=source,
            version=str(version),
        )
        existing = _REGISTRY.get(name)
        if existing is not None and existing.origin != metric.origin and not replace:
            raise MetricRegistryError(
                f"metric {name!r} is already registered by {existing.origin}; {metric.origin} cannot register "
                "it again (choose another name, or pass replace=True to override it)"
            )
        _REGISTRY[name] = metric
        return function

    return decorator


def unregister_metric(name: str) -> None:
    """Remove metric ``name`` (for tests and interactive sessions); unknown names are ignored."""
    _REGISTRY.pop(name, None)


BUILTIN_MODULE = "robustlens.analysis.builtin_metrics"


def _ensure_builtins() -> None:
    importlib.import_module(BUILTIN_MODULE)


def available_metrics(source: str | None = None, *, modules: tuple[str, ...] | list[str] | None = None) -> list[str]:
    """Names of the registered metrics (built-ins first, then in registration order).

    Parameters
    ----------
    source:
        Only metrics of this kind (``"pixels"`` or ``"record"``); default all.
    modules:
        Only metrics defined in these modules (or their submodules); default all.
    """
    _ensure_builtins()
    if source is not None and source not in SOURCES:
        raise MetricRegistryError(f"source must be one of {SOURCES}, got {source!r}")

    def wanted(metric: Metric) -> bool:
        return modules is None or any(metric.module == m or metric.module.startswith(m + ".") for m in modules)

    chosen = [metric for metric in _REGISTRY.values() if (source is None or metric.source == source) and wanted(metric)]
    builtin = [metric.name for metric in chosen if metric.module == BUILTIN_MODULE]
    return builtin + [metric.name for metric in chosen if metric.module != BUILTIN_MODULE]


def get_metric(name: str) -> Metric:
    """The registered metric ``name``; :class:`MetricRegistryError` naming the known ones otherwise."""
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MetricRegistryError(
            f"unknown metric {name!r}; registered metrics: {list(_REGISTRY)} "
            "(a custom metric's module must be imported first, e.g. through "
            "the metrics stage's Config(plugins=...))"
        ) from None


def import_plugins(modules: tuple[str, ...] | list[str]) -> None:
    """Import each module name in ``modules`` so the metrics it defines register themselves."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MetricRegistryError(f"cannot import metric plugin module {module!r}: {exc}") from exc
