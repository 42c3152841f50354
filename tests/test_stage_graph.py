"""The stage protocol and the orchestrator's dependency graph: order, --only, dependencies pulled in, nothing
re-run when current, downstream re-runs, cycle detection, config validation errors, --list-stages, and the
per-sample ``map_batch`` functions (tiny real workspaces: 15 shipped sample images and the sample CNN)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens import cli
from robustlens.analysis.analyze import (
    STAGES,
    AnalysisReport,
    StageGraphError,
    analyze,
    default_stages,
    dependencies,
    list_stages,
    stage_specs,
    stage_status,
    topological_order,
    writer_of,
)
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.loader import iter_decoded
from robustlens.analysis.robustness import run as robustness_run
from robustlens.analysis.robustness.run import RobustnessConfig
from robustlens.analysis.stages import duplicates, embeddings, evaluation, label_issues, metrics, outliers, slices
from robustlens.analysis.stages.base import StageResult, StageSpec
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ConfigError, ValidationError, WorkspaceError
from tests.metrics_planted import SAMPLE_DATA, copy_real_images

#: Robustness with every expensive part off: one corruption at one severity on 20 images.
CHEAP_ROBUSTNESS = RobustnessConfig(
    max_samples=20,
    attack_samples=0,
    smoothing_samples=0,
    corruptions=("contrast",),
    severities=(1,),
    attacks=(),
    num_examples=0,
    verify_samples=0,
    stability_samples=0,
    validity_budget="fast",
    headline="preview",
)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """A workspace of 15 sample images with the sample CNN, nothing analysed (copy before writing). Below UMAP's
    minimum sample count, so the map is a PCA layout and no numba compilation is paid."""
    root = tmp_path_factory.mktemp("graph")
    copy_real_images(root / "data", 15)
    init_workspace(
        root / "ws",
        InitOptions(
            data=root / "data",
            model=str(SAMPLE_DATA / "model.pt"),
            model_config=SAMPLE_DATA / "model.json",
            progress=False,
        ),
    )
    return root / "ws"


@pytest.fixture(scope="module")
def analysed(fresh, tmp_path_factory) -> tuple[Path, AnalysisReport]:
    """``fresh`` after a plain ``analyze`` (copy before writing)."""
    root = shutil.copytree(fresh, tmp_path_factory.mktemp("analysed") / "ws")
    return root, analyze(Workspace(root), progress=False)


def copy(root: Path, tmp_path: Path) -> Workspace:
    return Workspace(shutil.copytree(root, tmp_path / "ws"))


def artifact_times(root: Path) -> dict[str, int]:
    """Modification time of every artifact file (the caches and the run log left out)."""
    folder = root / "artifacts"
    return {
        p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and "cache" not in p.parts and p.name != "stage_runs.json"
    }


# -- the graph ---------------------------------------------------------------------------------------------------


def test_graph_order_follows_reads_and_writes():
    specs = stage_specs()
    order = topological_order(specs)
    assert order == list(STAGES)  # the registry is a topological order, so a plain run keeps its order
    position = {name: i for i, name in enumerate(order)}
    for name, before in dependencies(specs).items():
        assert all(position[b] < position[name] for b in before), (name, before)
    # Derived from the declarations, not listed by hand.
    assert dependencies(specs)["issues"] == ["quality_flags", "duplicates", "outliers", "label_issues", "robustness"]
    assert writer_of("flags_robustness", specs) == "robustness" and writer_of("evaluation/cnn", specs) == "evaluation"
    assert "robustness" not in default_stages() and len(default_stages()) == 10
    assert all(isinstance(spec, StageSpec) and spec.name == name for name, spec in specs.items())


def _spec(name: str, reads: tuple[str, ...], writes: tuple[str, ...], **extra) -> StageSpec:
    @dataclass
    class Config:
        pass

    return StageSpec(
        name=name, config=Config, run=lambda context, config: StageResult(name, {}), reads=reads, writes=writes, **extra
    )


def test_cycles_and_double_writers_are_refused_naming_the_stages():
    specs = {
        "a": _spec("a", ("z",), ("x",)),
        "b": _spec("b", ("x",), ("y",)),
        "c": _spec("c", ("y",), ("z",)),
        "d": _spec("d", ("x",), ("w",)),
    }
    with pytest.raises(StageGraphError, match=r"cycle: a -> b -> c -> a"):
        topological_order(specs)
    # A late read closes no cycle: the stage reconciles the change itself.
    specs["a"] = _spec("a", (), ("x",), reads_late=("z",))
    assert topological_order(specs) == ["a", "b", "c", "d"]
    # ``uses`` order like reads.
    specs["a"] = _spec("a", (), ("x",), uses=("w",))
    with pytest.raises(StageGraphError, match="cycle: a -> d -> a"):
        topological_order(specs)
    with pytest.raises(StageGraphError, match="'x' is written by both stage 'a' and stage 'b'"):
        topological_order({"a": _spec("a", (), ("x",)), "b": _spec("b", (), ("x",))})


# -- configs -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "stage", "field", "expected", "got"),
    [
        (lambda: duplicates.Config(n_neighbors=0), "duplicates", "n_neighbors", "an integer >= 1", 0),
        (
            lambda: duplicates.Config(min_embedding_cosine=1.5),
            "duplicates",
            "min_embedding_cosine",
            "a number in [-1.0, 1.0]",
            1.5,
        ),
        (lambda: outliers.Config(max_fraction=float("nan")), "outliers", "max_fraction", "a number in [0, 1]", None),
        (
            lambda: embeddings.Config(source="pixels"),
            "embeddings",
            "source",
            "one of ('auto', 'imported', 'model', 'fallback')",
            "pixels",
        ),
        (lambda: label_issues.Config(cv_folds=1), "label_issues", "cv_folds", "an integer >= 2", 1),
        (lambda: slices.Config(alpha=0), "slices", "alpha", "a number in (0, 1]", 0),
        (lambda: slices.Config(num_clusters=1), "slices", "num_clusters", "an integer >= 2 or None", 1),
        (lambda: evaluation.Config(top_k=(1, 0)), "evaluation", "top_k", "a sequence of integers >= 1", (1, 0)),
        (lambda: metrics.Config(batch_size=True), "metrics", "batch_size", "an integer >= 1 or None", True),
    ],
)
def test_configs_are_validated_at_construction(config, stage, field, expected, got):
    with pytest.raises(ConfigError) as caught:
        config()
    error = caught.value
    assert isinstance(error, ValidationError) and isinstance(error, ValueError)
    assert (error.owner, error.field, error.expected) == (f"stage '{stage}'", field, expected)
    if got is not None:
        assert error.got == got
    assert str(error).startswith(f"stage '{stage}': {field} must be {expected}, got ")


def test_a_config_of_the_wrong_stage_is_refused(fresh):
    with pytest.raises(ValidationError, match="config of stage 'outliers' must be a Config"):
        analyze(Workspace(fresh), stages=["outliers"], configs={"outliers": slices.Config()}, progress=False)


# -- what runs ---------------------------------------------------------------------------------------------------


def test_a_plain_run_runs_the_ten_analysis_stages_and_leaves_all_current(analysed):
    root, report = analysed
    assert set(report.summaries) | set(report.skipped) == set(default_stages())
    assert [r.stage for r in report.runs] == [n for n in default_stages() if n not in report.skipped]
    assert all(isinstance(r, StageResult) and not r.current for r in report.runs if r.stage != "evaluation")
    # Without prediction sets evaluation has nothing to do: it writes nothing and says why.
    assert report.results["evaluation"].current and report.results["evaluation"].artifacts == ()
    assert report.summaries["evaluation"]["reason"] == "the workspace has no prediction sets"
    assert report.runs[0].artifacts == ("metrics", "fingerprints")
    workspace = Workspace(root)
    for name in report.summaries:
        assert stage_status(workspace, name) == "current", name
    assert stage_status(workspace, "robustness") == "never run"
    runs = json.loads((root / "artifacts" / "stage_runs.json").read_text())
    assert set(runs) == set(report.summaries)


def test_a_requested_stage_pulls_in_what_it_needs_and_nothing_else(fresh, tmp_path):
    workspace = copy(fresh, tmp_path)
    report = analyze(workspace, stages=["duplicates"], progress=False)
    assert [r.stage for r in report.runs] == ["metrics", "embeddings", "duplicates"]
    assert report.reasons["duplicates"] == "requested"
    assert report.reasons["metrics"].startswith("needed by 'duplicates' (never run)")
    assert not workspace.artifact_path("projection.parquet").exists()
    assert stage_status(workspace, "duplicates") == "current"
    assert stage_status(workspace, "outliers") == "never run"
    # Now outliers needs only embeddings, which is current: nothing else runs.
    report = analyze(workspace, stages=["outliers"], progress=False)
    assert [r.stage for r in report.runs] == ["outliers"]


def test_only_runs_one_stage_and_fails_clearly_without_its_inputs(fresh, tmp_path):
    workspace = copy(fresh, tmp_path)
    with pytest.raises(
        WorkspaceError,
        match=r"stage 'outliers' needs artifact '(embeddings|visual_features)', "
        r"written by stage 'embeddings'",
    ):
        analyze(workspace, stages=["outliers"], only=True, progress=False)
    assert not workspace.artifact_path("outliers.parquet").exists()
    analyze(workspace, stages=["embeddings"], only=True, progress=False)
    report = analyze(workspace, stages=["outliers"], only=True, progress=False)
    assert [r.stage for r in report.runs] == ["outliers"]
    assert workspace.artifact_path("flags_outliers.parquet").exists()


def test_nothing_is_rewritten_when_current(analysed, tmp_path):
    workspace = copy(analysed[0], tmp_path)
    before = artifact_times(workspace.root)
    report = analyze(workspace, stages=["slices", "duplicates", "outliers"], progress=False)
    # Their inputs are current, so no dependency runs; each stage finds its own artifacts current.
    assert [r.stage for r in report.runs] == ["duplicates", "outliers", "slices"]
    assert all(r.current and r.artifacts == () and r["skipped"] is True for r in report.runs)
    assert artifact_times(workspace.root) == before


def test_a_stage_that_writes_reruns_the_stages_reading_its_output(analysed, tmp_path):
    workspace = copy(analysed[0], tmp_path)
    before = pd.read_parquet(workspace.artifact_path("flags_outliers.parquet"))
    report = analyze(
        workspace,
        stages=["outliers"],
        configs={"outliers": outliers.Config(threshold=1.0, max_fraction=0.5)},
        progress=False,
    )
    assert [r.stage for r in report.runs] == ["outliers", "issues", "slices"]
    assert report.reasons["issues"] == "reads what 'outliers' wrote"
    after = pd.read_parquet(workspace.artifact_path("flags_outliers.parquet"))
    assert len(after) > len(before)
    matrix = pd.read_parquet(workspace.artifact_path("issue_matrix.parquet"))
    assert (matrix["outlier"] > 0).sum() == after["id"].nunique()
    # The default config is no longer what outliers ran with.
    assert stage_status(workspace, "outliers") == "stale"
    assert stage_status(workspace, "outliers", outliers.Config(threshold=1.0, max_fraction=0.5)) == "current"


def test_robustness_is_a_stage_on_request_that_refreshes_issues_and_slices(analysed, tmp_path, monkeypatch):
    workspace = copy(analysed[0], tmp_path)
    # Attacks are too slow for this test: the first three evaluated samples are flagged fragile instead.
    planted = []

    def plant(frame: pd.DataFrame) -> pd.DataFrame:
        chosen = frame["id"].astype(str).head(3).tolist()
        planted.extend(chosen)
        return pd.DataFrame({"id": chosen, "issue": "fragile", "severity": 0.9, "explanation": "planted"})

    monkeypatch.setattr(robustness_run, "fragile_flags", plant)
    report = analyze(workspace, stages=["robustness"], configs={"robustness": CHEAP_ROBUSTNESS}, progress=False)
    # issues and slices read its fragile flags; then robustness re-ranks its slice table on the new slices.
    assert [r.stage for r in report.runs] == ["robustness", "issues", "slices", "robustness"]
    first, last = report.runs[0], report.runs[-1]
    assert first["skipped"] is False and "flags_robustness" in first.artifacts
    assert last["skipped"] == "slices" and last.artifacts == ("robustness_slices", "robustness_summary")
    issues = pd.read_parquet(workspace.artifact_path("issues.parquet"))
    assert sorted(issues.loc[issues["issue"] == "fragile", "id"]) == sorted(planted)
    table = pd.read_parquet(workspace.artifact_path("robustness_slices.parquet"))
    assert "flagged fragile" in set(table["description"])  # ranked on the slices that know the fragile flags
    assert stage_status(workspace, "robustness", CHEAP_ROBUSTNESS) == "current"
    assert stage_status(workspace, "slices") == "current" and stage_status(workspace, "issues") == "current"
    # A second request finds everything current.
    again = analyze(workspace, stages=["robustness"], configs={"robustness": CHEAP_ROBUSTNESS}, progress=False)
    assert [(r.stage, r.current) for r in again.runs] == [("robustness", True)]


def test_robustness_is_skipped_with_a_warning_without_a_model(tmp_path):
    copy_real_images(tmp_path / "data", 12)
    workspace, _ = init_workspace(tmp_path / "ws", InitOptions(data=tmp_path / "data", progress=False))
    report = analyze(workspace, stages=["robustness"], progress=False)
    assert report.runs == [] and "needs a model" in report.skipped["robustness"]
    assert any("stage 'robustness' skipped" in w for w in report.warnings)


# -- --list-stages -----------------------------------------------------------------------------------------------


def test_list_stages_shows_reads_writes_and_status(analysed, capsys):
    root, _ = analysed
    rows = {row["name"]: row for row in list_stages(Workspace(root))}
    assert rows["robustness"]["status"] == "never run" and rows["robustness"]["on_request"]
    assert rows["metrics"]["status"] == "current"
    assert cli.main(["analyze", str(root), "--list-stages"]) == 0
    out = capsys.readouterr().out
    block = out[out.index("robustness  [never run]") : out.index("\nissues")]
    assert "(on request)" in block and "reads:      samples, model" in block
    assert "reads late: slices, slice_predicate_masks" in block and "flags_robustness" in block
    assert "metrics  [current]" in out and "writes:     metrics, fingerprints" in out
    assert cli.main(["analyze", "--list-stages"]) == 0  # no workspace: no status
    assert "[" not in capsys.readouterr().out.split("\n")[0]


def test_cli_only_and_stages_options(analysed, tmp_path, capsys):
    root = shutil.copytree(analysed[0], tmp_path / "ws")
    assert cli.main(["analyze", str(root), "--only", "issues", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "issues" in err and "metrics" not in err
    assert cli.main(["analyze", str(root), "--stages", "nope", "--quiet"]) == 2
    assert "unknown stage(s) ['nope']" in capsys.readouterr().err
    assert cli.main(["analyze", str(root), "--stages", "issues", "--only", "issues"]) == 2


# -- per-sample purity -------------------------------------------------------------------------------------------


def test_map_batch_is_per_sample(fresh):
    workspace = Workspace(fresh)
    samples = workspace.samples
    ((indices, pixels),) = list(
        iter_decoded(
            workspace.dataset_root, samples["path"].tolist(), np.arange(6), batch_size=6, workers=1, progress=False
        )
    )
    config = metrics.Config()
    whole = metrics.map_batch(pixels, config)
    parts = pd.concat([metrics.map_batch(pixels[:2], config), metrics.map_batch(pixels[2:], config)], ignore_index=True)
    pd.testing.assert_frame_equal(whole, parts)
    assert {"brightness", "pixel_hash", "phash"} <= set(whole.columns) and len(whole) == 6
    rows = embeddings.map_batch(pixels, embeddings.Config())
    again = pd.concat([embeddings.map_batch([p], embeddings.Config()) for p in pixels], ignore_index=True)
    pd.testing.assert_frame_equal(rows, again)
    assert list(rows.columns) == ["raw", "thumbnail"]
    assert len(rows["thumbnail"][0]) == 32 * 32
