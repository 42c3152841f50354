"""Decoding every supported format and mode, and refusing bad files with a reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from robustlens.analysis.images import ImageProblem, read_image
from tests.conftest import write_image


@pytest.mark.parametrize(
    "suffix,fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP"), (".bmp", "BMP"), (".tiff", "TIFF")]
)
def test_reads_every_supported_format(tmp_path, suffix, fmt):
    path = write_image(tmp_path / f"x{suffix}", mode="RGB", size=(20, 10), fmt=fmt)
    decoded = read_image(path)
    assert decoded.pixels.shape == (10, 20, 3)
    assert decoded.pixels.dtype == np.float32
    assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0
    assert decoded.record.width == 20 and decoded.record.height == 10
    assert decoded.record.file_size == path.stat().st_size


@pytest.mark.parametrize(
    "mode,channels,bit_depth", [("L", 1, 8), ("RGB", 3, 8), ("RGBA", 3, 8), ("P", 3, 8), ("LA", 1, 8), ("I;16", 1, 16)]
)
def test_modes_become_one_or_three_channels(tmp_path, mode, channels, bit_depth):
    path = write_image(tmp_path / "x.png", mode=mode)
    decoded = read_image(path)
    assert decoded.pixels.shape[2] == channels
    assert decoded.record.bit_depth == bit_depth
    assert decoded.pixels.min() >= 0.0 and decoded.pixels.max() <= 1.0


def test_16_bit_values_are_scaled_by_65535(tmp_path):
    array = np.array([[0, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    pixels = read_image(path).pixels[..., 0]
    np.testing.assert_allclose(pixels, [[0.0, 32768 / 65535, 1.0]], atol=1e-6)


def test_transparent_pixels_are_composited_over_white(tmp_path):
    array = np.zeros((1, 2, 4), dtype=np.uint8)
    array[0, 1] = [0, 0, 0, 255]  # opaque black next to a fully transparent pixel
    path = tmp_path / "x.png"
    Image.fromarray(array, "RGBA").save(path)
    pixels = read_image(path).pixels
    np.testing.assert_allclose(pixels[0, 0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(pixels[0, 1], [0.0, 0.0, 0.0])


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageProblem, match="zero-byte"):
        read_image(path)


def test_corrupt_file(tmp_path):
    path = tmp_path / "noise.png"
    path.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(ImageProblem, match="not a recognised image"):
        read_image(path)


@pytest.mark.parametrize("fmt,suffix", [("PNG", ".png"), ("JPEG", ".jpg")])
def test_truncated_file(tmp_path, fmt, suffix):
    full = write_image(tmp_path / f"full{suffix}", size=(64, 64), fmt=fmt)
    truncated = tmp_path / f"cut{suffix}"
    data = full.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageProblem, match="truncated|corrupt"):
        read_image(truncated)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = write_image(tmp_path / "big.png", mode="L", size=(200, 100))
    with pytest.raises(ImageProblem, match="exceeds the cap"):
        read_image(path, max_pixels=10_000)
    assert read_image(path, max_pixels=20_000).record.width == 200


def test_content_hash_depends_on_bytes(tmp_path):
    a = write_image(tmp_path / "a.png", seed=1)
    b = write_image(tmp_path / "b.png", seed=1)
    c = write_image(tmp_path / "c.png", seed=2)
    assert read_image(a).record.content_hash == read_image(b).record.content_hash
    assert read_image(a).record.content_hash != read_image(c).record.content_hash


def _pillow_only(path):
    """What read_image returns when OpenCV is not available: the Pillow decode of every file."""
    from robustlens.analysis import images

    saved = images._cv2
    images._cv2 = False
    try:
        return read_image(path)
    finally:
        images._cv2 = saved


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "I;16", "1"])
@pytest.mark.parametrize("interlace", [False, True])
def test_fast_png_path_equals_pillow_decode(tmp_path, mode, interlace):
    """PNGs the OpenCV path takes decode to exactly Pillow's pixels and record; the others go to Pillow."""
    from robustlens.analysis import images

    rng = np.random.default_rng(7)
    channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}.get(mode, 1)
    array = rng.integers(0, 256, size=(23, 37, channels), dtype=np.uint8)
    if mode in ("L", "RGB", "RGBA", "LA"):
        image = Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)
    elif mode == "P":
        image = Image.fromarray(array[..., 0], mode="L").convert("P")
    elif mode == "I;16":
        image = Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    else:
        image = Image.fromarray(array[..., 0] > 127)
    path = tmp_path / "image.png"
    image.save(path, interlace=interlace)
    assert images._opencv(), "opencv-python-headless is a dependency"
    fast, slow = read_image(path), _pillow_only(path)
    assert fast.record == slow.record
    assert fast.pixels.dtype == slow.pixels.dtype == np.float32
    np.testing.assert_array_equal(fast.pixels, slow.pixels)
    taken = images._decode_simple_png(path.read_bytes(), images.DEFAULT_MAX_PIXELS) is not None
    assert taken == (mode in ("L", "RGB", "RGBA"))


def test_fast_png_path_leaves_transparency_keys_and_bad_files_to_pillow(tmp_path):
    from robustlens.analysis import images

    keyed = tmp_path / "keyed.png"
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(keyed, transparency=(200, 200, 200))
    assert images._decode_simple_png(keyed.read_bytes(), images.DEFAULT_MAX_PIXELS) is None
    np.testing.assert_array_equal(read_image(keyed).pixels, _pillow_only(keyed).pixels)
    good = tmp_path / "good.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(good)
    data = good.read_bytes()
    assert images._decode_simple_png(data[:-12], images.DEFAULT_MAX_PIXELS) is None  # no IEND
    assert images._decode_simple_png(data, 63) is None  # over the pixel cap: Pillow refuses it with a reason
    with pytest.raises(ImageProblem, match="exceeds the cap"):
        read_image(good, max_pixels=63)
