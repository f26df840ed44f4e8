"""The persist path shared by the write-behind actor, reconcile and the replicator.

apply to SQL in one transaction (idempotent) → publish to JetStream (outbox on failure) →
mark the Redis entries clean. Every step can be repeated safely, so a batch that fails at any
point is simply retried whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from mfh_core import HotStore, SqlStore
from mfh_core.metrics import PERSIST_BATCHES, PERSIST_EVENTS, PERSIST_SECONDS
from mfh_models import MemoryEvent

__all__ = ["EventPublisher", "PersistPipeline"]

log = logging.getLogger("mfh.persist")


class EventPublisher(Protocol):
    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]: ...


class PersistPipeline:
    """apply_batch → publish → mark_clean, for one host."""

    def __init__(self, *, sql: SqlStore, hot: HotStore, bus: EventPublisher | None = None) -> None:
        self.sql = sql
        self.hot = hot
        self.bus = bus

    async def persist(self, events: Sequence[MemoryEvent], *, publish: bool = True) -> None:
        """Persist a batch; ``publish=False`` for events that came from another host's stream."""
        t0 = time.perf_counter()
        try:
            await asyncio.to_thread(self.sql.apply_batch, events, published=not publish or self.bus is None)
            if publish and self.bus is not None:
                acked = await self.bus.publish_many(events)
                if acked:
                    await asyncio.to_thread(self.sql.mark_published, acked)
                if len(acked) < len(events):
                    missing = len(events) - len(acked)
                    log.warning("%d of %d events not published; the outbox relays them", missing, len(events))
            await self.hot.mark_clean(events)
        except Exception:
            PERSIST_BATCHES.labels(result="error").inc()
            raise
        PERSIST_BATCHES.labels(result="ok").inc()
        PERSIST_EVENTS.inc(len(events))
        PERSIST_SECONDS.observe(time.perf_counter() - t0)
