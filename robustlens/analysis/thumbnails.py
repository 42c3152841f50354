"""Thumbnails: made once per image content and kept on disk, so a page of the grid never re-encodes images.

A thumbnail lives at ``WORKSPACE/thumbnails/<content_hash>.jpg`` (the hash of the image file's bytes, from
``samples.parquet``), so a renamed image reuses its thumbnail and an edited one gets a new one. Files are
written atomically; two dashboard sessions making the same thumbnail at once both end with a complete file.

JPEG, not WebP: Streamlit sends JPEG / PNG bytes to the browser as they are but decodes and re-encodes
any other format on every rerun, which is exactly the work the cache is there to avoid.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from robustlens.analysis import storage
from robustlens.analysis.images import FileRefused, ImageProblem, read_image
from robustlens.analysis.safety import DatasetGuard, RefusedFiles
from robustlens.analysis.workspace import Workspace

THUMBNAIL_DIR = "thumbnails"
#: Longest side of a thumbnail in pixels.
THUMBNAIL_SIZE = 160
#: Images smaller than this are enlarged with nearest-neighbour sampling, so small images stay crisp.
MIN_SIDE = 112
QUALITY = 85
THUMBNAIL_FORMAT = "jpg"


def thumbnail_path(workspace: Workspace, content_hash: str) -> Path:
    """Where the thumbnail of an image with ``content_hash`` is stored."""
    if not content_hash or any(ch in content_hash for ch in "/\\."):
        raise ValueError(f"invalid content hash {content_hash!r}")
    return workspace.root / THUMBNAIL_DIR / f"{content_hash}.{THUMBNAIL_FORMAT}"


def make_thumbnail(
    source: str | Path, *, size: int = THUMBNAIL_SIZE, expected_hash: str | None = None, no_follow: bool = False
) -> bytes:
    """JPEG bytes of ``source`` scaled to fit ``size``×``size`` (aspect kept; alpha over white).

    ``expected_hash`` and ``no_follow`` as in :func:`robustlens.analysis.images.read_pixels`.

    Raises
    ------
    ImageProblem
        The image cannot be decoded (see :func:`robustlens.analysis.images.read_image`);
        :class:`~robustlens.analysis.images.FileRefused` if it changed since ``expected_hash`` was recorded.
    """
    pixels = read_image(source, expected_hash=expected_hash, no_follow=no_follow).pixels
    array = np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(array[..., 0], "L") if array.shape[2] == 1 else Image.fromarray(array, "RGB")
    longest = max(image.size)
    if longest > size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    elif longest < MIN_SIDE:
        factor = max(1, MIN_SIDE // longest)
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY, optimize=True)
    return buffer.getvalue()


def ensure_thumbnail(
    workspace: Workspace,
    relative_path: str,
    content_hash: str,
    *,
    guard: DatasetGuard | None = None,
    refused: RefusedFiles | None = None,
    index: int = -1,
) -> Path | None:
    """Path of the cached thumbnail, made now if missing; ``None`` if the image cannot be read any more.

    The image is resolved through ``guard`` (default: a new :class:`~robustlens.analysis.safety.DatasetGuard`
    on the dataset root) and its bytes checked against ``content_hash``: a file that now resolves outside the
    dataset root is not read, one whose content changed since init is not shown (its thumbnail would be stored
    under the old hash). Either gives ``None`` and, with ``refused``, an entry there (sample ``index``).
    """
    target = thumbnail_path(workspace, content_hash)
    if target.exists():
        return target
    guard = guard or DatasetGuard(workspace.dataset_root)
    try:
        data = guard.read(relative_path, lambda real: make_thumbnail(real, expected_hash=content_hash, no_follow=True))
    except FileRefused as problem:
        if refused is not None:
            refused.add(index, relative_path, problem)
        return None
    except ImageProblem:
        return None
    storage.write_bytes(target, data)
    return target


def ensure_thumbnails(
    workspace: Workspace, items: Iterable[tuple[str, str]], *, workers: int = 4, refused: RefusedFiles | None = None
) -> list[Path | None]:
    """:func:`ensure_thumbnail` for ``(relative_path, content_hash)`` pairs, missing ones made in parallel.

    ``refused`` collects the images refused (outside the dataset root, changed since init), indexed by their
    position in ``items``.
    """
    items = list(items)
    targets = [thumbnail_path(workspace, h) for _, h in items]
    missing = [i for i, target in enumerate(targets) if not target.exists()]
    paths: list[Path | None] = list(targets)
    if missing:
        guard = DatasetGuard(workspace.dataset_root)  # one per call: a folder swapped later is seen next time
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(missing)))) as pool:
            made = pool.map(
                lambda i: ensure_thumbnail(workspace, *items[i], guard=guard, refused=refused, index=i), missing
            )
            for i, path in zip(missing, made, strict=True):
                paths[i] = path
    return paths
