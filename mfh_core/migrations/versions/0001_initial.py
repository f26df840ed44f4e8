"""The initial schema: the items table and the append-only events log (as before migrations).

Revision ID: 0001
Revises:
Create Date: the schema of release 0.1.0
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _text_c(length: int) -> sa.types.TypeEngine[str]:
    # Byte order ("C" collation) on Postgres, as mfh_core.sqlstore declares it.
    return sa.String(length, collation="C").with_variant(sa.String(length), "sqlite")


def upgrade() -> None:
    op.create_table(
        "items",
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
    op.create_table(
        "events",
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
    )
    op.create_index("ix_events_unpublished", "events", ["published", "seq"])


def downgrade() -> None:
    op.drop_index("ix_events_unpublished", table_name="events")
    op.drop_table("events")
    op.drop_table("items")
