"""Exports: tables, relabel files and ImageFolder copies — atomic, and re-importable with ``robustlens init``."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from robustlens import cli
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.workspace import Workspace
from robustlens.commands import export as export_command
from robustlens.errors import ValidationError, WorkspaceError
from robustlens.query import export
from robustlens.query.filters import FilterSpec, filter_ids, to_query_params
from robustlens.query.sample_table import load_sample_table
from tests.conftest import SAMPLE_DATA


@pytest.fixture
def workspace(analysed_workspace) -> Workspace:
    return Workspace(analysed_workspace)


@pytest.fixture
def table(workspace) -> pd.DataFrame:
    return load_sample_table(workspace)


def run_cli(argv: list[str], monkeypatch) -> int:
    """``robustlens.cli.main`` with ``export`` registered exactly as ``build_parser`` will register it."""
    build = cli.build_parser

    def build_with_export():
        parser = build()
        subparsers = next(a for a in parser._subparsers._group_actions if hasattr(a, "choices"))
        if "export" not in subparsers.choices:
            export_command.add_parser(subparsers)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_with_export)
    return cli.main(argv)


def test_manifest_export_reimports_with_the_same_ids_and_labels(workspace, table, tmp_path):
    spec = FilterSpec(labels=["coat", "shirt"], issues=["dark", "label_issue"])
    positions = export.select_positions(table, None, spec=spec)
    frame = export.export_frame(table, positions)
    assert list(frame.columns) == ["id", "path", "label", "split", "source_index"]
    written = export.write_frame(frame, tmp_path / "subset.csv")
    reimported, _ = init_workspace(
        tmp_path / "reimported", InitOptions(data=SAMPLE_DATA, labels=written, progress=False)
    )
    samples = reimported.samples
    assert samples["id"].tolist() == frame["id"].tolist() == filter_ids(table, spec)
    assert samples["label"].tolist() == frame["label"].tolist()
    assert samples["split"].tolist() == frame["split"].tolist()
    assert samples["meta.source_index"].tolist() == frame["source_index"].tolist()


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_every_table_format_holds_the_same_rows(table, tmp_path, fmt):
    positions = export.select_positions(table, None, spec=FilterSpec(labels=["bag"], sort_by="metric.brightness"))
    frame = export.export_frame(table, positions, columns="all")
    path = export.write_frame(frame, tmp_path / f"bags.{fmt}")
    readers = {
        "csv": pd.read_csv,
        "parquet": pd.read_parquet,
        "json": lambda p: pd.DataFrame(json.loads(p.read_text())),
    }
    back = readers[fmt](path)
    assert back["id"].tolist() == frame["id"].tolist()
    assert back["metric.brightness"].is_monotonic_increasing
    assert set(back["label"]) == {"bag"} and "pred.cnn.confidence" in back.columns
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_existing_files_are_kept_and_force_replaces_only_robustlens_exports(table, tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("precious")
    frame = export.export_frame(table, [0, 1])
    with pytest.raises(ValidationError, match="exists"):
        export.write_frame(frame, target)
    with pytest.raises(ValidationError, match="robustlens did not write it"):
        export.write_frame(frame, target, overwrite=True)  # no marker: even --force refuses
    assert target.read_text() == "precious"
    ours = export.write_frame(frame, tmp_path / "ours.csv")
    marker = json.loads((tmp_path / ".robustlens-export").read_text())
    assert set(marker["files"]) == {"ours.csv"} and marker["format"] == "robustlens-export"
    export.write_frame(export.export_frame(table, [0, 1, 2]), ours, overwrite=True)
    assert len(pd.read_csv(ours)) == 3
    ours.write_text("edited by hand")  # changed since robustlens wrote it: no longer replaceable
    with pytest.raises(ValidationError, match="changed since robustlens wrote it"):
        export.write_frame(frame, ours, overwrite=True)
    assert ours.read_text() == "edited by hand"


def test_decisions_become_a_relabel_file_and_can_be_applied(workspace, table):
    store = workspace.curation()
    ids = table["id"].tolist()
    store.record_decision(ids[0], "keep", user="ann")
    store.record_decision(ids[0], "relabel", user="bob", new_label="bag", note="clearly a bag")
    store.record_decision(ids[1], "exclude", user="ann")
    store.record_decision(ids[2], "ambiguous", user="ann")
    relabels = export.relabel_frame(table, store)
    assert relabels.to_dict("records")[0] | {"decided_at": None} == {
        "id": ids[0],
        "path": table["path"][0],
        "old_label": str(table["label"][0]),
        "new_label": "bag",
        "action": "relabel",
        "reviewer": "bob",
        "decided_at": None,
        "note": "clearly a bag",
    }
    assert len(relabels) == 1 and relabels["decided_at"][0].endswith("Z")
    everything = export.relabel_frame(table, store, include_all=True)
    assert everything["action"].tolist() == ["relabel", "exclude", "ambiguous"]
    assert everything["new_label"].tolist() == ["bag", "", str(table["label"][2])]
    applied = export.export_frame(table, [0, 1, 2, 3], curation=store, apply_decisions=True)
    assert applied["id"].tolist() == [ids[0], ids[2], ids[3]]
    assert applied["label"].tolist()[0] == "bag"
    store.close()


def test_all_columns_export_lists_tags(workspace, table):
    store = workspace.curation()
    store.add_tag(table["id"][:2], "zeta", user="ann")
    store.add_tag(table["id"][1:3], "alpha", user="ann")
    frame = export.export_frame(table, [0, 1, 2, 3], columns="all", curation=store)
    assert frame["tags"].tolist() == ["zeta", "alpha;zeta", "alpha", ""]
    store.close()


def test_imagefolder_copy_is_atomic_and_reimports(workspace, table, tmp_path):
    positions = export.select_positions(table, None, spec=FilterSpec(labels=["sandal", "bag"], splits=["test"]))
    frame = export.export_frame(table, positions)
    result = export.export_imagefolder(workspace, frame, tmp_path / "folder")
    destination = result.path
    assert result.copied == len(frame) and result.refused == []
    assert sorted(p.name for p in destination.iterdir()) == [".robustlens-export", "bag", "manifest.csv", "sandal"]
    assert len(list(destination.glob("*/*.png"))) == len(frame)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    reimported, _ = init_workspace(
        tmp_path / "ws2", InitOptions(data=destination, labels=destination / "manifest.csv", progress=False)
    )
    assert reimported.samples["id"].tolist() == frame["id"].tolist()
    assert reimported.samples["label"].tolist() == frame["label"].tolist()
    plain, _ = init_workspace(tmp_path / "ws3", InitOptions(data=destination, progress=False))  # plain ImageFolder
    assert sorted(plain.samples["label"]) == sorted(frame["label"])


def test_a_failed_imagefolder_export_leaves_nothing(workspace, table, tmp_path):
    frame = export.export_frame(table, [0, 1, 2])
    frame.loc[2, "path"] = "images/missing.png"
    out = tmp_path / "exports"
    with pytest.raises(WorkspaceError, match="missing"):
        export.export_imagefolder(workspace, frame, out / "folder")
    assert list(out.iterdir()) == []


# -- the command line -----------------------------------------------------------------------------------------
def test_cli_exports_a_dashboard_query(analysed_workspace, table, tmp_path, monkeypatch, capsys):
    spec = FilterSpec(labels=["coat"], issues=["label_issue"], sort_by="label_issue.label_quality")
    url = "http://localhost:8501/explorer?" + "&".join(
        f"{k}={v}" for k, vs in to_query_params(spec).items() for v in ([vs] if isinstance(vs, str) else vs)
    )
    out = tmp_path / "coats.parquet"
    assert run_cli(["export", str(analysed_workspace), "--query", url, "--out", str(out)], monkeypatch) == 0
    assert pd.read_parquet(out)["id"].tolist() == filter_ids(table, spec)
    assert "wrote" in capsys.readouterr().out


def test_cli_exports_collections_tags_relabels_and_imagefolders(analysed_workspace, table, tmp_path, monkeypatch):
    store = Workspace(analysed_workspace).curation()
    ids = table["id"].tolist()
    store.create_collection("keepers", user="ann", sample_ids=ids[:4])
    store.add_tag(ids[2:6], "odd", user="ann")
    store.record_decision(ids[3], "relabel", user="ann", new_label="bag")
    store.close()
    base = ["export", str(analysed_workspace)]
    assert (
        run_cli([*base, "--collection", "keepers", "--tag", "odd", "--out", str(tmp_path / "both.json")], monkeypatch)
        == 0
    )
    assert [r["id"] for r in json.loads((tmp_path / "both.json").read_text())] == ids[2:4]
    assert run_cli([*base, "--relabels", "--out", str(tmp_path / "relabels.csv")], monkeypatch) == 0
    assert pd.read_csv(tmp_path / "relabels.csv")[["id", "new_label"]].values.tolist() == [[ids[3], "bag"]]
    assert (
        run_cli(
            [
                *base,
                "--collection",
                "keepers",
                "--apply-decisions",
                "--format",
                "imagefolder",
                "--out",
                str(tmp_path / "folder"),
            ],
            monkeypatch,
        )
        == 0
    )
    assert pd.read_csv(tmp_path / "folder" / "manifest.csv")["label"].tolist()[3] == "bag"
    filter_file = tmp_path / "filter.json"
    filter_file.write_text(FilterSpec(labels=["bag"]).to_json())
    assert run_cli([*base, "--filter", f"@{filter_file}", "--out", str(tmp_path / "bags.csv")], monkeypatch) == 0
    assert set(pd.read_csv(tmp_path / "bags.csv")["label"]) == {"bag"}


def test_cli_usage_errors_exit_2_and_failures_exit_1(analysed_workspace, tmp_path, monkeypatch, capsys):
    base = ["export", str(analysed_workspace)]
    assert run_cli([*base, "--out", str(tmp_path / "x.txt")], monkeypatch) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert run_cli([*base, "--query", "r.metric.brightness=oops", "--out", str(tmp_path / "x.csv")], monkeypatch) == 2
    assert run_cli([*base, "--collection", "nope", "--out", str(tmp_path / "x.csv")], monkeypatch) == 2
    assert "no collection named 'nope'" in capsys.readouterr().err
    assert run_cli(["export", str(tmp_path / "not-a-workspace"), "--out", str(tmp_path / "x.csv")], monkeypatch) == 2
    (tmp_path / "exists.csv").write_text("keep me")
    assert run_cli([*base, "--out", str(tmp_path / "exists.csv")], monkeypatch) == 2
    assert (tmp_path / "exists.csv").read_text() == "keep me"
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*base], monkeypatch)  # --out missing: argparse usage error
    assert exit_info.value.code == 2
    samples = pd.read_parquet(Path(analysed_workspace) / "samples.parquet")
    samples.loc[0, "path"] = "images/gone.png"
    samples.to_parquet(Path(analysed_workspace) / "samples.parquet", index=False)
    assert run_cli([*base, "--format", "imagefolder", "--out", str(tmp_path / "folder")], monkeypatch) == 1
    assert not (tmp_path / "folder").exists()
