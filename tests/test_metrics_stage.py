"""The metrics stage: built-in metrics against independent numpy/scipy computations, the metric registry,
custom metrics from a plugin module, fingerprints, and incremental (content-hash cached) runs."""

from __future__ import annotations

import colorsys
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import fft, ndimage, signal, stats

from robustlens.analysis import builtin_metrics
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.metric_registry import (
    MetricRegistryError,
    available_metrics,
    get_metric,
    register_metric,
    unregister_metric,
)
from robustlens.analysis.stages import metrics as metrics_stage
from robustlens.analysis.stages.base import StageContext, read_artifact
from tests.metrics_planted import SAMPLE_DATA, copy_real_images, sample_images

PIXEL_BUILTINS = (
    "brightness",
    "contrast",
    "sharpness",
    "high_frequency_ratio",
    "blur_score",
    "entropy",
    "shadow_level",
    "highlight_level",
    "colorfulness",
    "saturation",
    "mean_r",
    "mean_g",
    "mean_b",
    "dark_fraction",
    "bright_fraction",
    "noise",
    "grayscale_content",
)
RECORD_BUILTINS = ("width", "height", "aspect_ratio", "area", "file_size", "channels")


# -- independent reference computations (numpy / scipy, float64, one image at a time) -------------------
def reference_luminance(pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` in [0, 1] → Rec. 601 luma."""
    if pixels.shape[2] == 1:
        return pixels[..., 0]
    return pixels @ np.array([0.299, 0.587, 0.114])


def reference_blur(lum: np.ndarray) -> float:
    """Crété-Roffet et al. 2007, written from the paper with scipy's box filter."""
    scores = []
    for axis in (0, 1):
        if lum.shape[axis] < 2:
            continue
        reblurred = ndimage.uniform_filter1d(lum, 9, axis=axis, mode="nearest")
        d_image = np.abs(np.diff(lum, axis=axis))
        d_blurred = np.abs(np.diff(reblurred, axis=axis))
        total = d_image.sum()
        if total > 0:
            scores.append((total - np.maximum(0.0, d_image - d_blurred).sum()) / total)
    return max(scores) if scores else 1.0


def reference_metrics(pixels: np.ndarray) -> dict[str, float]:
    lum = reference_luminance(pixels)
    height, width = lum.shape
    levels = np.rint(lum * 255).astype(int)
    rgb = np.repeat(pixels, 3, axis=2) if pixels.shape[2] == 1 else pixels
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = red - green, 0.5 * (red + green) - blue
    laplacian_variance = ndimage.laplace(lum).var()  # mode="reflect": edge pixel repeated
    if min(height, width) >= 3:
        mask = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=float)
        noise = (
            math.sqrt(math.pi / 2)
            / (6 * (width - 2) * (height - 2))
            * np.abs(signal.convolve2d(lum, mask, mode="valid")).sum()
        )
    else:
        noise = 0.0
    hsv_s = np.array([colorsys.rgb_to_hsv(*pixel)[1] for pixel in rgb.reshape(-1, 3)])
    return {
        "brightness": lum.mean(),
        "contrast": lum.std(),
        "sharpness": laplacian_variance,
        "high_frequency_ratio": laplacian_variance / (64 * lum.var()) if lum.var() > 0 else 0.0,
        "blur_score": reference_blur(lum),
        "entropy": stats.entropy(np.bincount(levels.ravel(), minlength=256), base=2),
        "shadow_level": np.percentile(levels, 1, method="inverted_cdf") / 255,
        "highlight_level": np.percentile(levels, 99, method="inverted_cdf") / 255,
        "colorfulness": math.sqrt(rg.var() + yb.var()) + 0.3 * math.sqrt(rg.mean() ** 2 + yb.mean() ** 2),
        "saturation": hsv_s.mean(),
        "mean_r": red.mean(),
        "mean_g": green.mean(),
        "mean_b": blue.mean(),
        "dark_fraction": (lum < 0.1).mean(),
        "bright_fraction": (lum > 0.9).mean(),
        "noise": noise,
        "grayscale_content": (rgb.max(axis=2) - rgb.min(axis=2)).max(),
    }


#: Absolute tolerances: float32 engine vs float64 reference; percentiles and entropy bin 8-bit-rounded
#: luminance, where an RGB pixel within float32 rounding of a half level may land in the next bin.
TOLERANCE = {"entropy": 1e-3, "shadow_level": 1 / 255 + 1e-6, "highlight_level": 1 / 255 + 1e-6}


def load_pixels(path: Path) -> np.ndarray:
    """A PNG as ``(H, W, C)`` float64 in [0, 1], read with Pillow directly (not the engine's reader)."""
    array = np.asarray(Image.open(path), dtype=np.float64) / 255.0
    return array[..., None] if array.ndim == 2 else array


def write_reference_images(root: Path) -> list[Path]:
    """Real grayscale samples plus RGB, grayscale-content RGB, constant and tiny images of mixed sizes."""
    rng = np.random.default_rng(7)
    paths = []
    for name in sample_images()["path"].iloc[[0, 5, 11]]:
        target = root / "real" / Path(name).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE_DATA / name, target)
        paths.append(target)
    yy, xx = np.mgrid[0:30, 0:40] / 40.0
    smooth = np.stack([xx, yy, 1 - xx * yy], axis=2) * 200 + rng.normal(0, 12, (30, 40, 3))
    arrays = {
        "rgb_smooth.png": (np.clip(smooth, 0, 255).astype(np.uint8), "RGB"),  # 40×30
        "rgb_random.png": (rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB"),  # 30×40
        "rgb_gray_content.png": (np.repeat(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), 3, axis=2), "RGB"),
        "rgb_dark.png": ((rng.integers(0, 256, (28, 28, 3)) * 0.08).astype(np.uint8), "RGB"),
        "gray_constant.png": (np.full((16, 16), 140, dtype=np.uint8), "L"),
        "rgb_tiny.png": (rng.integers(0, 256, (2, 5, 3), dtype=np.uint8), "RGB"),
        "gray_row.png": (rng.integers(0, 256, (1, 12), dtype=np.uint8), "L"),
    }
    for name, (array, mode) in arrays.items():
        target = root / "synthetic" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array, mode).save(target)
        paths.append(target)
    return paths


def make_workspace(data: Path, root: Path, *, force: bool = False):
    workspace, _ = init_workspace(root, InitOptions(data=data, progress=False, force=force))
    return workspace


@pytest.fixture(scope="module")
def reference_workspace(tmp_path_factory):
    base = tmp_path_factory.mktemp("reference")
    paths = write_reference_images(base / "data")
    workspace = make_workspace(base / "data", base / "ws")
    summary = metrics_stage.run(StageContext(workspace, progress=False), metrics_stage.Config())
    return workspace, paths, summary


# -- built-in metrics -------------------------------------------------------------------------------------
def test_registry_has_the_builtins():
    pixel = set(available_metrics("pixels"))
    record = set(available_metrics("record"))
    assert set(PIXEL_BUILTINS) <= pixel and len(pixel) >= 15
    assert set(RECORD_BUILTINS) <= record
    for name in PIXEL_BUILTINS + RECORD_BUILTINS:
        metric = get_metric(name)
        assert metric.description and metric.higher_is
        assert metric.module == "robustlens.analysis.builtin_metrics"


def test_builtin_metrics_match_numpy_scipy_references(reference_workspace):
    workspace, paths, summary = reference_workspace
    table = read_artifact(workspace, "metrics").set_index("id")
    assert summary["computed"] == len(paths) and summary["cached"] == 0
    root = workspace.dataset_root
    compared = 0
    for path in paths:
        pixels = load_pixels(path)
        row = table.loc[path.relative_to(root).as_posix()]
        for name, expected in reference_metrics(pixels).items():
            assert row[name] == pytest.approx(expected, abs=TOLERANCE.get(name, 1e-6)), (path.name, name)
            compared += 1
        height, width, channels = pixels.shape
        assert (row["width"], row["height"], row["channels"]) == (width, height, channels)
        assert row["aspect_ratio"] == pytest.approx(width / height)
        assert row["area"] == width * height and row["file_size"] == path.stat().st_size
    assert compared == len(paths) * len(PIXEL_BUILTINS)


def test_metric_values_do_not_depend_on_batch_composition(reference_workspace, tmp_path):
    workspace, paths, _ = reference_workspace
    shutil.copytree(workspace.root, tmp_path / "ws")
    shutil.rmtree(tmp_path / "ws" / "artifacts")
    from robustlens.analysis.workspace import Workspace

    copy = Workspace(tmp_path / "ws")
    metrics_stage.run(StageContext(copy, progress=False), metrics_stage.Config(batch_size=2))
    pd.testing.assert_frame_equal(
        read_artifact(copy, "metrics"), read_artifact(workspace, "metrics"), check_exact=False, atol=1e-6, rtol=0
    )


def test_mixed_sizes_in_one_batch_are_grouped_and_kept_in_order(monkeypatch):
    rng = np.random.default_rng(3)
    images = [
        rng.random((9, 7, 3), dtype=np.float32),
        rng.random((5, 5, 1), dtype=np.float32),
        rng.random((9, 7, 3), dtype=np.float32),
        rng.random((9, 7, 1), dtype=np.float32),
        rng.random((5, 5, 1), dtype=np.float32),
        rng.random((9, 7, 3), dtype=np.float32),
    ]
    chosen = [get_metric(name) for name in ("brightness", "sharpness", "blur_score", "colorfulness")]
    frame = metrics_stage.measure_batch(images, chosen, torch.device("cpu"))
    monkeypatch.setattr(metrics_stage, "MAX_STACK_ELEMENTS", 2 * 9 * 7 * 3)  # split same-shape groups in twos
    split = metrics_stage.measure_batch(images, chosen, torch.device("cpu"))
    pd.testing.assert_frame_equal(split, frame, check_exact=False, atol=1e-6, rtol=0)
    for row, image in enumerate(images):
        alone = metrics_stage.measure_batch([image], chosen, torch.device("cpu")).iloc[0]
        reference = reference_metrics(image.astype(np.float64))
        for metric in chosen:
            assert frame.loc[row, metric.name] == pytest.approx(alone[metric.name], abs=1e-6)
            assert frame.loc[row, metric.name] == pytest.approx(reference[metric.name], abs=1e-5)
        assert (frame.loc[row, "pixel_hash"], frame.loc[row, "phash"]) == (alone["pixel_hash"], alone["phash"])


def test_grayscale_content_and_channels(reference_workspace):
    workspace, _, _ = reference_workspace
    table = read_artifact(workspace, "metrics").set_index("id")
    assert table.loc["synthetic/rgb_gray_content.png", "grayscale_content"] == 0
    assert table.loc["synthetic/rgb_gray_content.png", "channels"] == 3
    assert table.loc["synthetic/rgb_random.png", "grayscale_content"] > 0.5
    real = table.loc[[i for i in table.index if i.startswith("real/")]]
    assert (real["channels"] == 1).all() and (real["grayscale_content"] == 0).all()
    assert (real["saturation"] == 0).all() and (real["colorfulness"] == 0).all()


def test_constant_image_edge_cases(reference_workspace):
    workspace, _, _ = reference_workspace
    row = read_artifact(workspace, "metrics").set_index("id").loc["synthetic/gray_constant.png"]
    assert row["contrast"] == 0 and row["sharpness"] == 0 and row["entropy"] == 0 and row["noise"] == 0
    assert row["high_frequency_ratio"] == 0 and row["blur_score"] == 1.0
    assert row["shadow_level"] == row["highlight_level"] == pytest.approx(140 / 255)


def test_blur_score_orders_blur_levels():
    image = np.asarray(Image.open(SAMPLE_DATA / sample_images()["path"].iloc[3]), dtype=np.float32) / 255
    stack = np.stack([ndimage.gaussian_filter(image, sigma) for sigma in (0.0, 0.7, 1.5, 3.0)])
    scores = builtin_metrics.blur_score(torch.from_numpy(stack).unsqueeze(1))
    ratios = builtin_metrics.high_frequency_ratio(torch.from_numpy(stack).unsqueeze(1))
    assert torch.all(scores.diff() > 0) and torch.all(ratios.diff() < 0)
    assert scores.min() >= 0 and scores.max() <= 1


# -- fingerprints -----------------------------------------------------------------------------------------
def _hamming(a: int, b: int) -> int:
    return bin(int(a) ^ int(b)).count("1")


def test_dct_matrix_matches_scipy():
    matrix = metrics_stage._dct_matrix(32, torch.float64, torch.device("cpu")).numpy()
    np.testing.assert_allclose(matrix, fft.dct(np.eye(32), norm="ortho", axis=0), atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 1, 28, 28), (20, 3, 37, 53), (5, 3, 300, 200)])
def test_phash_equals_resize_then_dct_at_other_sizes(shape):
    """The folded resize+DCT matrices give the hash of the literal recipe: antialiased resize to 32x32,
    2-D DCT, top-left 8x8 against the median of its 63 AC values."""
    import torch.nn.functional as F

    from robustlens.analysis.builtin_metrics import luminance

    images = torch.rand(*shape, generator=torch.Generator().manual_seed(3))
    small = F.interpolate(
        luminance(images).unsqueeze(1).double(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True
    )[:, 0]
    dct = metrics_stage._dct_matrix(32, torch.float64, torch.device("cpu"))
    block = (dct @ small @ dct.T)[:, :8, :8].reshape(len(images), -1)
    bits = (block > block[:, 1:].median(dim=1, keepdim=True).values).numpy()
    expected = np.packbits(bits, axis=1).view(">u8")[:, 0].astype(np.uint64)
    np.testing.assert_array_equal(metrics_stage.perceptual_hash(images), expected)


def test_phash_matches_a_scipy_reference_on_a_32x32_image():
    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((32, 32)), 2.0)
    coefficients = fft.dctn(image, norm="ortho")[:8, :8].ravel()
    bits = coefficients > np.median(coefficients[1:])
    expected = int("".join("1" if bit else "0" for bit in bits), 2)
    got = metrics_stage.perceptual_hash(torch.from_numpy(image[None, None].astype(np.float32)))
    assert int(got[0]) == expected


def test_fingerprints(tmp_path):
    source = load_pixels(SAMPLE_DATA / sample_images()["path"].iloc[0])[..., 0]
    other = load_pixels(SAMPLE_DATA / sample_images()["path"].iloc[1])[..., 0]
    as_uint8 = (source * 255).astype(np.uint8)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    Image.fromarray(as_uint8).save(data / "a" / "original.png")
    Image.fromarray(as_uint8).save(data / "a" / "same_pixels.bmp")  # other bytes, same pixels
    Image.fromarray(np.clip(as_uint8.astype(int) + 12, 0, 255).astype(np.uint8)).save(data / "a" / "brighter.png")
    Image.fromarray((other * 255).astype(np.uint8)).save(data / "a" / "other.png")
    workspace = make_workspace(data, tmp_path / "ws")
    metrics_stage.run(StageContext(workspace, progress=False), metrics_stage.Config())
    prints = read_artifact(workspace, "fingerprints").set_index("id")
    assert list(read_artifact(workspace, "fingerprints")["id"]) == workspace.samples["id"].tolist()
    assert prints["phash"].dtype == np.uint64
    assert prints.loc["a/original.png", "pixel_hash"] == prints.loc["a/same_pixels.bmp", "pixel_hash"]
    assert prints.loc["a/original.png", "pixel_hash"] != prints.loc["a/brighter.png", "pixel_hash"]
    import hashlib

    expected = hashlib.sha1(b"28x28x1:" + as_uint8.tobytes()).hexdigest()
    assert prints.loc["a/original.png", "pixel_hash"] == expected
    phash = prints["phash"]
    assert _hamming(phash["a/original.png"], phash["a/same_pixels.bmp"]) == 0
    assert _hamming(phash["a/original.png"], phash["a/brighter.png"]) <= 4
    assert _hamming(phash["a/original.png"], phash["a/other.png"]) >= 16


# -- registry -----------------------------------------------------------------------------------------------
def test_duplicate_metric_names_are_rejected_unless_replace():
    def first(images):
        return images.mean(dim=(1, 2, 3))

    def second(images):
        return images.amax(dim=(1, 2, 3))

    try:
        register_metric("tmp_duplicate", description="x")(first)
        with pytest.raises(MetricRegistryError, match="already registered by .*first.*replace=True"):
            register_metric("tmp_duplicate", description="x")(second)
        assert get_metric("tmp_duplicate").function is first
        register_metric("tmp_duplicate", description="x", replace=True)(second)
        assert get_metric("tmp_duplicate").function is second
        register_metric("tmp_duplicate", description="x", replace=True)(second)  # same function again: fine
    finally:
        unregister_metric("tmp_duplicate")
    with pytest.raises(MetricRegistryError, match="already registered"):
        register_metric("brightness", description="mine")(first)


def test_registry_errors_are_clear():
    with pytest.raises(MetricRegistryError, match="unknown metric 'nope'.*brightness"):
        get_metric("nope")
    with pytest.raises(MetricRegistryError, match="reserved"):
        register_metric("phash", description="x")
    with pytest.raises(MetricRegistryError, match="source must be one of"):
        register_metric("fine_name", description="x", source="pixel")
    with pytest.raises(MetricRegistryError, match="cannot import metric plugin module 'no_such_module_xyz'"):
        metrics_stage.selected_metrics(metrics_stage.Config(plugins=("no_such_module_xyz",)))
    with pytest.raises(MetricRegistryError, match="sequence of names"):
        metrics_stage.selected_metrics(metrics_stage.Config(metrics="brightness"))


def test_a_metric_returning_the_wrong_shape_is_named():
    @register_metric("tmp_bad_shape", description="returns one value for the whole batch")
    def bad(images):
        return images.mean()

    try:
        with pytest.raises(MetricRegistryError, match="'tmp_bad_shape'.*expected a tensor of shape \\(2,\\)"):
            metrics_stage.measure_batch(
                [np.zeros((4, 4, 1), np.float32)] * 2, [get_metric("tmp_bad_shape")], torch.device("cpu")
            )
    finally:
        unregister_metric("tmp_bad_shape")


# -- custom metrics from a plugin module ------------------------------------------------------------------------
def test_plugin_metric_appears_in_metrics_parquet(tmp_path):
    ids = copy_real_images(tmp_path / "data", 12)
    workspace = make_workspace(tmp_path / "data", tmp_path / "ws")
    context = StageContext(workspace, progress=False)
    summary = metrics_stage.run(context, metrics_stage.Config(plugins=("tests.metrics_plugin",)))
    assert {"centre_brightness", "pixels_per_byte", "counted"} <= set(summary["metrics"])
    table = read_artifact(workspace, "metrics").set_index("id")
    for sample_id, path in zip(workspace.samples["id"], workspace.samples["path"], strict=True):
        pixels = load_pixels(workspace.image_path(path))
        assert table.loc[sample_id, "centre_brightness"] == pytest.approx(pixels[7:21, 7:21].mean(), abs=1e-6)
    samples = workspace.samples.set_index("id")
    np.testing.assert_allclose(
        table.loc[ids, "pixels_per_byte"], 784 / samples.loc[ids, "file_size"].to_numpy(dtype=float)
    )
    assert set(PIXEL_BUILTINS + RECORD_BUILTINS) <= set(table.columns)

    # A run whose config names no plugin computes the built-ins only, whatever else was imported.
    default = metrics_stage.run(context, metrics_stage.Config())
    assert "centre_brightness" not in default["metrics"]
    assert "centre_brightness" not in read_artifact(workspace, "metrics").columns


def test_selected_metrics_subset(tmp_path):
    copy_real_images(tmp_path / "data", 5)
    workspace = make_workspace(tmp_path / "data", tmp_path / "ws")
    summary = metrics_stage.run(
        StageContext(workspace, progress=False),
        metrics_stage.Config(metrics=("brightness", "width", "centre_brightness"), plugins=("tests.metrics_plugin",)),
    )
    assert summary["metrics"] == ["brightness", "width", "centre_brightness"]
    assert list(read_artifact(workspace, "metrics").columns) == ["id", "brightness", "width", "centre_brightness"]


# -- incremental runs ----------------------------------------------------------------------------------------
def test_adding_images_computes_only_the_new_ones(tmp_path):
    from tests import metrics_plugin

    data, root = tmp_path / "data", tmp_path / "ws"
    copy_real_images(data, 40)
    workspace = make_workspace(data, root)
    config = metrics_stage.Config(batch_size=16, plugins=("tests.metrics_plugin",))
    before = metrics_plugin.CALLS["images"]
    first = metrics_stage.run(StageContext(workspace, progress=False), config)
    assert (first["computed"], first["cached"]) == (40, 0)
    assert metrics_plugin.CALLS["images"] - before == 40
    old = read_artifact(workspace, "metrics").set_index("id")

    new_ids = copy_real_images(data, 15, offset=40)
    duplicate = f"{Path(new_ids[0]).parent.as_posix()}/zz_duplicate.png"
    shutil.copyfile(data / new_ids[0], data / duplicate)  # same content hash, another id
    workspace = make_workspace(data, root, force=True)
    before = metrics_plugin.CALLS["images"]
    second = metrics_stage.run(StageContext(workspace, progress=False), config)
    assert (second["computed"], second["cached"], second["samples"]) == (15, 40, 56)
    assert metrics_plugin.CALLS["images"] - before == 15
    table = read_artifact(workspace, "metrics")
    assert table["id"].tolist() == workspace.samples["id"].tolist()
    merged = table.set_index("id").loc[old.index]
    pd.testing.assert_frame_equal(merged, old)
    by_id = table.set_index("id")
    pd.testing.assert_series_equal(
        by_id.loc[duplicate].drop("file_size"), by_id.loc[new_ids[0]].drop("file_size"), check_names=False
    )

    before = metrics_plugin.CALLS["images"]
    third = metrics_stage.run(StageContext(workspace, progress=False), config)
    assert (third["computed"], third["cached"]) == (0, 55) and metrics_plugin.CALLS["images"] == before
    cache_dirs = list(workspace.artifact_path("cache").glob("metrics-*"))
    assert len(cache_dirs) == 1
    chunks = sorted(cache_dirs[0].glob("chunk-*.parquet"))
    cached = pd.concat([pd.read_parquet(chunk) for chunk in chunks])["content_hash"]
    assert sorted(cached) == sorted(set(workspace.samples["content_hash"]))  # each image once, none stale
    # Too many chunks, or stale rows, make the cache merge into one chunk.
    from robustlens.analysis.stages.base import HashCache

    HashCache(cache_dirs[0]).compact(set(workspace.samples["content_hash"]), max_chunks=1)
    assert len(list(cache_dirs[0].glob("chunk-*.parquet"))) == 1
    keep = set(list(workspace.samples["content_hash"])[:10])
    HashCache(cache_dirs[0]).compact(keep)
    (merged,) = cache_dirs[0].glob("chunk-*.parquet")
    assert set(pd.read_parquet(merged)["content_hash"]) == keep


def test_batch_size_does_not_invalidate_the_cache(tmp_path):
    copy_real_images(tmp_path / "data", 10)
    workspace = make_workspace(tmp_path / "data", tmp_path / "ws")
    context = StageContext(workspace, progress=False)
    metrics_stage.run(context, metrics_stage.Config(batch_size=3))
    assert metrics_stage.run(context, metrics_stage.Config(batch_size=512))["computed"] == 0
