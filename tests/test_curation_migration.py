"""Schema version 1 → 2 of the curation database ("one name per concept"), on SQLite and on a real PostgreSQL.

A database is built with the version-1 DDL exactly as robustlens wrote it before (raw SQL below: the person
was ``added_by`` / ``reviewer`` / ``actor`` and the time ``added_at`` / ``at`` in three tables), filled with
tags, collections (a static list and a saved filter), review decisions with their history and audit rows,
then opened with today's :class:`CurationStore`. Every row must survive with its attribution and time, under
the new column names; the upgrade is idempotent, atomic (a failing step leaves version 1 untouched), safe
when several processes open the old database at once, and the upgraded database keeps working.

The PostgreSQL server comes from ``tests/pg.py`` (Debian's binaries, started by the test session).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text

from robustlens.analysis import curation
from robustlens.analysis.curation import (
    COLLECTION_KINDS,
    SAVED_FILTER,
    SCHEMA_VERSION,
    STATIC,
    CurationDatabaseError,
    CurationInputError,
    CurationStore,
)
from robustlens.errors import RobustlensError, ValidationError, WorkspaceError

#: The version-1 schema, as ``metadata.create_all`` emitted it (``{serial}``: the autoincrement key type,
#: ``{timestamp}``: ``DateTime(timezone=True)``, per backend).
V1_DDL = """
CREATE TABLE schema_info ("key" VARCHAR(64) NOT NULL, value VARCHAR(256) NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE tags (id {serial} NOT NULL, name VARCHAR(200) NOT NULL, created_by VARCHAR(200) NOT NULL,
    created_at {timestamp} NOT NULL, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE sample_tags (sample_id VARCHAR(1024) NOT NULL, tag_id INTEGER NOT NULL,
    created_by VARCHAR(200) NOT NULL, created_at {timestamp} NOT NULL, PRIMARY KEY (sample_id, tag_id),
    FOREIGN KEY(tag_id) REFERENCES tags (id) ON DELETE CASCADE);
CREATE TABLE collections (id {serial} NOT NULL, name VARCHAR(200) NOT NULL, description TEXT NOT NULL,
    filter_json TEXT, created_by VARCHAR(200) NOT NULL, created_at {timestamp} NOT NULL, PRIMARY KEY (id),
    UNIQUE (name));
CREATE TABLE collection_members (collection_id INTEGER NOT NULL, sample_id VARCHAR(1024) NOT NULL,
    added_by VARCHAR(200) NOT NULL, added_at {timestamp} NOT NULL, PRIMARY KEY (collection_id, sample_id),
    FOREIGN KEY(collection_id) REFERENCES collections (id) ON DELETE CASCADE);
CREATE TABLE review_decisions (id {serial} NOT NULL, sample_id VARCHAR(1024) NOT NULL,
    action VARCHAR(32) NOT NULL, new_label VARCHAR(200), reviewer VARCHAR(200) NOT NULL, note TEXT NOT NULL,
    created_at {timestamp} NOT NULL, PRIMARY KEY (id));
CREATE INDEX ix_review_decisions_sample_id ON review_decisions (sample_id);
CREATE TABLE audit_log (id {serial} NOT NULL, at {timestamp} NOT NULL, actor VARCHAR(200) NOT NULL,
    action VARCHAR(64) NOT NULL, details TEXT NOT NULL, PRIMARY KEY (id));
"""
TYPES = {
    "sqlite": {"serial": "INTEGER", "timestamp": "DATETIME"},
    "postgresql": {"serial": "SERIAL", "timestamp": "TIMESTAMP WITH TIME ZONE"},
}
V1_COLUMNS = {
    "collection_members": ["collection_id", "sample_id", "added_by", "added_at"],
    "review_decisions": ["id", "sample_id", "action", "new_label", "reviewer", "note", "created_at"],
    "audit_log": ["id", "at", "actor", "action", "details"],
}
V2_COLUMNS = {
    "collection_members": ["collection_id", "sample_id", "created_by", "created_at"],
    "review_decisions": ["id", "sample_id", "action", "new_label", "created_by", "note", "created_at"],
    "audit_log": ["id", "created_at", "created_by", "action", "details"],
}

T0 = datetime(2026, 11, 22, 9, 30, 0, tzinfo=UTC)


def _at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def _stored(moment: datetime, dialect: str) -> str:
    """``moment`` as the version-1 code stored it: SQLAlchemy's SQLite DATETIME text, a timestamptz literal."""
    if dialect == "sqlite":
        return moment.astimezone(UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
    return moment.isoformat()


def _utc(moment: datetime) -> datetime:
    """A time read back, as aware UTC (SQLite gives the naive UTC time it stored, PostgreSQL an aware one)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


# What the version-1 database holds: (id, name, created_by, minute).
TAGS = [(1, "blurry", "ana", 0), (2, "check again", "ben", 1)]
# (sample_id, tag_id, created_by, minute)
SAMPLE_TAGS = [("img/a.png", 1, "ana", 2), ("img/b.png", 1, "ben", 3), ("img/b.png", 2, "ben", 4)]
# (id, name, description, filter_json, created_by, minute)
COLLECTIONS = [
    (1, "dark coats", "too dark", None, "ana", 5),
    (2, "sandals", "saved", json.dumps({"labels": ["sandal"]}), "cleo", 6),
]
# (collection_id, sample_id, added_by, minute)
MEMBERS = [(1, "img/a.png", "ana", 7), (1, "img/c.png", "ben", 8)]
# (id, sample_id, action, new_label, reviewer, note, minute): img/a.png decided twice (history kept).
DECISIONS = [
    (1, "img/a.png", "relabel", "coat", "ana", "looks like a coat", 9),
    (2, "img/b.png", "keep", None, "ben", "", 10),
    (3, "img/a.png", "ambiguous", None, "cleo", "not sure after all", 11),
]
# (id, minute, actor, action, details)
AUDIT = [
    (1, 0, "ana", "tag", {"tag": "blurry", "count": 1}),
    (2, 3, "ben", "tag", {"tag": "blurry", "count": 1}),
    (3, 5, "ana", "create_collection", {"name": "dark coats", "count": 1}),
    (4, 9, "ana", "review", {"sample_id": "img/a.png", "action": "relabel", "new_label": "coat"}),
]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> Iterator[str]:
    """An empty database on each backend (PostgreSQL: a fresh database on the session's real server)."""
    if request.param == "postgresql":
        yield request.getfixturevalue("postgres_url")
    else:
        yield f"sqlite:///{tmp_path / 'curation.db'}"


def build_v1_database(url: str) -> None:
    """Create the version-1 schema with raw DDL and fill it, as robustlens before issue 11 left it."""
    engine = create_engine(url)
    dialect = engine.dialect.name
    try:
        with engine.begin() as conn:
            for statement in V1_DDL.format(**TYPES[dialect]).split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)
            conn.execute(text("INSERT INTO schema_info (\"key\", value) VALUES ('schema_version', '1')"))
            for tag_id, name, user, minute in TAGS:
                conn.execute(
                    text("INSERT INTO tags (id, name, created_by, created_at) VALUES (:i, :n, :u, :t)"),
                    {"i": tag_id, "n": name, "u": user, "t": _stored(_at(minute), dialect)},
                )
            for sid, tag_id, user, minute in SAMPLE_TAGS:
                conn.execute(
                    text("INSERT INTO sample_tags (sample_id, tag_id, created_by, created_at) VALUES (:s, :i, :u, :t)"),
                    {"s": sid, "i": tag_id, "u": user, "t": _stored(_at(minute), dialect)},
                )
            for cid, name, description, filter_json, user, minute in COLLECTIONS:
                conn.execute(
                    text(
                        "INSERT INTO collections (id, name, description, filter_json, created_by, "
                        "created_at) VALUES (:i, :n, :d, :f, :u, :t)"
                    ),
                    {
                        "i": cid,
                        "n": name,
                        "d": description,
                        "f": filter_json,
                        "u": user,
                        "t": _stored(_at(minute), dialect),
                    },
                )
            for cid, sid, user, minute in MEMBERS:
                conn.execute(
                    text(
                        "INSERT INTO collection_members (collection_id, sample_id, added_by, added_at) "
                        "VALUES (:c, :s, :u, :t)"
                    ),
                    {"c": cid, "s": sid, "u": user, "t": _stored(_at(minute), dialect)},
                )
            for did, sid, action, new_label, user, note, minute in DECISIONS:
                conn.execute(
                    text(
                        "INSERT INTO review_decisions (id, sample_id, action, new_label, reviewer, note, "
                        "created_at) VALUES (:i, :s, :a, :l, :u, :n, :t)"
                    ),
                    {
                        "i": did,
                        "s": sid,
                        "a": action,
                        "l": new_label,
                        "u": user,
                        "n": note,
                        "t": _stored(_at(minute), dialect),
                    },
                )
            for aid, minute, user, action, details in AUDIT:
                conn.execute(
                    text("INSERT INTO audit_log (id, at, actor, action, details) VALUES (:i, :t, :u, :a, :d)"),
                    {"i": aid, "t": _stored(_at(minute), dialect), "u": user, "a": action, "d": json.dumps(details)},
                )
            if dialect == "postgresql":  # explicit ids above: move the sequences past them, as a live v1 had
                for table in ("tags", "collections", "review_decisions", "audit_log"):
                    conn.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
                    )
    finally:
        engine.dispose()


def columns(url: str) -> dict[str, list[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            return {table: [c["name"] for c in inspector.get_columns(table)] for table in V1_COLUMNS}
    finally:
        engine.dispose()


def stored_version(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            query = text("SELECT value FROM schema_info WHERE \"key\" = 'schema_version'")
            return int(conn.execute(query).scalar_one())
    finally:
        engine.dispose()


def assert_v1_rows_survived(store: CurationStore) -> None:
    """Every version-1 row is there, under the new names, with its attribution and time (rows written since are
    left out of the comparison)."""
    db = curation
    with store.engine.connect() as conn:  # typed selects over today's tables: times come back as datetimes
        tags = conn.execute(
            select(db.tags.c.id, db.tags.c.name, db.tags.c.created_by, db.tags.c.created_at)
            .where(db.tags.c.id <= len(TAGS))
            .order_by(db.tags.c.id)
        ).all()
        sample_tags = conn.execute(
            select(
                db.sample_tags.c.sample_id,
                db.sample_tags.c.tag_id,
                db.sample_tags.c.created_by,
                db.sample_tags.c.created_at,
            ).order_by(db.sample_tags.c.tag_id, db.sample_tags.c.sample_id)
        ).all()
        cm = db.collection_members.c
        members = conn.execute(
            select(cm.collection_id, cm.sample_id, cm.created_by, cm.created_at).order_by(
                cm.collection_id, cm.sample_id
            )
        ).all()
        log = db.audit_log.c
        audit = conn.execute(
            select(log.id, log.created_at, log.created_by, log.action, log.details)
            .where(log.id <= len(AUDIT))
            .order_by(log.id)
        ).all()
    sample_tags = [r for r in sample_tags if (r[0], r[1]) in {(s, i) for s, i, _, _ in SAMPLE_TAGS}]
    members = [r for r in members if (r[0], r[1]) in {(c, s) for c, s, _, _ in MEMBERS}]
    assert [(i, n, u, _utc(t)) for i, n, u, t in tags] == [(i, n, u, _at(m)) for i, n, u, m in TAGS]
    assert [(s, i, u, _utc(t)) for s, i, u, t in sample_tags] == [
        (s, i, u, _at(m)) for s, i, u, m in sorted(SAMPLE_TAGS, key=lambda r: (r[1], r[0]))
    ]
    assert [(c, s, u, _utc(t)) for c, s, u, t in members] == [(c, s, u, _at(m)) for c, s, u, m in MEMBERS]
    assert [(i, _utc(t), u, a, json.loads(d)) for i, t, u, a, d in audit] == [
        (i, _at(m), u, a, d) for i, m, u, a, d in AUDIT
    ]
    history = [d for d in store.decisions(latest_only=False) if d["id"] <= len(DECISIONS)]
    assert [
        (d["id"], d["sample_id"], d["action"], d["new_label"], d["created_by"], d["note"], _utc(d["created_at"]))
        for d in history
    ] == [(i, s, a, label, u, n, _at(m)) for i, s, a, label, u, n, m in DECISIONS]


def assert_v1_api_view(store: CurationStore) -> None:
    """The version-1 content read through the API, under the one name per concept (before any new write)."""
    assert store.tag_counts() == {"blurry": 2, "check again": 1}
    assert store.samples_with_tag("blurry") == ["img/a.png", "img/b.png"]
    static, saved = store.collection("dark coats"), store.collection("sandals")
    assert static is not None and saved is not None
    assert (static["kind"], static["members"], static["size"], static["created_by"], _utc(static["created_at"])) == (
        STATIC,
        ["img/a.png", "img/c.png"],
        2,
        "ana",
        _at(5),
    )
    assert (saved["kind"], saved["filter"], saved["members"], saved["size"], saved["created_by"]) == (
        SAVED_FILTER,
        {"labels": ["sandal"]},
        [],
        0,
        "cleo",
    )
    assert len(store.decisions(latest_only=False)) == len(DECISIONS)
    assert [(d["sample_id"], d["created_by"]) for d in store.decisions()] == [
        ("img/b.png", "ben"),
        ("img/a.png", "cleo"),
    ]


def test_a_version_1_database_is_upgraded_and_keeps_every_row(db_url):
    build_v1_database(db_url)
    assert columns(db_url) == V1_COLUMNS and stored_version(db_url) == 1
    store = CurationStore(db_url)
    try:
        assert store.schema_version == SCHEMA_VERSION == 2
        assert columns(db_url) == V2_COLUMNS and stored_version(db_url) == 2
        assert_v1_rows_survived(store)
        assert_v1_api_view(store)
        # The upgraded database keeps working: new rows get the next ids and the same attribution columns.
        assert store.add_tag(["img/a.png", "img/d.png"], "check again", user="dora") == 2
        assert store.add_to_collection("dark coats", ["img/d.png"], user="dora") == 1
        store.record_decision("img/d.png", "relabel", user="dora", new_label="shirt")
        store.create_collection("after", user="dora", sample_ids=["img/e.png"])
        assert store.decisions(latest_only=False)[-1]["id"] == len(DECISIONS) + 1
        assert store.decision_history("img/d.png")[0]["created_by"] == "dora"
        assert store.collection("dark coats")["members"] == ["img/a.png", "img/c.png", "img/d.png"]
        with store.engine.connect() as conn:
            new_audit = conn.execute(
                text("SELECT id, created_by, action FROM audit_log WHERE id > :n ORDER BY id"), {"n": len(AUDIT)}
            ).all()
            member = conn.execute(text("SELECT created_by FROM collection_members WHERE sample_id = 'img/d.png'"))
            assert member.scalar_one() == "dora"
        assert [tuple(r) for r in new_audit] == [
            (5, "dora", "tag"),
            (6, "dora", "add_to_collection"),
            (7, "dora", "review"),
            (8, "dora", "create_collection"),
        ]
        assert_v1_rows_survived(store)  # the old rows untouched by the new writes
    finally:
        store.close()


def test_the_upgrade_is_idempotent(db_url):
    build_v1_database(db_url)
    CurationStore(db_url).close()
    again = CurationStore(db_url)  # a second open finds version 2 and changes nothing
    try:
        assert again.schema_version == 2 and columns(db_url) == V2_COLUMNS
        # Running the step itself once more (as a retried or repeated upgrade would) is a no-op too.
        with again.engine.begin() as conn:
            curation.MIGRATIONS[1](conn)
        assert columns(db_url) == V2_COLUMNS and stored_version(db_url) == 2
        assert_v1_rows_survived(again)
        assert_v1_api_view(again)
    finally:
        again.close()


def test_a_failing_upgrade_leaves_version_1_untouched(db_url, monkeypatch):
    """Every rename and the version bump commit together: a step that fails rolls all of them back."""
    build_v1_database(db_url)
    monkeypatch.setattr(curation, "RENAMED_IN_V2", (*curation.RENAMED_IN_V2, ("audit_log", "missing", "other")))
    with pytest.raises(CurationDatabaseError, match="table audit_log should have column 'missing'"):
        CurationStore(db_url)
    assert columns(db_url) == V1_COLUMNS and stored_version(db_url) == 1
    monkeypatch.undo()
    store = CurationStore(db_url)
    try:
        assert store.schema_version == 2
        assert_v1_rows_survived(store)
    finally:
        store.close()


def test_several_openers_of_a_version_1_database_at_once_upgrade_it_once(db_url):
    """Under the advisory lock (PostgreSQL) / write lock (SQLite) one opener (each with its own engine and
    connections) upgrades; the rest find version 2."""
    build_v1_database(db_url)
    openers = 6
    barrier = threading.Barrier(openers)
    versions: list[int] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            barrier.wait(timeout=30)
            store = CurationStore(db_url)
            versions.append(store.schema_version)
            store.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(openers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == [] and versions == [2] * openers
    store = CurationStore(db_url)
    try:
        assert columns(db_url) == V2_COLUMNS
        assert_v1_rows_survived(store)
    finally:
        store.close()


def test_a_newer_schema_is_refused_untouched(tmp_path):
    url = f"sqlite:///{tmp_path / 'curation.db'}"
    CurationStore(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE schema_info SET value = '99' WHERE \"key\" = 'schema_version'"))
    engine.dispose()
    with pytest.raises(WorkspaceError, match="schema version 99, newer than this robustlens supports"):
        CurationStore(url)
    assert stored_version(url) == 99


def test_a_read_only_version_1_database_is_a_clear_error(tmp_path):
    path = tmp_path / "curation.db"
    build_v1_database(f"sqlite:///{path}")
    with pytest.raises(CurationDatabaseError, match="cannot open the curation database .*readonly"):
        CurationStore(f"sqlite:///file:{path}?mode=ro&uri=true")
    assert columns(f"sqlite:///{Path(path)}") == V1_COLUMNS


# -- one name per concept in the API --------------------------------------------------------------------------
def test_collections_have_one_kind_vocabulary_and_members_is_always_a_list(tmp_path):
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    try:
        store.create_collection("static one", user="ana", sample_ids=["b", "a", "a"])
        store.create_collection("saved one", user="ben", filter_spec={"labels": ["coat"]})
        static, saved = store.collection("static one"), store.collection("saved one")
        assert (static["kind"], static["members"], static["size"]) == (STATIC, ["a", "b"], 2)
        assert (saved["kind"], saved["members"], saved["size"], saved["filter"]) == (
            SAVED_FILTER,
            [],
            0,
            {"labels": ["coat"]},
        )
        overview = {entry["name"]: entry for entry in store.collections_overview()}
        assert {entry["kind"] for entry in overview.values()} == set(COLLECTION_KINDS)
        for name, full in (("static one", static), ("saved one", saved)):
            summary = overview[name]
            assert isinstance(full["members"], list) and isinstance(summary["size"], int)
            assert summary == {k: v for k, v in full.items() if k != "members"}  # the count is "size", never "members"
    finally:
        store.close()


def test_bad_input_is_a_robustlens_error(tmp_path):
    store = CurationStore(f"sqlite:///{tmp_path / 'curation.db'}")
    try:
        cases = [
            lambda: store.create_collection("c", user="ana", filter_spec={"bad": object()}),
            lambda: store.create_collection("c", user="ana", filter_spec=["labels"]),  # type: ignore[arg-type]
            lambda: store.record_decision("img/a.png", "delete", user="ana"),
            lambda: store.record_decision("img/a.png", "keep", user=None),  # type: ignore[arg-type]
            lambda: store.add_to_collection("nope", ["a"], user="ana"),
        ]
        for call in cases:
            with pytest.raises(CurationInputError) as caught:
                call()
            assert isinstance(caught.value, ValidationError) and isinstance(caught.value, RobustlensError)
        assert store.collection_names() == [] and store.decisions() == []
    finally:
        store.close()
