"""Duplicates and leakage on real Fashion-MNIST images with planted ground truth.

The planted dataset (also used by ``tests/test_outliers.py``): real sample images split into train /
test, plus byte-different exact copies, near copies (±2/255 noise, 1-pixel shift, JPEG q=90 re-encode,
brightness change), copies across splits, and images from other distributions (outliers).
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import duplicates, embeddings
from robustlens.analysis.stages.base import StageContext, record_artifact
from robustlens.analysis.workspace import Workspace
from robustlens.errors import WorkspaceError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
BASE_IMAGES = 600


@dataclass
class Planted:
    """Ground truth of the planted dataset (sample ids are manifest paths)."""

    root: Path
    exact_pairs: list[tuple[str, str]] = field(default_factory=list)
    near_pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (source, copy, kind)
    leakage: set[str] = field(default_factory=set)
    outliers: set[str] = field(default_factory=set)


def _outlier_images(rng: np.random.Generator, sources: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Images from other distributions: uint8 ``(28, 28)`` grayscale or ``(28, 28, 3)`` RGB."""
    yy, xx = np.mgrid[:28, :28]
    photo = np.stack([xx * 9, yy * 9, (xx + yy) * 4], axis=-1).clip(0, 255)
    return {
        "noise_uniform": rng.integers(0, 256, (28, 28)).astype(np.uint8),
        "noise_gaussian": np.clip(rng.normal(128, 60, (28, 28)), 0, 255).astype(np.uint8),
        "checkerboard": (((yy // 4 + xx // 4) % 2) * 255).astype(np.uint8),
        "gradient_rgb": photo.astype(np.uint8),
        "stripes": np.clip(np.sin(xx / 2.0) * 127 + 128, 0, 255).astype(np.uint8),
        "white": np.full((28, 28), 255, np.uint8),
        "inverted_a": 255 - sources[0],
        "inverted_b": 255 - sources[1],
        "rings": np.clip(np.cos(np.hypot(yy - 14, xx - 14) / 1.5) * 127 + 128, 0, 255).astype(np.uint8),
        "half_and_half": np.where(xx < 14, 0, 255).astype(np.uint8),
    }


def _near_copy(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray | bytes:
    """A visually near-identical variant of a uint8 ``(28, 28)`` image (JPEG: the encoded bytes)."""
    if kind == "noise":
        return np.clip(image.astype(int) + rng.integers(-2, 3, image.shape), 0, 255).astype(np.uint8)
    if kind == "shift":  # one pixel to the right, the first column repeated (not a circular roll)
        shifted = np.empty_like(image)
        shifted[:, 1:], shifted[:, 0] = image[:, :-1], image[:, 0]
        return shifted
    if kind == "brightness":
        return np.clip(image.astype(int) + 5, 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()
    raise ValueError(kind)


def build_planted(tmp: Path, *, seed: int = 0) -> Planted:
    """Write the planted dataset and its manifest under ``tmp`` (no workspace yet)."""
    rng = np.random.default_rng(seed)
    labels = pd.read_csv(SAMPLE / "labels.csv")
    chosen = np.sort(rng.choice(len(labels), BASE_IMAGES, replace=False))
    data = tmp / "data"
    (data / "img").mkdir(parents=True)
    planted = Planted(root=data)
    rows = []
    pixels = {}
    for position in chosen:
        source = labels.iloc[position]
        name = f"img/{Path(source['path']).stem}.png"
        image = np.asarray(Image.open(SAMPLE / source["path"]))
        Image.fromarray(image).save(data / name, compress_level=6)
        split = "test" if rng.random() < 0.2 else "train"
        rows.append((name, source["label"], split))
        pixels[name] = image
    by_name = {r[0]: r for r in rows}
    order = [r[0] for r in rows]
    pool = iter(rng.permutation(order).tolist())  # each source image is used by at most one plant

    def add(name: str, label: str, split: str) -> None:
        rows.append((name, label, split))

    # exact copies, same split: other PNG compression level, or another lossless format
    for i in range(12):
        source = next(pool)
        fmt = ("png", "bmp", "tiff")[i % 3]
        copy = f"img/exact_{i}.{'png' if fmt == 'png' else fmt}"
        Image.fromarray(pixels[source]).save(
            data / copy,
            format=fmt.upper() if fmt != "tiff" else "TIFF",
            **({"compress_level": 1} if fmt == "png" else {}),
        )
        add(copy, by_name[source][1], by_name[source][2])
        planted.exact_pairs.append((source, copy))
    # near copies, same split
    for i in range(24):
        source = next(pool)
        kind = ("noise", "shift", "jpeg", "brightness")[i % 4]
        variant = _near_copy(pixels[source], kind, rng)
        copy = f"img/near_{kind}_{i}.{'jpg' if kind == 'jpeg' else 'png'}"
        if isinstance(variant, bytes):
            (data / copy).write_bytes(variant)
        else:
            Image.fromarray(variant).save(data / copy)
        add(copy, by_name[source][1], by_name[source][2])
        planted.near_pairs.append((source, copy, kind))
    # copies in the other split: leakage (half exact, half near)
    for i in range(10):
        source = next(pool)
        other = "test" if by_name[source][2] == "train" else "train"
        if i % 2 == 0:
            copy = f"img/leak_exact_{i}.png"
            Image.fromarray(pixels[source]).save(data / copy, compress_level=9)
            planted.exact_pairs.append((source, copy))
        else:
            kind = ("noise", "shift", "brightness")[i % 3]
            copy = f"img/leak_near_{kind}_{i}.png"
            Image.fromarray(_near_copy(pixels[source], kind, rng)).save(data / copy)
            planted.near_pairs.append((source, copy, kind))
        add(copy, by_name[source][1], other)
        planted.leakage.update({source, copy})
    # outliers: labelled like an ordinary sample so only their pixels are unusual
    for name, image in _outlier_images(rng, [pixels[order[0]], pixels[order[1]]]).items():
        path = f"img/outlier_{name}.png"
        Image.fromarray(image).save(data / path)
        add(path, "bag", "train")
        planted.outliers.add(path)
    pd.DataFrame(rows, columns=["path", "label", "split"]).to_csv(tmp / "labels.csv", index=False)
    return planted


def init_planted(tmp: Path, *, model: bool = True, seed: int = 0) -> tuple[Workspace, Planted]:
    """Build the planted dataset and a workspace over it (with the sample model when ``model``)."""
    planted = build_planted(tmp, seed=seed)
    options = InitOptions(
        data=planted.root,
        labels=tmp / "labels.csv",
        progress=False,
        model=str(SAMPLE / "model.pt") if model else None,
        model_config=SAMPLE / "model.json" if model else None,
    )
    workspace, _ = init_workspace(tmp / "ws", options)
    return workspace, planted


def write_fingerprints(workspace: Workspace) -> None:
    """``fingerprints.parquet`` from the metrics stage when it exists, else built here the same way."""
    context = StageContext(workspace=workspace, progress=False)
    try:
        from robustlens.analysis.stages import metrics
    except ImportError:
        metrics = None
    if metrics is not None:
        metrics.run(context, metrics.Config())
        return
    samples = workspace.samples
    hashes, phashes = [], []
    for path in samples["path"]:
        image = np.asarray(Image.open(workspace.image_path(path)).convert("L"))
        hashes.append(hashlib.sha1(f"{image.shape}".encode() + image.tobytes()).hexdigest())
        phashes.append(_phash(image))
    frame = pd.DataFrame({"id": samples["id"], "pixel_hash": hashes, "phash": np.array(phashes, dtype=np.uint64)})
    from robustlens.analysis import storage

    storage.write_parquet(workspace.artifact_path("fingerprints.parquet"), frame)
    record_artifact(context, "fingerprints", stage="test", config={}, inputs="test")


def _phash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a uint8 grayscale image (32×32 resize, top-left 8×8 vs median)."""
    small = np.asarray(Image.fromarray(gray).resize((32, 32), Image.BILINEAR), dtype=np.float64)
    k = np.arange(32)
    basis = np.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / 64)
    block = (basis @ small @ basis.T)[:8, :8].ravel()
    bits = block > np.median(block[1:])
    return int(np.packbits(bits).view(">u8")[0])


def precision_recall(predicted: set, truth: set) -> tuple[float, float]:
    hits = len(predicted & truth)
    return (hits / len(predicted) if predicted else 1.0), (hits / len(truth) if truth else 1.0)


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """Planted workspace after metrics → embeddings → duplicates."""
    tmp = tmp_path_factory.mktemp("planted_dups")
    workspace, planted = init_planted(tmp)
    write_fingerprints(workspace)
    context = StageContext(workspace=workspace, progress=False)
    embeddings.run(context, embeddings.Config())
    summary = duplicates.run(context, duplicates.Config())
    return workspace, planted, summary


def _flagged(workspace: Workspace, issue: str) -> set[str]:
    flags = pd.read_parquet(workspace.artifact_path("flags_duplicates.parquet"))
    return set(flags.loc[flags["issue"] == issue, "id"])


def test_exact_duplicates_precision_recall(planted_run):
    workspace, planted, _ = planted_run
    truth = {sample for pair in planted.exact_pairs for sample in pair}
    precision, recall = precision_recall(_flagged(workspace, "exact_duplicate"), truth)
    print(f"exact: precision {precision:.3f} recall {recall:.3f} ({len(truth)} planted samples)")
    assert precision >= 0.9 and recall >= 0.9
    table = pd.read_parquet(workspace.artifact_path("duplicates.parquet")).set_index("id")
    for source, copy in planted.exact_pairs:
        assert table.at[source, "exact_group"] >= 0
        assert table.at[source, "exact_group"] == table.at[copy, "exact_group"]


def test_near_duplicates_precision_recall(planted_run):
    workspace, planted, _ = planted_run
    truth = {sample for source, copy, _ in planted.near_pairs for sample in (source, copy)}
    precision, recall = precision_recall(_flagged(workspace, "near_duplicate"), truth)
    print(f"near: precision {precision:.3f} recall {recall:.3f} ({len(truth)} planted samples)")
    assert precision >= 0.9 and recall >= 0.9
    table = pd.read_parquet(workspace.artifact_path("duplicates.parquet")).set_index("id")
    found = {kind: 0 for _, _, kind in planted.near_pairs}
    for source, copy, kind in planted.near_pairs:
        group = table.at[source, "near_group"]
        found[kind] += int(group >= 0 and group == table.at[copy, "near_group"])
    print("near pairs found per kind:", found)
    assert sum(found.values()) >= 0.9 * len(planted.near_pairs)


def test_leakage_precision_recall(planted_run):
    workspace, planted, summary = planted_run
    precision, recall = precision_recall(_flagged(workspace, "leakage"), planted.leakage)
    print(f"leakage: precision {precision:.3f} recall {recall:.3f}")
    assert precision >= 0.9 and recall >= 0.9
    assert summary["leakage_samples"] == len(_flagged(workspace, "leakage"))
    flags = pd.read_parquet(workspace.artifact_path("flags_duplicates.parquet"))
    samples = workspace.samples.set_index("id")
    for _, row in flags[flags["issue"] == "leakage"].iterrows():
        own_split = samples.at[row["id"], "split"]
        other_split = "train" if own_split == "test" else "test"
        assert f"({other_split})" in row["explanation"] and own_split in row["explanation"]


def test_clean_sample_images_have_no_false_pairs(tmp_path):
    """The 2,000 sample images contain no duplicates: every pair reported would be false."""
    workspace, _ = init_workspace(
        tmp_path / "ws",
        InitOptions(
            data=SAMPLE,
            labels=SAMPLE / "labels.csv",
            model=str(SAMPLE / "model.pt"),
            model_config=SAMPLE / "model.json",
            progress=False,
        ),
    )
    write_fingerprints(workspace)
    context = StageContext(workspace=workspace, progress=False)
    embeddings.run(context, embeddings.Config())
    summary = duplicates.run(context, duplicates.Config())
    pairs = pd.read_parquet(workspace.artifact_path("duplicate_pairs.parquet"))
    print(f"clean: {summary['candidate_pairs']} candidate pairs compared, {len(pairs)} reported")
    assert len(pairs) == 0
    assert summary["samples_in_clusters"] == 0


def test_outputs_schema_and_representatives(planted_run):
    workspace, planted, _ = planted_run
    table = pd.read_parquet(workspace.artifact_path("duplicates.parquet"))
    assert table["id"].tolist() == workspace.samples["id"].tolist()
    assert list(table.columns) == ["id", "exact_group", "near_group", "group_size", "is_representative", "cross_split"]
    grouped = table[table["near_group"] >= 0]
    # exactly one representative per cluster, and it is the first member in sample order
    assert (grouped.groupby("near_group")["is_representative"].sum() == 1).all()
    first = grouped.reset_index().groupby("near_group")["index"].min()
    assert table.loc[first.to_numpy(), "is_representative"].all()
    assert (grouped.groupby("near_group").size() == grouped.groupby("near_group")["group_size"].first()).all()
    assert table.loc[table["near_group"] < 0, "is_representative"].all()
    pairs = pd.read_parquet(workspace.artifact_path("duplicate_pairs.parquet"))
    assert list(pairs.columns)[:5] == ["id_a", "id_b", "kind", "cosine", "phash_distance"]
    assert set(pairs["kind"]) <= {"exact", "near"}
    assert (pairs.loc[pairs["kind"] == "exact", "phash_distance"] == 0).all()
    flags = pd.read_parquet(workspace.artifact_path("flags_duplicates.parquet"))
    assert set(flags["issue"]) == {"exact_duplicate", "near_duplicate", "leakage"}
    assert flags["severity"].between(0, 1).all()
    # explanations name the other sample
    source, copy = planted.exact_pairs[0]
    explanation = flags[(flags["id"] == source) & (flags["issue"] == "exact_duplicate")]["explanation"].iat[0]
    assert copy in explanation


def test_rerun_with_unchanged_inputs_is_skipped(planted_run):
    workspace, _, first = planted_run
    context = StageContext(workspace=workspace, progress=False)
    again = duplicates.run(context, duplicates.Config())
    assert again["skipped"] is True
    assert again["leakage_samples"] == first["leakage_samples"]
    changed = duplicates.run(context, duplicates.Config(max_pixel_difference=0.01))
    assert changed["skipped"] is False


def test_compare_thumbnails_aligns_shifted_copies():
    rng = np.random.default_rng(3)
    base = np.zeros((1, 32, 32), np.uint8)
    base[0, 8:24, 10:20] = rng.integers(100, 255, (16, 10))
    shifted = np.roll(base, (1, -2), axis=(1, 2))
    other = np.zeros_like(base)
    other[0, 6:26, 6:26] = rng.integers(100, 255, (20, 20))
    ncc, difference, _, peak = duplicates.compare_thumbnails(
        np.concatenate([base, base]), np.concatenate([shifted, other])
    )
    assert ncc[0] < 1e-3 and difference[0] < 2 / 255 and peak[0] > 0.9
    assert ncc[1] > 0.1 and peak[1] < 0.5


def test_phash_distance_is_bit_count():
    a = np.array([0, 0b1011, -1], dtype=np.int64).view(np.uint64)
    b = np.array([0, 0b0001, 0], dtype=np.int64).view(np.uint64)
    assert duplicates.phash_distance(a, b).tolist() == [0, 2, 64]


def test_exact_groups_numbering():
    groups = duplicates.exact_groups(np.array(["a", "b", "a", "c", "b", "d"]))
    assert groups.tolist() == [0, 1, 0, -1, 1, -1]


def test_missing_fingerprints_error(tmp_path):
    data = tmp_path / "data"
    for i, path in enumerate(sorted((SAMPLE / "images").glob("*.png"))[:6]):
        (data / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (data / f"c{i % 2}" / path.name).write_bytes(path.read_bytes())
    workspace, _ = init_workspace(tmp_path / "ws", InitOptions(data=data, progress=False))
    context = StageContext(workspace=workspace, progress=False)
    embeddings.run(context, embeddings.Config())
    with pytest.raises(WorkspaceError, match="'metrics' stage"):
        duplicates.run(context, duplicates.Config())


def test_shift_signature_ignores_translation_and_blank_images_compare_equal():
    rng = np.random.default_rng(5)
    image = np.zeros((1, 32, 32), np.uint8)
    image[0, 5:20, 8:25] = rng.integers(50, 255, (15, 17))
    rolled = np.roll(image, (2, -3), axis=(1, 2))
    unrelated = np.roll(rng.integers(0, 255, (1, 32, 32)).astype(np.uint8), 0)
    signature = duplicates.shift_signature(np.concatenate([image, rolled, unrelated]))
    assert signature[0] @ signature[1] > 0.9999 and signature[0] @ signature[2] < 0.95
    blank = np.concatenate([np.zeros((1, 32, 32), np.uint8), np.full((1, 32, 32), 2, np.uint8)])
    assert not duplicates.shift_signature(blank).any()
    ncc, difference, mean_difference, peak = duplicates.compare_thumbnails(blank[:1], blank[1:])
    assert ncc[0] == 0 and difference[0] == 0 and mean_difference[0] < 0.01 and peak[0] == 1


def test_quantised_phase_peaks_match_full_computation():
    rng = np.random.default_rng(2)
    thumbnails = np.asarray(Image.open(SAMPLE / "images" / "test_00002.png").resize((32, 32)))[None]
    thumbnails = np.concatenate(
        [thumbnails, np.roll(thumbnails, 1, axis=2), rng.integers(0, 256, (4, 32, 32)).astype(np.uint8)]
    )
    pairs = np.array([[0, 1], [0, 2], [2, 3], [1, 4], [4, 5]])
    codes = duplicates.phase_codes(thumbnails)
    flat = np.zeros(len(thumbnails), dtype=bool)
    quick = duplicates.phase_peaks(
        codes[pairs[:, 0]], codes[pairs[:, 1]], flat[pairs[:, 0]], flat[pairs[:, 1]], height=32, width=32
    )
    *_, exact = duplicates.compare_thumbnails(thumbnails[pairs[:, 0]], thumbnails[pairs[:, 1]])
    np.testing.assert_allclose(quick, exact, atol=0.01)
    assert quick[0] > 0.9 and (quick[1:] < 0.5).all()
