"""The persist path shared by the write-behind actor, reconcile and the replicator.

apply to SQL in one transaction (idempotent) → mark the Redis entries clean, and publish to JetStream
(outbox on failure) meanwhile. Every step can be repeated safely, so a batch that fails at any
point is simply retried whole.

A batch is done once committed and marked clean: its publish finishes in the background, so a worker's
thread is not held for the PubAck round trip (over a 200 ms link, 4 threads each waiting for one
managed fewer one-write batches a second than 20 writes/s make, and the queue fell further behind all
run). At most ``max_publishing`` events are being published at once; beyond that a batch waits for
the oldest publishes. Whatever is not acked stays unpublished in SQL for the outbox, as before (a
worker killed meanwhile included).

SQL sits behind a circuit breaker: while it is open, batches wait for its probe (up to
``sql_wait_s``) instead of each hitting SQL, and an outage costs a log line when it starts, a
summary every ``summary_every_s`` and a line when it ends; NATS publish shortfalls likewise.

When SQL is back after an outage, a worker's pipeline (``catch_up=True``) persists every entry
still dirty in Redis at once, in big batches, instead of leaving them to the queue: the queue then
holds thousands of one- or two-write batches (each a transaction), and the batches a Redis restart
re-enqueued sit behind them. One worker of the host does it (a claim in Redis); the queued batches
for the same entries find them persisted (idempotent, docs/architecture.md invariant 2).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Protocol

from redis.exceptions import ConnectionError as RedisConnectionError

from mfh_core import HotStore, SqlStore
from mfh_core.metrics import PERSIST_BATCHES, PERSIST_EVENTS, PERSIST_SECONDS
from mfh_core.resilience import CircuitBreaker, CircuitState, OutageLog
from mfh_models import MemoryEvent, MFHError

__all__ = ["EventPublisher", "PersistPipeline"]

log = logging.getLogger("mfh.persist")

#: How long after SQL came back queued batches check Redis for entries persisted meanwhile.
_SKIP_PERSISTED_S = 60.0


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
        max_publishing: int = 4096,
        catch_up: bool = False,
        catch_up_batch: int = 256,
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
        self.max_publishing = max(1, max_publishing)
        self._publishing: dict[asyncio.Task[None], int] = {}  # publish under way -> its event count
        self.catch_up = catch_up
        self.catch_up_batch = catch_up_batch
        self._catching_up: asyncio.Task[int] | None = None
        self._skip_persisted_until = 0.0  # after a catch-up: queued batches skip what it persisted

    async def persist(self, events: Sequence[MemoryEvent], *, publish: bool = True) -> None:
        """Persist a batch; ``publish=False`` for events that came from another host's stream.

        Returns once the batch is committed and its entries are clean; its publish may still be under way
        (:meth:`drain_publishing` waits for it)."""
        catching_up = self._catching_up
        if publish and catching_up is not None and not catching_up.done():
            # The catch-up has SQL to itself (it persists these entries too, most likely), then this
            # batch skips what it persisted.
            with contextlib.suppress(Exception):
                await asyncio.shield(catching_up)
        await self._persist(events, publish=publish)

    async def _persist(self, events: Sequence[MemoryEvent], *, publish: bool) -> None:
        t0 = time.perf_counter()
        was_open = self.sql_breaker.state is not CircuitState.CLOSED
        if publish and time.monotonic() < self._skip_persisted_until:
            done = await self.hot.persisted_already(events)
            events = [e for e, persisted in zip(events, done, strict=True) if not persisted]
            if not events:
                PERSIST_BATCHES.labels(result="skipped").inc()
                return
        try:
            published = not publish or self.bus is None
            await self.sql_breaker.call(
                lambda: asyncio.to_thread(self.sql.apply_batch, events, published=published), wait=self.sql_wait_s
            )
            if was_open and self.catch_up and publish:
                self._start_catch_up()
            if publish and self.bus is not None:
                # Committed: the entries turn clean (and PERSISTED callers are answered) while the
                # events go out in the background (what is not acked stays for the outbox).
                task = asyncio.ensure_future(self._publish(self.bus, events))
                self._publishing[task] = len(events)
                task.add_done_callback(self._publishing.pop)
                try:
                    await self.hot.mark_clean(events)
                finally:
                    await self._bound_publishing()
            else:
                await self.hot.mark_clean(events)
        except Exception:
            PERSIST_BATCHES.labels(result="error").inc()
            raise
        PERSIST_BATCHES.labels(result="ok").inc()
        PERSIST_EVENTS.inc(len(events))
        PERSIST_SECONDS.observe(time.perf_counter() - t0)

    def _start_catch_up(self) -> None:
        # For the next minute, a queued batch first asks Redis whether its entries were persisted
        # meanwhile (by the catch-up, here or in another worker): one round trip instead of a transaction.
        self._skip_persisted_until = time.monotonic() + _SKIP_PERSISTED_S
        if self._catching_up is None or self._catching_up.done():
            self._catching_up = asyncio.ensure_future(self.persist_dirty())

    async def persist_dirty(self) -> int:
        """Persist every entry dirty now, in batches of ``catch_up_batch``, if this process claims the
        catch-up for the host (one per outage); how many events were persisted. Never raises: what is
        left is persisted by its queued batch or the sweep."""
        n = 0
        try:
            for attempt in range(3):  # Redis restarted meanwhile: the pool's first connections are dead
                try:
                    claimed = await self.hot.claim_catch_up()
                    break
                except RedisConnectionError:
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.05)
            if not claimed:
                return 0
            started = time.monotonic()
            async for events in self.hot.dirty_events():
                for i in range(0, len(events), self.catch_up_batch):
                    await self._persist(events[i : i + self.catch_up_batch], publish=True)
                    n += len(events[i : i + self.catch_up_batch])
            if n:
                log.info("sql is back: persisted the %d dirty entries at once in %.2fs", n, time.monotonic() - started)
        except Exception as e:  # SQL or Redis gone again: the queue and the sweep still hold everything
            log.warning("catch-up after the SQL outage stopped after %d entries: %s", n, e)
        return n

    async def _publish(self, bus: EventPublisher, events: Sequence[MemoryEvent]) -> None:
        try:
            acked = await bus.publish_many(events)
        except Exception as e:  # publish_many does not raise; whatever did stays for the outbox
            log.warning("publishing %d events failed (%s); the outbox relays them", len(events), type(e).__name__)
            return
        self._mark_later(acked)
        if len(acked) < len(events):
            reason = getattr(bus, "last_publish_error", None) or "not acked"
            self.nats_outage.failure(f"{reason}; the outbox relays them", count=len(events) - len(acked))
        else:
            self.nats_outage.success()

    async def _bound_publishing(self) -> None:
        # Back pressure: a silent NATS holds each publish for publish_timeout_s, so the worker slows
        # down to what it can publish instead of piling up tasks.
        while len(self._publishing) > 1 and sum(self._publishing.values()) > self.max_publishing:
            await asyncio.wait(list(self._publishing), return_when=asyncio.FIRST_COMPLETED)

    async def drain_publishing(self) -> None:
        """Wait until every publish under way has its PubAcks or gave up (tests; shutdown)."""
        while self._publishing:
            await asyncio.wait(list(self._publishing))

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
