"""Safe image decoding.

Every image the engine touches goes through :func:`read_image`: it reads the file once, refuses
zero-byte, corrupt, truncated and oversized files with an :class:`ImageProblem` that says why, and
returns pixels as ``float32`` in ``[0, 1]`` with shape ``(H, W, C)``, ``C`` = 1 (grayscale) or 3 (RGB).

Mode handling: 1-bit, 8-bit and 16-bit grayscale (``1``, ``L``, ``I;16``, ``I``, ``F``) stay one
channel, scaled by their bit depth; palette images are expanded; alpha (``LA``, ``RGBA``, palette
transparency) is composited over white, as a browser shows it; CMYK / YCbCr / LAB are converted to RGB.

Speed: the common 8-bit PNG (grayscale, RGB or RGBA, no palette, no ``tRNS`` chunk) is decoded by
OpenCV's libpng binding, which needs no Python per row and releases the GIL; Pillow spends most of a small
image's decode time in Python (chunk parsing, plugin dispatch), ~40-70 µs for a 28×28 PNG against ~15 µs.
PNG is lossless, so both give the same pixels (tested); any file the fast path does not take, or fails on,
goes through Pillow, whose checks and messages apply unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

SUPPORTED_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"})

#: Default cap on width × height, the same as Pillow's own decompression-bomb threshold.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageProblem(Exception):
    """An image that cannot be used; ``reason`` is a short human-readable cause."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class FileRefused(ImageProblem):
    """A dataset file robustlens refuses to use: ``kind`` is ``"outside_root"`` (it now resolves outside the
    dataset root, so it was not read) or ``"changed_since_init"`` (its bytes no longer have the content hash
    recorded at ingest, so its pixels were not used). ``"symlink"``: a ``no_follow`` read met a symlink, which
    :meth:`robustlens.analysis.safety.DatasetGuard.read` then resolves and checks."""

    def __init__(self, reason: str, *, kind: str):
        super().__init__(reason)
        self.kind = kind


@dataclass(frozen=True)
class ImageRecord:
    """What ingestion keeps about one decoded image."""

    width: int
    height: int
    mode: str
    channels: int
    bit_depth: int
    file_size: int
    content_hash: str


@dataclass(frozen=True)
class DecodedImage:
    """Pixels (``float32``, ``(H, W, C)``, values in ``[0, 1]``) plus the record of the file."""

    pixels: np.ndarray
    record: ImageRecord


def is_supported(path: str | Path) -> bool:
    """Whether ``path`` has one of the :data:`SUPPORTED_EXTENSIONS` (case-insensitive)."""
    return Path(path).suffix.lower() in SUPPORTED_EXTENSIONS


def read_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, expected_hash: str | None = None, no_follow: bool = False
) -> DecodedImage:
    """Read, verify and decode one image file.

    Parameters
    ----------
    path:
        Image file (PNG, JPEG, WebP, BMP or TIFF).
    max_pixels:
        Largest accepted ``width * height``; larger images are refused before their pixels are
        decoded (decompression bombs).
    expected_hash, no_follow:
        As in :func:`read_pixels`.

    Raises
    ------
    ImageProblem
        Zero-byte, unreadable, corrupt, truncated or oversized file; :class:`FileRefused` for a changed file
        or a swapped-in symlink.
    """
    data = _read_bytes(path, no_follow=no_follow)
    content_hash = hashlib.sha256(data).hexdigest()
    if expected_hash is not None and content_hash != expected_hash:
        check_hash(data, expected_hash)
    pixels, mode, bit_depth = _decode(data, max_pixels)
    height, width = pixels.shape[:2]
    record = ImageRecord(
        width=int(width),
        height=int(height),
        mode=mode,
        channels=int(pixels.shape[2]),
        bit_depth=bit_depth,
        file_size=len(data),
        content_hash=content_hash,
    )
    return DecodedImage(pixels=pixels, record=record)


def read_pixels(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, expected_hash: str | None = None, no_follow: bool = False
) -> np.ndarray:
    """Just the pixels of :func:`read_image` (same values, same errors), without the record: for stages that
    re-read images already validated at ingest.

    Parameters
    ----------
    expected_hash:
        The content hash recorded at ingest: bytes with another SHA-256 raise :class:`FileRefused`
        (``changed_since_init``) before they are decoded. Hashing the bytes already in memory costs ~1 µs per
        KB (no second read of the file).
    no_follow:
        Refuse to open ``path`` if it is a symlink (``O_NOFOLLOW``, where the OS has it): for a path
        already resolved by :class:`~robustlens.analysis.safety.DatasetGuard`, a symlink swapped in between
        the check and the read is not followed.
    """
    data = _read_bytes(path, no_follow=no_follow)
    check_hash(data, expected_hash)
    return _decode(data, max_pixels)[0]


def read_verified_bytes(path: str | Path, *, expected_hash: str | None = None, no_follow: bool = False) -> bytes:
    """The bytes of ``path`` (undecoded), with the checks of :func:`read_pixels`: for copying a dataset file."""
    data = _read_bytes(path, no_follow=no_follow)
    check_hash(data, expected_hash)
    return data


def check_hash(data: bytes, expected_hash: str | None) -> None:
    """Raise :class:`FileRefused` (``changed_since_init``) if ``expected_hash`` is given and ``data`` has another."""
    if expected_hash is not None and hashlib.sha256(data).hexdigest() != expected_hash:
        raise FileRefused(
            "changed since init: its content hash differs from the one recorded at ingest; not used "
            "(re-run 'robustlens init --force' to re-ingest it)",
            kind="changed_since_init",
        )


def _read_bytes(path: str | Path, *, no_follow: bool = False) -> bytes:
    try:
        if no_follow:
            data = _read_no_follow(path)
        else:
            with open(path, "rb") as handle:
                data = handle.read()
    except FileNotFoundError as exc:
        raise ImageProblem("file not found") from exc
    except OSError as exc:
        raise ImageProblem(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageProblem("zero-byte file")
    return data


def _read_no_follow(path: str | Path) -> bytes:
    """The file's bytes, refusing a symlink as the last component (``O_NOFOLLOW``); plain ``os.read`` calls
    (about half the cost of a buffered ``open().read()`` for a small file)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the caller resolves and checks the link, then reads its target
            raise FileRefused("is a symlink; not followed", kind="symlink") from exc
        raise
    try:
        chunks = []
        want = os.fstat(fd).st_size + 1  # one read for a file that does not grow meanwhile
        while chunk := os.read(fd, want):
            chunks.append(chunk)
            want = 1 << 20
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _decode(data: bytes, max_pixels: int) -> tuple[np.ndarray, str, int]:
    """Pixels, Pillow mode and bit depth of an image file's bytes (the fast PNG path, else Pillow)."""
    fast = _decode_simple_png(data, max_pixels)
    if fast is not None:
        return fast[0], fast[1], 8
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageProblem(
                    f"{width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,} "
                    "(possible decompression bomb; raise --max-pixels if the image is genuine)"
                )
            if width == 0 or height == 0:
                raise ImageProblem(f"image has no pixels ({width}x{height})")
            image.load()
    except ImageProblem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageProblem(f"decompression bomb refused by the decoder: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageProblem("not a recognised image (corrupt or unsupported format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # Pillow reports truncated and damaged streams as OSError / SyntaxError / ValueError.
        raise ImageProblem(f"corrupt or truncated image: {exc}") from exc
    mode = image.mode
    pixels, bit_depth = _to_float_array(image)
    return pixels, mode, bit_depth


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type (8-bit samples) → Pillow mode, for the types the fast path decodes.
_SIMPLE_PNG_MODES = {0: "L", 2: "RGB", 6: "RGBA"}
_cv2: Any = None


def _opencv() -> Any:
    """The ``cv2`` module with its logging silenced (a refused file is retried with Pillow), or ``False``."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2

            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
            _cv2 = cv2
        except Exception:  # noqa: BLE001 - any import problem: Pillow decodes everything
            _cv2 = False
    return _cv2


def _decode_simple_png(data: bytes, max_pixels: int) -> tuple[np.ndarray, str] | None:
    """Pixels and Pillow mode of an 8-bit grayscale / RGB / RGBA PNG without ``tRNS``, or ``None``.

    ``None`` means "let Pillow decode it": another format or PNG flavour, an oversized or malformed
    header, OpenCV missing, or a file OpenCV refuses (truncated, bad checksum). The result equals
    :func:`_to_float_array` of Pillow's decode, value for value.
    """
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    mode = _SIMPLE_PNG_MODES.get(colour)
    if mode is None or depth != 8 or width == 0 or height == 0 or width * height > max_pixels:
        return None
    position = 33  # first chunk after IHDR
    while True:  # chunks before the first IDAT: refuse transparency keys (Pillow keeps them as info only)
        if position + 8 > len(data):
            return None
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            break
        if kind in (b"tRNS", b"PLTE"):
            return None
        position += 12 + length
    cv2 = _opencv()
    if not cv2:
        return None
    decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    channels = 1 if mode == "L" else len(mode)
    if decoded is None or decoded.dtype != np.uint8 or decoded.shape[:2] != (height, width):
        return None
    if decoded.ndim == 2:
        decoded = decoded[..., None]
    if decoded.shape[2] != channels:
        return None
    if channels == 3:
        decoded = decoded[..., ::-1]
    elif channels == 4:
        decoded = decoded[..., [2, 1, 0, 3]]
    array = decoded.astype(np.float32) / 255.0
    if mode == "RGBA":
        alpha = array[..., 3:4]
        return array[..., :3] * alpha + (1.0 - alpha), mode
    return array, mode


def _to_float_array(image: Image.Image) -> tuple[np.ndarray, int]:
    """Pixels as ``(H, W, C)`` float32 in ``[0, 1]`` and the source bit depth per channel."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "1":
        return np.asarray(image, dtype=np.float32)[..., None], 1
    if mode == "L":
        return (np.asarray(image, dtype=np.float32) / 255.0)[..., None], 8
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return (np.asarray(image, dtype=np.float32) / 65535.0)[..., None], 16
    if mode == "I":
        array: np.ndarray = np.asarray(image, dtype=np.float64)
        # 32-bit integer files (often 16-bit data widened by the decoder) are scaled by their range.
        scale = 65535.0 if array.max(initial=0) <= 65535 else float(2**31 - 1)
        return np.clip(array / scale, 0.0, 1.0).astype(np.float32)[..., None], 16 if scale == 65535.0 else 32
    if mode == "F":
        array = np.asarray(image, dtype=np.float32)
        peak = float(array.max(initial=0.0))
        if peak > 1.0:
            array = array / peak
        return np.clip(array, 0.0, 1.0)[..., None], 32
    if mode in ("LA", "La"):
        array = np.asarray(image.convert("LA"), dtype=np.float32) / 255.0
        alpha = array[..., 1:2]
        return array[..., 0:1] * alpha + (1.0 - alpha), 8
    if mode in ("RGBA", "RGBa"):
        array = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = array[..., 3:4]
        return array[..., :3] * alpha + (1.0 - alpha), 8
    if mode == "RGB":
        return np.asarray(image, dtype=np.float32) / 255.0, 8
    if mode.startswith("RGB") or mode.startswith("BGR"):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, 8
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0, 8
