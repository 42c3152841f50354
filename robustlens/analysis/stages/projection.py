"""Stage ``projection``: a 2-D map of the embeddings for the dashboard's scatter plot.

UMAP (umap-learn, ``n_components=2``) on the L2-normalised embeddings, PCA-reduced to at most
``Config.pca_dims`` dimensions. UMAP's neighbour graph is not searched again: the shared exact cosine
graph of :func:`robustlens.analysis.stages.embeddings.neighbor_graph` is passed in as ``precomputed_knn``
(so neither pynndescent's ~30 s numba compilation nor a second search is paid). Seeded with
``context.random_state``, which makes umap-learn run single-threaded and the layout reproducible.

Time is bounded for large datasets: the number of optimisation epochs (the cost that grows with N)
falls from 200 at ``Config.large_dataset`` samples in proportion to 1/N, to no fewer than
``Config.min_epochs``; and above ``Config.large_dataset`` the initial layout is PCA rather than spectral
(the spectral eigen-solver's cost grows quickly with N).

Output: ``artifacts/projection.parquet`` — ``id``, ``x``, ``y`` (float32; NaN for the samples the
embeddings stage had no image for), samples order. Skipped when the
embeddings, the config and the random state are unchanged.

Per-sample part and reduction: none per sample here; a whole-dataset reduction of the embeddings (PCA, UMAP).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from robustlens.analysis.stages.base import (
    StageContext,
    StageResult,
    StageSpec,
    check_choice,
    check_number,
    excluded_rows,
    fingerprint,
    is_current,
    write_artifact,
)
from robustlens.analysis.stages.embeddings import kept_graph, load_embeddings, neighbor_graph

ARTIFACT = "projection"
#: Below this many samples UMAP's graph is too small to be meaningful: a PCA layout is used instead.
MIN_UMAP_SAMPLES = 16


@dataclass
class Config:
    """Parameters of the projection stage.

    Attributes
    ----------
    n_neighbors:
        UMAP neighbourhood size (the sample itself included, as in umap-learn).
    min_dist:
        UMAP minimum distance between embedded points.
    pca_dims:
        PCA pre-reduction of the embeddings (at most this many dimensions).
    n_epochs:
        Optimisation epochs; ``None``: automatic (see the module docstring).
    large_dataset:
        Sample count above which epochs shrink in proportion to 1/N.
    min_epochs:
        Fewest epochs for large datasets.
    init:
        ``"auto"`` (spectral up to ``large_dataset`` samples, PCA above), ``"spectral"`` or ``"pca"``.
    """

    n_neighbors: int = 15
    min_dist: float = 0.1
    pca_dims: int = 50
    n_epochs: int | None = None
    large_dataset: int = 20_000
    min_epochs: int = 50
    init: str = "auto"

    def __post_init__(self) -> None:
        check_number(ARTIFACT, self, "n_neighbors", low=2, integer=True)
        check_number(ARTIFACT, self, "min_dist", low=0)
        check_number(ARTIFACT, self, "pca_dims", low=2, integer=True)
        check_number(ARTIFACT, self, "n_epochs", low=1, integer=True, optional=True)
        check_choice(ARTIFACT, self, "init", ("auto", "spectral", "pca"))
        check_number(ARTIFACT, self, "min_epochs", low=1, integer=True)
        check_number(ARTIFACT, self, "large_dataset", low=1, integer=True)


def run(context: StageContext, config: Config) -> StageResult:
    """Write ``artifacts/projection.parquet``; summary: ``skipped``, ``samples``, ``method``, ``n_epochs``."""
    return SPEC.result(_run(context, config))


def _run(context: StageContext, config: Config) -> dict:
    samples = context.workspace.samples
    embeddings, embeddings_fp = load_embeddings(context)
    kept = ~excluded_rows(context.workspace)
    inputs = fingerprint(
        samples["id"], embeddings_fp, context.random_state, *([np.flatnonzero(~kept)] if not kept.all() else [])
    )
    if is_current(context, ARTIFACT, config=config, inputs=inputs):
        return {"skipped": True, "samples": len(samples)}
    # Samples without an image (their file was refused, see artifacts/refused_files.json) get no position (NaN).
    n = int(kept.sum())
    reduced = pca_reduce(embeddings[kept], config.pca_dims, random_state=context.random_state)
    if n < MIN_UMAP_SAMPLES:
        layout, method, epochs = _pca_layout(reduced), "pca", 0
    else:
        epochs = config.n_epochs if config.n_epochs is not None else auto_epochs(n, config)
        indices, distances = neighbor_graph(context, config.n_neighbors - 1)
        if not kept.all():
            indices, distances = kept_graph(indices, distances, kept)
        init = config.init if config.init != "auto" else "spectral" if n <= config.large_dataset else "pca"
        layout = umap_layout(
            reduced,
            indices,
            distances,
            n_neighbors=config.n_neighbors,
            min_dist=config.min_dist,
            n_epochs=epochs,
            init=init,
            random_state=context.random_state,
        )
        method = "umap"
    full = np.full((len(samples), 2), np.nan, dtype=np.float32)
    full[kept] = layout
    frame = pd.DataFrame({"id": samples["id"].to_numpy(), "x": full[:, 0], "y": full[:, 1]})
    write_artifact(
        context,
        ARTIFACT,
        frame,
        stage=ARTIFACT,
        config=config,
        inputs=inputs,
        extra={"method": method, "n_epochs": int(epochs)},
    )
    return {"skipped": False, "samples": n, "method": method, "n_epochs": int(epochs)}


def auto_epochs(n: int, config: Config) -> int:
    """Epochs for ``n`` samples: umap-learn's defaults (500 up to 10k, 200 above) shrunk for large N."""
    if n <= 10_000:
        return 500
    if n <= config.large_dataset:
        return 200
    return max(config.min_epochs, int(round(200 * config.large_dataset / n)))


def pca_reduce(embeddings: np.ndarray, dims: int, *, random_state: int) -> np.ndarray:
    """``(N, D)`` → ``(N, min(dims, D, N))`` PCA scores (float32); unchanged when already small enough."""
    n, width = embeddings.shape
    keep = min(dims, width, n)
    if keep >= width:
        return np.asarray(embeddings, dtype=np.float32)
    from sklearn.decomposition import PCA

    return PCA(n_components=keep, random_state=random_state).fit_transform(embeddings).astype(np.float32)


def umap_layout(
    data: np.ndarray,
    indices: np.ndarray,
    distances: np.ndarray,
    *,
    n_neighbors: int,
    min_dist: float,
    n_epochs: int,
    init: str,
    random_state: int,
) -> np.ndarray:
    """2-D UMAP layout of ``data`` from a precomputed neighbour graph.

    Parameters
    ----------
    data:
        ``(N, d)`` vectors (used for the PCA initialisation and for laying out disconnected components).
    indices, distances:
        ``(N, k)`` neighbours of each row (itself excluded) and their distances, nearest first,
        ``k >= n_neighbors - 1`` or ``k = N - 1``.
    init:
        umap-learn initialisation, ``"spectral"`` or ``"pca"``.
    """
    import umap

    n = data.shape[0]
    rows = np.arange(n, dtype=indices.dtype)[:, None]
    # umap-learn expects each point as its own first neighbour, at distance 0.
    knn_indices = np.ascontiguousarray(np.hstack([rows, indices]), dtype=np.int32)
    knn_distances = np.ascontiguousarray(np.hstack([np.zeros((n, 1), np.float32), distances]), dtype=np.float32)
    neighbours = min(n_neighbors, knn_indices.shape[1])
    reducer = umap.UMAP(
        n_components=2,
        n_neighbors=neighbours,
        min_dist=min_dist,
        metric="euclidean",
        n_epochs=n_epochs,
        init=init,
        random_state=random_state,
        precomputed_knn=(knn_indices[:, :neighbours], knn_distances[:, :neighbours]),
    )
    with warnings.catch_warnings():
        # Expected with a seed and a precomputed graph: single-threaded run, no transform() of new data.
        warnings.filterwarnings("ignore", message=".*overridden to 1 by setting random_state.*")
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        return reducer.fit_transform(data)


def _pca_layout(data: np.ndarray) -> np.ndarray:
    """First two principal components (zero-padded when fewer exist) of a small dataset."""
    n, width = data.shape
    layout = np.zeros((n, 2), dtype=np.float32)
    if n < 2:
        return layout
    centred = data - data.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:2].T
    layout[:, : scores.shape[1]] = scores
    return layout


SPEC = StageSpec(
    name=ARTIFACT,
    config=Config,
    run=run,
    reads=("embeddings",),
    writes=(ARTIFACT,),
    description="2-D map of the embeddings (UMAP on the shared neighbour graph)",
)
