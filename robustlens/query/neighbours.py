"""Nearest samples by embedding, for a sample's detail view ("similar samples")."""

from __future__ import annotations

import numpy as np


def nearest_samples(embeddings: np.ndarray, position: int, k: int = 8) -> list[tuple[int, float]]:
    """The ``k`` samples closest to the one at ``position`` by cosine similarity, nearest first.

    Parameters
    ----------
    embeddings:
        ``(N, D)`` rows L2-normalised (:meth:`robustlens.analysis.artifacts.Embeddings.normalized`), samples order.
    position:
        Row of the query sample (never among the results).
    k:
        How many (at most ``N - 1``).

    Returns
    -------
    list of (position, cosine similarity)
        Exact (one ``(N,)`` matrix-vector product), ties in ``argsort`` order.
    """
    similarity = embeddings @ embeddings[position]
    similarity[position] = -np.inf
    k = min(k, len(similarity) - 1)
    if k <= 0:
        return []
    best = np.argpartition(-similarity, k - 1)[:k]
    best = best[np.argsort(-similarity[best])]
    return [(int(i), float(similarity[i])) for i in best]
