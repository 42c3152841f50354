"""``robustlens analyze`` skips and reports dataset files refused at read time, and finishes the run.

Issue 9, "reads that stay inside": after ``init`` one image is replaced by a symlink to a file outside the dataset
root, or overwritten with other content. The run must not read the outside file, must not use the changed content,
must say which files it skipped and why (CLI and ``artifacts/refused_files.json``), give those samples NaN metrics,
leave them out of the embedding-based stages, and run every stage for the other samples (exit 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens import cli
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages.base import excluded_rows, read_refused
from robustlens.analysis.workspace import Workspace
from robustlens.query.filters import apply_filter, from_query_params
from robustlens.query.sample_table import load_sample_table
from tests.conftest import write_image

CLASSES = ("coat", "bag", "shoe")
PER_CLASS = 5  # 15 samples: below the projection stage's UMAP minimum (16), which keeps the test fast
STAGES_WITH_OUTPUT = ("metrics", "fingerprints", "projection", "duplicates", "outliers", "label_issues", "slices")


@pytest.fixture
def dataset(tmp_path) -> Path:
    """3 classes × 7 PNGs, each class a distinct mean colour, plus one exact duplicate pair (bag/3 = bag/4)."""
    data = tmp_path / "DATA"
    for c, label in enumerate(CLASSES):
        for i in range(PER_CLASS):
            write_image(data / label / f"{i}.png", seed=100 * c + i, size=(16, 12))
    (data / "bag" / "4.png").write_bytes((data / "bag" / "3.png").read_bytes())
    return data


@pytest.fixture
def workspace(tmp_path, dataset) -> Workspace:
    return init_workspace(tmp_path / "ws", InitOptions(data=dataset, progress=False))[0]


@pytest.fixture
def secret(tmp_path) -> Path:
    """A valid image outside the dataset root: only the guard can stop it being used."""
    return write_image(tmp_path / "outside" / "secret.png", seed=4242, size=(16, 12))


def opened_paths(monkeypatch) -> list[str]:
    """Real paths of every file whose bytes robustlens read (``images._read_bytes`` returned)."""
    from robustlens.analysis import images

    seen: list[str] = []
    real = images._read_bytes

    def recording(path, **kwargs):
        data = real(path, **kwargs)
        seen.append(os.path.realpath(path))
        return data

    monkeypatch.setattr(images, "_read_bytes", recording)
    return seen


def row_of(workspace: Workspace, relative: str) -> int:
    return workspace.samples["path"].tolist().index(relative)


def artifact(workspace: Workspace, name: str) -> pd.DataFrame:
    return pd.read_parquet(workspace.artifact_path(f"{name}.parquet"))


def assert_skipped_everywhere(workspace: Workspace, bad: int) -> None:
    """Sample ``bad`` has NaN / no results in every stage; every other sample has real ones."""
    n = len(workspace.samples)
    others = np.arange(n) != bad
    metrics = artifact(workspace, "metrics")
    pixel_columns = [c for c in ("brightness", "contrast", "blur_score", "entropy") if c in metrics.columns]
    assert pixel_columns, metrics.columns
    assert metrics.loc[bad, pixel_columns].isna().all()
    assert metrics.loc[others, pixel_columns].notna().all().all()
    # Record metrics come from the sample table of init, not from the file: still there.
    assert metrics.loc[bad, "width"] == 16
    prints = artifact(workspace, "fingerprints")
    assert pd.isna(prints.loc[bad, "pixel_hash"]) and prints.loc[others, "pixel_hash"].notna().all()
    assert excluded_rows(workspace).tolist() == (~others).tolist()
    embeddings = np.load(workspace.artifact_path("embeddings.npy"))
    assert not embeddings[bad].any() and np.allclose(np.linalg.norm(embeddings[others], axis=1), 1.0, atol=1e-4)
    projection = artifact(workspace, "projection")
    assert projection.loc[bad, ["x", "y"]].isna().all() and projection.loc[others, ["x", "y"]].notna().all().all()
    outliers = artifact(workspace, "outliers")
    assert np.isnan(outliers.loc[bad, "outlier_score"]) and not outliers.loc[bad, "is_outlier"]
    assert outliers.loc[others, "outlier_score"].notna().all()
    knn = np.load(workspace.artifact_path("knn_indices.npy"))
    assert not (knn[others] == bad).any()  # nobody has the skipped sample as a neighbour
    labels = artifact(workspace, "label_issues")
    assert np.isnan(labels.loc[bad, "label_quality"]) and not labels.loc[bad, "is_label_issue"]
    assert labels.loc[others, "label_quality"].notna().all()
    assert sorted(labels["rank"].tolist()) == list(range(1, n + 1))
    pairs = artifact(workspace, "duplicate_pairs")
    ids = workspace.samples["id"].to_numpy()
    assert ids[bad] not in set(pairs.iloc[:, 0]) | set(pairs.iloc[:, 1])
    clusters = (
        artifact(workspace, "slice_clusters") if workspace.artifact_path("slice_clusters.parquet").exists() else None
    )
    if clusters is not None:
        assert clusters.set_index("id").loc[ids[bad], "cluster"] == -1


def test_symlink_swapped_in_is_skipped_reported_and_never_read(workspace, secret, monkeypatch, capsys):
    relative = "coat/3.png"
    bad = row_of(workspace, relative)
    path = workspace.image_path(relative)
    path.unlink()
    path.symlink_to(secret)
    opened = opened_paths(monkeypatch)

    assert cli.main(["analyze", str(workspace.root), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert relative in err and "resolves outside the dataset root" in err and "Traceback" not in err
    assert os.path.realpath(secret) not in opened
    # Every other file was read (metrics decoded each distinct content once; the embeddings reused the pixels).
    distinct = workspace.samples.drop_duplicates("content_hash")["path"]
    dataset_files = {os.path.realpath(workspace.image_path(p)) for p in distinct if p != relative}
    assert dataset_files <= set(opened)

    report = read_refused(workspace)
    assert report["count"] == 1
    entry = report["files"][0]
    assert (entry["path"], entry["kind"], entry["index"]) == (relative, "outside_root", bad)
    assert set(entry["stages"]) == {"metrics", "embeddings"}
    assert_skipped_everywhere(workspace, bad)
    for name in STAGES_WITH_OUTPUT:
        assert workspace.artifact_path(f"{name}.parquet").exists(), name
    # The exact duplicate pair elsewhere is still found: the stages ran for the other samples.
    duplicates = artifact(workspace, "duplicate_pairs")
    ids = workspace.samples["id"].to_numpy()
    pair = {ids[row_of(workspace, "bag/3.png")], ids[row_of(workspace, "bag/4.png")]}
    assert any({a, b} == pair for a, b in duplicates.iloc[:, :2].itertuples(index=False))


def test_content_changed_since_init_is_skipped_not_used(workspace, capsys):
    relative = "shoe/2.png"
    bad = row_of(workspace, relative)
    write_image(workspace.image_path(relative), seed=777, size=(16, 12))  # edited after init

    assert cli.main(["analyze", str(workspace.root), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert relative in err and "changed since init" in err
    report = read_refused(workspace)
    assert [(e["path"], e["kind"]) for e in report["files"]] == [(relative, "changed_since_init")]
    assert_skipped_everywhere(workspace, bad)
    # Nothing was cached for the new content: the metrics cache holds only the hashes recorded at init.
    cache_hashes = set()
    for chunk in workspace.artifact_path("cache").glob("metrics-*/chunk-*.parquet"):
        cache_hashes |= set(pd.read_parquet(chunk)["content_hash"])
    recorded = set(workspace.samples["content_hash"])
    assert cache_hashes <= recorded
    assert workspace.samples.loc[bad, "content_hash"] not in cache_hashes

    # Put the original back: the next run computes it and the report is cleared.
    write_image(workspace.image_path(relative), seed=100 * CLASSES.index("shoe") + 2, size=(16, 12))
    assert cli.main(["analyze", str(workspace.root), "--quiet"]) == 0
    assert "changed since init" not in capsys.readouterr().err
    assert read_refused(workspace)["count"] == 0
    assert not excluded_rows(workspace).any()
    assert artifact(workspace, "metrics").drop(columns="id").notna().all().all()
    assert artifact(workspace, "projection")[["x", "y"]].notna().all().all()


def test_refused_file_stands_in_by_an_identical_file(workspace, secret, capsys):
    """bag/3.png and bag/4.png have the same content hash: when the first is swapped, the second is decoded for
    the hash, so bag/4 keeps its results and only bag/3 is skipped."""
    path = workspace.image_path("bag/3.png")
    path.unlink()
    path.symlink_to(secret)
    assert cli.main(["analyze", str(workspace.root), "--stages", "metrics,embeddings", "--quiet"]) == 0
    metrics = artifact(workspace, "metrics")
    bad, twin = row_of(workspace, "bag/3.png"), row_of(workspace, "bag/4.png")
    assert np.isnan(metrics.loc[bad, "brightness"]) and not np.isnan(metrics.loc[twin, "brightness"])
    assert excluded_rows(workspace).nonzero()[0].tolist() == [bad]
    assert "bag/3.png" in capsys.readouterr().err


def test_dashboard_table_and_queries_load_with_skipped_samples(workspace):
    relative = "coat/1.png"
    bad = row_of(workspace, relative)
    write_image(workspace.image_path(relative), seed=31337, size=(16, 12))
    assert cli.main(["analyze", str(workspace.root), "--quiet"]) == 0
    table = load_sample_table(workspace)
    assert len(table) == len(workspace.samples)
    brightness = [c for c in table.columns if c.endswith("brightness")]
    assert brightness and np.isnan(table[brightness[0]].iloc[bad])
    for query in ({"label": "coat"}, {"issue": "exact_duplicate"}, {}):
        spec = from_query_params(query)
        selected = np.asarray(apply_filter(table, spec), dtype=bool)
        assert selected.shape == (len(table),)
    coats = np.asarray(apply_filter(table, from_query_params({"label": "coat"})), dtype=bool)
    assert coats.sum() == PER_CLASS and coats[bad]
    summary = json.loads(workspace.artifact_path("index.json").read_text())["metrics"]
    assert summary["skipped_rows"] == [bad]


def test_kept_graph_renumbers_and_refuses_links_to_excluded_rows():
    from robustlens.analysis.stages.embeddings import kept_graph

    indices = np.array([[2, 3], [1, 1], [0, 3], [2, 0]])  # row 1 excluded: points at itself
    distances = np.array([[0.1, 0.2], [np.nan, np.nan], [0.1, 0.3], [0.2, 0.2]], dtype=np.float32)
    kept = np.array([True, False, True, True])
    local, local_distances = kept_graph(indices, distances, kept)
    assert local.tolist() == [[1, 2], [0, 2], [1, 0]]
    assert np.array_equal(local_distances, distances[[0, 2, 3]])
    with pytest.raises(ValueError, match="excluded"):
        kept_graph(np.array([[1, 2], [1, 1], [0, 1]]), distances[:3], np.array([True, False, True]))


def test_every_file_changed_is_a_clear_error_not_a_traceback(workspace, capsys):
    for relative in workspace.samples["path"]:
        write_image(workspace.image_path(relative), seed=999, size=(16, 12))
    assert cli.main(["analyze", str(workspace.root), "--stages", "metrics,embeddings", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "every dataset file was refused" in err and "Traceback" not in err and "bug in robustlens" not in err
    assert read_refused(workspace)["count"] == len(workspace.samples)
    assert artifact(workspace, "metrics")[["brightness", "contrast", "sharpness"]].isna().all().all()
