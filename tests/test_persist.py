"""The persist path: a batch is done once committed and clean while its publish finishes in the
background, and the publishes under way are bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from factories import event
from services import async_wait_until

from mfh_core import HotStore, SqlStore
from mfh_models import MemoryEvent
from mfh_tasks import PersistPipeline


class SlowBus:
    """Acks every event once ``release`` is set (a NATS that is slow to answer, like one over a WAN)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sent: list[str] = []
        self.published: list[str] = []

    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]:
        ids = [e.event_id for e in events]
        self.sent.extend(ids)
        await self.release.wait()
        self.published.extend(ids)
        return ids


@pytest.fixture
async def stores(sqlite_url: str, redis_url: str) -> AsyncIterator[tuple[SqlStore, HotStore]]:
    sql = SqlStore(sqlite_url)
    sql.create_schema()
    hot = HotStore(redis_url=redis_url, prefix="tp", origin="main_pc", cache_ttl_seconds=60)
    try:
        yield sql, hot
    finally:
        await hot.close()
        sql.close()


async def test_a_batch_is_done_once_committed_and_clean_while_its_publish_is_still_under_way(stores: Any) -> None:
    sql, hot = stores
    bus = SlowBus()
    pipeline = PersistPipeline(sql=sql, hot=hot, bus=bus, mark_interval_s=0.01)
    e = event("k", 1)
    # When a batch persists while NATS has not answered yet
    await asyncio.wait_for(pipeline.persist([e]), 10)
    # Then it is committed, sent, and still unpublished in SQL (the outbox would relay it)
    assert [ev.event_id for _, ev in sql.unpublished()] == [e.event_id]
    assert bus.sent == [e.event_id] and bus.published == []
    # When NATS answers, the publish completes and the event is marked published
    bus.release.set()
    await asyncio.wait_for(pipeline.drain_publishing(), 10)
    assert bus.published == [e.event_id]
    await pipeline.flush_marks()
    assert sql.unpublished() == []


async def test_a_batch_waits_while_max_publishing_events_are_being_published(stores: Any) -> None:
    sql, hot = stores
    bus = SlowBus()
    pipeline = PersistPipeline(sql=sql, hot=hot, bus=bus, max_publishing=3)
    # Given two batches of two events whose publishes are under way (4 events, over the bound of 3)
    await asyncio.wait_for(pipeline.persist([event("a", 1), event("b", 1)]), 10)
    second = asyncio.ensure_future(pipeline.persist([event("c", 1), event("d", 1)]))
    # Then the second batch is committed and sent, but waits for the first publish to end
    await async_wait_until(lambda: len(bus.sent) == 4, 10, message="second batch sent")
    await asyncio.sleep(0.2)  # what it would take to mark its entries clean and return
    assert not second.done()
    # When NATS answers, it is done
    bus.release.set()
    await asyncio.wait_for(second, 10)
    await asyncio.wait_for(pipeline.drain_publishing(), 10)
    assert sorted(bus.published) == sorted(bus.sent)
