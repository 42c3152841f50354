"""The shared image loader: order, chunked decoding, the in-run pixel memo, batch and thread choices."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis import loader
from robustlens.analysis.images import ImageProblem, read_image
from tests.conftest import write_image


@pytest.fixture()
def folder(tmp_path):
    modes = ["L", "RGB", "RGBA", "P", "I;16"]
    paths = []
    for number in range(23):
        name = f"img_{number:02d}.{'png' if number % 4 else 'jpg'}"
        mode = modes[number % len(modes)] if name.endswith(".png") else "RGB"
        write_image(tmp_path / name, mode=mode, size=(9 + number % 3, 7), seed=number)
        paths.append(name)
    return tmp_path, paths


@pytest.mark.parametrize("workers", [1, 3])
def test_batches_come_in_the_requested_order_with_read_image_pixels(folder, workers):
    root, paths = folder
    order = [5, 0, 22, 7, 7, 13, 1, 2, 3, 4, 6]
    seen = []
    for indices, pixels in loader.iter_decoded(root, paths, order, batch_size=4, workers=workers):
        assert len(indices) == len(pixels) <= 4
        for index, image in zip(indices.tolist(), pixels, strict=True):
            np.testing.assert_array_equal(image, read_image(root / paths[index]).pixels)
            seen.append(index)
    assert seen == order


def test_memo_spares_the_second_decode_and_respects_its_budget(folder, monkeypatch):
    root, paths = folder
    calls = []
    real = loader.read_pixels

    def counting(path, **kwargs):
        calls.append(path)
        return real(path, **kwargs)

    monkeypatch.setattr(loader, "read_pixels", counting)
    memo = loader.PixelMemo()
    first = [image for _, batch in loader.iter_decoded(root, paths, batch_size=5, memo=memo) for image in batch]
    assert len(calls) == len(paths) and len(memo) == len(paths)
    second = [image for _, batch in loader.iter_decoded(root, paths, batch_size=7, memo=memo) for image in batch]
    assert len(calls) == len(paths)  # nothing decoded again
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not b.flags.writeable  # shared between stages: read-only
    one_image = first[0].nbytes
    small = loader.PixelMemo(budget_bytes=3 * one_image)
    list(loader.iter_decoded(root, paths, batch_size=5, memo=small, workers=1))
    assert small.used_bytes <= 3 * one_image and 1 <= len(small) < len(paths)


def test_unreadable_image_names_its_path(folder):
    root, paths = folder
    (root / paths[3]).write_bytes(b"not an image")
    with pytest.raises(ImageProblem, match=paths[3]):
        for _ in loader.iter_decoded(root, paths, batch_size=2):
            pass


def test_batch_size_and_decoder_threads_follow_image_size():
    tiny = pd.DataFrame({"width": [28] * 5, "height": [28] * 5, "channels": [1] * 5})
    photos = pd.DataFrame({"width": [640] * 5, "height": [480] * 5, "channels": [3] * 5})
    assert loader.auto_batch_size(tiny) == 4096
    assert loader.auto_batch_size(photos) == 64
    assert loader.decode_workers(tiny) == 1
    assert loader.decode_workers(photos) == loader.default_workers() >= 2
