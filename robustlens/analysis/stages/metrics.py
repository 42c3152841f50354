"""Stage ``metrics``: per-image quality metrics and image fingerprints.

Reads ``samples.parquet`` and the images; writes

``artifacts/metrics.parquet``
    ``id`` plus one column per metric (every registered metric by default, see
    :mod:`robustlens.analysis.metric_registry`), rows in ``samples.parquet`` order. Pixel metrics are
    float64; integer record metrics (``width``, ``height``, ``area``, ``file_size``, ``channels``) int64.
``artifacts/fingerprints.parquet``
    ``id``, ``pixel_hash`` (sha1 hex of ``"HxWxC:"`` followed by the decoded pixels rounded to uint8,
    row-major ``(H, W, C)``: equal for files that decode to identical pixels whatever their format) and
    ``phash`` (uint64 DCT perceptual hash, below).

``phash``: luminance resized to 32×32 (bilinear, antialiased), its 2-D orthonormal DCT-II computed as
``D X Dᵀ`` with the 32×32 DCT matrix ``D`` (resize and DCT folded into two small matrices, in float64);
the top-left 8×8 coefficients are compared with the median of their 63 non-DC values, giving 64 bits
packed row-major, most significant bit first (the DC bit is normally 1). Near-duplicates differ in few
bits (Hamming distance).

Work is cached per image content hash (``samples.content_hash``) with
:class:`~robustlens.analysis.stages.base.HashCache`: after every decoded batch one chunk with the batch's
results is written atomically, so a run killed at any point (SIGKILL included) resumes with what was
done, and a re-run after adding images computes only content hashes not seen before. Files with the same
content hash are decoded once. The cache key is the set of pixel metrics and their versions (not the
batch size, which does not change results). Record metrics are recomputed from the sample table on every
run.

Per-sample part and reduction: :func:`map_batch` is the per-sample part, a pure function of a batch of decoded
images and the config (the pixel metrics, ``pixel_hash`` and ``phash`` of each image). There is no
whole-dataset reduction: the run only gathers the cached rows into samples order and adds the record metrics
(read from ``samples.parquet``). The artifacts are always rewritten (cheap); the cache makes a re-run decode
nothing.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from robustlens.analysis.builtin_metrics import luminance
from robustlens.analysis.loader import auto_batch_size, compute_threads, decode_workers, stacks_by_shape, torch_threads
from robustlens.analysis.metric_registry import (
    BUILTIN_MODULE,
    Metric,
    MetricRegistryError,
    available_metrics,
    get_metric,
    import_plugins,
)
from robustlens.analysis.stages.base import (
    StageContext,
    StageResult,
    StageSpec,
    cache_for,
    check_number,
    decode_distinct,
    fingerprint,
    record_refused,
    refused_rows,
    write_artifact,
)

STAGE = "metrics"

#: Bump when pixel_hash / phash computation changes (part of the cache key).
FINGERPRINT_VERSION = "2"
PHASH_SIZE = 32
PHASH_BLOCK = 8
#: Largest number of float32 values stacked into one tensor (bounds memory for large images).
MAX_STACK_ELEMENTS = 1 << 19


@dataclass
class Config:
    """Parameters of the ``metrics`` stage.

    Attributes
    ----------
    batch_size:
        Images decoded per batch; one cache chunk is written after each batch. ``None`` (default): chosen
        from the images' size (:func:`~robustlens.analysis.loader.auto_batch_size`).
    metrics:
        Names of the metrics to compute. ``None`` (default): the built-ins plus every metric defined in
        the ``plugins`` modules. What is computed depends on the config alone, never on which other
        modules happen to be imported in the process.
    plugins:
        Module names imported before running, so the metrics they define are registered (a package's
        submodules count as the package). A metric registered interactively can be named in
        ``metrics`` directly, or its module given here (``"__main__"`` in a script or notebook).
    """

    batch_size: int | None = None
    metrics: tuple[str, ...] | None = None
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The metric names and plugin modules are checked by selected_metrics (it imports the plugins).
        check_number(STAGE, self, "batch_size", low=1, integer=True, optional=True)


def selected_metrics(config: Config) -> list[Metric]:
    """The metrics ``config`` asks for (plugins imported first), in registry order."""
    for field_name in ("metrics", "plugins"):
        value = getattr(config, field_name)
        if isinstance(value, str):
            raise MetricRegistryError(
                f"Config.{field_name} must be a sequence of names, got the string {value!r} (write ({value!r},))"
            )
    import_plugins(tuple(config.plugins))
    if config.metrics is None:
        names = available_metrics(modules=(BUILTIN_MODULE, *config.plugins))
    else:
        names = list(dict.fromkeys(config.metrics))
    if not names:
        raise MetricRegistryError("Config.metrics is empty; leave it None to compute every metric")
    return [get_metric(name) for name in names]


def run(context: StageContext, config: Config) -> StageResult:
    """Compute metrics and fingerprints for every sample (only uncached content hashes are decoded).

    Returns
    -------
    StageResult
        Summary: ``computed`` (distinct images decoded and measured this run), ``cached`` (distinct images
        whose results came from the cache), ``samples``, ``seconds``, ``metrics`` (the metric columns),
        ``samples_skipped`` and ``refused``. Never "current": the artifacts are always rewritten.
    """
    return SPEC.result(_run(context, config), current=False)


def map_batch(pixels: list[np.ndarray], config: Config, *, device: str | torch.device = "cpu") -> pd.DataFrame:
    """The per-sample part of the stage: the pixel metrics of ``config`` and the fingerprints of each image.

    ``pixels``: decoded images, ``(H, W, C)`` float32 in ``[0, 1]``. Returns one row per image: a float64
    column per pixel metric, ``pixel_hash`` and ``phash`` (see the module docstring). Depends on nothing but its
    arguments (plugins named in ``config`` are imported), so a batch can be computed anywhere.
    """
    metrics = [metric for metric in selected_metrics(config) if metric.source == "pixels"]
    return measure_batch(pixels, metrics, torch.device(device))


def _run(context: StageContext, config: Config) -> dict:
    start = time.perf_counter()
    metrics = selected_metrics(config)
    pixel_metrics = [m for m in metrics if m.source == "pixels"]
    workspace = context.workspace
    samples = workspace.samples
    hashes = samples["content_hash"].to_numpy()

    cache_key = {"pixel_metrics": {m.name: m.version for m in pixel_metrics}, "fingerprints": FINGERPRINT_VERSION}
    cache = cache_for(context, "metrics", cache_key)
    known = set(cache.hashes())
    _, first_rows = np.unique(hashes, return_index=True)
    todo = np.sort(first_rows[~pd.Series(hashes[first_rows]).isin(known).to_numpy()])

    device = torch.device(context.device)
    paths = samples["path"].tolist()
    decoded = 0
    with torch_threads(compute_threads()):
        batch_size = config.batch_size or auto_batch_size(samples)
        workers = context.workers or decode_workers(samples)
        for indices, pixels in decode_distinct(context, todo, batch_size=batch_size, workers=workers, desc="Metrics"):
            frame = measure_batch(pixels, pixel_metrics, device)
            frame.insert(0, "content_hash", hashes[indices])
            cache.add(frame)
            decoded += len(indices)

    cached = cache.load().set_index("content_hash")
    for column in [m.name for m in pixel_metrics] + ["pixel_hash"]:  # an empty cache (every file refused)
        if column not in cached.columns:
            cached[column] = pd.Series(np.nan, index=cached.index, dtype=object if column == "pixel_hash" else float)
    if "phash" not in cached.columns:
        cached["phash"] = pd.Series(0, index=cached.index, dtype=np.uint64)
    results = cached.reindex(hashes)
    # A sample whose file was refused (outside the dataset root, or changed since init) has no results: its
    # pixel metrics are NaN and its fingerprints empty; artifacts/refused_files.json says which and why.
    refused = refused_rows(context)
    missing = results["pixel_hash"].isna().to_numpy()
    unexplained = missing & ~refused & ~pd.Series(hashes).isin(set(hashes[refused])).to_numpy()
    if unexplained.any():
        raise RuntimeError(
            f"metrics cache lacks {int(unexplained.sum())} images after computing them "
            f"(first: {paths[int(np.flatnonzero(unexplained)[0])]})"
        )
    skipped = missing | refused
    table = pd.DataFrame({"id": samples["id"].to_numpy()})
    for metric in metrics:
        if metric.source == "pixels":
            table[metric.name] = np.where(skipped, np.nan, results[metric.name].to_numpy(dtype=np.float64))
        else:
            table[metric.name] = _record_values(metric, samples)
    pixel_hash = results["pixel_hash"].to_numpy(dtype=object, copy=True)
    pixel_hash[skipped] = None
    phash = np.zeros(len(samples), dtype=np.uint64)
    # Taken from the cache's uint64 column by position (a reindexed column with gaps would be float64 and lose
    # the low bits of the hash).
    positions = cached.index.get_indexer(hashes[~skipped])
    phash[~skipped] = cached["phash"].to_numpy()[positions].astype(np.uint64)
    # Samples without an image have no pixel_hash (null) and phash 0: the duplicates stage leaves them out.
    fingerprints = pd.DataFrame({"id": samples["id"].to_numpy(), "pixel_hash": pixel_hash, "phash": phash})

    inputs = fingerprint(samples[["id", "content_hash", "width", "height", "file_size", "channels"]])
    refused_entries = record_refused(context, "metrics", skipped)
    extra = {"metrics": [m.name for m in metrics], "skipped_rows": np.flatnonzero(skipped).tolist()}
    write_artifact(context, "metrics", table, stage=STAGE, config=config, inputs=inputs, extra=extra)
    write_artifact(
        context,
        "fingerprints",
        fingerprints,
        stage=STAGE,
        config=config,
        inputs=inputs,
        extra={"skipped_rows": extra["skipped_rows"]},
    )
    cache.compact(keep_hashes=set(hashes.tolist()))
    computed = int(decoded)
    summary = {
        "computed": computed,
        "cached": int(len(first_rows)) - int(len(todo)),
        "samples": int(len(samples)),
        "seconds": round(time.perf_counter() - start, 3),
        "metrics": [m.name for m in metrics],
        "samples_skipped": int(skipped.sum()),
        "refused": refused_entries,
    }
    skipped_note = f", {summary['samples_skipped']} skipped (file refused)" if summary["samples_skipped"] else ""
    context.log.append(f"metrics: computed {computed} images, {summary['cached']} from cache{skipped_note}")
    return summary


def _record_values(metric: Metric, samples: pd.DataFrame) -> np.ndarray:
    values = np.asarray(metric.function(samples))
    if values.shape != (len(samples),):
        raise MetricRegistryError(
            f"record metric {metric.name!r} ({metric.origin}) returned shape {values.shape}; expected ({len(samples)},)"
        )
    return values if np.issubdtype(values.dtype, np.integer) else values.astype(np.float64)


def measure_batch(pixels: list[np.ndarray], metrics: list[Metric], device: torch.device) -> pd.DataFrame:
    """Metrics and fingerprints of decoded images (``(H, W, C)`` float32 in ``[0, 1]``), one row each.

    Images are grouped by shape; each group is stacked into one ``(B, C, H, W)`` tensor on ``device``
    (split if it would exceed :data:`MAX_STACK_ELEMENTS` values) and every metric runs once per group.
    """
    count = len(pixels)
    values = {metric.name: np.full(count, np.nan) for metric in metrics}
    pixel_hashes = np.empty(count, dtype=object)
    phashes = np.zeros(count, dtype=np.uint64)
    for rows, stack in stacks_by_shape(pixels, max_values=MAX_STACK_ELEMENTS):  # stack: (b, H, W, C)
        pixel_hashes[rows] = _pixel_hashes(stack)
        images = torch.from_numpy(stack).to(device).permute(0, 3, 1, 2).contiguous()
        with torch.no_grad():
            for metric in metrics:
                result = metric.function(images)
                if not isinstance(result, torch.Tensor) or tuple(result.shape) != (len(rows),):
                    got = tuple(result.shape) if isinstance(result, torch.Tensor) else type(result).__name__
                    raise MetricRegistryError(
                        f"metric {metric.name!r} ({metric.origin}) returned {got} for a batch of "
                        f"{len(rows)} images; expected a tensor of shape ({len(rows)},)"
                    )
                values[metric.name][rows] = result.detach().to("cpu", torch.float64).numpy()
            phashes[rows] = perceptual_hash(images)
    frame = pd.DataFrame(values)
    frame["pixel_hash"] = pixel_hashes
    frame["phash"] = phashes
    return frame


def _pixel_hashes(stack: np.ndarray) -> list[str]:
    """sha1 of ``"HxWxC:"`` + uint8 pixel bytes for each image of a ``(B, H, W, C)`` float stack."""
    as_bytes = np.rint(stack * 255.0).clip(0, 255).astype(np.uint8)
    prefix = "x".join(str(size) for size in stack.shape[1:]).encode() + b":"
    return [hashlib.sha1(prefix + image.tobytes()).hexdigest() for image in as_bytes]


def _dct_matrix(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D`` (``D @ x`` transforms a column vector)."""
    k = torch.arange(size, dtype=torch.float64).unsqueeze(1)
    n = torch.arange(size, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi * (2 * n + 1) * k / (2 * size)) * math.sqrt(2.0 / size)
    matrix[0] /= math.sqrt(2.0)
    return matrix.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _phash_projections(height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(8, H)`` and ``(8, W)`` float64 matrices ``M`` with ``block = M_h @ X @ M_wᵀ``.

    The antialiased bilinear resize to 32×32 is separable, ``R_h @ X @ R_wᵀ``; its matrices come from
    resizing the identity (as 1-row images: torch's resize treats a 1-pixel-wide axis specially), and
    folding in the DCT gives ``M = (D @ R)[:8]``, so the 8×8 block costs two small products per image.
    """

    def resize_matrix(size: int) -> torch.Tensor:
        eye = torch.eye(size, dtype=torch.float64).view(size, 1, 1, size)
        rows = F.interpolate(eye, size=(1, PHASH_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return rows[:, 0, 0, :].T  # (32, size)

    dct = _dct_matrix(PHASH_SIZE, torch.float64, torch.device("cpu"))
    return (
        (dct @ resize_matrix(height))[:PHASH_BLOCK].to(device),
        (dct @ resize_matrix(width))[:PHASH_BLOCK].to(device),
    )


def perceptual_hash(images: torch.Tensor) -> np.ndarray:
    """``(B,)`` uint64 DCT perceptual hashes of a ``(B, C, H, W)`` batch (see the module docstring)."""
    lum = luminance(images).to(torch.float64)
    rows, columns = _phash_projections(lum.shape[1], lum.shape[2], lum.device)
    block = (rows @ lum @ columns.T).reshape(len(images), -1)
    median = block[:, 1:].median(dim=1, keepdim=True).values  # 63 AC values: a unique middle one
    bits = (block > median).cpu().numpy()
    return np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("samples",),
    writes=("metrics", "fingerprints"),
    description="per-image quality metrics and fingerprints (pixel hash, perceptual hash)",
)
