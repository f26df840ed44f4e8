"""Outbox relay: events committed to SQL whose publish failed reach JetStream later, in commit order.

SQL persistence never waits on NATS (docs/architecture.md, degraded modes): a worker commits its batch, tries
to publish it, and leaves whatever was not acked marked unpublished in the ``events`` table. This
relay publishes those rows every ``interval_s``, and promptly after the bus reconnects. The
message id is the event id, so relaying an event that a worker did store after all adds nothing
to the stream (within the duplicate window; consumers are idempotent beyond it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from mfh_core import SqlStore
from mfh_core.metrics import UNPUBLISHED_EVENTS
from mfh_core.resilience import OutageLog
from mfh_models import MemoryEvent, MFHError

__all__ = ["OutboxRelay", "RelayBus"]

log = logging.getLogger("mfh.outbox")


class RelayBus(Protocol):
    """What the relay needs of the event bus (``mfh_core.eventbus.EventBus`` has it)."""

    @property
    def connected(self) -> bool: ...

    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]: ...


class OutboxRelay:
    """Publishes unpublished events of one host's SQL store, oldest first, and marks them published."""

    def __init__(
        self,
        *,
        sql: SqlStore,
        bus: RelayBus,
        interval_s: float = 1.0,
        batch: int = 1000,
        min_age_ms: int = 1000,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.sql = sql
        self.bus = bus
        self.interval_s = interval_s
        self.batch = batch
        # A younger event is most likely being published by its worker right now: relaying it too
        # would be harmless (deduplicated) but wasted work.
        self.min_age_ms = min_age_ms
        self._clock_ms = clock_ms
        self.relayed = 0
        # An outage costs a line when it starts, a summary now and then, and a line when it ends.
        self.sql_outage = OutageLog("outbox SQL", what="passes skipped", logger=log)
        self.nats_outage = OutageLog("outbox NATS publish", what="events not relayed", logger=log)

    async def relay_once(self) -> int:
        """One pass: publish every unpublished event old enough, in seq order; return how many were acked.

        Stops at the first event the bus did not ack (NATS trouble), so order is kept for the next pass.
        """
        total = 0
        while True:
            rows = await asyncio.to_thread(self.sql.unpublished, limit=self.batch)
            await self._set_gauge(len(rows))
            cutoff = self._clock_ms() - self.min_age_ms
            events: list[MemoryEvent] = []
            for _seq, event in rows:
                if event.created_at > cutoff:
                    break
                events.append(event)
            if not events or not self.bus.connected:
                return total
            acked = await self.bus.publish_many(events)
            if len(acked) < len(events):
                reason = getattr(self.bus, "last_publish_error", None) or "not acked"
                self.nats_outage.failure(reason, count=len(events) - len(acked))
            else:
                self.nats_outage.success()
            if acked:
                await asyncio.to_thread(self.sql.mark_published, acked)
                total += len(acked)
                self.relayed += len(acked)
                UNPUBLISHED_EVENTS.dec(len(acked))
                log.info("outbox: relayed %d events to JetStream", len(acked))
            if len(acked) < len(events) or len(rows) < self.batch:
                return total

    async def _set_gauge(self, seen: int) -> None:
        # A short page is the exact count; a full one means there are more, so count them.
        if seen < self.batch:
            UNPUBLISHED_EVENTS.set(seen)
        else:
            counts = await asyncio.to_thread(self.sql.counts)
            UNPUBLISHED_EVENTS.set(counts["unpublished"])

    async def run(self, stop: asyncio.Event, *, poll_s: float = 0.1) -> None:
        """Relay every ``interval_s`` until ``stop`` is set; a reconnect of the bus triggers a pass at once.

        While NATS is down a pass only refreshes the unpublished gauge.
        """
        loop = asyncio.get_running_loop()
        was_connected = self.bus.connected
        next_pass = loop.time()
        while not stop.is_set():
            connected = self.bus.connected
            if (connected and not was_connected) or loop.time() >= next_pass:
                try:
                    await self.relay_once()
                except MFHError as e:  # SQL unavailable: try again next interval
                    self.sql_outage.failure(e.message)
                else:
                    self.sql_outage.success()
                next_pass = loop.time() + self.interval_s
            was_connected = connected
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_s)
