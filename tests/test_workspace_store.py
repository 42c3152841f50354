"""Atomic artifact writes, manifest versioning and the curation database."""

from __future__ import annotations

import json
import multiprocessing
import threading

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import text

from robustlens.analysis import storage
from robustlens.analysis.curation import SCHEMA_VERSION, CurationStore
from robustlens.analysis.workspace import FORMAT_VERSION, Workspace
from robustlens.errors import WorkspaceError


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "x.npy"
    storage.write_npy(target, np.arange(5))
    storage.write_npy(target, np.arange(7))
    np.testing.assert_array_equal(np.load(target), np.arange(7))
    assert [p.name for p in target.parent.iterdir()] == ["x.npy"]


def test_failed_write_keeps_the_previous_artifact(tmp_path):
    target = tmp_path / "s.parquet"
    storage.write_parquet(target, pd.DataFrame({"a": [1, 2]}))

    def explode(tmp):
        tmp.write_bytes(b"half a file")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        storage.atomic_write(target, explode)
    assert pd.read_parquet(target)["a"].tolist() == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]


def test_not_a_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="not a robustlens workspace"):
        Workspace(tmp_path)


def test_newer_workspace_format_is_refused(tmp_path):
    (tmp_path / "workspace.json").write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(WorkspaceError, match="newer than this robustlens supports"):
        Workspace(tmp_path)


def test_damaged_manifest(tmp_path):
    (tmp_path / "workspace.json").write_text("{")
    with pytest.raises(WorkspaceError, match="damaged"):
        Workspace(tmp_path)


def _store(tmp_path) -> CurationStore:
    return CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")


def test_sqlite_uses_wal_and_records_schema_version(tmp_path):
    store = _store(tmp_path)
    with store.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("select value from schema_info where key='schema_version'")).scalar() == str(
            SCHEMA_VERSION
        )
    assert store.schema_version == SCHEMA_VERSION


def test_newer_database_schema_is_refused(tmp_path):
    store = _store(tmp_path)
    with store.engine.begin() as conn:
        conn.execute(text("update schema_info set value='99' where key='schema_version'"))
    store.close()
    with pytest.raises(WorkspaceError, match="schema version 99"):
        _store(tmp_path)


def test_tags_collections_and_decisions(tmp_path):
    store = _store(tmp_path)
    assert store.add_tag(["s1", "s2", "s2"], "blurry", user="ana") == 2
    assert store.add_tag(["s2", "s3"], "blurry", user="ben") == 1
    assert store.samples_with_tag("blurry") == ["s1", "s2", "s3"]
    assert store.remove_tag(["s1"], "blurry", user="ana") == 1
    assert store.tag_counts() == {"blurry": 2}
    store.create_collection("to fix", user="ana", description="for relabel", sample_ids=["s3", "s1"])
    assert store.collection_samples("to fix") == ["s1", "s3"]
    with pytest.raises(ValueError, match="already exists"):
        store.create_collection("to fix", user="ben")
    store.record_decision("s1", "relabel", user="ana", new_label="dog")
    store.record_decision("s1", "keep", user="ben")
    latest = store.decisions()
    assert [(d["sample_id"], d["action"], d["created_by"]) for d in latest] == [("s1", "keep", "ben")]
    assert len(store.decisions(latest_only=False)) == 2
    with pytest.raises(ValueError, match="needs new_label"):
        store.record_decision("s2", "relabel", user="ana")
    assert store.counts() == {"tags": 1, "tag_assignments": 2, "collections": 1, "review_decisions": 2}


def test_concurrent_threads_lose_no_tag(tmp_path):
    _store(tmp_path).close()
    errors = []

    def reviewer(n: int):
        store = _store(tmp_path)
        try:
            for i in range(20):
                store.add_tag([f"r{n}-{i}", "shared"], "seen", user=f"rev{n}")
                store.record_decision(f"r{n}-{i}", "keep", user=f"rev{n}")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)
        finally:
            store.close()

    threads = [threading.Thread(target=reviewer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = _store(tmp_path)
    assert len(store.samples_with_tag("seen")) == 4 * 20 + 1
    assert len(store.decisions()) == 80


def _process_writer(db_path: str, n: int) -> None:
    store = CurationStore(f"sqlite:///{db_path}")
    for i in range(15):
        store.add_tag([f"p{n}-{i}"], f"tag{i % 3}", user=f"proc{n}")
    store.close()


def test_concurrent_processes_lose_no_tag(tmp_path):
    _store(tmp_path).close()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_process_writer, args=(str(tmp_path / "curation.db"), n)) for n in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert sum(_store(tmp_path).tag_counts().values()) == 45
