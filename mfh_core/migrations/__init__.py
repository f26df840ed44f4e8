"""The SQL schema's history as Alembic migrations, shipped inside the package (SQLite and Postgres).

Every change to the tables in :mod:`mfh_core.sqlstore` arrives as a new file in ``versions/``;
``mfh db upgrade`` applies them. A store made before migrations existed (the tables of revision
``0001`` without an ``alembic_version`` table) is adopted by ``mfh db upgrade``: its tables are
checked against revision 0001, stamped, then upgraded. Callers hand in a connection that is already
inside a transaction (and holds the store's lock), so a migration and its check are one unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

__all__ = ["BASELINE", "SchemaState", "head", "include_name", "schema_state", "upgrade"]

SCRIPT_DIR = Path(__file__).resolve().parent
#: The first revision: the schema as it was before migrations (tables created by ``create_all``).
BASELINE = "0001"
#: What revision 0001 holds, to recognise a store made before migrations existed.
_BASELINE_COLUMNS = {
    "items": {"namespace", "key", "kind", "payload", "version", "origin", "deleted", "updated_at", "schema_version"},
    "events": {
        "seq",
        "event_id",
        "op",
        "namespace",
        "key",
        "kind",
        "payload",
        "version",
        "origin",
        "created_at",
        "schema_version",
        "published",
    },
}


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """What autogenerate compares: not the full-text parts of revisions 0002 and 0003, which no SQLAlchemy
    model declares (SQLite's FTS5 table and its shadow tables; Postgres's generated ``body_tsv`` column
    and its GIN index)."""
    if type_ == "table" and name is not None and name.startswith("search_fts"):
        return False
    if type_ == "column" and name == "body_tsv":
        return False
    return not (type_ == "index" and name == "ix_search_docs_fts")


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_DIR))
    if conn is not None:
        cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def _known(rev: str) -> bool:
    try:
        return ScriptDirectory.from_config(_config()).get_revision(rev) is not None
    except Exception:  # alembic raises its own errors for unknown or malformed ids
        return False


@dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a store stands: its revision (None when unversioned), and whether it has our tables."""

    revision: str | None
    head: str
    has_tables: bool

    @property
    def empty(self) -> bool:
        """A brand-new database: created at head automatically."""
        return self.revision is None and not self.has_tables

    @property
    def current(self) -> bool:
        return self.revision == self.head

    @property
    def unknown(self) -> bool:
        """At a revision this code does not know (made by a newer release)."""
        return self.revision is not None and not _known(self.revision)

    def describe(self) -> str:
        if self.empty:
            return f"empty (no tables); head is {self.head}"
        if self.revision is None:
            return f"made before migrations (revision {BASELINE} unstamped); head is {self.head}"
        if self.unknown:
            return f"at revision {self.revision}, which this release does not know (a newer one made it)"
        return f"at revision {self.revision}; head is {self.head}"


def schema_state(conn: Connection) -> SchemaState:
    names = set(sa.inspect(conn).get_table_names())
    revision = MigrationContext.configure(conn).get_current_revision()
    return SchemaState(revision=revision, head=head(), has_tables=bool(names & set(_BASELINE_COLUMNS)))


def _check_baseline(conn: Connection) -> None:
    insp = sa.inspect(conn)
    for table, want in _BASELINE_COLUMNS.items():
        have = {c["name"] for c in insp.get_columns(table)} if insp.has_table(table) else set()
        if have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            raise ValueError(
                f"table {table} is not the hub's revision {BASELINE} "
                f"(missing {missing or 'none'}, extra {extra or 'none'})"
            )


def upgrade(conn: Connection) -> tuple[str | None, str]:
    """Bring the store to head (adopting a pre-migration store first); return (before, after).

    Raises ValueError for a store this release cannot upgrade (unknown revision, foreign tables).
    """
    state = schema_state(conn)
    if state.unknown:
        raise ValueError(state.describe())
    cfg = _config(conn)
    if state.revision is None and state.has_tables:
        _check_baseline(conn)
        command.stamp(cfg, BASELINE)
    if not state.current:
        command.upgrade(cfg, "head")
    return state.revision, head()
