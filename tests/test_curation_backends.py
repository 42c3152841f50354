"""The curation database behaves the same, and loses nothing, on SQLite and on a real PostgreSQL server.

* 8 writers (threads, each with its own engine and connections) open a brand-new database at the same moment, race to
  create the same tags and collections, bulk-tag and collect 500 samples each with heavy overlap, record
  500 review decisions each and then remove overlapping tags: every row is there exactly once, every
  "newly added / removed" count adds up, every decision is attributed to its user.
* Also under SERIALIZABLE isolation (a team server configured that way), where PostgreSQL aborts
  transactions that lost a race: the retries make up for it.
* Statements beyond the drivers' bind-parameter limits (70,000 ids: psycopg allows 65,535).
* Long names and ids are refused identically, before anything is written.
* The retry helper retries what lost a race and nothing else.

The PostgreSQL server comes from ``tests/pg.py`` (Debian's binaries, started by the test session).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import OperationalError

from robustlens.analysis import curation
from robustlens.analysis.curation import (
    MAX_NAME_CHARS,
    MAX_SAMPLE_ID_BYTES,
    CurationConflictError,
    CurationInputError,
    CurationStore,
)
from robustlens.errors import ValidationError

WRITERS = 8


@dataclass(frozen=True)
class Workload:
    """What each of the :data:`WRITERS` reviewers does.

    Writer ``w`` tags "shared", adds to collection "team" and records a decision for ``per_writer`` ids
    starting at ``w * per_writer / 2`` (so each id is shared by two writers; ``4 * per_writer`` ids in
    all), in batches of ``batch``; every writer tags the same ``per_writer`` "hot" ids (in its own
    shuffled order), then untags "hot" from ``per_writer / 5`` of them overlapping the next writer's.
    """

    per_writer: int
    batch: int

    @property
    def universe(self) -> int:
        return WRITERS * self.per_writer // 2

    def own_ids(self, writer: int) -> list[str]:
        return [f"s{(writer * self.per_writer // 2 + k) % self.universe:05d}" for k in range(self.per_writer)]

    def hot(self) -> list[str]:
        return [f"s{i:05d}" for i in range(self.per_writer)]

    def hot_removals(self, writer: int) -> list[str]:
        step = self.per_writer // 10
        return self.hot()[writer * step : writer * step + 2 * step]


FULL = Workload(per_writer=500, batch=50)  # 8 writers x 500 tags, members and decisions each


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """An empty database on each backend (PostgreSQL: a fresh database on the session's real server).

    SQLite's file lives in /dev/shm where there is one: the same locking, without a disk flush per commit.
    """
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_url")
        return
    shm = Path("/dev/shm")
    folder = (
        Path(tempfile.mkdtemp(prefix="robustlens-curation-", dir=shm))
        if shm.is_dir() and os.access(shm, os.W_OK)
        else tmp_path
    )
    try:
        yield f"sqlite:///{folder / 'curation.db'}"
    finally:
        if folder != tmp_path:
            shutil.rmtree(folder, ignore_errors=True)


def writer_session(url: str, writer: int, barrier: threading.Barrier, work: Workload) -> dict:
    """One reviewer's whole session, with its own store (engine and connections); returns what it was told."""
    result: dict = {"writer": writer, "added": {}, "removed_hot": 0, "created": [], "retries": 0}
    barrier.wait()
    store = CurationStore(url)  # all open a new database at once: schema creation races
    try:
        name = f"rev-{writer}"
        for collection in ("team", "race"):
            try:
                store.create_collection(collection, user=name, description=f"created by {name}")
                result["created"].append(collection)
            except CurationInputError as exc:
                assert "already exists" in str(exc)
        rng = random.Random(writer)
        mine = work.own_ids(writer)
        hot = work.hot()
        rng.shuffle(hot)
        added = {"shared": 0, "hot": 0, "team": 0}
        for start in range(0, work.per_writer, work.batch):
            batch = mine[start : start + work.batch]
            added["shared"] += store.add_tag(batch, "shared", user=name)
            added["hot"] += store.add_tag(hot[start : start + work.batch], "hot", user=name)
            added["team"] += store.add_to_collection("team", batch, user=name)
            for k, sid in enumerate(batch, start=start):
                action = ("keep", "relabel", "ambiguous", "exclude")[k % 4]
                store.record_decision(
                    sid,
                    action,
                    user=name,
                    note=f"{writer}:{k}",
                    new_label=f"class-{k % 7}" if action == "relabel" else None,
                )
        result["added"] = added
        barrier.wait()  # every "hot" tag is in before anyone removes
        result["removed_hot"] = store.remove_tag(work.hot_removals(writer), "hot", user=name)
        result["retries"] = store.retries
    finally:
        store.close()
    return result


def _run_writers(url: str, work: Workload) -> list[dict]:
    """Run the :data:`WRITERS` sessions at once, each in a thread with its own engine; their results."""
    # Both timeouts only guard against a hang: on a shared 2-core machine under other load one phase of the eight
    # writers took over 120 s (the barrier broke though nothing was lost or duplicated).
    barrier = threading.Barrier(WRITERS, timeout=600)
    with ThreadPoolExecutor(WRITERS) as pool:
        futures = [pool.submit(writer_session, url, w, barrier, work) for w in range(WRITERS)]
        return [future.result(timeout=900) for future in futures]


def _assert_nothing_lost_or_duplicated(url: str, results: list[dict], work: Workload) -> None:
    store = CurationStore(url)
    try:
        everyone = sorted({sid for w in range(WRITERS) for sid in work.own_ids(w)})
        assert len(everyone) == work.universe
        # Tags: each sample once, each counted as new by exactly one writer.
        assert store.samples_with_tag("shared") == everyone
        assert sum(r["added"]["shared"] for r in results) == work.universe
        removed = sorted({sid for w in range(WRITERS) for sid in work.hot_removals(w)})
        assert store.samples_with_tag("hot") == sorted(set(work.hot()) - set(removed))
        assert sum(r["added"]["hot"] for r in results) == work.per_writer
        assert sum(r["removed_hot"] for r in results) == len(removed)
        # Collections: created once each, despite 8 concurrent creators; members once each.
        creators = {c: [r["writer"] for r in results if c in r["created"]] for c in ("team", "race")}
        assert [len(v) for v in creators.values()] == [1, 1], creators
        assert store.collection_names() == ["race", "team"]
        assert store.collection("team")["members"] == everyone
        assert store.collection("race")["members"] == []
        assert store.collection("team")["created_by"] == f"rev-{creators['team'][0]}"
        assert sum(r["added"]["team"] for r in results) == work.universe
        # Decisions: every one, each once, attributed, each reviewer's own order kept.
        history = store.decisions(latest_only=False)
        assert len(history) == WRITERS * work.per_writer
        notes = [d["note"] for d in history]
        assert len(set(notes)) == len(notes)
        for writer in range(WRITERS):
            mine = [d for d in history if d["created_by"] == f"rev-{writer}"]
            assert [d["note"] for d in mine] == [f"{writer}:{k}" for k in range(work.per_writer)]
            assert [d["sample_id"] for d in mine] == work.own_ids(writer)
            relabels = [d for d in mine if d["action"] == "relabel"]
            assert all(d["new_label"] == f"class-{int(d['note'].split(':')[1]) % 7}" for d in relabels)
        assert len(store.decisions(latest_only=True)) == work.universe
        with store.engine.connect() as conn:
            # No duplicate tag rows; the audit log has every write of every reviewer.
            assert conn.execute(text("SELECT name FROM tags ORDER BY name")).scalars().all() == ["hot", "shared"]
            actions = conn.execute(
                text("SELECT created_by, action, count(*) FROM audit_log GROUP BY created_by, action")
            ).all()
        audit = {(user, action): int(n) for user, action, n in actions}
        for writer in range(WRITERS):
            name = f"rev-{writer}"
            assert audit[(name, "review")] == work.per_writer
            assert audit[(name, "tag")] == 2 * work.per_writer // work.batch
            assert audit[(name, "add_to_collection")] == work.per_writer // work.batch
            assert audit[(name, "untag")] == 1
        assert sum(n for (user, action), n in audit.items() if action == "create_collection") == 2
    finally:
        store.close()


def test_eight_concurrent_writers_lose_and_duplicate_nothing(db_url):
    results = _run_writers(db_url, FULL)
    _assert_nothing_lost_or_duplicated(db_url, results, FULL)


@pytest.mark.postgres
def test_serializable_postgres_server_loses_nothing(postgres_url):
    """A server whose default isolation is SERIALIZABLE aborts transactions that raced; they are retried.

    A lighter workload (8 writers x 100): under SERIALIZABLE most overlapping batches abort at least once.
    """
    import psycopg

    conninfo = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    database = conninfo.rsplit("/", 1)[1]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE \"{database}\" SET default_transaction_isolation TO 'serializable'")
    work = Workload(per_writer=100, batch=20)
    results = _run_writers(postgres_url, work)
    _assert_nothing_lost_or_duplicated(postgres_url, results, work)
    store = CurationStore(postgres_url)
    with store.engine.connect() as conn:
        assert conn.execute(text("SHOW transaction_isolation")).scalar() == "serializable"
    store.close()
    print(f"serializable run: {sum(r['retries'] for r in results)} transactions retried")


def test_statements_beyond_driver_parameter_limits(db_url):
    """70,000 ids in one call: more bind parameters than psycopg (65,535) or SQLite (32,766) allow at once."""
    store = CurationStore(db_url)
    ids = [f"img/{i:06d}.png" for i in range(70_000)]
    assert store.add_tag(ids, "big", user="ana") == 70_000
    assert store.add_tag(ids[-3:] + ["img/extra.png"], "big", user="ben") == 1
    assert store.tag_counts() == {"big": 70_001}
    assert store.remove_tag(ids + ["img/never-tagged.png"], "big", user="ana") == 70_000
    assert store.samples_with_tag("big") == ["img/extra.png"]
    store.create_collection("many", user="ana", sample_ids=ids)
    assert store.add_to_collection("many", ids[:3] + ["img/extra.png"], user="ben") == 1
    assert store.remove_from_collection("many", ids, user="ben") == 70_000
    assert store.collection_samples("many") == ["img/extra.png"]
    store.close()


def _long_input_cases() -> list[tuple[str, object]]:
    long_name = "n" * (MAX_NAME_CHARS + 1)
    long_id = "i" * (MAX_SAMPLE_ID_BYTES + 1)
    wide_id = "图" * 400  # 400 characters but 1,200 bytes of UTF-8: too long for PostgreSQL's index
    return [
        ("tag", lambda s: s.add_tag(["a"], long_name, user="ana")),
        ("user name", lambda s: s.add_tag(["a"], "t", user=long_name)),
        ("collection name", lambda s: s.create_collection(long_name, user="ana")),
        ("collection name", lambda s: s.add_to_collection(long_name, ["a"], user="ana")),
        ("user name", lambda s: s.record_decision("a", "keep", user=long_name)),
        ("new label", lambda s: s.record_decision("a", "relabel", user="ana", new_label=long_name)),
        ("sample id #2", lambda s: s.add_tag(["a", long_id], "t", user="ana")),
        ("sample id #1", lambda s: s.add_tag([wide_id], "t", user="ana")),
        ("sample id #1", lambda s: s.record_decision(long_id, "keep", user="ana")),
        ("sample id #1", lambda s: s.remove_tag([long_id], "t", user="ana")),
        ("sample id #1", lambda s: s.create_collection("c", user="ana", sample_ids=[wide_id])),
    ]


def test_long_names_and_ids_behave_the_same_on_every_backend(db_url):
    store = CurationStore(db_url)
    # At the limits: stored and read back exactly.
    name = "n" * MAX_NAME_CHARS
    longest_id = "i" * MAX_SAMPLE_ID_BYTES
    widest_id = "图" * (MAX_SAMPLE_ID_BYTES // 3)  # 1,023 bytes
    assert store.add_tag([longest_id, widest_id], name, user=name) == 2
    assert store.samples_with_tag(name) == sorted([longest_id, widest_id])
    store.create_collection(name, user=name, sample_ids=[widest_id])
    assert store.collection(name)["members"] == [widest_id]
    store.record_decision(longest_id, "relabel", user=name, new_label=name, note="x" * 10_000)
    assert store.decision_history(longest_id)[0]["new_label"] == name
    before = store.counts()
    # One past the limits: a clear error naming the field and the limit, nothing written.
    for field, call in _long_input_cases():
        with pytest.raises(CurationInputError) as caught:
            call(store)
        message = str(caught.value)
        assert message.startswith(field), message
        assert str(MAX_NAME_CHARS) in message or f"{MAX_SAMPLE_ID_BYTES:,}" in message, message
        assert isinstance(caught.value, ValidationError) and isinstance(caught.value, ValueError)
    assert store.counts() == before
    with store.engine.connect() as conn:
        audit_rows = conn.execute(select(func.count()).select_from(curation.audit_log)).scalar_one()
    assert audit_rows == 3
    store.close()


def test_empty_and_non_text_input_is_refused(db_url):
    store = CurationStore(db_url)
    with pytest.raises(CurationInputError, match="sample id #2 is empty"):
        store.add_tag(["a", ""], "t", user="ana")
    with pytest.raises(CurationInputError, match="sample id #1 must be text, got int"):
        store.add_to_collection("x", [3], user="ana")
    with pytest.raises(CurationInputError, match="user name must not be empty"):
        store.add_tag(["a"], "t", user="  ")
    with pytest.raises(CurationInputError, match="no collection named 'nope'"):
        store.add_to_collection("nope", ["a"], user="ana")
    assert store.add_tag("img/one.png", "t", user="ana") == 1  # one id, not its characters
    assert store.samples_with_tag("t") == ["img/one.png"]
    store.close()


def _lost_race(dialect: str) -> OperationalError:
    """The error a driver raises when a transaction lost a race: what the retry helper must retry."""
    if dialect == "postgresql":
        import psycopg

        return OperationalError(
            "INSERT …", {}, psycopg.errors.SerializationFailure("could not serialize access due to concurrent update")
        )
    return OperationalError("INSERT …", {}, sqlite3.OperationalError("database is locked"))


def test_a_write_that_lost_a_race_is_retried_whole(db_url, monkeypatch):
    store = CurationStore(db_url)
    store.add_tag(["a"], "t", user="ana")
    real = curation._insert_missing
    failures = iter([True, True])  # the first two tries lose a race after writing part of their work

    def racing(conn, *args, **kwargs):
        added = real(conn, *args, **kwargs)
        if next(failures, False):
            raise _lost_race(conn.dialect.name)
        return added

    monkeypatch.setattr(curation, "_insert_missing", racing)
    monkeypatch.setattr(curation, "BACKOFF_BASE_S", 0.001)
    assert store.add_tag(["a", "b", "c"], "t", user="ben") == 2  # the rolled-back tries counted nothing
    assert store.samples_with_tag("t") == ["a", "b", "c"]
    with store.engine.connect() as conn:
        audits = conn.execute(text("SELECT created_by, details FROM audit_log ORDER BY id")).all()
    assert [(a, json.loads(d)["count"]) for a, d in audits] == [("ana", 1), ("ben", 2)]

    def always_losing(conn, *args, **kwargs):
        real(conn, *args, **kwargs)
        raise _lost_race(conn.dialect.name)

    monkeypatch.setattr(curation, "_insert_missing", always_losing)
    with pytest.raises(CurationConflictError, match="nothing was saved"):
        store.add_tag(["d"], "t", user="ben")
    assert store.samples_with_tag("t") == ["a", "b", "c"]
    store.close()


def test_a_permanent_database_error_is_not_retried(tmp_path, monkeypatch):
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    calls = []

    def broken(conn, *args, **kwargs):
        calls.append(1)
        raise OperationalError("INSERT …", {}, sqlite3.OperationalError("database or disk is full"))

    monkeypatch.setattr(curation, "_insert_missing", broken)
    with pytest.raises(curation.CurationDatabaseError, match="disk is full.*nothing was saved"):
        store.add_tag(["a"], "t", user="ana")
    assert len(calls) == 1
    store.close()


def test_unreachable_or_driverless_database_is_a_clear_error(tmp_path):
    with pytest.raises(curation.CurationDatabaseError, match="cannot open the curation database"):
        CurationStore(f"sqlite:///{tmp_path / 'missing-folder' / 'curation.db'}")
    with pytest.raises(curation.CurationDatabaseError, match="'not a url' is not a database URL"):
        CurationStore("not a url")
    with pytest.raises(curation.CurationDatabaseError, match="credentials> is not a database URL") as caught:
        CurationStore("postgresql+psycopg://ana:secret@host:port/db")
    assert "secret" not in str(caught.value)
    with pytest.raises(curation.CurationDatabaseError, match=r"cannot open.*\*\*\*") as caught:
        CurationStore("postgresql+psycopg://ana:secret@127.0.0.1:1/db")  # nothing listens on port 1
    assert "secret" not in str(caught.value)
    if importlib.util.find_spec("psycopg2") is None:  # not a dependency: stands for a driver not installed
        with pytest.raises(curation.CurationDatabaseError, match=r"driver .* not installed .*robustlens\[postgres\]"):
            CurationStore("postgresql+psycopg2://ana@127.0.0.1/db")


def test_chunk_boundaries_count_every_row_once(db_url, monkeypatch):
    """Tiny chunks, so every statement of a call is split many times: counts and contents still exact."""
    monkeypatch.setattr(curation, "MAX_BIND_PARAMS", 20)  # 5 rows of 4 columns per insert
    monkeypatch.setattr(curation, "IN_CHUNK", 7)
    monkeypatch.setattr(curation, "ARRAY_CHUNK", 7)
    store = CurationStore(db_url)
    ids = [f"x{i:03d}" for i in range(53)]
    assert store.add_tag(ids[::2], "t", user="ana") == 27
    assert store.add_tag(ids, "t", user="ben") == 26
    assert store.samples_with_tag("t") == ids
    assert store.remove_tag(ids[10:40] + ["nope"], "t", user="ana") == 30
    assert store.samples_with_tag("t") == ids[:10] + ids[40:]
    store.create_collection("c", user="ana", sample_ids=ids[::3])
    assert store.add_to_collection("c", ids, user="ben") == 53 - 18
    assert store.remove_from_collection("c", ids[5:], user="ben") == 48
    assert store.collection_samples("c") == ids[:5]
    store.close()


# -- the dashboard: a write that cannot be saved is a message, not a traceback ------------------------------
def test_review_page_reports_a_lost_write_instead_of_a_traceback(analysed_workspace, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from robustlens.analysis.workspace import Workspace

    def conflicted(self, sample_id, action, **kwargs):
        raise CurationConflictError(
            f"could not record the decision on '{sample_id}': other reviewers were "
            "writing the same records; nothing was saved — try again"
        )

    monkeypatch.setattr(CurationStore, "record_decision", conflicted)
    monkeypatch.setenv("ROBUSTLENS_WORKSPACE", str(analysed_workspace))
    app = AppTest.from_file(
        str(Path(__file__).resolve().parents[1] / "robustlens" / "dashboard" / "app.py"), default_timeout=60
    ).run()
    app.switch_page("views/review.py").run()
    app.text_input(key="review.name").set_value("rita")
    app.form_submit_button[0].click().run()
    app.button(key="review.keep").click().run()
    assert not app.exception, [e.value for e in app.exception]
    errors = [e.value for e in app.error]
    assert any("nothing was saved" in e and "Not saved" in e for e in errors), errors
    assert not any("Saved:" in s.value for s in app.success)
    store = Workspace(analysed_workspace).curation()
    assert store.decisions() == []
    store.close()


def test_a_missing_postgres_server_fails_under_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    from tests import pg

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="PostgreSQL tests need the binaries"):
        pg._unavailable("the binaries")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="make test` installs Debian's postgresql"):
        pg._unavailable("the binaries")
    (tmp_path / "initdb").touch()
    (tmp_path / "pg_ctl").touch()
    monkeypatch.setenv("PG_BIN_DIR", str(tmp_path))
    assert pg.find_bin_dir() == tmp_path


def test_an_up_to_date_read_only_database_opens_for_reading(tmp_path):
    """Opening a database at the current schema only reads it; writing to a read-only one is a clear error."""
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    store.add_tag(["a"], "t", user="ana")
    store.close()
    reader = CurationStore(f"sqlite:///file:{tmp_path / 'curation.db'}?mode=ro&uri=true")
    assert reader.samples_with_tag("t") == ["a"] and reader.schema_version == curation.SCHEMA_VERSION
    with pytest.raises(curation.CurationDatabaseError, match="readonly database; nothing was saved"):
        reader.add_tag(["b"], "t", user="ana")
    reader.close()


# -- display-safe names (issue 9: names validated against a safe pattern) -----------------------------------------
_INVISIBLE = [
    "\t",
    "\n",
    "\r",
    "\x00",
    "\x7f",
    "\x85",
    "\u202a",
    "\u202b",
    "\u202c",
    "\u202d",
    "\u202e",
    "\u2066",
    "\u2067",
    "\u2068",
    "\u2069",
    "\u200b",
    "\u200c",
    "\u200d",
    "\u200e",
    "\u2060",
    "\ufeff",
    "\u2028",
    "\u00a0",
    "\ue000",
]


def test_names_must_be_display_safe_on_every_backend(db_url):
    """Tags, collections and user names: printable text without control, bidi or zero-width characters
    and without surrounding spaces; punctuation and markup stay allowed (rendering is escaped everywhere)."""
    store = CurationStore(db_url)
    friendly = ["dark coats, frozen", "<b>bold</b> *x* [y](http://e/z) #1 | a&b", "Zoë's 图像 🙂", "=1+1", "a" * 200]
    for name in friendly:  # stored and read back exactly
        assert store.add_tag(["img/a.png"], name, user=name) == 1
        store.create_collection(name, user="ana", sample_ids=["img/a.png"])
        store.record_decision("img/a.png", "keep", user=name)
    assert set(friendly) <= set(store.tag_counts()) and set(friendly) <= set(store.collection_names())
    assert {d["created_by"] for d in store.decisions(latest_only=False)} == set(friendly)
    assert store.add_tag(["img/b.png"], "  padded  ", user=" ana ") == 1  # tags and users: stripped
    assert "padded" in store.tag_counts()
    before = store.counts()
    calls = [
        ("tag", lambda bad: store.add_tag(["img/a.png"], bad, user="ana")),
        ("user name", lambda bad: store.add_tag(["img/a.png"], "t", user=bad)),
        ("collection name", lambda bad: store.create_collection(bad, user="ana")),
        ("user name", lambda bad: store.record_decision("img/a.png", "keep", user=bad)),
    ]
    for field, call in calls:
        for char in _INVISIBLE:
            with pytest.raises(CurationInputError) as caught:
                call(f"ok{char}name")
            message = str(caught.value)
            assert message.startswith(field) and f"U+{ord(char):04X}" in message, message
            assert isinstance(caught.value, ValidationError)
    with pytest.raises(CurationInputError, match="user name ' ann' is not allowed: it starts or ends with a space"):
        store.record_decision("img/a.png", "keep", user=" ann")
    assert store.counts() == before  # nothing written by a refused call
    # A name stored before the rule can still be looked up and cleaned up.
    with store.engine.begin() as conn:
        conn.execute(
            curation.collections.insert().values(
                name="old\tname", description="", created_by="x", created_at=curation._now()
            )
        )
    assert store.add_to_collection("old\tname", ["img/a.png"], user="ana") == 1
    store.delete_collection("old\tname", user="ana")
    assert "old\tname" not in store.collection_names()
    store.close()


def test_check_name_accepts_exactly_the_display_safe_names():
    """Property: an accepted name is printable, without surrounding spaces, at most MAX_NAME_CHARS characters;
    a refused one gets a message naming the field."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from robustlens.analysis.curation import check_name

    @settings(max_examples=400, deadline=None, derandomize=True)
    @given(
        value=st.one_of(
            st.text(max_size=30),
            st.text(min_size=195, max_size=205),
            st.sampled_from(["dark coats, frozen", " x ", "a\u202eb", "\u2066x\u2069", "a\u200db"]),
        ),
        strip=st.booleans(),
    )
    def check(value, strip):
        try:
            name = check_name("collection name", value, strip=strip)
        except CurationInputError as exc:
            assert str(exc).startswith("collection name"), str(exc)
            expected_ok = value.strip() if strip else value
            assert (
                not expected_ok.strip()
                or len(expected_ok) > MAX_NAME_CHARS
                or not expected_ok.isprintable()
                or expected_ok != expected_ok.strip()
            )
            return
        assert name == (value.strip() if strip else value)
        assert 0 < len(name) <= MAX_NAME_CHARS and name.isprintable() and name == name.strip()

    check()


# -- renaming and deleting tags ----------------------------------------------------------------------------------
def test_rename_tag_moves_samples_and_rewrites_saved_filters(db_url):
    store = CurationStore(db_url)
    try:
        store.add_tag(["a", "b", "c"], "blurry", user="ann")
        store.create_collection("blurry ones", user="ann", filter_spec={"tags": ["blurry", "dark"]})
        store.create_collection("fixed list", user="ann", sample_ids=["a"])
        assert store.rename_tag("blurry", "out of focus", user="bob") == 3
        assert store.tag_counts() == {"out of focus": 3}
        assert store.samples_with_tag("out of focus") == ["a", "b", "c"]
        assert store.collection("blurry ones")["filter"]["tags"] == ["out of focus", "dark"]
        assert store.collection_samples("fixed list") == ["a"]
        # Into an existing tag: the two merge, each sample once, the earlier tagger kept.
        store.add_tag(["c", "d"], "review", user="cy")
        assert store.rename_tag("out of focus", "review", user="bob") == 4
        assert store.tag_counts() == {"review": 4}
        attributed = dict(
            (sid, by)
            for sid, by in store.engine.connect().execute(
                select(curation.sample_tags.c.sample_id, curation.sample_tags.c.created_by)
            )
        )
        assert attributed == {"a": "ann", "b": "ann", "c": "cy", "d": "cy"}
        assert store.collection("blurry ones")["filter"]["tags"] == ["review", "dark"]
        with pytest.raises(CurationInputError, match="no tag named 'gone'"):
            store.rename_tag("gone", "x", user="bob")
        with pytest.raises(CurationInputError, match="already has that name"):
            store.rename_tag("review", "review", user="bob")
        with pytest.raises(CurationInputError, match="new tag name"):
            store.rename_tag("review", "bad\u202ename", user="bob")
        actions = [r[0] for r in store.engine.connect().execute(select(curation.audit_log.c.action)) if "tag" in r[0]]
        assert actions.count("rename_tag") == 2
    finally:
        store.close()


def test_delete_tag_refuses_while_a_saved_filter_selects_it(db_url):
    store = CurationStore(db_url)
    try:
        store.add_tag(["a", "b"], "keep", user="ann")
        store.add_tag(["a"], "scratch", user="ann")
        store.create_collection("kept", user="ann", filter_spec={"tags": ["keep"]})
        with pytest.raises(CurationInputError, match="saved filter.*'kept'"):
            store.delete_tag("keep", user="bob")
        assert store.tag_counts() == {"keep": 2, "scratch": 1}  # nothing changed
        assert store.delete_tag("scratch", user="bob") == 1
        assert store.tag_counts() == {"keep": 2}
        assert store.tags_of("a") == ["keep"]
        with pytest.raises(CurationInputError, match="no tag named 'scratch'"):
            store.delete_tag("scratch", user="bob")
    finally:
        store.close()
