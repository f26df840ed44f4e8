"""Dramatiq actors of the write-behind path.

``persist_batch`` takes one micro-batch of events. Dramatiq neither keeps order nor delivers
exactly once; neither matters, because the persist path is idempotent and order-insensitive
(docs/architecture.md invariant 2). Invalid data is not retried; an unavailable store is, with backoff,
and a batch whose retries run out lands in the dead-letter queue (``mfh dlq``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from pydantic import ValidationError

from mfh_models import InvalidArgument, MemoryEvent, Settings, Unavailable
from mfh_models.records import format_validation_error
from mfh_tasks.persist import PersistPipeline

__all__ = ["PERSIST_ACTOR", "declare_persist_actor", "decode_batch", "encode_batch"]

PERSIST_ACTOR = "persist_batch"


def encode_batch(events: list[MemoryEvent]) -> list[dict[str, Any]]:
    return [e.model_dump(mode="json") for e in events]


def decode_batch(raw: Any) -> list[MemoryEvent]:
    """Parse a message body; raises InvalidArgument (not retried) on anything malformed."""
    if not isinstance(raw, list):
        raise InvalidArgument("persist_batch expects a list of events")
    try:
        return [MemoryEvent.model_validate(e) for e in raw]
    except ValidationError as e:
        # The fields and reasons only: errors() carries each input value, the payload included.
        raise InvalidArgument(f"malformed event in batch: {format_validation_error(e)}") from None


def declare_persist_actor(
    broker: RedisBroker,
    settings: Settings,
    pipeline: Callable[[], Awaitable[PersistPipeline]] | None = None,
) -> dramatiq.Actor[Any, Any]:
    """Declare ``persist_batch`` on ``broker``. Senders pass no pipeline; workers pass a factory."""

    async def persist_batch(events: list[dict[str, Any]]) -> None:
        if pipeline is None:
            raise RuntimeError("persist_batch runs only in a worker built with a pipeline")
        batch = decode_batch(events)
        p = await pipeline()
        try:
            await p.persist(batch)
        except Unavailable as e:
            # Retried with the actor's backoff like any failure, but without a traceback per batch:
            # the pipeline's breaker and outage logs report the outage once (and a summary).
            raise dramatiq.Retry(e.message) from None

    wb = settings.write_behind
    decorate = dramatiq.actor(
        broker=broker,
        actor_name=PERSIST_ACTOR,
        queue_name=wb.queue_name,
        max_retries=wb.max_retries,
        min_backoff=wb.min_backoff_ms,
        max_backoff=wb.max_backoff_ms,
        throws=(InvalidArgument, ValidationError),
    )
    return decorate(persist_batch)


class LazyPipeline:
    """Builds the pipeline on first use, inside the worker's event loop (Redis/NATS clients bind to it)."""

    def __init__(self, build: Callable[[], Awaitable[PersistPipeline]]) -> None:
        self._build = build
        self._task: asyncio.Task[PersistPipeline] | None = None

    async def __call__(self) -> PersistPipeline:
        if self._task is None:
            self._task = asyncio.ensure_future(self._build())
        try:
            return await asyncio.shield(self._task)
        except Exception:
            self._task = None  # the next message tries again (e.g. NATS was down at start)
            raise
