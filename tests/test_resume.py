"""A metrics run killed with SIGKILL leaves no readable half artifact and resumes from its cache chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from robustlens.analysis.ingest.pipeline import InitOptions, init_workspace
from robustlens.analysis.stages import metrics as metrics_stage
from robustlens.analysis.stages.base import StageContext, read_artifact
from tests.metrics_planted import copy_real_images

pytestmark = pytest.mark.slow  # kills a metrics run of 300 images mid-way, then resumes it

REPO = Path(__file__).resolve().parents[1]
IMAGES = 300
BATCH_SIZE = 10
PLUGINS = ("tests.metrics_slow_plugin",)
RUN_METRICS = """
import json, sys
from robustlens.analysis.stages import metrics
from robustlens.analysis.stages.base import StageContext
from robustlens.analysis.workspace import Workspace

config = metrics.Config(batch_size=int(sys.argv[2]), plugins=tuple(sys.argv[3].split(",")))
print(json.dumps(metrics.run(StageContext(Workspace(sys.argv[1]), progress=False), config)))
"""


def start_metrics(workspace_root: Path, log: Path, *, delay: float) -> subprocess.Popen:
    env = {
        **os.environ,
        "ROBUSTLENS_TEST_METRIC_DELAY": str(delay),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", RUN_METRICS, str(workspace_root), str(BATCH_SIZE), ",".join(PLUGINS)],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def cache_chunks(workspace_root: Path) -> list[Path]:
    return sorted((workspace_root / "artifacts" / "cache").glob("metrics-*/chunk-*.parquet"))


@pytest.fixture
def workspaces(tmp_path):
    copy_real_images(tmp_path / "data", IMAGES)
    killed, _ = init_workspace(tmp_path / "killed", InitOptions(data=tmp_path / "data", progress=False))
    reference, _ = init_workspace(tmp_path / "reference", InitOptions(data=tmp_path / "data", progress=False))
    return killed, reference


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(workspaces, tmp_path):
    killed, reference = workspaces
    log = tmp_path / "killed.log"
    process = start_metrics(killed.root, log, delay=0.15)
    deadline = time.monotonic() + 120
    try:
        while len(cache_chunks(killed.root)) < 3:
            assert process.poll() is None, f"the run ended before it could be killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"fewer than 3 cache chunks after 120 s:\n{log.read_text()}"
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed; slow the plugin down"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    # Nothing half-written is visible as an artifact.
    assert read_artifact(killed, "metrics") is None and read_artifact(killed, "fingerprints") is None
    assert not killed.artifact_path("metrics.parquet").exists()
    index = killed.artifact_path("index.json")
    assert not index.exists() or "metrics" not in json.loads(index.read_text())
    chunks = cache_chunks(killed.root)
    done = sum(len(pd.read_parquet(chunk)) for chunk in chunks)  # every chunk is complete and readable
    assert 0 < done < IMAGES
    # A writer killed mid-write leaves a hidden temporary file; plant one of each kind to prove they are ignored.
    (chunks[0].parent / f".{chunks[0].name[:-8]}-zz.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half a chunk")
    killed.artifact_path(".metrics.parquet.k1ll3d.tmp").write_bytes(b"PAR1 half an artifact")
    assert read_artifact(killed, "metrics") is None

    config = metrics_stage.Config(batch_size=BATCH_SIZE, plugins=PLUGINS)
    resumed = metrics_stage.run(StageContext(killed, progress=False), config)
    assert resumed["computed"] < IMAGES and resumed["cached"] >= done
    assert resumed["computed"] + resumed["cached"] == killed.samples["content_hash"].nunique()
    full = metrics_stage.run(StageContext(reference, progress=False), config)
    assert full["computed"] == reference.samples["content_hash"].nunique() and full["cached"] == 0
    assert "slow_peak" in resumed["metrics"]

    pd.testing.assert_frame_equal(
        read_artifact(killed, "metrics"), read_artifact(reference, "metrics"), check_exact=False, atol=1e-6, rtol=0
    )
    pd.testing.assert_frame_equal(read_artifact(killed, "fingerprints"), read_artifact(reference, "fingerprints"))
    resumed_table, reference_table = read_artifact(killed, "metrics"), read_artifact(reference, "metrics")
    difference = resumed_table.drop(columns="id") - reference_table.drop(columns="id")
    print(
        f"killed after {done} of {IMAGES} images; the resumed run computed {resumed['computed']}; "
        f"largest difference from the uninterrupted run: {difference.abs().to_numpy().max():.3g}"
    )
