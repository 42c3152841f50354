"""The curation database: tags, collections, review decisions and the audit log.

It is the only mutable state of a workspace. SQLAlchemy Core over a SQLite file by default (WAL mode,
so browsers reading while a user writes do not block each other), or any SQLAlchemy URL — e.g.
``postgresql+psycopg://user@host/db`` (``pip install 'robustlens[postgres]'``) — for a team server.
The schema carries a version number and :func:`migrate` brings an older database up to date.

One name per concept, in the tables and in the Python API alike:

* the person who wrote a row is the column ``created_by`` and the time the column ``created_at``, in every
  table (tags, sample tags, collections, collection members, review decisions, the audit log); the methods
  that write take that person as the keyword ``user``, and rows come back as dicts keyed by column name;
* a collection's ``kind`` is :data:`STATIC` (a list of samples) or :data:`SAVED_FILTER` (a filter that
  re-evaluates); its ``members`` is always the list of sample ids and ``size`` always their number.

Schema version 1 named the person ``added_by`` / ``reviewer`` / ``actor`` and the time ``added_at`` / ``at``
in some tables; :data:`MIGRATIONS` renames those columns in place (version 2), keeping every row.

Correct on every backend, with many users writing at once:

* Every write runs in one transaction (:meth:`CurationStore._write`); on SQLite it takes the write lock
  up front (``BEGIN IMMEDIATE``). A transaction that loses a race — a serialization failure, a deadlock,
  a unique or foreign-key violation from a concurrent writer, a busy SQLite file — is rolled back whole
  and run again, up to :data:`WRITE_ATTEMPTS` times with jittered exponential backoff; then
  :class:`CurationConflictError`. Nothing is half-written, lost or written twice.
* "Add unless already there" is ``INSERT … ON CONFLICT DO NOTHING`` (SQLAlchemy's PostgreSQL and SQLite
  dialect constructs; a select-then-insert retried on conflict elsewhere), so overlapping bulk tags from
  two users both succeed and each row is counted once, by whoever inserted it. Rows are inserted in
  sorted order, so two overlapping batches lock rows in the same order and do not deadlock.
* Statements stay under the drivers' bind-parameter limits (psycopg: 65,535, SQLite: 32,766): on
  PostgreSQL any number of ids travel as one array parameter (``unnest(:ids)``, ``= ANY(:ids)``); on
  SQLite inserts go in chunks of at most :data:`MAX_BIND_PARAMS` parameters and ``IN`` lists of deletes
  in chunks of :data:`IN_CHUNK` ids; all in the same transaction.
* Input is checked against the column sizes before anything is written, identically on every backend
  (SQLite does not enforce ``VARCHAR`` lengths, PostgreSQL does): names (tags, collections, users,
  labels) at most :data:`MAX_NAME_CHARS` characters, sample ids at most :data:`MAX_SAMPLE_ID_BYTES`
  bytes of UTF-8 (PostgreSQL cannot index a longer key in its B-tree). New tag, collection and user
  names must also be display-safe (:func:`check_name`: printable, no control, bidi or zero-width
  characters, no surrounding spaces). A bad value raises :class:`CurationInputError` naming the field and
  the limit or the rule.
"""

from __future__ import annotations

import json
import random
import time
import unicodedata
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    any_,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine, Row, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.sql.elements import BindParameter

from robustlens.errors import ValidationError, WorkspaceError

SCHEMA_VERSION = 2
REVIEW_ACTIONS = ("relabel", "keep", "ambiguous", "exclude")
#: Collection kinds: a static list of samples, or a saved filter (re-evaluated whenever it is used).
STATIC = "static"
SAVED_FILTER = "saved filter"
COLLECTION_KINDS = (STATIC, SAVED_FILTER)

#: Longest tag, collection, user name and relabel target, in characters (the ``String(200)`` columns).
MAX_NAME_CHARS = 200
#: Longest sample id, in bytes of UTF-8: within the ``String(1024)`` columns on every backend and small
#: enough for PostgreSQL's B-tree index (at most 2,704 bytes per key).
MAX_SAMPLE_ID_BYTES = 1024
#: Most bind parameters in one statement: below psycopg's 65,535 and SQLite's 32,766.
MAX_BIND_PARAMS = 30_000
#: Most ids in one ``IN (…)`` list.
IN_CHUNK = 10_000
#: Most ids in one PostgreSQL array parameter (one parameter, so only the statement's size is bounded).
ARRAY_CHUNK = 100_000
#: Tries of one write transaction before :class:`CurationConflictError`.
WRITE_ATTEMPTS = 8
#: Backoff before try ``k + 1``: uniform in ``[0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**k)]`` seconds.
BACKOFF_BASE_S = 0.02
BACKOFF_CAP_S = 1.0
# PostgreSQL SQLSTATEs of a transaction that lost a race and may succeed when run again:
# serialization_failure, deadlock_detected, lock_not_available, unique_violation, foreign_key_violation.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "55P03", "23505", "23503"})
#: Keep the driver's rowcount of a statement (how many rows a DELETE removed) on every backend.
_COUNT_ROWS = {"preserve_rowcount": True}
_POSTGRES_LOCK_KEY = 0x726C6375  # advisory lock serialising schema creation / migration ("rlcu")

T = TypeVar("T")
_jitter = random.Random()  # backoff jitter only: decorrelates writers, no result depends on it

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)
tags = Table(
    "tags",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
sample_tags = Table(
    "sample_tags",
    metadata,
    Column("sample_id", String(1024), primary_key=True),
    Column("tag_id", Integer, ForeignKey("tags.id", ondelete="CASCADE"), primary_key=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
collections = Table(
    "collections",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("description", Text, nullable=False, default=""),
    # NULL for a static list; a JSON filter for a saved filter that re-evaluates.
    Column("filter_json", Text, nullable=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
collection_members = Table(
    "collection_members",
    metadata,
    Column("collection_id", Integer, ForeignKey("collections.id", ondelete="CASCADE"), primary_key=True),
    Column("sample_id", String(1024), primary_key=True),
    Column("created_by", String(200), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
review_decisions = Table(
    "review_decisions",
    metadata,
    # Append-only: the latest row per sample is its current decision; older rows are its history.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sample_id", String(1024), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("new_label", String(200), nullable=True),
    Column("created_by", String(200), nullable=False),
    Column("note", Text, nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
)
audit_log = Table(
    "audit_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("action", String(64), nullable=False),
    Column("details", Text, nullable=False),
)

#: Schema version 1 → 2: ``(table, old column, new column)``, one name for the person and one for the time.
RENAMED_IN_V2 = (
    ("collection_members", "added_by", "created_by"),
    ("collection_members", "added_at", "created_at"),
    ("review_decisions", "reviewer", "created_by"),
    ("audit_log", "actor", "created_by"),
    ("audit_log", "at", "created_at"),
)
#: ``ALTER TABLE … RENAME COLUMN`` needs SQLite 3.25 (2018); PostgreSQL has it in every supported version.
_SQLITE_RENAME_COLUMN = (3, 25, 0)


class CurationInputError(ValidationError, ValueError):
    """A name, id or option given to the curation store that it cannot store (empty, too long, unknown
    collection, duplicate collection name). A :class:`ValueError` too, for callers that catch those."""


class CurationDatabaseError(WorkspaceError):
    """The curation database cannot be opened or refused a write (unreachable server, disk full, …)."""


class CurationConflictError(CurationDatabaseError):
    """A write still lost to concurrent writers after :data:`WRITE_ATTEMPTS` tries; nothing of it was saved."""


def _rename_columns(conn: Connection, renames: Iterable[tuple[str, str, str]]) -> None:
    """Rename ``(table, old, new)`` columns in place (``ALTER TABLE … RENAME COLUMN``), rows and constraints kept.

    Idempotent: a column that already has its new name is left as it is, so running it again changes nothing.
    Runs inside the caller's transaction (DDL is transactional on SQLite and PostgreSQL): a failure leaves
    every column as it was.

    Raises
    ------
    CurationDatabaseError
        SQLite older than 3.25, or a table that has neither or both of the old and the new column.
    """
    if conn.dialect.name == "sqlite":
        version = tuple(conn.dialect.server_version_info or ())
        if version < _SQLITE_RENAME_COLUMN:
            raise CurationDatabaseError(
                f"upgrading the curation database needs SQLite {'.'.join(map(str, _SQLITE_RENAME_COLUMN))} or "
                f"newer to rename columns; this Python has SQLite {'.'.join(map(str, version))}"
            )
    quote = conn.dialect.identifier_preparer.quote
    by_table: dict[str, list[tuple[str, str]]] = {}
    for table, old, new in renames:
        by_table.setdefault(table, []).append((old, new))
    inspector = inspect(conn)
    for table, pairs in by_table.items():
        present = {column["name"] for column in inspector.get_columns(table)}  # read once, before any rename
        for old, new in pairs:
            if new in present and old not in present:
                continue
            if old not in present or new in present:
                raise CurationDatabaseError(
                    f"cannot upgrade the curation database: table {table} should have column {old!r} (schema "
                    f"version 1) or {new!r} (version 2), it has {sorted(present)}"
                )
            conn.execute(text(f"ALTER TABLE {quote(table)} RENAME COLUMN {quote(old)} TO {quote(new)}"))


def _v1_to_v2(conn: Connection) -> None:
    """One name per concept: the person is ``created_by`` and the time ``created_at`` in every table."""
    _rename_columns(conn, RENAMED_IN_V2)


#: Version → function bringing a database of that version to the next one, run by :func:`migrate` inside its
#: transaction (under the PostgreSQL advisory lock / the SQLite write lock), the version row updated with it.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _v1_to_v2}


def _now() -> datetime:
    return datetime.now(UTC)


def _safe_url(url: str) -> str:
    """``url`` with any password masked, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return repr(url) if "@" not in url else "<a database URL with credentials>"


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``.

    SQLite gets WAL mode, a 30 s busy timeout, foreign keys, and transactions begun by SQLAlchemy rather
    than the driver (``BEGIN``, or ``BEGIN IMMEDIATE`` on connections with the ``curation_write`` execution
    option, so a write transaction holds the write lock from its first read). Server databases get
    ``pool_pre_ping`` (a restarted server does not break the next write).

    Raises
    ------
    CurationDatabaseError
        ``url`` is not a database URL, or its driver is not installed.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise CurationDatabaseError(
            f"{_safe_url(url)} is not a database URL ({exc}; expected e.g. "
            f"sqlite:////abs/path/curation.db or postgresql+psycopg://user@host/db)"
        ) from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    try:
        engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {}, pool_pre_ping=not is_sqlite)
    except (ImportError, NoSuchModuleError) as exc:
        hint = (
            " — install it with pip install 'robustlens[postgres]'" if parsed.get_backend_name() == "postgresql" else ""
        )
        raise CurationDatabaseError(f"the database driver for {_safe_url(url)} is not installed ({exc}){hint}") from exc
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:  # pragma: no cover - every connection
            dbapi_connection.isolation_level = None  # the driver begins nothing; the "begin" hook below does
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:  # pragma: no cover - exercised via every transaction
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("curation_write") else "BEGIN")

    return engine


def migrate(engine: Engine) -> int:
    """Create missing tables and apply pending migrations in one transaction; returns the schema version.

    Safe when several processes open a new or an old database at once: on PostgreSQL an advisory lock
    serialises them, on SQLite the write lock does; whoever comes second finds the schema up to date. Each
    step of :data:`MIGRATIONS` and the version row it bumps commit together or not at all. A database already
    at :data:`SCHEMA_VERSION` is only read (so a read-only database file opens too).

    Raises
    ------
    WorkspaceError
        The database's schema is newer than this robustlens.
    CurationDatabaseError
        A migration step cannot run (see :func:`_rename_columns`).
    """
    with engine.connect() as conn:
        if inspect(conn).has_table(schema_info.name):
            row = conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).first()
            if row is not None and int(row[0]) == SCHEMA_VERSION:
                return SCHEMA_VERSION
    options: dict = {"curation_write": True}
    if engine.dialect.name == "postgresql":
        # Each statement sees what committed before it, so once the lock is ours the tables another
        # process just created are visible (under a SERIALIZABLE server default they would not be).
        options["isolation_level"] = "READ COMMITTED"
    with engine.execution_options(**options).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _POSTGRES_LOCK_KEY})
        metadata.create_all(conn)
        row = conn.execute(select(schema_info.c.value).where(schema_info.c.key == "schema_version")).first()
        if row is None:
            conn.execute(insert(schema_info).values(key="schema_version", value=str(SCHEMA_VERSION)))
            return SCHEMA_VERSION
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise WorkspaceError(
                f"the curation database has schema version {version}, newer than this "
                f"robustlens supports ({SCHEMA_VERSION}); upgrade robustlens"
            )
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](conn)
            version += 1
            conn.execute(schema_info.update().where(schema_info.c.key == "schema_version").values(value=str(version)))
        return version


# -- input checks (the same on every backend) ---------------------------------------------------------------
def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


def check_name(field: str, value: object, *, strip: bool = True, display: bool = True) -> str:
    """``value`` if it is a safe display name that fits a name column, else :class:`CurationInputError`
    naming ``field``.

    Names — tags, collections, user names, relabel targets — are non-empty text of at most
    :data:`MAX_NAME_CHARS` characters. With ``display`` (every name a user creates or acts under: tags,
    collections, user names) the name must also be *display-safe*
    (:func:`display_name_problem`): printable characters only — no control characters (tab, newline, NUL,
    DEL, C1), no format characters (bidi embeddings/overrides/isolates U+202A–U+202E and U+2066–U+2069,
    marks U+200E/U+200F, zero-width space/joiners U+200B–U+200D, word joiner U+2060, BOM U+FEFF), no
    line/paragraph separators, no spaces other than the plain space, no private-use, unassigned or surrogate
    code points — and no leading or trailing space. Such characters make two names that look the same
    differ, reorder or hide text around a name, or break a one-line list (export CSVs, the audit log).

    Punctuation and markup characters (``,``, ``<``, ``*``, ``[``, ``#`` …) stay allowed, so human
    names such as ``"dark coats, frozen"`` keep working: names are never file names (exports pass them
    through their own file-name rule), every dashboard view renders them through the one escape helper
    (:func:`robustlens.dashboard.components.markup.text` / ``code`` / ``plot_text``) and CSV exports neutralise
    formula-leading cells, so a name shows exactly as typed and never becomes markup.

    ``strip``: surrounding whitespace is removed first (tags, collections, user names); without it a name
    with leading or trailing whitespace is refused (the user of a review decision is stored exactly as given).
    ``display=False`` checks only type, emptiness and length: used where a name only *looks up* an existing
    tag or collection (removing, adding members), so one stored before this rule can still be cleaned up,
    and for relabel targets, which are the dataset's class names.
    """
    if not isinstance(value, str):
        raise CurationInputError(f"{field} must be text, got {type(value).__name__}")
    name = value.strip() if strip else value
    if not name.strip():
        raise CurationInputError(f"{field} must not be empty")
    if len(name) > MAX_NAME_CHARS:
        raise CurationInputError(
            f"{field} {_shown(name)} is {len(name):,} characters long; the curation "
            f"database holds at most {MAX_NAME_CHARS}"
        )
    if display:
        problem = display_name_problem(name)
        if problem:
            raise CurationInputError(f"{field} {_shown(name)} is not allowed: {problem}; {DISPLAY_NAME_RULE}")
    return name


#: The display-safe name rule, as told to the user.
DISPLAY_NAME_RULE = (
    f"a name is printable text (letters, digits, spaces, punctuation) of 1 to {MAX_NAME_CHARS} "
    "characters, without control, invisible or text-direction characters and without leading "
    "or trailing spaces"
)


_REFUSED_CATEGORIES = {
    "Cc": "a control character",
    "Cf": "an invisible format character",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Zs": "a space other than ' '",
}


def display_name_problem(name: str) -> str | None:
    """Why ``name`` is not display-safe (see :func:`check_name`), or ``None`` when it is.

    A character is refused when :meth:`str.isprintable` says so: Unicode categories Cc, Cf, Cs, Co, Cn, Zl,
    Zp, and Zs other than U+0020 — which covers every control, bidi, zero-width and line-break character.
    """
    for position, char in enumerate(name, start=1):
        if not char.isprintable():
            kind = _REFUSED_CATEGORIES.get(unicodedata.category(char), "non-printable character")
            name = unicodedata.name(char, "")
            return f"character {position} is U+{ord(char):04X}{' ' + name if name else ''} ({kind})"
    if name != name.strip():
        return "it starts or ends with a space"
    return None


def check_sample_ids(sample_ids: Iterable[str] | str) -> list[str]:
    """Distinct sample ids, sorted (a fixed lock order for concurrent writers), each checked.

    Raises
    ------
    CurationInputError
        An id is not text, empty, or longer than :data:`MAX_SAMPLE_ID_BYTES` bytes of UTF-8; the message
        names it and its position.
    """
    if isinstance(sample_ids, str):  # one id where a list was meant would tag every character
        sample_ids = [sample_ids]
    ids = list(dict.fromkeys(sample_ids))
    for position, sid in enumerate(ids):
        if not isinstance(sid, str):
            raise CurationInputError(f"sample id #{position + 1} must be text, got {type(sid).__name__}")
        if not sid:
            raise CurationInputError(f"sample id #{position + 1} is empty")
        size = len(sid.encode("utf-8", "surrogatepass"))
        if size > MAX_SAMPLE_ID_BYTES:
            raise CurationInputError(
                f"sample id #{position + 1} {_shown(sid)} is {size:,} bytes in UTF-8; the "
                f"curation database holds ids of at most {MAX_SAMPLE_ID_BYTES:,} bytes"
            )
    return sorted(ids)


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _retryable(exc: DBAPIError, dialect: str) -> bool:
    """Whether ``exc`` means "lost a race with another writer": worth rolling back and trying again."""
    orig = exc.orig
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state in _RETRYABLE_SQLSTATES:
        return True
    if dialect == "sqlite":
        message = str(orig).lower()
        return "database is locked" in message or "database is busy" in message or "database table is locked" in message
    # Backends without ON CONFLICT support use select-then-insert: a concurrent insert shows as a violation.
    return isinstance(exc, IntegrityError) and dialect != "postgresql"


def _id_array(ids: list[str]) -> BindParameter[Any]:
    """``ids`` as one PostgreSQL ``VARCHAR[]`` bind parameter: no per-id parameters, so no parameter limit."""
    array_type: Any = ARRAY(String)
    return bindparam("ids", value=ids, type_=array_type)


def _insert_missing(
    conn: Connection, table: Table, key: Column, key_value: int, member: Column, ids: list[str], extra: dict
) -> int:
    """Insert ``(key=key_value, member=id, **extra)`` for every id not there yet; returns how many were new.

    * PostgreSQL: ``INSERT … SELECT unnest(:ids) … ON CONFLICT DO NOTHING RETURNING`` with the ids as one
      array parameter, in chunks of :data:`ARRAY_CHUNK` ids.
    * SQLite: ``INSERT … ON CONFLICT DO NOTHING RETURNING`` sent as an executemany, which SQLAlchemy
      batches into multi-row statements under SQLite's parameter limit, in chunks of
      :data:`MAX_BIND_PARAMS` parameters.
    * Elsewhere: a select of the present ids then an insert of the rest (a concurrent insert raises an
      integrity error and :meth:`CurationStore._write` runs the transaction again).

    The rows ``RETURNING`` gives back are the ones this call inserted, so concurrent writers each count
    only their own.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        added = 0
        constants = [literal(key_value, key.type).label(key.name)]
        constants += [literal(value, table.c[name].type).label(name) for name, value in extra.items()]
        for chunk in _chunks(ids, ARRAY_CHUNK):
            source = select(func.unnest(_id_array(chunk)).label(member.name), *constants)
            statement = (
                postgresql_insert(table)
                .from_select([member.name, key.name, *extra], source)
                .on_conflict_do_nothing(index_elements=[key.name, member.name])
                .returning(member)
            )
            added += len(conn.execute(statement).all())
        return added
    columns = 2 + len(extra)
    added = 0
    for chunk in _chunks(ids, max(1, MAX_BIND_PARAMS // columns)):
        rows = [{key.name: key_value, member.name: sid, **extra} for sid in chunk]
        if dialect == "sqlite":
            statement = (
                sqlite_insert(table).on_conflict_do_nothing(index_elements=[key.name, member.name]).returning(member)
            )
            added += len(conn.execute(statement, rows).all())
            continue
        present: set[str] = set()
        for part in _chunks(chunk, IN_CHUNK):
            present.update(conn.execute(select(member).where(key == key_value, member.in_(part))).scalars())
        new_rows = [row for row in rows if row[member.name] not in present]
        if new_rows:
            conn.execute(insert(table), new_rows)
        added += len(new_rows)
    return added


def _delete_members(conn: Connection, table: Table, key: Column, key_value: int, member: Column, ids: list[str]) -> int:
    """Delete ``(key_value, id)`` rows for ``ids``: ``= ANY(:ids)`` with one array parameter on PostgreSQL,
    ``IN`` lists of :data:`IN_CHUNK` ids elsewhere (under every driver's parameter limit)."""
    removed = 0
    if conn.dialect.name == "postgresql":
        for chunk in _chunks(ids, ARRAY_CHUNK):
            statement = delete(table).where(key == key_value, member == any_(_id_array(chunk)))
            removed += max(0, int(conn.execute(statement, execution_options=_COUNT_ROWS).rowcount))
        return removed
    for part in _chunks(ids, IN_CHUNK):
        removed += max(
            0,
            int(
                conn.execute(
                    delete(table).where(key == key_value, member.in_(part)), execution_options=_COUNT_ROWS
                ).rowcount
            ),
        )
    return removed


def _collection_fields(row: Row[Any], size: int) -> dict[str, Any]:
    """The keys every collection dict has (see :meth:`CurationStore.collection`), from a ``collections`` row."""
    saved = bool(row.filter_json)
    return {
        "name": row.name,
        "description": row.description,
        "kind": SAVED_FILTER if saved else STATIC,
        "filter": json.loads(row.filter_json) if saved else None,
        "size": size,
        "created_by": row.created_by,
        "created_at": row.created_at,
    }


class CurationStore:
    """Repository over the curation database; the one place that writes curation state.

    Safe to share across threads (one connection pool) and to open from many processes at once.

    Parameters
    ----------
    url:
        SQLAlchemy database URL.

    Raises
    ------
    CurationDatabaseError
        The database cannot be opened (bad URL, driver missing, server unreachable, disk full) or its older
        schema cannot be upgraded.
    WorkspaceError
        The database's schema is newer than this robustlens.
    """

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self._writer = self.engine.execution_options(curation_write=True)
        #: Write transactions run again because they lost a race (for monitoring and tests).
        self.retries = 0
        try:
            self.schema_version = migrate(self.engine)
        except (DBAPIError, SQLAlchemyError) as exc:
            self.engine.dispose()
            raise CurationDatabaseError(
                f"cannot open the curation database {_safe_url(url)}: {getattr(exc, 'orig', None) or exc}"
            ) from exc
        except WorkspaceError:
            self.engine.dispose()
            raise

    def close(self) -> None:
        self.engine.dispose()

    def _write(self, what: str, work: Callable[[Connection], T]) -> T:
        """Run ``work(conn)`` in one write transaction; roll back and retry it when it lost a race.

        Tries :data:`WRITE_ATTEMPTS` times with jittered exponential backoff. ``work`` must only touch the
        database (it may run more than once); its result is returned once a try commits.

        Raises
        ------
        CurationConflictError
            Every try lost a race; nothing was saved.
        CurationDatabaseError
            Any other database failure; nothing was saved.
        """
        dialect = self.engine.dialect.name
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._writer.begin() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if not _retryable(exc, dialect):
                    raise CurationDatabaseError(
                        f"the curation database {_safe_url(self.url)} refused to {what}: {exc.orig}; nothing was saved"
                    ) from exc
                if attempt == WRITE_ATTEMPTS - 1:
                    raise CurationConflictError(
                        f"could not {what}: other users were writing the same records and {WRITE_ATTEMPTS} "
                        f"tries each lost the race ({exc.orig}); nothing was saved — try again"
                    ) from exc
                self.retries += 1
                time.sleep(_jitter.uniform(0.0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)))
        raise AssertionError("unreachable")

    def _audit(self, conn: Connection, user: str, action: str, details: dict) -> None:
        conn.execute(
            insert(audit_log).values(
                created_at=_now(), created_by=user, action=action, details=json.dumps(details, default=str)
            )
        )

    def _tag_id(self, conn: Connection, name: str, user: str) -> int:
        """The tag's id, creating the tag if needed (a concurrent creator's row is reused)."""
        found = conn.execute(select(tags.c.id).where(tags.c.name == name)).scalar()
        if found is not None:
            return int(found)
        values = {"name": name, "created_by": user, "created_at": _now()}
        dialect = conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            make_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
            conn.execute(make_insert(tags).values(values).on_conflict_do_nothing(index_elements=["name"]))
        else:
            conn.execute(insert(tags).values(values))
        return int(conn.execute(select(tags.c.id).where(tags.c.name == name)).scalar_one())

    def add_tag(self, sample_ids: Iterable[str], tag: str, *, user: str) -> int:
        """Tag samples; returns how many samples newly got the tag. Existing tags are left as they are.

        Any number of ids (chunked); with concurrent writers each sample is counted by exactly one of them.
        """
        tag = check_name("tag", tag)
        user = check_name("user name", user)
        ids = check_sample_ids(sample_ids)

        def work(conn: Connection) -> int:
            tag_id = self._tag_id(conn, tag, user)
            added = _insert_missing(
                conn,
                sample_tags,
                sample_tags.c.tag_id,
                tag_id,
                sample_tags.c.sample_id,
                ids,
                {"created_by": user, "created_at": _now()},
            )
            self._audit(conn, user, "tag", {"tag": tag, "count": added})
            return added

        return self._write(f"tag {len(ids):,} samples '{tag}'", work)

    def remove_tag(self, sample_ids: Iterable[str], tag: str, *, user: str) -> int:
        """Remove a tag from samples (any number of ids); returns how many lost it."""
        tag = check_name("tag", tag, display=False)
        user = check_name("user name", user)
        ids = check_sample_ids(sample_ids)

        def work(conn: Connection) -> int:
            tag_id = conn.execute(select(tags.c.id).where(tags.c.name == tag)).scalar()
            if tag_id is None:
                return 0
            removed = _delete_members(
                conn, sample_tags, sample_tags.c.tag_id, int(tag_id), sample_tags.c.sample_id, ids
            )
            self._audit(conn, user, "untag", {"tag": tag, "count": removed})
            return removed

        return self._write(f"remove tag '{tag}' from {len(ids):,} samples", work)

    def _filters_naming_tag(self, conn: Connection, tag: str) -> list[tuple[int, str, dict]]:
        """``(id, name, filter)`` of every saved filter whose ``tags`` list names ``tag`` (static collections,
        which have no filter, are not read)."""
        found = []
        rows = conn.execute(
            select(collections.c.id, collections.c.name, collections.c.filter_json).where(
                collections.c.filter_json.is_not(None), collections.c.filter_json != ""
            )
        )
        for collection_id, name, filter_json in rows:
            spec = json.loads(filter_json)
            if isinstance(spec, dict) and tag in (spec.get("tags") or []):
                found.append((int(collection_id), str(name), spec))
        return found

    def rename_tag(self, tag: str, new_name: str, *, user: str) -> int:
        """Rename tag ``tag`` to ``new_name``; returns how many samples carry ``new_name`` afterwards.

        Saved filters that select ``tag`` are rewritten to select ``new_name``, so no collection changes
        meaning. When ``new_name`` is already a tag the two merge: every sample of ``tag`` gets ``new_name``
        (keeping who tagged it and when) and ``tag`` goes. Raises :class:`CurationInputError` when ``tag`` does
        not exist or the names are the same.
        """
        tag = check_name("tag", tag, display=False)
        new_name = check_name("new tag name", new_name)
        user = check_name("user name", user)
        if new_name == tag:
            raise CurationInputError(f"tag '{tag}' already has that name")

        def work(conn: Connection) -> int:
            old_id = conn.execute(select(tags.c.id).where(tags.c.name == tag)).scalar()
            if old_id is None:
                raise CurationInputError(f"no tag named '{tag}'")
            target = conn.execute(select(tags.c.id).where(tags.c.name == new_name)).scalar()
            if target is None:
                conn.execute(update(tags).where(tags.c.id == old_id).values(name=new_name))
                target = old_id
            else:
                # One INSERT … SELECT in the database: the samples of ``tag`` that lack ``new_name`` get it, with
                # their tagger and time; no ids travel to Python.
                have = sample_tags.alias("have")
                already = select(have.c.sample_id).where(
                    have.c.tag_id == target, have.c.sample_id == sample_tags.c.sample_id
                )
                moved = select(
                    sample_tags.c.sample_id,
                    literal(int(target), Integer).label("tag_id"),
                    sample_tags.c.created_by,
                    sample_tags.c.created_at,
                ).where(sample_tags.c.tag_id == old_id, ~already.exists())
                conn.execute(
                    insert(sample_tags).from_select(["sample_id", "tag_id", "created_by", "created_at"], moved)
                )
                conn.execute(delete(sample_tags).where(sample_tags.c.tag_id == old_id))
                conn.execute(delete(tags).where(tags.c.id == old_id))
            for collection_id, _, spec in self._filters_naming_tag(conn, tag):
                spec["tags"] = list(dict.fromkeys(new_name if t == tag else t for t in spec["tags"]))
                conn.execute(
                    update(collections).where(collections.c.id == collection_id).values(filter_json=json.dumps(spec))
                )
            self._audit(conn, user, "rename_tag", {"tag": tag, "new_name": new_name})
            count = conn.execute(select(func.count()).select_from(sample_tags).where(sample_tags.c.tag_id == target))
            return int(count.scalar_one())

        return self._write(f"rename tag '{tag}' to '{new_name}'", work)

    def delete_tag(self, tag: str, *, user: str) -> int:
        """Delete tag ``tag`` and its assignments (the samples themselves are untouched); returns how many samples
        lost it. Refused (:class:`CurationInputError`, naming them) while a saved filter selects the tag: deleting
        it would silently empty those collections."""
        tag = check_name("tag", tag, display=False)
        user = check_name("user name", user)

        def work(conn: Connection) -> int:
            tag_id = conn.execute(select(tags.c.id).where(tags.c.name == tag)).scalar()
            if tag_id is None:
                raise CurationInputError(f"no tag named '{tag}'")
            users = [name for _, name, _ in self._filters_naming_tag(conn, tag)]
            if users:
                raise CurationInputError(
                    f"tag '{tag}' is selected by the saved filter(s) {', '.join(repr(u) for u in users)}; "
                    "change or delete them first (or rename the tag: saved filters follow a rename)"
                )
            removed = conn.execute(
                delete(sample_tags).where(sample_tags.c.tag_id == tag_id), execution_options=_COUNT_ROWS
            )
            conn.execute(delete(tags).where(tags.c.id == tag_id))
            self._audit(conn, user, "delete_tag", {"tag": tag, "count": removed.rowcount})
            return int(removed.rowcount)

        return self._write(f"delete tag '{tag}'", work)

    def tag_counts(self) -> dict[str, int]:
        """Tag name → number of tagged samples."""
        query = (
            select(tags.c.name, func.count(sample_tags.c.sample_id))
            .select_from(tags.outerjoin(sample_tags))
            .group_by(tags.c.name)
            .order_by(tags.c.name)
        )
        with self.engine.connect() as conn:
            return {name: int(count) for name, count in conn.execute(query)}

    def samples_with_tag(self, tag: str) -> list[str]:
        query = select(sample_tags.c.sample_id).join(tags).where(tags.c.name == tag).order_by(sample_tags.c.sample_id)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def create_collection(
        self,
        name: str,
        *,
        user: str,
        description: str = "",
        sample_ids: Iterable[str] = (),
        filter_spec: dict | None = None,
    ) -> int:
        """Create a collection: a static list of samples (kind :data:`STATIC`), or with ``filter_spec`` a saved
        filter (kind :data:`SAVED_FILTER`); attributed to ``user``. Returns its id.

        Raises :class:`CurationInputError` when a collection of that name exists (also when a concurrent
        user created it first) or ``filter_spec`` is not a JSON-serialisable dict.
        """
        name = check_name("collection name", name)
        user = check_name("user name", user)
        if not isinstance(description, str):
            raise CurationInputError(f"collection description must be text, got {type(description).__name__}")
        ids = check_sample_ids(sample_ids)
        if filter_spec is not None and not isinstance(filter_spec, dict):
            raise CurationInputError(f"filter_spec must be a dict, got {type(filter_spec).__name__}")
        try:
            filter_json = json.dumps(filter_spec) if filter_spec is not None else None
        except (TypeError, ValueError) as exc:
            raise CurationInputError(f"filter_spec of collection '{name}' cannot be saved as JSON: {exc}") from exc

        def work(conn: Connection) -> int:
            if conn.execute(select(collections.c.id).where(collections.c.name == name)).first() is not None:
                raise CurationInputError(f"a collection named '{name}' already exists")
            values = {
                "name": name,
                "description": description,
                "created_by": user,
                "created_at": _now(),
                "filter_json": filter_json,
            }
            dialect = conn.dialect.name
            if dialect in ("postgresql", "sqlite"):
                make_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
                new_id = conn.execute(
                    make_insert(collections)
                    .values(values)
                    .on_conflict_do_nothing(index_elements=["name"])
                    .returning(collections.c.id)
                ).scalar()
                if new_id is None:  # a concurrent user created it between our select and insert
                    raise CurationInputError(f"a collection named '{name}' already exists")
            else:
                inserted = conn.execute(insert(collections).values(values)).inserted_primary_key
                new_id = inserted[0] if inserted is not None else None
            if new_id is None:
                raise CurationDatabaseError(f"the database gave no id for the new collection '{name}'")
            collection_id = int(new_id)
            _insert_missing(
                conn,
                collection_members,
                collection_members.c.collection_id,
                collection_id,
                collection_members.c.sample_id,
                ids,
                {"created_by": user, "created_at": _now()},
            )
            self._audit(conn, user, "create_collection", {"name": name, "count": len(ids)})
            return collection_id

        return self._write(f"create collection '{name}'", work)

    def collection_samples(self, name: str) -> list[str]:
        query = (
            select(collection_members.c.sample_id)
            .join(collections)
            .where(collections.c.name == name)
            .order_by(collection_members.c.sample_id)
        )
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def collection_names(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(collections.c.name).order_by(collections.c.name))]

    def record_decision(
        self, sample_id: str, action: str, *, user: str, new_label: str | None = None, note: str = ""
    ) -> None:
        """Append a review decision (``relabel`` needs ``new_label``), attributed to ``user`` (``created_by``).

        Unlike the other writers, ``user`` is stored exactly as given: one with surrounding spaces is refused
        rather than stripped (a decision's attribution is never altered).
        """
        if action not in REVIEW_ACTIONS:
            raise CurationInputError(f"action must be one of {REVIEW_ACTIONS}, got '{action}'")
        if action == "relabel" and not new_label:
            raise CurationInputError("a relabel decision needs new_label")
        user = check_name("user name", user, strip=False)
        if new_label is not None:
            new_label = check_name("new label", new_label, strip=False, display=False)
        if not isinstance(note, str):
            raise CurationInputError(f"note must be text, got {type(note).__name__}")
        (sample_id,) = check_sample_ids([sample_id])
        values = {"sample_id": sample_id, "action": action, "new_label": new_label, "created_by": user, "note": note}

        def work(conn: Connection) -> None:
            conn.execute(insert(review_decisions).values(**values, created_at=_now()))
            self._audit(conn, user, "review", {"sample_id": sample_id, "action": action, "new_label": new_label})

        self._write(f"record the decision on '{sample_id}'", work)

    def decisions(self, *, latest_only: bool = True) -> list[dict]:
        """Review decisions, oldest first; with ``latest_only`` one (the newest) per sample.

        Each a dict of the ``review_decisions`` columns: ``id``, ``sample_id``, ``action``, ``new_label``
        (``None`` unless a relabel), ``created_by`` (the user), ``note``, ``created_at``.
        """
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
        """One collection, or ``None`` when there is none of that name.

        Keys: ``name``, ``description``, ``kind`` (:data:`STATIC` or :data:`SAVED_FILTER`), ``filter`` (the
        saved filter's dict, or ``None``), ``members`` (the stored sample ids, sorted; a saved filter's are
        not stored, so usually ``[]``), ``size`` (``len(members)``), ``created_by``, ``created_at``.
        """
        with self.engine.connect() as conn:
            row = conn.execute(select(collections).where(collections.c.name == name)).first()
            if row is None:
                return None
            members = [
                r[0]
                for r in conn.execute(
                    select(collection_members.c.sample_id)
                    .where(collection_members.c.collection_id == row.id)
                    .order_by(collection_members.c.sample_id)
                )
            ]
        return {**_collection_fields(row, len(members)), "members": members}

    def collections_overview(self) -> list[dict]:
        """Every collection, by name: the keys of :meth:`collection` except ``members`` (``size`` counts them)."""
        query = (
            select(collections, func.count(collection_members.c.sample_id).label("size"))
            .select_from(collections.outerjoin(collection_members))
            .group_by(collections.c.id)
            .order_by(collections.c.name)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [_collection_fields(r, int(r.size)) for r in rows]

    def _collection_id(self, conn: Connection, name: str) -> int:
        found = conn.execute(select(collections.c.id).where(collections.c.name == name)).scalar()
        if found is None:
            raise CurationInputError(f"no collection named '{name}'")
        return int(found)

    def add_to_collection(self, name: str, sample_ids: Iterable[str], *, user: str) -> int:
        """Add samples (any number) to a collection; returns how many were not in it yet."""
        return self._change_members(name, sample_ids, user, add=True)

    def remove_from_collection(self, name: str, sample_ids: Iterable[str], *, user: str) -> int:
        """Remove samples (any number) from a collection; returns how many left it."""
        return self._change_members(name, sample_ids, user, add=False)

    def _change_members(self, name: str, sample_ids: Iterable[str], user: str, *, add: bool) -> int:
        """Add (``add=True``) or remove samples of collection ``name`` in one audited write; returns how many
        samples changed membership (ids already in, or already out, are not counted)."""
        name = check_name("collection name", name, display=False)
        user = check_name("user name", user)
        ids = check_sample_ids(sample_ids)
        key, member = collection_members.c.collection_id, collection_members.c.sample_id

        def work(conn: Connection) -> int:
            collection_id = self._collection_id(conn, name)
            if add:
                extra = {"created_by": user, "created_at": _now()}
                count = _insert_missing(conn, collection_members, key, collection_id, member, ids, extra)
            else:
                count = _delete_members(conn, collection_members, key, collection_id, member, ids)
            action = "add_to_collection" if add else "remove_from_collection"
            self._audit(conn, user, action, {"name": name, "count": count})
            return count

        change = f"add {len(ids):,} samples to" if add else f"remove {len(ids):,} samples from"
        return self._write(f"{change} collection '{name}'", work)

    def delete_collection(self, name: str, *, user: str) -> None:
        """Delete a collection and its membership list (the samples themselves are untouched)."""
        name = check_name("collection name", name, display=False)
        user = check_name("user name", user)

        def work(conn: Connection) -> None:
            collection_id = self._collection_id(conn, name)
            conn.execute(delete(collection_members).where(collection_members.c.collection_id == collection_id))
            conn.execute(delete(collections).where(collections.c.id == collection_id))
            self._audit(conn, user, "delete_collection", {"name": name})

        self._write(f"delete collection '{name}'", work)

    def tag_assignments(self) -> list[tuple[str, str]]:
        """Every ``(sample_id, tag)`` pair, ordered by tag then sample."""
        query = select(sample_tags.c.sample_id, tags.c.name).join(tags).order_by(tags.c.name, sample_tags.c.sample_id)
        with self.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(query)]

    def tags_of(self, sample_id: str) -> list[str]:
        """Tags of one sample, sorted."""
        query = select(tags.c.name).join(sample_tags).where(sample_tags.c.sample_id == sample_id).order_by(tags.c.name)
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(query)]

    def decision_history(self, sample_id: str) -> list[dict]:
        """Every decision recorded for one sample, oldest first (dicts as in :meth:`decisions`)."""
        query = (
            select(review_decisions).where(review_decisions.c.sample_id == sample_id).order_by(review_decisions.c.id)
        )
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(query)]
