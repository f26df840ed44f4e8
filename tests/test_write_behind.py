"""The write-behind path end to end: stage in Redis → batch queue → Dramatiq → SQL, with real workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dramatiq import Message
from hosts import InProcessApi, TestHost, make_host
from services import async_wait_until

from mfh_api.service import build_service
from mfh_client import Durability, PutSpec
from mfh_core import HotStore, SqlStore
from mfh_models import DeadlineExceeded, InvalidArgument, MemoryEvent
from mfh_tasks import BatchQueue, decode_batch


@pytest.fixture
async def host(tmp_path: Path, redis_url: str) -> AsyncIterator[TestHost]:
    h = make_host(tmp_path, redis_url=redis_url, overrides={"write_behind": {"batch_max_size": 50}})
    yield h
    h.stop_all()


def sql_for(host: TestHost) -> SqlStore:
    s = SqlStore(host.settings.storage.database_url)
    s.create_schema()
    return s


async def test_worker_killed_mid_batch_loses_no_write(host: TestHost) -> None:
    # Given 5,000 acknowledged writes (staged in Redis, batches enqueued) and a worker persisting them
    sender = InProcessApi(host)
    sql = sql_for(host)
    try:
        writes = await asyncio.gather(*(sender.put(f"k{i}", f"v{i}") for i in range(5000)))
        worker = host.start_worker(threads=2)
        await async_wait_until(lambda: sql.counts()["items"] > 0, 60, message="the worker to persist something")
        # When the worker is SIGKILLed in the middle of them
        host.kill(worker)
        persisted_at_kill = sql.counts()["items"]
        assert persisted_at_kill < 5000, "the worker finished before it could be killed"
        # and a worker runs again
        host.start_worker(threads=2)
        # Then every write reaches SQL, at its staged version, and every entry becomes clean
        await async_wait_until(
            lambda: sql.counts()["items"] == 5000, 90, interval=0.1, message=f"5,000 items\n{host.log()}"
        )
        await async_wait_until(lambda: _zero(sender.hot), 30, message="dirty set to drain")
        rows = sql.get_many("ns", [e.key for e in writes])
        assert {k: r.version for k, r in rows.items()} == {e.key: e.version for e in writes}
    finally:
        await sender.close()
        sql.close()


async def _zero(hot: HotStore) -> bool:
    return await hot.dirty_count() == 0


async def test_persist_waits_for_sql_and_ttl_starts_after(host: TestHost) -> None:
    # Given a running worker
    sender = InProcessApi(host)
    sql = sql_for(host)
    host.start_worker(threads=2)
    try:
        # When a write is acknowledged
        e = await sender.put("k", "hello")
        # Then it is dirty (no TTL) until it is in SQL, and clean with a TTL after
        await async_wait_until(lambda: sql.get("ns", "k") is not None, 30, message=f"row in SQL\n{host.log()}")
        await async_wait_until(lambda: _ttl_positive(sender.hot), 10, message="TTL to start")
        row = sql.get("ns", "k")
        assert row is not None and row.version == e.version
    finally:
        await sender.close()
        sql.close()


async def test_a_persisted_put_after_idle_answers_without_the_consumers_back_off(host: TestHost) -> None:
    # Given a worker and an api service, the worker warmed up by a first PERSISTED put
    host.start_worker(threads=2)
    service = await build_service(host.settings)

    async def persisted_put(key: str) -> float:
        t0 = time.perf_counter()
        await service.put(PutSpec("ns", key, "memory_item", {"content": key}), durability=Durability.PERSISTED)
        return time.perf_counter() - t0

    async def warmed_up() -> bool:
        try:
            await persisted_put("warm-up")
            return True
        except DeadlineExceeded:
            return False

    try:
        await async_wait_until(warmed_up, 60, interval=0.1, message=f"a first PERSISTED put\n{host.log()}")
        took = []
        for i in range(2):
            # When the hub has been idle for two seconds (Dramatiq's consumer used to back off to 0.5-1 s by then)
            await asyncio.sleep(2.0)
            took.append(await persisted_put(f"after-idle-{i}"))
        # Then each PERSISTED put answers well within the old back-off (the wake-up signal fetched it at once)
        assert max(took) < 0.15, f"PERSISTED puts after 2 s idle took {[round(t * 1000) for t in took]} ms"
    finally:
        await service.close()


async def _ttl_positive(hot: HotStore) -> bool:
    return await hot.ttl_of("ns", "k") > 0


def test_malformed_batches_are_rejected_without_retry() -> None:
    with pytest.raises(InvalidArgument):
        decode_batch({"not": "a list"})
    with pytest.raises(InvalidArgument):
        decode_batch([{"event_id": "x"}])
    with pytest.raises(InvalidArgument):
        decode_batch([{**_valid_event(), "namespace": "../../etc"}])


def _valid_event() -> dict[str, object]:
    return {
        "event_id": "main_pc-1",
        "op": "put",
        "namespace": "ns",
        "key": "k",
        "kind": "memory_item",
        "payload": "{}",
        "version": 1,
        "origin": "main_pc",
        "created_at": 1,
    }


async def test_batcher_groups_concurrent_writes_and_answers_each_caller() -> None:
    sent: list[list[MemoryEvent]] = []
    batcher = BatchQueue(sent.append, max_size=100, max_delay_s=0.005)
    events = [
        MemoryEvent.model_validate({**_valid_event(), "event_id": f"main_pc-{i}", "version": i, "key": f"k{i}"})
        for i in range(1, 251)
    ]
    await asyncio.gather(*(batcher.submit(e) for e in events))
    assert [len(b) for b in sent] == [100, 100, 50]
    assert [e for b in sent for e in b] == events


async def test_batcher_sends_a_lone_write_at_once_and_collects_writes_while_a_send_is_in_flight() -> None:
    # Given a batcher whose send blocks until released, with a long delay it must not wait for
    release = asyncio.Event()
    sent: list[list[MemoryEvent]] = []
    loop = asyncio.get_running_loop()

    def send(events: list[MemoryEvent]) -> None:
        sent.append(events)
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(5)

    batcher = BatchQueue(send, max_size=100, max_delay_s=10.0)
    events = [
        MemoryEvent.model_validate({**_valid_event(), "event_id": f"main_pc-{i}", "version": i, "key": f"k{i}"})
        for i in range(1, 6)
    ]
    # When one write comes alone, then four more while its send is in flight
    first = asyncio.ensure_future(batcher.submit(events[0]))
    await async_wait_until(lambda: len(sent) == 1, 5, message="the lone write to go out without the delay")
    rest = asyncio.ensure_future(asyncio.gather(*(batcher.submit(e) for e in events[1:])))
    await asyncio.sleep(0.05)
    assert len(sent) == 1, "writes that came while a send was in flight went out on their own"
    release.set()
    await asyncio.wait_for(asyncio.gather(first, rest), 5)
    # Then the four went out together, as soon as the first send returned
    assert sent == [events[:1], events[1:]]


async def test_batcher_reports_a_failed_enqueue_to_every_caller() -> None:
    def broken(_: list[MemoryEvent]) -> None:
        raise ConnectionError("redis down")

    from mfh_models import Unavailable

    batcher = BatchQueue(broken, max_size=10, max_delay_s=0.001)
    results = await asyncio.gather(
        *(batcher.submit(MemoryEvent.model_validate(_valid_event())) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results)


async def test_send_now_enqueues_one_message_at_once_on_the_queues_own_broker(tmp_path: Path, redis_url: str) -> None:
    # Given a sender's batch queue built from settings (its own broker, as reconcile and recovery use)
    host = make_host(tmp_path, redis_url=redis_url)
    queue = BatchQueue.from_settings(host.settings)
    assert queue.broker is not None
    client = queue.broker.client  # type: ignore[attr-defined]
    name = f"dramatiq:{host.settings.write_behind.queue_name}"
    events = [
        MemoryEvent.model_validate({**_valid_event(), "event_id": f"main_pc-{i}", "version": i, "key": f"k{i}"})
        for i in range(1, 4)
    ]
    try:
        # When three events are sent now, from a thread (as the sweep does)
        await asyncio.to_thread(queue.send_now, events)
        # Then one persist_batch message carrying the three is in the queue, with no batching delay
        assert client.llen(name) == 1
        (mid,) = client.lrange(name, 0, -1)
        body = client.hget(f"{name}.msgs", mid)
        assert body is not None
        msg = Message.decode(body)
        assert msg.actor_name == "persist_batch" and decode_batch(msg.args[0]) == events
        assert queue.batches_sent == 0  # the micro-batches were bypassed
    finally:
        await queue.close()
