"""The sample table and the one filter engine: every condition, sorting, URL round trips, saved filters."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis import storage
from robustlens.analysis.curation import CurationStore
from robustlens.analysis.workspace import Workspace
from robustlens.query.filters import (
    LIST_KEYS,
    SCALAR_KEYS,
    FilterError,
    FilterSpec,
    apply_filter,
    filter_ids,
    filter_positions,
    from_query_params,
    prune_spec,
    region_mask,
    to_query_params,
)
from robustlens.query.sample_table import display_name, issue_types, load_sample_table, numeric_columns, prediction_sets


@pytest.fixture(scope="module")
def table(analysed_template) -> pd.DataFrame:
    return load_sample_table(Workspace(analysed_template))


@pytest.fixture
def store(tmp_path):
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    yield store
    store.close()


# -- the sample table ---------------------------------------------------------------------------------------
def test_sample_table_joins_every_artifact_by_id(table, analysed_template):
    workspace = Workspace(analysed_template)
    assert len(table) == 2000 and table["id"].tolist() == workspace.samples["id"].tolist()
    assert {
        "metric.brightness",
        "metric.sharpness",
        "issue.dark",
        "issue_count",
        "max_severity",
        "label_issue.suggested_label",
        "label_issue.label_quality",
        "dup.near_group",
        "map.x",
        "map.y",
        "pred.cnn.label",
        "pred.cnn.confidence",
        "pred.cnn.correct",
        "pred.cnn.log_loss",
    } <= set(table.columns)
    assert prediction_sets(table) == ["cnn", "cnn_v2"]
    assert "label_issue" in issue_types(table) and "dark" in issue_types(table)
    metrics = pd.read_parquet(workspace.artifact_path("metrics.parquet")).set_index("id")
    sample = table.iloc[123]
    assert sample["metric.brightness"] == pytest.approx(metrics.loc[sample["id"], "brightness"])
    predicted = workspace.predictions("cnn").argmax(axis=1)
    assert (table["pred.cnn.label"].cat.codes.to_numpy() == predicted).all()
    assert table["pred.cnn.correct"].mean() == pytest.approx(0.9175)


def test_artifacts_in_another_order_or_partial_join_by_id(sample_workspace, tmp_path):
    from tests.dashboard_fixtures import copy_workspace

    root = copy_workspace(sample_workspace, tmp_path / "ws")
    workspace = Workspace(root)
    ids = workspace.samples["id"]
    shuffled = pd.DataFrame({"id": ids[::-1].to_numpy(), "brightness": np.arange(len(ids))[::-1] / 10})
    storage.write_parquet(workspace.artifact_path("metrics.parquet"), shuffled)
    partial = pd.DataFrame({"id": ids[:5].to_numpy(), "x": np.arange(5.0), "y": np.arange(5.0)})
    storage.write_parquet(workspace.artifact_path("projection.parquet"), partial)
    storage.write_parquet(
        workspace.artifact_path("per_sample_robustness.parquet"),
        pd.DataFrame({"id": ids.to_numpy(), "flip_rate": np.linspace(0, 1, len(ids))}),
    )
    table = load_sample_table(workspace)
    assert table["metric.brightness"].tolist() == (np.arange(len(ids)) / 10).tolist()
    assert table["map.x"].iloc[:5].tolist() == [0, 1, 2, 3, 4] and table["map.x"].iloc[5:].isna().all()
    assert table["robustness.flip_rate"].iloc[-1] == 1.0  # later stages join in by the per_sample_ convention
    assert "robustness.flip_rate" in numeric_columns(table)


def test_a_workspace_without_analysis_still_has_a_table(sample_workspace):
    table = load_sample_table(Workspace(sample_workspace))
    assert len(table) == 2000 and "pred.cnn.correct" in table.columns
    assert issue_types(table) == [] and "map.x" not in table.columns


def test_display_names_are_short():
    assert display_name("metric.dark_fraction") == "dark fraction"
    assert display_name("pred.cnn.confidence") == "cnn: confidence"
    assert display_name("issue.near_duplicate") == "issue: near duplicate"
    assert display_name("meta.camera") == "camera"


# -- conditions ------------------------------------------------------------------------------------------------
def test_empty_filter_keeps_everything_in_table_order(table):
    assert apply_filter(table, FilterSpec()).all()
    assert filter_ids(table, FilterSpec()) == table["id"].tolist()


def test_each_condition_matches_a_pandas_reference(table):
    cases = [
        (FilterSpec(labels=["coat", "shirt"]), table["label"].isin(["coat", "shirt"])),
        (FilterSpec(splits=["test"]), table["split"] == "test"),
        (FilterSpec(ranges={"metric.brightness": [0.2, 0.4]}), table["metric.brightness"].between(0.2, 0.4)),
        (FilterSpec(ranges={"metric.brightness": [None, 0.1]}), table["metric.brightness"] <= 0.1),
        (FilterSpec(predicted=["shirt"]), table["pred.cnn.label"] == "shirt"),
        (FilterSpec(prediction_set="cnn_v2", predicted=["shirt"]), table["pred.cnn_v2.label"] == "shirt"),
        (FilterSpec(correctness="incorrect"), ~table["pred.cnn.correct"]),
        (FilterSpec(correctness="correct", prediction_set="cnn_v2"), table["pred.cnn_v2.correct"]),
        (FilterSpec(issues=["dark", "blurry"]), (table["issue.dark"] > 0) | (table["issue.blurry"] > 0)),
        (
            FilterSpec(issues=["dark", "blurry"], issue_mode="all"),
            (table["issue.dark"] > 0) & (table["issue.blurry"] > 0),
        ),
        (FilterSpec(metadata={"source_index": ["2", "6"]}), table["meta.source_index"].isin([2, 6])),
        (FilterSpec(text="TEST_0001"), table["id"].str.lower().str.contains("test_0001")),
        (FilterSpec(ids=["images/test_00002.png", "nope"]), table["id"] == "images/test_00002.png"),
        (
            FilterSpec(labels=["coat"], correctness="incorrect", ranges={"pred.cnn.confidence": [0.5, None]}),
            (table["label"] == "coat") & ~table["pred.cnn.correct"] & (table["pred.cnn.confidence"] >= 0.5),
        ),
    ]
    for spec, expected in cases:
        mask = apply_filter(table, spec)
        assert mask.dtype == bool and (mask == expected.to_numpy()).all(), spec
        assert 0 < mask.sum() < len(table) or spec.issue_mode == "all", spec


def test_sorting_by_a_metric_with_missing_values_last(table):
    spec = FilterSpec(labels=["coat"], sort_by="metric.brightness", descending=True)
    positions = filter_positions(table, spec)
    values = table["metric.brightness"].to_numpy()[positions]
    assert (np.diff(values) <= 0).all() and len(positions) == (table["label"] == "coat").sum()
    with_missing = table.assign(score=np.where(np.arange(len(table)) % 2, np.nan, np.arange(len(table), dtype=float)))
    ordered = filter_positions(with_missing, FilterSpec(sort_by="score"))
    assert np.isnan(with_missing["score"].to_numpy()[ordered[1000:]]).all()
    assert (np.diff(with_missing["score"].to_numpy()[ordered[:1000]]) > 0).all()


def _between_points(values: np.ndarray, fraction: float) -> float:
    """A coordinate between two neighbouring map points near ``fraction`` of their range (on no point)."""
    unique = np.unique(values[np.isfinite(values)])
    i = int(fraction * (len(unique) - 2))
    return float(unique[i] + unique[i + 1]) / 2


def test_region_is_a_polygon_on_the_map(table):
    # Shapes are placed where the map's points are: the projection's scale is its own.
    x, y = table["map.x"].to_numpy(), table["map.y"].to_numpy()
    (x0, x1), (y0, y1) = [(_between_points(v, 0.25), _between_points(v, 0.75)) for v in (x, y)]
    square = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    expected = (x > x0) & (x < x1) & (y > y0) & (y < y1)
    assert (region_mask(table, square) == expected).all() and expected.any()
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, max(x1 - x0, y1 - y0)
    triangle = [[cx - r, cy - r], [cx + r, cy - r], [cx, cy + r]]
    inside = region_mask(table, triangle)
    # A point is inside the triangle when it is above the base and below both slanted edges.
    reference = (y > cy - r) & (y - cy < 2 * (x - cx) + r) & (y - cy < -2 * (x - cx) + r)
    assert (inside == reference).all() and reference.any() and not reference.all()


def test_tags_collections_and_review_states_read_the_curation_store(table, store):
    ids = table["id"].tolist()
    store.add_tag(ids[:10], "blurry-ok", user="ann")
    store.create_collection("static", user="ann", sample_ids=ids[5:15])
    store.create_collection(
        "dark coats", user="ann", filter_spec=FilterSpec(labels=["coat"], issues=["dark"]).to_dict()
    )
    store.create_collection("nested", user="ann", filter_spec=FilterSpec(collections=["dark coats"]).to_dict())
    store.record_decision(ids[0], "relabel", user="ann", new_label="shirt")
    store.record_decision(ids[1], "keep", user="bob")
    assert filter_ids(table, FilterSpec(tags=["blurry-ok"]), store) == ids[:10]
    assert filter_ids(table, FilterSpec(collections=["static"]), store) == ids[5:15]
    dark_coats = ((table["label"] == "coat") & (table["issue.dark"] > 0)).to_numpy()
    assert (apply_filter(table, FilterSpec(collections=["dark coats"]), store) == dark_coats).all()
    assert (apply_filter(table, FilterSpec(collections=["nested"]), store) == dark_coats).all()
    assert filter_ids(table, FilterSpec(review=["relabel"]), store) == [ids[0]]
    assert filter_ids(table, FilterSpec(review=["reviewed"]), store) == ids[:2]
    assert apply_filter(table, FilterSpec(review=["unreviewed"]), store).sum() == len(table) - 2
    assert filter_ids(table, FilterSpec(tags=["blurry-ok"], collections=["static"]), store) == ids[5:10]


def test_saved_filters_reevaluate_when_tags_change(table, store):
    store.create_collection("checked", user="ann", filter_spec=FilterSpec(tags=["checked"]).to_dict())
    assert apply_filter(table, FilterSpec(collections=["checked"]), store).sum() == 0
    store.add_tag(table["id"].tolist()[:3], "checked", user="ann")
    assert apply_filter(table, FilterSpec(collections=["checked"]), store).sum() == 3


def test_a_collection_that_contains_itself_is_refused(table, store):
    store.create_collection("loop", user="ann", filter_spec=FilterSpec(collections=["loop"]).to_dict())
    with pytest.raises(FilterError, match="levels deep"):
        apply_filter(table, FilterSpec(collections=["loop"]), store)


def test_errors_name_the_problem(table):
    with pytest.raises(FilterError, match="no column 'metric.nope'"):
        apply_filter(table, FilterSpec(ranges={"metric.nope": [0, 1]}))
    with pytest.raises(FilterError, match="not numeric"):
        apply_filter(table, FilterSpec(ranges={"path": [0, 1]}))
    with pytest.raises(FilterError, match="no prediction set 'other'"):
        apply_filter(table, FilterSpec(prediction_set="other", correctness="correct"))
    with pytest.raises(FilterError, match="needs the curation database"):
        apply_filter(table, FilterSpec(tags=["x"]))
    with pytest.raises(FilterError, match="low 2 is above high 1"):
        FilterSpec(ranges={"metric.brightness": [2, 1]})
    with pytest.raises(FilterError, match="correctness must be one of"):
        FilterSpec(correctness="maybe")
    with pytest.raises(FilterError, match="unknown filter field"):
        FilterSpec.from_dict({"labels": ["a"], "colour": "red"})


# -- serialisation ------------------------------------------------------------------------------------------------
FULL = FilterSpec(
    ranges={"metric.brightness": [0.1, 0.35], "pred.cnn.confidence": [None, 0.5]},
    labels=["coat", "t shirt/top"],
    splits=["test"],
    prediction_set="cnn_v2",
    predicted=["shirt"],
    correctness="incorrect",
    metadata={"camera": ["a&b", "c"]},
    issues=["dark", "blurry"],
    issue_mode="all",
    tags=["to check"],
    collections=["dark coats"],
    review=["unreviewed"],
    text="test_00",
    ids=["images/a.png"],
    region=[[0.5, 1.25], [2.0, 1.0], [1.0, -0.75]],
    sort_by="metric.brightness",
    descending=True,
)


def test_json_and_query_params_round_trip():
    assert FilterSpec.from_json(FULL.to_json()) == FULL
    assert from_query_params(to_query_params(FULL)) == FULL
    assert to_query_params(FilterSpec()) == {} and FilterSpec().is_empty() and not FULL.is_empty()
    assert FilterSpec(sort_by="metric.brightness").is_empty()


def test_query_params_are_readable_and_survive_url_encoding():
    from urllib.parse import parse_qs, urlencode

    params = to_query_params(
        FilterSpec(
            labels=["coat", "shirt"], ranges={"metric.brightness": [0.1, None]}, issues=["dark"], correctness="correct"
        )
    )
    assert params == {"label": ["coat", "shirt"], "issue": ["dark"], "r.metric.brightness": "0.1:", "correct": "1"}
    query = urlencode(to_query_params(FULL), doseq=True)
    assert from_query_params(parse_qs(query)) == FULL
    assert from_query_params({"label": "coat", "p": "3", "sample": "x"}) == FilterSpec(labels=["coat"])


def test_malformed_query_params_are_refused_with_a_reason():
    with pytest.raises(FilterError, match="expected LOW:HIGH"):
        from_query_params({"r.metric.brightness": "0.5"})
    with pytest.raises(FilterError, match="bounds must be numbers"):
        from_query_params({"r.metric.brightness": "a:b"})
    with pytest.raises(FilterError, match="expected 1 .correct. or 0"):
        from_query_params({"correct": "yes"})


def test_prune_drops_what_does_not_apply_to_this_workspace(table):
    spec = FilterSpec(
        labels=["coat"],
        ranges={"metric.gone": [0, 1], "metric.brightness": [0, 0.5]},
        issues=["dark", "exploded"],
        sort_by="metric.gone",
    )
    pruned, problems = prune_spec(table, spec)
    assert pruned == FilterSpec(labels=["coat"], ranges={"metric.brightness": [0, 0.5]}, issues=["dark"])
    assert len(problems) == 3 and any("exploded" in p for p in problems)


def test_filter_is_fast_on_a_large_table(table):
    """Vectorized: 100k rows with several conditions and a sort in well under a second (1M: benchmark)."""
    big = pd.concat([table] * 50, ignore_index=True)
    spec = FilterSpec(
        labels=["coat", "shirt", "pullover"],
        ranges={"metric.brightness": [0.1, 0.6]},
        issues=["dark", "blurry", "outlier"],
        correctness="incorrect",
        text="test_0",
        sort_by="pred.cnn.confidence",
    )
    start = time.perf_counter()
    positions = filter_positions(big, spec)
    assert time.perf_counter() - start < 1.0
    assert len(positions) == 50 * len(filter_positions(table, spec))


def test_slice_field_validates_and_round_trips_through_the_url():
    spec = FilterSpec(slice="s0123456789ab", labels=["coat"], sort_by="metric.brightness")
    params = to_query_params(spec)
    assert params["slice"] == "s0123456789ab"
    assert from_query_params(params) == spec
    assert FilterSpec.from_json(spec.to_json()) == spec and not spec.is_empty()
    assert "in slice s0123456789ab" in spec.describe()
    with pytest.raises(FilterError, match="slice"):
        FilterSpec(slice="  ")
    with pytest.raises(FilterError, match="slice"):
        FilterSpec.from_dict({"slice": 3})


# -- every field type-checked (issue 9: bad --filter JSON is a clear error, never a crash) -------------------------
@pytest.mark.parametrize(
    ("payload", "field", "expected"),
    [
        ({"ranges": None}, "ranges", "must be an object"),
        ({"ranges": []}, "ranges", "must be an object"),
        ({"ranges": {"metric.x": 1}}, "ranges", r"\[low, high\]"),
        ({"ranges": {"metric.x": [True, 2]}}, "ranges", "bounds must be numbers or null"),
        ({"ranges": {"metric.x": [10**400, None]}}, "ranges", "bounds must be numbers or null"),
        ({"ranges": {"": [0, 1]}}, "ranges", "column names"),
        ({"metadata": ["x"]}, "metadata", "must be an object"),
        ({"metadata": {"camera": 1}}, "metadata", "values for 'camera' must be a list"),
        ({"metadata": {"camera": [None]}}, "metadata", "values for 'camera' must be a list"),
        ({"sort_by": []}, "sort_by", "must be a name"),
        ({"sort_by": ""}, "sort_by", "must be a name"),
        ({"prediction_set": 3}, "prediction_set", "must be a name"),
        ({"text": [""]}, "text", "must be a string"),
        ({"text": None}, "text", "must be a string"),
        ({"region": [[]]}, "region", "at least 3"),
        ({"region": [1, 2, 3]}, "region", r"\[x, y\]"),
        ({"region": [[0, 0], [1, "a"], [2, 2]]}, "region", "finite numbers"),
        ({"region": [[0, 0], [1, float("nan")], [2, 2]]}, "region", "finite numbers"),
        ({"region": "0,0;1,1;1,0"}, "region", "list of"),
        ({"descending": "yes"}, "descending", "true or false"),
        ({"descending": 1}, "descending", "true or false"),
        ({"labels": "coat"}, "labels", "list of strings"),
        ({"ids": [1, 2]}, "ids", "list of strings"),
        ({"review": [[]]}, "review", "review states"),
        ({"review": ["later"]}, "review", "not among"),
        ({"correctness": []}, "correctness", "must be one of"),
        ({"issue_mode": None}, "issue_mode", "must be one of"),
        ({"slice": 3}, "slice", "slice id"),
    ],
)
def test_from_dict_names_the_field_and_what_was_expected(payload, field, expected):
    with pytest.raises(FilterError, match=expected) as caught:
        FilterSpec.from_dict(payload)
    assert field in str(caught.value)


def test_from_json_refuses_non_objects_and_deep_nesting_with_a_filter_error():
    for text in ("[1, 2]", "null", "3", "{", "[" * 100_000 + "]" * 100_000, '{"labels": ["a"], 1: 2}'):
        with pytest.raises(FilterError):
            FilterSpec.from_json(text)
    with pytest.raises(FilterError, match="unknown filter field"):
        FilterSpec.from_dict({1: "x", "labels": []})


def test_lossless_conversions_are_kept():
    """Tuples become lists, integer bounds floats, metadata numbers text: the spec still means the same."""
    spec = FilterSpec.from_dict(
        {
            "ranges": {"metric.x": [0, 2]},
            "metadata": {"camera": [3, "b", True]},
            "labels": ("a",),
            "region": [(0, 0), (1, 0), (1, 1)],
        }
    )
    assert spec.ranges == {"metric.x": [0.0, 2.0]} and all(isinstance(b, float) for b in spec.ranges["metric.x"])
    assert spec.metadata == {"camera": ["3", "b", "True"]} and spec.labels == ["a"]
    assert spec.region == [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]]
    assert FilterSpec.from_json(spec.to_json()) == spec


class _Curation:
    """A fixed curation store: one tag, one member collection, one decision."""

    def samples_with_tag(self, tag):
        return ["s1"] if tag == "t" else []

    def collection(self, name):
        return {"members": ["s0"], "filter": None} if name == "c" else None

    def decisions(self, *, latest_only=True):
        return [{"sample_id": "s2", "action": "keep"}]


_SMALL = pd.DataFrame(
    {
        "id": ["s0", "s1", "s2"],
        "path": ["a/0.png", "a/1.png", "b/2.png"],
        "label": ["a", "a", "b"],
        "split": ["train", "test", "test"],
        "metric.x": [0.1, np.nan, 3.0],
        "meta.camera": ["c1", "c2", None],
        "issue.dark": [1.0, 0.0, 0.5],
        "map.x": [0.0, 1.0, 2.0],
        "map.y": [0.0, 1.0, 0.5],
    }
)


def _json_values():
    from hypothesis import strategies as st

    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**300),
        st.floats(),
        st.text(max_size=6),
        st.sampled_from(["", " ", "a", "any", "all", "correct", "keep", "metric.x", "id", "camera"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
        max_leaves=10,
    )


def _field_values(name):
    """Arbitrary JSON for ``name``, mixed with shapes close to valid so the deeper checks are reached."""
    from hypothesis import strategies as st

    values = _json_values()
    near = {
        "ranges": st.dictionaries(
            st.sampled_from(["metric.x", "", "nope", "path"]),
            st.one_of(st.lists(values, min_size=2, max_size=2), values),
            max_size=2,
        ),
        "metadata": st.dictionaries(
            st.sampled_from(["camera", "", "x"]), st.one_of(st.lists(values, max_size=3), values), max_size=2
        ),
        "region": st.lists(st.one_of(st.lists(values, min_size=2, max_size=2), values), max_size=5),
    }
    return st.one_of(values, near[name]) if name in near else values


def _field_payloads():
    from hypothesis import strategies as st

    names = [f.name for f in __import__("dataclasses").fields(FilterSpec)]
    return st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({name: _field_values(name) for name in chosen})
    )


def test_from_dict_is_total_over_arbitrary_json_in_every_field():
    """Any JSON value in any field: a valid spec that every consumer handles, or a FilterError naming the field."""
    from dataclasses import fields as dataclass_fields

    from hypothesis import HealthCheck, given, settings

    names = {f.name for f in dataclass_fields(FilterSpec)}

    @settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
    @given(payload=_field_payloads())
    def check(payload):
        try:
            spec = FilterSpec.from_dict(payload)
        except FilterError as exc:
            assert any(name in str(exc) for name in payload if name in names), (payload, str(exc))
            return
        assert FilterSpec.from_json(spec.to_json()) == spec
        params = to_query_params(spec)
        again = from_query_params(params)
        assert again == (spec if spec.sort_by else spec.replace(descending=False))
        spec.describe()
        spec.is_empty()
        try:
            positions = filter_positions(_SMALL, spec, _Curation())
        except FilterError:
            return
        assert set(positions.tolist()) <= {0, 1, 2} and len(set(positions.tolist())) == len(positions)

    check()


def test_from_query_params_is_total_over_arbitrary_parameters():
    """Any query-string keys and values (as a parsed URL gives them, or not): a spec or a FilterError."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    keys = st.one_of(
        st.sampled_from([*LIST_KEYS, *SCALAR_KEYS, "r.metric.x", "r.", "m.camera", "m.", "page"]),
        st.text(max_size=5),
    )
    texts = st.one_of(
        st.text(max_size=8),
        st.sampled_from(["0:1", ":", "nan:1", "1e999:", "0,0;1,0;1,1", "0,0;x", "1", "0", "all", "keep", "1:0"]),
    )
    values = st.one_of(texts, st.lists(texts, max_size=3), st.none(), st.integers(), st.lists(st.integers()))

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(params=st.dictionaries(keys, values, max_size=4))
    def check(params):
        try:
            spec = from_query_params(params)
        except FilterError as exc:
            assert str(exc)
            return
        assert from_query_params(to_query_params(spec)) == (spec if spec.sort_by else spec.replace(descending=False))

    check()
    with pytest.raises(FilterError, match="'label': expected text or a list of texts"):
        from_query_params({"label": 3})
