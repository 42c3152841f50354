"""Parallel decoding of workspace images in batches.

Every stage that needs pixels iterates :func:`iter_decoded`: images are decoded by a pool of worker
threads (Pillow releases the GIL while decoding, so threads scale without the start-up and pickling cost
of processes for small images) and yielded in batches, in sample order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from robustlens.analysis.images import DEFAULT_MAX_PIXELS, ImageProblem, read_image


def default_workers() -> int:
    """Decoding threads: one per core, at least 2."""
    return max(2, os.cpu_count() or 2)


def compute_threads() -> int:
    """Torch threads while images are decoded concurrently: one core is left to the decoder threads.

    Measured on the project's 2-core machine: with 2 torch threads competing with the decoding threads,
    the sample CNN ran at ~290 µs/image and the pixel descriptor at ~220 µs/image; with 1 thread at
    ~37 and ~48 µs/image (OpenMP workers spin-waiting for a busy core).
    """
    return max(1, (os.cpu_count() or 1) - 1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, restoring the previous setting after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def iter_decoded(root: str | Path, paths: Sequence[str], indices: Sequence[int] | None = None, *,
                 batch_size: int = 512, workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 progress: bool = False, desc: str = "Decoding") -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield ``(indices, pixels)`` batches.

    Parameters
    ----------
    root:
        Dataset root the ``paths`` are relative to.
    paths:
        Relative image paths of all samples (``samples.parquet`` order).
    indices:
        Which samples to decode (default: all), in the order they are yielded.
    batch_size:
        Images per yielded batch.
    workers:
        Decoding threads (default :func:`default_workers`).
    max_pixels:
        Decompression-bomb cap, as at ingest.

    Yields
    ------
    indices:
        ``(B,)`` int64 sample indices of the batch.
    pixels:
        ``B`` arrays of shape ``(H, W, C)``, float32 in ``[0, 1]``. An image that became unreadable since
        ingest raises :class:`ImageProblem` naming its path.
    """
    root = Path(root)
    order = np.arange(len(paths), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)

    def decode(index: int) -> np.ndarray:
        path = paths[index]
        try:
            return read_image(root / path, max_pixels=max_pixels).pixels
        except ImageProblem as problem:
            raise ImageProblem(f"{root / path}: {problem.reason} (it was readable at ingest; re-run "
                               "'robustlens init --force')") from problem

    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool, \
            tqdm(total=len(order), desc=desc, unit="img", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            pixels = list(pool.map(decode, batch.tolist()))
            bar.update(len(batch))
            yield batch, pixels
