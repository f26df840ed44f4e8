"""SQL store: the append-only ``events`` table and the ``items`` it produces (SQLite or Postgres).

``apply_batch`` is the one write path (docs/architecture.md invariants 2, 3, 6): in one transaction it
inserts the events idempotently by event id and upserts the newest version per key with the
guard ``excluded.(version, origin) > items.(version, origin)``, so any permutation of events,
with duplicates, gives the same rows. The hot path uses the DB-API directly (executemany on
SQLite, execute_values on Postgres): SQLAlchemy's generic executemany is a round trip per row
on psycopg2 for ON CONFLICT statements.

URLs: ``postgresql://`` (and ``postgres://``) mean psycopg2, the installed driver the batch path is
written for (SQLAlchemy 2.1 alone would map them to psycopg 3): :func:`engine_url` is the one place.
The schema comes from the migrations in :mod:`mfh_core.migrations`; :meth:`SqlStore.create_schema`
creates a brand-new database at head and refuses one that is behind (``mfh db upgrade``).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, SQLAlchemyError

from mfh_core import search_sql
from mfh_core.searchindex import DOC_COLS, SearchQuery, doc_row
from mfh_models import (
    ChecksumRow,
    InvalidArgument,
    Kind,
    MemoryEvent,
    Op,
    Record,
    StoreDamaged,
    StoreNotCurrent,
    Unavailable,
    items_checksum,
)

__all__ = [
    "ApplyResult",
    "Snapshot",
    "SqlStore",
    "WatchPage",
    "display_url",
    "engine_url",
    "events_table",
    "items_table",
    "metadata",
    "search_docs_table",
    "search_namespaces_table",
]

log = logging.getLogger("mfh.sqlstore")

metadata = sa.MetaData()


def _text_c(length: int) -> sa.types.TypeEngine[str]:
    # Byte order ("C" collation) on Postgres so ordering and the origin tie-break match SQLite and Python.
    return sa.String(length, collation="C").with_variant(sa.String(length), "sqlite")


items_table = sa.Table(
    "items",
    metadata,
    sa.Column("namespace", _text_c(64), primary_key=True),
    sa.Column("key", _text_c(256), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("origin", _text_c(32), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
)

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(96), nullable=False, unique=True),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("namespace", _text_c(64), nullable=False),
    sa.Column("key", _text_c(256), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("origin", _text_c(32), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("schema_version", sa.Integer, nullable=False),
    sa.Column("published", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_events_unpublished", "published", "seq"),
)

#: Derived search state (mfh_core.searchindex): one row per item, written in the item's transaction.
search_docs_table = sa.Table(
    "search_docs",
    metadata,
    sa.Column("namespace", _text_c(64), primary_key=True),
    sa.Column("key", _text_c(256), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("origin", _text_c(32), nullable=False),
    sa.Column("deleted", sa.Boolean, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger, nullable=True),
    sa.Column("tags", sa.Text().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("meta", sa.Text().with_variant(JSONB(), "postgresql"), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("dim", sa.Integer, nullable=True),
    sa.Column("chg", sa.BigInteger, nullable=False),
    # Partial: only records with an expiry (few) pay for this index entry; the sweep's
    # ``expires_at <= :now`` implies ``expires_at IS NOT NULL``, so both planners use it.
    sa.Index(
        "ix_search_docs_expires",
        "expires_at",
        sqlite_where=sa.text("expires_at IS NOT NULL"),
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    ),
    sa.Index("ix_search_docs_chg", "namespace", "chg"),
    sa.Index("ix_search_docs_updated", "namespace", "updated_at"),
)

#: One row per namespace ever written: its embedding dimension and a generation that every batch
#: touching the namespace bumps (under the row's lock), so a vector cache knows what changed.
search_namespaces_table = sa.Table(
    "search_namespaces",
    metadata,
    sa.Column("namespace", _text_c(64), primary_key=True),
    sa.Column("generation", sa.BigInteger, nullable=False),
    sa.Column("dim", sa.Integer, nullable=True),
)

_EVENT_COLS = "event_id, op, namespace, key, kind, payload, version, origin, created_at, schema_version, published"
_ITEM_COLS = "namespace, key, kind, payload, version, origin, deleted, updated_at, schema_version"
_ITEM_UPDATE = (
    "ON CONFLICT (namespace, key) DO UPDATE SET kind = excluded.kind, payload = excluded.payload, "
    "version = excluded.version, origin = excluded.origin, deleted = excluded.deleted, "
    "updated_at = excluded.updated_at, schema_version = excluded.schema_version "
    "WHERE excluded.version > items.version "
    "OR (excluded.version = items.version AND excluded.origin > items.origin)"
)

_DOC_UPDATE = (
    "ON CONFLICT (namespace, key) DO UPDATE SET kind = excluded.kind, version = excluded.version, "
    "origin = excluded.origin, deleted = excluded.deleted, updated_at = excluded.updated_at, "
    "expires_at = excluded.expires_at, tags = excluded.tags, meta = excluded.meta, body = excluded.body, "
    "dim = excluded.dim, chg = excluded.chg "
    "WHERE excluded.version > search_docs.version "
    "OR (excluded.version = search_docs.version AND excluded.origin > search_docs.origin)"
)
_NS_UPSERT = (
    "INSERT INTO search_namespaces (namespace, generation, dim) VALUES ({p}, 1, {p}) "
    "ON CONFLICT (namespace) DO UPDATE SET generation = search_namespaces.generation + 1, "
    "dim = COALESCE(search_namespaces.dim, excluded.dim) RETURNING generation"
)

#: The connection's temporary table the SQLite writer stages a batch's search docs in (_index_items_sqlite).
_DOCS_IN = "mfh_docs_in"
_DOCS_IN_COLS = ", ".join(f"n.{c.strip()}" for c in DOC_COLS.split(","))


#: Schemes that mean Postgres through psycopg2; any other ``postgresql+<driver>`` is refused.
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg2")
#: pg_advisory_xact_lock key held while a store's schema is checked or migrated ("mfh" + 1).
_SCHEMA_LOCK = 0x6D666801
#: Advisory lock every Postgres write transaction holds shared until it commits, and a snapshot takes
#: exclusively for the instant its read view starts ("mfh" + 2): no event insert is then in flight, so
#: every event with ``seq`` up to the view's highest is in the view (a sequence hands out numbers at
#: insert time, not in commit order; without the fence a snapshot could miss a lower, later-committed seq).
_WRITE_FENCE = 0x6D666802
#: SQLite result codes of a damaged file: SQLITE_CORRUPT (11), SQLITE_NOTADB (26).
_SQLITE_DAMAGED = (11, 26)


def engine_url(url: str) -> str:
    """The URL SQLAlchemy gets: ``postgresql://`` and ``postgres://`` become ``postgresql+psycopg2://``.

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not a dependency; the bulk
    upserts use psycopg2's ``execute_values``. Every SqlStore (api, worker, replicator, scheduler,
    replay, migrate, checksum) goes through here.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise InvalidArgument(f"{display_url(url)} is not a database URL: use sqlite:///file.db or postgresql://...")
    low = scheme.lower()
    if low in _PG_SCHEMES:
        return f"postgresql+psycopg2://{rest}"
    if low.startswith(("postgresql+", "postgres+")):
        raise InvalidArgument(f"driver {scheme!r} is not supported: use postgresql:// (the hub uses psycopg2)")
    return url


def display_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url.split("://", 1)[0] + "://..." if "://" in url else "(not a URL)"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    events: int  # events in the batch (after dedup inside the batch)
    keys: int  # distinct keys the batch touched


@dataclass(frozen=True, slots=True)
class WatchPage:
    """One read of the event log for a Watch (:meth:`Snapshot.watch_page`)."""

    events: list[tuple[int, MemoryEvent]]  # (seq, event) of the namespace and prefix, in commit order
    scanned_to: int  # every matching event with after_seq < seq <= scanned_to is in ``events``
    head: int  # the highest seq of the view (0: an empty log)
    oldest: int | None  # the lowest seq kept (None: an empty log); lower ones were pruned or never were


def _newest_per_key(events: Iterable[MemoryEvent]) -> list[MemoryEvent]:
    """One event per key, the winner by (version, origin), sorted by key (Postgres deadlock safety)."""
    best: dict[tuple[str, str], MemoryEvent] = {}
    for e in events:
        k = (e.namespace, e.key)
        cur = best.get(k)
        if cur is None or (e.version, e.origin) > (cur.version, cur.origin):
            best[k] = e
    return [best[k] for k in sorted(best)]


def _record(row: Any) -> Record:
    return Record.model_construct(
        namespace=row.namespace,
        key=row.key,
        kind=Kind(row.kind),
        payload=row.payload,
        version=int(row.version),
        origin=row.origin,
        deleted=bool(row.deleted),
        updated_at=int(row.updated_at),
        schema_version=int(row.schema_version),
    )


def _event(row: Any) -> MemoryEvent:
    return MemoryEvent.model_construct(
        event_id=row.event_id,
        op=Op(row.op),
        namespace=row.namespace,
        key=row.key,
        kind=Kind(row.kind),
        payload=row.payload,
        version=int(row.version),
        origin=row.origin,
        created_at=int(row.created_at),
        schema_version=int(row.schema_version),
    )


class Snapshot:
    """Items and events as of one moment: what a replay audit compares."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def watermark(self) -> tuple[int, str | None]:
        """The highest event ``seq`` in this view and that event's id ((0, None) for an empty log).

        Taken from a fenced view (``SqlStore.snapshot(fenced=True)``), every event with a lower seq is
        in the view too, so "the events after the watermark" are exactly the ones the view lacks.
        """
        t = events_table
        row = self._conn.execute(sa.select(t.c.seq, t.c.event_id).order_by(t.c.seq.desc()).limit(1)).first()
        return (int(row.seq), str(row.event_id)) if row is not None else (0, None)

    def iter_events_after(
        self, after_seq: int, *, upto_seq: int | None = None, batch: int = 5000
    ) -> Iterator[tuple[int, MemoryEvent]]:
        """The events with ``after_seq < seq`` (``<= upto_seq``), in commit order, as (seq, event)."""
        t = events_table
        last = after_seq
        while True:
            stmt = sa.select(t).where(t.c.seq > last)
            if upto_seq is not None:
                stmt = stmt.where(t.c.seq <= upto_seq)
            rows = self._conn.execute(stmt.order_by(t.c.seq).limit(batch)).all()
            if not rows:
                return
            for r in rows:
                yield int(r.seq), _event(r)
            last = int(rows[-1].seq)

    def watch_page(self, namespace: str, key_prefix: str, after_seq: int, *, limit: int, window: int) -> WatchPage:
        """The events of ``namespace`` whose key starts with ``key_prefix`` and ``after_seq < seq``, in commit
        order: at most ``limit`` of them, looking at no more than ``window`` sequence numbers (a bounded read
        however far behind the caller is, and however busy other namespaces are).

        Exact in a fenced view (``SqlStore.snapshot(fenced=True)``): no event with a seq up to the view's
        head can commit later, so a reader that goes on from ``scanned_to`` misses nothing.
        """
        t = events_table
        head, _ = self.watermark()
        oldest = self._conn.execute(sa.select(t.c.seq).order_by(t.c.seq).limit(1)).scalar_one_or_none()
        upto = min(head, after_seq + window)
        events: list[tuple[int, MemoryEvent]] = []
        if upto > after_seq:
            stmt = sa.select(t).where(t.c.seq > after_seq, t.c.seq <= upto, t.c.namespace == namespace)
            if key_prefix:  # keys are ASCII (validated): DEL (0x7f) bounds every key with the prefix
                stmt = stmt.where(t.c.key >= key_prefix, t.c.key < key_prefix + "\x7f")
            rows = self._conn.execute(stmt.order_by(t.c.seq).limit(limit)).all()
            events = [(int(r.seq), _event(r)) for r in rows]
        scanned = events[-1][0] if len(events) >= limit else max(upto, after_seq)
        return WatchPage(events, scanned, head, int(oldest) if oldest is not None else None)

    def event_id_at(self, seq: int) -> str | None:
        """The id of the event at ``seq`` in this view, or None."""
        t = events_table
        return self._conn.execute(sa.select(t.c.event_id).where(t.c.seq == seq)).scalar_one_or_none()

    def iter_items(self, batch: int = 5000, *, namespace: str | None = None) -> Iterator[ChecksumRow]:
        """Every item row (of one ``namespace``), tombstones too, in no particular order."""
        t = items_table
        cols = (t.c.namespace, t.c.key, t.c.version, t.c.origin, t.c.deleted, t.c.payload)
        stmt = sa.select(*cols)
        if namespace is not None:
            stmt = stmt.where(t.c.namespace == namespace)
        for r in self._conn.execution_options(yield_per=batch).execute(stmt):
            yield ChecksumRow(r.namespace, r.key, int(r.version), r.origin, bool(r.deleted), r.payload)

    def namespaces(self) -> list[str]:
        """The namespaces that hold at least one row (tombstones count), sorted."""
        t = items_table
        return sorted(self._conn.execute(sa.select(t.c.namespace).distinct()).scalars())

    def items_of(self, namespace: str, keys: Sequence[str]) -> list[ChecksumRow]:
        """The rows of these keys of one namespace (absent keys are left out)."""
        t = items_table
        cols = (t.c.namespace, t.c.key, t.c.version, t.c.origin, t.c.deleted, t.c.payload)
        out: list[ChecksumRow] = []
        for i in range(0, len(keys), 500):
            stmt = sa.select(*cols).where(t.c.namespace == namespace, t.c.key.in_(keys[i : i + 500]))
            for r in self._conn.execute(stmt):
                out.append(ChecksumRow(r.namespace, r.key, int(r.version), r.origin, bool(r.deleted), r.payload))
        return out

    def events_by_id(self, event_ids: Sequence[str]) -> dict[str, MemoryEvent]:
        """The logged events with these ids (absent ids are left out)."""
        t = events_table
        out: dict[str, MemoryEvent] = {}
        for i in range(0, len(event_ids), 500):
            for r in self._conn.execute(sa.select(t).where(t.c.event_id.in_(event_ids[i : i + 500]))):
                out[r.event_id] = _event(r)
        return out

    def checksum(self) -> str:
        return items_checksum(self.iter_items())

    def iter_events(self, *, batch: int = 5000) -> Iterator[list[MemoryEvent]]:
        """The whole log in commit order, in lists of up to ``batch`` events."""
        for rows in self.iter_event_rows(batch=batch):
            yield [e for e, _ in rows]

    def iter_event_rows(self, *, batch: int = 5000) -> Iterator[list[tuple[MemoryEvent, bool]]]:
        """The whole log in commit order as (event, published), in lists of up to ``batch``."""
        t = events_table
        last = 0
        while True:
            rows = self._conn.execute(sa.select(t).where(t.c.seq > last).order_by(t.c.seq).limit(batch)).all()
            if not rows:
                return
            yield [(_event(r), bool(r.published)) for r in rows]
            last = int(rows[-1].seq)

    def iter_records(self, *, batch: int = 5000) -> Iterator[list[Record]]:
        """Every item row (tombstones too) in key order, in lists of up to ``batch``."""
        t = items_table
        stmt = sa.select(t).order_by(t.c.namespace, t.c.key)
        out: list[Record] = []
        for r in self._conn.execution_options(yield_per=batch).execute(stmt):
            out.append(_record(r))
            if len(out) >= batch:
                yield out
                out = []
        if out:
            yield out

    def counts(self) -> dict[str, int]:
        """Items and events as of this snapshot."""
        items = self._conn.execute(sa.select(sa.func.count()).select_from(items_table)).scalar_one()
        events = self._conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar_one()
        return {"items": int(items), "events": int(events)}


def _index_items(cur: Any, dialect: str, item_rows: Sequence[tuple[Any, ...]]) -> None:
    """The search rows of these items rows, per namespace (sorted: lock order), under the namespace's new
    generation; same version guard as the items, in the caller's transaction (mfh_core.searchindex)."""
    by_ns: dict[str, list[tuple[Any, ...]]] = {}
    for row in item_rows:
        by_ns.setdefault(row[0], []).append(row)
    if dialect == "sqlite":
        _index_items_sqlite(cur, by_ns)
        return
    from psycopg2.extras import execute_values

    ns_sql = _NS_UPSERT.format(p="%s")
    for ns in sorted(by_ns):
        docs = [doc_row(r, 0) for r in by_ns[ns]]
        dim = next((d[11] for d in docs if d[11] is not None), None)
        cur.execute(ns_sql, (ns, dim))
        generation = int(cur.fetchone()[0])
        rows = [(*d[:12], generation) for d in docs]
        execute_values(cur, f"INSERT INTO search_docs ({DOC_COLS}) VALUES %s {_DOC_UPDATE}", rows, page_size=1000)


def _index_items_sqlite(cur: Any, by_ns: dict[str, list[tuple[Any, ...]]]) -> None:
    """SQLite: the batch's docs go in through one statement, the existing ones in ascending rowid order.

    FTS5 flushes its pending terms to a new segment at every statement that writes it (its savepoint
    method) and at every write whose rowid is not above the last one (fts5_index.c,
    sqlite3Fts5IndexBeginWrite). Upserted with ``executemany`` in key order, every updated doc's
    trigger (delete old, insert new) flushed a segment of its own, and writing and merging those was
    60% of ``apply_batch`` (bench/replay.py's log). So the docs are staged in a temporary table and
    upserted by one ``INSERT ... SELECT`` ordered by the rowid they already have: the triggers' FTS
    writes ascend, and FTS5 flushes once per batch. New docs come last (rowids above the highest) and
    get their FTS rows from one ``INSERT ... SELECT`` after it.

    When no doc exists yet anywhere in the batch's key range (one probe of the primary key; exact, as
    this transaction is the only writer), every doc is new: the upsert skips the join and the sort
    (about 1.5 us of 13.5 per doc when ``index_items`` builds an index from nothing, after a replay or a
    restore). Staging still pays: ``executemany`` straight into ``search_docs`` measured slower (15 us
    a doc) than staging plus one ``INSERT ... SELECT``.
    """
    ns_sql = _NS_UPSERT.format(p="?")
    cur.execute("SELECT COALESCE(MAX(rowid), 0) FROM search_docs")
    top = int(cur.fetchone()[0])
    rows: list[tuple[Any, ...]] = []
    for ns in sorted(by_ns):
        docs = [doc_row(r, 0) for r in by_ns[ns]]
        dim = next((d[11] for d in docs if d[11] is not None), None)
        cur.execute(ns_sql, (ns, dim))
        generation = int(cur.fetchone()[0])
        rows.extend((*d[:12], generation) for d in docs)
    if not rows:
        return
    lo = min((r[0], r[1]) for r in rows)
    hi = max((r[0], r[1]) for r in rows)
    cur.execute(
        "SELECT 1 FROM search_docs WHERE (namespace, key) >= (?, ?) AND (namespace, key) <= (?, ?) LIMIT 1", (*lo, *hi)
    )
    fresh = cur.fetchone() is None
    cur.execute(f"CREATE TEMP TABLE IF NOT EXISTS {_DOCS_IN} ({DOC_COLS})")
    cur.execute(f"DELETE FROM temp.{_DOCS_IN}")
    cur.executemany(f"INSERT INTO temp.{_DOCS_IN} ({DOC_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    # WHERE true: an INSERT ... SELECT with a join needs it before ON CONFLICT (the parsing ambiguity
    # SQLite's upsert documentation describes).
    cur.execute(
        f"INSERT INTO search_docs ({DOC_COLS}) SELECT {_DOCS_IN_COLS} FROM temp.{_DOCS_IN} n WHERE true {_DOC_UPDATE}"
        if fresh
        else f"INSERT INTO search_docs ({DOC_COLS}) SELECT {_DOCS_IN_COLS} FROM temp.{_DOCS_IN} n "
        "LEFT JOIN search_docs d ON d.namespace = n.namespace AND d.key = n.key "
        f"WHERE true ORDER BY d.rowid IS NULL, d.rowid {_DOC_UPDATE}"
    )
    cur.execute(f"DELETE FROM temp.{_DOCS_IN}")
    if cur.execute("SELECT MAX(rowid) FROM search_docs").fetchone()[0] > top:
        cur.execute("INSERT INTO search_fts(rowid, body) SELECT rowid, body FROM search_docs WHERE rowid > ?", (top,))


class SqlStore:
    """Items and events in SQL. Thread-safe; sync (callers on an event loop use a thread)."""

    def __init__(
        self, url: str, *, pool_size: int = 5, checkpoint_interval_s: float = 1.0, index_search: bool = True
    ) -> None:
        self.url = url  # as given; the engine gets engine_url(url)
        #: Write the search index with the items (off only to measure what indexing costs: bench/search.py).
        self.index_search = index_search
        real = engine_url(url)
        try:
            self.dialect = sa.engine.make_url(real).get_backend_name()
        except ArgumentError as e:
            raise InvalidArgument(f"{display_url(url)} is not a database URL: {e}") from None
        if self.dialect not in ("sqlite", "postgresql"):
            raise InvalidArgument(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql://")
        self._stop = threading.Event()
        self._checkpointer: threading.Thread | None = None
        if self.dialect == "sqlite":
            self._write = self._sqlite_engine(real, immediate=True)
            self._read = self._sqlite_engine(real, immediate=False)
        else:
            eng = sa.create_engine(real, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
            self._write = self._read = eng
        self._checkpoint_interval_s = checkpoint_interval_s

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite file, or None on Postgres."""
        if self.dialect != "sqlite":
            return None
        return Path(sa.engine.make_url(engine_url(self.url)).database or "")

    def require_existing(self) -> None:
        """Raise :class:`StoreDamaged` when the SQLite file is missing (a reader must not create an empty one)."""
        path = self.sqlite_path
        if path is not None and not path.exists():
            raise StoreDamaged(
                f"the SQLite file {path} is missing: restore it (docs/operations.md, 'A host lost its disk')",
                path=str(path),
            )

    # -- set-up -------------------------------------------------------------------------------

    @staticmethod
    def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
        database = sa.engine.make_url(url).database
        if not database or database == ":memory:":
            raise InvalidArgument("SQLite needs a file path (sqlite:///path/to/file.db); in-memory is not shared")
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        eng = sa.create_engine(url, pool_size=4 if not immediate else 1, max_overflow=4 if not immediate else 0)

        @sa_event.listens_for(eng, "connect")
        def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=10000")  # first: switching to WAL can wait on another starter
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            # Inline auto-checkpoints gave 35-48 ms p99 spikes; a background thread checkpoints instead.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA temp_store=MEMORY")  # the writer's staging table (_index_items_sqlite)
            if not immediate:
                # Readers keep the search index's pages (19 MB at 100k records, FTS 5 MB): a search's
                # few hundred row lookups then miss the default 2 MB cache for a pread each no more
                cur.execute("PRAGMA cache_size=-65536")
            cur.close()

        @sa_event.listens_for(eng, "begin")
        def _on_begin(conn: Connection) -> None:
            # A read transaction that upgrades to a write gets SQLITE_BUSY despite busy_timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return eng

    def create_schema(self) -> None:
        """Check at start that the store is current: a brand-new, empty database is created at head;
        one that is behind (or made by a newer release) raises :class:`StoreNotCurrent`."""
        from mfh_core import migrations

        with self._guard(), self._schema_lock() as conn:
            state = migrations.schema_state(conn)
            if state.empty:
                migrations.upgrade(conn)
                log.info("created the schema of %s at revision %s", display_url(self.url), state.head)
            elif not state.current:
                raise StoreNotCurrent(
                    f"the SQL store {display_url(self.url)} is {state.describe()}: run `mfh db upgrade`"
                    + (" with a newer release" if state.unknown else "")
                )
        self._start_checkpointer()

    def schema_state(self) -> Any:
        """Where the store's schema stands (a :class:`mfh_core.migrations.SchemaState`)."""
        from mfh_core import migrations

        with self._guard(), self._read.connect() as conn:
            return migrations.schema_state(conn)

    def upgrade_schema(self) -> tuple[str | None, str]:
        """Apply the pending migrations (``mfh db upgrade``); return (revision before, revision after)."""
        from mfh_core import migrations

        with self._guard(), self._schema_lock() as conn:
            try:
                before_after = migrations.upgrade(conn)
            except ValueError as e:
                raise StoreNotCurrent(f"the SQL store {display_url(self.url)} cannot be upgraded: {e}") from None
        self._start_checkpointer()
        return before_after

    @contextmanager
    def _schema_lock(self) -> Iterator[Connection]:
        """One write transaction that no other process's schema check or migration overlaps
        (SQLite: BEGIN IMMEDIATE; Postgres: a transaction-scoped advisory lock)."""
        with self._write.begin() as conn:
            if self.dialect == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_SCHEMA_LOCK})")
            yield conn

    def _start_checkpointer(self) -> None:
        if self.dialect == "sqlite" and self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="sqlite-checkpoint", daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self._checkpoint_interval_s):
            try:
                with self._read.connect() as conn:
                    conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
            except SQLAlchemyError as e:
                log.warning("sqlite checkpoint failed: %s", e)

    def close(self) -> None:
        self._stop.set()
        if self._checkpointer is not None:
            self._checkpointer.join(timeout=5)
            self._checkpointer = None
        self._write.dispose()
        self._read.dispose()

    # -- writes ----------------------------------------------------------------------------------

    def apply_batch(self, events: Sequence[MemoryEvent], *, published: bool = False) -> ApplyResult:
        """Insert the events (idempotent by id) and upsert the winners per key, in one transaction."""
        if not events:
            return ApplyResult(0, 0)
        unique = {e.event_id: e for e in events}
        ev_rows = [
            (
                e.event_id,
                e.op.value,
                e.namespace,
                e.key,
                e.kind.value,
                e.payload,
                e.version,
                e.origin,
                e.created_at,
                e.schema_version,
                published,
            )
            for e in sorted(unique.values(), key=lambda e: e.event_id)
        ]
        winners = _newest_per_key(unique.values())
        item_rows = [
            (
                e.namespace,
                e.key,
                e.kind.value,
                e.payload,
                e.version,
                e.origin,
                e.deleted,
                e.created_at,
                e.schema_version,
            )
            for e in winners
        ]
        self._write_rows(ev_rows, item_rows)
        return ApplyResult(len(ev_rows), len(item_rows))

    def apply_event_rows(
        self, rows: Sequence[tuple[Any, ...]], *, published: bool = False, index: bool = True
    ) -> ApplyResult:
        """:meth:`apply_batch` for events given as rows of :meth:`iter_event_rows` (a replay's fast
        path: no event objects). Same rules: idempotent by event id, the newest version per key wins.

        ``index=False`` leaves the search index behind the items (a replay indexes once at the end,
        :meth:`index_items`): only for a store nobody searches until then."""
        if not rows:
            return ApplyResult(0, 0)
        unique = {r[0]: r for r in rows}  # by event id
        ev_rows = [(*r, published) for r in unique.values()]  # in the given (commit) order
        best: dict[tuple[str, str], tuple[Any, ...]] = {}
        for r in unique.values():
            k = (r[2], r[3])
            cur = best.get(k)
            if cur is None or (r[6], r[7]) > (cur[6], cur[7]):
                best[k] = r
        delete = Op.DELETE.value
        item_rows = [
            (r[2], r[3], r[4], r[5], r[6], r[7], r[1] == delete, r[8], r[9])
            for _, r in sorted(best.items(), key=itemgetter(0))
        ]
        self._write_rows(ev_rows, item_rows, index=index)
        return ApplyResult(len(ev_rows), len(item_rows))

    def iter_event_rows(self, *, batch: int = 5000) -> Iterator[list[tuple[Any, ...]]]:
        """The event log in commit order as plain rows (the columns of the events table but ``seq`` and
        ``published``), in lists of up to ``batch``: what :meth:`apply_event_rows` takes."""
        mark = "?" if self.dialect == "sqlite" else "%s"
        cols = _EVENT_COLS.removesuffix(", published")
        sql = f"SELECT seq, {cols} FROM events WHERE seq > {mark} ORDER BY seq LIMIT {mark}"
        last = 0
        while True:
            with self._guard(), self._read.connect() as conn:
                cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    cur.execute(sql, (last, batch))
                    rows = cur.fetchall()
                finally:
                    cur.close()
            if not rows:
                return
            last = int(rows[-1][0])
            yield [tuple(r[1:]) for r in rows]

    def import_rows(self, events: Sequence[tuple[MemoryEvent, bool]], items: Sequence[Record]) -> None:
        """Copy rows from another store as they are (``mfh migrate``): events in the given (commit)
        order with their published flag, items under the same version guard as ``apply_batch``."""
        ev_rows = [
            (
                e.event_id,
                e.op.value,
                e.namespace,
                e.key,
                e.kind.value,
                e.payload,
                e.version,
                e.origin,
                e.created_at,
                e.schema_version,
                published,
            )
            for e, published in events
        ]
        item_rows = [
            (
                r.namespace,
                r.key,
                r.kind.value,
                r.payload,
                r.version,
                r.origin,
                r.deleted,
                r.updated_at,
                r.schema_version,
            )
            for r in sorted(items, key=lambda r: (r.namespace, r.key))
        ]
        self._write_rows(ev_rows, item_rows)

    def import_item_rows(self, rows: Sequence[tuple[Any, ...]], *, index: bool = True) -> None:
        """Upsert item rows given as tuples in column order (``namespace, key, kind, payload, version,
        origin, deleted, updated_at, schema_version``), version-guarded: the fast path of a restore.

        ``index=False``: the search index is left for one :meth:`index_items` at the end (a join: 30,000
        rows took 3.5 s + 8.3 s so, against 20.7 s indexed batch by batch)."""
        self._write_rows([], sorted(rows, key=lambda r: (r[0], r[1])), index=index)

    def index_items(self, *, batch: int = 5000) -> int:
        """Bring the search index up to the items: (re)index every item row, in key order, one
        transaction per ``batch`` (the docs' version guard makes a doc already current a no-op).

        What a replay does once at the end instead of indexing each batch: every key is indexed once,
        at its final version, and on SQLite the docs arrive in key order into an empty table (no
        update triggers, FTS rows added in ascending rowid order). Returns the items indexed.
        """
        if not self.index_search:
            return 0
        mark = "?" if self.dialect == "sqlite" else "%s"
        first = f"SELECT {_ITEM_COLS} FROM items ORDER BY namespace, key LIMIT {mark}"
        more = (
            f"SELECT {_ITEM_COLS} FROM items WHERE namespace > {mark} OR (namespace = {mark} AND key > {mark}) "
            f"ORDER BY namespace, key LIMIT {mark}"
        )
        done = 0
        last: tuple[str, str] | None = None
        while True:
            with self._guard(), self._write.begin() as conn:
                cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
                try:
                    if last is None:
                        cur.execute(first, (batch,))
                    else:
                        cur.execute(more, (last[0], last[0], last[1], batch))
                    rows = [tuple(r) for r in cur.fetchall()]
                    if rows:
                        _index_items(cur, self.dialect, rows)
                finally:
                    cur.close()
            if not rows:
                return done
            done += len(rows)
            last = (rows[-1][0], rows[-1][1])

    def _write_rows(
        self, ev_rows: Sequence[tuple[Any, ...]], item_rows: Sequence[tuple[Any, ...]], *, index: bool = True
    ) -> None:
        """Insert event rows (idempotent by id) and upsert item rows (version-guarded) in one transaction."""
        with self._guard(), self._write.begin() as conn:
            cur = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                if self.dialect == "postgresql" and ev_rows:
                    cur.execute(f"SELECT pg_advisory_xact_lock_shared({_WRITE_FENCE})")  # see _WRITE_FENCE
                if self.dialect == "sqlite":
                    if ev_rows:
                        cur.executemany(
                            f"INSERT INTO events ({_EVENT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                            "ON CONFLICT (event_id) DO NOTHING",
                            ev_rows,
                        )
                    if item_rows:
                        cur.executemany(
                            f"INSERT INTO items ({_ITEM_COLS}) VALUES (?,?,?,?,?,?,?,?,?) {_ITEM_UPDATE}", item_rows
                        )
                else:
                    from psycopg2.extras import execute_values

                    if ev_rows:
                        execute_values(
                            cur,
                            f"INSERT INTO events ({_EVENT_COLS}) VALUES %s ON CONFLICT (event_id) DO NOTHING",
                            ev_rows,
                            page_size=1000,
                        )
                    if item_rows:
                        execute_values(
                            cur,
                            f"INSERT INTO items ({_ITEM_COLS}) VALUES %s {_ITEM_UPDATE}",
                            item_rows,
                            page_size=1000,
                        )
                if item_rows and self.index_search and index:
                    self._write_docs(cur, item_rows)
            finally:
                cur.close()

    def replace_same_version(self, events: Sequence[MemoryEvent]) -> list[tuple[str, str]]:
        """Overwrite item rows that hold exactly an event's ``(version, origin)`` but other content.

        Only the cross-host audit's repair calls it: two rows with one ``(version, origin)`` must be the
        same row, so one that differs was changed behind the hub's back. A row at any other version is
        left alone (a newer one keeps winning; an older one is the upsert's business). Returns the
        (namespace, key) pairs it rewrote.
        """
        t = items_table
        done: list[tuple[str, str]] = []
        with self._guard(), self._write.begin() as conn:
            for e in sorted(events, key=lambda e: (e.namespace, e.key)):
                same = sa.and_(
                    t.c.namespace == e.namespace, t.c.key == e.key, t.c.version == e.version, t.c.origin == e.origin
                )
                differs = sa.or_(t.c.payload != e.payload, t.c.deleted != e.deleted, t.c.kind != e.kind.value)
                values = {
                    "kind": e.kind.value,
                    "payload": e.payload,
                    "deleted": e.deleted,
                    "updated_at": e.created_at,
                    "schema_version": e.schema_version,
                }
                if conn.execute(sa.update(t).where(same, differs).values(**values)).rowcount:
                    done.append((e.namespace, e.key))
        return done

    def _write_docs(self, cur: Any, item_rows: Sequence[tuple[Any, ...]]) -> None:
        _index_items(cur, self.dialect, item_rows)

    def mark_published(self, event_ids: Sequence[str]) -> None:
        """Record that these events are on JetStream (the outbox relays the rest)."""
        if not event_ids:
            return
        t = events_table
        with self._guard(), self._write.begin() as conn:
            for i in range(0, len(event_ids), 500):
                conn.execute(sa.update(t).where(t.c.event_id.in_(event_ids[i : i + 500])).values(published=True))

    # -- reads -------------------------------------------------------------------------------------

    def get(self, namespace: str, key: str) -> Record | None:
        """The stored row for one key, tombstones included."""
        t = items_table
        with self._guard(), self._read.connect() as conn:
            row = conn.execute(sa.select(t).where(t.c.namespace == namespace, t.c.key == key)).first()
        return _record(row) if row is not None else None

    def get_many(self, namespace: str, keys: Sequence[str]) -> dict[str, Record]:
        t = items_table
        out: dict[str, Record] = {}
        with self._guard(), self._read.connect() as conn:
            for i in range(0, len(keys), 500):
                stmt = sa.select(t).where(t.c.namespace == namespace, t.c.key.in_(keys[i : i + 500]))
                for row in conn.execute(stmt):
                    out[row.key] = _record(row)
        return out

    def newest_items(self, limit: int) -> list[Record]:
        """The ``limit`` item rows with the highest versions (tombstones too): what a joined host warms
        its hot store with (the first of them moves its clock past everything it restored)."""
        t = items_table
        stmt = sa.select(t).order_by(t.c.version.desc(), t.c.origin.desc()).limit(max(limit, 0))
        with self._guard(), self._read.connect() as conn:
            return [_record(row) for row in conn.execute(stmt)]

    def list_page(
        self,
        namespace: str,
        *,
        kind: Kind | None = None,
        key_prefix: str = "",
        after_key: str = "",
        limit: int = 100,
        include_deleted: bool = False,
    ) -> list[Record]:
        """One page of a namespace in key order (byte order), starting after ``after_key``."""
        t = items_table
        stmt = sa.select(t).where(t.c.namespace == namespace)
        if kind is not None:
            stmt = stmt.where(t.c.kind == kind.value)
        if key_prefix:
            # Keys are ASCII (validated), so DEL (0x7f) bounds every key that starts with the prefix.
            stmt = stmt.where(t.c.key >= key_prefix, t.c.key < key_prefix + "\x7f")
        if after_key:
            stmt = stmt.where(t.c.key > after_key)
        if not include_deleted:
            stmt = stmt.where(t.c.deleted == sa.false())
        stmt = stmt.order_by(t.c.key).limit(limit)
        with self._guard(), self._read.connect() as conn:
            return [_record(r) for r in conn.execute(stmt)]

    # -- the search index (mfh_core.search_sql) ----------------------------------------------------

    def search_keys(self, query: SearchQuery) -> list[tuple[str, str, float]]:
        """(namespace, key, score) of the live, unexpired docs that match ``query``."""
        with self._guard(), self._read.connect() as conn:
            return search_sql.search_keys(conn, self.dialect, query)

    def search_namespaces(self, namespace: str, *, prefix: bool) -> list[tuple[str, int, int | None]]:
        """(namespace, generation, embedding dimension) of the namespaces in scope."""
        with self._guard(), self._read.connect() as conn:
            return search_sql.namespace_rows(conn, namespace, prefix)

    def vectors_since(self, namespace: str, after_chg: int, dim: int | None) -> list[search_sql.VectorChunk]:
        """The namespace's docs changed after ``after_chg``, their vectors decoded for dimension ``dim``."""
        with self._guard(), self._read.connect() as conn:
            return search_sql.vectors_since(conn, namespace, after_chg, dim)

    def live_namespaces(self, prefix: str, now_ms: int) -> list[str]:
        """Namespaces at or below ``prefix`` holding a live, unexpired record, ascending."""
        with self._guard(), self._read.connect() as conn:
            return search_sql.live_namespaces(conn, prefix, now_ms)

    def expired(self, now_ms: int, *, limit: int = 500) -> list[tuple[str, str, int]]:
        """(namespace, key, version) of live records whose expiry has passed (what the sweep tombstones)."""
        with self._guard(), self._read.connect() as conn:
            return search_sql.expired(conn, now_ms, limit)

    def iter_items(self) -> Iterator[ChecksumRow]:
        """Every item row (tombstones too) as checksum rows."""
        with self.snapshot() as snap:
            yield from snap.iter_items()

    def checksum(self) -> str:
        """The one checksum (docs/architecture.md invariant 7) of the items table."""
        with self.snapshot() as snap:
            return snap.checksum()

    @contextmanager
    def snapshot(self, *, fenced: bool = False) -> Iterator[Snapshot]:
        """One consistent read view of items and events (a single repeatable-read transaction).

        ``fenced``: on Postgres, start the view while no write transaction is in flight (the write
        fence, held for the instant the view starts), so :meth:`Snapshot.watermark` is exact. SQLite
        has one writer at a time, so its views are always fenced.
        """
        with self._guard(), ExitStack() as stack:
            fence: Connection | None = None
            if fenced and self.dialect == "postgresql":
                fence = stack.enter_context(self._write.connect())
                stack.enter_context(fence.begin())
                fence.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_WRITE_FENCE})")
            conn = stack.enter_context(self._read.connect())  # checked out (and pinged) inside the fence
            if self.dialect == "postgresql":
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            stack.enter_context(conn.begin())
            if fence is not None:
                conn.exec_driver_sql("SELECT 1")  # the view starts here, while no write is in flight
                fence.commit()  # writers go on
            yield Snapshot(conn)

    def iter_events(self, *, after_seq: int = 0, batch: int = 2000) -> Iterator[tuple[int, MemoryEvent]]:
        """The event log in commit order, as (seq, event)."""
        t = events_table
        last = after_seq
        while True:
            with self._guard(), self._read.connect() as conn:
                rows = conn.execute(sa.select(t).where(t.c.seq > last).order_by(t.c.seq).limit(batch)).all()
            if not rows:
                return
            for r in rows:
                yield int(r.seq), _event(r)
            last = int(rows[-1].seq)

    def watch_page(
        self, namespace: str, key_prefix: str, after_seq: int, *, limit: int = 500, window: int = 10_000
    ) -> WatchPage:
        """:meth:`Snapshot.watch_page` in a fenced view (on Postgres, a sequence number is taken at insert
        time, not in commit order: the fence keeps a lower, later-committed seq from being skipped)."""
        with self.snapshot(fenced=True) as snap:
            return snap.watch_page(namespace, key_prefix, after_seq, limit=limit, window=window)

    def prune_events(self, *, below_seq: int, batch: int = 5000) -> Iterator[list[tuple[int, MemoryEvent, bool]]]:
        """Delete the events with ``seq < below_seq``, oldest first, one transaction per ``batch``;
        yields each batch (seq, event, published) before it is deleted, for the caller to archive.

        The event at ``below_seq`` itself stays, so a SQLite rowid never goes back and is reused.
        """
        t = events_table
        while True:
            with self._guard(), self._read.connect() as conn:
                rows = conn.execute(sa.select(t).where(t.c.seq < below_seq).order_by(t.c.seq).limit(batch)).all()
            if not rows:
                return
            yield [(int(r.seq), _event(r), bool(r.published)) for r in rows]
            last = int(rows[-1].seq)
            with self._guard(), self._write.begin() as conn:
                conn.execute(sa.delete(t).where(t.c.seq <= last))

    def existing_events(self, event_ids: Sequence[str]) -> set[str]:
        """Which of these events are committed: the proof a PERSISTED waiter falls back on."""
        t = events_table
        found: set[str] = set()
        with self._guard(), self._read.connect() as conn:
            for i in range(0, len(event_ids), 500):
                stmt = sa.select(t.c.event_id).where(t.c.event_id.in_(event_ids[i : i + 500]))
                found.update(conn.execute(stmt).scalars())
        return found

    def unpublished(self, *, limit: int = 1000) -> list[tuple[int, MemoryEvent]]:
        """The oldest events not yet on JetStream, in commit order."""
        t = events_table
        stmt = sa.select(t).where(t.c.published == sa.false()).order_by(t.c.seq).limit(limit)
        with self._guard(), self._read.connect() as conn:
            return [(int(r.seq), _event(r)) for r in conn.execute(stmt)]

    def counts(self) -> dict[str, int]:
        """Row counts for metrics and status: items, events, unpublished events."""
        with self._guard(), self._read.connect() as conn:
            items = conn.execute(sa.select(sa.func.count()).select_from(items_table)).scalar_one()
            events = conn.execute(sa.select(sa.func.count()).select_from(events_table)).scalar_one()
            unpublished = conn.execute(
                sa.select(sa.func.count()).select_from(events_table).where(events_table.c.published == sa.false())
            ).scalar_one()
        return {"items": int(items), "events": int(events), "unpublished": int(unpublished)}

    # -- errors ------------------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Driver errors become ours where they enter: a down or locked database is Unavailable (retry)."""
        try:
            yield
        except IntegrityError as e:
            raise InvalidArgument(f"{self.dialect} rejected the batch: {e.orig}") from e
        except DBAPIError as e:
            damaged = self._damage(e.orig)
            if damaged is not None:
                raise damaged from e
            raise Unavailable(f"{self.dialect} unavailable: {e.orig}") from e
        except SQLAlchemyError as e:
            raise Unavailable(f"{self.dialect} error: {e}") from e

    def _damage(self, orig: BaseException | None) -> StoreDamaged | None:
        """A StoreDamaged naming the file when a SQLite error says the file itself is damaged."""
        if self.dialect != "sqlite" or not isinstance(orig, sqlite3.DatabaseError):
            return None
        code = getattr(orig, "sqlite_errorcode", None)
        text = str(orig)
        if (code is not None and code & 0xFF in _SQLITE_DAMAGED) or "not a database" in text or "malformed" in text:
            path = self.sqlite_path
            return StoreDamaged(
                f"the SQLite file {path} is corrupt ({text}): restore it "
                "(docs/operations.md, 'The SQLite file is corrupt')",
                path=str(path),
            )
        return None
