"""Replication lag per peer host, kept by the replicator in Redis for ``mfh status`` and in gauges.

Lag is measured on each remote event as it is applied here (created on its origin → applied
here). The replicator writes the last value per origin, and its consumer's backlog on the stream
(events not yet delivered, delivered and not yet acked), every couple of seconds:
``<prefix>:replication:peers`` (a hash, one JSON field per origin) and
``<prefix>:replication:consumer`` (expires when the replicator stops refreshing it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import redis.asyncio as aioredis

from mfh_core.metrics import REPLICATION_LAST_APPLIED, REPLICATION_LAST_LAG, REPLICATION_PENDING

__all__ = ["ConsumerBacklog", "PeerLag", "PeerLagBook", "read_consumer_backlog", "read_peer_lag"]


@dataclass(frozen=True, slots=True)
class PeerLag:
    origin: str
    lag_s: float  # of the last event applied from this origin
    applied_at: float  # unix seconds

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ConsumerBacklog:
    pending: int  # in the stream, not yet delivered to this host
    ack_pending: int  # delivered, not yet applied and acked
    at: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _peers_key(prefix: str) -> str:
    return f"{prefix}:replication:peers"


def _consumer_key(prefix: str) -> str:
    return f"{prefix}:replication:consumer"


class PeerLagBook:
    """The replicator's notes: :meth:`note` per applied event (cheap), :meth:`flush` now and then."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._last: dict[str, PeerLag] = {}
        self._dirty: set[str] = set()

    def note(self, origin: str, lag_s: float, now_s: float | None = None) -> None:
        at = time.time() if now_s is None else now_s
        self._last[origin] = PeerLag(origin, lag_s, at)
        self._dirty.add(origin)
        REPLICATION_LAST_LAG.labels(origin=origin).set(lag_s)
        REPLICATION_LAST_APPLIED.labels(origin=origin).set(at)

    async def flush(self, client: aioredis.Redis, consumer: dict[str, int] | None = None) -> None:
        """Write what changed since the last flush, and the consumer's counters; Redis errors propagate."""
        pipe = client.pipeline(transaction=False)
        if self._dirty:
            pipe.hset(
                _peers_key(self.prefix),
                mapping={o: json.dumps(self._last[o].as_dict()) for o in sorted(self._dirty)},
            )
        if consumer is not None:
            backlog = ConsumerBacklog(consumer.get("num_pending", 0), consumer.get("num_ack_pending", 0), time.time())
            REPLICATION_PENDING.labels(state="undelivered").set(backlog.pending)
            REPLICATION_PENDING.labels(state="unacked").set(backlog.ack_pending)
            pipe.set(_consumer_key(self.prefix), json.dumps(backlog.as_dict()), px=30_000)
        await pipe.execute()
        self._dirty.clear()


async def read_peer_lag(client: aioredis.Redis, prefix: str) -> list[PeerLag]:
    raw = await client.hgetall(_peers_key(prefix))
    out = []
    for value in raw.values():
        try:
            d = json.loads(value)
            out.append(PeerLag(str(d["origin"]), float(d["lag_s"]), float(d["applied_at"])))
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(out, key=lambda p: p.origin)


async def read_consumer_backlog(client: aioredis.Redis, prefix: str) -> ConsumerBacklog | None:
    raw = await client.get(_consumer_key(prefix))
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return ConsumerBacklog(int(d["pending"]), int(d["ack_pending"]), float(d["at"]))
    except (ValueError, KeyError, TypeError):
        return None
