"""Writes that cannot destroy, reads that stay inside the dataset root, CSV cells that cannot run.

Each hostile case from issue 9 is reproduced as it was reported: the dataset tree is compared byte for byte
before and after, a file outside the root planted behind a symlink is proven never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens import cli
from robustlens.analysis import loader, safety, thumbnails
from robustlens.analysis.images import FileRefused, read_verified_bytes
from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.workspace import Workspace
from robustlens.errors import ValidationError
from robustlens.query import export
from robustlens.query.sample_table import load_sample_table
from tests.conftest import tree_digest, write_image

SECRET_PNG_SEED = 99


@pytest.fixture
def dataset(tmp_path) -> Path:
    """``DATA/``: 2 classes × 4 PNGs and a README, as in the issue's reproduction."""
    data = tmp_path / "DATA"
    for c, label in enumerate(("coat", "bag")):
        for i in range(4):
            write_image(data / label / f"{i}.png", seed=10 * c + i, size=(12, 10))
    (data / "README.md").write_text("forty images and a README")
    return data


@pytest.fixture
def workspace(tmp_path, dataset) -> Workspace:
    return init_workspace(tmp_path / "ws", InitOptions(data=dataset, progress=False))[0]


@pytest.fixture
def table_frame(workspace) -> pd.DataFrame:
    table = load_sample_table(workspace)
    return export.export_frame(table, np.arange(len(table)))


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside the dataset root (a valid image, so only the guard can stop it being used)."""
    return write_image(tmp_path / "outside" / "secret.png", seed=SECRET_PNG_SEED, size=(12, 10))


def swap_for_symlink(workspace: Workspace, relative: str, target: Path) -> None:
    """Replace a dataset image by a symlink to ``target`` after init, as the hostile user did."""
    path = workspace.image_path(relative)
    path.unlink()
    path.symlink_to(target)


def opened_paths(monkeypatch) -> list[str]:
    """The real path of every file whose bytes robustlens read (images._read_bytes returned), recorded."""
    from robustlens.analysis import images

    seen: list[str] = []
    real = images._read_bytes

    def recording(path, **kwargs):
        data = real(path, **kwargs)
        seen.append(os.path.realpath(path))  # only reads that returned bytes: a refused open is not a read
        return data

    monkeypatch.setattr(images, "_read_bytes", recording)
    return seen


# -- 1. writes that cannot destroy: the CLI ---------------------------------------------------------------------
def test_export_over_the_dataset_is_refused_and_data_is_unchanged(workspace, dataset, tmp_path, capsys):
    before = tree_digest(dataset)
    code = cli.main(
        [
            "export",
            str(workspace.root),
            "--format",
            "imagefolder",
            "--out",
            str(dataset),
            "--force",
            "--query",
            "label=coat",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(dataset) in err and "dataset root" in err
    for out in (dataset / "coat", dataset / "new-folder", tmp_path):  # inside, below, and containing DATA
        assert cli.main(["export", str(workspace.root), "--format", "imagefolder", "--out", str(out), "--force"]) == 2
    assert cli.main(["export", str(workspace.root), "--out", str(dataset / "manifest.csv")]) == 2
    assert tree_digest(dataset) == before
    assert sorted(p.name for p in dataset.iterdir()) == ["README.md", "bag", "coat"]


def test_export_into_an_input_files_folder_is_refused(tmp_path, dataset, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    labels = inputs / "labels.csv"
    rows = [f"{label}/{i}.png,{label}" for label in ("coat", "bag") for i in range(4)]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    ws = tmp_path / "ws"
    assert cli.main(["init", str(ws), "--data", str(dataset), "--labels", str(labels), "--quiet"]) == 0
    before = tree_digest(inputs)
    assert cli.main(["export", str(ws), "--format", "imagefolder", "--out", str(inputs), "--force"]) == 2
    assert "labels.csv" in capsys.readouterr().err
    assert cli.main(["export", str(ws), "--out", str(labels), "--force"]) == 2  # the input file itself
    assert tree_digest(inputs) == before
    assert cli.main(["export", str(ws), "--out", str(inputs / "subset.csv")]) == 0  # a new file beside it is fine


def test_init_refuses_outputs_in_the_dataset(tmp_path, dataset, capsys):
    before = tree_digest(dataset)
    assert (
        cli.main(
            [
                "init",
                str(tmp_path / "ws"),
                "--data",
                str(dataset),
                "--db",
                f"sqlite:///{dataset}/curation.db",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "--db" in err and str(dataset / "curation.db") in err and "dataset root" in err
    assert not (tmp_path / "ws").exists()  # refused before anything was written
    assert cli.main(["init", str(dataset / "ws"), "--data", str(dataset), "--quiet"]) == 2
    assert "workspace" in capsys.readouterr().err
    assert tree_digest(dataset) == before
    predictions = tmp_path / "preds"
    predictions.mkdir()
    table = pd.DataFrame(
        {
            "path": [f"{c}/{i}.png" for c in ("coat", "bag") for i in range(4)],
            "coat": [0.9] * 4 + [0.1] * 4,
            "bag": [0.1] * 4 + [0.9] * 4,
        }
    )
    table.to_csv(predictions / "p.csv", index=False)
    assert (
        cli.main(
            ["init", str(predictions), "--data", str(dataset), "--predictions", str(predictions / "p.csv"), "--quiet"]
        )
        == 2
    )  # the workspace would be the input's folder
    assert "p.csv" in capsys.readouterr().err
    ok = cli.main(
        [
            "init",
            str(tmp_path / "ws"),
            "--data",
            str(dataset),
            "--predictions",
            str(predictions / "p.csv"),
            "--db",
            f"sqlite:///{tmp_path}/curation.db",
            "--quiet",
        ]
    )
    assert ok == 0 and (tmp_path / "curation.db").exists()


def test_force_replaces_only_what_robustlens_wrote(workspace, tmp_path, capsys):
    base = ["export", str(workspace.root), "--format", "imagefolder"]
    foreign = tmp_path / "photos"
    write_image(foreign / "holiday.png", seed=3)
    before = tree_digest(foreign)
    assert cli.main([*base, "--out", str(foreign), "--force"]) == 2  # no marker: refused even with --force
    assert "did not create it" in capsys.readouterr().err and tree_digest(foreign) == before

    out = tmp_path / "coats"
    assert cli.main([*base, "--out", str(out), "--query", "label=coat"]) == 0
    marker = json.loads((out / ".robustlens-export").read_text())
    assert marker["folder_kind"] == "imagefolder" and "manifest.csv" in marker["files"]
    assert cli.main([*base, "--out", str(out), "--query", "label=bag"]) == 2  # exists, no --force
    assert cli.main([*base, "--out", str(out), "--query", "label=bag", "--force"]) == 0  # ours: replaced
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["bag"]
    (out / "bag" / "mine.txt").write_text("added by a person")  # now it holds something robustlens did not write
    assert cli.main([*base, "--out", str(out), "--force"]) == 2
    assert "mine.txt" in capsys.readouterr().err and (out / "bag" / "mine.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or moved-aside folder left


def test_a_foreign_marker_named_file_is_never_overwritten(table_frame, tmp_path):
    (tmp_path / ".robustlens-export").write_text("someone else's notes")
    written = export.write_frame(table_frame, tmp_path / "a.csv")
    assert (tmp_path / ".robustlens-export").read_text() == "someone else's notes"
    with pytest.raises(ValidationError, match="did not write"):  # unproven, so not replaceable
        export.write_frame(table_frame, written, overwrite=True)


# -- 1. writes that cannot destroy: the server (Export page) ---------------------------------------------------------
def test_server_export_never_touches_an_existing_folder(workspace, tmp_path):
    table = load_sample_table(workspace)
    frame = export.export_frame(table, np.arange(len(table)))
    root = export.default_export_root(workspace)
    for hostile in ("../../DATA", "/etc", "a/b", "..", ".hidden", "", "x" * 101, "name\nnext"):
        with pytest.raises(ValidationError, match="not a safe name"):
            export.save_imagefolder_on_server(workspace, frame, root, hostile)
    taken = root / "imagefolder-filtered"
    write_image(taken / "keep.png", seed=5)
    before = tree_digest(taken)
    result = export.save_imagefolder_on_server(workspace, frame, root, "imagefolder-filtered")
    assert result.path == root / "imagefolder-filtered-2" and result.copied == len(frame)
    assert tree_digest(taken) == before
    again = export.save_imagefolder_on_server(workspace, frame, root, "imagefolder-filtered")
    assert again.path.name == "imagefolder-filtered-3"
    first = export.save_table_on_server(frame, root, "relabels", "csv")
    second = export.save_table_on_server(frame.head(2), root, "relabels.csv", "csv")
    assert (first.name, second.name) == ("relabels.csv", "relabels-2.csv")
    assert len(pd.read_csv(first)) == len(frame) and len(pd.read_csv(second)) == 2
    assert sorted(json.loads((root / ".robustlens-export").read_text())["files"]) == ["relabels-2.csv", "relabels.csv"]
    assert not [p for p in root.iterdir() if p.name.endswith(".tmp")]


def test_the_export_page_has_no_replace_and_writes_under_the_export_root(workspace, tmp_path, monkeypatch):
    from robustlens.dashboard import data
    from robustlens.dashboard.views import export as page

    source = Path(page.__file__).read_text()
    assert "overwrite" not in source and "_replace" not in source and "write_frame" not in source
    monkeypatch.setenv(data.WORKSPACE_ENV, str(workspace.root))
    monkeypatch.delenv(data.EXPORT_ROOT_ENV, raising=False)
    assert data.export_root() == workspace.root / "exports"
    monkeypatch.setenv(data.EXPORT_ROOT_ENV, str(tmp_path / "shared-exports"))
    assert data.export_root() == tmp_path / "shared-exports"


def test_serve_export_root_is_checked(workspace, dataset, tmp_path):
    with pytest.raises(ValidationError, match="--export-root"):
        safety.check_export_root(dataset / "exports", workspace)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValidationError, match="not a folder"):
        safety.check_export_root(tmp_path / "a-file", workspace)
    made = safety.check_export_root(tmp_path / "team-exports", workspace)
    assert made.is_dir() and made == Path(os.path.realpath(tmp_path / "team-exports"))


def test_export_page_saves_new_names_only(workspace, tmp_path, monkeypatch):
    """The page itself (AppTest): a save twice gives two files, a hostile name is refused with a message."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(workspace.root))
    monkeypatch.setenv("ROBUSTLENS_EXPORT_ROOT", str(tmp_path / "exports"))
    app_file = Path(__file__).resolve().parents[1] / "robustlens" / "dashboard" / "views" / "export.py"
    app = AppTest.from_file(str(app_file), default_timeout=120).run()
    assert not app.exception
    app.button(key="export.save").click().run()
    app.button(key="export.save").click().run()
    assert sorted(p.name for p in (tmp_path / "exports").glob("*.csv")) == [
        "robustlens-filtered-2.csv",
        "robustlens-filtered.csv",
    ]
    app.text_input(key="export.dest").set_value("../../DATA").run()
    app.button(key="export.imagefolder").click().run()
    assert any("not a safe name" in e.value for e in app.error)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir() if p.is_dir()) == []


# -- 2. reads that stay inside ----------------------------------------------------------------------------------
def test_loader_refuses_a_symlink_swapped_in_after_init(workspace, secret, monkeypatch):
    swap_for_symlink(workspace, "coat/1.png", secret)
    opened = opened_paths(monkeypatch)
    paths = workspace.samples["path"].tolist()
    with pytest.raises(loader.DatasetFileError, match="coat/1.png.*outside the dataset root"):
        list(loader.iter_decoded(workspace.dataset_root, paths, batch_size=3))
    refused = safety.RefusedFiles()
    seen = [
        int(i)
        for batch, _ in loader.iter_decoded(workspace.dataset_root, paths, batch_size=3, refused=refused)
        for i in batch
    ]
    bad = paths.index("coat/1.png")
    assert seen == [i for i in range(len(paths)) if i != bad]
    assert [(e.path, e.kind) for e in refused.entries] == [("coat/1.png", "outside_root")]
    assert "coat/1.png" in refused.summary()
    assert str(secret) not in opened and os.path.realpath(secret) not in opened


def test_analyze_reports_the_swapped_files_and_never_reads_them(workspace, secret, monkeypatch, capsys):
    swap_for_symlink(workspace, "bag/2.png", secret)
    swap_for_symlink(workspace, "coat/3.png", secret)
    opened = opened_paths(monkeypatch)
    # Skipped and reported; the run goes on for the other samples (tests/test_analysis_refused.py).
    assert cli.main(["analyze", str(workspace.root), "--stages", "metrics", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "2 dataset file(s) refused" in err and "bag/2.png" in err and "coat/3.png" in err
    assert "outside the dataset root" in err and "Traceback" not in err
    assert os.path.realpath(secret) not in opened


def test_changed_content_is_reported_not_used(workspace):
    paths = workspace.samples["path"].tolist()
    hashes = workspace.samples["content_hash"].tolist()
    write_image(workspace.image_path("coat/3.png"), seed=1234, size=(12, 10))  # edited after init
    with pytest.raises(loader.DatasetFileError, match="changed since init"):
        list(loader.iter_decoded(workspace.dataset_root, paths, expected_hashes=hashes))
    refused = safety.RefusedFiles()
    kept = [
        int(i)
        for batch, _ in loader.iter_decoded(workspace.dataset_root, paths, expected_hashes=hashes, refused=refused)
        for i in batch
    ]
    assert len(kept) == len(paths) - 1
    assert [(e.path, e.kind) for e in refused.entries] == [("coat/3.png", "changed_since_init")]
    table = load_sample_table(workspace)
    result = export.export_imagefolder(
        workspace, export.export_frame(table, np.arange(len(table))), workspace.root.parent / "copy"
    )
    assert [(r["path"], r["kind"]) for r in result.refused] == [("coat/3.png", "changed_since_init")]
    assert not (result.path / "coat" / "3.png").exists() and result.copied == len(paths) - 1
    row = workspace.samples.set_index("path").loc["coat/3.png"]
    refused = safety.RefusedFiles()
    made = thumbnails.ensure_thumbnails(workspace, [("coat/3.png", row["content_hash"])], refused=refused)
    assert made == [None] and [e.kind for e in refused.entries] == ["changed_since_init"]
    assert not thumbnails.thumbnail_path(workspace, row["content_hash"]).exists()


def test_thumbnail_and_imagefolder_export_refuse_the_swapped_file(workspace, secret, tmp_path, monkeypatch, capsys):
    swap_for_symlink(workspace, "coat/0.png", secret)
    opened = opened_paths(monkeypatch)
    row = workspace.samples.set_index("path").loc["coat/0.png"]
    assert thumbnails.ensure_thumbnail(workspace, "coat/0.png", row["content_hash"]) is None
    assert not thumbnails.thumbnail_path(workspace, row["content_hash"]).exists()
    good = workspace.samples.set_index("path").loc["coat/2.png"]
    assert thumbnails.ensure_thumbnail(workspace, "coat/2.png", good["content_hash"]).exists()
    out = tmp_path / "coats"
    assert (
        cli.main(["export", str(workspace.root), "--format", "imagefolder", "--out", str(out), "--query", "label=coat"])
        == 0
    )
    captured = capsys.readouterr()
    assert "coat/0.png" in captured.err and "outside the dataset root" in captured.err
    assert "wrote 3 sample(s)" in captured.out
    assert sorted(p.name for p in (out / "coat").iterdir()) == ["1.png", "2.png", "3.png"]
    secret_bytes = secret.read_bytes()
    assert all(p.read_bytes() != secret_bytes for p in out.rglob("*.png"))
    assert pd.read_csv(out / "manifest.csv")["path"].tolist() == ["coat/1.png", "coat/2.png", "coat/3.png"]
    assert os.path.realpath(secret) not in opened


def test_guard_resolves_folders_swapped_for_symlinks(tmp_path, secret):
    root = tmp_path / "root"
    write_image(root / "a" / "x.png", seed=1)
    (root / "inner").symlink_to(root / "a")  # a symlink that stays inside is fine
    guard = safety.DatasetGuard(root)
    assert guard.resolve("inner/x.png") == os.path.realpath(root / "a" / "x.png")
    (root / "alias.png").symlink_to(root / "a" / "x.png")  # a file symlink inside: read through its target
    read = lambda relative: guard.read(relative, lambda real: read_verified_bytes(real, no_follow=True))  # noqa: E731
    assert read("alias.png") == read("inner/x.png") == (root / "a" / "x.png").read_bytes()
    (root / "leak.png").symlink_to(secret)
    with pytest.raises(FileRefused, match="outside the dataset root"):
        read("leak.png")
    (root / "b").symlink_to(secret.parent)  # a folder that leads outside is not
    with pytest.raises(FileRefused, match="outside the dataset root"):
        safety.DatasetGuard(root).resolve("b/secret.png")
    with pytest.raises(FileRefused):
        safety.DatasetGuard(root).resolve("../outside/secret.png")


# -- 4. CSV formula cells -----------------------------------------------------------------------------------------
HOSTILE = ['=HYPERLINK("http://evil/x","click")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)", "\tx=1", "\rhi"]


def test_csv_formula_cells_are_neutralised_and_numbers_kept():
    frame = pd.DataFrame(
        {
            "note": [*HOSTILE, "plain", "-3", "+1.5e3", None],
            "score": [-1.5, 2.0, -3.0, 0.0, 1.0, 2.0, -7.25, 8.0, 9.0, -10.0],
            "count": np.arange(-5, 5),
        }
    )
    text = export.frame_bytes(frame, "csv").decode()
    back = pd.read_csv(pd.io.common.StringIO(text), keep_default_na=False)
    assert back["note"].tolist()[:6] == [f"'{v}" for v in HOSTILE]
    assert back["note"].tolist()[6:9] == ["plain", "-3", "+1.5e3"]  # numbers written as text stay numbers
    assert back["score"].tolist() == frame["score"].tolist() and back["count"].tolist() == list(range(-5, 5))
    raw = pd.read_csv(
        pd.io.common.StringIO(export.frame_bytes(frame, "csv", raw_csv=True).decode()), keep_default_na=False
    )
    assert raw["note"].tolist()[:6] == HOSTILE
    assert json.loads(export.frame_bytes(frame, "json"))[0]["note"] == HOSTILE[0]  # JSON is data: never changed


def test_relabel_notes_and_labels_are_neutralised_in_cli_csv_unless_raw(workspace, tmp_path):
    store = workspace.curation()
    ids = workspace.samples["id"].tolist()
    store.record_decision(ids[0], "relabel", user="mallory", new_label="bag", note=HOSTILE[0])
    store.record_decision(ids[1], "relabel", user="ann", new_label="bag", note="-1")
    store.close()
    base = ["export", str(workspace.root), "--relabels"]
    assert cli.main([*base, "--out", str(tmp_path / "relabels.csv")]) == 0
    notes = pd.read_csv(tmp_path / "relabels.csv", keep_default_na=False).set_index("id")["note"]
    assert notes[ids[0]] == "'" + HOSTILE[0] and str(notes[ids[1]]) == "-1"
    assert cli.main([*base, "--out", str(tmp_path / "raw.csv"), "--raw-csv"]) == 0
    assert pd.read_csv(tmp_path / "raw.csv").set_index("id")["note"][ids[0]] == HOSTILE[0]


# -- the helpers themselves ---------------------------------------------------------------------------------------
def test_output_location_rules(tmp_path):
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    labels = tmp_path / "meta" / "labels.csv"
    labels.parent.mkdir()
    labels.write_text("path,label\n")
    check = lambda p: safety.check_output_location(p, option="--out", dataset_root=data, inputs=[labels])  # noqa: E731
    for refused in (data, data / "a", data / "new.csv", tmp_path, labels, labels.parent):
        with pytest.raises(ValidationError, match="--out"):
            check(refused)
    (tmp_path / "link").symlink_to(data)
    with pytest.raises(ValidationError, match="dataset root"):
        check(tmp_path / "link" / "x.csv")  # through a symlink: still the dataset
    check(tmp_path / "exports" / "x.csv")
    check(labels.parent / "beside-the-labels.csv")
    assert safety.sqlite_path("sqlite:////abs/curation.db") == Path("/abs/curation.db")
    assert safety.sqlite_path("sqlite:///:memory:") is None and safety.sqlite_path("postgresql://h/db") is None


def test_safe_names():
    for good in ("relabels", "imagefolder-coat_2", "v1.2"):
        assert safety.validate_name(good) == good
    for bad in ("../x", "a/b", "a\\b", ".x", "-x", "a..b", "", "é" * 3, "x" * 101):
        with pytest.raises(ValidationError):
            safety.validate_name(bad)
