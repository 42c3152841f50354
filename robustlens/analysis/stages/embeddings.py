"""Stage ``embeddings``: one L2-normalised vector per sample, pixel descriptors, and the shared kNN graph.

Source of the embedding, in priority order (``Config.source="auto"``):

1. ``imported`` — the embeddings given to ``robustlens init --embeddings``;
2. ``model`` — the penultimate layer of the workspace model: for an eager ``nn.Module`` the input of the
   last ``nn.Linear`` executed in the forward pass (captured with forward pre-hooks); TorchScript
   modules support no hooks, so their ``features`` submodule is used when present
   (``model.features(normalized)``), else the logits;
3. ``fallback`` — the built-in descriptor of :mod:`robustlens.analysis.fallback_features` (no download;
   good for duplicates and gross visual clusters, not for semantics).

Outputs (rows in ``samples.parquet`` order):

* ``artifacts/embeddings.npy`` — ``(N, D)`` float32, rows L2-normalised; its ``index.json`` entry carries
  ``source``, ``layer``, ``description`` and ``dim``.
* ``artifacts/visual_features.npy`` — ``(N, d)`` float32 PCA scores (not normalised) of the built-in pixel
  descriptor, whatever the embedding source: the space in which the outliers stage finds images that
  look unlike the rest (a classifier's features often map noise or blank images among normal ones).
* ``artifacts/thumbnails.npy`` — ``(N, 32, 32)`` uint8 luminance thumbnails, which the duplicates stage
  compares pixel by pixel to confirm near duplicates.
* ``artifacts/knn_indices.npy`` / ``artifacts/knn_distances.npy`` — written on demand by
  :func:`neighbor_graph` (used by ``projection``, ``duplicates`` and ``outliers``): each sample's nearest
  neighbours in embedding space (itself excluded) and their cosine distances, one search per embeddings
  version.

Incremental work: images are decoded once per run and only for content hashes missing from the caches
(``artifacts/cache/embeddings_pixels-*`` for the pixel descriptors and thumbnails,
``artifacts/cache/embeddings-*`` for model vectors, keyed by the model's identity). The PCA of the pixel
descriptor is fitted on the whole dataset, so adding images refits it over all cached raw descriptors
(cheap) and every fallback / visual vector may change slightly.

Per-sample part and reduction: :func:`map_batch` is the per-sample part, a pure function of a batch of decoded
images and the config (raw pixel descriptor, thumbnail and, given the model's feature extractor, the model
vector of each image; what the caches hold). The whole-dataset reductions are the PCA of the pixel descriptor
(``visual_features``, the fallback embedding) and the neighbour graph (:func:`neighbor_graph`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from robustlens.analysis import fallback_features, storage
from robustlens.analysis.ingest.model import NormalizedModel, prepare_images
from robustlens.analysis.loader import auto_batch_size, compute_threads, decode_workers, torch_threads
from robustlens.analysis.safety import file_digest
from robustlens.analysis.stages.base import (
    HashCache,
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    artifact_entry,
    cache_for,
    check_choice,
    check_number,
    decode_distinct,
    excluded_rows,
    fingerprint,
    is_current,
    record_artifact,
    record_refused,
    refused_rows,
)
from robustlens.analysis.workspace import Workspace
from robustlens.errors import WorkspaceError

SOURCES = ("auto", "imported", "model", "fallback")
ARTIFACT = "embeddings"
OUTPUTS = ("embeddings", "visual_features", "thumbnails")
#: Neighbours kept in the shared graph: enough for UMAP (15 including the sample itself) and the
#: duplicate / outlier stages (10).
DEFAULT_GRAPH_NEIGHBORS = 15
#: Above this many samples the exact (brute-force, O(N^2)) neighbour search is replaced by an approximate
#: one (faiss HNSW, O(N log N)). Measured on 20,000 Fashion-MNIST model embeddings (64-d, 1 thread):
#: brute force 1.9 s; HNSW 1.3 s with recall@15 = 0.999 and the nearest neighbour right for 99.98 %.
EXACT_SEARCH_MAX_SAMPLES = 10_000
#: HNSW parameters: links per node, candidate-list sizes while building and (at least) while searching.
HNSW_LINKS = 16
HNSW_BUILD_CANDIDATES = 40
HNSW_SEARCH_CANDIDATES = 48
#: Images per model forward pass. A decoded batch of small images can hold thousands; the sample CNN
#: runs at ~37 µs/image in passes of 128-256 on one CPU thread and ~85 µs/image in one pass of 4,096
#: (activations no longer fit the cache).
MODEL_BATCH = 256
#: Vectors wider than this are PCA-reduced before the neighbour search (the stages that threshold
#: similarities recompute them on the full vectors).
SEARCH_MAX_DIM = 64

MODEL_DESCRIPTION = (
    "Penultimate-layer activations of the workspace model ({layer}): similarity as the model "
    "sees it. Good for near duplicates, semantic clusters, outliers and label issues."
)
LOGITS_DESCRIPTION = (
    "Logits of the workspace model (no penultimate layer could be reached: TorchScript model "
    "without a 'features' submodule, or no nn.Linear): coarse, class-level similarity only."
)
IMPORTED_DESCRIPTION = (
    "Embeddings imported with 'robustlens init --embeddings' (from {source}); what they are "
    "good for depends on the model that produced them."
)


@dataclass
class Config:
    """Parameters of the embeddings stage.

    Attributes
    ----------
    source:
        ``"auto"`` (imported, else model, else fallback), or force one of ``"imported"``, ``"model"``,
        ``"fallback"``.
    batch_size:
        Images per decoded / forwarded batch (one cache chunk each). ``None`` (default): chosen from the
        images' size (:func:`~robustlens.analysis.loader.auto_batch_size`).
    fallback_dim:
        Largest dimension of the pixel descriptor after PCA (fallback embedding and visual features).
    """

    source: str = "auto"
    batch_size: int | None = None
    fallback_dim: int = 64

    def __post_init__(self) -> None:
        check_choice(ARTIFACT, self, "source", SOURCES)
        check_number(ARTIFACT, self, "batch_size", low=1, integer=True, optional=True)
        check_number(ARTIFACT, self, "fallback_dim", low=1, integer=True)


def run(context: StageContext, config: Config) -> StageResult:
    """Compute the stage's artifacts (see the module docstring).

    Summary: ``skipped``, ``source``, ``layer``, ``dim``, ``computed`` (images decoded), ``samples`` and, when
    computed, ``samples_skipped`` and ``refused``.
    """
    return SPEC.result(_run(context, config))


def map_batch(
    pixels: list[np.ndarray],
    config: Config,
    *,
    device: str = "cpu",
    extract: Callable[[list[np.ndarray]], torch.Tensor] | None = None,
) -> pd.DataFrame:
    """The per-sample part of the stage: one row per decoded image (``(H, W, C)`` float32 in ``[0, 1]``).

    Columns ``raw`` (float32 bytes of the :data:`~robustlens.analysis.fallback_features.RAW_DIM` raw pixel
    descriptor), ``thumbnail`` (uint8 bytes of the 32×32 luminance thumbnail) and, when ``extract`` (decoded
    pixels → ``(B, D)`` model features, e.g. from :func:`penultimate_extractor`) is given, ``vector`` (float32
    bytes). Depends on nothing but its arguments (``config`` is accepted for the protocol: no field of it
    changes per-sample results), so a batch can be computed anywhere.
    """
    frame = pd.DataFrame(_describe_rows(pixels, device))
    if extract is not None:
        with torch.no_grad():
            vectors = extract(pixels).detach().cpu().numpy().astype(np.float32, copy=False)
        frame["vector"] = [row.tobytes() for row in vectors]
    return frame


def _describe_rows(pixels: list[np.ndarray], device: str | torch.device) -> dict[str, list[bytes]]:
    """``raw`` and ``thumbnail`` byte blobs of each image (see :func:`map_batch`)."""
    raw, thumbs = fallback_features.describe(pixels, device)
    return {
        "raw": [row.tobytes() for row in raw.cpu().numpy().astype(np.float32, copy=False)],
        "thumbnail": [row.tobytes() for row in thumbs.cpu().numpy()],
    }


def _run(context: StageContext, config: Config) -> dict:
    workspace = context.workspace
    samples = workspace.samples
    source = resolve_source(workspace, config.source)
    identity, model = _source_identity(workspace, source, device=context.device)
    inputs = fingerprint(samples["id"], samples["content_hash"], identity, fallback_features.FEATURE_VERSION)
    # A run that left samples out (their files refused) is not current: the files are tried again.
    if (
        all(is_current(context, name, config=config, inputs=inputs) for name in OUTPUTS)
        and not excluded_rows(workspace).any()
    ):
        entry = artifact_entry(context.workspace, ARTIFACT)
        return {
            "skipped": True,
            "source": entry.get("source"),
            "layer": entry.get("layer"),
            "dim": entry.get("dim"),
            "computed": 0,
            "samples": len(samples),
        }

    extract, layer = None, source
    if source == "model":
        model = model if model is not None else workspace.load_model(context.device)
        features, layer = penultimate_extractor(model, device=context.device)

        def extract(pixels: list[np.ndarray]) -> torch.Tensor:
            images = prepare_images(pixels, model.config).to(context.device)
            return torch.cat(
                [features(images[start : start + MODEL_BATCH]) for start in range(0, len(images), MODEL_BATCH)]
            )

    pixel_cache = cache_for(context, "embeddings_pixels", {"version": fallback_features.FEATURE_VERSION})
    model_cache = cache_for(context, ARTIFACT, identity) if source == "model" else None
    computed = _fill_caches(
        context, pixel_cache, model_cache, extract=extract, batch_size=config.batch_size or auto_batch_size(samples)
    )
    hashes = samples["content_hash"].to_numpy(dtype=str)
    pixel_rows, pixel_found = _stack_found(pixel_cache, {"raw": np.float32, "thumbnail": np.uint8}, hashes)
    found = pixel_found
    if model_cache is not None:
        vector_rows, vector_found = _stack_found(model_cache, {"vector": np.float32}, hashes)
        found = found & vector_found
    # Samples whose file was refused (outside the dataset root, changed since init) and whose content hash has
    # nothing cached: zero rows standing for "no value", listed as excluded_rows; later stages leave them out.
    refused = refused_rows(context)
    excluded = ~found | refused
    unexplained = excluded & ~refused & ~pd.Series(hashes).isin(set(hashes[refused])).to_numpy()
    if unexplained.any():
        raise RuntimeError(
            f"cache {pixel_cache.directory} lacks {int(unexplained.sum())} images after computing "
            "them; delete that folder and re-run"
        )
    kept = ~excluded
    raw = pixel_rows["raw"]
    size = fallback_features.WORK_SIZE
    thumbnails = pixel_rows["thumbnail"].reshape(-1, size, size)
    if excluded.any():  # (copies of the large arrays only then)
        thumbnails = thumbnails.copy()
        thumbnails[excluded] = 0
        reduced = fallback_features.fit_reduce(raw[kept], config.fallback_dim)
        visual = np.zeros((len(samples), reduced.shape[1]), dtype=np.float32)
        visual[kept] = reduced
    else:
        visual = fallback_features.fit_reduce(raw, config.fallback_dim)
    if source == "model":
        own = vector_rows["vector"]
        if excluded.any():
            own = own.copy()
            own[excluded] = 0.0
    else:
        own = visual
    matrix, description = _embedding_matrix(workspace, source, layer, own)
    if source != "imported" and excluded.any():
        matrix[excluded] = 0.0

    storage.write_npy(workspace.artifact_path("visual_features.npy"), visual)
    storage.write_npy(workspace.artifact_path("thumbnails.npy"), thumbnails)
    storage.write_npy(workspace.artifact_path(f"{ARTIFACT}.npy"), matrix)
    refused_entries = record_refused(context, ARTIFACT, excluded)
    excluded_list = np.flatnonzero(excluded).tolist()
    extras: dict[str, dict[str, Any]] = {
        "embeddings": {
            "source": source,
            "layer": layer,
            "description": description,
            "dim": int(matrix.shape[1]),
            "excluded_rows": excluded_list,
        },
        "visual_features": {"description": fallback_features.DESCRIPTION, "dim": int(visual.shape[1])},
        "thumbnails": {"description": "32x32 uint8 luminance thumbnails for duplicate verification"},
    }
    for name in OUTPUTS:
        record_artifact(context, name, stage=ARTIFACT, config=config, inputs=inputs, extra=extras[name])
    return {
        "skipped": False,
        "source": source,
        "layer": layer,
        "dim": int(matrix.shape[1]),
        "computed": computed,
        "samples": len(samples),
        "samples_skipped": len(excluded_list),
        "refused": refused_entries,
    }


def _embedding_matrix(workspace: Workspace, source: str, layer: str, computed: np.ndarray) -> tuple[np.ndarray, str]:
    """The L2-normalised ``(N, D)`` embedding of ``source`` and its description.

    ``computed`` is the model's features (source ``model``) or the reduced pixel descriptor (``fallback``);
    imported embeddings are read from the workspace.
    """
    samples = workspace.samples
    if source == "imported":
        imported = workspace.embeddings()
        if imported is None:
            raise WorkspaceError(f"{workspace.root} has no imported embeddings; pass --embeddings to 'robustlens init'")
        matrix = imported.astype(np.float32)
        if matrix.shape[0] != len(samples):
            raise WorkspaceError(
                f"imported embeddings have {matrix.shape[0]} rows but the workspace has "
                f"{len(samples)} samples; re-run 'robustlens init --force'"
            )
        description = IMPORTED_DESCRIPTION.format(source=workspace.manifest["embeddings"].get("source", "?"))
    elif source == "model":
        matrix = computed
        description = LOGITS_DESCRIPTION if layer == "logits" else MODEL_DESCRIPTION.format(layer=layer)
    else:
        matrix = computed
        description = fallback_features.DESCRIPTION
    matrix = l2_normalize(matrix)
    if not np.isfinite(matrix).all():
        raise WorkspaceError(
            f"the {source} embeddings contain NaN or infinite values "
            f"({int((~np.isfinite(matrix)).any(1).sum())} samples)"
        )
    return matrix, description


# -- source selection ----------------------------------------------------------------------------------
def resolve_source(workspace: Workspace, requested: str) -> str:
    """The source actually used for ``requested`` (one of :data:`SOURCES`), checking it is available."""
    if requested not in SOURCES:
        raise StageInputError(f"embeddings source must be one of {SOURCES}, got {requested!r}")
    has_imported = workspace.manifest.get("embeddings") is not None
    if requested == "auto":
        return "imported" if has_imported else "model" if workspace.has_model else "fallback"
    if requested == "imported" and not has_imported:
        raise WorkspaceError(f"{workspace.root} has no imported embeddings; pass --embeddings to 'robustlens init'")
    if requested == "model" and not workspace.has_model:
        raise WorkspaceError(f"{workspace.root} has no model; pass --model to 'robustlens init'")
    return requested


def _source_identity(workspace: Workspace, source: str, *, device: str) -> tuple[dict, NormalizedModel | None]:
    """What the vectors depend on besides the image content (keys the per-image cache).

    Returns the identity and, when it had to be loaded to identify it (factory models), the model.
    """
    if source == "imported":
        return {"source": source, "array": fingerprint(workspace.embeddings())}, None
    if source == "fallback":
        return {"source": source, "version": fallback_features.FEATURE_VERSION}, None
    entry = workspace.manifest["model"]
    model = None
    if entry["kind"] == "torchscript":
        weights = file_digest(workspace.root / entry["file"])
    else:
        # Factory models have no file of their own: their weights identify them.
        model = workspace.load_model(device)
        state = model.model.state_dict()
        weights = fingerprint(
            [f"{name}:{tuple(t.shape)}:{t.dtype}" for name, t in state.items()],
            *[t.detach().cpu().float().numpy() for t in state.values()],
        )
    return (
        {
            "source": source,
            "kind": entry["kind"],
            "spec": entry.get("factory"),
            "weights": weights,
            "config": entry.get("config"),
        },
        model,
    )


# -- model penultimate layer ---------------------------------------------------------------------------
def penultimate_extractor(
    model: NormalizedModel,
    *,
    device: str | torch.device = "cpu",
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """A function ``(B, C, H, W)`` images in ``[0, 1]`` → ``(B, D)`` float32 features, and its layer name.

    Eager modules: the input of the last ``nn.Linear`` executed in the forward pass. TorchScript modules
    (no hooks): ``features`` submodule if present, else the logits. Other modules without any
    ``nn.Linear`` (e.g. ``torch.export`` graphs): the logits.

    On CPU a TorchScript ``features`` submodule is frozen and optimised for inference (convolution,
    batch-norm and ReLU fused), which is several times faster on small CNNs and equal to float rounding.
    """
    network = model.model
    if isinstance(network, torch.jit.ScriptModule):
        if hasattr(network, "features"):
            features = _inference_optimized(network.features) if str(device) == "cpu" else network.features
            return _flattened(lambda x: features(model.normalize(x))), "model.features"
        return _flattened(lambda x: network(model.normalize(x))), "logits"
    linears = {name: m for name, m in network.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        return _flattened(lambda x: network(model.normalize(x))), "logits"
    return _last_linear_input(model, linears), "input of the last nn.Linear"


def _inference_optimized(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """``torch.jit.freeze`` + ``optimize_for_inference`` of an eval-mode scripted module (a copy).

    Modules that cannot be frozen (e.g. they mutate attributes in ``forward``) are used as they are.
    """
    if module.training:
        return module
    try:
        return torch.jit.optimize_for_inference(torch.jit.freeze(module))
    except RuntimeError:
        # Freezing is an optimisation only; the unfrozen module computes the same features.
        return module


def _last_linear_input(model: NormalizedModel, linears: dict[str, nn.Linear]) -> Callable:
    """Extractor capturing the input of whichever ``nn.Linear`` runs last (hooks on all of them)."""
    network = model.model

    def extract(images: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            captured[:] = [args[0]]

        handles = [m.register_forward_pre_hook(hook) for m in linears.values()]
        try:
            network(model.normalize(images))
        finally:
            for handle in handles:
                handle.remove()
        if not captured:
            raise RuntimeError("no nn.Linear ran during the forward pass; cannot read the penultimate layer")
        features = captured[0]
        if features.shape[0] != images.shape[0]:
            raise RuntimeError(
                f"the last nn.Linear received shape {tuple(features.shape)}, whose first "
                f"dimension is not the batch size {images.shape[0]}"
            )
        return features.flatten(1).float()

    return extract


def _flattened(function: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda images: function(images).flatten(1).float()


# -- per-image caches ----------------------------------------------------------------------------------
def _fill_caches(
    context: StageContext,
    pixel_cache: HashCache,
    model_cache: HashCache | None,
    *,
    batch_size: int,
    extract: Callable[[list[np.ndarray]], torch.Tensor] | None,
) -> int:
    """Decode the images whose content hash is missing from a cache and add their results.

    Each image is decoded at most once per run; a chunk is written after every batch, so an interrupted
    run resumes where it stopped. Returns the number of images decoded.

    Parameters
    ----------
    pixel_cache:
        Rows ``content_hash``, ``raw`` (float32 bytes, RAW_DIM) and ``thumbnail`` (uint8 bytes, 32x32).
    model_cache:
        Rows ``content_hash``, ``vector`` (float32 bytes); ``None`` when no model is used.
    extract:
        Decoded pixels of one batch → ``(B, D)`` model features (``None`` without a model).
    """
    samples = context.workspace.samples
    hashes = samples["content_hash"].to_numpy(dtype=str)
    have_pixels = set(pixel_cache.hashes("thumbnail"))
    have_vectors = set(model_cache.hashes("vector")) if model_cache is not None else None
    first = pd.Series(np.arange(len(samples)), index=hashes)
    first = first[~first.index.duplicated()]
    need_pixels = ~first.index.isin(have_pixels)
    need_vectors = ~first.index.isin(have_vectors) if have_vectors is not None else np.zeros(len(first), bool)
    todo = first[need_pixels | need_vectors].to_numpy()
    if not len(todo):
        return 0
    pixel_missing = set(first.index[need_pixels])
    vector_missing = set(first.index[need_vectors])

    def vectors_of(chosen: list[np.ndarray]) -> np.ndarray:
        assert extract is not None  # only submitted with a model
        with torch.no_grad():  # grad mode is per thread
            return extract(chosen).detach().cpu().numpy().astype(np.float32, copy=False)

    # The model runs on a second thread while this one computes the pixel descriptors: torch releases
    # the GIL, and with one intra-op thread each the two use both cores without OpenMP spinning.
    with (
        torch.no_grad(),
        torch_threads(compute_threads()),
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustlens-model") as model_pool,
    ):
        batches = decode_distinct(
            context, todo, batch_size=batch_size, workers=context.workers or decode_workers(samples), desc="Embeddings"
        )
        decoded = 0
        for indices, pixels in batches:
            decoded += len(indices)
            batch_hashes = hashes[indices]
            wanted = np.fromiter((h in vector_missing for h in batch_hashes), dtype=bool, count=len(batch_hashes))
            vectors = None
            if extract is not None and wanted.any():
                vectors = model_pool.submit(vectors_of, [pixels[i] for i in np.flatnonzero(wanted)])
                vector_hashes = batch_hashes[wanted]
            wanted = np.fromiter((h in pixel_missing for h in batch_hashes), dtype=bool, count=len(batch_hashes))
            if wanted.any():
                chosen = [pixels[i] for i in np.flatnonzero(wanted)]
                pixel_cache.add(
                    pd.DataFrame({"content_hash": batch_hashes[wanted], **_describe_rows(chosen, context.device)})
                )
            if vectors is not None and model_cache is not None:
                model_cache.add(
                    pd.DataFrame({"content_hash": vector_hashes, "vector": [row.tobytes() for row in vectors.result()]})
                )
    keep = set(hashes)
    pixel_cache.compact(keep_hashes=keep)
    if model_cache is not None:
        model_cache.compact(keep_hashes=keep)
    return int(decoded)


def _stack_found(
    cache: HashCache,
    columns: dict[str, type],
    hashes: np.ndarray,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """:func:`_stack_blobs` with ``allow_missing``: ``(arrays, found)``."""
    return cast(tuple[dict[str, np.ndarray], np.ndarray], _stack_blobs(cache, columns, hashes, allow_missing=True))


def _stack_blobs(
    cache: HashCache,
    columns: dict[str, type],
    hashes: np.ndarray,
    *,
    allow_missing: bool = False,
) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], np.ndarray]:
    """Cached fixed-width byte blobs of each column (name → dtype) for ``hashes`` (samples order), as
    ``(N, width)`` arrays.

    With ``allow_missing`` a hash without a cached row is no error: its rows are zeros, and the ``(N,)`` bool
    array of the hashes found is returned too, as ``(arrays, found)``.

    Read as Arrow buffers and viewed as matrices (a Python ``bytes`` object per row cost ~1 s per 70,000
    images in the pandas round trip); the rows for ``hashes`` are located once for all columns.
    """
    if len(hashes) == 0:
        empty: dict[str, np.ndarray] = {column: np.zeros((0, 1), dtype=dtype) for column, dtype in columns.items()}
        return (empty, np.zeros(0, dtype=bool)) if allow_missing else empty
    table = cache.load_table(["content_hash", *columns])
    if table is None and allow_missing and not cache.hashes().size:
        raise WorkspaceError(
            "no image could be used: every dataset file was refused (see "
            "artifacts/refused_files.json); re-run 'robustlens init --force' on the dataset"
        )
    if table is None:
        raise RuntimeError(f"cache {cache.directory} lacks column(s) {list(columns)}; delete that folder and re-run")
    keys = table.column("content_hash").to_numpy(zero_copy_only=False)
    latest = pd.Series(np.arange(len(keys)), index=keys)
    latest = latest[~latest.index.duplicated(keep="last")]
    positions = latest.reindex(hashes)
    found = positions.notna().to_numpy()
    if not found.all() and not allow_missing:
        raise RuntimeError(
            f"cache {cache.directory} lacks {int((~found).sum())} images after computing "
            "them; delete that folder and re-run"
        )
    rows = positions.fillna(0).to_numpy(dtype=np.int64)
    stacked = {}
    for column, dtype in columns.items():
        blobs = table.column(column).combine_chunks()
        offsets = np.frombuffer(blobs.buffers()[1], dtype=np.int32)[blobs.offset : blobs.offset + len(blobs) + 1]
        widths = np.diff(offsets)
        if len(widths) and (widths != widths[0]).any():
            raise RuntimeError(
                f"cache {cache.directory}: '{column}' entries differ in size; delete that folder and re-run"
            )
        data = np.frombuffer(blobs.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
        stacked[column] = data.view(dtype).reshape(len(blobs), -1)[rows]
        if not found.all():
            stacked[column][~found] = 0
    return (stacked, found) if allow_missing else stacked


# -- helpers shared with the stages that read embeddings ------------------------------------------------
def l2_normalize(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero); ``(N, D)`` float32."""
    matrix = np.asarray(matrix, dtype=np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def load_embeddings(context: StageContext) -> tuple[np.ndarray, str]:
    """``artifacts/embeddings.npy`` checked against the samples, and its fingerprint.

    Raises
    ------
    WorkspaceError
        The embeddings stage has not run, or ran on a different set of samples.
    """
    from robustlens.analysis.artifacts import read_embeddings

    embeddings = read_embeddings(context.workspace, imported=False, required=True)
    assert embeddings is not None  # required=True raises instead
    matrix = embeddings.matrix
    return matrix, fingerprint(matrix)


def neighbor_graph(context: StageContext, n_neighbors: int) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's ``n_neighbors`` nearest neighbours in embedding space, itself excluded.

    Computed once per embeddings version (at least :data:`DEFAULT_GRAPH_NEIGHBORS` neighbours) and
    stored as ``artifacts/knn_indices.npy`` / ``knn_distances.npy``, so the projection, duplicates and
    outliers stages share one search. Up to :data:`EXACT_SEARCH_MAX_SAMPLES` samples the search is
    exact (brute force in blocks, never an N×N matrix); above, approximate (faiss HNSW).

    Parameters
    ----------
    n_neighbors:
        Neighbours wanted per sample (clipped to ``N - 1``).

    Samples listed as ``excluded_rows`` (no image: their file was refused) are left out of the search: no
    sample has them as a neighbour, and their own rows hold their own index at distance NaN (callers leave
    those rows out, see :func:`kept_graph`).

    Returns
    -------
    indices:
        ``(N, k)`` int64 neighbour row indices, nearest first.
    distances:
        ``(N, k)`` float32 cosine distances (``1 - cosine similarity``), ascending; for embeddings wider
        than :data:`SEARCH_MAX_DIM`, measured in their PCA reduction.
    """
    if n_neighbors < 1:
        raise StageInputError(f"n_neighbors must be >= 1, got {n_neighbors}")
    embeddings, embeddings_fp = load_embeddings(context)
    n = embeddings.shape[0]
    excluded = excluded_rows(context.workspace)
    kept_rows = np.flatnonzero(~excluded)
    want = min(n_neighbors, max(len(kept_rows) - 1, 0))
    parts = [
        embeddings_fp,
        context.random_state,
        EXACT_SEARCH_MAX_SAMPLES,
        SEARCH_MAX_DIM,
        "hnsw",
        HNSW_LINKS,
        HNSW_BUILD_CANDIDATES,
        HNSW_SEARCH_CANDIDATES,
    ]
    inputs = fingerprint(*parts, *([kept_rows] if excluded.any() else []))
    search_config = {"kind": "neighbor_graph"}
    workspace = context.workspace
    if is_current(context, "knn_indices", config=search_config, inputs=inputs) and is_current(
        context, "knn_distances", config=search_config, inputs=inputs
    ):
        indices = np.load(workspace.artifact_path("knn_indices.npy"), allow_pickle=False)
        if indices.shape[1] >= want:
            distances = np.load(workspace.artifact_path("knn_distances.npy"), allow_pickle=False)
            return indices[:, :want], distances[:, :want]
    k = min(max(n_neighbors, DEFAULT_GRAPH_NEIGHBORS), max(len(kept_rows) - 1, 0))
    space = search_space(embeddings[kept_rows] if excluded.any() else embeddings, random_state=context.random_state)
    indices, euclidean = knn_search(space, k, random_state=context.random_state)
    # On unit vectors |a - b|^2 = 2 (1 - cos(a, b)).
    distances = (np.square(euclidean, dtype=np.float64) / 2.0).clip(0.0, 2.0).astype(np.float32)
    if excluded.any():
        # Samples without an image (excluded_rows) are searched for by nobody and find nobody: their rows
        # point at themselves at distance NaN; the other rows' neighbours are other kept samples only.
        full_indices = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, axis=1)
        full_distances = np.full((n, k), np.nan, dtype=np.float32)
        full_indices[kept_rows] = kept_rows[indices]
        full_distances[kept_rows] = distances
        indices, distances = full_indices, full_distances
    storage.write_npy(workspace.artifact_path("knn_indices.npy"), indices)
    storage.write_npy(workspace.artifact_path("knn_distances.npy"), distances)
    extra = {"n_neighbors": int(k), "method": "exact" if n <= EXACT_SEARCH_MAX_SAMPLES else "hnsw"}
    for name in ("knn_indices", "knn_distances"):
        record_artifact(context, name, stage=ARTIFACT, config=search_config, inputs=inputs, extra=extra)
    return indices[:, :want], distances[:, :want]


def kept_graph(indices: np.ndarray, distances: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour graph of :func:`neighbor_graph` restricted to the ``(N,)`` bool ``kept`` samples, with
    indices renumbered to positions among them: ``(M, k)`` indices and distances, ``M = kept.sum()``.
    ``kept`` must be the complement of ``excluded_rows`` (kept samples only ever have kept neighbours)."""
    rows = np.flatnonzero(kept)
    local = np.full(len(kept), -1, dtype=np.int64)
    local[rows] = np.arange(len(rows))
    sub = local[indices[rows]]
    if (sub < 0).any():
        raise StageInputError("the neighbour graph links kept samples to excluded ones; re-run the 'embeddings' stage")
    return sub, distances[rows]


def knn_search(vectors: np.ndarray, k: int, *, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours of every row among the rows, itself excluded.

    Exact up to :data:`EXACT_SEARCH_MAX_SAMPLES` rows (sklearn's blocked brute force: GEMM + heap per
    block of rows, multi-threaded, memory bounded by blocks, never an N×N matrix); above, approximate
    (:func:`hnsw_search`). ``random_state`` is accepted for API stability; both searches are
    deterministic.

    Parameters
    ----------
    vectors:
        ``(N, D)`` float array.
    k:
        Neighbours per row, ``0 <= k <= N - 1``.

    Returns
    -------
    ``(N, k)`` int64 indices and ``(N, k)`` float32 euclidean distances, nearest first.
    """
    n = vectors.shape[0]
    if not 0 <= k <= max(n - 1, 0):
        raise StageInputError(f"k must be in [0, {max(n - 1, 0)}] for {n} rows, got {k}")
    if k == 0:
        return np.zeros((n, 0), dtype=np.int64), np.zeros((n, 0), dtype=np.float32)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if n <= EXACT_SEARCH_MAX_SAMPLES:
        from sklearn.neighbors import NearestNeighbors

        # Querying with X=None leaves each point itself out (also among exact duplicates).
        search = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="euclidean").fit(vectors)
        distances, indices = search.kneighbors(None)
    else:
        indices, distances = hnsw_search(vectors, k)
    return indices.astype(np.int64), distances.astype(np.float32)


def hnsw_search(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Approximate euclidean kNN of every row among the rows, itself excluded (faiss HNSW).

    One thread: the result is the same on every run (faiss assigns HNSW levels from a fixed seed; a
    multi-threaded build inserts in a racy order), and OpenMP threads that spin-wait for a core another
    process holds were measured making the search several times slower on the shared 2-core machine. A
    row whose search returns fewer than ``k`` others (possible in an HNSW graph, not seen in practice)
    is searched again exactly.
    """
    import faiss

    n, dim = vectors.shape
    index = faiss.IndexHNSWFlat(dim, HNSW_LINKS)
    index.hnsw.efConstruction = HNSW_BUILD_CANDIDATES
    threads = faiss.omp_get_max_threads()
    try:
        faiss.omp_set_num_threads(1)
        index.add(vectors)
        index.hnsw.efSearch = max(HNSW_SEARCH_CANDIDATES, 2 * (k + 1))
        squared, found = index.search(vectors, k + 1)
    finally:
        faiss.omp_set_num_threads(threads)
    incomplete = np.flatnonzero((found < 0).any(axis=1))
    distances = np.sqrt(np.maximum(squared, 0.0))
    indices, distances = _drop_self(found.astype(np.int64), distances, k)
    if len(incomplete):
        from sklearn.neighbors import NearestNeighbors

        exact_d, exact_i = NearestNeighbors(n_neighbors=k + 1).fit(vectors).kneighbors(vectors[incomplete])
        indices[incomplete], distances[incomplete] = _drop_self_rows(exact_i, exact_d, incomplete, k)
    return indices, distances


def _drop_self_rows(
    indices: np.ndarray, distances: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_drop_self` for query rows ``rows`` of a larger graph."""
    is_self = indices == rows[:, None]
    is_self[~is_self.any(1), -1] = True
    keep = ~is_self
    return (indices[keep].reshape(len(rows), -1)[:, :k], distances[keep].reshape(len(rows), -1)[:, :k])


def search_space(embeddings: np.ndarray, *, random_state: int) -> np.ndarray:
    """Unit vectors to search: the embeddings, PCA-reduced to :data:`SEARCH_MAX_DIM` when wider."""
    if embeddings.shape[1] <= SEARCH_MAX_DIM or embeddings.shape[0] <= SEARCH_MAX_DIM:
        return l2_normalize(embeddings)
    from sklearn.decomposition import PCA

    reduced = PCA(n_components=SEARCH_MAX_DIM, random_state=random_state).fit_transform(embeddings)
    return l2_normalize(reduced)


def _drop_self(indices: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index from a self-inclusive (N, k+1) graph, keeping k columns."""
    # Rows where self was not found (approximate search) drop their farthest neighbour instead.
    return _drop_self_rows(indices, distances, np.arange(indices.shape[0]), k)


SPEC = StageSpec(
    name=ARTIFACT,
    config=Config,
    run=run,
    reads=("samples",),
    uses=("model",),
    writes=OUTPUTS,
    may_write=("knn_indices", "knn_distances"),
    description="one vector per sample (imported, model or built-in), pixel descriptors, thumbnails",
)
