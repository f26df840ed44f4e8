"""Composition of a worker process: settings → stores → persist pipeline → actors on a broker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import dramatiq
import dramatiq.worker
from dramatiq.brokers.redis import RedisBroker

from mfh_core import HotStore, SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.redaction import redact_text
from mfh_core.resilience import breaker_from_settings
from mfh_models import MFHError, Settings, StoreDamaged, Unavailable
from mfh_tasks.actors import LazyPipeline, declare_persist_actor
from mfh_tasks.broker import build_broker
from mfh_tasks.enqueue import BatchQueue
from mfh_tasks.persist import EventPublisher, PersistPipeline
from mfh_tasks.recovery import Recovery

__all__ = [
    "build_hot_store",
    "build_sql_store",
    "build_sql_store_when_sound",
    "build_worker",
    "wait_for_sound_sql_store",
    "warn_if_store_switched",
]

log = logging.getLogger("mfh.worker")
store_log = logging.getLogger("mfh.store")

#: How long a batch waits for an open SQL breaker's probe before it is retried with backoff.
_SQL_WAIT_S = 5.0
#: Dramatiq's consumer thread, when Redis is gone, sleeps 3 s before it reconnects and 5 s between
#: tries to ack a finished message (during which it fetches nothing): a Redis restart then cost the
#: write path 5-10 s after Redis was back (issue 8's scenario "Redis SIGKILLed while SQL is down").
#: Both waits become a quarter of a second; the retries are cheap (one command on a connection that
#: is refused at once while Redis is down).
_CONSUMER_RETRY_S = 0.25


def _short_consumer_retries() -> None:
    # Module constants that dramatiq.worker reads each time it waits (the first also has an env var).
    vars(dramatiq.worker).update(
        CONSUMER_RESTART_DELAY_SECS=_CONSUMER_RETRY_S, POST_PROCESS_MESSAGE_RETRY_DELAY_SECS=_CONSUMER_RETRY_S
    )


def build_sql_store(settings: Settings) -> SqlStore:
    """The host's SQL store, checked to be current (raises StoreNotCurrent, naming ``mfh db upgrade``)."""
    store = SqlStore(settings.storage.database_url)
    try:
        store.create_schema()
    except BaseException:
        store.close()
        raise
    return store


#: How often a process waiting on a damaged store tries again, and how often it says so again.
STORE_RETRY_S = 5.0
STORE_REMIND_S = 300.0


def build_sql_store_when_sound(
    settings: Settings, *, process: str, stop: threading.Event | None = None, retry_s: float = STORE_RETRY_S
) -> SqlStore | None:
    """:func:`build_sql_store`, waiting while the store's file is corrupt or missing (StoreDamaged)
    instead of exiting: under honcho one process that exits stops the whole host. Says so in one
    line (then a reminder every few minutes); None if ``stop`` is set first."""
    said_at: float | None = None
    while True:
        try:
            store = build_sql_store(settings)
        except StoreDamaged as e:
            now = time.monotonic()
            if said_at is None or now - said_at >= STORE_REMIND_S:
                store_log.error(
                    "%s: %s; waiting, retrying every %.0f s",
                    process,
                    e,
                    retry_s,
                    extra={"path": e.path, "outcome": "waiting"},
                )
                said_at = now
            if stop is not None:
                if stop.wait(retry_s):
                    return None
            else:
                time.sleep(retry_s)
            continue
        if said_at is not None:
            store_log.warning("%s: the SQL store is sound again; starting", process, extra={"outcome": "recovered"})
        return store


async def wait_for_sound_sql_store(
    settings: Settings, *, process: str, stop: asyncio.Event, retry_s: float = STORE_RETRY_S
) -> SqlStore | None:
    """The async twin of :func:`build_sql_store_when_sound` (the replicator, the scheduler)."""
    flag = threading.Event()

    async def relay() -> None:
        await stop.wait()
        flag.set()

    watcher = asyncio.ensure_future(relay())
    try:
        return await asyncio.to_thread(
            build_sql_store_when_sound, settings, process=process, stop=flag, retry_s=retry_s
        )
    finally:
        watcher.cancel()


async def warn_if_store_switched(
    settings: Settings, sql: SqlStore, *, hot: HotStore | None = None, bus: EventBus | None = None
) -> str | None:
    """Log a loud warning (and return it) when the SQL store is empty while this host's Redis or the
    stream says the host has data: the store was switched (say SQLite to Postgres) without a copy."""
    try:
        counts = await asyncio.to_thread(sql.counts)
    except MFHError:
        return None  # down: nothing to compare; the process says so elsewhere
    if counts["items"] or counts["events"]:
        return None
    witness = None
    try:
        if hot is not None and await hot.holds_data():
            witness = f"its Redis (prefix {settings.storage.redis_prefix!r}) holds its clock or entries"
        elif bus is not None and (n := await bus.messages_from(settings.host_id)):
            witness = f"the stream holds {n} events it published"
    except Exception as e:  # a check that cannot run must not stop the process
        store_log.info("store switch check skipped: %s", type(e).__name__)
        return None
    if witness is None:
        return None
    from mfh_core.sqlstore import display_url

    message = (
        f"SQL STORE IS EMPTY: {display_url(sql.url)} has no items or events, but host {settings.host_id}'s {witness}. "
        "Was the store switched (for example SQLite to Postgres) without copying it? Its data will be missing "
        "once the cache expires, and the hosts will differ. Stop the host and copy the old store into this one: "
        "mfh migrate --from OLD_URL --to NEW_URL (docs/operations.md, 'Moving a host from SQLite to Postgres')."
    )
    store_log.warning(message)
    return message


def build_hot_store(settings: Settings) -> HotStore:
    return HotStore(
        redis_url=settings.storage.redis_url,
        prefix=settings.storage.redis_prefix,
        origin=settings.host_id,
        cache_ttl_seconds=settings.storage.cache_ttl_seconds,
        max_backlog=settings.write_behind.max_backlog,
        clock_skew_ms=settings.storage.clock_skew_ms,
    )


async def _build_bus(settings: Settings) -> EventPublisher | None:
    """The worker's event bus, or None with replication off. NATS being down at start-up is not fatal:
    the bus keeps trying in the background, and meanwhile events stay unpublished for the outbox."""
    if not settings.replication.enabled:
        return None
    bus = EventBus.from_settings(settings.replication, name=f"mfh-worker-{settings.host_id}")
    try:
        await bus.connect()
    except Unavailable as e:
        log.warning("NATS unavailable at start-up (%s); persisting without publishing until it is back", e)
        _background.add(asyncio.ensure_future(_connect_until_up(bus)))
    return bus


_background: set[asyncio.Future[None]] = set()


async def _connect_until_up(bus: EventBus, interval_s: float = 2.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await bus.connect()
        except Unavailable:
            continue
        log.info("NATS is back: publishing again")
        return


def build_worker(settings: Settings, *, serve_metrics: bool = True) -> tuple[RedisBroker, dramatiq.Actor]:  # type: ignore[type-arg]
    """The broker with ``persist_batch`` declared and wired to this host's stores.

    ``serve_metrics=False`` when the supervising ``mfh worker`` serves all worker processes' metrics.
    """
    _short_consumer_retries()
    broker = build_broker(settings)
    sql = build_sql_store_when_sound(settings, process="worker")
    assert sql is not None  # without a stop event it waits until the store is sound

    cb = settings.resilience.circuit_breaker

    async def build() -> PersistPipeline:
        return PersistPipeline(
            sql=sql,
            hot=build_hot_store(settings),
            bus=await _build_bus(settings),
            sql_breaker=breaker_from_settings("sql", cb, logger=log),
            sql_wait_s=_SQL_WAIT_S,
            summary_every_s=cb.summary_every_seconds,
            catch_up=True,
        )

    actor = declare_persist_actor(broker, settings, LazyPipeline(build))
    queue = BatchQueue.for_actor(actor, settings.write_behind)  # the worker owns the broker

    # Metrics, the Redis persistence check, the maintenance timer and the dirty sweep (recovery.py).
    broker.add_middleware(
        Recovery(
            settings=settings,
            broker=broker,
            send=queue.send_now,
            hot_factory=lambda: build_hot_store(settings),
            serve_metrics=serve_metrics,
        )
    )
    dramatiq.set_broker(broker)
    # One "Retrying message" line per batch retry is a flood during an outage; the breaker and the
    # pipeline's outage logs say it once (and "Retries exceeded" is a warning, still shown).
    logging.getLogger("dramatiq.middleware.retries.Retries").setLevel(logging.WARNING)
    log.info(
        "worker for host %s: %s, queue %s",
        settings.host_id,
        redact_text(settings.storage.database_url),
        settings.write_behind.queue_name,
    )
    return broker, actor
