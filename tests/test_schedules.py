"""Scheduler jobs and dead-letter tools against real Redis, SQLite and Dramatiq workers."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import sqlalchemy as sa
from dramatiq import Message
from factories import event, payload
from hosts import TestHost, make_host
from services import async_wait_until, wait_until

from mfh_core import HotStore, SqlStore
from mfh_models import Kind, MemoryEvent, Op
from mfh_tasks import build_broker, build_hot_store, declare_persist_actor, encode_batch
from mfh_tasks.dlq import DeadLetters
from schedules import Lease, audit, reconcile, snapshot
from schedules.jobs import audit_paths, snapshots_of


@pytest.fixture
def store(sqlite_url: str) -> SqlStore:
    s = SqlStore(sqlite_url)
    s.create_schema()
    return s


async def test_reconcile_re_enqueues_only_stale_dirty_entries(redis_url: str) -> None:
    hot = HotStore(redis_url=redis_url, prefix="t", origin="main_pc", cache_ttl_seconds=60)
    sent: list[list[MemoryEvent]] = []
    try:
        # Given two staged writes whose batches never reached a worker
        old = [
            await hot.stage(op=Op.PUT, namespace="ns", key=f"k{i}", kind=Kind.MEMORY_ITEM, payload=payload("x"))
            for i in range(2)
        ]
        # When reconcile runs with a threshold they have passed, and with one they have not
        assert await reconcile(hot, sent.append, stale_after_s=3600) == 0
        n = await reconcile(hot, sent.append, stale_after_s=0)
        # Then exactly those are re-enqueued, as the events they were staged with
        assert n == 2 and [e for b in sent for e in b] == old
        # and a clean entry is never re-enqueued
        await hot.mark_clean(old)
        sent.clear()
        assert await reconcile(hot, sent.append, stale_after_s=0) == 0
    finally:
        await hot.close()


def test_audit_passes_on_a_consistent_store_and_catches_drift(store: SqlStore, tmp_path: Path) -> None:
    store.apply_batch([event(f"k{i % 7}", i, op=Op.DELETE if i % 4 == 0 else Op.PUT) for i in range(1, 60)])
    result = audit(store, host="main_pc", report_dir=tmp_path)
    assert result.ok and result.events == 59 and result.live_checksum == store.checksum()
    assert json.loads((tmp_path / "audit-latest-main_pc.json").read_text())["ok"] is True
    # When an item drifts from its log (edited behind the hub's back)
    with store._write.begin() as conn:
        conn.execute(sa.text("UPDATE items SET payload = '{\"content\":\"tampered\"}' WHERE key = 'k1'"))
    # Then the audit says so
    bad = audit(store, host="main_pc", report_dir=tmp_path)
    assert not bad.ok and bad.replay_checksum == result.live_checksum
    assert len((tmp_path / "audit-history-main_pc.jsonl").read_text().splitlines()) == 2


def test_snapshot_holds_every_item_and_the_checksum(store: SqlStore, tmp_path: Path) -> None:
    store.apply_batch([event("a", 1), event("b", 2, op=Op.DELETE)])
    path = snapshot(store, tmp_path, host="main_pc", keep=2)
    with gzip.open(path, "rt") as f:
        header, *rows = [json.loads(line) for line in f]
    assert header["checksum"] == store.checksum() and header["items"] == 2 and header["host"] == "main_pc"
    assert [(r["key"], r["deleted"]) for r in rows] == [("a", False), ("b", True)]


def test_two_hosts_sharing_a_snapshot_dir_keep_their_own_files(tmp_path: Path) -> None:
    # Given two hosts (one a prefix of the other's name) with different data, writing to one directory
    shared = tmp_path / "snapshots"
    stores = {}
    for host, n in (("pc", 1), ("pc-2", 3)):
        stores[host] = SqlStore(f"sqlite:///{tmp_path}/{host}.db")
        stores[host].create_schema()
        stores[host].apply_batch([event(f"{host}-k{i}", i + 1) for i in range(n)])
    try:
        # When each snapshots and audits several times, keeping 2 snapshots
        for _ in range(3):
            for host, store in stores.items():
                snapshot(store, shared, host=host, keep=2)
        audit(stores["pc"], host="pc", report_dir=shared)
        audit(stores["pc-2"], host="pc-2", report_dir=shared)
        # Then each host keeps its own newest two (retention counts one host only) ...
        for host, store in stores.items():
            mine = snapshots_of(shared, host)
            assert len(mine) == 2, sorted(p.name for p in shared.iterdir())
            with gzip.open(mine[-1], "rt") as f:
                header = json.loads(f.readline())
            assert header["host"] == host and header["checksum"] == store.checksum()
        assert len(list(shared.glob("snapshot-*.jsonl.gz"))) == 4
        # ... and its own audit report, which the other's audit did not overwrite
        for host, store in stores.items():
            latest, history = audit_paths(shared, host)
            report = json.loads(latest.read_text())
            assert report["host"] == host and report["live_checksum"] == store.checksum()
            assert len(history.read_text().splitlines()) == 1
    finally:
        for store in stores.values():
            store.close()


async def test_only_one_lease_holder_and_handover(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        a, b = Lease(client, "t:leader", ttl_ms=5000), Lease(client, "t:leader", ttl_ms=5000)
        assert await a.refresh() and not await b.refresh()
        assert await a.refresh()  # renewal keeps it
        await a.release()
        assert await b.refresh() and not await a.refresh()
    finally:
        await client.aclose()


@pytest.fixture
async def host(tmp_path: Path, redis_url: str) -> AsyncIterator[TestHost]:
    h = make_host(tmp_path, redis_url=redis_url)
    yield h
    h.stop_all()


async def test_invalid_batch_is_dead_lettered_and_a_retried_batch_is_persisted(host: TestHost) -> None:
    s = host.settings
    broker = build_broker(s)
    actor = declare_persist_actor(broker, s)
    dlq = DeadLetters(broker, s.write_behind.queue_name)
    sql = SqlStore(s.storage.database_url)
    sql.create_schema()
    hot = build_hot_store(s)
    try:
        # Given a worker and a malformed batch
        host.start_worker(threads=1)
        actor.send([{"event_id": "garbage"}])
        # Then it lands in the dead-letter queue without retries
        wait_until(lambda: dlq.count() == 1, 30, message=f"dead letter\n{host.log()}")
        (dead,) = dlq.list()
        assert dead.retries == 0 and dead.actor == "persist_batch"
        assert dlq.purge() == 1 and dlq.count() == 0
        # Given a valid batch that ended up dead (as after exhausted retries while SQL was down)
        e = await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("x"))
        msg = Message(
            queue_name=s.write_behind.queue_name,
            actor_name="persist_batch",
            args=(encode_batch([e]),),
            kwargs={},
            options={"retries": 25},
        )
        broker.client.zadd(dlq.ids_key, {msg.message_id: int(time.time() * 1000)})
        broker.client.hset(dlq.msgs_key, msg.message_id, msg.encode())
        assert [d.retries for d in dlq.list()] == [25]
        # When an operator retries it
        assert dlq.retry() == 1
        # Then it is persisted and leaves the dead-letter queue
        await async_wait_until(lambda: sql.get("ns", "k") is not None, 30, message=f"retried batch\n{host.log()}")
        assert dlq.count() == 0
    finally:
        await hot.close()
        sql.close()
        broker.close()
