"""Every bad input a careless or hostile user can give the CLI gets a clear error: exit 2, a message naming the
file / row / field / option, no traceback, and nothing written (issue 9, items 7–9)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustlens.analysis.names import validate_name
from robustlens.analysis.workspace import Workspace
from robustlens.cli import main
from robustlens.errors import ValidationError
from tests.conftest import tree_digest, write_image


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit status, stdout, stderr); argparse's SystemExit becomes the status."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones too) with a content digest: 'nothing written'."""
    entries = {p.relative_to(folder).as_posix() + "/": "dir" for p in folder.rglob("*") if p.is_dir()}
    entries.update(tree_digest(folder))
    return entries


def expect_refused(capsys, tmp_path, *argv, contains=()) -> str:
    """Run ``robustlens *argv``; assert exit 2, every ``contains`` in the message, nothing written."""
    before = snapshot(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    assert err.strip(), "no message"
    for text in contains:
        assert text in err, f"{text!r} not in {err!r}"
    assert snapshot(tmp_path) == before, "something was written although validation failed"
    return err


def init_args(workspace, data, *extra):
    return ["init", workspace, "--quiet", "--data", data, *extra]


@pytest.fixture
def predictions(image_folder, tmp_path) -> Path:
    """A valid prediction table for the ``image_folder`` fixture (12 images, classes cat, dog, fox)."""
    paths = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=len(paths))
    path = tmp_path / "p.csv"
    pd.DataFrame({"path": paths, "cat": probs[:, 0], "dog": probs[:, 1], "fox": probs[:, 2]}).to_csv(path, index=False)
    return path


# -- names ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../../../pwned",
        "a/b",
        "..",
        ".hidden",
        "x\\y",
        "![u](http://evil/x)",
        "<script>alert(1)</script>",
        "[Session expired](http://evil/login)",
        "a\nb",
        " lead",
        "trail ",
        "two  spaces",
        "",
        "x" * 101,
        "`code`",
        "*bold*",
    ],
)
def test_validate_name_refuses_paths_markup_and_control_characters(name):
    with pytest.raises(ValidationError, match="tag"):
        validate_name("tag", name)


@pytest.mark.parametrize("name", ["cnn", "resnet-50_v2.1", "needs review", "Étiquette", "模型", "_x"])
def test_validate_name_accepts_ordinary_names(name):
    assert validate_name("tag", name) == name


@pytest.mark.parametrize("name", ["../../../pwned", "![u](http://evil/x)", "<b>x</b>", "a/b"])
def test_prediction_set_names_are_validated(image_folder, predictions, tmp_path, capsys, name):
    """Before: '../../../pwned=p.csv' wrote pwned.npy outside the workspace; markup broke analyze later."""
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--predictions", f"{name}={predictions}"),
        contains=("--predictions", "prediction-set name", "not allowed"),
    )
    assert not (tmp_path.parent / "pwned.npy").exists() and not list(tmp_path.rglob("pwned.npy"))


def test_prediction_set_named_after_an_unsafe_file_name(image_folder, predictions, tmp_path, capsys):
    odd = tmp_path / "preds (copy).csv"
    odd.write_bytes(predictions.read_bytes())
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--predictions", odd),
        contains=("'preds (copy)'", "NAME=PATH"),
    )
    code, _, _ = run_cli(capsys, *init_args(tmp_path / "ws", image_folder, "--predictions", f"copy={odd}"))
    assert code == 0 and Workspace(tmp_path / "ws").prediction_names == ["copy"]


# -- --db ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["not a url", "nosuchdialect://x/y", "sqlite:////nonexistent-dir/sub/curation.db"])
def test_bad_db_url_is_refused_before_anything_is_written(image_folder, tmp_path, capsys, url):
    """Before: a traceback after workspace.json was written with the bad URL; a re-run said 'already a workspace'."""
    expect_refused(capsys, tmp_path, *init_args(tmp_path / "ws", image_folder, "--db", url), contains=("--db", url))
    # Nothing was left behind, so the corrected command just works.
    good = f"sqlite:///{tmp_path / 'elsewhere' / 'c.db'}"
    (tmp_path / "elsewhere").mkdir()
    code, _, err = run_cli(capsys, *init_args(tmp_path / "ws", image_folder, "--db", good))
    assert code == 0, err
    assert Workspace(tmp_path / "ws").manifest["db_url"] == good


def test_force_rebuild_does_not_keep_a_broken_db_url(image_folder, tmp_path, capsys):
    """Before: --force kept the bad URL written by the failed run, so the workspace could not be repaired."""
    workspace = tmp_path / "ws"
    assert run_cli(capsys, *init_args(workspace, image_folder))[0] == 0
    manifest = json.loads((workspace / "workspace.json").read_text())
    manifest["db_url"] = "sqlite:////nonexistent-dir/x.db"  # as an older robustlens could leave it
    (workspace / "workspace.json").write_text(json.dumps(manifest))
    expect_refused(
        capsys,
        tmp_path,
        *init_args(workspace, image_folder, "--force"),
        contains=("db_url kept from", "pass --db URL to replace it"),
    )
    good = f"sqlite:///{tmp_path / 'c.db'}"
    assert run_cli(capsys, *init_args(workspace, image_folder, "--force", "--db", good))[0] == 0
    assert Workspace(workspace).manifest["db_url"] == good


# -- the model ----------------------------------------------------------------------------------------------------


class _Raises(nn.Module):
    def forward(self, x):
        if bool(x.sum() > -1e30):
            raise RuntimeError("weights were never loaded")
        return x.flatten(1)[:, :3]


class _Flat(nn.Module):
    """Accepts exactly (B, 1, 8, 8): a linear layer over the flattened pixels."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(64, 3)

    def forward(self, x):
        return self.linear(x.flatten(1))


def _config(tmp_path, **changes) -> Path:
    payload = {"input_size": [8, 8], "channels": 1, "mean": [0.5], "std": [0.25], **changes}
    path = tmp_path / "model.json"
    path.write_text(json.dumps(payload))  # json writes NaN as the bare token NaN, which json.loads accepts
    return path


def _script(tmp_path, module, name="m.pt") -> Path:
    path = tmp_path / name
    torch.jit.script(module).save(str(path))
    return path


def test_torchscript_model_that_raises(image_folder, tmp_path, capsys):
    model, config = _script(tmp_path, _Raises()), _config(tmp_path)
    err = expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--model", model, "--model-config", config),
        contains=("the model failed", "weights were never loaded"),
    )
    assert "The following operation failed in the TorchScript interpreter" not in err


def test_wrong_input_size_says_what_the_model_expects(image_folder, tmp_path, capsys):
    """Before: 'The following operation failed in the TorchScript interpreter.'"""
    model, config = (
        _script(tmp_path, _Flat()),
        _config(tmp_path, input_size=[32, 32], channels=3, mean=[0.5] * 3, std=[0.25] * 3),
    )
    err = expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--model", model, "--model-config", config),
        contains=("input_size [32, 32], channels 3", "accepts input of shape (batch, 1, 8, 8)", '"input_size": [8, 8]'),
    )
    assert "TorchScript interpreter" not in err


def test_config_with_nan_mean_or_infinite_std(image_folder, tmp_path, capsys):
    model = _script(tmp_path, _Flat())
    for field, value in (("mean", [float("nan")]), ("std", [float("inf")])):
        config = _config(tmp_path, **{field: value})
        expect_refused(
            capsys,
            tmp_path,
            *init_args(tmp_path / "ws", image_folder, "--model", model, "--model-config", config),
            contains=(str(config), f"column '{field}'", "finite"),
        )


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """A folder of factory modules, the working directory (where factories are imported from)."""
    folder = tmp_path / "code"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    for name in [m for m in sys.modules if m.startswith("rl_factory_")]:
        del sys.modules[name]


def _factory(folder: Path, name: str, body: str) -> str:
    (folder / f"{name}.py").write_text(body)
    return f"{name}:build"


FLAT_MODEL = (
    "import torch\nfrom torch import nn\n"
    "class Flat(nn.Module):\n"
    "    def __init__(self):\n        super().__init__()\n        self.linear = nn.Linear(64, 3)\n"
    "    def forward(self, x):\n        return {output}\n"
)


def _flat_body(output: str) -> str:
    """A factory module whose ``build()`` returns :data:`FLAT_MODEL` with ``forward`` returning ``output``."""
    return FLAT_MODEL.format(output=output) + "def build():\n    return Flat()\n"


def _factory_init(tmp_path, image_folder, spec: str) -> list:
    """``robustlens init`` arguments: the model built by factory ``spec``, with the 8×8 grey model config."""
    return init_args(tmp_path / "ws", image_folder, "--model", spec, "--model-config", _config(tmp_path))


@pytest.mark.parametrize(
    ("module", "body", "contains"),
    [
        (
            "rl_factory_raises",
            "def build():\n    raise KeyError('checkpoint.pth')\n",
            ("rl_factory_raises:build", "raised KeyError", "checkpoint.pth"),
        ),
        ("rl_factory_syntax", "def build(:\n    pass\n", ("rl_factory_syntax.py", "syntax error at line 1")),
        (
            "rl_factory_nan",
            _flat_body("self.linear(x.flatten(1)) * float('nan')"),
            ("outputs NaN or infinite logits", "sample images", "cat/0.png"),
        ),
        (
            "rl_factory_two",
            _flat_body("self.linear(x.flatten(1))[:, :2]"),
            ("class-count mismatch", "(2, 2)", "(batch, 3)"),
        ),
    ],
    ids=["factory_that_raises", "module_with_a_syntax_error", "model_returning_nan", "wrong_number_of_classes"],
)
def test_bad_model_factory_is_refused(image_folder, tmp_path, capsys, factory_dir, module, body, contains):
    spec = _factory(factory_dir, module, body)
    expect_refused(capsys, tmp_path, *_factory_init(tmp_path, image_folder, spec), contains=contains)


def test_a_good_factory_still_passes_the_sample_batch_check(image_folder, tmp_path, capsys, factory_dir):
    spec = _factory(factory_dir, "rl_factory_good", _flat_body("self.linear(x.flatten(1))"))
    code, _, err = run_cli(capsys, *_factory_init(tmp_path, image_folder, spec))
    assert code == 0, err


# -- embeddings ---------------------------------------------------------------------------------------------------


def test_embeddings_csv_with_a_text_column(image_folder, tmp_path, capsys):
    ids = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("*.png"))
    table = pd.DataFrame({"id": ids, "e0": np.arange(12.0), "comment": ["ok"] * 12})
    table.to_csv(tmp_path / "e.csv", index=False)
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--embeddings", tmp_path / "e.csv"),
        contains=(f"{tmp_path / 'e.csv'}, row 1, column 'comment'", "non-numeric value 'ok'"),
    )


def test_embeddings_with_zero_dimensions(image_folder, tmp_path, capsys):
    np.save(tmp_path / "e.npy", np.zeros((12, 0)))
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--embeddings", tmp_path / "e.npy"),
        contains=(str(tmp_path / "e.npy"), "at least one dimension", "(12, 0)"),
    )


# -- the workspace path -------------------------------------------------------------------------------------------


def test_workspace_path_that_is_a_file_or_under_a_file(image_folder, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious")
    expect_refused(capsys, tmp_path, *init_args(notes, image_folder), contains=(str(notes), "is a file"))
    expect_refused(
        capsys,
        tmp_path,
        *init_args(notes / "ws", image_folder),
        contains=(str(notes / "ws"), f"under {notes}, which is a file"),
    )
    assert notes.read_text() == "precious"


# -- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "two", "1.5"])
def test_workers_rejected_before_any_decoding(image_folder, tmp_path, capsys, monkeypatch, value):
    """Before: --workers -1 failed with a traceback after 42 s of decoding."""
    import robustlens.analysis.ingest.dataset as dataset

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded an image before validating --workers")

    monkeypatch.setattr(dataset, "read_image", no_decoding)
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--workers", value),
        contains=("--workers", "positive integer"),
    )


def test_analyze_workers_and_max_pixels_are_validated(sample_workspace, tmp_path, capsys):
    expect_refused(capsys, tmp_path, "analyze", sample_workspace, "--workers", "0", contains=("--workers",))
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", sample_workspace, "--max-pixels", "-5"),
        contains=("--max-pixels",),
    )


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.1", "1", "x"])
def test_sum_tolerance_must_be_finite_and_in_range(image_folder, predictions, tmp_path, capsys, value):
    """Before: --sum-tolerance nan|inf was accepted and NaN probabilities were stored."""
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder, "--predictions", predictions, "--sum-tolerance", value),
        contains=("--sum-tolerance",),
    )


def test_library_entry_point_validates_options_too(image_folder, tmp_path):
    from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace

    for options in (
        InitOptions(data=image_folder, sum_tolerance=float("nan")),
        InitOptions(data=image_folder, workers=-1),
        InitOptions(data=image_folder, predictions=[("../x", tmp_path / "p.csv")]),
    ):
        with pytest.raises(ValidationError):
            init_workspace(tmp_path / "ws", options)
        assert not (tmp_path / "ws").exists()


# -- manifests ----------------------------------------------------------------------------------------------------


def test_na_none_null_are_label_strings(manifest_dataset, tmp_path, capsys):
    """Before: labels 'NA' / 'None' were rejected as empty."""
    root, _ = manifest_dataset
    labels = ["NA", "None", "null", "NA", "None", "null"]
    manifest = tmp_path / "na.csv"
    pd.DataFrame(
        {"path": [f"imgs/im{i}.png" for i in range(6)], "label": labels, "note": ["NA", "", "x", "y", "z", "w"]}
    ).to_csv(manifest, index=False)
    code, _, err = run_cli(capsys, *init_args(tmp_path / "ws", root, "--labels", manifest))
    assert code == 0, err
    workspace = Workspace(tmp_path / "ws")
    assert workspace.classes == ["NA", "None", "null"]
    assert workspace.samples["label"].tolist() == labels
    # Metadata keeps pandas' usual missing-value reading.
    assert workspace.samples["meta.note"].isna().tolist() == [True, True, False, False, False, False]


def test_empty_label_is_still_an_error(manifest_dataset, tmp_path, capsys):
    root, _ = manifest_dataset
    manifest = tmp_path / "blank.csv"
    manifest.write_text("path,label\nimgs/im0.png,a\nimgs/im1.png,\n")
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", root, "--labels", manifest),
        contains=(f"{manifest}, row 2, column 'label'", "empty value"),
    )


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_manifest_with_another_delimiter_is_read(manifest_dataset, tmp_path, capsys, delimiter):
    """Before: a semicolon-delimited manifest failed with "required column 'path' is missing" and no hint."""
    root, manifest = manifest_dataset
    table = pd.read_csv(manifest)
    other = tmp_path / "other.csv"
    table.to_csv(other, sep=delimiter, index=False)
    code, _, err = run_cli(capsys, *init_args(tmp_path / "ws", root, "--labels", other))
    assert code == 0, err
    samples = Workspace(tmp_path / "ws").samples
    assert samples["path"].tolist() == table["path"].tolist()
    assert samples["meta.camera"].tolist() == table["camera"].tolist()


def test_comma_csv_with_semicolons_in_values_is_not_misread(manifest_dataset, tmp_path, capsys):
    root, _ = manifest_dataset
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,note\n" + "".join(f"imgs/im{i}.png,a,x;y;z\n" for i in range(6)))
    code, _, err = run_cli(capsys, *init_args(tmp_path / "ws", root, "--labels", manifest))
    assert code == 0, err
    assert Workspace(tmp_path / "ws").samples["meta.note"].tolist() == ["x;y;z"] * 6


def test_class_folder_symlinked_to_the_root_is_ingested_once(image_folder, tmp_path, capsys):
    """Before: a class folder linked to the root ingested every image twice (once as class 'loop'), silently."""
    os.symlink(image_folder, image_folder / "loop")
    os.symlink(image_folder / "cat", image_folder / "kitten")
    code, out, err = run_cli(capsys, *init_args(tmp_path / "ws", image_folder))
    assert code == 0, err
    assert "'loop' is a symlink to the dataset root itself (a symlink loop)" in err
    assert "'kitten' is a symlink to the same files as class folder 'cat'" in err
    samples = Workspace(tmp_path / "ws").samples
    assert len(samples) == 12 and sorted(set(samples["label"])) == ["cat", "dog", "fox"]


# -- analyze ------------------------------------------------------------------------------------------------------


def test_analyze_with_a_class_of_one_image_and_no_predictions(tmp_path, capsys):
    """Before: 'cross-validation needs at least 2 samples per class' and the stages after it never ran."""
    data = tmp_path / "data"
    for c, (name, count) in enumerate((("cat", 6), ("dog", 6), ("lonely", 1))):
        for i in range(count):
            write_image(data / name / f"{i}.png", seed=10 * c + i)
    assert run_cli(capsys, *init_args(tmp_path / "ws", data))[0] == 0
    code, out, err = run_cli(capsys, "analyze", tmp_path / "ws", "--quiet")
    assert code == 0, err
    assert "stage 'label_issues' skipped" in err and "'lonely' (1 image)" in err
    workspace = Workspace(tmp_path / "ws")
    for later in ("issue_matrix.parquet", "flags_quality.parquet", "slices.parquet"):  # the stages after it ran
        assert workspace.artifact_path(later).exists(), later
    assert not workspace.artifact_path("label_issues.parquet").exists()


# -- decoding memory ----------------------------------------------------------------------------------------------


def test_concurrent_decodes_stay_within_the_pixel_budget(tmp_path, monkeypatch):
    """Before: 4 workers decoded four 9400² PNGs at once (9.5 GB); now the pixels in flight are bounded."""
    import robustlens.analysis.ingest.dataset as dataset

    data = tmp_path / "data"
    for i in range(8):
        write_image(data / "big" / f"{i}.png", size=(200, 150), seed=i)  # 30,000 pixels each
        write_image(data / "small" / f"{i}.png", size=(20, 10), seed=i)  # 200 pixels each
    in_flight, peak, lock = [0], [0], threading.Lock()
    real_read = dataset.read_image

    def tracked(path, **kwargs):
        pixels = dataset.header_pixels(Path(path))
        with lock:
            in_flight[0] += pixels
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.02)  # long enough for the other workers to pile up if nothing holds them back
        try:
            return real_read(path, **kwargs)
        finally:
            with lock:
                in_flight[0] -= pixels

    monkeypatch.setattr(dataset, "read_image", tracked)
    monkeypatch.setattr(dataset, "DECODE_PIXEL_BUDGET", 45_000)
    monkeypatch.setattr(dataset, "VERIFY_CHUNK", 1)  # one image per task: all four workers busy at once
    scan = dataset.scan_dataset(data, workers=4, progress=False)
    assert len(scan.samples) == 16
    assert peak[0] <= 45_000  # never two big images at once (2 × 30,000 > 45,000)
    assert peak[0] >= 30_000


def test_header_pixels_reads_png_and_other_formats_without_decoding(tmp_path):
    from robustlens.analysis.ingest.dataset import header_pixels

    assert header_pixels(write_image(tmp_path / "a.png", size=(40, 30))) == 1200
    assert header_pixels(write_image(tmp_path / "a.jpg", size=(40, 30))) == 1200
    (tmp_path / "junk.png").write_bytes(b"not an image")
    assert header_pixels(tmp_path / "junk.png") == 0


# -- sample ids the curation database cannot hold (issue 9: ids > 1,024 bytes passed init, failed on PostgreSQL) ----


def test_sample_id_longer_than_the_curation_limit_is_refused_naming_the_row(manifest_dataset, tmp_path, capsys):
    from robustlens.analysis.curation import MAX_SAMPLE_ID_BYTES

    root, _ = manifest_dataset
    wide = "图" * (MAX_SAMPLE_ID_BYTES // 3 + 1)  # 342 characters, 1,026 bytes of UTF-8
    ids = ["a", "b", wide, "d", "e", "f"]
    manifest = tmp_path / "ids.csv"
    pd.DataFrame({"id": ids, "path": [f"imgs/im{i}.png" for i in range(6)], "label": list("ababab")}).to_csv(
        manifest, index=False
    )
    err = expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", root, "--labels", manifest),
        contains=(f"{manifest}, row 3, column 'id'", "1,026 bytes", f"{MAX_SAMPLE_ID_BYTES:,} bytes"),
    )
    assert not (tmp_path / "ws").exists(), err
    # At the limit (bytes, not characters): accepted, stored exactly.
    ids[2], ids[3] = "图" * (MAX_SAMPLE_ID_BYTES // 3), "i" * MAX_SAMPLE_ID_BYTES
    pd.DataFrame({"id": ids, "path": [f"imgs/im{i}.png" for i in range(6)], "label": list("ababab")}).to_csv(
        manifest, index=False
    )
    code, _, err = run_cli(capsys, *init_args(tmp_path / "ws", root, "--labels", manifest))
    assert code == 0, err
    assert Workspace(tmp_path / "ws").samples["id"].tolist() == ids


def _deep_image(root: Path, depth: int = 5) -> str:
    """An image under ``depth`` folders of 250 characters: a relative path of over 1,024 bytes."""
    relative = "/".join(["d" * 250] * depth) + "/deep.png"
    write_image(root / relative, seed=99)
    return relative


def test_path_id_longer_than_the_curation_limit_is_refused(manifest_dataset, tmp_path, capsys):
    """Without an id column the path is the id: a too-long path is named with its row and a way out."""
    root, manifest = manifest_dataset
    relative = _deep_image(root)
    with open(manifest, "a") as handle:
        handle.write(f"{relative},a,train,cam0,100\n")
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", root, "--labels", manifest),
        contains=(f"{manifest}, row 7, column 'path'", f"{len(relative.encode()):,} bytes", "shorter 'id' column"),
    )


def test_imagefolder_path_longer_than_the_curation_limit_is_refused(image_folder, tmp_path, capsys):
    relative = _deep_image(image_folder / "cat")
    expect_refused(
        capsys,
        tmp_path,
        *init_args(tmp_path / "ws", image_folder),
        contains=(str(image_folder / "cat" / relative), "bytes in UTF-8", "shorten"),
    )
