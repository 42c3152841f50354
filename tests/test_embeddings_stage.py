"""Embeddings stage (model, fallback and imported sources), the shared neighbour graph, and projection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from robustlens.analysis.ingest.model import ModelConfig, NormalizedModel
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import embeddings, projection
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MEAN, STD = 0.286, 0.353


def _dataset(tmp: Path, count: int, *, start: int = 0) -> tuple[Path, Path]:
    """Copy ``count`` sample images (from row ``start``) into ``tmp/data`` with a manifest."""
    labels = pd.read_csv(SAMPLE / "labels.csv").iloc[start : start + count]
    data = tmp / "data"
    for path in labels["path"]:
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAMPLE / path, data / path)
    manifest = tmp / "labels.csv"
    if manifest.exists():
        labels = pd.concat([pd.read_csv(manifest), labels[["path", "label", "split"]]])
    labels[["path", "label", "split"]].to_csv(manifest, index=False)
    return data, manifest


def _workspace(tmp: Path, *, model: bool = True, force: bool = False, embeddings_file: Path | None = None) -> Workspace:
    data, manifest = tmp / "data", tmp / "labels.csv"
    workspace, _ = init_workspace(
        tmp / "ws",
        InitOptions(
            data=data,
            labels=manifest,
            progress=False,
            force=force,
            embeddings=embeddings_file,
            model=str(SAMPLE / "model.pt") if model else None,
            model_config=SAMPLE / "model.json" if model else None,
        ),
    )
    return workspace


def _context(workspace: Workspace, random_state: int = 0) -> StageContext:
    return StageContext(workspace=workspace, progress=False, random_state=random_state)


def _reference_features(workspace: Workspace) -> np.ndarray:
    """``model.features(normalized)`` of every sample, computed here without robustlens."""
    network = torch.jit.load(str(SAMPLE / "model.pt")).eval()
    pixels = np.stack(
        [np.asarray(Image.open(workspace.image_path(p)), dtype=np.float32) / 255.0 for p in workspace.samples["path"]]
    )
    with torch.no_grad():
        return network.features((torch.from_numpy(pixels)[:, None] - MEAN) / STD).numpy()


@pytest.fixture(scope="module")
def model_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("emb_model")
    _dataset(tmp, 150)
    workspace = _workspace(tmp)
    summary = embeddings.run(_context(workspace), embeddings.Config())
    return workspace, summary


def test_model_penultimate_equals_model_features(model_run):
    workspace, summary = model_run
    assert summary["source"] == "model" and summary["layer"] == "model.features" and summary["dim"] == 64
    stored = np.load(workspace.artifact_path("embeddings.npy"))
    reference = _reference_features(workspace)
    expected = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    assert stored.shape == (150, 64) and stored.dtype == np.float32
    np.testing.assert_allclose(stored, expected, atol=1e-5)


def test_rows_are_unit_length_and_artifacts_recorded(model_run):
    workspace, _ = model_run
    stored = np.load(workspace.artifact_path("embeddings.npy"))
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    index = json.loads(workspace.artifact_path("index.json").read_text())
    assert index["embeddings"]["source"] == "model" and index["embeddings"]["dim"] == 64
    assert "Penultimate" in index["embeddings"]["description"]
    thumbnails = np.load(workspace.artifact_path("thumbnails.npy"))
    assert thumbnails.shape == (150, 32, 32) and thumbnails.dtype == np.uint8
    visual = np.load(workspace.artifact_path("visual_features.npy"))
    assert visual.shape[0] == 150 and visual.shape[1] <= 64


def test_rerun_is_skipped_and_new_images_only_are_computed(tmp_path):
    _dataset(tmp_path, 40)
    workspace = _workspace(tmp_path)
    first = embeddings.run(_context(workspace), embeddings.Config())
    assert first["computed"] == 40 and first["skipped"] is False
    assert embeddings.run(_context(workspace), embeddings.Config())["skipped"] is True
    before = np.load(workspace.artifact_path("embeddings.npy"))
    _dataset(tmp_path, 10, start=40)
    workspace = _workspace(tmp_path, force=True)
    grown = embeddings.run(_context(workspace), embeddings.Config())
    assert grown["skipped"] is False and grown["computed"] == 10
    after = np.load(workspace.artifact_path("embeddings.npy"))
    np.testing.assert_array_equal(after[:40], before)  # cached vectors reused unchanged


def test_deterministic_across_runs(tmp_path):
    _dataset(tmp_path, 30)
    first = _workspace(tmp_path, model=False)
    embeddings.run(_context(first), embeddings.Config())
    a = np.load(first.artifact_path("embeddings.npy"))
    shutil.rmtree(first.artifact_path(""))
    embeddings.run(_context(first), embeddings.Config())
    np.testing.assert_array_equal(np.load(first.artifact_path("embeddings.npy")), a)


def test_fallback_without_model(tmp_path):
    _dataset(tmp_path, 60)
    workspace = _workspace(tmp_path, model=False)
    summary = embeddings.run(_context(workspace), embeddings.Config())
    assert summary["source"] == "fallback"
    stored = np.load(workspace.artifact_path("embeddings.npy"))
    assert stored.shape[0] == 60 and 1 <= stored.shape[1] <= 64
    np.testing.assert_allclose(np.linalg.norm(stored, axis=1), 1.0, atol=1e-5)
    description = json.loads(workspace.artifact_path("index.json").read_text())["embeddings"]["description"]
    assert "near duplicates" in description and "NOT" in description and "label" in description
    # the same garment class is closer in the fallback space than different classes, on average
    labels = workspace.samples["label"].to_numpy()
    similarity = stored @ stored.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean()


def test_imported_embeddings_take_priority(tmp_path):
    _dataset(tmp_path, 20)
    vectors = np.random.default_rng(0).normal(size=(20, 7)).astype(np.float32)
    np.save(tmp_path / "emb.npy", vectors)
    workspace = _workspace(tmp_path, embeddings_file=tmp_path / "emb.npy")
    summary = embeddings.run(_context(workspace), embeddings.Config())
    assert summary["source"] == "imported" and summary["dim"] == 7
    expected = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_allclose(np.load(workspace.artifact_path("embeddings.npy")), expected, atol=1e-6)
    with pytest.raises(ValueError, match="source"):
        embeddings.run(_context(workspace), embeddings.Config(source="pixels"))


class _EagerNet(nn.Module):
    """Two Linear layers registered in the reverse of their execution order."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(5, 3)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x))


def test_eager_model_uses_input_of_last_executed_linear():
    net = _EagerNet().eval()
    wrapped = NormalizedModel(net, ModelConfig(input_size=(4, 4), channels=1, mean=[0.5], std=[0.25]))
    extract, layer = embeddings.penultimate_extractor(wrapped)
    images = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        features = extract(images)
        expected = net.body((images - 0.5) / 0.25)
    assert layer == "input of the last nn.Linear"
    torch.testing.assert_close(features, expected)
    # the hooks are removed after each call
    assert not net.head._forward_pre_hooks and not net.body[1]._forward_pre_hooks


def test_models_without_reachable_penultimate_layer_use_logits():
    class Pool(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3)).repeat(1, 3)

    scripted = torch.jit.script(Pool())
    for network in (Pool(), scripted):
        wrapped = NormalizedModel(network, ModelConfig(input_size=(4, 4), channels=1, mean=[0.0], std=[1.0]))
        extract, layer = embeddings.penultimate_extractor(wrapped)
        assert layer == "logits"
        assert extract(torch.rand(2, 1, 4, 4)).shape == (2, 3)


def test_neighbor_graph_is_exact_and_shared(model_run):
    workspace, _ = model_run
    context = _context(workspace)
    indices, distances = embeddings.neighbor_graph(context, 5)
    stored = np.load(workspace.artifact_path("embeddings.npy")).astype(np.float64)
    cosine = stored @ stored.T
    np.fill_diagonal(cosine, -np.inf)
    expected = np.argsort(-cosine, axis=1, kind="stable")[:, :5]
    np.testing.assert_allclose(1.0 - distances, np.take_along_axis(cosine, expected, 1), atol=1e-5)
    assert (indices != np.arange(len(indices))[:, None]).all()
    written = workspace.artifact_path("knn_indices.npy").stat().st_mtime_ns
    again, _ = embeddings.neighbor_graph(context, 10)  # within the stored 15: loaded, not recomputed
    assert workspace.artifact_path("knn_indices.npy").stat().st_mtime_ns == written
    np.testing.assert_array_equal(again[:, :5], indices)


def test_projection_is_deterministic_and_cached(model_run):
    workspace, _ = model_run
    first = projection.run(_context(workspace), projection.Config())
    assert first["skipped"] is False and first["method"] == "umap"
    layout = pd.read_parquet(workspace.artifact_path("projection.parquet"))
    assert list(layout.columns) == ["id", "x", "y"]
    assert layout["id"].tolist() == workspace.samples["id"].tolist()
    assert np.isfinite(layout[["x", "y"]].to_numpy()).all()
    assert projection.run(_context(workspace), projection.Config())["skipped"] is True
    workspace.artifact_path("projection.parquet").unlink()
    projection.run(_context(workspace), projection.Config())
    again = pd.read_parquet(workspace.artifact_path("projection.parquet"))
    np.testing.assert_array_equal(again[["x", "y"]].to_numpy(), layout[["x", "y"]].to_numpy())
    projection.run(_context(workspace, random_state=1), projection.Config())
    other = pd.read_parquet(workspace.artifact_path("projection.parquet"))
    assert not np.allclose(other[["x", "y"]].to_numpy(), layout[["x", "y"]].to_numpy())


def test_projection_keeps_classes_together(model_run):
    """The model separates garment classes well: 2-D neighbours mostly share a label (chance: ~0.1)."""
    from sklearn.neighbors import NearestNeighbors

    workspace, _ = model_run
    projection.run(_context(workspace), projection.Config())
    points = pd.read_parquet(workspace.artifact_path("projection.parquet"))[["x", "y"]].to_numpy()
    labels = workspace.samples["label"].to_numpy()
    neighbours = NearestNeighbors(n_neighbors=5).fit(points).kneighbors(None, return_distance=False)
    agreement = (labels[neighbours] == labels[:, None]).mean()
    print(f"2-D 5-NN label agreement: {agreement:.2f}")
    assert agreement > 0.6


def test_projection_of_tiny_dataset_uses_pca(tmp_path):
    _dataset(tmp_path, 5)
    workspace = _workspace(tmp_path, model=False)
    embeddings.run(_context(workspace), embeddings.Config())
    summary = projection.run(_context(workspace), projection.Config())
    assert summary["method"] == "pca"
    assert pd.read_parquet(workspace.artifact_path("projection.parquet")).shape == (5, 3)


def test_auto_epochs_bounded_for_large_datasets():
    config = projection.Config()
    assert projection.auto_epochs(2_000, config) == 500
    assert projection.auto_epochs(20_000, config) == 200
    assert projection.auto_epochs(70_000, config) == 57
    assert projection.auto_epochs(1_000_000, config) == config.min_epochs


def test_approximate_search_matches_exact_search_and_is_deterministic(model_run):
    """Above EXACT_SEARCH_MAX_SAMPLES the graph comes from faiss HNSW: checked against the exact search on
    the sample model's embeddings (with planted exact copies, whose self must still be left out)."""
    from sklearn.neighbors import NearestNeighbors

    workspace, _ = model_run
    stored = np.load(workspace.artifact_path("embeddings.npy"))
    vectors = np.concatenate([stored, stored[:50]])  # 50 rows with an identical twin
    k = 10
    approx_i, approx_d = embeddings.hnsw_search(vectors, k)
    again_i, again_d = embeddings.hnsw_search(vectors, k)
    np.testing.assert_array_equal(approx_i, again_i)
    np.testing.assert_array_equal(approx_d, again_d)
    assert approx_i.shape == (len(vectors), k) and approx_i.dtype == np.int64
    assert (approx_i != np.arange(len(vectors))[:, None]).all()
    assert (np.diff(approx_d, axis=1) >= -1e-6).all()
    exact_d, exact_i = NearestNeighbors(n_neighbors=k).fit(vectors).kneighbors(None)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(approx_i, exact_i, strict=True)])
    print(f"HNSW recall@{k}: {recall:.4f}")
    assert recall >= 0.98
    np.testing.assert_allclose(approx_d[:, 0], exact_d[:, 0], atol=1e-5)  # nearest distance found
    twins = np.arange(50)
    assert (approx_i[twins, 0] == twins + len(stored)).all() or np.allclose(approx_d[twins, 0], 0.0, atol=1e-5)


def test_neighbor_graph_switches_to_approximate_search_above_the_limit(model_run, monkeypatch):
    workspace, _ = model_run
    monkeypatch.setattr(embeddings, "EXACT_SEARCH_MAX_SAMPLES", 100)
    context = _context(workspace)
    indices, distances = embeddings.neighbor_graph(context, 5)
    assert embeddings.artifact_entry(workspace, "knn_indices")["method"] == "hnsw"
    stored = np.load(workspace.artifact_path("embeddings.npy")).astype(np.float64)
    cosine = np.einsum("ij,ikj->ik", stored, stored[indices])
    np.testing.assert_allclose(1.0 - distances, cosine, atol=1e-5)


def test_fallback_reduction_equals_pca_of_standardised_descriptors():
    """fit_reduce works in float32 for speed: its scores still equal scikit-learn's float64 PCA of the
    standardised descriptors, up to each component's sign, to 1e-5 relative."""
    from sklearn.decomposition import PCA

    from robustlens.analysis import fallback_features

    rng = np.random.default_rng(1)
    raw = (rng.normal(size=(3000, 40)) @ rng.normal(size=(40, 120)) + 5.0).astype(np.float32)
    raw[:, 7] = 0.25  # a constant feature stays at zero instead of dividing by zero
    ours = fallback_features.fit_reduce(raw, 16)
    assert ours.dtype == np.float32 and ours.shape == (3000, 16)
    data = raw.astype(np.float64)
    scale = data.std(0)
    standard = (data - data.mean(0)) / np.where(scale > 1e-8, scale, 1.0)
    reference = PCA(16, svd_solver="full").fit_transform(standard)
    signs = np.sign((ours * reference).sum(0))
    np.testing.assert_allclose(ours * signs, reference, atol=1e-5 * np.abs(reference).max())
