"""Streamlit AppTest: every page renders, with and without analysis artifacts, and its main interactions
change state — filters change the grid and the URL, tags / collections / decisions land in the database,
exports write files."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from robustlens.analysis.workspace import Workspace
from robustlens.dashboard.routes import ROUTES
from robustlens.query.filters import FilterSpec, filter_ids
from robustlens.query.sample_table import load_sample_table
from robustlens.query.slices import load_slice_membership

APP = str(Path(__file__).resolve().parents[1] / "robustlens" / "dashboard" / "app.py")
TITLES = {route.name: route.title for route in ROUTES} | {"review": "Label review"}


def make_app(workspace: Path, monkeypatch, *, query: dict | None = None) -> AppTest:
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(workspace))
    app = AppTest.from_file(APP, default_timeout=60)
    if query:
        app.query_params.update(query)
    return app.run()


def goto(app: AppTest, page: str) -> AppTest:
    app.switch_page(f"views/{page}.py").run()
    assert_clean(app)
    return app


def assert_clean(app: AppTest) -> None:
    assert not app.exception, [e.value for e in app.exception]
    assert not app.error, [e.value for e in app.error]


def captions(app: AppTest) -> list[str]:
    return [caption for image in app.get("image") for caption in image.captions]


def texts(app: AppTest) -> str:
    parts = [m.value for m in app.markdown] + [c.value for c in app.caption] + [i.value for i in app.info]
    parts += [s.value for s in app.success] + [w.value for w in app.warning]
    return "\n".join(parts)


def set_user(app: AppTest, name: str = "ann") -> AppTest:
    app.text_input(key="rl.user_input").set_value(name).run()
    return app


@pytest.fixture
def table(analysed_workspace) -> pd.DataFrame:
    return load_sample_table(Workspace(analysed_workspace))


@pytest.fixture
def app(analysed_workspace, monkeypatch) -> AppTest:
    return make_app(analysed_workspace, monkeypatch)


# -- every page ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", [route.name for route in ROUTES])
def test_every_page_renders(analysed_template, monkeypatch, page):
    app = make_app(analysed_template, monkeypatch)
    goto(app, page)
    assert app.title[0].value == TITLES[page]


def test_without_analysis_every_page_says_what_to_run(sample_workspace, monkeypatch):
    app = make_app(sample_workspace, monkeypatch)
    for route in ROUTES:
        goto(app, route.name)
        if route.name == "review":
            assert "robustlens analyze" in texts(app)
    goto(app, "embedding_map")
    assert "robustlens analyze" in texts(app)
    goto(app, "duplicates")
    assert "robustlens analyze" in texts(app)


def test_a_bare_workspace_without_predictions_renders_everywhere(image_folder, tmp_path, monkeypatch):
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

    workspace, _ = init_workspace(tmp_path / "bare", InitOptions(data=image_folder, progress=False))
    app = make_app(workspace.root, monkeypatch)
    for route in ROUTES:
        goto(app, route.name)
    goto(app, "explorer")
    assert len(captions(app)) == 12 and "**12** of 12 samples" in texts(app)
    goto(app, "performance")
    assert "no predictions" in texts(app)


def test_a_damaged_artifact_gives_a_message_not_a_traceback(analysed_workspace, monkeypatch):
    pd.DataFrame({"brightness": [0.5]}).to_parquet(Path(analysed_workspace) / "artifacts" / "metrics.parquet")
    app = make_app(analysed_workspace, monkeypatch)
    assert not app.exception
    assert "artifact 'metrics' has no 'id' column" in app.error[0].value


def test_without_a_workspace_the_app_says_how_to_start(monkeypatch):
    monkeypatch.delenv("ROBUSTLENS_WORKSPACE", raising=False)
    app = AppTest.from_file(APP, default_timeout=60).run()
    assert "robustlens serve WORKSPACE" in app.error[0].value


# -- overview ---------------------------------------------------------------------------------------------------
def test_overview_shows_counts_accuracy_and_issue_examples(analysed_template, monkeypatch):
    app = make_app(analysed_template, monkeypatch)
    assert_clean(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Samples"] == "2,000" and metrics["Classes"] == "10" and metrics["Accuracy (cnn)"] == "91.8%"
    table = load_sample_table(Workspace(analysed_template))
    assert metrics["Samples with issues"] == f"{int((table['issue_count'] > 0).sum()):,}"
    summary = texts(app)
    dark = int((table["issue.dark"] > 0).sum())
    assert f"**dark** — {dark:,} samples ({dark / 2000:.1%})" in summary
    issue_types = len([c for c in table.columns if c.startswith("issue.")])
    assert issue_types >= 6 and len(app.get("image")) == 6 * issue_types
    # One "open in explorer" link per issue type (the fixture plants six kinds of issue, the stages find them).
    links = [link for link in app.get("page_link")]
    assert len(links) >= issue_types
    assert all(link.proto.page == "explorer" or "explorer" in link.proto.page for link in links)
    # The worst slices the slices stage wrote, the first ten of them.
    worst = pd.read_parquet(Path(analysed_template) / "artifacts" / "worst_slices.parquet")
    slices = app.dataframe[-1].value
    assert "description" in slices.columns and len(slices) == min(10, len(worst)) > 0


def _run_slices_stage(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The real slices stage on the workspace (the fixture's slice tables are synthetic, without masks)."""
    from robustlens.analysis.stages import slices
    from robustlens.analysis.stages.base import StageContext

    workspace = Workspace(root)
    slices.run(StageContext(workspace=workspace, progress=False, random_state=0), slices.Config())
    return (
        pd.read_parquet(workspace.artifact_path("worst_slices.parquet")),
        pd.read_parquet(workspace.artifact_path("slices.parquet")),
    )


def _select_row(app: AppTest, key_prefix: str, row: int) -> AppTest:
    """Select one row of a slice table (AppTest cannot click a dataframe: its selection state is written)."""
    generation = app.session_state.get(f"{key_prefix}.generation", 0)
    app.session_state[f"{key_prefix}.{generation}"] = {"selection": {"rows": [row], "columns": [], "cells": []}}
    return app.run()


def test_a_worst_slice_row_opens_the_explorer_on_exactly_its_samples(analysed_workspace, monkeypatch):
    worst, all_slices = _run_slices_stage(analysed_workspace)
    multi = worst.index[worst["n_conditions"] > 1]
    position = int(multi[0]) if len(multi) else 0
    chosen = worst.iloc[position]
    app = make_app(analysed_workspace, monkeypatch)
    assert_clean(app)
    assert "Select a row to open that slice's samples in the explorer." in texts(app)
    _select_row(app, "overview.worst", position)
    assert_clean(app)
    assert app.title[0].value == "Explorer"
    assert f"**{int(chosen['size']):,}** of 2,000 samples" in texts(app)
    assert app.query_params["slice"] == chosen["slice_id"]  # a shareable link
    assert any(chosen["description"] in info.value for info in app.info)  # the filter shows in the sidebar
    table = load_sample_table(Workspace(analysed_workspace))
    membership = load_slice_membership(Workspace(analysed_workspace))
    assert len(filter_ids(table, FilterSpec(slice=chosen["slice_id"]), slices=membership)) == chosen["size"]
    # Narrowing in the sidebar keeps the slice; "Clear slice" drops it.
    app.radio(key="flt.correct").set_value("incorrect").run()
    assert f"**{int(chosen['errors']):,}** of 2,000 samples" in texts(app)
    app.button(key="flt.clear_slice").click().run()
    assert "slice" not in app.query_params
    # Back on the overview, the old selection does not send the user away again.
    goto(app, "overview")
    assert app.title[0].value == "Overview"

    # The performance page's full slice table opens a slice too, and the link itself opens it.
    goto(app, "performance")
    one = all_slices[all_slices["kind"] == "metric"].iloc[0]
    _select_row(app, "perf.slices", int(one.name))
    assert_clean(app)
    assert app.title[0].value == "Explorer" and app.query_params["slice"] == one["slice_id"]
    assert f"**{int(one['size']):,}** of 2,000 samples" in texts(app)
    link = make_app(analysed_workspace, monkeypatch, query={"slice": chosen["slice_id"]})
    goto(link, "explorer")
    assert f"**{int(chosen['size']):,}** of 2,000 samples" in texts(link)


def test_overview_of_a_plain_workspace(sample_workspace, monkeypatch):
    app = make_app(sample_workspace, monkeypatch)
    assert_clean(app)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics == {
        "Samples": "2,000",
        "Classes": "10",
        "Skipped at ingest": "0",
        "Accuracy (cnn)": "91.8%",
        "Samples with issues": "—",
    }


# -- explorer ----------------------------------------------------------------------------------------------------
def test_filter_changes_the_grid_and_the_url(app, table):
    goto(app, "explorer")
    assert len(captions(app)) == 48
    app.multiselect(key="flt.labels").set_value(["coat"]).run()
    app.radio(key="flt.correct").set_value("incorrect").run()
    assert_clean(app)
    expected = filter_ids(table, FilterSpec(labels=["coat"], correctness="incorrect"))
    shown = captions(app)
    assert len(shown) == min(48, len(expected)) and all(c.startswith("coat → ") for c in shown)
    assert f"**{len(expected):,}** of 2,000 samples" in texts(app)
    assert app.query_params["label"] == "coat" and app.query_params["correct"] == "0"


def test_sort_and_range_filter(app, table):
    goto(app, "explorer")
    app.selectbox(key="flt.sort").set_value("metric.brightness").run()
    app.toggle(key="flt.desc").set_value(True).run()
    app.multiselect(key="flt.range_cols").set_value(["metric.brightness"]).run()
    low, high = app.slider(key="flt.range.metric.brightness").value
    app.slider(key="flt.range.metric.brightness").set_value((low, 0.3)).run()
    assert_clean(app)
    spec = FilterSpec(ranges={"metric.brightness": [None, 0.3]}, sort_by="metric.brightness", descending=True)
    expected = filter_ids(table, spec)[:48]
    labels = table.set_index("id").loc[expected, "label"].astype(str).tolist()
    assert [c.split(" ")[0] for c in captions(app)] == labels
    assert app.query_params["r.metric.brightness"] == ":0.3" and app.query_params["sort"] == "metric.brightness"


def test_a_shared_url_applies_its_filter_and_opens_its_sample(analysed_workspace, table, monkeypatch):
    spec = FilterSpec(labels=["sandal", "shirt"], issues=["dark"], sort_by="metric.brightness")
    first = filter_ids(table, spec)[0]
    from robustlens.query.filters import to_query_params

    app = make_app(analysed_workspace, monkeypatch, query={**to_query_params(spec), "sample": first})
    goto(app, "explorer")
    assert app.multiselect(key="flt.labels").value == ["sandal", "shirt"]
    assert app.multiselect(key="flt.issues").value == ["dark"]
    assert len(captions(app)) >= len(filter_ids(table, spec))
    assert any(h.value == first for h in app.subheader)  # the detail view of the linked sample
    goto(app, "overview")
    goto(app, "explorer")  # page navigation keeps the filter
    assert app.multiselect(key="flt.labels").value == ["sandal", "shirt"]


def test_a_broken_link_is_explained_not_fatal(analysed_workspace, monkeypatch):
    app = make_app(analysed_workspace, monkeypatch, query={"label": "coat", "r.metric.nope": "0:1", "issue": "bogus"})
    goto(app, "explorer")
    assert app.multiselect(key="flt.labels").value == ["coat"]
    assert any("metric.nope" in w.value for w in app.warning) and any("bogus" in w.value for w in app.warning)


def test_select_in_the_grid_and_tag(app, analysed_workspace, table):
    goto(app, "explorer")
    set_user(app)
    ids = table["id"].tolist()
    app.checkbox(key=f"explorer.grid.sel.{ids[0]}").check().run()
    app.checkbox(key=f"explorer.grid.sel.{ids[3]}").check().run()
    app.text_input(key="explorer.bulk.tag").set_value("look-again").run()
    assert app.radio(key="explorer.bulk.scope").value == "selection"
    app.button(key="explorer.bulk.add_tag").click().run()
    assert_clean(app)
    store = Workspace(analysed_workspace).curation()
    assert store.samples_with_tag("look-again") == sorted([ids[0], ids[3]])
    assert "Tagged 2 sample(s) 'look-again'" in texts(app)
    app.radio(key="explorer.bulk.scope").set_value("filter").run()
    app.multiselect(key="flt.labels").set_value(["sandal"]).run()
    app.text_input(key="explorer.bulk.tag").set_value("sandals").run()
    app.button(key="explorer.bulk.add_tag").click().run()
    assert len(store.samples_with_tag("sandals")) == int((table["label"] == "sandal").sum())
    app.multiselect(key="flt.tags").set_value(["look-again"]).run()  # tags filter the grid too
    assert len(captions(app)) == 0  # no sandal among the two
    store.close()


def test_writes_need_a_name(app, analysed_workspace):
    goto(app, "explorer")
    app.button(key="explorer.select_page").click().run()
    app.text_input(key="explorer.bulk.tag").set_value("nameless").run()
    app.button(key="explorer.bulk.add_tag").click().run()
    assert any("Your name" in w.value for w in app.warning)
    assert Workspace(analysed_workspace).curation().tag_counts() == {}


def test_details_show_predictions_issues_and_neighbours(app, table):
    goto(app, "explorer")
    sample = table["id"][0]
    app.button(key=f"explorer.grid.open.{sample}").click().run()
    assert_clean(app)
    assert any(h.value == sample for h in app.subheader)
    assert "Nearest neighbours" in texts(app) and "**Predictions**" in texts(app)
    assert app.query_params["sample"] == sample
    assert len(captions(app)) == 48 + 1 + 6  # the grid, the sample itself, six neighbours
    app.button(key="explorer.close").click().run()
    assert not any(h.value == sample for h in app.subheader)


def test_pages_of_the_grid(app, table):
    goto(app, "explorer")
    first = captions(app)
    app.get("pagination")[0].set_value(2).run()
    second = captions(app)
    assert second != first and len(second) == 48 and app.query_params["p"] == "2"
    labels = table["label"].astype(str).tolist()[48:96]
    assert [c.split(" ")[0] for c in second] == labels


# -- embedding map ---------------------------------------------------------------------------------------------
def test_map_is_one_webgl_trace_with_ids(app, table):
    goto(app, "embedding_map")
    import json

    chart = json.loads(app.get("plotly_chart")[0].proto.spec)
    assert [trace["type"] for trace in chart["data"]] == ["scattergl"]
    assert len(chart["data"][0]["customdata"]) == len(table)
    app.selectbox(key="map.colour").set_value("metric.brightness").run()
    assert_clean(app)
    assert app.query_params["color"] == "metric.brightness"


def test_map_selection_helpers():
    from robustlens.dashboard.views.embedding_map import downsample, selection_polygon

    lasso = {"lasso": [{"x": [0, 1, 1], "y": [0, 0, 1]}], "box": [], "points": []}
    assert selection_polygon(lasso) == [[0, 0], [1, 0], [1, 1]]
    box = {"lasso": [], "box": [{"x": [2, 0.5], "y": [1, 3]}], "points": []}
    assert selection_polygon(box) == [[0.5, 1], [2, 1], [2, 3], [0.5, 3]]
    assert selection_polygon({"lasso": [], "box": [], "points": []}) == []
    import numpy as np

    positions = np.arange(200_000)
    sample = downsample(positions, 50_000)
    assert len(sample) == 50_000 and len(set(sample)) == 50_000 and (np.diff(sample) > 0).all()
    assert (downsample(positions, 50_000) == sample).all()  # seeded


# -- review ------------------------------------------------------------------------------------------------------
def test_review_asks_the_name_once_and_records_decisions(app, analysed_workspace, table):
    goto(app, "review")
    app.text_input(key="review.name").set_value("rita")
    app.form_submit_button[0].click().run()
    assert_clean(app)
    queue = table[table["label_issue.is_label_issue"]].sort_values("label_issue.rank")["id"].tolist()
    first, second = queue[0], queue[1]
    assert app.text_input(key="rl.user_input").value == "rita"
    assert first in texts(app)
    app.button(key="review.keep").click().run()
    assert f"Saved: {first} kept the label." in texts(app)
    assert second in texts(app)  # the decided item left the queue
    suggested = str(table.set_index("id").loc[second, "label_issue.suggested_label"])
    app.text_input(key="review.note").set_value("sleeves")
    app.button(key="review.accept").click().run()
    third = queue[2]
    app.selectbox(key="review.relabel_to").set_value("bag")
    app.button(key="review.relabel").click().run()
    store = Workspace(analysed_workspace).curation()
    decisions = {d["sample_id"]: d for d in store.decisions()}
    assert decisions[first]["action"] == "keep" and decisions[first]["created_by"] == "rita"
    assert (decisions[second]["action"], decisions[second]["new_label"], decisions[second]["note"]) == (
        "relabel",
        suggested,
        "sleeves",
    )
    assert (decisions[third]["action"], decisions[third]["new_label"]) == ("relabel", "bag")
    store.close()


def test_review_shows_what_others_decided(app, analysed_workspace, table):
    queue = table[table["label_issue.is_label_issue"]].sort_values("label_issue.rank")["id"].tolist()
    store = Workspace(analysed_workspace).curation()
    store.record_decision(queue[0], "ambiguous", user="bob", note="hard to tell")
    store.close()
    set_user(app, "ann")
    goto(app, "review")
    assert queue[1] in texts(app)  # bob's item is out of the queue
    app.toggle(key="review.hide_decided").set_value(False).run()
    assert queue[0] in texts(app) and "**bob** marked ambiguous" in texts(app)
    app.button(key="review.exclude").click().run()
    assert queue[1] in texts(app)  # with decided items shown, the queue moves on
    app.button(key="review.back").click().run()
    assert "**ann** excluded" in texts(app)


# -- duplicates ------------------------------------------------------------------------------------------------
def test_keep_one_tag_the_rest(app, analysed_workspace, table):
    set_user(app)
    goto(app, "duplicates")
    metrics = {m.label: m.value for m in app.metric}
    near = table[table["dup.near_group"] >= 0]
    assert metrics["Near-duplicate clusters"] == str(near["dup.near_group"].nunique())
    assert "leakage: spans" in texts(app)
    first_cluster_button = next(b for b in app.button if b.key and b.key.startswith("dup.one."))
    group = int(first_cluster_button.key.rsplit(":", 1)[1])
    first_cluster_button.click().run()
    members = near[near["dup.near_group"] == group]
    store = Workspace(analysed_workspace).curation()
    assert set(store.samples_with_tag("duplicate")) == set(members[~members["dup.is_representative"]]["id"])
    app.text_input(key="dup.tag").set_value("dupe-all").run()
    app.toggle(key="dup.leakage_only").set_value(True).run()
    app.button(key="dup.tag_all").click().run()
    leaking = near[near["dup.cross_split"] & ~near["dup.is_representative"]]
    assert set(store.samples_with_tag("dupe-all")) == set(leaking["id"])
    store.close()


# -- performance ------------------------------------------------------------------------------------------------
def test_performance_offers_only_metrics_that_vary_most_related_first(app, analysed_template):
    goto(app, "performance")
    assert_clean(app)
    artifacts_dir = Path(analysed_template) / "artifacts"
    curves = pd.read_parquet(artifacts_dir / "metric_curves_cnn.parquet")
    importance = pd.read_parquet(artifacts_dir / "metric_importance_cnn.parquet")
    bins = curves.groupby("metric")["bin"].nunique()
    constant = sorted(bins[bins == 1].index)
    assert constant  # the sample images are all 28x28: width, height, area … are constant
    options = app.selectbox(key="perf.curve.cnn").options
    assert not set(options) & set(constant) and set(options) == set(bins[bins > 1].index)
    best = importance[importance["metric"].isin(options)].sort_values("rank")["metric"].iloc[0]
    assert app.selectbox(key="perf.curve.cnn").value == best
    assert any("constant on this dataset" in c.value and "width" in c.value for c in app.caption)


def test_performance_side_by_side_and_confusion_opens_the_explorer(app, table):
    goto(app, "performance")
    assert [h.value for h in app.subheader][:2] == ["cnn", "cnn_v2"]
    metrics = [m.value for m in app.metric]
    assert "91.75%" in metrics and "86.40%" in metrics
    app.selectbox(key="perf.cell.cnn_v2").select_index(0).run()
    app.button(key="perf.open.cnn_v2").click().run()
    assert_clean(app)
    assert app.title[0].value == "Explorer"
    given, predicted = app.multiselect(key="flt.labels").value[0], app.multiselect(key="flt.predicted").value[0]
    assert app.selectbox(key="flt.pset").value == "cnn_v2"
    expected = filter_ids(table, FilterSpec(labels=[given], predicted=[predicted], prediction_set="cnn_v2"))
    assert f"**{len(expected):,}** of 2,000" in texts(app)
    confusion = (
        (table["label"] != table["pred.cnn_v2.label"])
        .groupby([table["label"], table["pred.cnn_v2.label"]], observed=True)
        .sum()
    )
    assert len(expected) == confusion.max()  # the list is sorted by count: the first is the largest confusion


# -- tags & collections --------------------------------------------------------------------------------------
def test_create_saved_filter_and_static_collections(app, analysed_workspace, table):
    set_user(app)
    goto(app, "collections")
    app.multiselect(key="flt.labels").set_value(["coat"]).run()
    app.multiselect(key="flt.issues").set_value(["dark"]).run()
    app.text_input(key="coll.new.name").set_value("dark coats")
    app.text_input(key="coll.new.description").set_value("too dark to judge")
    app.radio(key="coll.new.kind").set_value("saved filter")
    app.form_submit_button[0].click().run()
    assert_clean(app)
    app.text_input(key="coll.new.name").set_value("dark coats, frozen")
    app.radio(key="coll.new.kind").set_value("static")
    app.form_submit_button[0].click().run()
    store = Workspace(analysed_workspace).curation()
    saved, static = store.collection("dark coats"), store.collection("dark coats, frozen")
    assert saved["filter"] == {"labels": ["coat"], "issues": ["dark"]} and saved["description"] == "too dark to judge"
    expected = filter_ids(table, FilterSpec(labels=["coat"], issues=["dark"]))
    assert static["filter"] is None and static["members"] == sorted(expected) and static["created_by"] == "ann"
    overview = app.dataframe[0].value
    assert overview.set_index("name").loc["dark coats", "samples"] == len(expected)
    app.selectbox(key="coll.chosen").set_value("dark coats, frozen").run()
    app.checkbox(key="coll.confirm").check().run()
    app.button(key="coll.delete").click().run()
    assert store.collection_names() == ["dark coats"]
    store.close()


def test_rename_and_delete_a_tag_on_the_collections_page(app, analysed_workspace, table):
    store = Workspace(analysed_workspace).curation()
    ids = table["id"][:5].tolist()
    store.add_tag(ids, "blury", user="bob")
    store.add_tag(ids[:2], "scratch", user="bob")
    store.create_collection("blurry ones", user="bob", filter_spec={"tags": ["blury"]})
    set_user(app)
    goto(app, "collections")
    app.selectbox(key="tag.chosen").set_value("blury").run()
    app.text_input(key="tag.new_name").set_value("blurry").run()
    app.button(key="tag.rename").click().run()
    assert_clean(app)
    assert store.tag_counts() == {"blurry": 5, "scratch": 2}
    assert store.collection("blurry ones")["filter"] == {"tags": ["blurry"]}  # the saved filter followed
    # A tag a saved filter selects is not deleted: the page says why and nothing changes.
    app.selectbox(key="tag.chosen").set_value("blurry").run()
    app.button(key="tag.delete").click().run()
    assert any("blurry ones" in e.value for e in app.error) and store.tag_counts()["blurry"] == 5
    app.selectbox(key="tag.chosen").set_value("scratch").run()
    app.button(key="tag.delete").click().run()
    assert_clean(app)
    assert store.tag_counts() == {"blurry": 5}
    store.close()


# -- export ---------------------------------------------------------------------------------------------------------
def test_export_saves_files_on_the_server(app, analysed_workspace, table):
    store = Workspace(analysed_workspace).curation()
    store.record_decision(table["id"][5], "relabel", user="bob", new_label="bag")
    store.close()
    goto(app, "export")
    app.multiselect(key="flt.labels").set_value(["trouser"]).run()
    app.selectbox(key="export.format").set_value("parquet").run()
    assert app.get("download_button")
    app.button(key="export.save").click().run()
    assert_clean(app)
    written = pd.read_parquet(Path(analysed_workspace) / "exports" / "robustlens-filtered.parquet")
    assert written["id"].tolist() == filter_ids(table, FilterSpec(labels=["trouser"]))
    assert "robustlens export" in app.code[0].value and "label=trouser" in app.code[0].value
    app.button(key="export.relabels_save").click().run()
    relabels = pd.read_csv(Path(analysed_workspace) / "exports" / "relabels.csv")
    assert relabels[["id", "old_label", "new_label", "reviewer"]].values.tolist() == [
        [table["id"][5], str(table["label"][5]), "bag", "bob"]
    ]
    app.button(key="export.imagefolder").click().run()
    folder = Path(analysed_workspace) / "exports" / "imagefolder-filtered"
    assert len(list(folder.glob("trouser/*.png"))) == len(written)


def test_slice_rows_map_to_filters():
    from robustlens.query.slices import SliceMembership, slice_row_filter

    known = SliceMembership(0, {"s0123456789ab": ()})
    assert slice_row_filter(pd.Series({"slice_id": "all", "kind": "all"}), known) == FilterSpec()
    assert slice_row_filter(pd.Series({"slice_id": "s0123456789ab", "kind": "discovered"}), known) == FilterSpec(
        slice="s0123456789ab"
    )
    # The robustness stage's own class slices (no slice analysis) are label filters.
    assert slice_row_filter(
        pd.Series({"slice_id": "label=coat", "kind": "class"}), SliceMembership(0), ["bag", "coat"]
    ) == FilterSpec(labels=["coat"])
    # Ids the slice analysis does not hold (e.g. a table without stored masks) cannot be opened.
    assert slice_row_filter(pd.Series({"slice_id": 3, "kind": "class"}), known) is None


# -- what the views read instead of computing ----------------------------------------------------------------------
def test_duplicate_leakage_is_the_stages_unspecified_split_is_no_leakage():
    """A cluster of a train sample and an 'unspecified' one is not leakage: the page shows the duplicates stage's
    verdict (the view used to count 'unspecified' as a split of its own)."""
    import numpy as np

    from robustlens.analysis.stages.duplicates import duplicate_table
    from robustlens.query.duplicates import cluster_counts, duplicate_clusters

    ids = np.array(["a", "b", "c", "d", "e", "f", "g"])
    splits = np.array(["train", "unspecified", "train", "test", "unspecified", "unspecified", "train"])
    exact = np.array([-1, -1, -1, -1, 0, 0, -1])  # e and f: identical bytes
    cluster = np.array([0, 0, 2, 2, 4, 4, 6])  # a-b, c-d, e-f; g alone
    stage = duplicate_table(ids, exact, cluster, splits)
    table = pd.DataFrame({"id": ids, "split": splits} | {f"dup.{c}": stage[c] for c in stage.columns if c != "id"})
    clusters = duplicate_clusters(table)
    verdict = clusters.set_index("id")["cross_split"]
    assert not verdict["a"] and not verdict["b"]  # train + unspecified
    assert verdict["c"] and verdict["d"]  # train + test
    assert (
        verdict.loc[stage["id"][stage["near_group"] >= 0]].tolist()
        == stage["cross_split"][stage["near_group"] >= 0].tolist()
    )  # sample by sample, the stage's verdict
    assert "g" not in verdict.index
    assert clusters["id"].tolist()[:2] == ["c", "d"]  # leakage is listed first
    assert cluster_counts(clusters) == {
        "exact_clusters": 1,
        "near_clusters": 2,
        "samples_in_clusters": 6,
        "cross_split_clusters": 1,
    }
    assert clusters.groupby("cluster")["representative"].sum().tolist() == [1, 1, 1]


def test_duplicates_page_counts_the_stages_leakage(analysed_workspace, monkeypatch):
    from robustlens.analysis.artifacts import read_table

    stage = read_table(Workspace(analysed_workspace), "duplicates")
    leaking = stage[stage["cross_split"] & (stage["near_group"] >= 0)]["near_group"].nunique()
    app = make_app(analysed_workspace, monkeypatch)
    goto(app, "duplicates")
    assert {m.label: m.value for m in app.metric}["Cross-split clusters (leakage)"] == f"{leaking:,}"


def test_review_queue_is_a_filter_of_the_filter_engine(analysed_workspace, table):
    from robustlens.query.review import review_queue, review_queue_spec

    flagged = table[table["label_issue.is_label_issue"].fillna(False).astype(bool)]
    expected = flagged.sort_values("label_issue.rank", kind="stable", na_position="last")["id"].tolist()
    store = Workspace(analysed_workspace).curation()
    queue = review_queue(table, store, flagged_only=True, label=None, hide_decided=True)
    assert table["id"].iloc[queue].tolist() == expected
    store.record_decision(expected[0], "keep", user="bob")
    coats = review_queue(table, store, flagged_only=True, label="coat", hide_decided=True)
    labels = table.set_index("id")["label"]
    assert table["id"].iloc[coats].tolist() == [i for i in expected[1:] if labels[i] == "coat"]
    everything = review_queue(table, store, flagged_only=False, label=None, hide_decided=False)
    assert len(everything) == len(table) and table["id"].iloc[everything[0]] == expected[0]
    spec = review_queue_spec(table, flagged_only=True, label="coat", hide_decided=True)
    assert FilterSpec.from_dict(spec.to_dict()) == spec  # a plain filter: it can be saved or linked
    store.close()


def test_the_artifacts_stamp_is_taken_once_per_run(analysed_template, monkeypatch):
    from robustlens.dashboard import data

    scans = []
    scan = data._scan_artifacts
    monkeypatch.setattr(data, "_scan_artifacts", lambda root: scans.append(root) or scan(root))
    app = make_app(analysed_template, monkeypatch)
    assert_clean(app)
    assert len(scans) == 1
    goto(app, "explorer")
    app.multiselect(key="flt.labels").set_value(["coat"]).run()
    assert len(scans) == 3
