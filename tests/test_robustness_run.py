"""The robustness run on a real workspace (shipped Fashion-MNIST sample + its CNN), with tiny settings:
artifacts and their columns, the invariants of the curves, self-checks, per-sample rows, fragile flags in the
issues stage, skipping / slice refresh, and the CLI's exit codes."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from robustlens import cli
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.robustness.run import (
    RobustnessConfig,
    load_attack_config,
    load_images,
    run_preview_attack,
    run_robustness,
)
from robustlens.analysis.robustness.tables import SLICE_COLUMNS, select_samples
from robustlens.analysis.stages import issues, slices
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace
from robustlens.commands import robustness as command
from robustlens.commands.robustness import format_summary
from robustlens.errors import ValidationError
from tests.workspaces import build_sample_workspace

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"

#: AutoAttack with few iterations / queries: the tests check the wiring, not AutoAttack's strength.
QUICK_AUTOATTACK = {"n_iter": 10, "n_target_classes": 3, "square_queries": 100}
TINY = RobustnessConfig(
    max_samples=40,
    attack_samples=40,
    smoothing_samples=8,
    smoothing_n0=20,
    smoothing_n=100,
    corruptions=("gaussian_noise", "contrast"),
    severities=(1, 5),
    attacks=("fgsm", "pgd_linf", "deepfool"),
    selfcheck_samples=16,
    masking_samples=16,
    num_examples=6,
    validity_budget="fast",
    verify_samples=12,
    verify_norms=("linf",),
    stability_samples=20,
    attack_params={"pgd_linf": {"steps": 20}, "autoattack_linf": QUICK_AUTOATTACK, "autoattack_l2": QUICK_AUTOATTACK},
)

COLUMNS = {
    "robustness_corruptions": [
        "corruption",
        "family",
        "severity",
        "accuracy",
        "error",
        "relative_error",
        "flip_rate",
        "n_samples",
    ],
    "robustness_curves": [
        "norm",
        "attack",
        "eps",
        "robust_accuracy",
        "success_rate",
        "n_samples",
        "robust_accuracy_ci_low",
        "robust_accuracy_ci_high",
        "kind",
    ],
    "robustness_certified": ["radius", "certified_accuracy", "n_samples", "sigma"],
    "robustness_slices": list(SLICE_COLUMNS),
    "robustness_samples": [
        "id",
        "rob_clean_correct",
        "rob_corruption_accuracy",
        "rob_flip_severity_noise",
        "rob_flip_severity_digital",
        "rob_attacked",
        "rob_min_linf_eps",
        "rob_min_l2_eps",
        "rob_broken_by_linf",
        "rob_broken_by_l2",
        "rob_flip_probability",
        "rob_top5_distance",
        "rob_verified_linf_eps",
        "rob_min_l2",
        "rob_certified_radius",
        "rob_certified_correct",
        "rob_fragile",
        "rob_fragility",
        "rob_fragile_reason",
    ],
    "flags_robustness": ["id", "issue", "severity", "explanation"],
}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs torch on one thread (conftest.one_torch_thread)."""


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A fresh sample workspace nothing has run on (copy it before writing)."""
    return build_sample_workspace(tmp_path_factory.mktemp("rob") / "ws")


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
@pytest.mark.slow
def test_artifacts_exist_with_documented_columns(analysed):
    root, summary = analysed
    for name, columns in COLUMNS.items():
        assert list(artifact(root, name).columns) == columns, name
    index = json.loads((root / "artifacts" / "index.json").read_text())
    for name in [*COLUMNS, "robustness_summary", "robustness_examples"]:
        assert index[name]["stage"] == "robustness"
    stored = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    for key in (
        "config",
        "clean_accuracy",
        "corruptions",
        "attacks",
        "certified",
        "self_check",
        "warnings",
        "timings",
        "worst_slices",
        "fragile",
        "validity",
        "headline",
        "verification",
        "attack_settings",
    ):
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
        assert (predicted == examples["adversarial_pred"]).mean() >= 5 / 6  # float16 storage may flip a borderline one


@pytest.mark.slow
def test_corruption_accuracy_drops_with_severity(analysed):
    table = artifact(analysed[0], "robustness_corruptions")
    by_severity = table.groupby("severity")["accuracy"].mean()
    assert by_severity[5] < by_severity[1]
    assert set(table["family"]) == {"noise", "digital"}
    assert np.allclose(table["error"], 1 - table["accuracy"])


@pytest.mark.slow
def test_worst_case_is_below_every_attack_and_curves_fall_with_eps(analysed):
    curves = artifact(analysed[0], "robustness_curves")
    for norm, rows in curves.groupby("norm"):
        grid = rows.pivot(index="eps", columns="attack", values="robust_accuracy").sort_index()
        attacks = [c for c in grid.columns if c != "worst_case"]
        assert attacks, norm
        others = grid[attacks].to_numpy()  # NaN where an attack did not run (AutoAttack: reference ε only)
        assert (np.isnan(others) | (grid["worst_case"].to_numpy()[:, None] <= others + 1e-12)).all()
        for column in grid.columns:
            values = grid[column].dropna().to_numpy()
            assert (np.diff(values) <= 1e-12).all(), f"{norm} {column} curve rises with eps"
    linf = curves[(curves["norm"] == "linf") & (curves["attack"] == "worst_case")].sort_values("eps")
    assert linf["robust_accuracy"].iloc[-1] < linf["robust_accuracy"].iloc[0]  # 8/255 breaks more than 1/255


@pytest.mark.slow
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


@pytest.mark.slow
def test_self_check_passes_for_every_attack_run(analysed):
    _, summary = analysed
    checks = summary["self_check"]["attacks"]
    assert set(checks) == {"fgsm", "pgd_linf", "deepfool"}
    assert all(c["passed"] and c["n_evaluated"] > 0 for c in checks.values())
    assert set(summary["self_check"]["masking"]) == {"linf", "l2"}
    assert summary["self_check"]["passed"]
    # with the tiny settings the validity diagnostics may find AutoAttack-10 weak: only their warnings may appear
    assert [w for w in summary["warnings"] if not w.startswith("validity ")] == []
    check = next(c for c in summary["validity"]["checks"] if c["name"] == "preview_attack_self_checks")
    assert check["status"] == "pass"


@pytest.mark.slow
def test_per_sample_rows_only_for_evaluated_samples(analysed):
    root, _ = analysed
    frame = artifact(root, "robustness_samples")
    samples = Workspace(root).samples
    assert len(frame) == 40 and frame["id"].is_unique and set(frame["id"]) <= set(samples["id"])
    labels = samples.set_index("id").loc[frame["id"], "label"]
    assert labels.value_counts().tolist() == [4] * 10  # stratified: 200 images per class → 4 each
    assert frame["rob_attacked"].all()
    assert frame["rob_certified_radius"].notna().sum() == 8
    assert frame["rob_certified_correct"].notna().sum() == 8
    wrong = ~frame["rob_clean_correct"]
    assert (frame.loc[wrong, "rob_min_linf_eps"] == 0).all() and (frame.loc[wrong, "rob_min_l2"] == 0).all()
    minimal = frame.loc[~wrong, "rob_min_l2"].dropna()
    assert (minimal > 0).all()


@pytest.mark.slow
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


@pytest.mark.slow
def test_rerun_is_skipped_and_slices_are_refreshed(analysed, tmp_path):
    root = shutil.copytree(analysed[0], tmp_path / "ws")
    again = run_robustness(Workspace(root), TINY, progress=False)
    assert again["skipped"] is True
    assert set(artifact(root, "robustness_slices")["kind"]) == {"all", "class"}
    slices.run(StageContext(workspace=Workspace(root), progress=False), slices.Config())
    refreshed = run_robustness(Workspace(root), TINY, progress=False)
    assert refreshed["skipped"] == "slices"
    table = artifact(root, "robustness_slices")
    assert {"all", "class", "issue"} <= set(table["kind"])  # 'flagged fragile' comes from the issue flags
    fragile = table[table["description"] == "flagged fragile"]
    assert len(fragile) == 1 and fragile["worst_rank"].isna().all()  # never ranked: it is circular
    overall = table[table["kind"] == "all"].iloc[0]
    assert overall["n_samples"] == 40 and overall["clean_accuracy_ci_low"] <= overall["clean_accuracy"]


@pytest.mark.slow
def test_a_weak_attack_fails_its_self_check_loudly(template, tmp_path):
    root = shutil.copytree(template, tmp_path / "ws")
    weak = RobustnessConfig(
        max_samples=16,
        attack_samples=16,
        smoothing_samples=0,
        corruptions=(),
        attacks=("pgd_linf",),
        selfcheck_samples=16,
        masking_samples=8,
        num_examples=2,
        attack_params={"pgd_linf": {"steps": 1, "step_size": 1e-4}},
    )
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


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"corruptions": ("fog", "snow")}, "unknown corruption"),
        ({"attacks": ("pgd",)}, "unknown attack"),
        ({"severities": (0, 2)}, "severities must be integers in 1..5"),
        ({"reference_linf_eps": 3 / 255}, "must be one of the linf_eps grid"),
        ({"smoothing_sigma": -1.0}, "smoothing_sigma must be"),
    ],
)
@pytest.mark.slow
def test_bad_settings_are_named(template, change, message):
    with pytest.raises(ValidationError, match=message):
        run_robustness(Workspace(template), RobustnessConfig(**change), progress=False)


# -- CLI ---------------------------------------------------------------------------------------------------------------
def test_cli_without_model_exits_2(tmp_path, monkeypatch, capsys):
    root = build_sample_workspace(tmp_path / "ws", model=False)
    assert run_cli(["robustness", str(root), "--quiet"], monkeypatch) == 2
    assert "has no model" in capsys.readouterr().err
    assert not (root / "artifacts" / "robustness_summary.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--attacks", "fgsm,bogus"],
        ["--corruptions", "snow"],
        ["--severities", "2-7"],
        ["--eps", "0.01,-1"],
        ["--device", "tpu"],
    ],
)
@pytest.mark.slow
def test_cli_rejects_bad_names_with_exit_2(template, monkeypatch, capsys, argv):
    assert run_cli(["robustness", str(template), "--quiet", *argv], monkeypatch) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_and_prints_the_summary(template, tmp_path, monkeypatch, capsys):
    root = shutil.copytree(template, tmp_path / "ws")
    quick = tmp_path / "quick.toml"
    quick.write_text(
        "[attacks.autoattack_linf]\nsteps = 10\ntargets = 3\nqueries = 100\n"
        '[validity]\nenabled = false\n[verification]\nsamples = 4\nnorms = ["linf"]\n'
    )
    argv = [
        "robustness",
        str(root),
        "--quiet",
        "--max-samples",
        "20",
        "--attack-samples",
        "20",
        "--smoothing-samples",
        "3",
        "--smoothing-n",
        "50",
        "--smoothing-n0",
        "10",
        "--corruptions",
        "contrast",
        "--severities",
        "1,2",
        "--attacks",
        "fgsm",
        "--eps",
        "2/255,8/255",
        "--device",
        "cpu",
        "--attack-config",
        str(quick),
    ]
    assert run_cli(argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "self-checks  PASSED" in out and "L∞ ε sweep" in out and "20 evaluated" in out
    assert "validity     WARN" in out and "validity_diagnostics: the validity diagnostics were switched off" in out
    assert "ROBUST L∞" in out and "95 % CI" in out
    stored = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    assert stored["config"]["linf_eps"] == pytest.approx([2 / 255, 8 / 255])
    assert stored["attacks"]["linf"]["reference_eps"] == pytest.approx(8 / 255)
    assert "(the run that computed these results)" not in out
    assert run_cli(argv, monkeypatch) == 0
    again = capsys.readouterr().out
    assert "unchanged" in again
    # The re-run did no work: the timings it prints are labelled as the earlier run's.
    assert "time         " in again and again.split("time         ")[1].splitlines()[0].endswith(
        "(the run that computed these results)"
    )


# -- honest reporting: attack config, intervals, validity, headline, verification --------------------------------------
EXAMPLE_TOML = """
linf_eps = [0.00784, 0.0157, "8/255"]
l2_eps = [0.25, 0.5]
headline = "autoattack"
[attacks.pgd_linf]
steps = 50
restarts = 5
loss = "dlr"
random_start = true
[attacks.square_linf]
queries = 5000
[attacks.autoattack_linf]
steps = 25
queries = 1000
[validity]
budget = "fast"
[verification]
methods = ["crown"]
samples = 12
"""


def test_attack_config_file_sets_grids_and_per_attack_settings(tmp_path):
    path = tmp_path / "attacks.toml"
    path.write_text(EXAMPLE_TOML)
    values = load_attack_config(path)
    assert values["linf_eps"] == pytest.approx((0.00784, 0.0157, 8 / 255))
    assert values["l2_eps"] == (0.25, 0.5)
    assert values["attack_params"]["pgd_linf"] == {"steps": 50, "restarts": 5, "loss": "dlr", "random_start": True}
    assert values["attack_params"]["square_linf"] == {"max_iter": 5000}  # queries → the function's max_iter
    assert values["attack_params"]["autoattack_linf"] == {"n_iter": 25, "square_queries": 1000}
    assert values["validity_budget"] == "fast" and values["verification"] == ("crown",)
    assert values["verify_samples"] == 12
    config = RobustnessConfig(**values)
    assert config.params_for("pgd_linf")["steps"] == 50 and config.params_for("pgd_l2")["steps"] == 50
    assert config.params_for("autoattack_linf")["n_target_classes"] == 9  # defaults kept
    assert config.reference_eps("linf") == pytest.approx(0.0157)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("stepz = 3", ["stepz"]),
        ("[attacks.pgd_inf]\nsteps = 3", ["pgd_inf"]),
        ("[attacks.pgd_linf]\nstepz = 3", ["stepz", "pgd_linf"]),
        ("[attacks.pgd_linf]\nsteps = 0", ["steps", "pgd_linf", ">= 1"]),
        ("[attacks.pgd_linf]\nsteps = true", ["steps"]),
        ('[attacks.pgd_linf]\nloss = "hinge"', ["loss", "hinge"]),
        ('[attacks.square_linf]\nqueries = "many"', ["queries"]),
        ("[attacks.fgsm]\nsteps = 3", ["steps", "fgsm"]),
        ("linf_eps = [0.01, -2]", ["linf_eps"]),
        ('linf_eps = "8/255"', ["linf_eps"]),
        ('[validity]\nbudget = "huge"', ["budget"]),
        ('[verification]\nmethods = ["milp"]', ["methods"]),
        ("linf_eps = [0.01", ["not valid TOML"]),
    ],
)
def test_attack_config_errors_name_the_file_and_key(tmp_path, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValidationError) as info:
        load_attack_config(path)
    message = str(info.value)
    assert str(path) in message
    for name in names:
        assert name in message, message


@pytest.mark.slow
def test_cli_attack_config_errors_exit_2(template, tmp_path, monkeypatch, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[attacks.pgd_linf]\nrestart = 5\n")
    assert run_cli(["robustness", str(template), "--quiet", "--attack-config", str(path)], monkeypatch) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "restart" in err
    assert (
        run_cli(["robustness", str(template), "--quiet", "--attack-config", str(tmp_path / "nope.toml")], monkeypatch)
        == 2
    )
    assert "nope.toml" in capsys.readouterr().err


def test_cli_attack_config_reaches_the_config(tmp_path):
    path = tmp_path / "attacks.toml"
    path.write_text(EXAMPLE_TOML)
    parser = argparse.ArgumentParser()
    command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["robustness", "ws", "--attack-config", str(path), "--l2-eps", "0.1,1"])
    config = command.config_from_args(args)
    assert config.attack_params["pgd_linf"]["loss"] == "dlr"
    assert config.linf_eps == pytest.approx((0.00784, 0.0157, 8 / 255))
    assert config.l2_eps == (0.1, 1.0)  # the command line wins over the file


def hand_wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval written out (Wilson 1927; no library)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@pytest.mark.slow
def test_every_robust_accuracy_has_its_wilson_interval(analysed):
    root, summary = analysed
    curves = artifact(root, "robustness_curves")
    assert curves["robust_accuracy_ci_low"].notna().all()
    for _, row in curves.iterrows():
        k = round(row["robust_accuracy"] * row["n_samples"])
        low, high = hand_wilson(k, int(row["n_samples"]))
        assert row["robust_accuracy_ci_low"] == pytest.approx(low, abs=1e-12)
        assert row["robust_accuracy_ci_high"] == pytest.approx(high, abs=1e-12)
        assert low <= row["robust_accuracy"] <= high
    for entry in summary["attacks"].values():
        n = entry["n_samples"]
        for name, result in entry["attacks"].items():
            for value, (low, high) in zip(result["robust_accuracy"], result["robust_accuracy_ci"], strict=True):
                assert (low, high) == pytest.approx(hand_wilson(round(value * n), n)), name
        for value, (low, high) in zip(
            entry["worst_case_robust_accuracy"], entry["worst_case_robust_accuracy_ci"], strict=True
        ):
            assert (low, high) == pytest.approx(hand_wilson(round(value * n), n))
    for norm, head in summary["headline"].items():
        expected = hand_wilson(round(head["robust_accuracy"] * head["n"]), head["n"])
        assert (head["ci_low"], head["ci_high"]) == pytest.approx(expected)
        e = int(np.argmin(np.abs(np.array(summary["attacks"][norm]["eps"]) - head["eps"])))
        assert head["robust_accuracy"] == pytest.approx(summary["attacks"][norm]["worst_case_robust_accuracy"][e])
    table = artifact(root, "robustness_slices")
    ranked = table[table["n_attacked"] > 0]
    assert (ranked["robust_accuracy_linf_ci_low"] <= ranked["robust_accuracy_linf"]).all()


@pytest.mark.slow
def test_small_slices_say_too_few_samples_instead_of_being_ranked(analysed):
    root, summary = analysed
    table = artifact(root, "robustness_slices")
    classes = table[table["kind"] == "class"]
    assert (classes["n_attacked"] == 4).all()  # 40 attacked over 10 classes < min_slice_samples 10
    assert classes["worst_rank"].isna().all()
    assert classes["rank_note"].str.startswith("too few samples (4 < 10 attacked)").all()
    assert set(summary["slices_too_few"]) == set(classes["description"])
    assert "not ranked" in format_summary(summary, root)


@pytest.mark.slow
def test_validity_section_is_in_the_json_and_above_the_headline(analysed):
    root, summary = analysed
    stored = json.loads((root / "artifacts" / "robustness_summary.json").read_text())
    validity = stored["validity"]
    assert validity["status"] in ("pass", "warn", "fail")
    assert validity["checks"] and all({"name", "status", "message"} <= set(c) for c in validity["checks"])
    order = {"pass": 0, "warn": 1, "fail": 2}
    assert validity["status"] == max((c["status"] for c in validity["checks"]), key=order.__getitem__)
    text = format_summary(stored, root)
    lines = text.splitlines()
    first_validity = next(i for i, line in enumerate(lines) if line.startswith("  validity"))
    first_headline = next(i for i, line in enumerate(lines) if line.startswith("  ROBUST"))
    assert first_validity < first_headline
    for norm in ("linf", "l2"):
        head = stored["headline"][norm]
        assert head["upper_bound"] == (validity["status"] != "pass")
        assert head["n"] == 40 and head["ci_low"] <= head["robust_accuracy"] <= head["ci_high"]


@pytest.mark.slow
def test_autoattack_is_the_headline_and_previews_are_labelled(analysed):
    pytest.importorskip("robustlens.analysis.robustness.autoattack")
    root, summary = analysed
    head = summary["headline"]["linf"]
    assert head["preview"] is False and head["label"].startswith("AutoAttack")
    assert head["autoattack"]["robust_accuracy"] >= head["robust_accuracy"]  # the worst case includes it
    attacks = summary["attacks"]["linf"]["attacks"]
    assert attacks["autoattack_linf"]["kind"] == "headline" and attacks["pgd_linf"]["kind"] == "preview"
    assert attacks["autoattack_linf"]["params"]["n_iter"] == 10
    for result in attacks.values():
        assert result["forward_passes_per_sample"] > 0 and result["seconds"] >= 0
    assert attacks["pgd_linf"]["backward_passes_per_sample"] > 0
    text = format_summary(summary, root)
    assert "pgd_linf (preview)" in text and "AutoAttack alone" in text and "forward /" in text


@pytest.mark.slow
def test_verified_samples_are_never_broken(analysed):
    pytest.importorskip("robustlens.analysis.robustness.verify")
    root, summary = analysed
    frame = artifact(root, "robustness_samples")
    verification = summary["verification"]["linf"]
    assert verification["supported"], verification
    assert set(verification["methods"]) == {"ibp", "crown"}
    verified = frame["rob_verified_linf_eps"].to_numpy()
    broken_at = frame["rob_min_linf_eps"].to_numpy()  # NaN: never broken on the grid
    assert np.isfinite(verified).sum() == 12
    # verified at ε  ⇒  not broken at ε: the breaking budget (if any) lies above the largest verified ε
    claimed = verified > 0
    assert (np.isnan(broken_at[claimed]) | (broken_at[claimed] > verified[claimed])).all()
    for method, values in verification["methods"].items():
        assert (
            np.array(values["verified_accuracy"]) <= np.array(verification["empirical_robust_accuracy"]) + 1e-12
        ).all(), method
    assert (
        np.array(verification["methods"]["crown"]["verified_accuracy"])
        >= np.array(verification["methods"]["ibp"]["verified_accuracy"])
    ).all()
    check = [c for c in summary["validity"]["checks"] if c["name"] == "verified_not_broken"]
    assert check and all(c["status"] == "pass" for c in check)
    table = artifact(root, "robustness_verified")
    assert (
        set(table["method"]) == {"ibp", "crown"}
        and (table["verified_accuracy"] <= table["empirical_robust_accuracy"] + 1e-12).all()
    )


# -- trap model: saturated softmax ------------------------------------------------------------------------------------
class SaturatedSoftmax(torch.nn.Module):
    """The sample CNN with logits × 1000 then log-softmax: cross-entropy gradients vanish (gradient masking)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.inner(x) * 1000.0, dim=1)


@pytest.fixture(scope="module")
def trap_workspace(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trap")
    scripted = torch.jit.script(SaturatedSoftmax(torch.jit.load(str(SAMPLE_DATA / "model.pt"))))
    scripted.save(str(folder / "trap.pt"))
    config = json.loads((SAMPLE_DATA / "model.json").read_text())
    config["file"] = "trap.pt"
    (folder / "trap.json").write_text(json.dumps(config))
    options = InitOptions(
        data=SAMPLE_DATA,
        labels=SAMPLE_DATA / "labels.csv",
        model=str(folder / "trap.pt"),
        model_config=folder / "trap.json",
        progress=False,
    )
    init_workspace(folder / "ws", options)
    return folder / "ws"


@pytest.mark.slow
def test_pgd_margin_loss_sees_through_a_saturated_softmax(trap_workspace):
    workspace = Workspace(trap_workspace)
    model = workspace.load_model()
    positions = select_samples(workspace.samples["label_index"].to_numpy().astype(np.int64), 24, 0)
    images = load_images(workspace, positions, model.config)
    labels = workspace.samples["label_index"].to_numpy()[positions]
    params = {"steps": 20, "random_start": False}
    ce = run_preview_attack(model, images, labels, "pgd_linf", 8 / 255, params, random_state=0, batch_size=None)
    margin = run_preview_attack(
        model, images, labels, "pgd_linf", 8 / 255, {**params, "loss": "margin"}, random_state=0, batch_size=None
    )
    assert margin.params["loss"] == "margin"
    assert margin.linf.max() <= 8 / 255 * (1 + 1e-5) and margin.adv_images.min() >= 0 and margin.adv_images.max() <= 1
    assert margin.robust_accuracy <= ce.robust_accuracy - 0.3, (ce.robust_accuracy, margin.robust_accuracy)


@pytest.mark.slow
def test_trap_model_headline_is_labelled_an_upper_bound(trap_workspace, tmp_path):
    pytest.importorskip("robustlens.analysis.robustness.validity")
    root = shutil.copytree(trap_workspace, tmp_path / "ws")
    config = RobustnessConfig(
        max_samples=24,
        attack_samples=24,
        smoothing_samples=0,
        corruptions=(),
        attacks=("fgsm", "pgd_linf"),
        linf_eps=(2 / 255, 8 / 255),
        selfcheck_samples=8,
        masking_samples=8,
        num_examples=2,
        validity_budget="fast",
        verification=(),
        attack_params={"autoattack_linf": QUICK_AUTOATTACK},
    )
    summary = run_robustness(Workspace(root), config, progress=False, threads=1)
    assert summary["validity"]["status"] in ("warn", "fail")
    bad = [c for c in summary["validity"]["checks"] if c["status"] != "pass"]
    assert bad
    head = summary["headline"]["linf"]
    assert head["upper_bound"] is True
    assert head["robust_accuracy"] <= head["before_diagnostics"]["robust_accuracy"]
    assert head["lowered_by"] == pytest.approx(head["before_diagnostics"]["robust_accuracy"] - head["robust_accuracy"])
    text = format_summary(summary, root)
    assert "UPPER BOUND" in text and "validity     " + summary["validity"]["status"].upper() in text
    assert any("UPPER BOUND" in w for w in summary["warnings"])


@pytest.mark.slow
def test_stability_per_sample_per_class_and_per_slice(analysed):
    pytest.importorskip("robustlens.analysis.robustness.stability")
    root, summary = analysed
    frame = artifact(root, "robustness_samples")
    stability = summary["stability"]
    assert stability["n_samples"] == 20 and 0 <= stability["mean_flip_probability"] <= 1
    flips = frame["rob_flip_probability"]
    assert flips.notna().sum() == 20 and flips.iloc[:20].between(0, 1).all()
    by_class = {row["class"]: row for row in stability["by_class"]}
    assert sum(row["samples"] for row in by_class.values()) == 20
    table = artifact(root, "robustness_slices")
    everything = table[table["kind"] == "all"].iloc[0]
    assert everything["n_stability"] == 20 and everything["flip_probability"] == pytest.approx(flips.mean())
    assert summary["corruptions"]["mce"]["baseline"].startswith("none")
    assert summary["corruptions"]["mce"]["mce"] == pytest.approx(
        artifact(root, "robustness_corruptions")["error"].mean()
    )
