"""Expiry: invisible on every read path from the moment it expires (injected clock), a sweep that
tombstones through the normal write path, its tombstone replicated, replay equal to live, refresh-on-read."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hosts import InProcessApi, TestHost, make_host
from services import async_wait_until
from test_replication import Side, pair  # noqa: F401 - the two-host fixture

from mfh_api.search import SearchSpec
from mfh_api.service import Durability, MemoryService, PutSpec, build_service
from mfh_core import SqlStore
from mfh_models import InvalidArgument, Kind, NotFound, Op, canonical_json
from schedules.jobs import audit, expire

T0 = 1_900_000_000_000  # the injected clock's start (unix ms), well after any real write in the test


class Clock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


def host_for(tmp_path: Path, redis_url: str, **overrides: Any) -> TestHost:
    return make_host(
        tmp_path, redis_url=redis_url, overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}, **overrides}
    )


@pytest.fixture
async def world(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[MemoryService, Clock, TestHost]]:
    host = host_for(tmp_path, redis_url, expiry={"refresh_on_read": ["fresh"]})
    host.start_worker(threads=2)
    svc = await build_service(host.settings)
    clock = Clock()
    svc.clock = clock
    try:
        yield svc, clock, host
    finally:
        await svc.close()
        host.stop_all()


def memo(ns: str, key: str, text: str, ttl: int | None = None, **extra: Any) -> PutSpec:
    return PutSpec(ns, key, "memory_item", {"content": text, **extra}, ttl_seconds=ttl)


async def persisted(svc: MemoryService, spec: PutSpec) -> None:
    await svc.put(spec, durability=Durability.PERSISTED, timeout=30)


async def test_an_expired_record_is_invisible_on_every_read_path_before_any_sweep(
    world: tuple[MemoryService, Clock, TestHost],
) -> None:
    svc, clock, _ = world
    # Given a memory with a TTL, a session with its own expires_at_ms, and a memory without either
    await persisted(svc, memo("exp", "ttl", "apples and pears", ttl=60))
    session = {"session_id": "s1", "data": {"note": "apples"}, "expires_at_ms": T0 + 30_000}
    await persisted(svc, PutSpec("exp", "sess", "session_data", session))
    await persisted(svc, memo("exp", "keep", "apples forever"))
    got = await svc.get("exp", "ttl")
    assert json.loads(got.payload)["expires_at_ms"] == T0 + 60_000
    assert {r.key for r in (await svc.list("exp"))[0]} == {"keep", "sess", "ttl"}

    # When the clock passes both expiries (no sweep has run: the stores still hold both)
    clock.now = T0 + 60_000
    assert svc.sql.get("exp", "ttl") is not None and not svc.sql.get("exp", "ttl").deleted  # type: ignore[union-attr]

    # Then no read path shows them
    for key in ("ttl", "sess"):
        with pytest.raises(NotFound):
            await svc.get("exp", key)
    records, missing = await svc.batch_get("exp", ["ttl", "sess", "keep"])
    assert [r.key for r in records] == ["keep"] and missing == ["ttl", "sess"]
    assert [r.key for r in (await svc.list("exp"))[0]] == ["keep"]
    assert [r.key for r in (await svc.list("exp", include_deleted=True))[0]] == ["keep"]
    hits = await svc.search(SearchSpec(namespace="exp", query="apples"))
    assert [r.key for r, _ in hits] == ["keep"]
    with pytest.raises(NotFound):
        await svc.delete("exp", "ttl")

    # And a namespace whose only record expired is not listed
    await persisted(svc, memo("gone", "k", "short", ttl=1))
    assert "gone" in (await svc.list_namespaces())[0]
    clock.now += 1_000
    assert "gone" not in (await svc.list_namespaces())[0]

    # And Watch does not deliver a change whose record is already expired when it is sent
    _, now_at = await svc.watch_poll("exp", after_sequence=None)  # the log's position now
    await persisted(svc, memo("exp", "late", "already over", expires_at_ms=T0))
    await persisted(svc, memo("exp", "live", "still here"))

    async def first_event() -> str:
        async for _seq, ev in svc.watch("exp", after_sequence=now_at):
            assert ev is not None
            return ev.key
        raise AssertionError("watch ended")

    assert await asyncio.wait_for(first_event(), 10) == "live"


async def test_bad_ttls_are_invalid_arguments(world: tuple[MemoryService, Clock, TestHost]) -> None:
    svc, _, _ = world
    for ttl in (-1, 10**12):
        with pytest.raises(InvalidArgument, match="ttl_seconds"):
            await svc.put(memo("exp", "k", "x", ttl=ttl))
    with pytest.raises(InvalidArgument, match="expires_at_ms"):
        await svc.put(memo("exp", "k", "x", expires_at_ms="soon"))


async def test_the_sweep_tombstones_expired_records_and_replay_equals_live(
    world: tuple[MemoryService, Clock, TestHost],
) -> None:
    svc, clock, host = world
    # Given two expiring memories and one that does not expire, persisted
    for key in ("a", "b"):
        await persisted(svc, memo("sweep", key, "soon gone", ttl=10))
    await persisted(svc, memo("sweep", "c", "stays"))
    api = InProcessApi(host)
    try:
        # When the sweep runs before their expiry, it does nothing
        assert await expire(svc.hot, svc.sql, api.queue.send_now, now_ms=clock.now) == 0
        # When it runs after, it stages versioned tombstones through the persist queue
        clock.now = T0 + 10_000
        assert await expire(svc.hot, svc.sql, api.queue.send_now, now_ms=clock.now) == 2

        def swept() -> bool:
            rows = [svc.sql.get("sweep", k) for k in ("a", "b", "c")]
            return [r is not None and r.deleted for r in rows] == [True, True, False]

        await async_wait_until(swept, 30, message="tombstones persisted")
        # Then the log holds the deletes, and a second sweep finds nothing
        ops = [e.op for _, e in svc.sql.iter_events() if e.namespace == "sweep"]
        assert ops.count(Op.DELETE) == 2
        assert await expire(svc.hot, svc.sql, api.queue.send_now, now_ms=clock.now) == 0
        # And the replay audit's checksum equals the live one
        result = audit(svc.sql, host=host.name)
        assert result.ok and result.live_checksum == result.replay_checksum
    finally:
        await api.close()


async def test_a_record_put_again_after_it_expired_is_not_swept(world: tuple[MemoryService, Clock, TestHost]) -> None:
    svc, clock, host = world
    await persisted(svc, memo("sweep2", "k", "old", ttl=5))
    clock.now = T0 + 5_000
    # Given a newer version staged (not yet persisted, as the index still shows the expired one)
    await svc.hot.stage(
        op=Op.PUT, namespace="sweep2", key="k", kind=Kind.MEMORY_ITEM, payload=canonical_json({"content": "new"})
    )
    api = InProcessApi(host)
    try:
        # When the sweep runs, its delete is conditional on the expired version: nothing is staged
        assert await expire(svc.hot, svc.sql, api.queue.send_now, now_ms=clock.now) == 0
    finally:
        await api.close()


async def test_refresh_on_read_extends_the_ttl(world: tuple[MemoryService, Clock, TestHost]) -> None:
    svc, clock, _ = world
    # Given a namespace with refresh-on-read and a record with a 100 s TTL
    await persisted(svc, memo("fresh", "k", "touch me", ttl=100))
    await persisted(svc, memo("plain", "k", "do not touch", ttl=100))
    # When it is read 50 s later, its expiry moves to now + 100 s
    clock.now = T0 + 50_000
    got = await svc.get("fresh", "k")
    assert json.loads(got.payload)["expires_at_ms"] == T0 + 150_000
    assert json.loads((await svc.get("plain", "k")).payload)["expires_at_ms"] == T0 + 100_000
    # Then past the original expiry it is still there; the other namespace's is not
    clock.now = T0 + 120_000
    assert (await svc.get("fresh", "k")).key == "k"
    with pytest.raises(NotFound):
        await svc.get("plain", "k")


async def test_the_sweeps_tombstone_replicates_and_both_hosts_agree(pair: tuple[Side, Side]) -> None:  # noqa: F811
    a, b = pair
    # Given a record that expires, persisted on main_pc and replicated to pc2
    payload = canonical_json({"content": "ephemeral", "expires_at_ms": 1_000})
    e = await a.api.hot.stage(op=Op.PUT, namespace="rep", key="k", kind=Kind.MEMORY_ITEM, payload=payload)
    await a.api.queue.submit(e)
    await async_wait_until(lambda: b.sql.get("rep", "k") is not None, 30, message="replicated put")
    # When main_pc's sweep runs
    assert await expire(a.api.hot, a.sql, a.api.queue.send_now, now_ms=2_000) == 1

    # Then pc2 holds the same tombstone, and both hosts have the same checksum
    def tombstoned(store: SqlStore) -> bool:
        row = store.get("rep", "k")
        return row is not None and row.deleted

    await async_wait_until(lambda: tombstoned(b.sql), 30, message="replicated tombstone")
    assert a.sql.get("rep", "k") == b.sql.get("rep", "k")
    assert a.sql.checksum() == b.sql.checksum()
    # And pc2's sweep has nothing left to do
    assert await expire(b.api.hot, b.sql, b.api.queue.send_now, now_ms=2_000) == 0
    for side in (a, b):
        result = audit(side.sql, host=side.name)
        assert result.ok, result
