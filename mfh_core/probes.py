"""One-shot probes of the stores a host depends on, for ``mfh status``: reachable, how fast, and what state.

Each probe is bounded by ``timeout_s``, changes nothing, and never raises: a failure is a
:class:`Probe` with ``ok=False`` and a one-line ``detail`` naming the cause. The SQL probe of a
SQLite file takes the write lock for an instant (``BEGIN IMMEDIATE`` then ``ROLLBACK``): a plain
read succeeds while another connection holds the lock, and would call a store healthy that no
worker can write to.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import sqlalchemy as sa
from redis.exceptions import RedisError

from mfh_core.nats_security import NatsSecurity, describe_connect_error, is_fatal_connect_error
from mfh_core.redaction import redact_text
from mfh_core.redis_health import persistence_of
from mfh_models import ConfigError

__all__ = ["Probe", "probe_nats", "probe_redis", "probe_sql"]


@dataclass(frozen=True, slots=True)
class Probe:
    ok: bool
    latency_ms: float | None
    detail: str  # on failure the cause; on success what was found (mode, stream size, ...)
    state: str = "ok"  # ok, unreachable, locked, corrupt, missing, off
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def _one_line(e: BaseException) -> str:
    return redact_text(" ".join(f"{type(e).__name__}: {e}".split()))[:200]


async def probe_redis(client: aioredis.Redis, *, timeout_s: float = 2.0) -> Probe:
    """PING round trip, and what the Redis keeps on disk (``extra['persistence']``)."""
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(client.ping(), timeout_s)
        latency = _ms(t0)
        mode = await asyncio.wait_for(persistence_of(client), timeout_s)
    except (RedisError, OSError, TimeoutError) as e:
        return Probe(False, None, _one_line(e), "unreachable")
    return Probe(True, latency, f"persistence {mode}", extra={"persistence": mode})


def _sqlite_path(url: str) -> str | None:
    u = sa.engine.make_url(url)
    return u.database if u.get_backend_name() == "sqlite" else None


def probe_sql(url: str, *, timeout_s: float = 1.0) -> Probe:
    """Can a writer go ahead now? SQLite: the write lock within ``timeout_s``; Postgres: ``SELECT 1``."""
    path = _sqlite_path(url)
    return _probe_sqlite(path, timeout_s) if path is not None else _probe_server(url, timeout_s)


def _probe_sqlite(path: str, timeout_s: float) -> Probe:
    if not path or not Path(path).exists():
        return Probe(False, None, f"SQLite file {path} does not exist", "missing")
    t0 = time.perf_counter()
    conn: sqlite3.Connection | None = None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=timeout_s, isolation_level=None)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return Probe(
                False,
                None,
                f"{path} is locked: no write lock within {timeout_s:g}s (another writer holds it)",
                "locked",
            )
        return Probe(False, None, f"{path}: {e}", "unreachable")
    except sqlite3.DatabaseError as e:  # "file is not a database", "database disk image is malformed"
        return Probe(False, None, f"{path} is corrupt: {e}", "corrupt")
    finally:
        if conn is not None:
            conn.close()
    return Probe(True, _ms(t0), f"sqlite {path}")


def _probe_server(url: str, timeout_s: float) -> Probe:
    u = sa.engine.make_url(url)
    t0 = time.perf_counter()
    engine = None
    try:
        engine = sa.create_engine(
            url, poolclass=sa.pool.NullPool, connect_args={"connect_timeout": max(int(timeout_s), 1)}
        )
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1")).scalar_one()
    except Exception as e:  # a driver error of any kind: unreachable, auth, missing database
        return Probe(False, None, _one_line(e), "unreachable")
    finally:
        if engine is not None:
            engine.dispose()
    return Probe(True, _ms(t0), f"{u.get_backend_name()} {u.host}:{u.port or 5432}/{u.database}")


async def probe_nats(url: str, *, stream: str, timeout_s: float = 2.0, security: NatsSecurity | None = None) -> Probe:
    """Connect, one round trip, and the stream's size (``extra['messages']``); never reconnects, never creates.

    ``security``: TLS and credentials (else those the URL implies); the detail never shows a password.
    """
    from nats.aio.client import Client as NATS
    from nats.errors import Error as NatsError

    async def quiet(_e: Exception) -> None:  # nats-py prints connection errors to stderr otherwise
        return None

    security = security if security is not None else NatsSecurity.from_url(url)
    t0 = time.perf_counter()
    nc: NATS | None = None
    try:
        client = NATS()
        options: dict[str, Any] = {
            **security.connect_options(lambda: client),
            "connect_timeout": timeout_s,
            "allow_reconnect": False,
            "max_reconnect_attempts": 0,
            "error_cb": quiet,
            "name": "mfh-status",
        }
        nc = client
        await asyncio.wait_for(client.connect(**options), timeout_s + 1)
        await nc.flush(timeout=max(int(timeout_s), 1))
        latency = _ms(t0)
        try:
            info = await nc.jetstream(timeout=timeout_s).stream_info(stream)
        except (NatsError, TimeoutError) as e:
            return Probe(True, latency, f"stream {stream} unreadable: {_one_line(e)}", "ok", {"messages": None})
        messages = int(info.state.messages)
        return Probe(True, latency, f"stream {stream}: {messages} messages", extra={"messages": messages})
    except ConfigError as e:  # a TLS file that cannot be read
        return Probe(False, None, e.message, "unreachable")
    except (NatsError, OSError, TimeoutError) as e:
        why = describe_connect_error(e, security) if is_fatal_connect_error(e) else _one_line(e)
        return Probe(False, None, f"{security.display_url}: {redact_text(why)[:300]}", "unreachable")
    finally:
        if nc is not None:
            # Bounded: after a failed TLS handshake nats-py's close can wait forever on its reader.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
