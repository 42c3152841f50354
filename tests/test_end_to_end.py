"""End to end, as a user runs it: ``robustlens init`` → ``analyze`` of every stage (robustness included) on a
100-image subset of the shipped sample data with the sample CNN → every dashboard page through Streamlit's AppTest,
reading those real artifacts.

The workspace is built once per session: ``robustlens init`` through the command line (:func:`robustlens.cli.main`),
then one :func:`robustlens.analysis.analyze.analyze` call with ``stages=["all"]`` and the robustness config that
``robustlens robustness`` builds from small settings (40 evaluated, 8 attacked, 4 verified and 4 certified samples,
quick AutoAttack, ``--validity-budget fast``; ``robustlens analyze`` has no robustness options). Its input is a
manifest of 99 sample images — ten per class but one, in train and test — plus one image listed a second time under
another id in the other split (an exact duplicate that leaks across splits), and the sample CNN's predictions keyed
by id.

Each page must run without an exception or an error box, and show what the artifacts hold: the sample and class
counts, the accuracy of ``evaluation/cnn.json``, each issue's count from ``issues.parquet`` (robustness's
``fragile`` included), the head of the label-review queue of ``label_issues.parquet``, the leaking duplicate
cluster, the robust accuracy and interval of ``robustness_summary.json``. Last, the ``robustlens robustness``
shortcut with the same settings finds the stage current and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from robustlens.analysis.analyze import STAGES, AnalysisReport, analyze
from robustlens.analysis.workspace import Workspace
from robustlens.cli import main
from robustlens.dashboard.routes import ROUTES
from tests.conftest import SAMPLE_DATA

pytestmark = pytest.mark.slow

APP = str(Path(__file__).resolve().parents[1] / "robustlens" / "dashboard" / "app.py")
PER_CLASS = 10
#: The duplicated image: listed again under this id, in the other split.
COPY_ID = "copy-of-first"
QUICK_ATTACKS = """\
[attacks.pgd_linf]
steps = 10
[attacks.autoattack_linf]
n_iter = 10
n_target_classes = 3
square_queries = 100
[attacks.autoattack_l2]
n_iter = 10
n_target_classes = 3
square_queries = 100
"""
ROBUSTNESS_SETTINGS = {
    "--max-samples": "40",
    "--attack-samples": "8",
    "--verify-samples": "4",
    "--smoothing-samples": "4",
    "--smoothing-n": "50",
    "--smoothing-n0": "10",
    "--corruptions": "gaussian_noise,contrast",
    "--severities": "1,5",
    "--attacks": "fgsm,pgd_linf,deepfool",
    "--validity-budget": "fast",
    "--threads": "1",
}
ROBUSTNESS_OPTIONS = [part for option in ROBUSTNESS_SETTINGS.items() for part in option]


def write_subset(directory: Path) -> tuple[Path, Path]:
    """A manifest (``id``, ``path``, ``label``, ``split``) of the first ten sample images of every class plus one
    image listed twice, and the CNN's predictions for it keyed by ``id``; returns (manifest, predictions)."""
    labels = pd.read_csv(SAMPLE_DATA / "labels.csv")
    subset = labels.groupby("label", sort=False).head(PER_CLASS).reset_index(drop=True)
    subset = subset.iloc[:-1].assign(
        id=lambda f: f["path"], split=np.where(np.arange(len(subset) - 1) % 4, "train", "test")
    )
    first = subset.iloc[0]
    copy = first.copy()
    copy["id"], copy["split"] = COPY_ID, "train" if first["split"] == "test" else "test"
    subset = pd.concat([subset, copy.to_frame().T], ignore_index=True)
    manifest = directory / "labels.csv"
    subset[["id", "path", "label", "split"]].to_csv(manifest, index=False)
    predictions = pd.read_csv(SAMPLE_DATA / "predictions.csv").set_index("path").loc[subset["path"]]
    predictions.insert(0, "id", subset["id"].to_numpy())
    prediction_file = directory / "predictions.csv"
    predictions.to_csv(prediction_file, index=False)
    return manifest, prediction_file


def robustness_config(root: Path, attack_config: Path):
    """The :class:`RobustnessConfig` that ``robustlens robustness ROOT`` builds from :data:`ROBUSTNESS_OPTIONS`."""
    from robustlens.cli import build_parser
    from robustlens.commands.robustness import config_from_args

    args = build_parser().parse_args(
        ["robustness", str(root), "--attack-config", str(attack_config), *ROBUSTNESS_OPTIONS]
    )
    return config_from_args(args)


@pytest.fixture(scope="session")
def e2e_run(tmp_path_factory) -> tuple[Path, AnalysisReport]:
    """``robustlens init`` through the command line, then one ``analyze`` of every stage (``stages=["all"]``,
    robustness included, with the small robustness settings); the workspace (read-only) and the report."""
    directory = tmp_path_factory.mktemp("e2e")
    manifest, predictions = write_subset(directory)
    attack_config = directory / "attacks.toml"
    attack_config.write_text(QUICK_ATTACKS, encoding="utf-8")
    root = directory / "ws"
    model = ["--model", str(SAMPLE_DATA / "model.pt"), "--model-config", str(SAMPLE_DATA / "model.json")]
    init = [
        "init",
        str(root),
        "--data",
        str(SAMPLE_DATA),
        "--labels",
        str(manifest),
        "--predictions",
        f"cnn={predictions}",
    ]
    assert main([*init, *model, "--quiet"]) == 0
    report = analyze(
        Workspace(root),
        stages=["all"],
        configs={"robustness": robustness_config(root, attack_config)},
        progress=False,
        threads=1,
    )
    return root, report


@pytest.fixture(scope="session")
def e2e_workspace(e2e_run) -> Path:
    return e2e_run[0]


def artifact(root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(root / "artifacts" / f"{name}.parquet")


def summary(root: Path) -> dict:
    return json.loads((root / "artifacts" / "robustness_summary.json").read_text(encoding="utf-8"))


def open_app(root: Path, monkeypatch) -> AppTest:
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(root))
    return AppTest.from_file(APP, default_timeout=90).run()


def goto(app: AppTest, page: str) -> AppTest:
    app.switch_page(f"views/{page}.py").run()
    assert_clean(app, page)
    assert app.title[0].value == {route.name: route.title for route in ROUTES}[page]
    return app


def assert_clean(app: AppTest, page: str) -> None:
    assert not app.exception, (page, [e.value for e in app.exception])
    # the tiny robustness run may fail a validity check: that status is an error box on purpose
    errors = [e.value for e in app.error if not e.value.startswith("Validity checks")]
    assert not errors, (page, errors)


def texts(app: AppTest) -> str:
    parts = [m.value for m in app.markdown] + [c.value for c in app.caption] + [i.value for i in app.info]
    parts += [s.value for s in app.success] + [w.value for w in app.warning] + [e.value for e in app.error]
    return "\n".join(parts)


def metrics(app: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in app.metric}


# -- the pipeline ----------------------------------------------------------------------------------------------------
def test_every_stage_ran_wrote_its_artifacts_and_is_current(e2e_run, capsys):
    e2e_workspace, report = e2e_run
    assert set(STAGES) == {
        "metrics",
        "embeddings",
        "projection",
        "duplicates",
        "outliers",
        "label_issues",
        "quality_flags",
        "robustness",
        "issues",
        "evaluation",
        "slices",
    }
    assert set(report.summaries) == set(STAGES) and not report.skipped
    workspace = Workspace(e2e_workspace)
    assert len(workspace.samples) == 10 * PER_CLASS and workspace.has_model
    capsys.readouterr()
    assert main(["analyze", str(e2e_workspace), "--list-stages"]) == 0
    listing = capsys.readouterr().out
    for stage in STAGES:
        if stage != "robustness":
            assert f"{stage}  [current]" in listing, (stage, listing)
    # robustness is on request; run with other settings than its defaults, the listing says its config changed
    assert "robustness  [stale: config changed]  (on request)" in listing
    assert np.load(e2e_workspace / "artifacts" / "embeddings.npy").shape[0] == 100
    ids = set(workspace.samples["id"])
    for name in ("metrics", "projection", "duplicates", "outliers", "label_issues", "eval_samples_cnn"):
        frame = artifact(e2e_workspace, name)  # one row per sample
        assert len(frame) == 100 and set(frame["id"]) == ids, name
    for name in (
        "flags_quality",
        "flags_duplicates",
        "flags_outliers",
        "flags_label_issues",
        "flags_robustness",
        "issues",
        "robustness_samples",
    ):
        frame = artifact(e2e_workspace, name)
        assert set(frame["id"]) <= ids, name
    for name in (
        "slices",
        "worst_slices",
        "robustness_slices",
        "robustness_curves",
        "robustness_corruptions",
        "robustness_certified",
        "robustness_verified",
        "flags_robustness",
    ):
        assert len(artifact(e2e_workspace, name)), name
    assert summary(e2e_workspace)["headline"]["linf"]["n"] == 8


def test_the_planted_leak_is_found(e2e_workspace):
    duplicates = artifact(e2e_workspace, "duplicates").set_index("id")
    first = pd.read_csv(e2e_workspace.parent / "labels.csv")["id"][0]
    assert duplicates.loc[first, "exact_group"] >= 0
    assert duplicates.loc[first, "exact_group"] == duplicates.loc[COPY_ID, "exact_group"]
    assert duplicates.loc[[first, COPY_ID], "cross_split"].all()
    issues = artifact(e2e_workspace, "issues")
    assert set(issues.loc[issues["issue"] == "leakage", "id"]) == {first, COPY_ID}


# -- every page on those artifacts -----------------------------------------------------------------------------------
def test_overview(e2e_workspace, monkeypatch):
    app = open_app(e2e_workspace, monkeypatch)
    assert_clean(app, "overview")
    evaluation = json.loads((e2e_workspace / "artifacts" / "evaluation" / "cnn.json").read_text(encoding="utf-8"))
    shown = metrics(app)
    assert shown["Samples"] == "100" and shown["Classes"] == "10"
    assert shown["Accuracy (cnn)"] == f"{evaluation['accuracy']:.1%}"
    issues = artifact(e2e_workspace, "issues")
    assert shown["Samples with issues"] == f"{issues['id'].nunique():,}"
    counts = issues.groupby("issue")["id"].nunique()
    assert "fragile" in counts.index and "label_issue" in counts.index  # robustness flags reached the issue table
    for issue, count in counts.items():
        assert f"**{issue.replace('_', ' ')}** — {count:,} samples" in texts(app), issue


def test_explorer_shows_the_samples_and_their_classes(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "explorer")
    assert "**100** of 100 samples" in texts(app)
    captions = [caption for image in app.get("image") for caption in image.captions]
    samples = Workspace(e2e_workspace).samples
    assert len(captions) == 48
    assert [c.split(" ")[0] for c in captions] == samples["label"].astype(str).tolist()[:48]
    app.multiselect(key="flt.issues").set_value(["fragile"]).run()
    assert_clean(app, "explorer")
    fragile = artifact(e2e_workspace, "flags_robustness")
    assert f"**{fragile['id'].nunique():,}** of 100 samples" in texts(app)


def test_embedding_map_plots_every_sample(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "embedding_map")
    chart = json.loads(app.get("plotly_chart")[0].proto.spec)
    projection = artifact(e2e_workspace, "projection")
    assert sorted(chart["data"][0]["customdata"]) == sorted(projection["id"]) and len(projection) == 100


def test_review_starts_with_the_lowest_label_quality(e2e_workspace, monkeypatch):
    app = open_app(e2e_workspace, monkeypatch)
    app.text_input(key="rl.user_input").set_value("ann").run()
    goto(app, "review")
    issues = artifact(e2e_workspace, "label_issues")
    queue = issues[issues["is_label_issue"]].sort_values("rank")["id"].tolist()
    assert queue and queue[0] in texts(app)
    assert f"{len(queue):,} in this queue" in texts(app)


def test_duplicates_lists_the_leaking_cluster(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "duplicates")
    duplicates = artifact(e2e_workspace, "duplicates")
    clustered = duplicates[duplicates["near_group"] >= 0]
    shown = metrics(app)
    assert (
        shown["Exact-duplicate clusters"]
        == str(duplicates.loc[duplicates["exact_group"] >= 0, "exact_group"].nunique())
        == "1"
    )
    assert shown["Samples in clusters"] == str(len(clustered))
    assert (
        shown["Cross-split clusters (leakage)"]
        == str(clustered.loc[clustered["cross_split"], "near_group"].nunique())
        == "1"
    )
    assert "leakage: spans test / train" in texts(app)


def test_performance_shows_the_evaluation(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "performance")
    evaluation = json.loads((e2e_workspace / "artifacts" / "evaluation" / "cnn.json").read_text(encoding="utf-8"))
    assert [h.value for h in app.subheader][0] == "cnn"
    assert f"{evaluation['accuracy']:.2%}" in [m.value for m in app.metric]


def test_robustness_shows_the_headline_of_the_run(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "robustness")
    report = summary(e2e_workspace)
    head = report["headline"]["linf"]
    robust = [m for m in app.metric if m.label.startswith("Robust acc. L∞")]
    assert len(robust) == 1 and robust[0].value == f"{head['robust_accuracy']:.1%}"
    assert any(f"95 % CI {head['ci_low']:.1%}–{head['ci_high']:.1%}" in c.value for c in app.caption)
    status = report["validity"]["status"]
    boxes = {"pass": app.success, "warn": app.warning, "fail": app.error}[status]
    assert any(b.value.startswith("Validity checks") for b in boxes)
    assert len(app.get("plotly_chart")) >= 4


def test_collections_and_export_pages(e2e_workspace, monkeypatch):
    app = goto(open_app(e2e_workspace, monkeypatch), "collections")
    assert "No collections yet" in texts(app)
    goto(app, "export")
    assert "100 samples." in texts(app)
    assert "robustlens export" in app.code[0].value and str(e2e_workspace) in app.code[0].value


def test_the_robustness_shortcut_with_the_same_settings_finds_the_stage_current(e2e_workspace, capsys):
    """``robustlens robustness`` is the robustness stage: with the settings ``analyze`` ran it with, it attacks
    nothing again (and writes nothing)."""
    before = {p.name: p.read_bytes() for p in (e2e_workspace / "artifacts").glob("robustness_*")}
    capsys.readouterr()
    assert (
        main(
            [
                "robustness",
                str(e2e_workspace),
                "--attack-config",
                str(e2e_workspace.parent / "attacks.toml"),
                *ROBUSTNESS_OPTIONS,
                "--quiet",
            ]
        )
        == 0
    )
    assert "(unchanged: results of the previous run)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in (e2e_workspace / "artifacts").glob("robustness_*")} == before


def test_the_benchmark_workspace_has_the_stages_columns(e2e_workspace, tmp_path):
    """:func:`tests.dashboard_fixtures.synthetic_workspace` (too large for the stages: random values) writes every
    artifact it has with exactly the columns the stages wrote here, and only issue names the stages use."""
    from tests.dashboard_fixtures import synthetic_workspace

    synthetic = synthetic_workspace(tmp_path / "ws", 300, image_source=SAMPLE_DATA / "images")
    names = [p.stem for p in (synthetic.root / "artifacts").glob("*.parquet")]
    assert {"metrics", "issues", "issue_matrix", "projection", "label_issues", "duplicates"} <= set(names)
    for name in names:
        real, made = artifact(e2e_workspace, name), artifact(synthetic.root, name)
        if name == "issue_matrix":  # one column per issue type found
            assert [c for c in made.columns if c in ("id", "issue_count", "max_severity")] == [
                c for c in real.columns if c in ("id", "issue_count", "max_severity")
            ]
        else:
            assert list(made.columns) == list(real.columns), name
    from robustlens.analysis.stages import label_issues, quality_flags

    stage_issues = {
        *quality_flags.ISSUES,
        "exact_duplicate",
        "near_duplicate",
        "leakage",
        "outlier",
        label_issues.ISSUE,
        "fragile",
    }
    assert set(artifact(e2e_workspace, "issues")["issue"]) <= stage_issues
    assert set(artifact(synthetic.root, "issues")["issue"]) <= stage_issues
    assert np.load(synthetic.root / "artifacts" / "embeddings.npy").shape[0] == 300


def test_the_dashboard_fixture_gets_its_planted_issues_from_the_stages(analysed_template, planted_inputs):
    """The dashboard tests' workspace (:mod:`tests.dashboard_fixtures`) is analysed by the real stages; what those
    tests rely on was planted in its input and must come out of the stages: every planted issue is flagged, every
    issue type has at least six samples (the overview shows six of each), the planted copies are clusters, those
    across splits leak, and the second prediction set is the weaker one."""
    issues = artifact(analysed_template, "issues")
    flagged = issues.groupby("issue")["id"].agg(set)
    for issue in ("dark", "light", "blurry", "low_information"):
        planted = getattr(planted_inputs, issue)
        assert planted <= flagged[issue], issue  # recall 1
        assert len(flagged[issue] - planted) <= 2, issue  # precision ≥ 0.8 here
    assert issues.groupby("issue")["id"].nunique().min() >= 6
    duplicates = artifact(analysed_template, "duplicates").set_index("id")
    for pairs, leaking in ((planted_inputs.near_pairs, False), (planted_inputs.leaking_pairs, True)):
        for original, copy in pairs:
            group = duplicates.loc[[original, copy], "near_group"]
            assert group.iloc[0] >= 0 and group.iloc[0] == group.iloc[1]
            assert duplicates.loc[[original, copy], "cross_split"].all() == leaking
    assert set(flagged["leakage"]) == {i for pair in planted_inputs.leaking_pairs for i in pair}
    accuracy = {
        name: json.loads((analysed_template / "artifacts" / "evaluation" / f"{name}.json").read_text(encoding="utf-8"))[
            "accuracy"
        ]
        for name in ("cnn", "cnn_v2")
    }
    assert accuracy == {"cnn": pytest.approx(0.9175), "cnn_v2": pytest.approx(0.864)}
