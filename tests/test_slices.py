"""Slice stage: a planted weak slice on real sample images is discovered; the search matches brute force."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis import storage
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import slices
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace
from tests.conftest import SAMPLE_DATA

PLANTED_CLASS, PLANTED_CAMERA, PLANTED_ERROR, BASE_ERROR = "coat", "c3", 0.6, 0.08


def _synthetic_predictions(labels: np.ndarray, wrong: np.ndarray, classes: list[str], rng) -> pd.DataFrame:
    """Probabilities whose argmax is the label unless ``wrong`` (then a random other class)."""
    k = len(classes)
    index = pd.Series(np.arange(k), index=classes)[labels].to_numpy()
    top = np.where(wrong, (index + rng.integers(1, k, len(index))) % k, index)
    probabilities = np.full((len(index), k), 0.25 / (k - 1))
    probabilities[np.arange(len(index)), top] = 0.75
    return pd.DataFrame(probabilities, columns=classes)


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    """Real sample images; metadata camera (c0–c3) and site; ``camera = c3 AND label = coat`` errs 60 %,
    three ``site = lab`` samples err always, everything else 8 %. Synthetic metrics, embeddings, flags."""
    tmp = tmp_path_factory.mktemp("slices")
    rng = np.random.default_rng(11)
    manifest = pd.read_csv(SAMPLE_DATA / "labels.csv")
    n = len(manifest)
    manifest["camera"] = rng.choice(["c0", "c1", "c2", "c3"], n)
    in_slice = (manifest["camera"] == PLANTED_CAMERA).to_numpy() & (manifest["label"] == PLANTED_CLASS).to_numpy()
    manifest["site"] = "field"
    tiny = rng.choice(np.flatnonzero(~in_slice), 3, replace=False)
    manifest.loc[tiny, "site"] = "lab"
    wrong = rng.random(n) < np.where(in_slice, PLANTED_ERROR, BASE_ERROR)
    wrong[tiny] = True
    manifest.to_csv(tmp / "labels.csv", index=False)
    classes = sorted(manifest["label"].unique())
    predictions = _synthetic_predictions(manifest["label"].to_numpy(), wrong, classes, rng)
    predictions.insert(0, "path", manifest["path"])
    predictions.to_csv(tmp / "predictions.csv", index=False)
    workspace, _ = init_workspace(
        tmp / "ws",
        InitOptions(
            data=SAMPLE_DATA,
            labels=tmp / "labels.csv",
            predictions=[("synthetic", tmp / "predictions.csv")],
            progress=False,
        ),
    )
    ids = workspace.samples["id"].to_numpy()
    brightness = rng.uniform(size=n)
    # brightness_copy repeats brightness under another name (as mean_r does for grayscale images).
    storage.write_parquet(
        workspace.artifact_path("metrics.parquet"),
        pd.DataFrame(
            {"id": ids, "brightness": brightness, "contrast": rng.normal(size=n), "brightness_copy": brightness}
        ),
    )
    embeddings = rng.normal(size=(n, 16)).astype(np.float32)
    storage.write_npy(
        workspace.artifact_path("embeddings.npy"), embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    )
    dark = rng.random(n) < 0.05
    storage.write_parquet(
        workspace.artifact_path("flags_quality_flags.parquet"),
        pd.DataFrame({"id": ids[dark], "issue": "dark", "severity": 0.5, "explanation": "synthetic"}),
    )
    summary = slices.run(StageContext(workspace=workspace, progress=False, random_state=3), slices.Config())
    samples = workspace.samples
    mask = (samples["meta.camera"] == PLANTED_CAMERA).to_numpy() & (samples["label"] == PLANTED_CLASS).to_numpy()
    return {"root": workspace.root, "summary": summary, "planted_mask": mask, "dark": dark}


def _is_planted(description: str) -> bool:
    return sorted(description.split(" AND ")) == sorted([f"label = {PLANTED_CLASS}", f"camera = {PLANTED_CAMERA}"])


def test_planted_slice_is_discovered_at_the_top(planted):
    workspace = Workspace(planted["root"])
    worst = pd.read_parquet(workspace.artifact_path("worst_slices.parquet"))
    print("\n" + worst[["rank", "description", "size", "error_rate", "score"]].head(5).to_string())
    hits = worst[worst["description"].map(_is_planted)]
    assert len(hits) == 1 and hits["rank"].iloc[0] <= 2
    top = slices.slice_mask(workspace, worst.iloc[0])
    overlap = (top & planted["planted_mask"]).sum() / (top | planted["planted_mask"]).sum()
    assert overlap >= 0.5
    assert planted["summary"]["min_support"] == 20 and planted["summary"]["skipped"] is False


def test_tiny_all_wrong_slice_does_not_outrank_the_planted_one(planted):
    workspace = Workspace(planted["root"])
    table = pd.read_parquet(workspace.artifact_path("slices.parquet")).set_index("description")
    tiny = table.loc["site = lab"]
    assert tiny["size"] == 3 and tiny["error_rate"] == 1.0 and not tiny["searched"]
    planted_row = table[table.index.map(_is_planted)].iloc[0]
    assert tiny["score"] < planted_row["score"]
    worst = pd.read_parquet(workspace.artifact_path("worst_slices.parquet"))
    assert "site = lab" not in set(worst["description"])

    # Even when tiny slices may be searched, the size term of the score keeps them below the planted one.
    context = StageContext(workspace=workspace, progress=False, random_state=3)
    slices.run(context, slices.Config(min_support=3))
    worst = pd.read_parquet(workspace.artifact_path("worst_slices.parquet")).set_index("description")
    planted_rank = worst[worst.index.map(_is_planted)]["rank"].iloc[0]
    assert planted_rank <= 2
    assert "site = lab" not in worst.index or worst.loc["site = lab", "rank"] > planted_rank
    slices.run(context, slices.Config())  # restore the default artifacts for the other tests


def test_worst_slices_do_not_repeat_member_sets(planted):
    workspace = Workspace(planted["root"])
    worst = pd.read_parquet(workspace.artifact_path("worst_slices.parquet"))
    assert worst["members_digest"].is_unique
    assert not worst["description"].str.contains("brightness_copy").any()
    table = pd.read_parquet(workspace.artifact_path("slices.parquet"))
    table = table[table["n_conditions"] == 1]
    copies = table[table["description"].str.startswith("brightness_copy in Q")]
    originals = table[table["description"].str.startswith("brightness in Q")]
    assert len(copies) == 4 and not copies["searched"].any()
    assert sorted(copies["members_digest"]) == sorted(originals["members_digest"])


def test_confidence_intervals_contain_the_true_rates(planted):
    table = pd.read_parquet(Workspace(planted["root"]).artifact_path("slices.parquet"))
    planted_row = table[table["description"].map(_is_planted)].iloc[0]
    assert planted_row["ci_low"] <= PLANTED_ERROR <= planted_row["ci_high"]
    assert planted_row["size"] == planted["planted_mask"].sum()
    camera_rows = table[table["description"].str.startswith("camera = c") & (table["n_conditions"] == 1)]
    normal = camera_rows[camera_rows["description"] != f"camera = {PLANTED_CAMERA}"]
    # Other cameras mix 8 % errors with a little of the weak class; 8 % lies inside or just below.
    assert (normal["ci_low"] <= BASE_ERROR + 0.01).all()
    assert ((table["ci_low"] <= table["error_rate"]) & (table["error_rate"] <= table["ci_high"])).all()


def test_slice_mask_reproduces_every_slice(planted):
    workspace = Workspace(planted["root"])
    table = pd.read_parquet(workspace.artifact_path("slices.parquet"))
    for _, row in table.iterrows():
        assert slices.slice_mask(workspace, row).sum() == row["size"]
    planted_row = table[table["description"].map(_is_planted)].iloc[0]
    assert np.array_equal(slices.slice_mask(workspace, planted_row["slice_id"]), planted["planted_mask"])
    assert slices.slice_mask(workspace, "all").all()
    members = slices.slice_members(workspace, planted_row)
    assert set(members) == set(workspace.samples["id"][planted["planted_mask"]])
    with pytest.raises(KeyError):
        slices.slice_mask(workspace, "no-such-slice")


def test_slice_statistics_agree_with_direct_computation(planted):
    workspace = Workspace(planted["root"])
    table = pd.read_parquet(workspace.artifact_path("slices.parquet")).set_index("description")
    samples = workspace.samples
    correct = workspace.predictions("synthetic").argmax(axis=1) == samples["label_index"].to_numpy()
    for name in workspace.classes:
        row = table.loc[f"label = {name}"]
        assert row["accuracy"] == pytest.approx(correct[(samples["label"] == name).to_numpy()].mean())
        assert row["accuracy.synthetic"] == row["accuracy"]
    overall = table.loc["all samples"]
    assert overall["size"] == len(samples) and overall["gap"] == 0
    assert overall["issue_rate.dark"] == pytest.approx(planted["dark"].mean())
    assert table.loc["flagged dark", "issue_rate.dark"] == 1.0
    kinds = set(table["kind"])
    assert {"class", "metadata", "metric", "cluster", "issue", "all"} <= kinds
    predicates = pd.read_parquet(workspace.artifact_path("slice_predicates.parquet"))
    assert (predicates["kind"] == "cluster").sum() == slices.default_cluster_count(len(samples), 30)
    assert (
        slices.run(StageContext(workspace=workspace, progress=False, random_state=3), slices.Config())["skipped"]
        is True
    )


def brute_force_top(
    masks: np.ndarray,
    features: np.ndarray,
    errors: np.ndarray,
    *,
    min_support: int,
    max_conditions: int,
    alpha: float,
    top_k: int,
) -> list[float]:
    """Scores of the ``top_k`` best non-redundant conjunctions, by enumerating all of them."""
    n, mean_error = masks.shape[1], errors.mean()
    sizes: dict[tuple[int, ...], int] = {}
    scores = []
    for length in range(1, max_conditions + 1):
        for ids in combinations(range(len(masks)), length):
            if len(set(features[list(ids)])) < length:
                continue
            members = masks[list(ids)].all(axis=0)
            size, wrong = int(members.sum()), int(errors[members].sum())
            sizes[ids] = size
            redundant = any(sizes[sub] == size for sub in combinations(ids, length - 1) if sub)
            if size >= min_support and wrong > 0 and not redundant:
                scores.append(alpha * ((wrong / size) / mean_error - 1) - (1 - alpha) * (n / size - 1))
    return sorted(scores, reverse=True)[:top_k]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_finds_the_same_top_slices_as_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 600
    columns = [rng.integers(0, levels, n) for levels in (3, 4, 2, 4, 3)]
    masks = np.array([column == level for column in columns for level in range(column.max() + 1)])
    features = np.array([f for f, column in enumerate(columns) for _ in range(column.max() + 1)])
    weak = (columns[0] == 1) & (columns[1] == 2)
    errors = rng.random(n) < np.where(weak, 0.5, 0.1)
    found = slices.search_slices(
        slices.pack_rows(masks),
        features,
        np.ones(len(masks), dtype=bool),
        slices.pack_rows(errors[None, :])[0],
        num_samples=n,
        min_support=15,
        max_conditions=3,
        alpha=0.95,
        top_k=8,
    )
    expected = brute_force_top(masks, features, errors, min_support=15, max_conditions=3, alpha=0.95, top_k=8)
    assert np.allclose(found["score"].head(8), expected)
    best = found["predicate_ids"].iloc[0]
    assert set(features[list(best)]) >= {0, 1}


def test_count_conjunctions_matches_numpy():
    rng = np.random.default_rng(5)
    masks = rng.random((6, 1000)) < 0.5
    targets = rng.random((2, 1000)) < 0.3
    candidates = np.array([[0, 1, 2], [3, 3, 3], [1, 4, 5]])
    sizes, hits = slices.count_conjunctions(slices.pack_rows(masks), candidates, slices.pack_rows(targets))
    for row, ids in enumerate(candidates):
        members = masks[ids].all(axis=0)
        assert sizes[row] == members.sum()
        assert hits[row].tolist() == [(members & t).sum() for t in targets]


@pytest.fixture(scope="module")
def bare_workspace(tmp_path_factory) -> Path:
    """40 sample images with two splits and no predictions, metrics or embeddings."""
    tmp = tmp_path_factory.mktemp("bare_slices")
    manifest = pd.read_csv(SAMPLE_DATA / "labels.csv").head(40)
    manifest["split"] = np.where(np.arange(40) % 2, "train", "test")
    manifest.to_csv(tmp / "labels.csv", index=False)
    workspace, _ = init_workspace(tmp / "ws", InitOptions(data=SAMPLE_DATA, labels=tmp / "labels.csv", progress=False))
    return workspace.root


def test_without_predictions_slices_degrade_and_say_so(bare_workspace):
    workspace = Workspace(bare_workspace)
    summary = slices.run(StageContext(workspace=workspace, progress=False), slices.Config())
    notes = " ".join(summary["notes"])
    assert "no predictions" in notes and "metrics.parquet is missing" in notes and "no embeddings" in notes
    assert "identifier" in notes  # meta.source_index holds distinct integers
    table = pd.read_parquet(workspace.artifact_path("slices.parquet"))
    assert table["accuracy"].isna().all() and table.loc[0, "size"] == 40
    assert set(table["kind"]) == {"all", "class", "split"}
    assert len(pd.read_parquet(workspace.artifact_path("worst_slices.parquet"))) == 0
    with pytest.raises(ValueError, match="unknown prediction set"):
        slices.run(StageContext(workspace=workspace, progress=False), slices.Config(prediction_set="x"))


# -- a slice as a filter (the explorer opens a slice's members) ------------------------------------------------


def _satisfies(table: pd.DataFrame, predicate: pd.Series, clusters: pd.Series) -> np.ndarray:
    """Whether each row of the sample table meets one base predicate, recomputed from the table's columns."""
    feature, kind = predicate["feature"], predicate["kind"]
    if kind == "class":
        return (table["label"].astype(str) == predicate["value"]).to_numpy()
    if kind == "cluster":
        return (table["id"].map(clusters) == int(predicate["value"])).to_numpy()
    if kind == "issue":
        return (table[feature].fillna(0) > 0).to_numpy()
    column = feature if kind == "metadata" else f"metric.{feature}"
    if np.isnan(predicate["lower"]):
        return (table[column].astype(str) == predicate["value"]).to_numpy()
    values = table[column].to_numpy(dtype=float)
    return (values >= predicate["lower"]) & (values <= predicate["upper"])


def test_a_slice_filter_keeps_exactly_the_slice_members(planted):
    from robustlens.query.filters import (
        FilterError,
        FilterSpec,
        apply_filter,
        filter_ids,
        from_query_params,
        prune_spec,
        to_query_params,
    )
    from robustlens.query.sample_table import load_sample_table
    from robustlens.query.slices import load_slice_membership

    workspace = Workspace(planted["root"])
    table = load_sample_table(workspace)
    membership = load_slice_membership(workspace)
    all_slices = pd.read_parquet(workspace.artifact_path("slices.parquet"))
    worst = pd.read_parquet(workspace.artifact_path("worst_slices.parquet"))
    predicates = pd.read_parquet(workspace.artifact_path("slice_predicates.parquet")).set_index("predicate_id")
    clusters = pd.read_parquet(workspace.artifact_path("slice_clusters.parquet")).set_index("id")["cluster"]
    kinds_of = all_slices["predicate_ids"].map(lambda ids: {predicates.loc[i, "kind"] for i in ids})
    chosen = [all_slices[all_slices["kind"] == kind].iloc[0] for kind in ("class", "metadata", "metric", "cluster")]
    chosen += [all_slices[all_slices["n_conditions"] == n].iloc[0] for n in (2, 3)]
    chosen.append(all_slices[(all_slices["n_conditions"] > 1) & kinds_of.map(lambda k: "metric" in k)].iloc[0])
    chosen.append(
        all_slices[(all_slices["n_conditions"] > 1) & kinds_of.map(lambda k: bool(k & {"metadata", "class"}))].iloc[0]
    )
    chosen += [worst.iloc[0], worst.iloc[-1]]
    for row in chosen:
        spec = FilterSpec(slice=row["slice_id"])
        mask = apply_filter(table, spec, slices=membership)
        assert mask.sum() == row["size"], row["description"]
        expected = np.ones(len(table), dtype=bool)
        for i in row["predicate_ids"]:
            expected &= _satisfies(table, predicates.loc[i], clusters)
        assert np.array_equal(mask, expected), row["description"]
        # The URL (a shared link) and the stored form keep the slice; it combines with other conditions.
        params = to_query_params(spec)
        assert params == {"slice": row["slice_id"]}
        assert from_query_params(params) == spec == FilterSpec.from_json(spec.to_json())
        narrowed = filter_ids(table, FilterSpec(slice=row["slice_id"], labels=["coat"]), slices=membership)
        assert set(narrowed) == set(table["id"][mask & (table["label"] == "coat").to_numpy()])
    planted_row = all_slices[all_slices["description"].map(_is_planted)].iloc[0]
    assert np.array_equal(
        apply_filter(table, FilterSpec(slice=planted_row["slice_id"]), slices=membership), planted["planted_mask"]
    )
    assert "in slice" in " ".join(FilterSpec(slice=planted_row["slice_id"]).describe())

    # An unknown slice (an old link) is an explained error, and pruned from a link's filter.
    with pytest.raises(FilterError, match="no slice"):
        apply_filter(table, FilterSpec(slice="s-not-there"), slices=membership)
    pruned, problems = prune_spec(table, FilterSpec(slice="s-not-there", labels=["coat"]), slices=membership)
    assert pruned == FilterSpec(labels=["coat"]) and problems
    # A table not loaded from a workspace cannot resolve slices.
    with pytest.raises(FilterError, match="sample table of a workspace"):
        apply_filter(pd.DataFrame({"id": ["a"]}), FilterSpec(slice=planted_row["slice_id"]))
