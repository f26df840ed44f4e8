"""MemoryService against real Redis and SQLite (and a real Dramatiq worker where persistence matters)."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from factories import event
from hosts import TestHost, make_host
from services import async_wait_until

from mfh_api import service as service_module
from mfh_api.service import Durability, MemoryService, PutResult, PutSpec, build_service, compose_service
from mfh_core import ChangeFeed, HotStore, SqlStore
from mfh_core.resilience import Bulkhead, CircuitBreaker, CircuitState, OutageLog
from mfh_models import (
    MAX_PAYLOAD_BYTES,
    DeadlineExceeded,
    InvalidArgument,
    Kind,
    MemoryEvent,
    NotFound,
    Op,
    ResourceExhausted,
    Unavailable,
    VersionConflict,
)
from mfh_tasks import BatchQueue


def unique_prefix() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def host_for(tmp_path: Path, redis_url: str, **overrides: Any) -> TestHost:
    return make_host(
        tmp_path, redis_url=redis_url, overrides={"storage": {"redis_prefix": unique_prefix()}, **overrides}
    )


@pytest.fixture
def host(tmp_path: Path, redis_url: str) -> Any:
    h = host_for(tmp_path, redis_url, resilience={"circuit_breaker": {"reset_timeout": 60, "first_probe_seconds": 60}})
    yield h
    h.stop_all()


@pytest.fixture
async def svc(host: TestHost) -> AsyncIterator[MemoryService]:
    s = await build_service(host.settings)
    yield s
    await s.close()


def item(key: str, text: str = "x", expected: int | None = None, ns: str = "ns") -> PutSpec:
    return PutSpec(ns, key, "memory_item", {"content": text}, expected_version=expected)


async def nothing_staged(s: MemoryService) -> None:
    assert await s.hot.dirty_count() == 0


# -- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PutSpec("bad ns", "k", "memory_item", {"content": "x"}), "namespace"),
        (PutSpec("ns", "bad key!", "memory_item", {"content": "x"}), "key"),
        (PutSpec("ns", "k", "poem", {"content": "x"}), "unknown kind 'poem'"),
        (PutSpec("ns", "k", "memory_item", "{not json"), "not valid JSON"),
        (PutSpec("ns", "k", "memory_item", {"tags": []}), "content"),
        (PutSpec("ns", "k", "memory_item", {"content": "x" * (MAX_PAYLOAD_BYTES + 1)}), "262144"),
        (PutSpec("ns", "k", "memory_item", {"content": "x"}, expected_version=-1), "expected_version"),
    ],
)
async def test_bad_input_is_refused_with_a_clear_message_and_changes_nothing(
    svc: MemoryService, spec: PutSpec, message: str
) -> None:
    # When a put is malformed, Then it says what is wrong and nothing is staged
    with pytest.raises(InvalidArgument, match=message):
        await svc.put(spec)
    await nothing_staged(svc)


async def test_put_then_get_returns_canonical_payload_from_dict_or_text(svc: MemoryService) -> None:
    r1 = await svc.put(PutSpec("ns", "a", "memory_item", {"tags": ["t"], "content": "hi"}))
    r2 = await svc.put(PutSpec("ns", "b", "knowledge_record", '{"subject": "sky",  "object": "blue"}'))
    a, b = await svc.get("ns", "a"), await svc.get("ns", "b")
    assert (a.version, b.version) == (r1.version, r2.version)
    assert a.payload == '{"content":"hi","schema_version":1,"tags":["t"]}'
    assert json.loads(b.payload)["object"] == "blue" and r1.event_id == f"main_pc-{r1.version}"


# -- reads ----------------------------------------------------------------------------------------------


async def test_tombstone_in_redis_is_not_found_without_touching_sql(
    svc: MemoryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a deleted key whose tombstone is in Redis
    await svc.put(item("k"))
    await svc.delete("ns", "k")

    def no_sql(*_: object) -> None:
        raise AssertionError("SQL was read")

    monkeypatch.setattr(svc.sql, "get", no_sql)
    # When it is read, Then NotFound comes from Redis alone
    with pytest.raises(NotFound):
        await svc.get("ns", "k")


async def test_cold_miss_reads_sql_and_fills_redis_with_a_ttl(svc: MemoryService) -> None:
    # Given a row only in SQL
    svc.sql.apply_batch([event("k", 1)])
    # When it is read twice
    rec = await svc.get("ns", "k")
    # Then the first read repaired the hot store: a clean entry with the cache TTL
    entry = await svc.hot.get("ns", "k")
    assert entry is not None and not entry.dirty and entry.record.version == rec.version
    assert await svc.hot.ttl_of("ns", "k") > 0


async def test_fill_never_overwrites_a_newer_staged_version(svc: MemoryService) -> None:
    # Given a newer version staged in Redis and an older row in SQL
    staged = await svc.put(item("k", "new"))
    older = event("k", 1, content="old")
    svc.sql.apply_batch([older])
    await svc._fill(older.to_record())
    # Then reads still see the staged version
    rec = await svc.get("ns", "k")
    assert rec.version == staged.version and "new" in rec.payload


async def test_batch_get_answers_in_request_order_with_missing_keys(svc: MemoryService) -> None:
    await svc.batch_put([item("a"), item("c"), item("d")])
    svc.sql.apply_batch([event("b", 1)])  # only in SQL
    await svc.delete("ns", "d")
    records, missing = await svc.batch_get("ns", ["c", "zz", "b", "a", "c", "d"])
    assert [r.key for r in records] == ["c", "b", "a"] and missing == ["zz", "d"]


async def test_list_pages_by_key_with_prefix_kind_and_tombstones(svc: MemoryService) -> None:
    # Given persisted rows (List reads SQL) of two kinds, one deleted
    # (the factory's event ids are origin-version, so each event gets its own version)
    svc.sql.apply_batch([event(f"p/{i}", 10 + i) for i in range(5)] + [event("q", 20, kind="knowledge_record")])
    svc.sql.apply_batch([event("p/3", 30, op=Op.DELETE)])
    # When paging two at a time under "p/"
    keys, token = [], ""
    for _ in range(5):
        page, token = await svc.list("ns", key_prefix="p/", page_size=2, page_token=token)
        keys += [r.key for r in page]
        if not token:
            break
    # Then every live key comes once, in order; tombstones only on request; kind filters
    assert keys == ["p/0", "p/1", "p/2", "p/4"]
    with_deleted, _ = await svc.list("ns", key_prefix="p/", include_deleted=True)
    assert [r.key for r in with_deleted if r.deleted] == ["p/3"]
    knowledge, _ = await svc.list("ns", kind="knowledge_record")
    assert [r.key for r in knowledge] == ["q"]
    with pytest.raises(InvalidArgument, match="page_token"):
        await svc.list("ns", page_token="garbage!")
    _, t = await svc.list("ns", page_size=1)
    with pytest.raises(InvalidArgument, match="another namespace"):
        await svc.list("other", page_token=t)


# -- writes ---------------------------------------------------------------------------------------------


async def test_stale_expected_version_conflicts_and_changes_nothing(svc: MemoryService) -> None:
    v1 = (await svc.put(item("k", "one"))).version
    v2 = (await svc.put(item("k", "two", expected=v1))).version
    with pytest.raises(VersionConflict) as info:
        await svc.put(item("k", "three", expected=v1))
    assert info.value.current_version == v2
    assert "two" in (await svc.get("ns", "k")).payload


async def test_expected_version_on_a_hot_miss_is_checked_against_sql(svc: MemoryService) -> None:
    # Given a key known only to SQL
    e = event("k", 1)
    svc.sql.apply_batch([e])
    # Then create-only fails and the right version succeeds
    with pytest.raises(VersionConflict):
        await svc.put(item("k", expected=0))
    r = await svc.put(item("k", "next", expected=e.version))
    assert r.version > e.version


async def test_delete_of_an_absent_or_deleted_key_is_not_found(svc: MemoryService) -> None:
    with pytest.raises(NotFound):
        await svc.delete("ns", "never")
    svc.sql.apply_batch([event("sql-only", 1)])
    await svc.delete("ns", "sql-only")
    with pytest.raises(NotFound):
        await svc.delete("ns", "sql-only")
    with pytest.raises(NotFound):
        await svc.get("ns", "sql-only")
    await nothing_staged_except(svc, {"sql-only"})


async def test_concurrent_deletes_of_one_key_leave_exactly_one_tombstone(svc: MemoryService) -> None:
    # Given a live knowledge record
    await svc.put(PutSpec("ns", "k", "knowledge_record", {"subject": "sky"}))
    # When ten callers delete it at once
    results = await asyncio.gather(*(svc.delete("ns", "k") for _ in range(10)), return_exceptions=True)
    # Then one delete wins, the others are told NOT_FOUND, and the tombstone keeps the key's kind
    won = [r for r in results if isinstance(r, PutResult)]
    assert len(won) == 1 and all(isinstance(r, NotFound) for r in results if not isinstance(r, PutResult))
    entry = await svc.hot.get("ns", "k")
    assert entry is not None and entry.record.deleted and entry.record.kind is Kind.KNOWLEDGE_RECORD
    assert entry.record.version == won[0].version


async def nothing_staged_except(s: MemoryService, keys: set[str]) -> None:
    members = await s.hot.redis.zrange(s.hot.dirty_key, 0, -1)
    assert {str(m).rsplit(":", 1)[-1] for m in members} == keys


async def test_batch_put_is_all_or_nothing(svc: MemoryService) -> None:
    v = (await svc.put(item("existing"))).version
    # When one put of a batch is malformed, or one expected_version is stale, or a key repeats
    for bad in (
        [item("n1"), PutSpec("ns", "n2", "memory_item", {"nope": 1})],
        [item("n1"), item("existing", expected=v - 1)],
        [item("n1"), item("n1")],
    ):
        with pytest.raises((InvalidArgument, VersionConflict)):
            await svc.batch_put(bad)
    # Then none of them wrote anything
    _, missing = await svc.batch_get("ns", ["n1", "n2"])
    assert missing == ["n1", "n2"]
    assert (await svc.get("ns", "existing")).version == v
    results = await svc.batch_put([item("n1"), item("existing", expected=v)])
    assert results[0].version < results[1].version


async def test_concurrent_single_puts_are_staged_together_and_one_callers_bad_write_fails_only_that_caller(
    svc: MemoryService,
) -> None:
    # Given a key at version v
    v = (await svc.put(item("existing"))).version
    trips = svc.hot.stager.round_trips
    # When 40 callers put at once, among them a stale expected_version, a malformed payload and a batch
    # whose second put conflicts
    good = [svc.put(item(f"c{i}", f"text {i}")) for i in range(40)]
    bad = [
        svc.put(item("existing", "stale", expected=v - 1)),
        svc.put(PutSpec("ns", "malformed", "memory_item", {"nope": 1})),
        svc.batch_put([item("half"), item("existing", expected=0)]),
    ]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    # Then the good ones were staged in far fewer round trips than callers, each with its own version
    assert svc.hot.stager.round_trips - trips < 20
    versions = [r.version for r in results[:40] if isinstance(r, PutResult)]
    assert len(set(versions)) == 40
    # and each bad caller got its own error and wrote nothing
    stale, malformed, half = results[40:]
    assert isinstance(stale, VersionConflict) and stale.current_version == v
    assert isinstance(malformed, InvalidArgument)
    assert isinstance(half, VersionConflict)
    records, missing = await svc.batch_get("ns", ["c0", "c39", "half", "malformed"])
    assert [r.key for r in records] == ["c0", "c39"] and missing == ["half", "malformed"]
    assert (await svc.get("ns", "existing")).version == v


async def test_backlog_bound_refuses_new_writes_atomically(tmp_path: Path, redis_url: str) -> None:
    h = host_for(tmp_path, redis_url, write_behind={"max_backlog": 3})
    s = await build_service(h.settings)
    try:
        await s.batch_put([item("a"), item("b")])
        with pytest.raises(ResourceExhausted, match="backlog"):
            await s.batch_put([item("c"), item("d")])
        assert await s.hot.dirty_count() == 2
        await s.put(item("a", "rewrite"))  # an already-dirty key is not new backlog
    finally:
        await s.close()


async def test_bulkhead_full_is_resource_exhausted(tmp_path: Path, redis_url: str) -> None:
    h = host_for(tmp_path, redis_url, resilience={"bulkhead": {"max_concurrent": 1, "max_queue_size": 0}})
    s = await build_service(h.settings)
    try:
        async with s.bulkhead.slot():
            with pytest.raises(ResourceExhausted, match="capacity"):
                await s.get("ns", "k")
        with pytest.raises(NotFound):
            await s.get("ns", "k")
    finally:
        await s.close()


# -- durability and watch (real worker) -----------------------------------------------------------------


async def test_persisted_put_answers_only_after_the_sql_commit(svc: MemoryService, host: TestHost) -> None:
    host.start_worker(threads=2)
    for i in range(5):
        r = await svc.put(item(f"k{i}"), durability=Durability.PERSISTED, timeout=30)
        row = svc.sql.get("ns", f"k{i}")
        assert row is not None and row.version == r.version
    results = await svc.batch_put([item("b1"), item("b2")], durability=Durability.PERSISTED, timeout=30)
    rows = svc.sql.get_many("ns", ["b1", "b2"])
    assert [rows[k].version for k in ("b1", "b2")] == [r.version for r in results]
    d = await svc.delete("ns", "k0", durability=Durability.PERSISTED, timeout=30)
    row = svc.sql.get("ns", "k0")
    assert row is not None and row.deleted and row.version == d.version


async def test_persisted_put_is_answered_even_when_the_commit_notice_is_missed(
    svc: MemoryService, host: TestHost
) -> None:
    # Given a worker, and a change feed that hears nothing (as while its subscription reconnects)
    host.start_worker(threads=2)
    await svc.feed.close()
    # When a PERSISTED put is made, Then it is answered once the row is committed (the events table is checked)
    r = await svc.put(item("k"), durability=Durability.PERSISTED, timeout=30)
    row = svc.sql.get("ns", "k")
    assert row is not None and row.version == r.version


async def test_persisted_put_past_its_deadline_says_the_write_still_lands(svc: MemoryService, host: TestHost) -> None:
    # Given no worker running
    with pytest.raises(DeadlineExceeded, match="still be written"):
        await svc.put(item("k"), durability=Durability.PERSISTED, timeout=0.3)
    # When a worker starts, Then the write lands
    host.start_worker(threads=2)
    await async_wait_until(lambda: svc.sql.get("ns", "k") is not None, 30, message="row in SQL")


async def test_watch_streams_persisted_changes_of_its_namespace_and_prefix(svc: MemoryService, host: TestHost) -> None:
    host.start_worker(threads=2)
    got: list[MemoryEvent] = []
    sequences: list[int] = []

    async def consume() -> None:
        async for seq, ev in svc.watch("ns", "w/"):
            assert ev is not None
            got.append(ev)
            sequences.append(seq)
            if len(got) == 2:
                return

    task = asyncio.create_task(consume())
    await async_wait_until(lambda: len(svc.feed._watchers) == 1, 5, message="watcher registered")
    await svc.put(item("other"))
    await svc.put(item("w/1", ns="elsewhere"))
    r = await svc.put(item("w/1"))
    await svc.put(item("w/2"))
    await asyncio.wait_for(task, 30)
    assert [(e.key, e.op) for e in got] == [("w/1", Op.PUT), ("w/2", Op.PUT)]
    assert got[0].version == r.version
    assert 0 < sequences[0] < sequences[1]


async def test_idle_watches_share_one_read_of_the_log_and_still_see_a_change_whose_notice_was_lost(
    svc: MemoryService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given 50 idle Watch streams that check for a lost notice every 0.2 s, and a count of the log reads
    monkeypatch.setattr(service_module, "_WATCH_POLL_S", 0.2)
    reads: list[str] = []
    real_read = svc.sql.watch_page

    def counted(namespace: str, key_prefix: str, after: int, **kw: Any) -> Any:
        reads.append(namespace)
        return real_read(namespace, key_prefix, after, **kw)

    monkeypatch.setattr(svc.sql, "watch_page", counted)
    got: list[MemoryEvent] = []

    async def consume() -> None:
        async for _seq, ev in svc.watch("ns", "lost/"):
            assert ev is not None
            got.append(ev)

    tasks = [asyncio.create_task(consume()) for _ in range(50)]
    try:
        # (each stream reads where the log is, then its first page)
        await async_wait_until(lambda: len(reads) >= 100, 10, message="50 streams to have read the log")
        started = len(reads)
        # When they wait through about ten checks with nothing committed (time itself is the condition)
        await asyncio.sleep(2.0)
        idle_reads = len(reads) - started
        # Then the log was read about once per second for all of them, not 50 times per check
        assert idle_reads <= 6, idle_reads
        # When an event is committed to SQL with no notice at all (a notice lost with its Redis connection)
        svc.sql.apply_batch([event("lost/1", 1, origin="pc2")])
        # Then every stream still gets it, from the shared check of the log's head
        await async_wait_until(lambda: len(got) == 50, 10, message="every stream to see the change")
        assert {e.key for e in got} == {"lost/1"}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- composition ------------------------------------------------------------------------------------------


async def test_a_service_built_from_parts_uses_exactly_the_parts_it_is_given(host: TestHost) -> None:
    # Given a service built from parts: a real hot store and SQLite, a change feed on the hot store's
    # channel, breakers, a bulkhead, and a batch queue whose send records batches instead of enqueueing
    s = host.settings
    hot = HotStore(redis_url=s.storage.redis_url, prefix=s.storage.redis_prefix, origin=s.host_id, cache_ttl_seconds=60)
    sql = SqlStore(s.storage.database_url)
    sql.create_schema()
    sent: list[list[MemoryEvent]] = []
    feed = ChangeFeed(redis_url=s.storage.redis_url, channel=hot.persisted_channel)
    bulkhead = Bulkhead("parts", max_concurrent=1, max_queue_size=0)
    svc = MemoryService(
        settings=s,
        hot=hot,
        sql=sql,
        queue=BatchQueue(sent.append, max_delay_s=0.001),
        feed=feed,
        redis_breaker=CircuitBreaker("redis"),
        sql_breaker=CircuitBreaker("sql"),
        bulkhead=bulkhead,
        on_close=[sql.close],
    )
    await svc.start()
    try:
        # When a put is made and read back
        r = await svc.put(item("k", "from parts"))
        got = await svc.get("ns", "k")
        # Then the write went through the given queue and the given hot store, and reads back
        assert [[e.key for e in batch] for batch in sent] == [["k"]] and sent[0][0].version == r.version
        assert got.version == r.version and '"from parts"' in got.payload
        entry = await hot.get("ns", "k")
        assert entry is not None and entry.dirty and sql.get("ns", "k") is None
        # and a PERSISTED put is answered through the given change feed: the commit notice alone
        # (mark_clean, with nothing in SQL for the events-table recheck to find) wakes it
        task = asyncio.create_task(svc.put(item("p"), durability=Durability.PERSISTED, timeout=10))
        await async_wait_until(lambda: len(sent) == 2, 5, message="second batch queued")
        assert not task.done()
        await hot.mark_clean(sent[1])
        assert (await asyncio.wait_for(task, 5)).version == sent[1][0].version
        assert (await svc.health())["changefeed"] is True
        # and every call takes a slot of the given bulkhead
        async with bulkhead.slot():
            with pytest.raises(ResourceExhausted, match="capacity"):
                await svc.get("ns", "k")
    finally:
        await svc.close()


# -- degraded modes ---------------------------------------------------------------------------------------


def _service_with(host: TestHost, *, hot: HotStore, sql: SqlStore) -> MemoryService:
    def drop(_: list[MemoryEvent]) -> None:
        raise AssertionError("nothing should be enqueued")

    return compose_service(host.settings, hot=hot, sql=sql, queue=BatchQueue(drop))


async def test_sql_down_serves_hot_reads_and_fails_cold_misses_unavailable(svc: MemoryService, host: TestHost) -> None:
    await svc.put(item("hot"))
    down = SqlStore("postgresql+psycopg2://nobody@127.0.0.1:1/none")
    s = compose_service(host.settings, hot=svc.hot, sql=down, queue=svc.queue)
    assert (await s.get("ns", "hot")).key == "hot"
    with pytest.raises(Unavailable, match="SQL is down"):
        await s.get("ns", "cold")
    assert (await s.put(item("accepted-anyway"))).version > 0


async def test_redis_down_serves_sql_reads_and_refuses_writes_read_only(svc: MemoryService, host: TestHost) -> None:
    svc.sql.apply_batch([event("k", 1)])
    dead = HotStore(redis_url="redis://127.0.0.1:1/0", prefix="t", origin="main_pc", cache_ttl_seconds=60)
    s = _service_with(host, hot=dead, sql=svc.sql)
    try:
        for _ in range(7):  # past the breaker's threshold: later reads skip Redis at once
            assert (await s.get("ns", "k")).key == "k"
        assert s.redis_breaker.state is CircuitState.OPEN
        with pytest.raises(Unavailable, match="read-only mode"):
            await s.put(item("k2"))
        with pytest.raises(Unavailable, match="read-only mode"):
            await s.delete("ns", "k")
        health = await s.health()
        assert health["redis"] is False and health["sql"] is True
    finally:
        await dead.close()


# -- resilience primitives ---------------------------------------------------------------------------------


async def test_circuit_breaker_probes_with_backoff_and_jitter_then_closes_on_success(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a breaker that opens after 2 failures, probes 0.1 s after opening, backs off up to 1 s
    now = [0.0]
    cb = CircuitBreaker("dep", failure_threshold=2, reset_timeout=1.0, first_probe=0.1, clock=lambda: now[0])

    async def fail() -> None:
        raise Unavailable("down")

    async def ok() -> str:
        return "ok"

    caplog.set_level(logging.INFO, "mfh.resilience")
    for _ in range(2):
        with pytest.raises(Unavailable, match="down"):
            await cb.call(fail)
    # When it is open, calls are refused at once until a probe is due
    for _ in range(50):
        with pytest.raises(Unavailable, match="circuit open"):
            await cb.call(ok)
    assert cb.state is CircuitState.OPEN and cb.probes == 0
    # Then each failed probe doubles the wait (jittered +-20 %), capped at reset_timeout
    waits = []
    for _ in range(6):
        start = now[0]
        while not cb.allow():
            now[0] += 0.01
        waits.append(now[0] - start)
        cb.record_failure("still down")
    assert 0.07 <= waits[0] <= 0.13 and 0.15 <= waits[1] <= 0.25
    assert all(0.79 <= w <= 1.21 for w in waits[4:]), waits
    assert cb.probes == 6
    # And one probe at a time: while it runs, others are refused
    while not cb.allow():
        now[0] += 0.01
    assert not cb.allow()
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and await cb.call(ok) == "ok"
    # and the outage cost one line when it began and one when it ended (none per refused call)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "dep (circuit open) unavailable" in lines[0] and "dep (circuit open) is back" in lines[1]


async def test_outage_log_summarises_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    out = OutageLog("thing", what="batches deferred", summary_every_s=10, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "mfh.resilience")
    for _ in range(1000):
        out.failure("boom")
        now[0] += 0.025  # 25 s of failures, 40 a second
    out.success()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4, lines  # start, two summaries (at 10 s and 20 s), end
    assert "thing unavailable for 10 s, " in lines[1] and "batches deferred" in lines[1]
    assert lines[-1].startswith("thing is back after 25.0 s (1000 batches deferred")


async def test_bulkhead_queues_up_to_its_bound_then_refuses() -> None:
    bh = Bulkhead("b", max_concurrent=1, max_queue_size=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with bh.slot():
            await release.wait()

    t1, t2 = asyncio.create_task(hold()), asyncio.create_task(hold())
    await async_wait_until(lambda: bh.active == 1 and bh.waiting == 1, 5)
    with pytest.raises(ResourceExhausted):
        async with bh.slot():
            pass
    release.set()
    await asyncio.gather(t1, t2)
