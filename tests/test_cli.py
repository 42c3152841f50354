"""The robustlens command line: round trips, exit codes, and that inputs are never modified."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from robustlens.analysis.workspace import Workspace
from robustlens.cli import main
from tests.conftest import SAMPLE_DATA, tree_digest, write_image


def _init(workspace, data, *options) -> int:
    """``robustlens init WORKSPACE --quiet --data DATA OPTIONS…`` through :func:`main` (paths as strings)."""
    return main(["init", str(workspace), "--quiet", "--data", str(data), *(str(option) for option in options)])


def _init_sample(workspace, *extra):
    return _init(
        workspace,
        SAMPLE_DATA,
        "--labels",
        SAMPLE_DATA / "labels.csv",
        "--predictions",
        f"cnn={SAMPLE_DATA / 'predictions.csv'}",
        "--model",
        SAMPLE_DATA / "model.pt",
        "--model-config",
        SAMPLE_DATA / "model.json",
        *extra,
    )


def test_round_trip_on_the_sample_data(tmp_path, capsys):
    before = tree_digest(SAMPLE_DATA)
    assert _init_sample(tmp_path / "ws") == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ws"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_samples"] == 2000 and info["num_skipped"] == 0
    assert info["classes"][0] == "tshirt_top" and len(info["classes"]) == 10
    assert set(info["class_counts"].values()) == {200}
    assert info["split_counts"] == {"test": 2000}
    assert info["metadata_columns"] == ["source_index"]
    assert info["prediction_sets"]["cnn"]["accuracy"] > 0.88
    assert tree_digest(SAMPLE_DATA) == before

    workspace = Workspace(tmp_path / "ws")
    samples = workspace.samples
    labels = pd.read_csv(SAMPLE_DATA / "labels.csv")
    assert samples["path"].tolist() == labels["path"].tolist()
    assert (samples["label"] == labels["label"]).all()
    assert samples["meta.source_index"].tolist() == labels["source_index"].tolist()
    # The model in the workspace reproduces the shipped predictions from the images on disk.
    from robustlens.analysis.images import read_image
    from robustlens.analysis.ingest.model import prepare_images

    model = workspace.load_model()
    pixels = [read_image(SAMPLE_DATA / p).pixels for p in samples["path"][:64]]
    import torch

    with torch.no_grad():
        probs = torch.softmax(model(prepare_images(pixels, model.config)), dim=1).numpy()
    np.testing.assert_allclose(probs, workspace.predictions("cnn")[:64], atol=1e-4)


def test_round_trip_on_an_imagefolder(image_folder, tmp_path, capsys):
    assert _init(tmp_path / "ws", image_folder) == 0
    out = capsys.readouterr().out
    assert "12 ingested, 0 skipped" in out and "cat, dog, fox" in out
    assert main(["info", str(tmp_path / "ws")]) == 0
    assert "12 ingested" in capsys.readouterr().out


def test_manifest_with_metadata_and_two_prediction_sets(manifest_dataset, tmp_path, capsys):
    root, manifest = manifest_dataset
    ids = pd.read_csv(manifest)["path"]
    good = pd.DataFrame({"path": ids, "a": [0.9, 0.2] * 3, "b": [0.1, 0.8] * 3})
    logits = pd.DataFrame({"path": ids, "a": [3.0, -1.0] * 3, "b": [-3.0, 2.0] * 3})
    good.to_csv(tmp_path / "m1.csv", index=False)
    logits.to_parquet(tmp_path / "m2.parquet")
    code = _init(
        tmp_path / "ws",
        root,
        "--labels",
        manifest,
        "--predictions",
        tmp_path / "m1.csv",
        "--predictions",
        f"second={tmp_path / 'm2.parquet'}",
    )
    assert code == 0
    workspace = Workspace(tmp_path / "ws")
    assert workspace.prediction_names == ["m1", "second"]
    assert workspace.manifest["prediction_sets"]["second"]["score_kind"] == "logits"
    assert workspace.manifest["metadata_columns"] == ["meta.camera", "meta.brightness_lux"]
    assert sorted(workspace.manifest["splits"]) == ["test", "train"]


def test_validation_error_exits_2_and_writes_nothing(manifest_dataset, tmp_path, capsys):
    root, manifest = manifest_dataset
    bad = tmp_path / "bad.csv"
    bad.write_text("path,a,b\nimgs/im0.png,0.5,nan\n")
    before = tree_digest(tmp_path)
    code = _init(tmp_path / "ws", root, "--labels", manifest, "--predictions", bad)
    assert code == 2
    assert f"{bad}, row 1, column 'b'" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()
    assert tree_digest(tmp_path) == before


def test_existing_workspace_needs_force_and_keeps_curation(image_folder, tmp_path, capsys):
    ws = tmp_path / "ws"
    assert _init(ws, image_folder) == 0
    Workspace(ws).curation().add_tag(["cat/0.png"], "keep-me", user="ana")
    assert _init(ws, image_folder) == 2
    assert "pass --force" in capsys.readouterr().err
    write_image(image_folder / "cat" / "new.png", seed=99)
    assert _init(ws, image_folder, "--force") == 0
    workspace = Workspace(ws)
    assert len(workspace.samples) == 13
    assert workspace.curation().samples_with_tag("keep-me") == ["cat/0.png"]


def test_refuses_a_non_empty_directory_and_the_dataset_itself(image_folder, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "thesis.tex").write_text("precious")
    assert _init(occupied, image_folder) == 2
    assert (occupied / "thesis.tex").read_text() == "precious"
    assert _init(image_folder / "ws", image_folder) == 2
    assert "inside the dataset folder" in capsys.readouterr().err
    assert not (image_folder / "ws").exists()


def test_npy_predictions_and_embeddings_through_the_cli(image_folder, tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=12)
    np.save(tmp_path / "p.npy", probs)
    np.save(tmp_path / "e.npy", rng.normal(size=(12, 5)))
    code = _init(
        tmp_path / "ws",
        image_folder,
        "--predictions",
        tmp_path / "p.npy",
        "--classes",
        "cat,dog,fox",
        "--embeddings",
        tmp_path / "e.npy",
    )
    assert code == 0
    workspace = Workspace(tmp_path / "ws")
    np.testing.assert_allclose(workspace.predictions("p"), probs, rtol=1e-6)
    assert workspace.embeddings().shape == (12, 5)


def test_model_without_config_is_a_usage_error(image_folder, tmp_path, capsys):
    model = tmp_path / "m.pt"
    model.write_bytes(b"x")
    assert _init(tmp_path / "ws", image_folder, "--model", model) == 2
    assert "--model-config" in capsys.readouterr().err


def test_missing_workspace_fails_cleanly(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nowhere")]) == 2
    assert "not a robustlens workspace" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["init"], ["info"], ["analyze"], ["export"], ["serve"]])
def test_help_on_every_command(command):
    result = subprocess.run(
        [sys.executable, "-m", "robustlens.cli", *command, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "usage: robustlens" in result.stdout


def test_usage_error_exit_code():
    result = subprocess.run(
        [sys.executable, "-m", "robustlens.cli", "init"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "the following arguments are required" in result.stderr


def test_in_sample_prediction_sets_are_marked(manifest_dataset, tmp_path, capsys):
    root, manifest = manifest_dataset
    ids = pd.read_csv(manifest)["path"]
    pd.DataFrame({"path": ids, "a": [0.9, 0.2] * 3, "b": [0.1, 0.8] * 3}).to_csv(tmp_path / "m1.csv", index=False)
    base = ("--labels", manifest, "--predictions", tmp_path / "m1.csv")
    assert _init(tmp_path / "bad", root, *base, "--in-sample", "nope") == 2
    assert "--in-sample names ['nope']" in capsys.readouterr().err
    assert _init(tmp_path / "ws", root, *base, "--in-sample", "m1") == 0
    assert Workspace(tmp_path / "ws").manifest["prediction_sets"]["m1"]["in_sample"] is True


@pytest.mark.slow
def test_torch_export_model_is_copied_and_reloaded(image_folder, tmp_path):
    import torch

    from tests.model_factories import MeanModel

    network = MeanModel(3).eval()
    archive = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(network, (torch.zeros(2, 3, 8, 8),)), str(archive))
    config = tmp_path / "model.json"
    config.write_text(json.dumps({"input_size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3}))
    code = _init(tmp_path / "ws", image_folder, "--model", archive, "--model-config", config)
    assert code == 0
    workspace = Workspace(tmp_path / "ws")
    assert workspace.manifest["model"]["file"] == "model/model.pt2"
    images = torch.full((2, 3, 8, 8), 0.75)
    torch.testing.assert_close(workspace.load_model()(images), network((images - 0.5) / 0.25))


@pytest.mark.slow
def test_serve_stops_when_signalled(sample_workspace):
    """SIGTERM to `robustlens serve` must stop the server itself, not orphan it."""
    import socket
    import urllib.parse

    from tests.browser import served

    with served(sample_workspace) as url:
        port = urllib.parse.urlparse(url).port
    with socket.socket() as sock:
        sock.settimeout(5)
        assert sock.connect_ex(("127.0.0.1", port)) != 0, "the dashboard server still listens after terminate()"


def test_help_does_not_import_torch():
    """Building the parser stays light: `robustlens --help` used to import torch (5 s of CPU)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom robustlens.cli import main\n"
        "for argv in (['--help'], ['robustness', '--help'], ['analyze', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


# -- one CLI: shared options, one device resolver, errors → exit status, light start ---------------------------


def _subparsers(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_command_lives_in_commands_and_shares_its_options():
    from robustlens import cli
    from robustlens.argtypes import positive_int
    from robustlens.commands import common

    commands = _subparsers(cli.build_parser())
    assert list(commands) == ["init", "info", "analyze", "robustness", "export", "serve"]
    for name, parser in commands.items():
        assert parser.get_default("handler").__module__ == f"robustlens.commands.{name}", name
    shared = {
        "--device": ["analyze", "robustness"],
        "--workers": ["init", "analyze", "robustness"],
        "--quiet": ["init", "analyze", "robustness"],
    }
    for option, users in shared.items():
        actions = [next(a for a in commands[name]._actions if option in a.option_strings) for name in users]
        assert len({(a.help, a.type, a.default, type(a)) for a in actions}) == 1, option  # one definition
    workers = next(a for a in commands["robustness"]._actions if "--workers" in a.option_strings)
    assert workers.type is positive_int  # robustness used to accept --workers 0 and -3
    from robustlens.commands import robustness

    assert robustness.resolve_device is common.resolve_device
    assert robustness.EXIT_FAILURE == common.EXIT_FAILURE == 1 and cli.EXIT_USAGE == common.EXIT_USAGE == 2


def test_resolve_device():
    import torch

    from robustlens.commands.common import resolve_device
    from robustlens.errors import ValidationError

    assert resolve_device("cpu") == "cpu" and resolve_device(" CPU ") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "gpu", "cuda:x", "cuda:", "", "cpu:0"):
        with pytest.raises(ValidationError, match="--device must be auto, cpu, cuda, cuda:N or mps"):
            resolve_device(bad)
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == "cuda:0"
        with pytest.raises(ValidationError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        for missing in ("cuda", "cuda:1"):
            with pytest.raises(ValidationError, match="CUDA is not available"):
                resolve_device(missing)


def test_analyze_refuses_an_unknown_device_before_any_stage(image_folder, tmp_path, capsys):
    assert _init(tmp_path / "ws", image_folder) == 0
    before = tree_digest(tmp_path / "ws")
    capsys.readouterr()
    assert main(["analyze", str(tmp_path / "ws"), "--device", "tpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device must be") and err.count("\n") == 1
    assert tree_digest(tmp_path / "ws") == before


def test_errors_map_to_exit_statuses_with_one_line(capsys):
    import argparse

    from robustlens.commands.common import EXIT_FAILURE, EXIT_USAGE, exit_status, run_handler
    from robustlens.errors import ConfigError, NotAWorkspaceError, RobustlensError, ValidationError, WorkspaceError

    expected = {
        ValidationError("x"): EXIT_USAGE,
        ConfigError("stage 'a'", "k", "a number", "b"): EXIT_USAGE,
        NotAWorkspaceError("x"): EXIT_USAGE,
        WorkspaceError("x"): EXIT_FAILURE,
        RobustlensError("x"): EXIT_FAILURE,
        OSError(28, "No space left on device"): EXIT_FAILURE,
        RuntimeError("x"): EXIT_FAILURE,
    }
    for error, status in expected.items():
        assert exit_status(error) == status, error

    def failing(error):
        def handler(args):
            raise error

        return argparse.Namespace(handler=handler, command="info", workspace=Path("ws"), debug=False)

    assert run_handler(failing(ValidationError("bad value\n  on two lines", file="a.csv", row=3))) == 2
    assert capsys.readouterr().err == "error: a.csv, row 3: bad value / on two lines\n"
    assert run_handler(failing(WorkspaceError("damaged"))) == 1
    assert capsys.readouterr().err == "error: damaged\n"
    assert run_handler(failing(OSError(28, "No space left on device", "ws/artifacts/x.parquet"))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full during 'robustlens info' on ws") and err.count("\n") == 1
    # An unexpected exception is a bug: said so, with how to get the traceback (which --debug shows).
    assert run_handler(failing(KeyError("boom"))) == 1
    assert "error: unexpected KeyError: 'boom'" in capsys.readouterr().err
    args = failing(KeyError("boom"))
    args.debug = True
    with pytest.raises(KeyError):
        run_handler(args)


def test_damaged_workspace_json_is_a_failure_with_one_line(image_folder, tmp_path, capsys):
    assert _init(tmp_path / "ws", image_folder) == 0
    (tmp_path / "ws" / "workspace.json").write_text("{")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ws")]) == 1
    err = capsys.readouterr().err
    assert "workspace.json is damaged" in err and err.count("\n") == 1


HEAVY = ("torch", "pandas", "streamlit", "sqlalchemy", "sklearn", "scipy")


def _imported(*argv: str) -> set[str]:
    """Top-level packages ``python -X importtime -m robustlens.cli *argv`` imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "robustlens.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }


@pytest.mark.parametrize("command", [[], ["init"], ["info"], ["analyze"], ["robustness"], ["export"], ["serve"]])
def test_help_imports_no_heavy_library(command):
    imported = _imported(*command, "--help")
    assert "robustlens" in imported  # the listing is read correctly
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_info_imports_no_heavy_library(sample_workspace, tmp_path):
    import shutil

    root = shutil.copytree(sample_workspace, tmp_path / "ws")
    imported = _imported("info", str(root))
    assert "pyarrow" in imported
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_quick_info_matches_the_engine_summary(sample_workspace, manifest_dataset, tmp_path):
    """``robustlens info`` reads without pandas or SQLAlchemy (curation counts straight from the SQLite file); it
    must say exactly what the query layer's ``summarize`` says through the engine's workspace and curation store."""
    import shutil

    from robustlens.analysis import curation, workspace
    from robustlens.query.summary import QUICK_FORMAT_VERSIONS, QUICK_SCHEMA_VERSIONS, summarize
    from robustlens.query.summary import read_summary as quick_summary

    assert workspace.FORMAT_VERSION in QUICK_FORMAT_VERSIONS
    assert curation.SCHEMA_VERSION in QUICK_SCHEMA_VERSIONS

    sample = Path(shutil.copytree(sample_workspace, tmp_path / "sample"))
    store = Workspace(sample).curation()
    ids = Workspace(sample).samples["id"].tolist()
    store.add_tag(ids[:5], "blurry", user="ana")
    store.add_tag(ids[3:9], "check", user="ana")
    store.create_collection("odd", user="ana", sample_ids=ids[:3])
    store.record_decision(ids[0], "relabel", user="ana", new_label="bag")
    store.record_decision(ids[1], "keep", user="ana")
    store.close()

    root, manifest = manifest_dataset  # splits, metadata, two prediction sets, ties in the class counts
    ids6 = pd.read_csv(manifest)["path"]
    pd.DataFrame({"path": ids6, "a": [0.9, 0.2] * 3, "b": [0.1, 0.8] * 3}).to_csv(tmp_path / "m1.csv", index=False)
    pd.DataFrame({"path": ids6, "a": [3.0, 1.0] * 3, "b": [-3.0, 2.0] * 3}).to_csv(tmp_path / "m2.csv", index=False)
    assert (
        _init(
            tmp_path / "manifest",
            root,
            "--labels",
            manifest,
            "--predictions",
            tmp_path / "m1.csv",
            "--predictions",
            tmp_path / "m2.csv",
        )
        == 0
    )
    pictures = tmp_path / "pictures"  # an ImageFolder tree with imported embeddings and a --db elsewhere
    for i in range(5):
        write_image(pictures / ("cat" if i < 3 else "dog") / f"{i}.png", seed=i)
    np.save(tmp_path / "e.npy", np.random.default_rng(0).normal(size=(5, 4)))
    assert (
        _init(
            tmp_path / "folder",
            pictures,
            "--embeddings",
            tmp_path / "e.npy",
            "--db",
            f"sqlite:///{tmp_path / 'elsewhere.db'}",
        )
        == 0
    )
    Workspace(tmp_path / "folder").curation().add_tag(["cat/0.png"], "keep-me", user="ana")

    for path in (sample, tmp_path / "manifest", tmp_path / "folder"):
        quick = quick_summary(path)
        assert quick is not None, path
        assert json.dumps(quick, default=str) == json.dumps(summarize(Workspace(path)), default=str), path
    assert quick_summary(sample)["curation"] == {
        "tags": 2,
        "tag_assignments": 11,
        "collections": 1,
        "review_decisions": 2,
    }
    assert quick_summary(tmp_path / "folder")["curation"]["tags"] == 1  # read through the --db URL
    assert quick_summary(tmp_path / "nowhere") is None  # the engine names the problem
