"""Replicator: applies other hosts' events from JetStream on this host, by the same version rules.

One durable pull consumer per host (``replicator-<host_id>``) reads the whole stream. Events of
this host's own origin are acked and skipped. The others are gathered into micro-batches, applied
to the hot store (only if newer by ``(version, origin)``; the host clock moves past them), then
persisted in one SQL transaction by the worker's persist path without being published again, and
only then acked. A redelivery or a duplicate changes nothing (DESIGN.md invariants 1-3).

``python -m mfh_tasks.replicator`` (what ``mfh replicator`` runs) also runs the outbox relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Sequence
from typing import Any

from mfh_core import HotStore, SqlStore
from mfh_core.eventbus import DurableSubscription, EventBus
from mfh_core.metrics import REPLICATION_APPLIED, REPLICATION_LAG, REPLICATION_SKIPPED
from mfh_core.metrics_http import serve_metrics
from mfh_models import MemoryEvent, MFHError, Settings, Unavailable, load_settings
from mfh_tasks.outbox import OutboxRelay
from mfh_tasks.persist import PersistPipeline
from mfh_tasks.runtime import build_hot_store, build_sql_store

__all__ = ["Replicator", "consumer_name", "main", "run_replication"]

log = logging.getLogger("mfh.replicator")


def consumer_name(host_id: str) -> str:
    """The durable consumer of one host: its position in the stream survives restarts."""
    return f"replicator-{host_id}"


class Replicator:
    """Feeds remote events from the bus into this host's hot store and SQL store."""

    def __init__(
        self,
        *,
        bus: EventBus,
        pipeline: PersistPipeline,
        host_id: str,
        batch_max: int = 256,
        batch_delay_s: float = 0.002,
        ack_wait_s: float = 5.0,
        max_ack_pending: int = 1024,
    ) -> None:
        self.bus = bus
        self.pipeline = pipeline
        self.host_id = host_id
        self.batch_max = batch_max
        self.batch_delay_s = batch_delay_s
        # A restarted replicator gets what its dead predecessor held once ack_wait passes; a batch
        # that takes longer (a store is down) keeps its messages with in_progress().
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self._queue: asyncio.Queue[tuple[MemoryEvent, Any]] = asyncio.Queue()
        self._sub: DurableSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._busy = False

    async def start(self) -> None:
        """Create (or resume) the durable consumer and start applying."""
        self._task = asyncio.create_task(self._apply_loop(), name="mfh-replicator")
        self._sub = await self.bus.subscribe_durable(
            consumer_name(self.host_id),
            self._on_message,
            ack_wait_s=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            batch=self.batch_max,
        )
        log.info("replicator for %s: consumer %s on stream %s", self.host_id, self._sub.durable, self.bus.stream)

    async def _on_message(self, event: MemoryEvent, msg: Any) -> None:
        if event.origin == self.host_id:
            REPLICATION_SKIPPED.labels(reason="own").inc()
            await msg.ack()
            return
        self._queue.put_nowait((event, msg))  # acked by the apply loop, after the apply

    async def _next_batch(self) -> list[tuple[MemoryEvent, Any]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.batch_delay_s
        while len(batch) < self.batch_max:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            else:
                batch.append(self._queue.get_nowait())
        return batch

    async def _apply_loop(self) -> None:
        while not self._closing:
            batch = await self._next_batch()
            self._busy = True
            try:
                await self._apply_with_retry(batch)
            except Exception:  # a bug, not a store being down: let JetStream redeliver the batch later
                log.exception("replicator: batch of %d events failed", len(batch))
                for _, msg in batch:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=5.0)
            finally:
                self._busy = False

    async def _apply_with_retry(self, batch: list[tuple[MemoryEvent, Any]]) -> None:
        events = [e for e, _ in batch]
        delay = 0.1
        while True:
            try:
                await self.apply_remote(events)
                break
            except MFHError as e:  # a store is down: keep the messages ours (in progress) and retry
                if self._closing:
                    raise
                log.warning("replicator: applying %d events failed (%s); retrying in %.1fs", len(events), e, delay)
                for _, msg in batch:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for _, msg in batch:
            with contextlib.suppress(Exception):  # a lost ack means a harmless redelivery
                await msg.ack()

    async def apply_remote(self, events: Sequence[MemoryEvent]) -> int:
        """Apply remote events: hot store, then SQL (same persist path, not republished); return how many won."""
        if not events:
            return 0
        hot = self.pipeline.hot
        won = await asyncio.gather(*(hot.apply(e.to_record(), from_sql=False) for e in events))
        now_ms = time.time() * 1000
        for e, applied in zip(events, won, strict=True):
            REPLICATION_LAG.labels(origin=e.origin).observe(max(now_ms - e.created_at, 0) / 1000)
            if applied:
                REPLICATION_APPLIED.labels(origin=e.origin).inc()
            else:
                REPLICATION_SKIPPED.labels(reason="older").inc()
        await self.pipeline.persist(events, publish=False)
        await self._repair([e for e, applied in zip(events, won, strict=True) if applied])
        return sum(won)

    async def _repair(self, applied: Sequence[MemoryEvent]) -> None:
        """Where SQL holds a newer version than an event just applied, put SQL's back in Redis.

        That happens when the entry had expired from Redis and the event arrives late: without
        this, Redis would serve the older version until its TTL ran out.
        """
        by_ns: dict[str, dict[str, MemoryEvent]] = {}
        for e in applied:
            by_ns.setdefault(e.namespace, {})[e.key] = e
        for ns, events in by_ns.items():
            rows = await asyncio.to_thread(self.pipeline.sql.get_many, ns, list(events))
            for key, row in rows.items():
                e = events[key]
                if (row.version, row.origin) > (e.version, e.origin):
                    await self.pipeline.hot.apply(row, from_sql=True)

    async def close(self, *, wait_s: float = 10.0) -> None:
        """Stop fetching; a batch being applied may finish and be acked; queued messages are nak'ed."""
        self._closing = True
        if self._sub is not None:
            await self._sub.close()
        task = self._task
        if task is not None:
            if self._busy:
                with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), wait_s)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while not self._queue.empty():
            _, msg = self._queue.get_nowait()
            with contextlib.suppress(Exception):
                await msg.nak()


async def _connect(bus: EventBus, stop: asyncio.Event) -> bool:
    """Connect, retrying while NATS is not there yet; False if stopped first."""
    delay = 0.5
    while not stop.is_set():
        try:
            await bus.connect()
            return True
        except Unavailable as e:
            log.warning("%s; retrying in %.1fs", e, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)
    return False


async def run_replication(settings: Settings, stop: asyncio.Event, *, outbox_interval_s: float = 1.0) -> None:
    """Run this host's replicator and outbox relay until ``stop`` is set (the ``replicator`` process)."""
    sql: SqlStore = await asyncio.to_thread(build_sql_store, settings)
    hot: HotStore = build_hot_store(settings)
    bus = EventBus.from_settings(settings.replication, name=f"mfh-replicator-{settings.host_id}")
    replicator: Replicator | None = None
    try:
        if not await _connect(bus, stop):
            return
        replicator = Replicator(bus=bus, pipeline=PersistPipeline(sql=sql, hot=hot), host_id=settings.host_id)
        await replicator.start()
        relay = OutboxRelay(sql=sql, bus=bus, interval_s=outbox_interval_s)
        await relay.run(stop)
    finally:
        if replicator is not None:
            await replicator.close()
        await bus.close()
        await hot.close()
        sql.close()
        log.info("replicator for %s stopped", settings.host_id)


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serve_metrics(settings.metrics.replicator_port, addr=settings.server.bind, what="replicator")
    await run_replication(settings, stop)


def main(settings: Settings | None = None) -> None:
    """Entry point: read the settings once (MFH_HOST, MFH_CONFIG_DIR) and replicate until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(settings or load_settings()))


if __name__ == "__main__":
    main()
