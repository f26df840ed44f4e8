"""The persist path: concurrent batches share one SQL transaction, a bad batch fails only itself, and a
batch is done once committed and clean while its publish finishes in the background."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from factories import event

from mfh_core import HotStore, SqlStore
from mfh_models import MemoryEvent
from mfh_tasks import PersistPipeline


class CountingStore(SqlStore):
    """A real store that counts its transactions and refuses any batch holding the key ``bad``."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.transactions = 0

    def apply_batch(self, events: Sequence[MemoryEvent], *, published: bool = False) -> Any:
        self.transactions += 1
        if any(e.key == "bad" for e in events):
            raise ValueError("a row the store refuses")
        return super().apply_batch(events, published=published)


class SlowBus:
    """Acks every event once ``release`` is set (a NATS that is slow to answer)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.published: list[str] = []

    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]:
        await self.release.wait()
        ids = [e.event_id for e in events]
        self.published.extend(ids)
        return ids


@pytest.fixture
async def stores(sqlite_url: str, redis_url: str) -> AsyncIterator[tuple[CountingStore, HotStore]]:
    sql = CountingStore(sqlite_url)
    sql.create_schema()
    hot = HotStore(redis_url=redis_url, prefix="tp", origin="main_pc", cache_ttl_seconds=60)
    try:
        yield sql, hot
    finally:
        await hot.close()
        sql.close()


async def test_concurrent_batches_share_one_transaction_and_a_bad_one_fails_alone(stores: Any) -> None:
    sql, hot = stores
    pipeline = PersistPipeline(sql=sql, hot=hot)
    # Given one batch persisting, and five more that come while it is in flight
    first = asyncio.ensure_future(pipeline.persist([event("k0", 1)]))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(pipeline.persist([event(f"k{i}", i + 1)])) for i in range(1, 6)]
    await asyncio.gather(first, *rest)
    # Then the five went in one transaction after the first one's
    assert sql.transactions == 2
    assert set(sql.get_many("ns", [f"k{i}" for i in range(6)])) == {f"k{i}" for i in range(6)}
    # When a round holds a batch the store refuses
    sql.transactions = 0
    first = asyncio.ensure_future(pipeline.persist([event("a", 10)]))
    await asyncio.sleep(0)
    good = asyncio.ensure_future(pipeline.persist([event("b", 11)]))
    bad = asyncio.ensure_future(pipeline.persist([event("bad", 12), event("c", 12)]))
    results = await asyncio.gather(first, good, bad, return_exceptions=True)
    # Then only that batch fails (the round is retried batch by batch), and the others are stored
    assert results[0] is None and results[1] is None and isinstance(results[2], ValueError)
    assert set(sql.get_many("ns", ["a", "b", "bad", "c"])) == {"a", "b"}


async def test_a_batch_is_done_once_committed_and_clean_while_its_publish_is_still_under_way(stores: Any) -> None:
    sql, hot = stores
    bus = SlowBus()
    pipeline = PersistPipeline(sql=sql, hot=hot, bus=bus, mark_interval_s=0.01)
    e = event("k", 1)
    # When a batch persists while NATS has not answered yet
    await asyncio.wait_for(pipeline.persist([e]), 10)
    # Then it is committed (unpublished so far: the outbox would relay it) and not published yet
    assert [ev.event_id for _, ev in sql.unpublished()] == [e.event_id]
    assert bus.published == []
    # When NATS answers, the publish completes and the event is marked published
    bus.release.set()
    await pipeline.drain_publishing()
    assert bus.published == [e.event_id]
    await pipeline.flush_marks()
    assert sql.unpublished() == []
