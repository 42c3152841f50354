"""Parallel decoding of workspace images in batches.

Every stage that needs pixels iterates :func:`iter_decoded`: images are decoded by a pool of worker
threads (the decoders release the GIL, so threads scale without the start-up and pickling cost of
processes for small images), several images per task, and yielded in batches, in sample order, the next
batch decoding while the caller works on the current one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from robustlens.analysis.images import DEFAULT_MAX_PIXELS, FileRefused, ImageProblem, read_pixels
from robustlens.analysis.safety import DatasetGuard, RefusedFiles
from robustlens.errors import WorkspaceError

if TYPE_CHECKING:
    import pandas as pd

#: Bytes of decoded pixels a :class:`PixelMemo` keeps by default (70,000 28×28 images take 220 MB).
MEMO_BYTES = 1 << 30


class PixelMemo:
    """Decoded images kept for the next stage of the same run, up to a byte budget.

    ``robustlens analyze`` passes one memo to every stage: the metrics stage decodes each image, and
    the embeddings stage finds the images that fitted in the budget already decoded. Keyed by sample
    index (the sample table cannot change during a run); first come, first kept; thread-safe for the
    decoder threads (dict operations are atomic under the GIL; the byte count is advisory).
    """

    def __init__(self, budget_bytes: int = MEMO_BYTES):
        self.budget_bytes = int(budget_bytes)
        self.used_bytes = 0
        self._images: dict[int, np.ndarray] = {}

    def get(self, index: int) -> np.ndarray | None:
        return self._images.get(index)

    def offer(self, index: int, pixels: np.ndarray) -> None:
        if index not in self._images and self.used_bytes + pixels.nbytes <= self.budget_bytes:
            pixels.setflags(write=False)  # shared between stages: nobody may change it in place
            self._images[index] = pixels
            self.used_bytes += pixels.nbytes

    def __len__(self) -> int:
        return len(self._images)


#: Most images one decoding task handles.
TASK_IMAGES = 32


#: Float values a batch aims at when its size is chosen from the images' size (16 MiB of float32).
BATCH_VALUES = 1 << 22


def auto_batch_size(samples: pd.DataFrame, *, smallest: int = 64, largest: int = 4096) -> int:
    """Images per batch for ``samples`` (the sample table): about :data:`BATCH_VALUES` pixel values.

    Small images in large batches spread the fixed cost of each tensor operation and cache chunk over
    many images (28×28 grayscale: 4,096 per batch); large photos stay at a few dozen per batch.
    """
    if len(samples) == 0:
        return smallest
    return int(min(largest, max(smallest, BATCH_VALUES // max(1, _typical_values(samples)))))


def _typical_values(samples: pd.DataFrame) -> int:
    """Median pixel values per image (width × height × channels) of the sample table."""
    return int(
        np.median(
            samples["width"].to_numpy(np.int64)
            * samples["height"].to_numpy(np.int64)
            * samples["channels"].to_numpy(np.int64)
        )
    )


#: Pixel values (median over the dataset) up to which images count as tiny: decoding one costs less
#: than the Python around it, so extra decoder threads only contend for the GIL (70,000 28×28 PNGs:
#: 2.5 s on one thread, 3.1 s on two).
TINY_IMAGE_VALUES = 4096


def decode_workers(samples: pd.DataFrame) -> int:
    """Decoder threads for ``samples``: one for tiny images, else :func:`default_workers`."""
    if len(samples) == 0:
        return 1
    return 1 if _typical_values(samples) <= TINY_IMAGE_VALUES else default_workers()


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


def stacks_by_shape(
    pixels: Sequence[np.ndarray],
    *,
    max_values: int | None = None,
) -> Iterator[tuple[list[int], np.ndarray]]:
    """Decoded images grouped by shape: ``(positions, stack)`` with ``stack`` ``(b, H, W, C)`` float32.

    Batch tensor work runs once per group instead of once per image; with ``max_values`` a group is
    split so that no stack holds more values than that (memory for large images, cache for small ones).
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for position, image in enumerate(pixels):
        groups.setdefault(tuple(image.shape), []).append(position)
    for shape, members in groups.items():
        per_stack = len(members) if max_values is None else max(1, max_values // math.prod(shape))
        for offset in range(0, len(members), per_stack):
            rows = members[offset : offset + per_stack]
            yield rows, np.stack([np.asarray(pixels[row], dtype=np.float32) for row in rows])


class DatasetFileError(ImageProblem, WorkspaceError):
    """A dataset file that became unusable since ingest (unreadable, outside the root, changed): an
    :class:`ImageProblem` for code that handles bad images, and a :class:`WorkspaceError` so the CLI prints the
    message (exit 1) instead of a traceback. ``kind``: ``outside_root``, ``changed_since_init`` or ``unreadable``."""

    def __init__(self, reason: str, *, kind: str = "unreadable"):
        super().__init__(reason)
        self.kind = kind


def _every_outside(root: str, paths: Sequence[str], order: np.ndarray, limit: int = 10) -> DatasetFileError:
    guard = DatasetGuard(root)
    found = []
    for index in dict.fromkeys(order.tolist()):
        try:
            guard.resolve(paths[index])
        except FileRefused as problem:
            found.append(f"{os.path.join(root, paths[index])}: {problem.reason}")
    shown = "; ".join(found[:limit]) + (f"; … {len(found) - limit} more" if len(found) > limit else "")
    return DatasetFileError(f"{len(found)} dataset file(s) refused: {shown}", kind="outside_root")


def iter_decoded(
    root: str | Path,
    paths: Sequence[str],
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 512,
    workers: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = False,
    desc: str = "Decoding",
    memo: PixelMemo | None = None,
    expected_hashes: Sequence[str] | None = None,
    refused: RefusedFiles | None = None,
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """Yield ``(indices, pixels)`` batches.

    Every file is read through :class:`~robustlens.analysis.safety.DatasetGuard`: its real path is checked
    against the dataset root before it is opened, so a file that now resolves outside the root — a symlink
    swapped in after ``init`` — is never read (no extra system call per ordinary file).

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
    memo:
        Images found there are not decoded again; decoded ones are offered to it. Arrays taken from
        or given to a memo are read-only.
    expected_hashes:
        Content hashes of all samples (``samples.parquet`` ``content_hash``, same order as ``paths``): a file
        whose bytes hash differently is "changed since init" and its pixels are not used. The bytes are hashed
        in memory as they are decoded (no second read).
    refused:
        Where refused files go. Given: refused samples (outside the root, changed since init) are left out of
        the yielded batches (a batch may then be shorter, or empty) and recorded there. ``None``: the first
        refused sample raises :class:`DatasetFileError` naming it.

    Yields
    ------
    indices:
        ``(B,)`` int64 sample indices of the batch.
    pixels:
        ``B`` arrays of shape ``(H, W, C)``, float32 in ``[0, 1]``. An image that became unreadable since
        ingest raises :class:`DatasetFileError` (an :class:`ImageProblem`) naming its path.
    """
    root_text = str(root)
    order = np.arange(len(paths), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    workers = workers or default_workers()
    guard = DatasetGuard(root_text)

    def decode(index: int) -> np.ndarray | None:
        if memo is not None:
            known = memo.get(index)
            if known is not None:
                return known
        path = os.path.join(root_text, paths[index])
        expected = None if expected_hashes is None else expected_hashes[index]
        try:
            pixels = guard.read(
                paths[index],
                lambda real: read_pixels(real, max_pixels=max_pixels, expected_hash=expected, no_follow=True),
            )
        except FileRefused as problem:
            if refused is None:
                raise DatasetFileError(f"{path}: {problem.reason}", kind=problem.kind) from problem
            refused.add(index, paths[index], problem)
            return None
        except ImageProblem as problem:
            raise DatasetFileError(
                f"{path}: {problem.reason} (it was readable at ingest; re-run 'robustlens init --force')"
            ) from problem
        if memo is not None:
            memo.offer(index, pixels)
        return pixels

    def decode_all(chunk: list[int]) -> list[np.ndarray | None]:
        return [decode(index) for index in chunk]

    # Small tasks of several images: one future per image costs ~20 µs of Python each, as much as
    # decoding a small PNG, and makes the threads fight over the GIL.
    task = max(1, min(TASK_IMAGES, -(-batch_size // (2 * workers))))

    def submit(pool: ThreadPoolExecutor, batch: np.ndarray) -> list:
        items = batch.tolist()
        return [pool.submit(decode_all, items[i : i + task]) for i in range(0, len(items), task)]

    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="robustlens-decode")
    try:
        with tqdm(total=len(order), desc=desc, unit="img", disable=not progress) as bar:
            pending = submit(pool, batches[0]) if batches else []
            for number, batch in enumerate(batches):
                current = pending
                # The next batch decodes while the caller works on this one.
                pending = submit(pool, batches[number + 1]) if number + 1 < len(batches) else []
                try:
                    pixels = [image for future in current for image in future.result()]
                except DatasetFileError as error:
                    if error.kind != "outside_root":
                        raise
                    # Name every file that leads outside, not just the first: one lstat each, nothing read.
                    raise _every_outside(root_text, paths, order) from error
                bar.update(len(batch))
                if any(image is None for image in pixels):
                    kept = [position for position, image in enumerate(pixels) if image is not None]
                    batch, pixels = batch[kept], [pixels[position] for position in kept]
                yield batch, pixels
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
