"""Disk full and other I/O errors end with a clear message (no traceback), leave the workspace readable, and
the run resumes once space returns (issue 9, Deliver 6).

The real-disk test mounts a 3 MiB tmpfs (needs root and mount permission; skipped with the reason otherwise).
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from robustlens.analysis.workspace import Workspace
from robustlens.cli import main
from tests.conftest import tree_digest, write_image


def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def small_dataset(tmp_path) -> Path:
    data = tmp_path / "data"
    for c, name in enumerate(("cat", "dog", "fox")):
        for i in range(6):
            write_image(data / name / f"{i}.png", size=(32, 32), seed=10 * c + i)
    return data


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MiB tmpfs mounted under ``tmp_path``, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount_point)], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / f"filler-{uuid.uuid4().hex}"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush when it is closed
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def leftovers(folder: Path) -> list[str]:
    """Temporary files of interrupted atomic writes or init staging folders."""
    return sorted(
        p.name
        for p in folder.rglob("*")
        if p.name.endswith(".tmp") or ".init-" in p.name or p.name.startswith(".rebuild-")
    )


def test_analyze_on_a_full_disk_fails_cleanly_and_resumes(small_dataset, tiny_disk, capsys):
    workspace = tiny_disk / "ws"
    assert run_cli(capsys, "init", workspace, "--quiet", "--data", small_dataset)[0] == 0
    data_before = tree_digest(small_dataset)
    filler = fill(tiny_disk)

    code, err = run_cli(capsys, "analyze", workspace, "--quiet")
    assert code == 1
    assert "the disk is full during 'robustlens analyze'" in err and "No space left on device" in err
    assert "run the same command again" in err
    assert not leftovers(workspace)
    # Still a readable workspace: its manifest and samples load, every artifact that exists is complete.
    assert len(Workspace(workspace).samples) == 18
    # The curation database cannot be opened for writing on a full disk: a clear message, not a traceback.
    code, err = run_cli(capsys, "info", workspace)
    assert code == 0 or ("curation database" in err and "the disk holding" in err and code == 1), err

    filler.unlink()
    code, err = run_cli(capsys, "analyze", workspace, "--quiet")
    assert code == 0, err
    assert Workspace(workspace).artifact_path("issue_matrix.parquet").exists()
    assert run_cli(capsys, "info", workspace)[0] == 0
    assert tree_digest(small_dataset) == data_before


def test_init_on_a_full_disk_leaves_nothing_behind(small_dataset, tiny_disk, capsys):
    filler = fill(tiny_disk)
    code, err = run_cli(capsys, "init", tiny_disk / "ws", "--quiet", "--data", small_dataset)
    assert code == 1 and "the disk is full during 'robustlens init'" in err
    assert sorted(p.name for p in tiny_disk.iterdir()) == [filler.name]  # no workspace, no staging folder
    filler.unlink()
    code, err = run_cli(capsys, "init", tiny_disk / "ws", "--quiet", "--data", small_dataset)
    assert code == 0, err


def test_force_rebuild_on_a_full_disk_keeps_the_old_workspace(small_dataset, tiny_disk, capsys):
    workspace = tiny_disk / "ws"
    assert run_cli(capsys, "init", workspace, "--quiet", "--data", small_dataset)[0] == 0
    Workspace(workspace).curation().add_tag(["cat/0.png"], "keep-me", user="ana")
    before = tree_digest(workspace)
    write_image(small_dataset / "cat" / "new.png", size=(32, 32), seed=99)
    filler = fill(tiny_disk)
    code, err = run_cli(capsys, "init", workspace, "--quiet", "--data", small_dataset, "--force")
    assert code == 1 and "the disk is full" in err
    assert not leftovers(workspace)
    assert {k: v for k, v in tree_digest(workspace).items() if not k.startswith("curation.db")} == {
        k: v for k, v in before.items() if not k.startswith("curation.db")
    }  # the old workspace, untouched
    filler.unlink()
    assert run_cli(capsys, "init", workspace, "--quiet", "--data", small_dataset, "--force")[0] == 0
    assert len(Workspace(workspace).samples) == 19
    assert Workspace(workspace).curation().samples_with_tag("keep-me") == ["cat/0.png"]


@pytest.mark.parametrize(
    "code_name,expected", [("EIO", "input/output error"), ("ENOSPC", "the disk is full"), ("EROFS", "read-only")]
)
def test_io_errors_while_writing_are_reported_without_traceback(
    small_dataset, tmp_path, capsys, monkeypatch, code_name, expected
):
    from robustlens.analysis import storage

    def broken(path, write):
        raise OSError(getattr(errno, code_name), os.strerror(getattr(errno, code_name)), str(path))

    monkeypatch.setattr(storage, "atomic_write", broken)
    code, err = run_cli(capsys, "init", tmp_path / "ws", "--quiet", "--data", small_dataset)
    assert code == 1
    assert expected in err and "samples.parquet" in err
    assert not (tmp_path / "ws").exists() and not leftovers(tmp_path)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(small_dataset, tmp_path, capsys, monkeypatch):
    import robustlens.analysis.ingest.pipeline as pipeline

    def bug(*args, **kwargs):
        raise TypeError("something robustlens did wrong")

    monkeypatch.setattr(pipeline, "scan_dataset", bug)
    code, err = run_cli(capsys, "init", tmp_path / "ws", "--quiet", "--data", small_dataset)
    assert code == 1 and "unexpected TypeError: something robustlens did wrong" in err and "--debug" in err
    with pytest.raises(TypeError):
        main(["--debug", "init", str(tmp_path / "ws"), "--quiet", "--data", str(small_dataset)])
