"""Upgradeable stores: a store of release 0.1.0 is refused until ``mfh db upgrade``; migrations = metadata.

The contract suite (tests/test_sqlstore.py) also runs on a 0.1.0 store upgraded by ``mfh db upgrade``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from factories import event
from hosts import TestHost, make_host
from legacy_store import LEGACY_CHECKSUM, LEGACY_COUNTS, build_legacy_store

from mfh_core import SqlStore
from mfh_core.migrations import head, include_name
from mfh_core.sqlstore import engine_url, metadata
from mfh_models import StoreNotCurrent


def mfh(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mfh_api.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or dict(os.environ),
        check=False,
    )


def test_a_store_of_release_0_1_0_is_refused_then_upgraded_by_mfh_db_upgrade(db_url: str) -> None:
    # Given a store made by 0.1.0 (its tables, a few rows, no alembic_version)
    build_legacy_store(db_url)
    store = SqlStore(db_url)
    try:
        # When a process opens it, it refuses with one line naming the command
        with pytest.raises(StoreNotCurrent, match="run `mfh db upgrade`") as refused:
            store.create_schema()
        assert "\n" not in str(refused.value) and "before migrations" in str(refused.value)
        # When the operator runs the command
        out = mfh("db", "upgrade", "--url", db_url)
        assert out.returncode == 0, out.stderr
        assert f"to {head()}" in out.stdout
        # Then the store is current, its rows are intact, and it takes new writes
        store.create_schema()
        assert store.schema_state().current
        assert store.counts() == LEGACY_COUNTS and store.checksum() == LEGACY_CHECKSUM
        got = store.get("ns", "alpha")
        assert got is not None and got.payload == '{"content":"newer"}'
        store.apply_batch([event("delta", 9)])
        assert [seq for seq, _ in store.iter_events()] == [1, 2, 3, 4, 5, 6]  # the sequence carried on
        # And a second upgrade is a no-op
        again = mfh("db", "upgrade", "--url", db_url)
        assert again.returncode == 0 and "already at revision" in again.stdout, again.stderr
    finally:
        store.close()


def test_the_migrations_build_exactly_the_tables_the_store_declares(db_url: str) -> None:
    # Given a brand-new database, created at head by the first process that opens it
    store = SqlStore(db_url)
    try:
        store.create_schema()
        assert store.schema_state().revision == head()
    finally:
        store.close()
    # Then autogenerate finds nothing to change between the migrated schema and mfh_core.sqlstore.metadata
    engine = sa.create_engine(engine_url(db_url))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True, "include_name": include_name}), metadata
            )
    finally:
        engine.dispose()
    assert diff == []


def test_a_store_made_by_a_newer_release_is_refused(sqlite_url: str) -> None:
    store = SqlStore(sqlite_url)
    try:
        store.create_schema()
        with store._write.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
        with pytest.raises(StoreNotCurrent, match="does not know"):
            store.create_schema()
    finally:
        store.close()
    out = mfh("db", "upgrade", "--url", sqlite_url)
    assert out.returncode != 0 and out.stderr.count("\n") == 1 and "9999" in out.stderr, out.stderr


def test_mfh_db_status_says_where_a_store_stands(sqlite_url: str, tmp_path: Path) -> None:
    out = mfh("db", "status", "--url", sqlite_url)
    assert out.returncode == 0 and "empty" in out.stdout, out.stderr
    legacy = f"sqlite:///{tmp_path}/legacy.db"
    build_legacy_store(legacy)
    out = mfh("db", "status", "--url", legacy)
    assert out.returncode == 1 and "before migrations" in out.stdout, out.stdout


@pytest.fixture
def legacy_host(tmp_path: Path, redis_url: str) -> TestHost:
    host = make_host(tmp_path, redis_url=redis_url)
    build_legacy_store(host.settings.storage.database_url)
    return host


@pytest.mark.parametrize(
    "command",
    [["api"], ["worker", "--processes", "1", "--threads", "1"], ["checksum"], ["snapshot"], ["audit"]],
    ids=lambda c: c[0],
)
def test_each_process_refuses_a_store_that_is_not_current(legacy_host: TestHost, command: list[str]) -> None:
    # Given a host whose SQL store was made by 0.1.0 and not upgraded
    # When its process starts
    out = mfh(*command, env=legacy_host.env)
    # Then it exits at once with one line that names the command, and no traceback
    assert out.returncode != 0, out.stdout
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    refusal = [line for line in lines if "mfh db upgrade" in line]
    assert len(refusal) == 1, out.stderr
    # And after the upgrade, the one-shot commands run
    assert mfh("db", "upgrade", env=legacy_host.env).returncode == 0
    if command[0] == "checksum":
        again = mfh("checksum", env=legacy_host.env)
        assert again.returncode == 0 and again.stdout.strip() == LEGACY_CHECKSUM, again.stderr


def test_processes_starting_together_on_an_empty_database_create_it_once(db_url: str) -> None:
    # Given four processes' stores opening one brand-new database at the same moment
    from concurrent.futures import ThreadPoolExecutor

    stores = [SqlStore(db_url) for _ in range(4)]
    try:
        # When each checks its schema at start
        with ThreadPoolExecutor(len(stores)) as pool:
            errors = [f.exception() for f in [pool.submit(s.create_schema) for s in stores]]
        # Then none fails (no "table already exists"), and the store is at head
        assert errors == [None] * len(stores)
        assert stores[0].schema_state().current
    finally:
        for s in stores:
            s.close()
