"""The artifact readers (robustlens.analysis.artifacts) and the query layer's use of them: one embeddings reader,
per-sample validation, slice membership passed in (no disk reach from the filter engine), and the sample-table
column names with the alias map that keeps old saved filters working."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis import artifacts, storage
from robustlens.analysis.curation import CurationStore
from robustlens.analysis.workspace import Workspace
from robustlens.errors import RobustlensError, WorkspaceError
from robustlens.query.filters import FilterError, FilterSpec, apply_filter, filter_ids, from_query_params
from robustlens.query.sample_table import COLUMN_ALIASES, current_column_name, display_name, load_sample_table
from robustlens.query.slices import SliceError, SliceMembership, load_slice_membership

IDS = [f"s{i}" for i in range(10)]


@pytest.fixture
def workspace(tmp_path) -> Workspace:
    """A bare 10-sample workspace (no images needed: the readers only read artifacts)."""
    root = tmp_path / "ws"
    root.mkdir()
    manifest = {
        "format_version": 1,
        "classes": ["a", "b"],
        "dataset": {"root": str(tmp_path), "kind": "folder"},
        "prediction_sets": {},
    }
    (root / "workspace.json").write_text(json.dumps(manifest), encoding="utf-8")
    samples = pd.DataFrame(
        {
            "id": IDS,
            "path": [f"{i}.png" for i in IDS],
            "content_hash": IDS,
            "label": ["a", "b"] * 5,
            "label_index": [0, 1] * 5,
            "split": ["train"] * 10,
        }
    )
    storage.write_parquet(root / "samples.parquet", samples)
    return Workspace(root)


def _import(workspace: Workspace, matrix: np.ndarray) -> None:
    storage.write_npy(workspace.root / "embeddings" / "imported.npy", matrix)
    workspace.write_manifest({**workspace.manifest, "embeddings": {"file": "embeddings/imported.npy", "dim": 3}})


# -- embeddings: one reader ------------------------------------------------------------------------------------
def test_embeddings_reader_prefers_the_stage_output_and_falls_back_to_the_imported(workspace):
    assert artifacts.read_embeddings(workspace) is None
    with pytest.raises(WorkspaceError, match="run the 'embeddings' stage first"):
        artifacts.read_embeddings(workspace, required=True)
    rng = np.random.default_rng(0)
    imported = rng.normal(size=(10, 3)).astype(np.float32)
    _import(workspace, imported)
    found = artifacts.read_embeddings(workspace)
    assert found.origin == "imported" and found.dim == 3 and np.array_equal(found.matrix, imported)
    assert np.allclose(np.linalg.norm(found.normalized(), axis=1), 1.0)
    # The embeddings stage's own reader never falls back to imported vectors.
    with pytest.raises(WorkspaceError, match="run the 'embeddings' stage first"):
        artifacts.read_embeddings(workspace, imported=False, required=True)
    computed = rng.normal(size=(10, 4)).astype(np.float32)
    storage.write_npy(workspace.artifact_path("embeddings.npy"), computed)
    found = artifacts.read_embeddings(workspace)
    assert found.origin == "artifacts/embeddings.npy" and found.dim == 4 and np.array_equal(found.matrix, computed)


def test_the_stage_readers_are_the_one_embeddings_reader(workspace):
    from robustlens.analysis.stages.base import StageContext
    from robustlens.analysis.stages.embeddings import load_embeddings as stage_embeddings
    from robustlens.analysis.stages.label_issues import load_embeddings as label_issue_embeddings

    assert label_issue_embeddings(workspace) == (None, None)
    imported = np.arange(30, dtype=np.float32).reshape(10, 3)
    _import(workspace, imported)
    matrix, origin = label_issue_embeddings(workspace)
    assert origin == "imported" and np.array_equal(matrix, imported)
    with pytest.raises(WorkspaceError, match="embeddings.npy does not exist"):
        stage_embeddings(StageContext(workspace, progress=False))
    storage.write_npy(workspace.artifact_path("embeddings.npy"), imported[:, :2] + 1)
    matrix, digest = stage_embeddings(StageContext(workspace, progress=False))
    assert np.array_equal(matrix, imported[:, :2] + 1) and isinstance(digest, str)
    assert label_issue_embeddings(workspace)[1] == "artifacts/embeddings.npy"


@pytest.mark.parametrize(
    "bad, problem",
    [
        (np.zeros((9, 3), np.float32), "shape"),
        (np.zeros(10, np.float32), "shape"),
        (np.full((10, 3), np.nan, np.float32), "NaN or infinite"),
    ],
)
def test_embeddings_that_do_not_fit_the_samples_name_the_file_and_the_stage(workspace, bad, problem):
    storage.write_npy(workspace.artifact_path("embeddings.npy"), bad)
    with pytest.raises(artifacts.ArtifactError, match=problem) as caught:
        artifacts.read_embeddings(workspace)
    assert caught.value.stage == "embeddings" and caught.value.file.endswith("embeddings.npy")
    assert "re-run the 'embeddings' stage" in str(caught.value) and isinstance(caught.value, RobustlensError)


# -- per-sample tables --------------------------------------------------------------------------------------------
def test_per_sample_artifacts_are_validated_and_aligned_by_id(workspace):
    assert artifacts.read_per_sample(workspace, "metrics") is None
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), pd.DataFrame({"brightness": [0.5]}))
    with pytest.raises(artifacts.ArtifactError, match="artifact 'metrics' has no 'id' column") as caught:
        artifacts.read_per_sample(workspace, "metrics")
    assert caught.value.stage == "metrics"
    repeated = pd.DataFrame({"id": ["s1", "s1"], "g": [1, 2]})
    storage.write_parquet(workspace.artifact_path("duplicates.parquet"), repeated)
    with pytest.raises(artifacts.ArtifactError, match="repeated ids, e.g. 's1'") as caught:
        artifacts.read_per_sample(workspace, "duplicates")
    assert caught.value.stage == "duplicates"
    assert artifacts.stage_of("eval_samples_cnn") == "evaluation" and artifacts.stage_of("slice_clusters") == "slices"
    partial = pd.DataFrame({"id": ["s3", "s0", "zz"], "value": [3.0, 0.0, 99.0]})
    values = artifacts.aligned(partial, pd.Series(IDS))
    assert values.index.equals(pd.RangeIndex(10))
    assert values["value"].iloc[0] == 0.0 and values["value"].iloc[3] == 3.0
    assert values["value"].isna().sum() == 8 and 99.0 not in values["value"].tolist()


# -- column names -----------------------------------------------------------------------------------------------
def test_robustness_columns_join_as_rob_dot_and_the_artifact_keeps_its_names(workspace):
    frame = pd.DataFrame({"id": IDS[::-1], "rob_clean_correct": [True] * 10, "rob_fragility": np.linspace(0, 0.9, 10)})
    storage.write_parquet(workspace.artifact_path("robustness_samples.parquet"), frame)
    table = load_sample_table(workspace)
    assert {"rob.clean_correct", "rob.fragility"} <= set(table.columns)
    assert not [c for c in table.columns if c.startswith("rob_")]
    assert table.set_index("id")["rob.fragility"].to_dict() == frame.set_index("id")["rob_fragility"].to_dict()
    assert list(pd.read_parquet(workspace.artifact_path("robustness_samples.parquet")).columns) == list(frame.columns)
    assert display_name("rob.fragility") == "robustness: fragility"
    # The table no longer carries where it came from: the filter engine reads only what it is given.
    assert not table.attrs


def test_saved_filters_and_links_with_old_column_names_still_load(workspace, tmp_path):
    assert COLUMN_ALIASES == {"rob_": "rob."}
    assert current_column_name("rob_min_l2") == "rob.min_l2" and current_column_name("metric.x") == "metric.x"
    storage.write_parquet(
        workspace.artifact_path("robustness_samples.parquet"),
        pd.DataFrame({"id": IDS, "rob_fragility": np.arange(10) / 10}),
    )
    table = load_sample_table(workspace)
    old = {"ranges": {"rob_fragility": [0.45, None]}, "sort_by": "rob_fragility", "descending": True}
    spec = FilterSpec.from_dict(old)
    assert spec.ranges == {"rob.fragility": [0.45, None]} and spec.sort_by == "rob.fragility"
    assert filter_ids(table, spec) == IDS[5:][::-1]
    assert from_query_params({"r.rob_fragility": "0.45:", "sort": "rob_fragility", "desc": "1"}) == spec
    # A saved filter stored in a curation database before the rename.
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    try:
        store.create_collection("fragile", user="ann", filter_spec=old)
        assert filter_ids(table, FilterSpec(collections=["fragile"]), store) == IDS[5:]
    finally:
        store.close()


# -- slice membership -------------------------------------------------------------------------------------------
def _write_slices(workspace: Workspace, masks: np.ndarray) -> None:
    storage.write_npy(
        workspace.artifact_path("slice_predicate_masks.npy"), np.packbits(masks, axis=1, bitorder="little")
    )
    storage.write_parquet(
        workspace.artifact_path("slices.parquet"),
        pd.DataFrame(
            {
                "slice_id": ["all", "p0", "p1", "p0p1"],
                "predicate_ids": [[], [0], [1], [0, 1]],
                "size": [10, int(masks[0].sum()), int(masks[1].sum()), int((masks[0] & masks[1]).sum())],
            }
        ),
    )


def test_slice_membership_is_the_and_of_the_recorded_predicate_rows(workspace):
    rng = np.random.default_rng(1)
    masks = rng.random((2, 10)) < 0.5
    assert not load_slice_membership(workspace).analysed
    _write_slices(workspace, masks)
    membership = load_slice_membership(workspace)
    slices = pd.read_parquet(workspace.artifact_path("slices.parquet"))
    for row in slices.itertuples():
        expected = np.ones(10, dtype=bool)
        for i in row.predicate_ids:
            expected &= masks[i]
        assert np.array_equal(membership.mask(row.slice_id), expected) and expected.sum() == row.size
    both = masks[0] & masks[1]
    assert membership.members("p0p1", workspace.samples["id"]) == [i for i, m in zip(IDS, both, strict=True) if m]
    with pytest.raises(SliceError, match="no slice 'nope'"):
        membership.mask("nope")
    with pytest.raises(IndexError):
        artifacts.slice_membership(np.packbits(masks, axis=1, bitorder="little"), [2], 10)
    # The stage's own function and the query layer agree (one implementation).
    from robustlens.analysis.stages.slices import slice_mask

    assert np.array_equal(slice_mask(workspace, "p0p1"), membership.mask("p0p1"))


def test_stale_slice_masks_are_a_workspace_error_and_the_filter_never_reads_disk(workspace):
    _write_slices(workspace, np.ones((2, 24), dtype=bool))  # written for 24 samples, the workspace has 10
    with pytest.raises(artifacts.ArtifactError, match="the slices are stale") as caught:
        load_slice_membership(workspace)
    assert caught.value.stage == "slices"
    table = pd.DataFrame({"id": IDS, "label": ["a", "b"] * 5})
    masks = np.zeros((1, 10), dtype=bool)
    masks[0, [1, 4]] = True
    membership = SliceMembership(10, {"all": (), "odd": (0,)}, np.packbits(masks, axis=1, bitorder="little"))
    assert filter_ids(table, FilterSpec(slice="odd"), slices=membership) == ["s1", "s4"]
    assert apply_filter(table, FilterSpec(slice="all"), slices=membership).all()
    with pytest.raises(FilterError, match="the slices are stale"):
        apply_filter(table.head(5), FilterSpec(slice="odd"), slices=membership)
    with pytest.raises(FilterError, match="no slice analysis"):
        apply_filter(table, FilterSpec(slice="odd"), slices=SliceMembership(10))
    assert isinstance(FilterError("x"), ValueError) and isinstance(FilterError("x"), RobustlensError)


def test_slice_table_rows_become_filters_matched_whole(workspace):
    from robustlens.query.slices import class_slice_id, slice_row_filter, slice_row_filters

    masks = np.zeros((2, 10), dtype=bool)
    masks[0, :4] = masks[1, 2:] = True
    _write_slices(workspace, masks)
    membership = load_slice_membership(workspace)
    assert membership.known_ids == {"all", "p0", "p1", "p0p1"}
    assert membership.description("p0") == "p0" and membership.description("gone") == "gone"
    rows = pd.DataFrame(
        {
            "slice_id": ["all", "p0p1", "label=b", "label=b", "gone", None],
            "kind": ["all", "discovered", "class", "metadata", "class", "class"],
        }
    )
    specs = slice_row_filters(rows, membership, classes=["a", "b"])
    assert specs == [FilterSpec(), FilterSpec(slice="p0p1"), FilterSpec(labels=["b"]), None, None, None]
    assert class_slice_id("a=b") == "label=a=b"  # a label holding '=' is still matched whole
    row = {"slice_id": "label=a=b", "kind": "class"}
    assert slice_row_filter(row, membership, ["a=b"]) == FilterSpec(labels=["a=b"])
    # Without recorded masks only the all-samples slice resolves.
    assert SliceMembership(10, {"all": (), "p0": (0,)}).known_ids == {"all"}


def test_column_summaries_and_nearest_samples():
    from robustlens.query.neighbours import nearest_samples
    from robustlens.query.sample_table import category_values, column_bounds

    table = pd.DataFrame(
        {
            "id": IDS,
            "split": ["train"] * 9 + [None],
            "label_index": range(10),
            "metric.x": np.linspace(0, 1, 10),
            "metric.flat": 1.0,
            "metric.none": np.nan,
            "count": np.arange(10),
            "ok": [True] * 10,
            "meta.site": ["a", "b"] * 5,
        }
    )
    assert column_bounds(table) == {"metric.x": (0.0, 1.0, False), "count": (0.0, 9.0, True)}
    assert category_values(table) == {"split": ["train"], "meta.site": ["a", "b"]}
    assert category_values(table, max_values=1) == {"split": ["train"]}
    angles = np.array([0.0, 0.1, 1.0, 3.0, 0.05])
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    found = nearest_samples(unit, 0, k=3)
    assert [i for i, _ in found] == [4, 1, 2] and found[0][1] == pytest.approx(np.cos(0.05))
    assert len(nearest_samples(unit, 0, k=10)) == 4 and nearest_samples(unit[:1], 0) == []


def test_table_summaries_count_what_the_table_holds():
    from robustlens.query.summary import (
        confusion_counts,
        flagged_samples,
        issue_counts,
        most_severe,
        per_class_recall,
        table_accuracy,
    )

    classes = ["a", "b", "c"]
    given = pd.Categorical(["a", "a", "b", "b", "b", "c"], categories=classes)
    predicted = pd.Categorical(["a", "b", "b", "b", "a", "a"], categories=classes)
    table = pd.DataFrame(
        {
            "label": given,
            "pred.m.label": predicted,
            "pred.m.correct": given == predicted,
            "issue.dark": [0.0, 0.9, 0.0, 0.2, 0.9, 0.5],
            "issue.blurry": [0.0] * 5 + [1.0],
            "issue_count": [0, 1, 0, 1, 1, 2],
        }
    )
    counts = confusion_counts(table, "m")
    assert counts.to_numpy().tolist() == [[1, 1, 0], [1, 2, 0], [1, 0, 0]]
    assert list(counts.index) == list(counts.columns) == classes
    recall = per_class_recall(counts)
    assert recall["support"].tolist() == [2, 3, 1] and recall["recall"].tolist() == pytest.approx([0.5, 2 / 3, 0])
    assert table_accuracy(table, "m") == pytest.approx(3 / 6)
    assert issue_counts(table) == {"dark": 4, "blurry": 1} and list(issue_counts(table)) == ["dark", "blurry"]
    assert flagged_samples(table) == 4 and flagged_samples(table.drop(columns="issue_count")) is None
    assert most_severe(table, "dark", 3).tolist() == [1, 4, 5]
    assert most_severe(table, "blurry", 3).tolist() == [5] and most_severe(table, "blurry", 0).size == 0


def test_constant_metrics_are_left_out_and_the_rest_ranked_by_importance():
    from robustlens.query.summary import constant_metrics, varying_metrics

    curves = pd.DataFrame(
        {
            "metric": ["width"] + ["blur"] * 3 + ["brightness"] * 4 + ["entropy"] * 2,
            "bin": [0, 0, 1, 2, 0, 1, 2, 3, 0, 1],
        }
    )
    importance = pd.DataFrame(
        {
            "metric": ["entropy", "brightness", "blur", "width"],
            "mutual_information": [0.3, 0.2, 0.1, np.nan],
            "rank": [1, 2, 3, 4],
        }
    )
    assert constant_metrics(importance, "mutual_information") == ["width"]
    assert varying_metrics(curves, importance) == ["entropy", "brightness", "blur"]
    assert varying_metrics(curves) == ["blur", "brightness", "entropy"]  # no importance: by name
