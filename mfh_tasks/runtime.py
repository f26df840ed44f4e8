"""Composition of a worker process: settings → stores → persist pipeline → actors on a broker."""

from __future__ import annotations

import asyncio
import logging

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from mfh_core import HotStore, SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.redaction import redact_text
from mfh_core.resilience import breaker_from_settings
from mfh_models import MemoryEvent, Settings, Unavailable
from mfh_tasks.actors import LazyPipeline, declare_persist_actor, encode_batch
from mfh_tasks.broker import build_broker
from mfh_tasks.persist import EventPublisher, PersistPipeline
from mfh_tasks.recovery import Recovery

__all__ = ["build_hot_store", "build_sql_store", "build_worker"]

log = logging.getLogger("mfh.worker")

#: How long a batch waits for an open SQL breaker's probe before it is retried with backoff.
_SQL_WAIT_S = 5.0


def build_sql_store(settings: Settings) -> SqlStore:
    store = SqlStore(settings.storage.database_url)
    store.create_schema()
    return store


def build_hot_store(settings: Settings) -> HotStore:
    return HotStore(
        redis_url=settings.storage.redis_url,
        prefix=settings.storage.redis_prefix,
        origin=settings.host_id,
        cache_ttl_seconds=settings.storage.cache_ttl_seconds,
        max_backlog=settings.write_behind.max_backlog,
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
    broker = build_broker(settings)
    sql = build_sql_store(settings)

    cb = settings.resilience.circuit_breaker

    async def build() -> PersistPipeline:
        return PersistPipeline(
            sql=sql,
            hot=build_hot_store(settings),
            bus=await _build_bus(settings),
            sql_breaker=breaker_from_settings("sql", cb, logger=log),
            sql_wait_s=_SQL_WAIT_S,
            summary_every_s=cb.summary_every_seconds,
        )

    actor = declare_persist_actor(broker, settings, LazyPipeline(build))

    def send(events: list[MemoryEvent]) -> None:
        actor.send(encode_batch(events))

    # Metrics, the Redis persistence check, the maintenance timer and the dirty sweep (recovery.py).
    broker.add_middleware(
        Recovery(
            settings=settings,
            broker=broker,
            send=send,
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
