"""The persist path shared by the write-behind actor, reconcile and the replicator.

apply to SQL in one transaction (idempotent) → publish to JetStream (outbox on failure) and, at
the same time, mark the Redis entries clean. Every step can be repeated safely, so a batch that fails at any
point is simply retried whole.

SQL sits behind a circuit breaker: while it is open, batches wait for its probe (up to
``sql_wait_s``) instead of each hitting SQL, and an outage costs a log line when it starts, a
summary every ``summary_every_s`` and a line when it ends; NATS publish shortfalls likewise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from mfh_core import HotStore, SqlStore
from mfh_core.metrics import PERSIST_BATCHES, PERSIST_EVENTS, PERSIST_SECONDS
from mfh_core.resilience import CircuitBreaker, OutageLog
from mfh_models import MemoryEvent, MFHError

__all__ = ["EventPublisher", "PersistPipeline"]

log = logging.getLogger("mfh.persist")


class EventPublisher(Protocol):
    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]: ...


class PersistPipeline:
    """apply_batch → publish and mark_clean, for one host."""

    def __init__(
        self,
        *,
        sql: SqlStore,
        hot: HotStore,
        bus: EventPublisher | None = None,
        mark_interval_s: float = 0.2,
        sql_breaker: CircuitBreaker | None = None,
        sql_wait_s: float = 0.0,
        summary_every_s: float = 15.0,
    ) -> None:
        self.sql = sql
        self.hot = hot
        self.bus = bus
        self.mark_interval_s = mark_interval_s
        self.sql_breaker = sql_breaker or CircuitBreaker("sql", logger=log, summary_every_s=summary_every_s)
        self.sql_wait_s = sql_wait_s
        self.nats_outage = OutageLog(
            "NATS publish", what="events left for the outbox", logger=log, summary_every_s=summary_every_s
        )
        self._acked: list[str] = []
        self._marker: asyncio.Task[None] | None = None

    async def persist(self, events: Sequence[MemoryEvent], *, publish: bool = True) -> None:
        """Persist a batch; ``publish=False`` for events that came from another host's stream."""
        t0 = time.perf_counter()
        try:
            published = not publish or self.bus is None
            await self.sql_breaker.call(
                lambda: asyncio.to_thread(self.sql.apply_batch, events, published=published), wait=self.sql_wait_s
            )
            if publish and self.bus is not None:
                # Committed: the entries turn clean (and PERSISTED callers are answered) while the
                # events go out; the publish never raises (what is not acked stays for the outbox).
                acked, cleaned = await asyncio.gather(
                    self.bus.publish_many(events), self.hot.mark_clean(events), return_exceptions=True
                )
                if isinstance(acked, BaseException):
                    raise acked
                self._mark_later(acked)
                if len(acked) < len(events):
                    reason = getattr(self.bus, "last_publish_error", None) or "not acked"
                    self.nats_outage.failure(f"{reason}; the outbox relays them", count=len(events) - len(acked))
                else:
                    self.nats_outage.success()
                if isinstance(cleaned, BaseException):
                    raise cleaned
            else:
                await self.hot.mark_clean(events)
        except Exception:
            PERSIST_BATCHES.labels(result="error").inc()
            raise
        PERSIST_BATCHES.labels(result="ok").inc()
        PERSIST_EVENTS.inc(len(events))
        PERSIST_SECONDS.observe(time.perf_counter() - t0)

    def _mark_later(self, event_ids: list[str]) -> None:
        # One SQL write per interval instead of one per batch: a second transaction per message was
        # a third of a worker's time. An id not marked yet (worker killed) is relayed by the outbox,
        # which takes only events older than a second, and JetStream drops the duplicate by Msg-Id.
        self._acked.extend(event_ids)
        if self._acked and (self._marker is None or self._marker.done()):
            self._marker = asyncio.ensure_future(self._mark_soon())

    async def _mark_soon(self) -> None:
        await asyncio.sleep(self.mark_interval_s)
        await self.flush_marks()

    async def flush_marks(self) -> None:
        """Mark the events published so far (also at shutdown)."""
        ids, self._acked = self._acked, []
        if not ids:
            return
        try:
            await self.sql_breaker.call(lambda: asyncio.to_thread(self.sql.mark_published, ids))
        except Exception as e:
            if not isinstance(e, MFHError):  # SQL being down is reported by the breaker, once
                log.warning("could not mark %d events published yet (%s); retrying", len(ids), e)
            self._acked.extend(ids)
            self._marker = asyncio.ensure_future(self._mark_soon())
