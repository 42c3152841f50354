"""Safe image decoding.

Every image the engine touches goes through :func:`read_image`: it reads the file once, refuses
zero-byte, corrupt, truncated and oversized files with an :class:`ImageProblem` that says why, and
returns pixels as ``float32`` in ``[0, 1]`` with shape ``(H, W, C)``, ``C`` = 1 (grayscale) or 3 (RGB).

Mode handling: 1-bit, 8-bit and 16-bit grayscale (``1``, ``L``, ``I;16``, ``I``, ``F``) stay one
channel, scaled by their bit depth; palette images are expanded; alpha (``LA``, ``RGBA``, palette
transparency) is composited over white, as a browser shows it; CMYK / YCbCr / LAB are converted to RGB.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

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


def read_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Read, verify and decode one image file.

    Parameters
    ----------
    path:
        Image file (PNG, JPEG, WebP, BMP or TIFF).
    max_pixels:
        Largest accepted ``width * height``; larger images are refused before their pixels are
        decoded (decompression bombs).

    Raises
    ------
    ImageProblem
        Zero-byte, unreadable, corrupt, truncated or oversized file.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as exc:
        raise ImageProblem("file not found") from exc
    except OSError as exc:
        raise ImageProblem(f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageProblem("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageProblem(
                    f"{width}x{height} = {width * height:,} pixels exceeds the cap of {max_pixels:,} "
                    "(possible decompression bomb; raise --max-pixels if the image is genuine)")
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
    record = ImageRecord(
        width=int(width), height=int(height), mode=mode, channels=int(pixels.shape[2]),
        bit_depth=bit_depth, file_size=len(data), content_hash=hashlib.sha256(data).hexdigest())
    return DecodedImage(pixels=pixels, record=record)


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
        array = np.asarray(image, dtype=np.float64)
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
