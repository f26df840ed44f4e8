"""A store of release 0.1.0, made before migrations existed, from the dumps in tests/fixtures/."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from sqlalchemy.engine import make_url

FIXTURES = Path(__file__).parent / "fixtures"
#: The items checksum of the rows in the dumps (taken when they were made).
LEGACY_CHECKSUM = "bd606371b095a3678113fc611871da59f669b7f2c030b3c45052394f9d1fcc31"
LEGACY_COUNTS = {"items": 3, "events": 5, "unpublished": 2}


def build_legacy_store(url: str, *, rows: bool = True) -> None:
    """Load the 0.1.0 schema (and, with ``rows``, its few items and events) into the empty database at ``url``."""
    u = make_url(url)
    dialect = "sqlite" if u.get_backend_name() == "sqlite" else "postgres"
    sql = (FIXTURES / f"store_0_1_0.{dialect}.sql").read_text(encoding="utf-8")
    if not rows:
        sql = sql.split("\n-- rows\n", 1)[0]
    if dialect == "sqlite":
        assert u.database
        con = sqlite3.connect(u.database)
        try:
            con.executescript(sql)
        finally:
            con.close()
        return
    import psycopg2

    con = psycopg2.connect(u.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        with con, con.cursor() as cur:
            cur.execute(sql)
    finally:
        con.close()
