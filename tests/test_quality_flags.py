"""Quality flags: planted ground truth on real images, adaptivity to the dataset, severity, the long format."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import metrics as metrics_stage
from robustlens.analysis.stages import quality_flags
from robustlens.analysis.stages.base import StageContext, read_artifact
from robustlens.errors import WorkspaceError
from tests.metrics_planted import ISSUES as PLANTED_ISSUES
from tests.metrics_planted import SAMPLE_DATA, build_planted_dataset, load_gray, sample_images


def analysed(data, root, **init):
    workspace, _ = init_workspace(root, InitOptions(data=data, progress=False, **init))
    context = StageContext(workspace, progress=False)
    metrics_stage.run(context, metrics_stage.Config())
    summary = quality_flags.run(context, quality_flags.Config())
    return workspace, summary, read_artifact(workspace, "flags_quality")


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    base = tmp_path_factory.mktemp("planted")
    truth, clean = build_planted_dataset(base / "data", n_clean=600, n_per_issue=30, random_state=0)
    workspace, summary, flags = analysed(base / "data", base / "ws")
    return truth, clean, workspace, summary, flags


def precision_recall(flags: pd.DataFrame, issue: str, expected: set[str]) -> tuple[float, float, str]:
    got = set(flags.loc[flags["issue"] == issue, "id"])
    hits = len(got & expected)
    precision = hits / len(got) if got else 0.0
    recall = hits / len(expected)
    line = f"{issue}: precision {hits}/{len(got)} = {precision:.3f}, recall {hits}/{len(expected)} = {recall:.3f}"
    return precision, recall, line


@pytest.mark.parametrize("issue", PLANTED_ISSUES)
def test_planted_issues_are_found_with_high_precision_and_recall(planted, issue):
    truth, _, _, _, flags = planted
    precision, recall, line = precision_recall(flags, issue, truth[issue])
    print(line)
    assert precision >= 0.9 and recall >= 0.9, line


def test_unmodified_real_images_are_rarely_flagged_dark_or_low_information(planted):
    _, clean, _, _, flags = planted
    hits = flags[flags["id"].isin(clean) & flags["issue"].isin(["dark", "low_information"])]
    share = hits["id"].nunique() / len(clean)
    print(f"unmodified images flagged dark/low_information: {hits['id'].nunique()}/{len(clean)} = {share:.3%}")
    assert share < 0.03, hits


def test_flags_table_format(planted):
    _, _, workspace, summary, flags = planted
    assert list(flags.columns) == ["id", "issue", "severity", "explanation"]
    assert set(flags["issue"]) <= set(quality_flags.ISSUES)
    assert flags["severity"].between(0, 1).all() and flags["explanation"].str.len().gt(20).all()
    assert not flags.duplicated(["id", "issue"]).any()
    order = {sample_id: i for i, sample_id in enumerate(workspace.samples["id"])}
    assert flags["id"].map(order).is_monotonic_increasing  # samples order
    assert summary["flagged"] == flags["issue"].value_counts().reindex(summary["flagged"], fill_value=0).to_dict()
    assert summary["flagged"]["grayscale"] == 0  # a grayscale dataset has no "grayscale" outliers
    assert summary["thresholds"]["dark"]["highlight_level_max"] <= 0.25


def test_severity_grows_with_how_dark(planted):
    truth, _, workspace, _, flags = planted
    table = read_artifact(workspace, "metrics").set_index("id")
    dark = flags[flags["issue"] == "dark"].set_index("id")
    order = table.loc[dark.index, "highlight_level"].sort_values(kind="stable")
    severities = dark.loc[order.index, "severity"].to_numpy()
    assert np.all(np.diff(severities) <= 1e-12)  # darker highlights → higher severity


def test_fashion_mnist_is_not_flagged_wholesale(tmp_path):
    """2,000 garments on black: fixed natural-photo thresholds call most of them dark and low-information."""
    workspace, summary, flags = analysed(SAMPLE_DATA, tmp_path / "ws", labels=SAMPLE_DATA / "labels.csv")
    table = read_artifact(workspace, "metrics")
    # What fixed natural-photo limits would say: most of the dataset is dim and has under 5 bits of entropy.
    assert (table["brightness"] < 0.35).mean() > 0.5 and (table["entropy"] < 5).mean() > 0.5
    share = flags.loc[flags["issue"].isin(["dark", "low_information"]), "id"].nunique() / len(table)
    print(f"sample data: {summary['flagged']}")
    assert share < 0.01
    assert flags["id"].nunique() / len(table) < 0.02


def test_grayscale_is_flagged_only_in_a_colour_dataset(tmp_path):
    rng = np.random.default_rng(1)
    paths = sample_images()["path"].iloc[:70]
    data = tmp_path / "data"
    expected = set()
    for index, path in enumerate(paths):
        gray = load_gray(path)
        target = data / "items" / f"{index:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        if index < 3:  # one-channel file
            Image.fromarray((gray * 255).astype(np.uint8), "L").save(target)
            expected.add(f"items/{target.name}")
        elif index < 5:  # RGB file with equal channels
            Image.fromarray(np.repeat((gray * 255).astype(np.uint8)[..., None], 3, axis=2), "RGB").save(target)
            expected.add(f"items/{target.name}")
        else:  # tinted: a colour image
            tint = rng.uniform(0.3, 1.0, size=3)
            Image.fromarray((gray[..., None] * tint * 255).astype(np.uint8), "RGB").save(target)
    _, summary, flags = analysed(data, tmp_path / "ws")
    assert set(flags.loc[flags["issue"] == "grayscale", "id"]) == expected
    assert summary["thresholds"]["grayscale"]["colour_share"] == pytest.approx(65 / 70)


# -- rules on synthetic metric tables ----------------------------------------------------------------------
def metric_table(n: int, rng: np.random.Generator, **overrides) -> pd.DataFrame:
    """A plausible natural-photo metrics table of ``n`` rows; ``overrides`` replace whole columns."""
    table = pd.DataFrame(
        {
            "id": [f"img{i:04d}" for i in range(n)],
            "brightness": rng.uniform(0.3, 0.6, n),
            "contrast": rng.uniform(0.15, 0.3, n),
            "high_frequency_ratio": 10 ** rng.normal(-1.5, 0.2, n),
            "blur_score": rng.uniform(0.2, 0.35, n),
            "entropy": rng.uniform(6.5, 7.8, n),
            "shadow_level": rng.uniform(0.0, 0.1, n),
            "highlight_level": rng.uniform(0.85, 1.0, n),
            "aspect_ratio": rng.choice([4 / 3, 3 / 2, 1.0], n),
            "area": rng.integers(300, 500, n) * rng.integers(300, 500, n),
            "channels": np.full(n, 3),
            "grayscale_content": rng.uniform(0.3, 0.9, n),
        }
    )
    for name, values in overrides.items():
        table[name] = values
    return table


def test_thresholds_follow_the_dataset():
    rng = np.random.default_rng(0)
    night = metric_table(
        300,
        rng,
        brightness=rng.uniform(0.04, 0.12, 300),
        highlight_level=rng.uniform(0.15, 0.3, 300),
        shadow_level=np.zeros(300),
    )
    flags, details = quality_flags.flag_quality(night)
    assert (flags["issue"] == "dark").sum() <= 3  # a dim dataset is not dark wholesale
    darker = night.copy()
    darker.loc[0, ["brightness", "highlight_level"]] = [0.005, 0.01]
    flags, _ = quality_flags.flag_quality(darker)
    assert "img0000" in set(flags.loc[flags["issue"] == "dark", "id"])
    # The same absolute image in a normal dataset is flagged; the effective limit moved with the data.
    normal = metric_table(300, rng)
    normal.loc[0, ["brightness", "highlight_level"]] = [0.1, 0.2]
    flags, normal_details = quality_flags.flag_quality(normal)
    assert "img0000" in set(flags.loc[flags["issue"] == "dark", "id"])
    night_limit = details["thresholds"]["dark"]["highlight_level_max"]
    assert night_limit < normal_details["thresholds"]["dark"]["highlight_level_max"]


def test_severity_is_monotone_and_bounded():
    rng = np.random.default_rng(2)
    table = metric_table(200, rng)
    levels = [0.2, 0.15, 0.1, 0.05, 0.0]
    for row, level in enumerate(levels):
        table.loc[row, ["highlight_level", "brightness"]] = [level, level / 3]
    flags, _ = quality_flags.flag_quality(table)
    dark = flags[flags["issue"] == "dark"].set_index("id")
    severities = dark.loc[[f"img{row:04d}" for row in range(len(levels))], "severity"].to_numpy()
    assert np.all(np.diff(severities) > 0) and severities.min() > 0 and severities.max() <= 1


def test_blank_images_are_low_information_whatever_the_dataset():
    rng = np.random.default_rng(3)
    table = metric_table(100, rng)
    table.loc[0, ["contrast", "entropy", "brightness", "highlight_level", "shadow_level"]] = [0.0, 0.0, 0.0, 0.0, 0.0]
    table.loc[1, ["contrast", "entropy"]] = [0.004, 2.5]  # mid-gray with faint noise
    flags, _ = quality_flags.flag_quality(table)
    by_image = flags.groupby("id")["issue"].apply(set)
    assert {"low_information", "dark"} <= by_image["img0000"]
    assert "low_information" in by_image["img0001"]
    assert "blurry" not in by_image["img0000"]
    severity = flags.set_index(["id", "issue"])["severity"]
    assert severity["img0000", "low_information"] == pytest.approx(1.0)
    assert severity["img0001", "low_information"] < 1.0


def test_rules_with_missing_metrics_are_skipped():
    table = metric_table(50, np.random.default_rng(4)).drop(columns=["blur_score", "grayscale_content"])
    flags, details = quality_flags.flag_quality(table)
    assert details["skipped"] == {"blurry": ["blur_score"], "grayscale": ["grayscale_content"]}
    assert not set(flags["issue"]) & {"blurry", "grayscale"}


def test_stage_needs_metrics_first(tmp_path):
    data = tmp_path / "data" / "a"
    data.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(data / "x.png")
    workspace, _ = init_workspace(tmp_path / "ws", InitOptions(data=tmp_path / "data", progress=False))
    with pytest.raises(WorkspaceError, match="run the 'metrics' stage first"):
        quality_flags.run(StageContext(workspace, progress=False), quality_flags.Config())
