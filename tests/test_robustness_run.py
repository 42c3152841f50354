"""The robustness run on a real workspace (shipped Fashion-MNIST sample + its CNN), with tiny settings:
artifacts and their columns, the invariants of the curves, self-checks, per-sample rows, fragile flags in the
issues stage, skipping / slice refresh, and the CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustlens import cli
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.robustness.run import RobustnessConfig, run_robustness
from robustlens.analysis.robustness.tables import SLICE_COLUMNS, select_samples
from robustlens.analysis.stages import issues, slices
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace
from robustlens.commands import robustness as command
from robustlens.commands.robustness import format_summary
from robustlens.errors import ValidationError

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"

TINY = RobustnessConfig(max_samples=40, attack_samples=40, smoothing_samples=8, smoothing_n0=20, smoothing_n=100,
                        corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
                        attacks=("fgsm", "pgd_linf", "deepfool"), selfcheck_samples=16, masking_samples=16,
                        num_examples=6)

COLUMNS = {
    "robustness_corruptions": ["corruption", "family", "severity", "accuracy", "error", "relative_error", "flip_rate",
                               "n_samples"],
    "robustness_curves": ["norm", "attack", "eps", "robust_accuracy", "success_rate", "n_samples"],
    "robustness_certified": ["radius", "certified_accuracy", "n_samples", "sigma"],
    "robustness_slices": list(SLICE_COLUMNS),
    "robustness_samples": ["id", "rob_clean_correct", "rob_corruption_accuracy", "rob_flip_severity_noise",
                           "rob_flip_severity_digital", "rob_attacked", "rob_min_linf_eps", "rob_min_l2_eps",
                           "rob_min_l2", "rob_certified_radius", "rob_certified_correct", "rob_fragile",
                           "rob_fragility", "rob_fragile_reason"],
    "flags_robustness": ["id", "issue", "severity", "explanation"],
}


def build_workspace(root: Path, *, model: bool = True) -> Path:
    """A workspace of the 2,000 shipped sample images (with the sample CNN unless ``model=False``)."""
    options = InitOptions(data=SAMPLE_DATA, labels=SAMPLE_DATA / "labels.csv",
                          predictions=[("cnn", SAMPLE_DATA / "predictions.csv")],
                          model=str(SAMPLE_DATA / "model.pt") if model else None,
                          model_config=SAMPLE_DATA / "model.json" if model else None, progress=False)
    init_workspace(root, options)
    return root


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)   # 2 shared cores: more threads than free cores stalls torch
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A fresh sample workspace nothing has run on (copy it before writing)."""
    return build_workspace(tmp_path_factory.mktemp("rob") / "ws")


@pytest.fixture(scope="module")
def analysed(template, tmp_path_factory) -> tuple[Path, dict]:
    """The template after one tiny robustness run, and the run's summary."""
    root = tmp_path_factory.mktemp("rob_run") / "ws"
    shutil.copytree(template, root)
    return root, run_robustness(Workspace(root), TINY, progress=False, threads=1)


def artifact(root: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(root / "artifacts" / f"{name}.parquet")


def run_cli(argv: list[str], monkeypatch) -> int:
    """``robustlens.cli.main`` with the robustness subcommand registered (whether or not cli.py wires it yet)."""
    original = cli.build_parser

    def build() -> argparse.ArgumentParser:
        parser = original()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "robustness" not in sub.choices:
            command.add_parser(sub)
        return parser

    monkeypatch.setattr(cli, "build_parser", build)
    return cli.main(argv)


# -- artifacts ---------------------------------------------------------------------------------------------------
def test_artifacts_exist_with_documented_columns(analysed):
    root, summary = analysed
    for name, columns in COLUMNS.items():
        assert list(artifact(root, name).columns) == columns, name
    index = json.loads((root / "artifacts" / "index.json").read_text())
    for name in [*COLUMNS, "robustness_summary", "robustness_examples"]:
        assert index[name]["stage"] == "robustness"
    stored = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    for key in ("config", "clean_accuracy", "corruptions", "attacks", "certified", "self_check", "warnings",
                "timings", "worst_slices", "fragile"):
        assert key in stored, key
    assert stored["config"]["attacks"] == ["fgsm", "pgd_linf", "deepfool"]
    assert set(stored["timings"]) >= {"corruptions", "attacks", "self_checks", "smoothing", "total"}
    with np.load(root / "artifacts" / "robustness_examples.npz", allow_pickle=False) as examples:
        assert examples["clean"].shape == examples["adversarial"].shape == (6, 1, 28, 28)
        bounded = np.isin(examples["attack"], ["fgsm", "pgd_linf"])
        linf = np.abs(examples["perturbation"].astype(np.float32)).reshape(6, -1).max(axis=1)
        assert bounded.any() and (linf[bounded] <= examples["eps"][bounded] * (1 + 1e-3) + 1e-6).all()
        evaluated = set(artifact(root, "robustness_samples")["id"])
        assert set(examples["ids"]) <= evaluated
        # predictions are those of the stored images
        model = Workspace(root).load_model()
        with torch.no_grad():
            predicted = model(torch.from_numpy(examples["adversarial"].astype(np.float32))).argmax(1).numpy()
        assert (predicted == examples["adversarial_pred"]).mean() >= 5 / 6   # float16 storage may flip a borderline one


def test_corruption_accuracy_drops_with_severity(analysed):
    table = artifact(analysed[0], "robustness_corruptions")
    by_severity = table.groupby("severity")["accuracy"].mean()
    assert by_severity[5] < by_severity[1]
    assert set(table["family"]) == {"noise", "digital"}
    assert np.allclose(table["error"], 1 - table["accuracy"])


def test_worst_case_is_below_every_attack_and_curves_fall_with_eps(analysed):
    curves = artifact(analysed[0], "robustness_curves")
    for norm, rows in curves.groupby("norm"):
        grid = rows.pivot(index="eps", columns="attack", values="robust_accuracy").sort_index()
        attacks = [c for c in grid.columns if c != "worst_case"]
        assert attacks, norm
        assert (grid["worst_case"].to_numpy()[:, None] <= grid[attacks].to_numpy() + 1e-12).all()
        assert (np.diff(grid.to_numpy(), axis=0) <= 1e-12).all(), f"{norm} curve rises with eps"
    linf = curves[(curves["norm"] == "linf") & (curves["attack"] == "worst_case")].sort_values("eps")
    assert linf["robust_accuracy"].iloc[-1] < linf["robust_accuracy"].iloc[0]     # 8/255 breaks more than 1/255


def test_success_rate_counts_clean_correct_samples(analysed):
    root, summary = analysed
    frame = artifact(root, "robustness_samples")
    curves = artifact(root, "robustness_curves")
    correct = frame["rob_clean_correct"].to_numpy()
    worst = curves[(curves["norm"] == "linf") & (curves["attack"] == "worst_case")].sort_values("eps")
    eps = frame["rob_min_linf_eps"].to_numpy()
    for _, row in worst.iterrows():
        broken = correct & (eps <= row["eps"] * (1 + 1e-9))
        assert row["success_rate"] == pytest.approx(broken.sum() / correct.sum())
        assert row["robust_accuracy"] == pytest.approx((correct & ~broken).mean())


def test_self_check_passes_for_every_attack_run(analysed):
    _, summary = analysed
    checks = summary["self_check"]["attacks"]
    assert set(checks) == {"fgsm", "pgd_linf", "deepfool"}
    assert all(c["passed"] and c["n_evaluated"] > 0 for c in checks.values())
    assert set(summary["self_check"]["masking"]) == {"linf", "l2"}
    assert summary["self_check"]["passed"] and summary["warnings"] == []


def test_per_sample_rows_only_for_evaluated_samples(analysed):
    root, _ = analysed
    frame = artifact(root, "robustness_samples")
    samples = Workspace(root).samples
    assert len(frame) == 40 and frame["id"].is_unique and set(frame["id"]) <= set(samples["id"])
    labels = samples.set_index("id").loc[frame["id"], "label"]
    assert labels.value_counts().tolist() == [4] * 10          # stratified: 200 images per class → 4 each
    assert frame["rob_attacked"].all()
    assert frame["rob_certified_radius"].notna().sum() == 8
    assert frame["rob_certified_correct"].notna().sum() == 8
    wrong = ~frame["rob_clean_correct"]
    assert (frame.loc[wrong, "rob_min_linf_eps"] == 0).all() and (frame.loc[wrong, "rob_min_l2"] == 0).all()
    minimal = frame.loc[~wrong, "rob_min_l2"].dropna()
    assert (minimal > 0).all()


def test_fragile_flags_land_in_the_issues_stage(analysed):
    root, _ = analysed
    flags = artifact(root, "flags_robustness")
    frame = artifact(root, "robustness_samples").set_index("id")
    assert len(flags) > 0 and (flags["issue"] == "fragile").all()
    assert frame.loc[flags["id"], "rob_clean_correct"].all()
    assert ((flags["severity"] > 0) & (flags["severity"] <= 1)).all()
    assert flags["explanation"].str.startswith("correctly classified, but").all()
    issues.run(StageContext(workspace=Workspace(root), progress=False), issues.Config())
    table = artifact(root, "issues")
    fragile = table[table["issue"] == "fragile"]
    assert set(fragile["id"]) == set(flags["id"]) and (fragile["stage"] == "robustness").all()
    assert "fragile" in artifact(root, "issue_matrix").columns


def test_rerun_is_skipped_and_slices_are_refreshed(analysed, tmp_path):
    root = shutil.copytree(analysed[0], tmp_path / "ws")
    again = run_robustness(Workspace(root), TINY, progress=False)
    assert again["skipped"] is True
    assert set(artifact(root, "robustness_slices")["kind"]) == {"all", "class"}
    slices.run(StageContext(workspace=Workspace(root), progress=False), slices.Config())
    refreshed = run_robustness(Workspace(root), TINY, progress=False)
    assert refreshed["skipped"] == "slices"
    table = artifact(root, "robustness_slices")
    assert {"all", "class", "issue"} <= set(table["kind"])   # 'flagged fragile' comes from the issue flags
    fragile = table[table["description"] == "flagged fragile"]
    assert len(fragile) == 1 and fragile["worst_rank"].isna().all()     # never ranked: it is circular
    overall = table[table["kind"] == "all"].iloc[0]
    assert overall["n_samples"] == 40 and overall["clean_accuracy_ci_low"] <= overall["clean_accuracy"]


def test_a_weak_attack_fails_its_self_check_loudly(template, tmp_path):
    root = shutil.copytree(template, tmp_path / "ws")
    weak = RobustnessConfig(max_samples=16, attack_samples=16, smoothing_samples=0, corruptions=(),
                            attacks=("pgd_linf",), selfcheck_samples=16, masking_samples=8, num_examples=2,
                            attack_params={"pgd_linf": {"steps": 1, "step_size": 1e-4}})
    summary = run_robustness(Workspace(root), weak, progress=False)
    assert not summary["self_check"]["attacks"]["pgd_linf"]["passed"] and not summary["self_check"]["passed"]
    assert any("self-check FAILED for pgd_linf" in w for w in summary["warnings"])
    text = format_summary(summary, root)
    assert "!! WARNING: attack self-check FAILED for pgd_linf" in text and "self-checks  FAILED" in text


# -- selection and validation --------------------------------------------------------------------------------------
def test_selection_is_stratified_seeded_and_prefix_stratified():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    chosen = select_samples(labels, 100, random_state=3)
    assert np.bincount(labels[chosen]).tolist() == [40, 30, 20, 10] and len(set(chosen)) == 100
    assert np.array_equal(chosen, select_samples(labels, 100, random_state=3))
    assert not np.array_equal(chosen, select_samples(labels, 100, random_state=4))
    assert np.abs(np.bincount(labels[chosen[:20]], minlength=4) - [8, 6, 4, 2]).max() <= 1
    assert len(select_samples(labels, 5000, random_state=0)) == 1000


@pytest.mark.parametrize(("change", "message"), [
    ({"corruptions": ("fog", "snow")}, "unknown corruption"),
    ({"attacks": ("pgd",)}, "unknown attack"),
    ({"severities": (0, 2)}, "severities must be integers in 1..5"),
    ({"reference_linf_eps": 3 / 255}, "must be one of the linf_eps grid"),
    ({"smoothing_sigma": -1.0}, "smoothing_sigma must be"),
])
def test_bad_settings_are_named(template, change, message):
    with pytest.raises(ValidationError, match=message):
        run_robustness(Workspace(template), RobustnessConfig(**change), progress=False)


# -- CLI ---------------------------------------------------------------------------------------------------------------
def test_cli_without_model_exits_2(tmp_path, monkeypatch, capsys):
    root = build_workspace(tmp_path / "ws", model=False)
    assert run_cli(["robustness", str(root), "--quiet"], monkeypatch) == 2
    assert "has no model" in capsys.readouterr().err
    assert not (root / "artifacts" / "robustness_summary.json").exists()


@pytest.mark.parametrize("argv", [["--attacks", "fgsm,bogus"], ["--corruptions", "snow"], ["--severities", "2-7"],
                                  ["--eps", "0.01,-1"], ["--device", "tpu"]])
def test_cli_rejects_bad_names_with_exit_2(template, monkeypatch, capsys, argv):
    assert run_cli(["robustness", str(template), "--quiet", *argv], monkeypatch) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_runs_and_prints_the_summary(template, tmp_path, monkeypatch, capsys):
    root = shutil.copytree(template, tmp_path / "ws")
    argv = ["robustness", str(root), "--quiet", "--max-samples", "20", "--attack-samples", "20",
            "--smoothing-samples", "3", "--smoothing-n", "50", "--smoothing-n0", "10", "--corruptions",
            "contrast", "--severities", "1,2", "--attacks", "fgsm", "--eps", "2/255,8/255", "--device", "cpu"]
    assert run_cli(argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "self-checks  PASSED" in out and "L∞ attacks" in out and "20 evaluated" in out
    stored = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    assert stored["config"]["linf_eps"] == pytest.approx([2 / 255, 8 / 255])
    assert stored["attacks"]["linf"]["reference_eps"] == pytest.approx(8 / 255)
    assert run_cli(argv, monkeypatch) == 0
    assert "unchanged" in capsys.readouterr().out
