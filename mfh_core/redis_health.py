"""What the Redis a process uses keeps on disk, and which Redis it is (its ``run_id``).

Every process checks at start-up (docs/architecture.md invariant 4): with no append-only file, a Redis crash
loses the staged writes not yet in SQL and the queued batches, so the process logs one warning
that says so and how to fix it, and exports ``mfh_redis_persistence{mode}``. A Redis that refuses
``CONFIG`` (managed services often do) is reported as ``unknown``, not as an error.
"""

from __future__ import annotations

import logging
from typing import Any, Literal
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from mfh_core.metrics import REDIS_PERSISTENCE

__all__ = [
    "MODES",
    "Persistence",
    "check_persistence",
    "classify",
    "describe_url",
    "persistence_of",
    "persistence_of_sync",
    "report_persistence",
    "run_id_of",
]

log = logging.getLogger("mfh.redis")

Persistence = Literal["aof", "rdb", "none", "unknown"]
MODES: tuple[Persistence, ...] = ("aof", "rdb", "none", "unknown")

_reported: set[str] = set()


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def classify(config: dict[Any, Any]) -> Persistence:
    """``aof`` (append-only file on), ``rdb`` (snapshots only) or ``none``, from ``CONFIG GET`` answers."""
    values = {_text(k): _text(v) for k, v in config.items()}
    if values.get("appendonly", "no").lower() == "yes":
        return "aof"
    if values.get("save", "").strip():
        return "rdb"
    return "none"


async def persistence_of(client: aioredis.Redis) -> Persistence:
    """Ask a Redis what it keeps on disk; ``unknown`` when it refuses CONFIG. Connection errors propagate."""
    try:
        config = await client.config_get("appendonly")
        config.update(await client.config_get("save"))
    except ResponseError:  # unknown command, NOPERM, renamed CONFIG...
        return "unknown"
    return classify(config)


def persistence_of_sync(client: redis.Redis) -> Persistence:
    """:func:`persistence_of` for a blocking client (the run script's Redis check)."""
    try:
        config = client.config_get("appendonly")
        config.update(client.config_get("save"))
    except ResponseError:
        return "unknown"
    return classify(config)


async def check_persistence(client: aioredis.Redis, *, url: str, process: str) -> Persistence | None:
    """Start-up check of a process: report what its Redis keeps (gauge, one log line); None if Redis is down."""
    try:
        mode = await persistence_of(client)
    except RedisError:
        return None
    report_persistence(mode, url=url, process=process)
    return mode


async def run_id_of(client: aioredis.Redis) -> str | None:
    """The server's ``run_id``: a new one means Redis restarted (and lost or reloaded what it held)."""
    try:
        info = await client.info("server")
    except ResponseError:  # INFO refused: restarts go unseen; the stale sweep and reconcile still run
        return None
    rid = info.get("run_id")
    return _text(rid) if rid else None


def describe_url(url: str) -> str:
    """``host:port/db`` of a Redis URL, without credentials, for log lines."""
    parts = urlsplit(url)
    db = parts.path.strip("/") or "0"
    return f"{parts.hostname or '127.0.0.1'}:{parts.port or 6379}/{db}"


def report_persistence(mode: Persistence, *, url: str, process: str) -> None:
    """Set the gauge; log once per process what a Redis crash would lose and how to stop that."""
    for m in MODES:
        REDIS_PERSISTENCE.labels(mode=m).set(1 if m == mode else 0)
    where = describe_url(url)
    if where in _reported:
        return
    _reported.add(where)
    if mode == "aof":
        log.info("%s: Redis at %s keeps an append-only file", process, where)
    elif mode == "unknown":
        log.info(
            "%s: Redis at %s does not allow CONFIG GET, so whether it keeps an append-only file is unknown;"
            " without one a Redis crash loses writes not yet in SQL",
            process,
            where,
        )
    else:
        kept = "only RDB snapshots" if mode == "rdb" else "nothing on disk"
        lost = " made since its last snapshot" if mode == "rdb" else ""
        log.warning(
            "%s: Redis at %s keeps %s (appendonly no): a Redis crash or restart loses every acknowledged"
            " write%s not yet persisted to SQL and the queued write batches. Fix: turn on its append-only"
            " file (appendonly yes, appendfsync everysec in redis.conf, or CONFIG SET appendonly yes;"
            " scripts/run.sh starts the hub's own Redis that way), or write with durability=PERSISTED",
            process,
            where,
            kept,
            lost,
        )
