"""A review team writing to one curation database at once loses nothing — on SQLite and on PostgreSQL.

Several reviewers — as threads sharing one server process (how Streamlit serves sessions) and as separate
processes (several servers or CLI runs on one workspace) — tag samples, record review decisions and add
to collections concurrently; afterwards every single write must be in the database. Each test runs on a
SQLite file and on a real PostgreSQL server started by the test session (``tests/pg.py``).
"""

from __future__ import annotations

import multiprocessing
import threading
from pathlib import Path

import pytest

from robustlens.analysis.curation import CurationStore

REVIEWERS = 4
ROUNDS = 15


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


def reviewer_session(url: str, reviewer: str, rounds: int, barrier=None) -> None:
    """One reviewer's work: per round a tag on two samples, a decision and a collection addition."""
    store = CurationStore(url)
    try:
        if barrier is not None:
            barrier.wait()
        for i in range(rounds):
            own = f"{reviewer}-sample-{i}"
            store.add_tag([own, "shared-sample"], "needs-check", user=reviewer)
            store.add_tag([own], f"by-{reviewer}", user=reviewer)
            store.record_decision(
                own,
                "relabel" if i % 2 else "keep",
                user=reviewer,
                new_label="coat" if i % 2 else None,
                note=f"round {i}",
            )
            store.record_decision("shared-sample", "ambiguous", user=reviewer, note=f"{reviewer} {i}")
            store.add_to_collection("team-set", [own, "shared-sample"], user=reviewer)
    finally:
        store.close()


def _process_entry(url: str, reviewer: str, rounds: int, barrier) -> None:
    reviewer_session(url, reviewer, rounds, barrier)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request, tmp_path) -> str:
    url = _url(tmp_path / "curation.db") if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    store = CurationStore(url)
    store.create_collection("team-set", user="lead", description="what the team collects")
    store.close()
    return url


def _assert_nothing_lost(url: str, reviewers: list[str]) -> None:
    store = CurationStore(url)
    try:
        tagged = set(store.samples_with_tag("needs-check"))
        expected = {f"{r}-sample-{i}" for r in reviewers for i in range(ROUNDS)} | {"shared-sample"}
        assert tagged == expected
        for reviewer in reviewers:
            assert set(store.samples_with_tag(f"by-{reviewer}")) == {f"{reviewer}-sample-{i}" for i in range(ROUNDS)}
        history = store.decisions(latest_only=False)
        assert len(history) == 2 * ROUNDS * len(reviewers)
        assert len([d for d in history if d["sample_id"] == "shared-sample"]) == ROUNDS * len(reviewers)
        for reviewer in reviewers:
            own = [d for d in history if d["created_by"] == reviewer and d["sample_id"] != "shared-sample"]
            assert [d["note"] for d in own] == [f"round {i}" for i in range(ROUNDS)]  # each reviewer's order kept
        latest = {d["sample_id"]: d for d in store.decisions(latest_only=True)}
        assert latest["shared-sample"]["id"] == max(d["id"] for d in history)
        assert set(store.collection("team-set")["members"]) == expected
        assert store.tag_counts()["needs-check"] == len(expected)
    finally:
        store.close()


def test_concurrent_reviewer_threads_lose_nothing(database):
    reviewers = [f"thread-{k}" for k in range(REVIEWERS)]
    barrier = threading.Barrier(len(reviewers))
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            reviewer_session(database, name, ROUNDS, barrier)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    _assert_nothing_lost(database, reviewers)


def test_concurrent_reviewer_processes_lose_nothing(database):
    reviewers = [f"process-{k}" for k in range(REVIEWERS)]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(len(reviewers))
    processes = [context.Process(target=_process_entry, args=(database, name, ROUNDS, barrier)) for name in reviewers]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=180)
    assert [p.exitcode for p in processes] == [0] * len(reviewers)
    _assert_nothing_lost(database, reviewers)


def test_one_store_shared_by_threads_loses_nothing(database):
    """The dashboard shares one store (one connection pool) across all browser sessions of a server."""
    store = CurationStore(database)
    reviewers = [f"session-{k}" for k in range(REVIEWERS)]

    def run(name: str) -> None:
        for i in range(ROUNDS):
            store.add_tag([f"{name}-sample-{i}", "shared-sample"], "needs-check", user=name)
            store.add_tag([f"{name}-sample-{i}"], f"by-{name}", user=name)
            store.record_decision(
                f"{name}-sample-{i}",
                "relabel" if i % 2 else "keep",
                user=name,
                new_label="coat" if i % 2 else None,
                note=f"round {i}",
            )
            store.record_decision("shared-sample", "ambiguous", user=name)
            store.add_to_collection("team-set", [f"{name}-sample-{i}", "shared-sample"], user=name)

    threads = [threading.Thread(target=run, args=(name,)) for name in reviewers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    store.close()
    _assert_nothing_lost(database, reviewers)
