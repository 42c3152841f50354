"""Stage ``duplicates``: exact and near duplicates, their clusters, and train/test leakage.

Inputs: ``artifacts/fingerprints.parquet`` (metrics stage: ``pixel_hash``, ``phash``), and from the
embeddings stage ``embeddings.npy``, ``thumbnails.npy`` and the shared neighbour graph.

* **Exact** duplicates share ``pixel_hash`` (identical decoded pixels, whatever the file bytes).
* **Near** duplicates are found in two steps. Candidates: each sample's ``n_neighbors`` nearest
  neighbours in embedding space (cosine ≥ ``min_embedding_cosine``) and in a shift-invariant pixel
  signature space (magnitude of the low-frequency 2-D Fourier spectrum of the 32×32 thumbnail), kept
  when their signatures' cosine is ≥ ``min_signature_cosine``; no N×N matrix is ever formed.
  Confirmation: the two thumbnails are aligned to sub-pixel precision by phase correlation and
  compared; a pair is a near duplicate when the phase-correlation peak (agreement of the Fourier
  phase at all frequencies, fine texture included) is ≥ ``min_phase_peak``, the correlation distance
  (1 − normalised cross-correlation, insensitive to brightness/contrast) is ≤ ``max_ncc_distance``, the
  mean absolute difference of the mean-centred thumbnails is ≤ ``max_pixel_difference`` and the mean
  brightness differs by ≤ ``max_mean_difference``. An optional pHash Hamming-distance bound
  (``phash_max_distance``) can be added.

  Why not embedding cosine + pHash alone: measured on the 2,000 Fashion-MNIST sample images, unrelated
  images of one class reach cosine 0.999 in the model's embedding and pHash distance 2, while a copy
  shifted by one pixel can drop to cosine 0.87 and pHash distance 30. The aligned pixel comparison
  separates them (see ``tests/test_duplicates.py``); the phase-peak bound was added after the full
  70,000-image Fashion-MNIST showed look-alike products (same cut, different garment) passing the
  correlation bounds with peaks of 0.28–0.5, while every planted copy scored ≥ 0.64.
* Exact and near pairs are joined into clusters (connected components); the representative of a
  cluster is its first sample in ``samples.parquet`` order; a cluster whose samples lie in two or more
  known splits (``unspecified`` ignored) is **leakage**.

Outputs:

* ``artifacts/duplicates.parquet`` — one row per sample: ``id``, ``exact_group`` (int, -1: no identical
  copy), ``near_group`` (cluster of exact + near duplicates, -1: none), ``group_size`` (size of the
  ``near_group`` cluster, 1 for none), ``is_representative`` (the copy to keep; true for samples without
  duplicates), ``cross_split``.
* ``artifacts/duplicate_pairs.parquet`` — ``id_a``, ``id_b``, ``kind`` (``exact``: listed as
  representative → copy; ``near``), ``cosine`` (embedding), ``phash_distance`` (-1: unknown),
  ``ncc_distance``, ``pixel_difference``, ``phase_peak``, ``cross_split``.
* ``artifacts/flags_duplicates.parquet`` — issues ``exact_duplicate``, ``near_duplicate``, ``leakage``.

Per-sample part and reduction: the per-sample inputs (``pixel_hash``/``phash`` of the metrics stage, the
embedding and the 32×32 thumbnail of the embeddings stage) are computed upstream, batch by batch; this stage is a
whole-dataset reduction (neighbour search, pair confirmation, connected components), whose pair confirmation
(:func:`confirm_pairs` / :func:`compare_thumbnails`) is a pure function of the two thumbnails of each pair.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from robustlens.analysis.ingest.dataset import UNSPECIFIED_SPLIT
from robustlens.analysis.loader import default_workers, torch_threads
from robustlens.analysis.stages.base import (
    FLAG_COLUMNS,
    StageContext,
    StageInputError,
    StageResult,
    StageSpec,
    check_number,
    excluded_rows,
    fingerprint,
    is_current,
    load_sample_array,
    read_artifact,
    write_artifact,
)
from robustlens.analysis.stages.embeddings import knn_search, load_embeddings, neighbor_graph
from robustlens.errors import WorkspaceError

STAGE = "duplicates"
#: Low-frequency block (rows × columns of the 2-D spectrum) forming the shift-invariant signature.
SIGNATURE_BLOCK = 6
#: Thumbnails transformed per chunk when computing signatures.
SIGNATURE_CHUNK = 8192
#: Thumbnail border (pixels) left out of the comparison: the sub-pixel shift wraps content around it.
COMPARE_BORDER = 2
#: Pairs compared per chunk (bounds memory: about 8 KiB per pair).
COMPARE_CHUNK = 4096
#: Partner ids named in one explanation.
NAMED_PARTNERS = 3
#: Quantisation levels of Fourier phases (one uint8 per frequency).
PHASE_LEVELS = 256
_UNIT_PHASORS = torch.polar(torch.ones(PHASE_LEVELS), torch.arange(PHASE_LEVELS) * (2.0 * torch.pi / PHASE_LEVELS))


@dataclass
class Config:
    """Parameters of the duplicates stage (defaults tuned on Fashion-MNIST, see the module docstring).

    Attributes
    ----------
    n_neighbors:
        Candidates per sample in each space.
    min_embedding_cosine:
        Embedding-space candidates below this cosine similarity are not compared.
    min_signature_cosine:
        Candidates (from either graph) whose signatures' cosine similarity is below this are not compared.
    max_ncc_distance:
        Largest ``1 - NCC`` of aligned thumbnails for a near duplicate.
    max_pixel_difference:
        Largest mean absolute difference (pixel values in [0, 1]) of aligned, mean-centred thumbnails.
    max_mean_difference:
        Largest difference of mean brightness (in [0, 1]).
    max_shift:
        Largest alignment shift considered, in thumbnail pixels (32×32).
    min_phase_peak:
        Smallest phase-correlation peak (see :func:`compare_thumbnails`) of a near duplicate.
    phash_max_distance:
        When set, near duplicates must also be within this pHash Hamming distance.
    """

    n_neighbors: int = 10
    min_embedding_cosine: float = 0.85
    min_signature_cosine: float = 0.98
    max_ncc_distance: float = 0.008
    max_pixel_difference: float = 0.022
    max_mean_difference: float = 0.1
    max_shift: float = 3.0
    min_phase_peak: float = 0.5
    phash_max_distance: int | None = None

    def __post_init__(self) -> None:
        check_number(STAGE, self, "n_neighbors", low=1, integer=True)
        for name in ("min_embedding_cosine", "min_signature_cosine"):
            check_number(STAGE, self, name, low=-1.0, high=1.0)
        for name in ("max_ncc_distance", "max_pixel_difference", "max_mean_difference", "max_shift"):
            check_number(STAGE, self, name, low=0)
        check_number(STAGE, self, "min_phase_peak")
        check_number(STAGE, self, "phash_max_distance", low=0, high=64, integer=True, optional=True)


def run(context: StageContext, config: Config) -> StageResult:
    """Find duplicates and leakage; write the three artifacts.

    Summary: ``skipped``, ``candidate_pairs`` (when computed) and the counts of :func:`_counts`.
    """
    return SPEC.result(_run(context, config))


def _run(context: StageContext, config: Config) -> dict:
    workspace = context.workspace
    samples = workspace.samples
    prints = load_fingerprints(context)
    embeddings, embeddings_fp = load_embeddings(context)
    thumbnails = load_sample_array(context, "thumbnails", ndim=3, producer="embeddings")
    # Samples without an image (their file was refused: no pixel_hash, or excluded by the embeddings stage) are
    # nobody's duplicate.
    missing = prints["pixel_hash"].isna().to_numpy() | excluded_rows(workspace)
    inputs = fingerprint(
        samples["id"],
        samples["split"],
        prints,
        embeddings_fp,
        fingerprint(thumbnails),
        context.random_state,
        *([np.flatnonzero(missing)] if missing.any() else []),
    )
    if all(
        is_current(context, name, config=config, inputs=inputs)
        for name in ("duplicates", "duplicate_pairs", "flags_duplicates")
    ):
        return {"skipped": True, **_counts(read_artifact(workspace, "duplicates"))}

    n = len(samples)
    pixel_hash = prints["pixel_hash"].to_numpy(dtype=object, copy=True)
    pixel_hash[missing] = [f"missing:{row}" for row in np.flatnonzero(missing)]  # unique: in no group
    exact = exact_groups(pixel_hash.astype(str))
    phash = phash_values(prints["phash"]) if "phash" in prints.columns else None
    candidates = candidate_pairs(context, embeddings, thumbnails, config)
    candidates = candidates[~(missing[candidates[:, 0]] | missing[candidates[:, 1]])]
    candidates = candidates[(exact[candidates[:, 0]] < 0) | (exact[candidates[:, 0]] != exact[candidates[:, 1]])]
    near, ncc, difference, peak = confirm_pairs(thumbnails, candidates, config, phash=phash)
    near_pairs, ncc, difference, peak = candidates[near], ncc[near], difference[near], peak[near]
    exact_pairs = _star_pairs(exact)

    all_pairs = np.concatenate([exact_pairs, near_pairs])
    cluster = clusters(n, all_pairs)
    splits = samples["split"].astype(str).to_numpy()
    table = duplicate_table(samples["id"].to_numpy(), exact, cluster, splits)
    pairs = pair_table(
        samples["id"].to_numpy(),
        splits,
        embeddings,
        phash,
        exact_pairs,
        near_pairs,
        {"ncc_distance": ncc, "pixel_difference": difference, "phase_peak": peak},
    )
    flags = flag_table(samples["id"].to_numpy(), splits, table, exact, near_pairs, ncc, difference, config)
    for name, frame in (("duplicates", table), ("duplicate_pairs", pairs), ("flags_duplicates", flags)):
        write_artifact(context, name, frame, stage=STAGE, config=config, inputs=inputs)
    return {"skipped": False, "candidate_pairs": int(len(candidates)), **_counts(table)}


# -- inputs --------------------------------------------------------------------------------------------
def load_fingerprints(context: StageContext) -> pd.DataFrame:
    """``fingerprints.parquet`` aligned to the samples (``id``, ``pixel_hash``, ``phash``); ``pixel_hash`` is null
    for a sample whose file was refused when the metrics stage read it.

    Raises
    ------
    WorkspaceError
        The metrics stage has not run, or ran on other samples.
    """
    samples = context.workspace.samples
    prints = read_artifact(context.workspace, "fingerprints")
    if prints is None:
        raise WorkspaceError(
            f"{context.workspace.artifact_path('fingerprints.parquet')} does not exist; run the "
            "'metrics' stage first ('robustlens analyze WS --stages metrics')"
        )
    if "pixel_hash" not in prints.columns or "id" not in prints.columns:
        raise WorkspaceError(f"fingerprints.parquet lacks 'id' / 'pixel_hash' columns (has {list(prints.columns)})")
    aligned = prints.drop_duplicates("id").set_index("id").reindex(samples["id"])
    absent = ~samples["id"].isin(prints["id"]).to_numpy()
    if absent.any():
        missing = samples["id"].iloc[np.flatnonzero(absent)[:3]].tolist()
        raise WorkspaceError(
            f"fingerprints.parquet has no row for {int(absent.sum())} "
            f"samples (e.g. {missing}); re-run the 'metrics' stage"
        )
    return aligned.reset_index()


def phash_values(column: pd.Series) -> np.ndarray:
    """pHash column (uint64, or int64 holding the same bits) as ``(N,)`` uint64."""
    values = column.to_numpy()
    if values.dtype not in (np.dtype(np.uint64), np.dtype(np.int64)):
        raise WorkspaceError(f"fingerprints 'phash' must be a 64-bit integer column, got {values.dtype}")
    return np.ascontiguousarray(values).view(np.uint64)


def phash_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between uint64 hashes ``a`` and ``b`` (same shape), vectorised popcount."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


# -- exact duplicates and clusters ---------------------------------------------------------------------
def exact_groups(pixel_hash: np.ndarray) -> np.ndarray:
    """``(N,)`` int group of identical pixels (numbered by first appearance), -1 for unique images."""
    codes, first = pd.factorize(pd.Series(pixel_hash), sort=False)
    counts = np.bincount(codes, minlength=len(first))
    shared = counts[codes] > 1
    renumber = np.full(len(first), -1, dtype=np.int64)
    shared_codes = pd.unique(codes[shared])
    renumber[shared_codes] = np.arange(len(shared_codes))
    return np.where(shared, renumber[codes], -1)


def _star_pairs(groups: np.ndarray) -> np.ndarray:
    """``(P, 2)`` pairs joining each group's first member to every other member."""
    members = np.flatnonzero(groups >= 0)
    if not len(members):
        return np.zeros((0, 2), dtype=np.int64)
    first = pd.Series(members).groupby(groups[members]).transform("first").to_numpy()
    keep = members != first
    return np.stack([first[keep], members[keep]], axis=1).astype(np.int64)


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` samples given ``(P, 2)`` duplicate pairs."""
    if not len(pairs):
        return np.arange(n, dtype=np.int64)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1].astype(np.int64)


# -- near duplicates -----------------------------------------------------------------------------------
def shift_signature(thumbnails: np.ndarray) -> np.ndarray:
    """``(N, SIGNATURE_BLOCK**2)`` unit vectors invariant to (circular) translation of the thumbnail.

    Magnitudes of the low-frequency 2-D DFT coefficients of the mean-centred thumbnail: a shift changes
    only the phase, so a slightly shifted copy keeps nearly the same signature.
    """
    signature = np.empty((len(thumbnails), SIGNATURE_BLOCK**2), dtype=np.float32)
    for start in range(0, len(thumbnails), SIGNATURE_CHUNK):  # bounded temporaries
        images = torch.from_numpy(thumbnails[start : start + SIGNATURE_CHUNK]).float().div_(255.0)
        images = images - images.mean(dim=(1, 2), keepdim=True)
        # The real FFT's first columns are the full FFT's (a real image's spectrum is Hermitian).
        spectrum = torch.fft.rfft2(images)[:, :SIGNATURE_BLOCK, :SIGNATURE_BLOCK].abs().flatten(1)
        norms = spectrum.norm(dim=1, keepdim=True)
        # Flat images (no variation at 1/255 resolution) get an all-zero signature.
        signature[start : start + SIGNATURE_CHUNK] = torch.where(
            norms > 1e-3, spectrum / norms.clamp_min(1e-12), torch.zeros_like(spectrum)
        ).numpy()
    return signature


def candidate_pairs(
    context: StageContext, embeddings: np.ndarray, thumbnails: np.ndarray, config: Config
) -> np.ndarray:
    """``(P, 2)`` unique candidate pairs ``i < j`` from the embedding and signature neighbour graphs."""
    n = embeddings.shape[0]
    k = min(config.n_neighbors, n - 1)
    if k < 1:
        return np.zeros((0, 2), dtype=np.int64)

    def signature_graph() -> tuple[np.ndarray, np.ndarray]:
        signature = shift_signature(thumbnails)
        return signature, knn_search(signature, k, random_state=context.random_state)[0]

    # The two searches are independent and release the GIL: the signature graph is built on a second
    # thread while this one builds (or loads) the embedding graph; one intra-op thread each, so no
    # OpenMP pool spins on a core the other thread needs.
    with torch_threads(1), ThreadPoolExecutor(max_workers=1, thread_name_prefix="robustlens-signature") as pool:
        pending = pool.submit(signature_graph)
        indices, distances = neighbor_graph(context, k)
        signature, sig_indices = pending.result()
    pairs = np.concatenate(
        [
            _graph_pairs(indices, 1.0 - distances >= config.min_embedding_cosine),
            _graph_pairs(sig_indices, np.ones(sig_indices.shape, dtype=bool)),
        ]
    )
    low, high = np.minimum(pairs[:, 0], pairs[:, 1]), np.maximum(pairs[:, 0], pairs[:, 1])
    # Unique pairs i < j through one int64 key per pair, sorted (np.unique on rows, or its hash-based
    # path on keys, took 10x longer on the ~1M candidates of 70,000 images).
    keys = np.sort(low[low != high] * np.int64(n) + high[low != high])
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
    pairs = np.stack([keys // n, keys % n], axis=1)
    # Confirmed near duplicates have nearly equal spectra whichever graph proposed them (measured
    # signature cosine >= 0.995 for every planted copy), so this cheap test spares most comparisons.
    sig_cosine = np.einsum("ij,ij->i", signature[pairs[:, 0]], signature[pairs[:, 1]])
    # Flat (blank) thumbnails have an all-zero signature; two of them are still compared.
    flat = np.asarray(~signature.any(axis=1))
    return pairs[(sig_cosine >= config.min_signature_cosine) | (flat[pairs[:, 0]] & flat[pairs[:, 1]])]


def _graph_pairs(indices: np.ndarray, keep: np.ndarray) -> np.ndarray:
    rows = np.broadcast_to(np.arange(indices.shape[0])[:, None], indices.shape)
    return np.stack([rows[keep], indices[keep]], axis=1).astype(np.int64)


def confirm_pairs(
    thumbnails: np.ndarray, pairs: np.ndarray, config: Config, *, phash: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Which candidate pairs are near duplicates.

    Two passes: the phase-correlation peak of every pair from precomputed, quantised Fourier phases
    (:func:`phase_codes`, cheap), then the full aligned comparison (:func:`compare_thumbnails`) only for
    pairs whose peak reaches ``config.min_phase_peak``.

    Returns ``(P,)`` bool, and each pair's ``ncc_distance``, ``pixel_difference`` (1 for pairs not
    compared) and ``phase_peak`` (0 for pairs whose mean brightness rules them out).
    """
    ncc = np.ones(len(pairs), dtype=np.float32)
    difference = np.ones(len(pairs), dtype=np.float32)
    mean_gap = np.ones(len(pairs), dtype=np.float32)
    peak = np.zeros(len(pairs), dtype=np.float32)
    if not len(pairs):
        return np.zeros(0, dtype=bool), ncc, difference, peak
    codes = phase_codes(thumbnails)
    flat = np.ptp(thumbnails.reshape(len(thumbnails), -1), axis=1) == 0
    height, width = thumbnails.shape[1:]
    # Pairs whose mean brightness differs by more than the final bound cannot be near duplicates: they
    # skip the phase step (same means as compare_thumbnails; the margin covers summation order).
    means = torch.from_numpy(thumbnails).float().div_(255.0).mean(dim=(1, 2)).numpy()
    possible = np.flatnonzero(np.abs(means[pairs[:, 0]] - means[pairs[:, 1]]) <= config.max_mean_difference + 1e-5)

    def peaks_of(rows: np.ndarray) -> None:
        chunk = pairs[rows]
        peak[rows] = phase_peaks(
            codes[chunk[:, 0]], codes[chunk[:, 1]], flat[chunk[:, 0]], flat[chunk[:, 1]], height=height, width=width
        )

    def compare(rows: np.ndarray) -> None:
        ncc[rows], difference[rows], mean_gap[rows], _ = compare_thumbnails(
            thumbnails[pairs[rows, 0]], thumbnails[pairs[rows, 1]], max_shift=config.max_shift
        )

    # Chunks are independent: one per core, each on one intra-op thread (torch releases the GIL).
    with (
        torch_threads(1),
        ThreadPoolExecutor(max_workers=default_workers(), thread_name_prefix="robustlens-pairs") as pool,
    ):
        list(
            pool.map(
                peaks_of, [possible[start : start + COMPARE_CHUNK] for start in range(0, len(possible), COMPARE_CHUNK)]
            )
        )
        survivors = np.flatnonzero(peak >= config.min_phase_peak)
        list(
            pool.map(
                compare, [survivors[start : start + COMPARE_CHUNK] for start in range(0, len(survivors), COMPARE_CHUNK)]
            )
        )
    near = (
        (peak >= config.min_phase_peak)
        & (ncc <= config.max_ncc_distance)
        & (difference <= config.max_pixel_difference)
        & (mean_gap <= config.max_mean_difference)
    )
    if config.phash_max_distance is not None and phash is not None:
        near &= phash_distance(phash[pairs[:, 0]], phash[pairs[:, 1]]) <= config.phash_max_distance
    return near, ncc, difference, peak


def phase_codes(thumbnails: np.ndarray, *, chunk: int = 8192) -> np.ndarray:
    """Quantised Fourier phase of each mean-centred thumbnail: ``(N, H, W // 2 + 1)`` uint8.

    ``round(phase / 2π · 256) mod 256``; the phase difference of two images is then a wrapping uint8
    subtraction. 1/256 of a turn (1.4°) changes a phase-correlation peak by well under 0.01.
    """
    count, height, width = thumbnails.shape
    codes = np.empty((count, height, width // 2 + 1), dtype=np.uint8)
    for start in range(0, count, chunk):
        images = torch.from_numpy(thumbnails[start : start + chunk]).float()
        spectrum = torch.fft.rfft2(images - images.mean(dim=(1, 2), keepdim=True))
        turns = torch.angle(spectrum) * (PHASE_LEVELS / (2.0 * torch.pi))
        codes[start : start + chunk] = torch.remainder(torch.round(turns), PHASE_LEVELS).to(torch.uint8).numpy()
    return codes


def phase_peaks(
    codes_a: np.ndarray, codes_b: np.ndarray, flat_a: np.ndarray, flat_b: np.ndarray, *, height: int, width: int
) -> np.ndarray:
    """``(P,)`` phase-correlation peaks from :func:`phase_codes` of pair members (see :func:`compare_thumbnails`).

    ``flat_a`` / ``flat_b``: ``(P,)`` bool, images without any variation (two flat images: 1; one: 0).
    """
    difference = torch.from_numpy(codes_a) - torch.from_numpy(codes_b)  # uint8 arithmetic wraps mod 256
    cross = _UNIT_PHASORS[difference.long()]
    peak = torch.fft.irfft2(cross, s=(height, width)).flatten(1).amax(1).numpy().astype(np.float32)
    peak = np.where(flat_a | flat_b, 0.0, peak)
    return np.where(flat_a & flat_b, 1.0, peak).astype(np.float32)


def compare_thumbnails(
    a: np.ndarray,
    b: np.ndarray,
    *,
    max_shift: float = 3.0,
    border: int = COMPARE_BORDER,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Compare thumbnail pairs after aligning ``b`` onto ``a`` by sub-pixel phase correlation.

    Parameters
    ----------
    a, b:
        ``(P, H, W)`` uint8 thumbnails, pair ``p`` is ``(a[p], b[p])``.
    max_shift:
        Largest alignment shift (pixels) applied on either axis.
    border:
        Pixels left out on every side when comparing.

    Returns
    -------
    ncc_distance:
        ``(P,)`` ``1 - normalised cross-correlation`` of the aligned interiors (0: identical up to
        brightness and contrast). Two flat images count as 0, a flat and a textured one as 1.
    pixel_difference:
        ``(P,)`` mean absolute difference of the aligned, mean-centred interiors (values in [0, 1]).
    mean_difference:
        ``(P,)`` absolute difference of mean brightness.
    phase_peak:
        ``(P,)`` height of the phase-correlation peak in [0, 1]: the share of Fourier phase that agrees at
        the best shift — near 1 for a shifted or re-encoded copy, low for merely similar-looking images.
        Two flat images count as 1.
    """
    if a.shape != b.shape or a.ndim != 3:
        raise StageInputError(f"expected two (P, H, W) arrays of one shape, got {a.shape} and {b.shape}")
    count, height, width = a.shape
    if count == 0:
        empty = np.zeros(0, dtype=np.float32)
        return empty, empty, empty, empty
    first = torch.from_numpy(a).float().div_(255.0)
    second = torch.from_numpy(b).float().div_(255.0)
    mean_a, mean_b = first.mean(dim=(1, 2), keepdim=True), second.mean(dim=(1, 2), keepdim=True)
    mean_difference = (mean_a - mean_b).abs().flatten().numpy()
    first, second = first - mean_a, second - mean_b
    flat_a = first.abs().amax(dim=(1, 2)) < 1e-6
    flat_b = second.abs().amax(dim=(1, 2)) < 1e-6
    # Real FFTs: half the spectrum of a real image holds all of it.
    spectrum_a, spectrum_b = torch.fft.rfft2(first), torch.fft.rfft2(second)
    cross = spectrum_a * spectrum_b.conj()
    correlation = torch.fft.irfft2(cross / cross.abs().clamp_min(1e-9), s=(height, width))
    peak = correlation.flatten(1).amax(1)
    peak = torch.where(flat_a & flat_b, torch.ones_like(peak), peak)
    peak = torch.where(flat_a ^ flat_b, torch.zeros_like(peak), peak)
    ncc, difference = _aligned_difference(
        first, spectrum_b, correlation, flat_a, flat_b, max_shift=max_shift, border=border
    )
    return (
        ncc.astype(np.float32),
        difference.astype(np.float32),
        mean_difference.astype(np.float32),
        peak.numpy().astype(np.float32),
    )


def _aligned_difference(
    first: torch.Tensor,
    spectrum_b: torch.Tensor,
    correlation: torch.Tensor,
    flat_a: torch.Tensor,
    flat_b: torch.Tensor,
    *,
    max_shift: float,
    border: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``1 - NCC`` and mean absolute difference of ``first`` and the second image shifted onto it.

    ``first``: ``(P, H, W)`` mean-centred images; ``spectrum_b``: ``rfft2`` of the mean-centred second
    images; ``correlation``: their ``(P, H, W)`` phase-correlation surfaces.
    """
    count, height, width = first.shape
    shift_y, shift_x = _subpixel_peak(correlation)
    shift_y, shift_x = shift_y.clamp(-max_shift, max_shift), shift_x.clamp(-max_shift, max_shift)
    freq_y = torch.fft.fftfreq(height).view(1, height, 1)
    freq_x = torch.fft.rfftfreq(width).view(1, 1, -1)
    phase = -2.0 * torch.pi * (freq_y * shift_y.view(-1, 1, 1) + freq_x * shift_x.view(-1, 1, 1))
    aligned = torch.fft.irfft2(spectrum_b * torch.polar(torch.ones_like(phase), phase), s=(height, width))
    inner_a = first[:, border : height - border, border : width - border].reshape(count, -1)
    inner_b = aligned[:, border : height - border, border : width - border].reshape(count, -1)
    inner_a = inner_a - inner_a.mean(1, keepdim=True)
    inner_b = inner_b - inner_b.mean(1, keepdim=True)
    energy_a, energy_b = inner_a.square().sum(1), inner_b.square().sum(1)
    ncc = 1.0 - (inner_a * inner_b).sum(1) / torch.sqrt(energy_a * energy_b).clamp_min(1e-12)
    ncc = torch.where(flat_a & flat_b, torch.zeros_like(ncc), torch.where(flat_a | flat_b, torch.ones_like(ncc), ncc))
    difference = (inner_a - inner_b).abs().mean(1)
    return ncc.clamp(0.0, 2.0).numpy(), difference.numpy()


def _subpixel_peak(correlation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Location (dy, dx) of each correlation surface's peak, refined by a parabola on each axis.

    ``correlation`` is ``(P, H, W)`` and circular; returned shifts lie in ``(-H/2, H/2]``.
    """
    count, height, width = correlation.shape
    flat = correlation.flatten(1).argmax(1)
    row, col = flat // width, flat % width
    index = torch.arange(count)
    centre = correlation[index, row, col]

    def refine(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        curvature = before - 2.0 * centre + after
        offset = 0.5 * (before - after) / torch.where(curvature < -1e-9, curvature, torch.full_like(curvature, -1.0))
        return torch.where(curvature < -1e-9, offset, torch.zeros_like(offset)).clamp(-0.5, 0.5)

    dy = row.float() + refine(correlation[index, (row - 1) % height, col], correlation[index, (row + 1) % height, col])
    dx = col.float() + refine(correlation[index, row, (col - 1) % width], correlation[index, row, (col + 1) % width])
    dy = torch.where(dy > height / 2, dy - height, dy)
    dx = torch.where(dx > width / 2, dx - width, dx)
    return dy, dx


# -- outputs -------------------------------------------------------------------------------------------
def duplicate_table(ids: np.ndarray, exact: np.ndarray, cluster: np.ndarray, splits: np.ndarray) -> pd.DataFrame:
    """One row per sample (see the module docstring for the columns)."""
    n = len(ids)
    sizes = np.bincount(cluster, minlength=n)[cluster] if n else np.zeros(0, dtype=np.int64)
    in_group = sizes > 1
    codes, _ = pd.factorize(pd.Series(cluster[in_group]), sort=False)
    near_group = np.full(n, -1, dtype=np.int64)
    near_group[in_group] = codes
    frame = pd.DataFrame({"cluster": cluster, "split": splits, "position": np.arange(n)})
    first = frame.groupby("cluster")["position"].transform("min").to_numpy()
    known = frame[frame["split"] != UNSPECIFIED_SPLIT]
    split_count = known.groupby("cluster")["split"].nunique()
    cross = pd.Series(cluster).map(split_count).fillna(0).to_numpy() >= 2
    return pd.DataFrame(
        {
            "id": ids,
            "exact_group": exact.astype(np.int64),
            "near_group": near_group,
            "group_size": sizes.astype(np.int64),
            "is_representative": first == np.arange(n),
            "cross_split": cross,
        }
    )


def pair_table(
    ids: np.ndarray,
    splits: np.ndarray,
    embeddings: np.ndarray,
    phash: np.ndarray | None,
    exact_pairs: np.ndarray,
    near_pairs: np.ndarray,
    measures: dict[str, np.ndarray],
) -> pd.DataFrame:
    """``duplicate_pairs.parquet``: exact pairs (representative → copy) then near pairs.

    ``measures`` maps ``ncc_distance``, ``pixel_difference`` and ``phase_peak`` to their ``(P_near,)``
    values; exact pairs get 0, 0 and 1.
    """
    pairs = np.concatenate([exact_pairs, near_pairs]).astype(np.int64)
    left, right = pairs[:, 0], pairs[:, 1]
    cosine = np.einsum("ij,ij->i", embeddings[left], embeddings[right]) if len(pairs) else np.zeros(0)
    hamming = phash_distance(phash[left], phash[right]) if phash is not None else np.full(len(pairs), -1)
    exact_values = {"ncc_distance": 0.0, "pixel_difference": 0.0, "phase_peak": 1.0}
    frame = pd.DataFrame(
        {
            "id_a": ids[left],
            "id_b": ids[right],
            "kind": ["exact"] * len(exact_pairs) + ["near"] * len(near_pairs),
            "cosine": cosine.astype(np.float32),
            "phash_distance": hamming.astype(np.int64),
        }
    )
    for name, value in exact_values.items():
        frame[name] = np.concatenate([np.full(len(exact_pairs), value, np.float32), measures[name].astype(np.float32)])
    frame["cross_split"] = (
        (splits[left] != splits[right]) & (splits[left] != UNSPECIFIED_SPLIT) & (splits[right] != UNSPECIFIED_SPLIT)
    )
    return frame


def flag_table(
    ids: np.ndarray,
    splits: np.ndarray,
    table: pd.DataFrame,
    exact: np.ndarray,
    near_pairs: np.ndarray,
    ncc: np.ndarray,
    difference: np.ndarray,
    config: Config,
) -> pd.DataFrame:
    """Long flags table: ``exact_duplicate``, ``near_duplicate`` and ``leakage`` rows."""
    rows: list[tuple[str, str, float, str]] = []
    representative = table["is_representative"].to_numpy()
    # exact: every member of a group of identical images; the copy to keep gets a lower severity.
    for _, members in pd.Series(np.arange(len(ids))[exact >= 0]).groupby(exact[exact >= 0]):
        members = members.to_numpy()
        keep = members[0]
        for member in members:
            advice = " (this is the copy to keep)" if member == keep else f"; keep '{ids[keep]}'"
            rows.append(
                (
                    ids[member],
                    "exact_duplicate",
                    0.5 if member == keep else 0.8,
                    f"pixels identical to {_name(ids, splits, members, exclude=member)}{advice}",
                )
            )
    # near: every sample with a confirmed near pair, most similar partner first.
    if len(near_pairs):
        both = np.concatenate([near_pairs, near_pairs[:, ::-1]])
        scores = np.concatenate([ncc, ncc])
        diffs = np.concatenate([difference, difference])
        order = np.lexsort((scores, both[:, 0]))
        frame = pd.DataFrame(
            {"sample": both[order, 0], "partner": both[order, 1], "ncc": scores[order], "diff": diffs[order]}
        )
        for sample, group in frame.groupby("sample", sort=True):
            best = group.iloc[0]
            closeness = 1.0 - float(best["ncc"]) / max(config.max_ncc_distance, 1e-9)
            rows.append(
                (
                    ids[sample],
                    "near_duplicate",
                    round(0.45 + 0.35 * closeness, 4),
                    f"near-identical to {_name(ids, splits, group['partner'].tolist())} (aligned correlation "
                    f"{1.0 - float(best['ncc']):.4f}, mean pixel difference {float(best['diff']) * 255:.1f}/255)"
                    + ("" if representative[sample] else "; another copy of its cluster is kept"),
                )
            )
    # leakage: every sample of a cluster spanning splits, naming its copies in the other splits.
    cross = table["cross_split"].to_numpy()
    cluster = table["near_group"].to_numpy()
    for _, members in pd.Series(np.flatnonzero(cross)).groupby(cluster[cross]):
        members = members.to_numpy()
        for split in pd.unique(splits[members]):
            elsewhere = members[(splits[members] != split) & (splits[members] != UNSPECIFIED_SPLIT)]
            for member in members[splits[members] == split]:
                rows.append(
                    (
                        ids[member],
                        "leakage",
                        1.0,
                        f"duplicate across splits: this '{split}' sample matches {_name(ids, splits, elsewhere)}",
                    )
                )
    if not rows:
        return pd.DataFrame(
            {
                "id": pd.Series(dtype=str),
                "issue": pd.Series(dtype=str),
                "severity": pd.Series(dtype=float),
                "explanation": pd.Series(dtype=str),
            }
        )
    return pd.DataFrame(rows, columns=list(FLAG_COLUMNS))


def _name(ids: np.ndarray, splits: np.ndarray, positions: np.ndarray | list[int], exclude: int = -1) -> str:
    """ "'a' (train), 'b' (test) and 3 more" for sample positions (``exclude`` left out)."""
    positions = np.asarray(positions)
    shown = [p for p in positions[: NAMED_PARTNERS + 1] if p != exclude][:NAMED_PARTNERS]
    total = len(positions) - int((positions == exclude).any())
    named = [f"'{ids[p]}' ({splits[p]})" for p in shown]
    extra = total - len(shown)
    return ", ".join(named) + (f" and {extra} more" if extra > 0 else "")


def _counts(table: pd.DataFrame) -> dict:
    in_exact = table["exact_group"] >= 0
    in_near = table["near_group"] >= 0
    return {
        "exact_groups": int(table.loc[in_exact, "exact_group"].nunique()),
        "samples_in_exact_groups": int(in_exact.sum()),
        "clusters": int(table.loc[in_near, "near_group"].nunique()),
        "samples_in_clusters": int(in_near.sum()),
        "removable": int((in_near & ~table["is_representative"]).sum()),
        "leakage_samples": int(table["cross_split"].sum()),
    }


SPEC = StageSpec(
    name=STAGE,
    config=Config,
    run=run,
    reads=("fingerprints", "embeddings", "thumbnails"),
    writes=("duplicates", "duplicate_pairs", "flags_duplicates"),
    description="exact and near duplicates, their clusters, train/test leakage",
)
