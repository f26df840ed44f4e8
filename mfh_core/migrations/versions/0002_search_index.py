"""Search and expiry: the derived ``search_docs`` index (full text, filters, embeddings, expiry) and
``search_namespaces`` (embedding dimension and change generation per namespace).

Full text is SQLite FTS5 (an external-content table: triggers keep it on update and delete; new rows
are added by the writer in one INSERT ... SELECT per batch, a third of what an insert trigger costs)
or a Postgres GIN index on ``to_tsvector('english', body)``; neither needs an extension. Existing
items are indexed here, so an upgraded store is searchable at once.

Revision ID: 0002
Revises: 0001
Create Date: release 0.2.0
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_SQLITE_FTS = (
    "CREATE VIRTUAL TABLE search_fts USING fts5(body, content='search_docs', tokenize='porter unicode61')",
    "CREATE TRIGGER search_docs_ad AFTER DELETE ON search_docs BEGIN "
    "INSERT INTO search_fts(search_fts, rowid, body) VALUES ('delete', old.rowid, old.body); END",
    "CREATE TRIGGER search_docs_au AFTER UPDATE ON search_docs BEGIN "
    "INSERT INTO search_fts(search_fts, rowid, body) VALUES ('delete', old.rowid, old.body); "
    "INSERT INTO search_fts(rowid, body) VALUES (new.rowid, new.body); END",
)
_PG_FTS = "CREATE INDEX ix_search_docs_fts ON search_docs USING gin (to_tsvector('english', body))"


def _text_c(length: int) -> sa.types.TypeEngine[str]:
    return sa.String(length, collation="C").with_variant(sa.String(length), "sqlite")


def upgrade() -> None:
    json_type = sa.Text().with_variant(JSONB(), "postgresql")
    op.create_table(
        "search_docs",
        sa.Column("namespace", _text_c(64), primary_key=True),
        sa.Column("key", _text_c(256), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("origin", _text_c(32), nullable=False),
        sa.Column("deleted", sa.Boolean, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.BigInteger, nullable=True),
        sa.Column("tags", json_type, nullable=False),
        sa.Column("meta", json_type, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("dim", sa.Integer, nullable=True),
        sa.Column("chg", sa.BigInteger, nullable=False),
    )
    op.create_index(
        "ix_search_docs_expires",
        "search_docs",
        ["expires_at"],
        sqlite_where=sa.text("expires_at IS NOT NULL"),
        postgresql_where=sa.text("expires_at IS NOT NULL"),
    )
    op.create_index("ix_search_docs_chg", "search_docs", ["namespace", "chg"])
    op.create_index("ix_search_docs_updated", "search_docs", ["namespace", "updated_at"])
    op.create_table(
        "search_namespaces",
        sa.Column("namespace", _text_c(64), primary_key=True),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("dim", sa.Integer, nullable=True),
    )
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for stmt in _SQLITE_FTS:
            op.execute(stmt)
    else:
        op.execute(_PG_FTS)
    _index_existing(bind)


def _index_existing(bind: sa.engine.Connection) -> None:
    """Index the items a 0.1.0 store already holds (the same rows apply_batch would write)."""
    from mfh_core.sqlstore import _index_items  # the one derivation, shared with the write path

    cols = "namespace, key, kind, payload, version, origin, deleted, updated_at, schema_version"
    rows = [tuple(r) for r in bind.exec_driver_sql(f"SELECT {cols} FROM items ORDER BY namespace, key")]
    if rows:
        cur = bind.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            _index_items(cur, bind.dialect.name, rows)
        finally:
            cur.close()


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        for name in ("search_docs_ad", "search_docs_au"):
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        op.execute("DROP TABLE IF EXISTS search_fts")
    else:
        op.execute("DROP INDEX IF EXISTS ix_search_docs_fts")
    op.drop_table("search_namespaces")
    op.drop_index("ix_search_docs_updated", table_name="search_docs")
    op.drop_index("ix_search_docs_chg", table_name="search_docs")
    op.drop_index("ix_search_docs_expires", table_name="search_docs")
    op.drop_table("search_docs")
