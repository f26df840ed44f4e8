"""Recovery in seconds (issue 10): lost batches come back without a scheduler, with the shipped settings.

Each scenario runs real worker processes against real Redis and SQL, and no scheduler: the
scheduler's reconcile (60-90 s) is the safety net, not the way back.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from hosts import InProcessApi, TestHost, make_host
from prometheus_client import REGISTRY
from proxy import TcpProxy
from redis_server import HUB_REDIS_CONF, VOLATILE, RedisServer
from services import async_wait_until, free_port, wait_until
from sqlalchemy.engine import make_url

from mfh_core import Change, SqlStore
from mfh_core.redis_health import check_persistence, persistence_of
from mfh_models import Kind, MemoryEvent, Op, canonical_json, load_settings
from mfh_tasks import BatchQueue, build_broker, build_hot_store, declare_persist_actor
from mfh_tasks.recovery import DirtySweeper

#: What the repository ships (make_host speeds recovery up for other tests; these tests must not).
_WB = load_settings(env={}).write_behind
SHIPPED = {
    "write_behind": {
        "heartbeat_timeout_ms": _WB.heartbeat_timeout_ms,
        "maintenance_chance": _WB.maintenance_chance,
        "min_backoff_ms": _WB.min_backoff_ms,
    }
}


def _sql(host: TestHost) -> SqlStore:
    s = SqlStore(host.settings.storage.database_url)
    s.create_schema()
    return s


def _in_sql(sql: SqlStore, events: list[MemoryEvent]) -> bool:
    rows = sql.get_many("ns", [e.key for e in events])
    return all(k in rows and rows[k].version >= e.version for k, e in ((e.key, e) for e in events))


def _held_by_workers(client: redis.Redis) -> int:
    """Messages fetched by some worker and not acked yet (Dramatiq's ack sets)."""
    return sum(int(client.scard(k)) for k in client.keys("dramatiq:__acks__.*"))


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


async def test_a_killed_workers_batches_are_in_sql_within_15_s(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    host = make_host(tmp_path, redis_url=redis_url, overrides=SHIPPED)
    sender = InProcessApi(host)
    sql = _sql(host)
    lock = sqlite3.connect(host.settings.storage.sqlite_path, isolation_level=None)
    try:
        # Given a worker that holds batches it cannot commit yet (another connection holds the SQLite write lock)
        worker = host.start_worker(threads=2)
        first = await sender.put("first", "x")
        await async_wait_until(lambda: _in_sql(sql, [first]), 30, message=f"worker up\n{host.log()}")
        lock.execute("BEGIN IMMEDIATE")
        writes = [await sender.put(f"k{i}", f"v{i}") for i in range(40)]  # one batch each
        wait_until(lambda: _held_by_workers(redis_client) > 0, 10, message="the worker to hold batches")
        # When it is SIGKILLed, the lock goes away and another worker runs
        host.kill(worker)
        killed_at = time.monotonic()
        lock.rollback()
        host.start_worker(threads=2)
        # Then its batches are in SQL within 15 s of the kill (the bound is 20 s; the shipped
        # heartbeat is 10 s and maintenance runs every 2 s), with no scheduler
        await async_wait_until(
            lambda: _in_sql(sql, writes), 15, interval=0.1, message=f"every write in SQL\n{host.log()}"
        )
        print(f"worker_sigkill_recovery_s={time.monotonic() - killed_at:.1f}")
    finally:
        lock.close()
        host.stop_all()
        await sender.close()
        sql.close()


async def test_writes_staged_by_a_dead_api_and_never_enqueued_are_in_sql_within_20_s(tmp_path: Path) -> None:
    # Given a worker on a Redis that keeps nothing on disk (it says so once, and in a gauge)
    with RedisServer(tmp_path, args=VOLATILE) as server:
        metrics_port = free_port()
        overrides = {**SHIPPED, "metrics": {"worker_port": metrics_port}}
        host = make_host(tmp_path, redis_url=server.url, overrides=overrides)
        hot = build_hot_store(host.settings)
        sql = _sql(host)
        try:
            host.start_worker(threads=2)
            metrics = wait_until(lambda: _scrape(metrics_port), 30, message=f"worker metrics\n{host.log()}")
            # When an api stages writes and dies before it enqueues their batch
            payload = canonical_json({"content": "x"})
            changes = [Change(Op.PUT, "ns", f"k{i}", Kind.MEMORY_ITEM, payload) for i in range(100)]
            staged = await hot.stage_many(changes)
            staged_at = time.monotonic()
            # Then a worker enqueues and persists them within 20 s, with no scheduler
            await async_wait_until(
                lambda: _in_sql(sql, staged), 20, interval=0.1, message=f"staged writes in SQL\n{host.log()}"
            )
            print(f"api_sigkill_recovery_s={time.monotonic() - staged_at:.1f}")
            assert 'mfh_redis_persistence{mode="none"} 1.0' in metrics
            assert 'mfh_redis_persistence{mode="aof"} 0.0' in metrics
            assert host.log().count("keeps nothing on disk") == 1
        finally:
            host.stop_all()
            await hot.close()
            sql.close()


def _scrape(port: int) -> str | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text: str = r.read().decode()
    return text if "mfh_redis_persistence{" in text else None


async def test_redis_killed_with_sql_down_and_a_backlog_loses_nothing(tmp_path: Path, postgres_url: str) -> None:
    # Given the hub's shipped Redis (append-only file), Postgres behind a proxy, a worker
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    SqlStore(postgres_url).create_schema()
    server = RedisServer(tmp_path, conf=HUB_REDIS_CONF).start()
    host = make_host(tmp_path, redis_url=server.url, database_url=via_proxy, overrides=SHIPPED)
    sender = InProcessApi(host)
    sql = SqlStore(postgres_url)
    client = server.client()
    queue = host.settings.write_behind.queue_name
    try:
        host.start_worker(threads=2)
        first = await sender.put("first", "x")
        await async_wait_until(lambda: _in_sql(sql, [first]), 30, message=f"worker up\n{host.log()}")
        # and SQL down with a backlog of acknowledged writes whose batches are failing and retrying
        proxy.cut()
        writes = [await sender.put(f"k{i}", f"v{i}") for i in range(200)]
        wait_until(lambda: client.hlen(f"dramatiq:{queue}.DQ.msgs") > 0, 20, message="batches retrying")
        # When Redis is SIGKILLed and starts again from its append-only file, and SQL is back
        server.kill()
        server.start()
        back_at = time.monotonic()
        proxy.start()
        # Then every acknowledged write is in SQL within 10 s, with no scheduler
        await async_wait_until(
            lambda: _in_sql(sql, writes), 10, interval=0.1, message=f"every write in SQL\n{host.log()}"
        )
        print(f"redis_sigkill_aof_recovery_s={time.monotonic() - back_at:.1f} lost=0")
    finally:
        host.stop_all()
        await sender.close()
        sql.close()
        client.close()
        server.kill()
        proxy.cut()


def test_maintenance_requeues_a_dead_workers_messages_when_asked(tmp_path: Path, redis_url: str) -> None:
    # Given a message fetched by a broker whose heartbeat is older than the timeout (a dead worker),
    # and a maintenance chance so small that Dramatiq's random pass never runs
    overrides = {"write_behind": {"heartbeat_timeout_ms": 1000, "maintenance_chance": 1}}
    host = make_host(tmp_path, redis_url=redis_url, overrides=overrides)
    s = host.settings
    sender, live = BatchQueue.from_settings(s), build_broker(s)
    dead = sender.broker
    assert dead is not None
    client = redis.Redis.from_url(redis_url)
    queue = f"dramatiq:{s.write_behind.queue_name}"
    try:
        sender.send_now([])
        consumer = dead.consume(s.write_behind.queue_name, prefetch=1, timeout=100)
        assert next(consumer) is not None
        assert client.llen(queue) == 0
        client.zadd("dramatiq:__heartbeats__", {dead.broker_id: int(time.time() * 1000) - 5000})
        # When a live worker runs its maintenance pass
        declare_persist_actor(live, s)
        live.run_maintenance()
        # Then the message is back in the queue at once
        assert client.llen(queue) == 1
    finally:
        client.close()
        dead.close()
        live.close()


async def test_persistence_check_warns_once_and_sets_the_gauge(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        RedisServer(tmp_path, args=VOLATILE) as volatile,
        RedisServer(tmp_path, conf=HUB_REDIS_CONF) as durable,
        RedisServer(tmp_path, args=["--rename-command", "CONFIG", ""]) as locked,
    ):
        modes: dict[str, Any] = {}
        for name, server in (("volatile", volatile), ("durable", durable), ("locked", locked)):
            s = make_host(tmp_path / name, redis_url=server.url).settings
            hot = build_hot_store(s)
            try:
                modes[name] = await persistence_of(hot.redis)
                if name == "volatile":
                    with caplog.at_level(logging.INFO, logger="mfh.redis"):
                        for _ in range(3):
                            await check_persistence(hot.redis, url=server.url, process="test")
            finally:
                await hot.close()
        assert modes == {"volatile": "none", "durable": "aof", "locked": "unknown"}
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "keeps nothing on disk" in warnings[0].getMessage() and "appendonly yes" in warnings[0].getMessage()
        assert REGISTRY.get_sample_value("mfh_redis_persistence", {"mode": "none"}) == 1
        assert REGISTRY.get_sample_value("mfh_redis_persistence", {"mode": "aof"}) == 0


async def test_a_down_redis_is_not_reported_as_a_persistence_mode(tmp_path: Path) -> None:
    s = make_host(tmp_path, redis_url=f"redis://127.0.0.1:{free_port()}/0").settings
    hot = build_hot_store(s)
    try:
        assert await asyncio.wait_for(check_persistence(hot.redis, url=s.storage.redis_url, process="t"), 10) is None
    finally:
        await hot.close()


async def test_the_sweep_enqueues_each_stale_entry_once_across_workers(tmp_path: Path, redis_url: str) -> None:
    s = make_host(tmp_path, redis_url=redis_url).settings
    hot = build_hot_store(s)
    sent: list[list[MemoryEvent]] = []
    a, b = (DirtySweeper(hot, sent.append, stale_s=0.001, process=p) for p in ("a", "b"))
    payload = canonical_json({"content": "x"})
    try:
        # Given 30 dirty entries staged in one call (one millisecond), and a Redis no sweeper has seen
        await hot.stage_many([Change(Op.PUT, "ns", f"k{i}", Kind.MEMORY_ITEM, payload) for i in range(30)])
        # When two workers' sweepers tick: the first one re-enqueues every dirty entry (a Redis it has
        # not seen may have restarted), the other one nothing
        assert await a.tick() == 30
        assert await b.tick() == 0
        # and entries staged later are taken once, by whichever ticks first, once they are stale
        later = await hot.stage_many([Change(Op.PUT, "ns", f"n{i}", Kind.MEMORY_ITEM, payload) for i in range(5)])
        await async_wait_until(lambda: b.tick(), 5, message="the later entries to be swept")
        assert await a.tick() == 0
        assert sorted(e.key for batch in sent for e in batch) == sorted(
            [f"k{i}" for i in range(30)] + [e.key for e in later]
        )
        # Paging through many entries of one millisecond returns each once
        pages = [p async for p in hot.dirty_events(page=7)]
        assert sorted(e.key for p in pages for e in p) == sorted({e.key for batch in sent for e in batch})
    finally:
        await hot.close()


# -- SQL back after an outage: the dirty entries are persisted at once ----------------------------


async def test_sql_back_after_an_outage_persists_every_dirty_entry_at_once_and_queued_batches_skip_them(
    tmp_path: Path, redis_url: str
) -> None:
    from mfh_tasks.persist import PersistPipeline

    # Given 600 writes staged in Redis while SQL was down (their queued batches not run yet), and a
    # worker's pipeline whose SQL breaker is open
    host = make_host(tmp_path, redis_url=redis_url)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    hot = build_hot_store(host.settings)
    pipeline = PersistPipeline(sql=sql, hot=hot, catch_up=True, catch_up_batch=100)
    try:
        staged = await hot.stage_many(
            [Change(Op.PUT, "ns", f"k{i}", Kind.MEMORY_ITEM, canonical_json({"content": str(i)})) for i in range(600)]
        )
        for _ in range(pipeline.sql_breaker.failure_threshold):
            pipeline.sql_breaker.record_failure("down")
        assert pipeline.sql_breaker.state.value != "closed"
        # When SQL answers again: the first queued batch (its probe) goes through
        await async_wait_until(lambda: pipeline.sql_breaker.allow(), 5, message="breaker probe due")
        pipeline.sql_breaker._release_trial()
        await pipeline.persist(staged[:2])
        # Then every dirty entry is persisted by the catch-up, in batches, not one queued batch at a time
        assert pipeline._catching_up is not None
        assert await asyncio.wait_for(pipeline._catching_up, 30) in (598, 600)  # the first two may be clean by then
        assert await hot.dirty_count() == 0
        assert sql.counts()["items"] == 600
        # and a queued batch of entries it persisted is skipped: no second event in the log
        events_before = sql.counts()["events"]
        await pipeline.persist(staged[100:110])
        assert sql.counts()["events"] == events_before
        # while a batch of a write staged after it still lands
        [late] = await hot.stage_many([Change(Op.PUT, "ns", "late", Kind.MEMORY_ITEM, canonical_json({"c": 1}))])
        await pipeline.persist([late])
        assert sql.get("ns", "late") is not None and sql.counts()["events"] == events_before + 1
    finally:
        await hot.close()
        sql.close()
