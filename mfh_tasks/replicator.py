"""Replicator: applies other hosts' events from JetStream on this host, by the same version rules.

One durable pull consumer per host (``replicator-<host_id>``) reads the whole stream. Events of
this host's own origin are acked and skipped by their subject, without being decoded. The others go
to the hot store as they arrive, a fetched batch in one pipelined round trip (only if newer by
``(version, origin)``; the host clock moves past them), then through the worker's persist path in
larger SQL transactions without being published again, and only then are they acked. A redelivery
or a duplicate changes nothing (docs/architecture.md invariants 1-3).

``python -m mfh_tasks.replicator`` (what ``mfh replicator`` runs) also runs the outbox relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from redis.exceptions import RedisError

from mfh_core import HotStore, SqlStore
from mfh_core.eventbus import DurableSubscription, EventBus, is_repair
from mfh_core.heartbeat import Heartbeat
from mfh_core.jsonlog import configure_json_logging
from mfh_core.metrics import REPLICATION_APPLIED, REPLICATION_LAG, REPLICATION_SKIPPED
from mfh_core.metrics_http import serve_metrics
from mfh_core.redaction import install_loop_exception_handler, install_redaction
from mfh_core.redis_health import check_persistence
from mfh_models import MemoryEvent, MFHError, Settings, Unavailable, load_settings
from mfh_tasks.outbox import OutboxRelay
from mfh_tasks.peer_audit import AuditResponder, audit_subject
from mfh_tasks.peer_lag import PeerLagBook
from mfh_tasks.persist import PersistPipeline
from mfh_tasks.runtime import build_hot_store, wait_for_sound_sql_store, warn_if_store_switched

__all__ = ["Replicator", "consumer_name", "main", "run_replication"]

log = logging.getLogger("mfh.replicator")


def consumer_name(host_id: str) -> str:
    """The durable consumer of one host: its position in the stream survives restarts."""
    return f"replicator-{host_id}"


Pending = tuple[MemoryEvent, Any]  # an event and the JetStream message to ack once it is applied
Applied = tuple[MemoryEvent, Any, bool]  # ... and whether it won in the hot store
T = TypeVar("T")


def _take(q: asyncio.Queue[T], first: T, limit: int) -> list[T]:
    """``first`` plus whatever is already queued, up to ``limit``: batches grow with load, not with waiting."""
    batch = [first]
    while len(batch) < limit and not q.empty():
        batch.append(q.get_nowait())
    return batch


class Replicator:
    """Feeds remote events from the bus into this host's hot store and SQL store.

    Two stages: the hot store gets each event as soon as it arrives (that is the replication lag
    readers see); SQL gets them in larger transactions a few milliseconds later, then they are acked.
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        pipeline: PersistPipeline,
        host_id: str,
        hot_batch_max: int = 256,
        persist_batch_max: int = 1000,
        persist_delay_s: float = 0.02,
        ack_wait_s: float = 5.0,
        max_ack_pending: int = 2048,
        lag_book: PeerLagBook | None = None,
    ) -> None:
        self.bus = bus
        self.pipeline = pipeline
        self.host_id = host_id
        self.hot_batch_max = hot_batch_max
        self.persist_batch_max = persist_batch_max
        self.persist_delay_s = persist_delay_s
        # A restarted replicator gets what its dead predecessor held once ack_wait passes; a message
        # held longer (waiting in our queues behind a backlog, or a store is down) is kept ours with
        # in_progress() by the keeper, so JetStream does not redeliver what we still hold.
        self.ack_wait_s = ack_wait_s
        self.max_ack_pending = max_ack_pending
        self._incoming: asyncio.Queue[Pending] = asyncio.Queue()
        self._hot_done: asyncio.Queue[Applied] = asyncio.Queue()
        self._sub: DurableSubscription | None = None
        self._tasks: list[asyncio.Task[None]] = []
        # messages received and not yet acked or nak'ed, by id(): the message and when JetStream last
        # heard from us about it (its delivery, or our last in_progress)
        self._held: dict[int, tuple[Any, float]] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self.received = 0  # deliveries, redeliveries included
        self.lag_book = lag_book

    async def start(self) -> None:
        """Create (or resume) the durable consumer and start applying."""
        self._tasks = [
            asyncio.create_task(self._hot_loop(), name="mfh-replicator-hot"),
            asyncio.create_task(self._persist_loop(), name="mfh-replicator-sql"),
            asyncio.create_task(self._keeper(), name="mfh-replicator-keeper"),
        ]
        self._sub = await self.bus.subscribe_durable(
            consumer_name(self.host_id),
            self._on_message,
            ack_wait_s=self.ack_wait_s,
            max_ack_pending=self.max_ack_pending,
            batch=self.hot_batch_max,
            skip=self._own,
        )
        log.info("replicator for %s: consumer %s on stream %s", self.host_id, self._sub.durable, self.bus.stream)

    async def consumer_info(self) -> dict[str, int]:
        """The durable consumer's counters on the server (pending, ack pending, redelivered, ...)."""
        if self._sub is None:
            raise Unavailable("the replicator is not started")
        return await self._sub.info()

    def _own(self, msg: Any) -> bool:
        """This host's own event (by its subject), not a repair: acked unread (what ``_on_message`` does
        with it after decoding)."""
        if self.bus.origin_of(msg.subject) != self.host_id or is_repair(msg):
            return False
        self.received += 1
        REPLICATION_SKIPPED.labels(reason="own").inc()
        return True

    async def _on_message(self, event: MemoryEvent, msg: Any) -> None:
        self.received += 1
        if event.origin == self.host_id and not is_repair(msg):
            REPLICATION_SKIPPED.labels(reason="own").inc()
            await msg.ack()
            return
        self._held[id(msg)] = (msg, time.monotonic())
        self._idle.clear()
        self._incoming.put_nowait((event, msg))  # acked by the persist loop, after the apply

    async def _hot_loop(self) -> None:
        while True:
            batch = _take(self._incoming, await self._incoming.get(), self.hot_batch_max)
            repairs = frozenset(e.event_id for e, msg in batch if is_repair(msg))
            won = await self._with_retry(batch, functools.partial(self.apply_hot, repairs=repairs))
            if won is not None:
                for (event, msg), applied in zip(batch, won, strict=True):
                    self._hot_done.put_nowait((event, msg, applied))

    async def _persist_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = _take(self._hot_done, await self._hot_done.get(), self.persist_batch_max)
            deadline = loop.time() + self.persist_delay_s
            while len(batch) < self.persist_batch_max and (remaining := deadline - loop.time()) > 0:
                try:
                    nxt = await asyncio.wait_for(self._hot_done.get(), remaining)
                except TimeoutError:
                    break
                batch.extend(_take(self._hot_done, nxt, self.persist_batch_max - len(batch)))
            won = [e for e, _, applied in batch if applied]
            repairs = [e for e, msg, _ in batch if is_repair(msg)]
            pending = [(e, msg) for e, msg, _ in batch]
            step = functools.partial(self.persist_remote, won=won, repairs=repairs)
            if await self._with_retry(pending, step) is not None:
                for _, msg, _ in batch:
                    with contextlib.suppress(Exception):  # a lost ack means a harmless redelivery
                        await msg.ack()
                self._settled(msg for _, msg, _ in batch)

    async def _with_retry(self, batch: list[Pending], step: Callable[[list[MemoryEvent]], Awaitable[T]]) -> T | None:
        """Run ``step(events)``; retry while a store is unavailable, keeping every held message ours
        (in progress) so JetStream does not redeliver it meanwhile; on any other error nak the batch
        for a later redelivery and return None."""
        events = [e for e, _ in batch]
        delay = 0.1
        while True:
            try:
                return await step(events)
            except MFHError as e:
                if self._closing:
                    raise
                log.warning("replicator: %d events not applied (%s); retrying in %.1fs", len(events), e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.ack_wait_s / 2)
            except Exception:
                log.exception("replicator: a batch of %d events failed; JetStream redelivers it", len(events))
                for _, msg in batch:
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=5.0)
                self._settled(msg for _, msg in batch)
                return None

    async def _keeper(self) -> None:
        """Every quarter of ack_wait, tell JetStream we still hold each message held for over a quarter of it.

        Nothing is sent on the normal path (messages are acked within milliseconds); a message that
        waits (a store is down, a backlog is in our queues, the loop was starved) is not redelivered
        while we hold it, only once this process is gone."""
        every = self.ack_wait_s / 4  # so each one hears from us at most half an ack_wait after the last time
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            stale = [(key, msg) for key, (msg, since) in self._held.items() if now - since > every]
            for key, msg in stale:
                if self._held.get(key, (None, 0.0))[0] is msg:
                    self._held[key] = (msg, now)
                    with contextlib.suppress(Exception):  # a lost one means at worst a harmless redelivery
                        await msg.in_progress()

    def _settled(self, msgs: Iterable[Any]) -> None:
        for msg in msgs:
            self._held.pop(id(msg), None)
        if not self._held:
            self._idle.set()

    async def apply_hot(self, events: Sequence[MemoryEvent], repairs: frozenset[str] = frozenset()) -> list[bool]:
        """Take each remote event into the hot store if it is newer (which moves this host's clock past it).

        ``repairs``: ids of the cross-host audit's re-published events: old by nature, not counted as lag."""
        hot = self.pipeline.hot
        won = await hot.apply_many([e.to_record() for e in events], from_sql=False)
        now_ms = time.time() * 1000
        for e, applied in zip(events, won, strict=True):
            if e.event_id in repairs:
                if applied:
                    REPLICATION_APPLIED.labels(origin=e.origin).inc()
                continue
            lag_s = max(now_ms - e.created_at, 0) / 1000
            REPLICATION_LAG.labels(origin=e.origin).observe(lag_s)
            if self.lag_book is not None:
                self.lag_book.note(e.origin, lag_s, now_ms / 1000)
            if applied:
                REPLICATION_APPLIED.labels(origin=e.origin).inc()
            else:
                REPLICATION_SKIPPED.labels(reason="older").inc()
        return won

    async def persist_remote(
        self, events: Sequence[MemoryEvent], won: Sequence[MemoryEvent] = (), repairs: Sequence[MemoryEvent] = ()
    ) -> int:
        """The worker's persist path without publishing, then a repair of the entries in ``won``.

        ``repairs``: events the cross-host audit re-published; a row holding one's exact (version, origin)
        with other content was changed behind the hub's back and is rewritten (and its clean Redis entry
        dropped, so reads refill it from SQL)."""
        await self.pipeline.persist(events, publish=False)
        await self._repair(won)
        if repairs:
            fixed = await asyncio.to_thread(self.pipeline.sql.replace_same_version, repairs)
            by_key = {(e.namespace, e.key): e for e in repairs}
            for ns, key in fixed:
                e = by_key[(ns, key)]
                await self.pipeline.hot.evict_clean(ns, key, e.version, e.origin)
            if fixed:
                log.warning("repair: rewrote %d rows changed behind the hub's back: %s", len(fixed), fixed[:10])
        return len(events)

    async def apply_remote(self, events: Sequence[MemoryEvent]) -> int:
        """Both stages for one batch (tests, tools); return how many events won in the hot store."""
        if not events:
            return 0
        won = await self.apply_hot(events)
        await self.persist_remote(events, [e for e, w in zip(events, won, strict=True) if w])
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
        """Stop fetching; what was received may finish and be acked for ``wait_s``; the rest is nak'ed."""
        self._closing = True
        if self._sub is not None:
            await self._sub.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), wait_s)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, MFHError):
                await task
        leftovers = [msg for _, msg in _drain(self._incoming)] + [msg for _, msg, _ in _drain(self._hot_done)]
        for msg in leftovers:
            with contextlib.suppress(Exception):
                await msg.nak()


def _drain(q: asyncio.Queue[T]) -> list[T]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


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
    """Run this host's replicator and outbox relay until ``stop`` is set (the ``replicator`` process).

    With replication disabled it only waits: honcho stops every process when one exits.
    """
    if not settings.replication.enabled:
        log.info("replication is disabled for %s (replication.enabled); idle until stopped", settings.host_id)
        await stop.wait()
        return
    found = await wait_for_sound_sql_store(settings, process="replicator", stop=stop)
    if found is None:
        return
    sql: SqlStore = found
    hot: HotStore = build_hot_store(settings)
    await check_persistence(hot.redis, url=settings.storage.redis_url, process="replicator")
    bus = EventBus.from_settings(settings.replication, name=f"mfh-replicator-{settings.host_id}")
    replicator: Replicator | None = None
    reporter: asyncio.Task[None] | None = None
    responder: AuditResponder | None = None
    try:
        if not await _connect(bus, stop):
            return
        await warn_if_store_switched(settings, sql, hot=hot, bus=bus)
        book = PeerLagBook(settings.storage.redis_prefix)
        replicator = Replicator(
            bus=bus, pipeline=PersistPipeline(sql=sql, hot=hot), host_id=settings.host_id, lag_book=book
        )
        await replicator.start()
        responder = AuditResponder(
            bus=bus, sql=sql, redis=hot.redis, redis_prefix=settings.storage.redis_prefix, host_id=settings.host_id
        )
        await responder.start(audit_subject(settings.replication))
        reporter = asyncio.create_task(_report_lag(replicator, book, hot, stop), name="mfh-replicator-lag")
        relay = OutboxRelay(sql=sql, bus=bus, interval_s=outbox_interval_s)
        await relay.run(stop)
    finally:
        if responder is not None:
            await responder.close()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
        if replicator is not None:
            await replicator.close()
        await bus.close()
        await hot.close()
        sql.close()
        log.info("replicator for %s stopped", settings.host_id)


async def _report_lag(
    replicator: Replicator, book: PeerLagBook, hot: HotStore, stop: asyncio.Event, every_s: float = 2.0
) -> None:
    """Every ``every_s``: the lag per peer and the consumer's backlog, into Redis and the gauges."""
    while not stop.is_set():
        try:
            await book.flush(hot.redis, await replicator.consumer_info())
        except (MFHError, OSError, RedisError) as e:
            log.debug("replication lag not reported this time: %s", e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def _serve(settings: Settings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    install_loop_exception_handler(loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = settings.metrics.replicator_port
    serve_metrics(port, addr=settings.server.bind, what="replicator")
    heartbeat = Heartbeat.of(settings, "replicator", metrics_port=port)
    beating = asyncio.create_task(heartbeat.run(stop), name="mfh-heartbeat")
    try:
        await run_replication(settings, stop)
    finally:
        stop.set()
        await beating


def main(settings: Settings | None = None) -> None:
    """Entry point: read the settings once (MFH_HOST, MFH_CONFIG_DIR) and replicate until SIGTERM."""
    configure_json_logging(process="replicator")
    install_redaction()
    settings = settings or load_settings()
    install_redaction(settings)
    asyncio.run(_serve(settings))


if __name__ == "__main__":
    main()
