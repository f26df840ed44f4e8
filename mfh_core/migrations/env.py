"""Alembic's environment: always online, on the connection the caller (mfh_core.migrations) hands in."""

from __future__ import annotations

from alembic import context

from mfh_core.migrations import include_name
from mfh_core.sqlstore import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `mfh db upgrade` (mfh_core.migrations.upgrade), not the alembic CLI")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, include_name=include_name)
with context.begin_transaction():
    context.run_migrations()
