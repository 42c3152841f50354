"""Scan an image dataset: an ImageFolder tree or a manifest table.

Result: one row per usable image with a stable string ``id`` (the manifest's ``id`` column, else the
image path relative to the dataset root, POSIX style), plus an ingest report of what was skipped.
Unreadable images are skipped and reported; structural problems (missing columns, paths escaping the
root, missing files, duplicate ids, ids longer than the curation database holds, an empty dataset) raise
:class:`ValidationError`.
"""

from __future__ import annotations

import itertools
import os
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from robustlens.analysis.images import DEFAULT_MAX_PIXELS, SUPPORTED_EXTENSIONS, ImageProblem, is_supported, read_image
from robustlens.analysis.ingest.tables import first_rows, read_table
from robustlens.errors import ValidationError

#: Columns robustlens owns in ``samples.parquet``; manifest columns with other names become metadata.
CORE_COLUMNS = (
    "id",
    "path",
    "label",
    "label_index",
    "split",
    "width",
    "height",
    "mode",
    "channels",
    "bit_depth",
    "file_size",
    "content_hash",
)
MANIFEST_COLUMNS = ("id", "path", "label", "split")
METADATA_PREFIX = "meta."
UNSPECIFIED_SPLIT = "unspecified"


@dataclass
class DatasetScan:
    """Outcome of :func:`scan_dataset`.

    Attributes
    ----------
    samples:
        One row per usable image: the :data:`CORE_COLUMNS` except ``label_index`` (assigned once the
        class order is known), then ``meta.<name>`` metadata columns.
    order:
        Ids of every listed image in manifest order (sorted paths for an ImageFolder), unreadable
        ones included: ``.npy`` inputs are aligned to this order.
    skipped:
        ``{"id", "path", "reason"}`` for each image left out.
    ignored_files:
        Files in an ImageFolder tree that are not images of a supported format.
    kind:
        ``"imagefolder"`` or ``"manifest"``.
    """

    samples: pd.DataFrame
    order: list[str]
    skipped: list[dict] = field(default_factory=list)
    ignored_files: list[str] = field(default_factory=list)
    kind: str = "imagefolder"
    warnings: list[str] = field(default_factory=list)


def scan_dataset(
    root: str | Path,
    manifest: str | Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
) -> DatasetScan:
    """Scan and verify a dataset.

    Parameters
    ----------
    root:
        Dataset root directory. Without ``manifest`` it must hold ``<class>/<image>`` (ImageFolder).
    manifest:
        CSV or Parquet table with ``path`` (relative to ``root``) and ``label``; optional ``split``
        and ``id``; other columns are kept as metadata.
    max_pixels:
        Images with more pixels are skipped as possible decompression bombs.
    workers:
        Decoding threads (default: the number of CPU cores).
    progress:
        Show a progress bar while images are verified.
    """
    root = Path(root)
    if not root.exists():
        raise ValidationError("dataset root not found", file=root)
    if not root.is_dir():
        raise ValidationError("dataset root must be a directory", file=root)
    real_root = Path(os.path.realpath(root))
    warnings: list[str] = []
    if manifest is None:
        listing, ignored, skipped, warnings = _list_imagefolder(root, real_root)
        _check_id_sizes(listing["id"], file=None, column=None, root=root)
        kind = "imagefolder"
    else:
        listing = _list_manifest(Path(manifest), root, real_root)
        ignored, skipped = [], []
        kind = "manifest"
    if listing.empty and not skipped:
        source = manifest if manifest is not None else root
        raise ValidationError(
            "empty dataset: no images listed"
            if manifest is not None
            else "empty dataset: no images found under <class>/ folders "
            f"(supported: {', '.join(sorted(SUPPORTED_EXTENSIONS))})",
            file=source,
        )
    order = listing["id"].tolist()

    records, problems = _verify_images(root, listing, max_pixels=max_pixels, workers=workers, progress=progress)
    for row_index, reason in problems:
        skipped.append({"id": listing.at[row_index, "id"], "path": listing.at[row_index, "path"], "reason": reason})
    good = listing.drop(index=[i for i, _ in problems])
    if good.empty:
        raise ValidationError(
            f"empty dataset: none of the {len(listing)} listed images could be read "
            f"(first problem: {skipped[0]['path']}: {skipped[0]['reason']})",
            file=manifest if manifest is not None else root,
        )
    record_frame = pd.DataFrame([records[i] for i in good.index], index=good.index)
    samples = pd.concat(
        [good[["id", "path", "label", "split"]], record_frame, good.drop(columns=["id", "path", "label", "split"])],
        axis=1,
    )
    samples = samples.reset_index(drop=True)
    if skipped:
        listed = "; ".join(f"{entry['path']} ({entry['reason']})" for entry in skipped[:5])
        more = f"; … {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.append(f"{len(skipped)} image(s) skipped (listed in ingest_report.json): {listed}{more}")
    return DatasetScan(
        samples=samples, order=order, skipped=skipped, ignored_files=ignored, kind=kind, warnings=warnings
    )


#: Images verified per thread-pool task.
VERIFY_CHUNK = 64
#: Mean seconds per image (first chunk) below which verification runs on one thread.
SMALL_IMAGE_SECONDS = 150e-6


def _inside(real_root: Path, candidate: Path) -> bool:
    real = Path(os.path.realpath(candidate))
    return real == real_root or real_root in real.parents


def _overlaps(real: str, other: str) -> bool:
    """Whether folder ``real`` is ``other``, inside it, or holds it (one would reach the other's files)."""
    return (
        real == other
        or real.startswith(other.rstrip(os.sep) + os.sep)
        or other.startswith(real.rstrip(os.sep) + os.sep)
    )


def _list_imagefolder(root: Path, real_root: Path) -> tuple[pd.DataFrame, list[str], list[dict], list[str]]:
    """List ``<class>/<image>`` files once each.

    A class folder that is a symlink to the root, to another class folder or into one (a loop, or the
    same files reached twice) is left out with a warning: its files are ingested once, under their real
    folder's class. (A single image symlinked inside the root is kept: a deliberate alias, which the
    duplicates stage reports.)
    """
    rows, ignored, skipped, warnings = [], [], [], []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for loose in sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        ignored.append(loose.name)
    # Real folders first, so a symlinked duplicate never wins over the folder it points to.
    real_of = {d: os.path.realpath(d) for d in class_dirs}
    scanned: dict[str, str] = {}  # real path -> class folder name it was listed under
    for class_dir in sorted(class_dirs, key=lambda d: (d.is_symlink(), d.name)):
        if not _inside(real_root, class_dir):
            skipped.append(
                {
                    "id": class_dir.name + "/",
                    "path": class_dir.name + "/",
                    "reason": "folder is a symlink pointing outside the dataset root",
                }
            )
            continue
        real = real_of[class_dir]
        clash = [name for other, name in scanned.items() if _overlaps(real, other)]
        if real == str(real_root) or clash:
            target = (
                "the dataset root itself (a symlink loop)"
                if real == str(real_root)
                else f"the same files as class folder '{clash[0]}'"
            )
            warnings.append(
                f"class folder '{class_dir.name}' is a symlink to {target}; its images are ingested "
                "once, under their real folder, not again as class "
                f"'{class_dir.name}'"
            )
            continue
        scanned[real] = class_dir.name
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath) / name
                rel = full.relative_to(root).as_posix()
                if not is_supported(name):
                    ignored.append(rel)
                    continue
                if full.is_symlink() and not _inside(real_root, full):
                    skipped.append({"id": rel, "path": rel, "reason": "symlink pointing outside the dataset root"})
                    continue
                rows.append({"id": rel, "path": rel, "label": class_dir.name, "split": UNSPECIFIED_SPLIT})
    return pd.DataFrame(rows, columns=["id", "path", "label", "split"]), ignored, skipped, warnings


def _list_manifest(manifest: Path, root: Path, real_root: Path) -> pd.DataFrame:
    table = read_table(manifest, text_columns=MANIFEST_COLUMNS)
    for required in ("path", "label"):
        if required not in table.columns:
            raise ValidationError(
                f"required column '{required}' is missing (columns present: {list(table.columns)})",
                file=manifest,
                column=required,
            )
    if table.empty:
        raise ValidationError("empty dataset: the manifest has a header but no rows", file=manifest)
    for column in ("path", "label") + (("id",) if "id" in table.columns else ()):
        blank = table[column].isna() | (table[column].astype("string").str.strip() == "")
        if blank.any():
            raise ValidationError(
                f"empty value (rows {first_rows(blank)})", file=manifest, row=first_rows(blank)[0], column=column
            )
    paths = table["path"].astype(str)
    resolver = _Resolver(root, real_root)
    for number, raw in enumerate(paths, start=1):
        problem = _path_problem(raw, resolver)
        if problem:
            raise ValidationError(f"path '{raw}' {problem}", file=manifest, row=number, column="path")
    root_text = str(root)
    missing = [n for n, raw in enumerate(paths, start=1) if not os.path.isfile(os.path.join(root_text, raw))]
    if missing:
        raise ValidationError(
            f"{len(missing)} listed image(s) do not exist under {root} "
            f"(rows {missing[:5]}, first: '{paths.iloc[missing[0] - 1]}')",
            file=manifest,
            row=missing[0],
            column="path",
        )
    ids = table["id"].astype(str).str.strip() if "id" in table.columns else paths.map(_normalise)
    _check_id_sizes(ids, file=manifest, column="id" if "id" in table.columns else "path")
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        rows = first_rows(duplicated)
        column = "id" if "id" in table.columns else "path"
        raise ValidationError(
            f"duplicate ids: '{ids.iloc[rows[0] - 1]}' appears in rows {rows} (every sample needs a unique id)",
            file=manifest,
            row=rows[0],
            column=column,
        )
    split = (
        table["split"].astype("string").fillna(UNSPECIFIED_SPLIT).str.strip()
        if "split" in table.columns
        else pd.Series(UNSPECIFIED_SPLIT, index=table.index)
    )
    listing = pd.DataFrame(
        {
            "id": ids.astype(str),
            "path": paths.map(_normalise),
            "label": table["label"].astype(str).str.strip(),
            "split": split.astype(str),
        }
    )
    for column in table.columns:
        if column not in MANIFEST_COLUMNS:
            listing[METADATA_PREFIX + column] = table[column].to_numpy()
    return listing


def _check_id_sizes(ids: pd.Series, *, file: Path | None, column: str | None, root: Path | None = None) -> None:
    """Refuse sample ids longer than the curation database holds (:data:`~robustlens.analysis.curation.
    MAX_SAMPLE_ID_BYTES` bytes of UTF-8), before anything is written: such a sample could never be tagged,
    collected or reviewed (PostgreSQL cannot index the key).

    ``ids`` in manifest order; the error names the manifest row and column (``file``), or, for an
    ImageFolder tree (``file`` is ``None``), the image file under ``root``.
    """
    from robustlens.analysis.curation import MAX_SAMPLE_ID_BYTES

    # At most 4 bytes per character: only ids longer than a quarter of the limit need encoding.
    long = ids.str.len() > MAX_SAMPLE_ID_BYTES // 4
    if not long.any():
        return
    sizes = ids[long].map(lambda sid: len(sid.encode("utf-8", "surrogatepass")))
    over = sizes[sizes > MAX_SAMPLE_ID_BYTES]
    if over.empty:
        return
    position = ids.index.get_loc(over.index[0])
    sample_id, size = ids.iloc[position], int(over.iloc[0])
    shown = sample_id if len(sample_id) <= 60 else sample_id[:57] + "..."
    message = (
        f"sample id '{shown}' is {size:,} bytes in UTF-8; the curation database holds ids of at most "
        f"{MAX_SAMPLE_ID_BYTES:,} bytes ({len(over):,} id(s) too long"
    )
    if file is None:
        raise ValidationError(message + "): shorten the folder or file name", file=(root or Path()) / sample_id)
    hint = "shorten the id" if column == "id" else "give the images shorter paths or add a shorter 'id' column"
    raise ValidationError(
        f"{message}, rows {first_rows(ids.index.isin(over.index))}): {hint}", file=file, row=position + 1, column=column
    )


def _normalise(raw: str) -> str:
    """``PurePosixPath(raw).as_posix()``, skipping the path object for the usual already-clean path."""
    if "//" in raw or "/./" in raw or raw.startswith("./") or raw.endswith(("/", "/.")) or raw in ("", "."):
        return PurePosixPath(raw).as_posix()
    return raw


class _Resolver:
    """Whether relative paths resolve inside the dataset root, resolving each folder only once.

    ``realpath`` per listed file took ~60 µs (4 s for 70,000 rows); a file's real path is its folder's
    real path plus its name unless the file itself is a symlink, so one ``lstat`` per file suffices.
    """

    def __init__(self, root: Path, real_root: Path):
        self.root = str(root)
        self.real_root = str(real_root)
        self._folders: dict[str, str] = {}

    def inside(self, raw: str) -> bool:
        full = os.path.join(self.root, raw)
        folder, name = os.path.split(full)
        real_folder = self._folders.get(folder)
        if real_folder is None:
            real_folder = self._folders[folder] = os.path.realpath(folder)
        real = os.path.realpath(full) if os.path.islink(full) else os.path.join(real_folder, name)
        return real == self.real_root or real.startswith(self.real_root.rstrip(os.sep) + os.sep)


def _path_problem(raw: str, resolver: _Resolver) -> str | None:
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or raw.startswith("\\"):
        return "is absolute; paths must be relative to the dataset root"
    if ".." in raw.split("/"):  # = PurePosixPath(raw).parts, without a path object per row
        return "contains '..' and would leave the dataset root"
    if not resolver.inside(raw):
        return "resolves (through a symlink) to a place outside the dataset root"
    return None


#: Pixels (width × height) decoded at once across all verification threads, whatever ``--workers`` is.
#: Decoding an RGB PNG peaks at ~27 bytes per pixel (measured: file bytes, uint8 and float32 copies), so
#: 64 Mi pixels is ~1.7 GB. An image larger than the budget decodes alone (the ``max_pixels`` cap bounds
#: it): three 9400 × 9400 PNGs with 4 workers peaked at 4.6 GB RSS without the budget, 2.6 GB with it.
DECODE_PIXEL_BUDGET = 64 * 2**20


class PixelBudget:
    """A counting semaphore over pixels: ``with budget.hold(n):`` waits until ``n`` more pixels fit."""

    def __init__(self, pixels: int):
        self.pixels = pixels
        self.in_use = 0
        self.peak = 0
        self._condition = threading.Condition()

    def acquire(self, pixels: int) -> None:
        with self._condition:
            while self.in_use and self.in_use + pixels > self.pixels:
                self._condition.wait()
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)

    def release(self, pixels: int) -> None:
        with self._condition:
            self.in_use -= pixels
            self._condition.notify_all()


def header_pixels(path: Path) -> int:
    """``width * height`` from an image file's header without decoding it (0 when it cannot be read).

    PNG: the IHDR chunk (first 24 bytes); other formats: Pillow's lazy open, which parses the header only.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(24)
        if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
            width, height = struct.unpack(">II", head[16:24])
            return width * height
        from PIL import Image

        with Image.open(path) as image:
            return image.width * image.height
    except Exception:  # noqa: BLE001 - an unreadable header is the decoder's to report, with its reason
        return 0


def _verify_images(
    root: Path,
    listing: pd.DataFrame,
    *,
    max_pixels: int,
    workers: int | None,
    progress: bool,
    pixel_budget: int | None = None,
) -> tuple[dict, list[tuple[int, str]]]:
    budget: PixelBudget | None = None

    def verify(item: tuple[int, str]) -> tuple[int, Any, str | None]:
        index, rel = item
        held = 0
        if budget is not None:
            held = min(header_pixels(root / rel), max_pixels + 1)
            budget.acquire(held)
        try:
            return index, read_image(root / rel, max_pixels=max_pixels).record, None
        except ImageProblem as problem:
            return index, None, problem.reason
        finally:
            if budget is not None:
                budget.release(held)

    def verify_all(chunk: list[tuple[int, str]]) -> list:
        return [verify(item) for item in chunk]

    records: dict = {}
    problems: list[tuple[int, str]] = []
    items = list(zip(listing.index, listing["path"], strict=True))
    # Several images per task: ThreadPoolExecutor.map ignores ``chunksize``, and one future per small
    # image costs as much as decoding it.
    chunks = [items[start : start + VERIFY_CHUNK] for start in range(0, len(items), VERIFY_CHUNK)]

    def timed_first_chunk() -> list:
        # Measured, not guessed: when an image decodes in less time than the Python around it (small
        # PNGs), more threads only contend for the GIL (70,000 28x28 PNGs: 3.1 s on 1 thread, 5.2 s on 2).
        # The first image pays one-off costs (imports, cold caches), so it is left out of the timing.
        nonlocal workers
        results = verify_all(chunks[0][:1])
        start = time.perf_counter()
        results += verify_all(chunks[0][1:])
        if (
            workers is None
            and len(chunks[0]) > 1
            and (time.perf_counter() - start) / (len(chunks[0]) - 1) < SMALL_IMAGE_SECONDS
        ):
            workers = 1
        return results

    with tqdm(total=len(items), desc="Verifying images", unit="img", disable=not progress) as bar:
        first = [timed_first_chunk()] if chunks else []
        threads = workers or os.cpu_count() or 2
        if threads > 1:
            # Several decodes at once: bound their memory (one thread needs no budget).
            budget = PixelBudget(pixel_budget or DECODE_PIXEL_BUDGET)
        pool = ThreadPoolExecutor(max_workers=threads)
        with pool:
            for results in itertools.chain(first, pool.map(verify_all, chunks[1:])):
                bar.update(len(results))
                for index, record, reason in results:
                    if reason is None:
                        records[index] = {
                            "width": record.width,
                            "height": record.height,
                            "mode": record.mode,
                            "channels": record.channels,
                            "bit_depth": record.bit_depth,
                            "file_size": record.file_size,
                            "content_hash": record.content_hash,
                        }
                    else:
                        problems.append((index, reason))
    return records, problems
