"""The curation database: tags, collections, review decisions and the audit log.

It is the only mutable state of a workspace. SQLAlchemy Core over a SQLite file by default (WAL mode,
so browsers reading while a reviewer writes do not block each other), or any SQLAlchemy URL — e.g.
``postgresql+psycopg://user@host/db`` — for a team server. The schema carries a version number and
:func:`migrate` brings an older database up to date; every write runs in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import (Column, DateTime, ForeignKey, Integer, MetaData, String, Table, Text, create_engine,
                        delete, event, func, insert, select)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from robustlens.errors import WorkspaceError

SCHEMA_VERSION = 1
REVIEW_ACTIONS = ("relabel", "keep", "ambiguous", "exclude")

metadata = MetaData()

schema_info = Table(
    "schema_info", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)
tags = Table(
    "tags", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
sample_tags = Table(
    "sample_tags", metadata,
    Column("sample_id", String(1024), primary_key=True),
    Column("tag_id", Integer, ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
collections = Table(
    "collections", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    # NULL for a static list; a JSON filter for a saved filter that re-evaluates.
    Column("filter_json", Text, nullable=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
collection_members = Table(
    "collection_members", metadata,
    Column("collection_id", Integer, ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True),
    Column("sample_id", String(1024), primary_key=True),
    Column("added_by", String(200), nullable=False),
    Column("added_at", DateTime(timezone=True), nullable=False),
)
review_decisions = Table(
    "review_decisions", metadata,
    # Append-only: the latest row per sample is its current decision; older rows are its history.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sample_id", String(1024), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("new_label", String(200), nullable=True),
    Column("reviewer", String(200), nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
audit_log = Table(
    "audit_log", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("actor", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("details", Text, nullable=False),
)

# Version → function bringing a database of that version to the next one. Empty while there is one version.
MIGRATIONS: dict[int, object] = {}


def _now() -> datetime:
    return datetime.now(UTC)


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL mode, a busy timeout and foreign keys."""
    is_sqlite = url.startswith("sqlite")
    engine = create_engine(url, future=True, connect_args={"timeout": 30} if is_sqlite else {})
    if is_sqlite:
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # pragma: no cover - exercised via every connection
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    return engine


def migrate(engine: Engine) -> int:
    """Create missing tables and apply pending migrations; returns the schema version now in force."""
    metadata.create_all(engine)
    with engine.begin() as conn:
        row = conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).first()
        if row is None:
            conn.execute(insert(schema_info).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise WorkspaceError(f"the curation database has schema version {version}, newer than this "
                                 f"robustlens supports ({SCHEMA_VERSION}); upgrade robustlens")
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](conn)  # type: ignore[operator]
            version += 1
            conn.execute(schema_info.update().where(schema_info.c.key == "schema_version").values(value=str(version)))
        return version


class CurationStore:
    """Repository over the curation database; the one place that writes curation state.

    Parameters
    ----------
    url:
        SQLAlchemy database URL.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.schema_version = migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def _audit(self, conn, actor: str, action: str, details: dict) -> None:
        conn.execute(insert(audit_log).values(at=_now(), actor=actor, action=action,
                                              details=json.dumps(details, default=str)))

    def _tag_id(self, conn, name: str, user: str) -> int:
        found = conn.execute(select(tags.c.id).where(tags.c.name == name)).scalar()
        if found is not None:
            return int(found)
        try:
            with conn.begin_nested():
                return int(conn.execute(insert(tags).values(name=name, created_by=user, created_at=_now()))
                           .inserted_primary_key[0])
        except IntegrityError:
            # Another reviewer created the same tag between our select and insert.
            return int(conn.execute(select(tags.c.id).where(tags.c.name == name)).scalar_one())

    def add_tag(self, sample_ids: Iterable[str], tag: str, *, user: str) -> int:
        """Tag samples; returns how many samples newly got the tag. Existing tags are left as they are."""
        tag = tag.strip()
        if not tag:
            raise ValueError("tag name must not be empty")
        ids = list(dict.fromkeys(sample_ids))
        with self.engine.begin() as conn:
            tag_id = self._tag_id(conn, tag, user)
            existing = {r[0] for r in conn.execute(select(sample_tags.c.sample_id).where(sample_tags.c.tag_id == tag_id))}
            new = [sid for sid in ids if sid not in existing]
            if new:
                now = _now()
                conn.execute(insert(sample_tags).prefix_with("OR IGNORE", dialect="sqlite"),
                             [{"sample_id": sid, "tag_id": tag_id, "created_by": user, "created_at": now} for sid in new])
            self._audit(conn, user, "tag", {"tag": tag, "count": len(new)})
        return len(new)

    def remove_tag(self, sample_ids: Iterable[str], tag: str, *, user: str) -> int:
        """Remove a tag from samples; returns how many lost it."""
        ids = list(sample_ids)
        with self.engine.begin() as conn:
            tag_id = conn.execute(select(tags.c.id).where(tags.c.name == tag)).scalar()
            if tag_id is None:
                return 0
            removed = conn.execute(delete(sample_tags).where(sample_tags.c.tag_id == tag_id,
                                                             sample_tags.c.sample_id.in_(ids))).rowcount
            self._audit(conn, user, "untag", {"tag": tag, "count": removed})
        return int(removed)

    def tag_counts(self) -> dict[str, int]:
        """Tag name → number of tagged samples."""
        query = (select(tags.c.name, func.count(sample_tags.c.sample_id))
                 .select_from(tags.outerjoin(sample_tags)).group_by(tags.c.name).order_by(tags.c.name))
        with self.engine.connect() as conn:
            return {name: int(count) for name, count in conn.execute(query)}

    def samples_with_tag(self, tag: str) -> list[str]:
        query = select(sample_tags.c.sample_id).join(tags).where(tags.c.name == tag).order_by(sample_tags.c.sample_id)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def create_collection(self, name: str, *, user: str, description: str = "",
                          sample_ids: Iterable[str] = (), filter_spec: dict | None = None) -> int:
        """Create a collection: a static list of samples, or a saved filter (``filter_spec``)."""
        name = name.strip()
        if not name:
            raise ValueError("collection name must not be empty")
        with self.engine.begin() as conn:
            try:
                with conn.begin_nested():
                    collection_id = int(conn.execute(insert(collections).values(
                        name=name, description=description, created_by=user, created_at=_now(),
                        filter_json=json.dumps(filter_spec) if filter_spec is not None else None)).inserted_primary_key[0])
            except IntegrityError as exc:
                raise ValueError(f"a collection named '{name}' already exists") from exc
            ids = list(dict.fromkeys(sample_ids))
            if ids:
                now = _now()
                conn.execute(insert(collection_members), [{"collection_id": collection_id, "sample_id": sid,
                                                           "added_by": user, "added_at": now} for sid in ids])
            self._audit(conn, user, "create_collection", {"name": name, "count": len(ids)})
        return collection_id

    def collection_samples(self, name: str) -> list[str]:
        query = (select(collection_members.c.sample_id).join(collections)
                 .where(collections.c.name == name).order_by(collection_members.c.sample_id))
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def collection_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(collections.c.name).order_by(collections.c.name))]

    def record_decision(self, sample_id: str, action: str, *, reviewer: str, new_label: str | None = None,
                        note: str = "") -> None:
        """Append a review decision (``relabel`` needs ``new_label``)."""
        if action not in REVIEW_ACTIONS:
            raise ValueError(f"action must be one of {REVIEW_ACTIONS}, got '{action}'")
        if action == "relabel" and not new_label:
            raise ValueError("a relabel decision needs new_label")
        if not reviewer.strip():
            raise ValueError("reviewer name must not be empty")
        with self.engine.begin() as conn:
            conn.execute(insert(review_decisions).values(sample_id=sample_id, action=action, new_label=new_label,
                                                         reviewer=reviewer, note=note, created_at=_now()))
            self._audit(conn, reviewer, "review", {"sample_id": sample_id, "action": action, "new_label": new_label})

    def decisions(self, *, latest_only: bool = True) -> list[dict]:
        """Review decisions, oldest first; with ``latest_only`` one (the newest) per sample."""
        with self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(select(review_decisions).order_by(review_decisions.c.id))]
        if latest_only:
            latest = {r["sample_id"]: r for r in rows}
            rows = sorted(latest.values(), key=lambda r: r["id"])
        return rows

    def counts(self) -> dict[str, int]:
        """Numbers of tags, tagged samples, collections and decisions, for summaries."""
        with self.engine.connect() as conn:
            return {
                "tags": int(conn.execute(select(func.count()).select_from(tags)).scalar_one()),
                "tag_assignments": int(conn.execute(select(func.count()).select_from(sample_tags)).scalar_one()),
                "collections": int(conn.execute(select(func.count()).select_from(collections)).scalar_one()),
                "review_decisions": int(conn.execute(select(func.count()).select_from(review_decisions)).scalar_one()),
            }

    # -- added for the dashboard: collection membership, per-sample lookups ------------------------
    def collection(self, name: str) -> dict | None:
        """One collection: name, description, ``filter`` (dict or ``None``), ``members`` (ids), creator and time."""
        with self.engine.connect() as conn:
            row = conn.execute(select(collections).where(collections.c.name == name)).first()
            if row is None:
                return None
            members = [r[0] for r in conn.execute(select(collection_members.c.sample_id)
                                                  .where(collection_members.c.collection_id == row.id)
                                                  .order_by(collection_members.c.sample_id))]
        return {"name": row.name, "description": row.description,
                "filter": json.loads(row.filter_json) if row.filter_json else None,
                "members": members, "created_by": row.created_by, "created_at": row.created_at}

    def collections_overview(self) -> list[dict]:
        """Every collection (by name): name, description, kind (``static`` / ``saved filter``), filter, size, creator."""
        query = (select(collections, func.count(collection_members.c.sample_id).label("size"))
                 .select_from(collections.outerjoin(collection_members))
                 .group_by(collections.c.id).order_by(collections.c.name))
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [{"name": r.name, "description": r.description,
                 "kind": "saved filter" if r.filter_json else "static",
                 "filter": json.loads(r.filter_json) if r.filter_json else None,
                 "members": int(r.size), "created_by": r.created_by, "created_at": r.created_at} for r in rows]

    def _collection_id(self, conn, name: str) -> int:
        found = conn.execute(select(collections.c.id).where(collections.c.name == name)).scalar()
        if found is None:
            raise ValueError(f"no collection named '{name}'")
        return int(found)

    def add_to_collection(self, name: str, sample_ids: Iterable[str], *, user: str) -> int:
        """Add samples to a collection; returns how many were not in it yet."""
        ids = list(dict.fromkeys(sample_ids))
        with self.engine.begin() as conn:
            collection_id = self._collection_id(conn, name)
            existing = {r[0] for r in conn.execute(select(collection_members.c.sample_id)
                                                   .where(collection_members.c.collection_id == collection_id))}
            new = [sid for sid in ids if sid not in existing]
            if new:
                now = _now()
                conn.execute(insert(collection_members).prefix_with("OR IGNORE", dialect="sqlite"),
                             [{"collection_id": collection_id, "sample_id": sid, "added_by": user, "added_at": now}
                              for sid in new])
            self._audit(conn, user, "add_to_collection", {"name": name, "count": len(new)})
        return len(new)

    def remove_from_collection(self, name: str, sample_ids: Iterable[str], *, user: str) -> int:
        """Remove samples from a collection; returns how many left it."""
        ids = list(sample_ids)
        with self.engine.begin() as conn:
            collection_id = self._collection_id(conn, name)
            removed = conn.execute(delete(collection_members).where(
                collection_members.c.collection_id == collection_id,
                collection_members.c.sample_id.in_(ids))).rowcount
            self._audit(conn, user, "remove_from_collection", {"name": name, "count": removed})
        return int(removed)

    def delete_collection(self, name: str, *, user: str) -> None:
        """Delete a collection and its membership list (the samples themselves are untouched)."""
        with self.engine.begin() as conn:
            collection_id = self._collection_id(conn, name)
            conn.execute(delete(collection_members).where(collection_members.c.collection_id == collection_id))
            conn.execute(delete(collections).where(collections.c.id == collection_id))
            self._audit(conn, user, "delete_collection", {"name": name})

    def tag_assignments(self) -> list[tuple[str, str]]:
        """Every ``(sample_id, tag)`` pair, ordered by tag then sample."""
        query = (select(sample_tags.c.sample_id, tags.c.name).join(tags)
                 .order_by(tags.c.name, sample_tags.c.sample_id))
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(query)]

    def tags_of(self, sample_id: str) -> list[str]:
        """Tags of one sample, sorted."""
        query = select(tags.c.name).join(sample_tags).where(sample_tags.c.sample_id == sample_id).order_by(tags.c.name)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def decision_history(self, sample_id: str) -> list[dict]:
        """Every decision recorded for one sample, oldest first."""
        query = select(review_decisions).where(review_decisions.c.sample_id == sample_id).order_by(review_decisions.c.id)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
