"""Postgres full text from a stored ``tsvector`` column: a query no longer re-parses each candidate's body.

Revision 0002 indexed the expression ``to_tsvector('english', body)``: every row the GIN index returned
was re-parsed (stemmed) to recheck the match and again to rank it, about 20 us a row, most of a
query's time. Here the vector is a generated column, ``body_tsv`` (computed once per write, as the
expression index computed it), and the GIN index covers it; ``gin_pending_list_limit`` is cut to
512 kB so a query scans at most 64 pending pages (a full 4 MB list added 2-6 ms to every query until
a vacuum merged it). SQLite is unchanged. The ALTER rewrites ``search_docs`` once (derived rows only).

Revision ID: 0003
Revises: 0002
Create Date: release 0.2.0
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_PG_UP = (
    "DROP INDEX IF EXISTS ix_search_docs_fts",
    "ALTER TABLE search_docs ADD COLUMN body_tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED",
    "CREATE INDEX ix_search_docs_fts ON search_docs USING gin (body_tsv) WITH (gin_pending_list_limit = 512)",
)
_PG_DOWN = (
    "DROP INDEX IF EXISTS ix_search_docs_fts",
    "ALTER TABLE search_docs DROP COLUMN IF EXISTS body_tsv",
    "CREATE INDEX ix_search_docs_fts ON search_docs USING gin (to_tsvector('english', body))",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for stmt in _PG_UP:
            op.execute(stmt)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for stmt in _PG_DOWN:
            op.execute(stmt)
