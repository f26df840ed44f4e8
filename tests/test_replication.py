"""Replication between two hosts running as real processes (worker + replicator per host), one NATS.

The api side of each host runs in the test process (stage in Redis, batch, enqueue), as the api
does; persisting, publishing and applying remote events run in the hosts' own processes.
Unit-level checks of the apply rules (conflicts, redelivery, metrics) and of the outbox come first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest
import sqlalchemy as sa
from factories import event
from hosts import InProcessApi, TestHost, make_host
from services import NatsServer, async_wait_until

from mfh_api.cli import main as mfh
from mfh_core import SqlStore
from mfh_core.eventbus import EventBus
from mfh_core.metrics import REPLICATION_APPLIED, REPLICATION_LAG, REPLICATION_SKIPPED, UNPUBLISHED_EVENTS
from mfh_core.sqlstore import engine_url, metadata
from mfh_models import ChecksumRow, Kind, MemoryEvent, Op, Unavailable, items_checksum
from mfh_tasks import PersistPipeline, build_hot_store
from mfh_tasks.outbox import OutboxRelay
from mfh_tasks.replay import open_target, replay_from_sql, replay_from_stream
from mfh_tasks.replicator import Replicator, consumer_name

# -- two hosts ------------------------------------------------------------------------------------


@dataclass
class Side:
    """One host of the pair: its config and processes, its api, and a reader of its SQL."""

    host: TestHost
    api: InProcessApi
    sql: SqlStore
    replicator: subprocess.Popen[bytes] | None = field(default=None)

    @property
    def name(self) -> str:
        return self.host.name

    def start_replicator(self) -> None:
        self.replicator = self.host.spawn("mfh_api.cli", "replicator", log_name="replicator")

    def logs(self) -> str:
        worker, replicator = self.host.log("worker"), self.host.log("replicator")
        return f"--- {self.name} worker\n{worker}\n--- {self.name} replicator\n{replicator}"


def make_side(tmp_path: Path, name: str, redis_url: str, nats_url: str) -> Side:
    host = make_host(tmp_path, name=name, redis_url=redis_url, nats_url=nats_url)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    return Side(host=host, api=InProcessApi(host), sql=sql)


async def start_pair(a: Side, b: Side) -> None:
    """Create the stream, start worker + replicator per host, and wait until both consumers exist."""
    bus = EventBus.from_settings(a.host.settings.replication, name="mfh-test")
    await bus.connect()
    await bus.close()
    for side in (a, b):
        side.host.start_worker(threads=2)
        side.start_replicator()
    nc = await nats.connect(a.host.settings.replication.nats_url)
    try:
        js = nc.jetstream()
        stream = a.host.settings.replication.event_topic
        for side in (a, b):
            await async_wait_until(
                lambda s=side: js.consumer_info(stream, consumer_name(s.name)),  # type: ignore[misc]
                30,
                interval=0.05,
                message=f"consumer of {side.name}\n{side.logs()}",
            )
    finally:
        await nc.close()


async def stop_pair(*sides: Side, grace_s: float = 3.0) -> None:
    """SIGTERM every process at once, SIGKILL what is left after ``grace_s`` (a worker can take 10 s)."""
    procs = [p for side in sides for p in side.host.procs if p.poll() is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            await asyncio.to_thread(p.wait, max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            await asyncio.to_thread(TestHost.kill, p)
    for side in sides:
        await side.api.close()
        side.sql.close()


def expected_checksum(events: list[MemoryEvent]) -> str:
    """The checksum every host must reach: per key, the event with the largest (version, origin)."""
    best: dict[tuple[str, str], MemoryEvent] = {}
    for e in events:
        cur = best.get((e.namespace, e.key))
        if cur is None or (e.version, e.origin) > (cur.version, cur.origin):
            best[(e.namespace, e.key)] = e
    return items_checksum(
        ChecksumRow(e.namespace, e.key, e.version, e.origin, e.deleted, e.payload) for e in best.values()
    )


async def wait_converged(sides: tuple[Side, ...], events: list[MemoryEvent], within_s: float) -> None:
    """Until every host's SQL holds all ``events`` and has the expected checksum."""
    want = expected_checksum(events)
    n = len({e.event_id for e in events})

    def done() -> bool:
        return all(s.sql.counts()["events"] >= n and s.sql.checksum() == want for s in sides)

    await async_wait_until(
        lambda: asyncio.to_thread(done),
        within_s,
        interval=0.02,
        message="both hosts to converge\n" + "\n".join(s.logs() for s in sides),
    )


@pytest.fixture
async def pair(
    tmp_path: Path, redis_url: str, redis_url_b: str, fresh_nats: NatsServer
) -> AsyncIterator[tuple[Side, Side]]:
    """main_pc (Redis db 9) and pc2 (Redis db 10), each with a worker and a replicator, one NATS."""
    a = make_side(tmp_path, "main_pc", redis_url, fresh_nats.url)
    b = make_side(tmp_path, "pc2", redis_url_b, fresh_nats.url)
    try:
        await start_pair(a, b)
        yield a, b
    finally:
        await stop_pair(a, b)


async def stream_ids(settings_side: Side) -> set[str]:
    bus = EventBus.from_settings(settings_side.host.settings.replication, name="mfh-test-reader")
    await bus.connect()
    try:
        return {e.event_id async for e in bus.iter_stream()}
    finally:
        await bus.close()


def empty_database(url: str) -> None:
    """Drop our tables (one Postgres database serves both hosts' replays)."""
    engine = sa.create_engine(engine_url(url))
    try:
        metadata.drop_all(engine)
        with engine.begin() as conn:  # and the schema's revision, so the next replay creates it afresh
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    finally:
        engine.dispose()


async def mixed_writes(api: InProcessApi, keys: Sequence[str], n: int, seed: int, *, rate_per_s: float = 400) -> None:
    """``n`` puts and deletes on ``keys`` in a seeded random order, paced at about ``rate_per_s``."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    for i in range(n):
        key = rng.choice(keys)
        if rng.random() < 0.3:
            await api.delete(key)
        else:
            await api.put(key, f"{api.hot.origin}-{i}")
        delay = t0 + (i + 1) / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


# -- the apply rules, in process ------------------------------------------------------------------


@pytest.fixture
async def local(tmp_path: Path, redis_url: str) -> AsyncIterator[Replicator]:
    """A Replicator for host main_pc over real Redis and SQLite, fed directly (no NATS needed)."""
    host = make_host(tmp_path, name="main_pc", redis_url=redis_url, nats_url="nats://127.0.0.1:1")
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    hot = build_hot_store(host.settings)
    bus = EventBus.from_settings(host.settings.replication)
    yield Replicator(bus=bus, pipeline=PersistPipeline(sql=sql, hot=hot), host_id="main_pc")
    await hot.close()
    sql.close()


async def stored(r: Replicator, key: str) -> tuple[tuple[int, str, bool] | None, tuple[int, str, bool] | None]:
    """(version, origin, deleted) of ``key`` in Redis and in SQL."""
    entry = await r.pipeline.hot.get("ns", key)
    row = r.pipeline.sql.get("ns", key)
    hot = (entry.record.version, entry.record.origin, entry.record.deleted) if entry else None
    return hot, ((row.version, row.origin, row.deleted) if row else None)


async def test_concurrent_versions_resolve_to_the_larger_version_then_origin(local: Replicator) -> None:
    # Given a local write on main_pc
    hot = local.pipeline.hot
    mine = await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload='{"content":"mine"}')
    # When pc2's write with the same version arrives ("pc2" > "main_pc" breaks the tie)
    tie = event("k", 0, origin="pc2").model_copy(update={"version": mine.version, "event_id": f"pc2-{mine.version}"})
    await local.apply_remote([tie])
    # Then pc2's change wins in Redis and SQL
    assert await stored(local, "k") == ((mine.version, "pc2", False), (mine.version, "pc2", False))
    # And this host's clock moved past it: the next local write is newer than both
    nxt = await hot.stage(op=Op.PUT, namespace="ns", key="other", kind=Kind.MEMORY_ITEM, payload='{"content":"x"}')
    assert nxt.version > mine.version


async def test_deletes_win_or_lose_by_the_same_rule(local: Replicator) -> None:
    # Given a key put at version 10 by pc2
    await local.apply_remote([event("k", 10, origin="pc2")])
    # When an older delete arrives late, then a newer one, then an older put
    await local.apply_remote([event("k", 5, origin="pc2", op=Op.DELETE)])
    assert (await stored(local, "k"))[1] == (event("k", 10).version, "pc2", False)
    await local.apply_remote([event("k", 20, origin="pc3", op=Op.DELETE)])
    await local.apply_remote([event("k", 15, origin="pc2")])
    # Then the newest change, the tombstone, stands in Redis and SQL: a late older put cannot revive the key
    v20 = event("k", 20).version
    assert await stored(local, "k") == ((v20, "pc3", True), (v20, "pc3", True))


async def test_redelivered_and_reordered_events_change_nothing(local: Replicator) -> None:
    # Given a batch of remote events (puts and deletes over a few keys)
    events = [event(f"k{i % 7}", i, origin="pc2", op=Op.DELETE if i % 5 == 0 else Op.PUT) for i in range(1, 60)]
    applied_before = REPLICATION_APPLIED.labels(origin="pc2")._value.get()
    older_before = REPLICATION_SKIPPED.labels(reason="older")._value.get()
    lag_before = REPLICATION_LAG.labels(origin="pc2")._sum.get()
    await local.apply_remote(events)
    first = local.pipeline.sql.checksum()
    # When it is delivered again, reversed and in pieces (JetStream redeliveries)
    for i in range(0, 60, 13):
        await local.apply_remote(list(reversed(events))[i : i + 13])
    # Then the stored state is the same, each event is stored once, and the metrics count it all
    assert local.pipeline.sql.checksum() == first == expected_checksum(events)
    assert local.pipeline.sql.counts()["events"] == len(events)
    applied = REPLICATION_APPLIED.labels(origin="pc2")._value.get() - applied_before
    older = REPLICATION_SKIPPED.labels(reason="older")._value.get() - older_before
    assert applied + older == 2 * len(events) and applied >= 7
    assert REPLICATION_LAG.labels(origin="pc2")._sum.get() > lag_before
    assert await local.pipeline.hot.dirty_count() == 0


async def test_a_late_event_for_an_expired_entry_does_not_shadow_sql(local: Replicator) -> None:
    # Given SQL holds version 10 of a key whose Redis entry has expired
    await local.apply_remote([event("k", 10, origin="pc2")])
    await local.pipeline.hot.redis.delete(local.pipeline.hot.item_key("ns", "k"))
    # When an older event for it arrives late
    await local.apply_remote([event("k", 3, origin="pc2")])
    # Then Redis serves SQL's newer version, not the late one
    v10 = event("k", 10).version
    assert await stored(local, "k") == ((v10, "pc2", False), (v10, "pc2", False))


class FakeMsg:
    def __init__(self) -> None:
        self.acked = 0

    async def ack(self) -> None:
        self.acked += 1


async def test_own_events_are_acked_and_skipped_without_touching_the_stores(local: Replicator) -> None:
    # Given an event of this host's own origin coming back from the stream
    own_before = REPLICATION_SKIPPED.labels(reason="own")._value.get()
    msg = FakeMsg()
    # When the replicator receives it
    await local._on_message(event("k", 1, origin="main_pc"), msg)
    # Then it is acked and counted as skipped, and neither store holds it
    assert msg.acked == 1
    assert REPLICATION_SKIPPED.labels(reason="own")._value.get() == own_before + 1
    assert await stored(local, "k") == (None, None)


async def test_own_events_on_the_stream_are_acked_by_their_subject_without_being_decoded(
    local: Replicator, nats_server: NatsServer
) -> None:
    # Given a replicator of main_pc on a stream (half of whose messages, on two hosts, are its own)
    bus = EventBus(
        nats_url=nats_server.url, stream="t_own", subject_prefix="mfh.own", duplicate_window_s=60, max_age_s=600
    )
    await bus.connect()
    replicator = Replicator(bus=bus, pipeline=local.pipeline, host_id="main_pc")
    own_before = REPLICATION_SKIPPED.labels(reason="own")._value.get()
    try:
        await replicator.start()
        # When a message on one of its own subjects arrives (a body it could not even decode), and one of pc2's
        js = bus.conn.jetstream()
        await js.publish("mfh.own.main_pc.ns", b"not an event")
        assert len(await bus.publish_many([event("k", 1, origin="pc2")])) == 1

        # Then both are acked: its own one unread (not terminated as malformed), pc2's applied
        async def settled() -> bool:
            info = await replicator.consumer_info()
            return info["num_pending"] == 0 and info["num_ack_pending"] == 0

        await async_wait_until(settled, 10, message="both messages acked")
        assert replicator._sub is not None and replicator._sub.terminated == 0
        assert replicator.received == 2
        assert REPLICATION_SKIPPED.labels(reason="own")._value.get() == own_before + 1
        assert (await stored(local, "k"))[0] == (event("k", 1).version, "pc2", False)
    finally:
        await replicator.close()
        await bus.close()


class FlakyPipeline(PersistPipeline):
    """SQL is 'down' until ``down_until`` (monotonic seconds): persisting raises Unavailable."""

    down_until = 0.0

    async def persist(self, events: Sequence[MemoryEvent], *, publish: bool = True) -> None:
        if time.monotonic() < self.down_until:
            raise Unavailable("sqlite unavailable: database is locked (simulated)")
        await super().persist(events, publish=publish)


async def test_a_store_outage_longer_than_ack_wait_is_ridden_out_without_redeliveries(
    local: Replicator, nats_server: NatsServer
) -> None:
    # Given a replicator whose SQL store is down for 6 s, three times its ack_wait (so messages wait in its queue;
    # ack_wait is 2 s, not less: on a starved CI box the client reads a delivery a good half second late)
    bus = EventBus(
        nats_url=nats_server.url, stream="t_outage", subject_prefix="mfh.outage", duplicate_window_s=60, max_age_s=600
    )
    await bus.connect()
    sql, hot = local.pipeline.sql, local.pipeline.hot
    pipeline = FlakyPipeline(sql=sql, hot=hot)
    pipeline.down_until = time.monotonic() + 6.0
    replicator = Replicator(bus=bus, pipeline=pipeline, host_id="main_pc", ack_wait_s=2.0, persist_batch_max=50)
    try:
        await replicator.start()
        # When pc2's events arrive meanwhile
        events = [event(f"k{i}", i, origin="pc2") for i in range(1, 301)]
        assert len(await bus.publish_many(events)) == len(events)
        # Then they are readable from Redis at once, and in SQL once it is back, each exactly once
        await async_wait_until(lambda: hot.get("ns", "k300"), 5, message="the hot store to have the events")
        assert sql.counts()["events"] == 0
        await async_wait_until(
            lambda: asyncio.to_thread(lambda: sql.counts()["events"] == len(events)), 15, message="SQL to catch up"
        )
        assert sql.checksum() == expected_checksum(events)

        # And the held messages were kept in progress: JetStream redelivered none of them
        async def all_acked() -> bool:
            return (await replicator.consumer_info())["num_ack_pending"] == 0

        await async_wait_until(all_acked, 5, message="every message to be acked")
        assert replicator.received == len(events)
    finally:
        await replicator.close()
        await bus.close()


class FakeBus:
    """Acks the first ``accept`` events of each publish, in order; ``connected`` is switchable."""

    def __init__(self, accept: int) -> None:
        self.accept = accept
        self.connected = True
        self.published: list[str] = []

    async def publish_many(self, events: Sequence[MemoryEvent]) -> list[str]:
        ids = [e.event_id for e in events[: self.accept]]
        self.published.extend(ids)
        return ids


async def test_outbox_relays_unpublished_events_in_order(sqlite_url: str) -> None:
    # Given 30 committed events that were never published, and a bus that acks 10 then fails
    sql = SqlStore(sqlite_url)
    sql.create_schema()
    events = [event(f"k{i}", i) for i in range(1, 31)]
    sql.apply_batch(events, published=False)
    bus = FakeBus(accept=10)
    relay = OutboxRelay(sql=sql, bus=bus, batch=1000, min_age_ms=0)
    try:
        # When a pass runs: it stops at the first event without an ack
        assert await relay.relay_once() == 10
        assert bus.published == [e.event_id for e in events[:10]]
        assert UNPUBLISHED_EVENTS._value.get() == 20
        # When NATS is down nothing is sent; when it is back the rest goes, still in commit order
        bus.connected = False
        assert await relay.relay_once() == 0
        bus.connected, bus.accept = True, 1000
        assert await relay.relay_once() == 20
        # Then every event was published once, in seq order, and none is left
        assert bus.published == [e.event_id for e in events]
        assert sql.unpublished() == [] and UNPUBLISHED_EVENTS._value.get() == 0
    finally:
        sql.close()


async def test_outbox_leaves_fresh_events_to_their_worker(sqlite_url: str) -> None:
    # Given an event committed just now (its worker is publishing it)
    sql = SqlStore(sqlite_url)
    sql.create_schema()
    now = int(time.time() * 1000)
    fresh = event("k", 1).model_copy(update={"created_at": now})
    sql.apply_batch([fresh], published=False)
    bus = FakeBus(accept=10)
    try:
        # When the relay runs within its minimum age, then after it
        assert await OutboxRelay(sql=sql, bus=bus, min_age_ms=60_000).relay_once() == 0
        # Then it waits, and relays it once it is old enough
        assert await OutboxRelay(sql=sql, bus=bus, min_age_ms=60_000, clock_ms=lambda: now + 61_000).relay_once() == 1
    finally:
        sql.close()


# -- two hosts as processes -----------------------------------------------------------------------


async def test_writes_on_pc2_are_readable_on_main_pc(pair: tuple[Side, Side]) -> None:
    main_pc, pc2 = pair
    # When pc2 accepts 100 writes
    writes = [await pc2.api.put(f"k{i}", f"from pc2 {i}") for i in range(100)]
    # Then each is readable on main_pc: in its Redis, then in its SQL, at pc2's version
    want = {e.key: (e.version, "pc2") for e in writes}

    async def in_redis() -> bool:
        got = await main_pc.api.hot.get_many("ns", list(want))
        return {k: (v.record.version, v.record.origin) for k, v in got.items()} == want

    await async_wait_until(in_redis, 10, message=f"pc2's writes in main_pc's Redis\n{main_pc.logs()}")
    await wait_converged(pair, writes, 10)
    rows = main_pc.sql.get_many("ns", list(want))
    assert {k: (r.version, r.origin) for k, r in rows.items()} == want


async def test_overlapping_puts_and_deletes_converge_within_2s(pair: tuple[Side, Side]) -> None:
    main_pc, pc2 = pair
    keys = [f"k{i}" for i in range(15)]
    # When both hosts write the same keys at once, puts and deletes interleaved
    await asyncio.gather(mixed_writes(main_pc.api, keys, 300, seed=1), mixed_writes(pc2.api, keys, 300, seed=2))
    # Then within 2 s of the last write both hosts hold every event and the same checksum,
    # the one that per key keeps the larger (version, origin)
    await wait_converged(pair, main_pc.api.events + pc2.api.events, 2.0)
    # And their hot stores agree with it
    for side in pair:
        got = await side.api.hot.get_many("ns", keys)
        sql_rows = side.sql.get_many("ns", keys)
        assert {k: (e.record.version, e.record.origin) for k, e in got.items()} == {
            k: (r.version, r.origin) for k, r in sql_rows.items()
        }


async def test_one_key_written_on_both_hosts_converges_to_the_larger_version_origin(pair: tuple[Side, Side]) -> None:
    main_pc, pc2 = pair
    # When both hosts write one key concurrently, 40 rounds, with deletes among them
    for i in range(40):
        a = main_pc.api.delete("hot") if i % 4 == 3 else main_pc.api.put("hot", f"main {i}")
        b = pc2.api.delete("hot") if i % 6 == 5 else pc2.api.put("hot", f"pc2 {i}")
        await asyncio.gather(a, b)
    everything = main_pc.api.events + pc2.api.events
    winner = max(everything, key=lambda e: (e.version, e.origin))
    # Then both hosts converge to the largest (version, origin), in Redis and in SQL
    await wait_converged(pair, everything, 5)
    for side in pair:
        entry = await side.api.hot.get("ns", "hot")
        row = side.sql.get("ns", "hot")
        assert entry is not None and row is not None
        assert (entry.record.version, entry.record.origin, entry.record.deleted) == (
            winner.version,
            winner.origin,
            winner.deleted,
        )
        assert (row.version, row.origin, row.deleted, row.payload) == (
            winner.version,
            winner.origin,
            winner.deleted,
            winner.payload,
        )


@pytest.mark.slow
async def test_nats_down_for_5s_mid_writes_loses_nothing(pair: tuple[Side, Side], fresh_nats: NatsServer) -> None:
    main_pc, pc2 = pair
    keys = [f"k{i}" for i in range(40)]

    async def outage() -> None:
        await async_wait_until(  # both hosts are replicating
            lambda: asyncio.to_thread(lambda: all(s.sql.counts()["events"] > 200 for s in pair)),
            20,
            message="replication under way",
        )
        await asyncio.to_thread(fresh_nats.stop)
        await asyncio.sleep(5.0)  # the outage itself: what this test is about
        await asyncio.to_thread(fresh_nats.start)

    # When NATS stops for 5 s in the middle of writes on both hosts, then starts again
    await asyncio.gather(
        mixed_writes(main_pc.api, keys, 1600, seed=3, rate_per_s=200),
        mixed_writes(pc2.api, keys, 1600, seed=4, rate_per_s=200),
        outage(),
    )
    # Then both hosts converge
    await wait_converged(pair, main_pc.api.events + pc2.api.events, 60)
    # And every event of either host's log is on the stream once the outbox has relayed it
    for side in pair:
        await async_wait_until(
            lambda s=side: asyncio.to_thread(lambda: s.sql.counts()["unpublished"] == 0),  # type: ignore[misc]
            30,
            message=f"{side.name}'s outbox to drain\n{side.logs()}",
        )
    on_stream = await stream_ids(main_pc)
    for side in pair:
        logged = {e.event_id for _, e in side.sql.iter_events()}
        assert logged - on_stream == set(), f"{side.name}: events missing from the stream"
    assert {e.event_id for e in main_pc.api.events + pc2.api.events} <= on_stream


@pytest.mark.slow
async def test_replicator_sigkilled_and_restarted_resumes_its_durable_consumer(pair: tuple[Side, Side]) -> None:
    main_pc, pc2 = pair
    keys = [f"k{i}" for i in range(200)]
    writer = asyncio.create_task(mixed_writes(pc2.api, keys, 1500, seed=5, rate_per_s=500))
    # When main_pc's replicator is SIGKILLed while pc2 writes, and started again
    await async_wait_until(
        lambda: asyncio.to_thread(lambda: main_pc.sql.counts()["events"] > 100), 20, message="replication under way"
    )
    assert main_pc.replicator is not None
    await asyncio.to_thread(main_pc.host.kill, main_pc.replicator)
    applied_at_kill = main_pc.sql.counts()["events"]
    main_pc.start_replicator()
    await writer
    # Then main_pc gets every one of pc2's events, each exactly once, and the same checksum
    await wait_converged(pair, pc2.api.events, 30)
    assert applied_at_kill < len(pc2.api.events), "the replicator finished before it was killed"
    logged = [e.event_id for _, e in main_pc.sql.iter_events()]
    assert len(logged) == len(set(logged)) == len(pc2.api.events)
    assert set(logged) == {e.event_id for e in pc2.api.events}
    assert main_pc.sql.checksum() == pc2.sql.checksum()
    # And SIGTERM stops the restarted replicator cleanly
    assert main_pc.replicator is not None
    main_pc.replicator.terminate()
    assert await asyncio.to_thread(main_pc.replicator.wait, 10) == 0


async def test_replay_of_each_host_log_gives_its_live_checksum(
    pair: tuple[Side, Side], tmp_path: Path, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main_pc, pc2 = pair
    keys = [f"k{i}" for i in range(30)]
    # Given both hosts wrote overlapping keys and converged
    await asyncio.gather(mixed_writes(main_pc.api, keys, 200, seed=6), mixed_writes(pc2.api, keys, 200, seed=7))
    await wait_converged(pair, main_pc.api.events + pc2.api.events, 10)
    for side in pair:
        live = side.sql.checksum()
        # When its event log is replayed into an empty SQLite and an empty Postgres
        for url in (f"sqlite:///{tmp_path}/replay-{side.name}.db", postgres_url):
            empty_database(url)
            target = open_target(url)
            try:
                result = await asyncio.to_thread(replay_from_sql, side.sql, target)
            finally:
                target.close()
            # Then the rebuilt items table has that host's live checksum
            assert result.checksum == live, f"{side.name} into {target.dialect}"
    # And so does a replay from the stream
    bus = EventBus.from_settings(main_pc.host.settings.replication, name="mfh-test-replay")
    await bus.connect()
    target = open_target(f"sqlite:///{tmp_path}/replay-stream.db")
    try:
        result = await replay_from_stream(bus, target, batch=100)
    finally:
        await bus.close()
        target.close()
    assert result.checksum == main_pc.sql.checksum() == pc2.sql.checksum()
    assert result.events == len(main_pc.api.events) + len(pc2.api.events)
    # And `mfh replay --from-stream` on pc2 prints it
    capsys.readouterr()
    where = ["--host", "pc2", "--config-dir", str(pc2.host.config_dir)]
    argv = [*where, "replay", "--from-stream", "--quiet", "--into", f"sqlite:///{tmp_path}/cli-stream.db"]
    assert await asyncio.to_thread(mfh, argv) == 0
    assert capsys.readouterr().out.strip() == result.checksum
