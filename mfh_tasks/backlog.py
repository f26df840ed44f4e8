"""The write path's backlog at one moment: queued batches, dead letters, dirty entries, unpublished events.

``mfh status`` reads it once; the scheduler samples it every few seconds into the gauges
``mfh_queue_depth``, ``mfh_dead_letters``, ``mfh_dirty_entries``, ``mfh_dirty_oldest_age_seconds``
and ``mfh_unpublished_events``. Plain reads only: nothing here registers with Dramatiq as a worker
(its ``qsize`` dispatch would) or changes a key.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from mfh_core import SqlStore
from mfh_core.metrics import DEAD_LETTERS, DIRTY_ENTRIES, DIRTY_OLDEST_AGE, QUEUE_DEPTH, UNPUBLISHED_EVENTS

__all__ = ["Backlog", "export_backlog", "sample_backlog"]

DRAMATIQ_NAMESPACE = "dramatiq"  # RedisBroker's default, which build_broker keeps


@dataclass(frozen=True, slots=True)
class Backlog:
    queued: int  # batches waiting in the queue or held by a worker
    delayed: int  # batches waiting out a retry backoff
    dead_letters: int
    dirty: int
    oldest_dirty_age_s: float | None  # None: nothing dirty
    unpublished: int | None  # None: not measured (no SQL given, or SQL unavailable)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def sample_backlog(
    client: aioredis.Redis,
    *,
    redis_prefix: str,
    queue_name: str,
    sql: SqlStore | None = None,
    namespace: str = DRAMATIQ_NAMESPACE,
) -> Backlog:
    """One reading. Redis errors propagate; an unavailable SQL leaves ``unpublished`` None."""
    q = f"{namespace}:{queue_name}"
    dirty_key = f"{redis_prefix}:dirty"
    pipe = client.pipeline(transaction=False)
    pipe.hlen(f"{q}.msgs")
    pipe.hlen(f"{q}.DQ.msgs")
    pipe.zcard(f"{q}.XQ")
    pipe.zcard(dirty_key)
    pipe.zrange(dirty_key, 0, 0, withscores=True)
    pipe.time()
    queued, delayed, dead, dirty, oldest, (secs, micros) = await pipe.execute()
    age = None
    if oldest:
        now_ms = int(secs) * 1000 + int(micros) // 1000
        age = max(now_ms - float(oldest[0][1]), 0.0) / 1000
    unpublished = None
    if sql is not None:
        try:
            unpublished = (await asyncio.to_thread(sql.counts))["unpublished"]
        except Exception:  # Unavailable, locked...: status reports SQL by its own probe
            unpublished = None
    return Backlog(int(queued), int(delayed), int(dead), int(dirty), age, unpublished)


def export_backlog(b: Backlog) -> None:
    """Set the backlog gauges of this process."""
    QUEUE_DEPTH.labels(state="ready").set(b.queued)
    QUEUE_DEPTH.labels(state="delayed").set(b.delayed)
    DEAD_LETTERS.set(b.dead_letters)
    DIRTY_ENTRIES.set(b.dirty)
    DIRTY_OLDEST_AGE.set(b.oldest_dirty_age_s or 0.0)
    if b.unpublished is not None:
        UNPUBLISHED_EVENTS.set(b.unpublished)
