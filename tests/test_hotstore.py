"""HotStore against a real Redis: staging, versions, optimistic concurrency, dirty entries and TTLs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from factories import payload
from redis_server import VOLATILE, RedisServer
from services import wait_until

from mfh_core import Change, HotStore
from mfh_models import (
    DeadlineExceeded,
    Kind,
    NotFound,
    Op,
    Record,
    ResourceExhausted,
    Unavailable,
    VersionConflict,
    pack,
    unpack,
)


@pytest.fixture
async def hot(redis_url: str) -> AsyncIterator[HotStore]:
    h = HotStore(redis_url=redis_url, prefix="t", origin="main_pc", cache_ttl_seconds=60, max_backlog=1000)
    yield h
    await h.close()


async def put(hot: HotStore, key: str, text: str = "x", expected: int | None = None) -> int:
    e = await hot.stage(
        op=Op.PUT, namespace="ns", key=key, kind=Kind.MEMORY_ITEM, payload=payload(text), expected_version=expected
    )
    return e.version


async def test_stage_assigns_growing_versions_and_reads_back(hot: HotStore) -> None:
    v1 = await put(hot, "k", "one")
    v2 = await put(hot, "k", "two")
    assert v2 > v1
    entry = await hot.get("ns", "k")
    assert entry is not None and entry.dirty and entry.record.version == v2 and "two" in entry.record.payload


async def test_versions_are_unique_under_concurrency(hot: HotStore) -> None:
    versions = await asyncio.gather(*(put(hot, f"k{i % 10}") for i in range(500)))
    assert len(set(versions)) == 500
    ms, _ = unpack(max(versions))
    assert ms > 1_700_000_000_000  # wall-clock milliseconds in the high bits


async def test_concurrent_stagings_share_one_round_trip_and_each_caller_gets_its_own_outcome(hot: HotStore) -> None:
    # Given a key at version v1, and callers that will fail: a stale expected version, a delete of an
    # absent key, and a two-put batch whose second put conflicts (all or nothing for that caller)
    v1 = await put(hot, "taken", "one")
    trips = hot.stager.round_trips

    def change(key: str, text: str, expected: int | None = None, op: Op = Op.PUT) -> Change:
        kind = Kind.MEMORY_ITEM if op is Op.PUT else None
        return Change(op, "ns", key, kind, payload(text) if op is Op.PUT else "null", expected)

    calls = [
        [change(f"ok{i}", f"v{i}") for i in range(3)],
        [change("taken", "stale", expected=v1 - 1)],
        [change("ghost", "", op=Op.DELETE)],
        [change("ok3", "v3"), change("taken", "create-only", expected=0)],
        [change("taken", "two", expected=v1)],
        *([change(f"single{i}", f"s{i}")] for i in range(20)),
    ]
    # When they all stage at the same time
    results = await asyncio.gather(*(hot.stage_many(c) for c in calls), return_exceptions=True)
    # Then they travelled together (one or two round trips, not 25)
    assert hot.stager.round_trips - trips <= 2
    # and each caller got its own answer: the valid ones their versions, the others their own error
    ok, stale, ghost, mixed, fresh, *singles = results
    assert isinstance(ok, list) and [e.key for e in ok] == ["ok0", "ok1", "ok2"]
    assert isinstance(stale, VersionConflict) and stale.current_version == v1
    assert isinstance(ghost, NotFound) and "ns/ghost" in str(ghost)
    assert isinstance(mixed, VersionConflict) and "puts[1]" in str(mixed)
    assert isinstance(fresh, list) and fresh[0].version > v1  # staged after the groups before it, in order
    assert all(isinstance(r, list) and len(r) == 1 for r in singles)
    # and a failed caller changed nothing: ok3 was not staged, "taken" holds the one valid update
    assert await hot.get("ns", "ok3") is None and await hot.get("ns", "ghost") is None
    entry = await hot.get("ns", "taken")
    assert entry is not None and entry.record.version == fresh[0].version and "two" in entry.record.payload
    versions = [e.version for r in results if isinstance(r, list) for e in r]
    assert len(set(versions)) == len(versions) == 24


async def test_stale_expected_version_is_refused_and_changes_nothing(hot: HotStore) -> None:
    # Given a key at version v2
    v1 = await put(hot, "k", "one")
    v2 = await put(hot, "k", "two", expected=v1)
    # When a writer that read v1 tries to write
    with pytest.raises(VersionConflict) as info:
        await put(hot, "k", "three", expected=v1)
    # Then it is told the current version and nothing changed
    assert info.value.current_version == v2
    entry = await hot.get("ns", "k")
    assert entry is not None and entry.record.version == v2 and "two" in entry.record.payload


async def test_expected_zero_means_create_only(hot: HotStore) -> None:
    await put(hot, "k", expected=0)
    with pytest.raises(VersionConflict):
        await put(hot, "k", expected=0)
    # a tombstone counts as absent
    await hot.stage(op=Op.DELETE, namespace="ns", key="k", kind=None, payload="null")
    await put(hot, "k", expected=0)


async def test_delete_is_a_versioned_tombstone_keeping_the_kind(hot: HotStore) -> None:
    await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.SESSION_DATA, payload=payload("x"))
    e = await hot.stage(op=Op.DELETE, namespace="ns", key="k", kind=None, payload="null")
    assert e.op is Op.DELETE and e.kind is Kind.SESSION_DATA
    entry = await hot.get("ns", "k")
    assert entry is not None and entry.record.deleted and entry.record.version == e.version


async def test_dirty_entry_has_no_ttl_until_its_version_is_persisted(hot: HotStore) -> None:
    # Given two staged versions of one key
    e1 = await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("1"))
    e2 = await hot.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("2"))
    assert await hot.ttl_of("ns", "k") == -1
    # When only the older version is reported persisted
    assert await hot.mark_clean([e1]) == 0
    # Then the entry is still dirty, with no TTL, and still in the dirty set
    assert await hot.ttl_of("ns", "k") == -1
    assert await hot.dirty_count() == 1
    # When the newest version is persisted, the TTL starts and the dirty set empties
    assert await hot.mark_clean([e2]) == 1
    assert 0 < await hot.ttl_of("ns", "k") <= 60
    assert await hot.dirty_count() == 0
    # And a new write removes the TTL again
    await put(hot, "k")
    assert await hot.ttl_of("ns", "k") == -1


async def test_dirty_entry_survives_past_the_cache_ttl(redis_url: str) -> None:
    # A 1 s cache TTL: a persisted entry expires, a dirty one never does.
    hot = HotStore(redis_url=redis_url, prefix="t", origin="main_pc", cache_ttl_seconds=1)
    try:
        clean = await hot.stage(op=Op.PUT, namespace="ns", key="clean", kind=Kind.MEMORY_ITEM, payload=payload("c"))
        await hot.stage(op=Op.PUT, namespace="ns", key="dirty", kind=Kind.MEMORY_ITEM, payload=payload("d"))
        await hot.mark_clean([clean])
        deadline = asyncio.get_running_loop().time() + 5
        while await hot.get("ns", "clean") is not None:
            assert asyncio.get_running_loop().time() < deadline, "clean entry never expired"
            await asyncio.sleep(0.05)
        assert await hot.get("ns", "dirty") is not None
        assert await hot.ttl_of("ns", "dirty") == -1
    finally:
        await hot.close()


async def test_apply_takes_only_newer_versions_and_moves_the_clock(hot: HotStore) -> None:
    local = await put(hot, "k", "local")
    future_version = pack(unpack(local)[0] + 60_000, 3)  # a remote host a minute ahead
    remote = Record(
        namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("remote"), version=future_version, origin="pc2"
    )
    assert await hot.apply(remote, from_sql=False) is True
    assert await hot.apply(remote, from_sql=False) is False  # the same version again: no-op
    older = remote.model_copy(update={"version": local - 1, "payload": payload("old")})
    assert await hot.apply(older, from_sql=False) is False
    # the next local write is newer than the remote one it saw
    assert await put(hot, "other") > future_version
    entry = await hot.get("ns", "k")
    assert entry is not None and entry.record.origin == "pc2" and entry.dirty


async def test_apply_many_gives_what_applying_one_after_the_other_gives(hot: HotStore) -> None:
    local = await put(hot, "k", "local")
    ahead = pack(unpack(local)[0] + 60_000, 1)

    def remote(key: str, version: int, text: str) -> Record:
        return Record(
            namespace="ns", key=key, kind=Kind.MEMORY_ITEM, payload=payload(text), version=version, origin="pc2"
        )

    # Given a batch with a newer remote version, the same again, an older one, and two other keys
    batch = [
        remote("k", ahead, "newer"),
        remote("k", ahead, "newer"),
        remote("k", local - 1, "older"),
        remote("a", ahead + 1, "a"),
        remote("b", ahead + 2, "b"),
    ]
    # When it is applied in pipelined round trips (two records per round trip here)
    # Then each record's outcome is that of its own apply, in order, and the entries hold the winners
    assert await hot.apply_many(batch, from_sql=False, chunk=2) == [True, False, False, True, True]
    assert await hot.apply_many([], from_sql=False) == []
    entries = await hot.get_many("ns", ["k", "a", "b"])
    assert {k: e.record.version for k, e in entries.items()} == {"k": ahead, "a": ahead + 1, "b": ahead + 2}
    assert all(e.dirty for e in entries.values())
    assert await put(hot, "other") > ahead + 2  # the clock moved past the newest of the batch


async def test_apply_many_loads_its_script_again_when_redis_lost_it(tmp_path: Path) -> None:
    # Given a hot store on a private Redis whose script cache was flushed (as after a restart)
    server = RedisServer(tmp_path, args=VOLATILE).start()
    hot = HotStore(redis_url=server.url, prefix="t", origin="main_pc", cache_ttl_seconds=60)
    admin = server.client()
    try:
        first = Record(namespace="ns", key="a", kind=Kind.MEMORY_ITEM, payload=payload("a"), version=5, origin="pc2")
        assert await hot.apply_many([first], from_sql=False) == [True]
        admin.script_flush()
        # When a batch is applied in one pipelined round trip
        batch = [first.model_copy(update={"key": f"k{i}", "version": 10 + i}) for i in range(3)]
        # Then every record is applied all the same, each outcome its own
        assert await hot.apply_many([*batch, first], from_sql=False) == [True, True, True, False]
        assert set(await hot.get_many("ns", ["k0", "k1", "k2"])) == {"k0", "k1", "k2"}
    finally:
        admin.close()
        await hot.close()
        server.kill()


async def test_fill_from_sql_never_overwrites_a_newer_staged_version(hot: HotStore) -> None:
    staged = await put(hot, "k", "new")
    sql_row = Record(
        namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload=payload("old"), version=staged - 1, origin="main_pc"
    )
    assert await hot.apply(sql_row, from_sql=True) is False
    entry = await hot.get("ns", "k")
    assert entry is not None and entry.dirty and "new" in entry.record.payload
    # a fill into an empty slot is clean and has a TTL
    fresh = sql_row.model_copy(update={"key": "cold"})
    assert await hot.apply(fresh, from_sql=True) is True
    cold = await hot.get("ns", "cold")
    assert cold is not None and not cold.dirty and await hot.ttl_of("ns", "cold") > 0


async def test_backlog_bound_refuses_new_keys_but_not_rewrites(redis_url: str) -> None:
    hot = HotStore(redis_url=redis_url, prefix="t", origin="main_pc", cache_ttl_seconds=60, max_backlog=3)
    try:
        for k in "abc":
            await put(hot, k)
        with pytest.raises(ResourceExhausted):
            await put(hot, "d")
        assert await hot.get("ns", "d") is None
        await put(hot, "a")  # rewriting a dirty key does not grow the backlog
    finally:
        await hot.close()


async def test_stale_dirty_lists_events_to_re_enqueue(hot: HotStore) -> None:
    e = await hot.stage(op=Op.PUT, namespace="ns", key="k:1/x", kind=Kind.MEMORY_ITEM, payload=payload("x"))
    events = await hot.stale_dirty(older_than_ms=e.created_at + 1)
    assert events == [e]
    assert await hot.stale_dirty(older_than_ms=e.created_at - 1) == []


async def test_get_many_returns_hits_only(hot: HotStore) -> None:
    await put(hot, "a")
    await put(hot, "b")
    got = await hot.get_many("ns", ["a", "zz", "b"])
    assert sorted(got) == ["a", "b"]


async def test_stage_many_is_all_or_nothing(hot: HotStore) -> None:
    from mfh_core import Change
    from mfh_models import NotFound

    v = await put(hot, "a", "old")
    # Given a batch whose second change has a stale expected_version
    batch = [
        Change(Op.PUT, "ns", "new", Kind.MEMORY_ITEM, payload("n")),
        Change(Op.PUT, "ns", "a", Kind.MEMORY_ITEM, payload("a2"), expected_version=v - 1),
    ]
    # Then it is refused naming that change, and the first change was not written either
    with pytest.raises(VersionConflict, match=r"puts\[1\]"):
        await hot.stage_many(batch)
    assert await hot.get("ns", "new") is None
    # A delete of a key that is absent (or already a tombstone) is NotFound and writes nothing
    with pytest.raises(NotFound):
        await hot.stage(op=Op.DELETE, namespace="ns", key="never", kind=None, payload="null")
    assert await hot.get("ns", "never") is None
    # A good batch gets growing versions, one per change
    events = await hot.stage_many([Change(Op.PUT, "ns", f"b{i}", Kind.MEMORY_ITEM, payload("x")) for i in range(3)])
    assert [e.version for e in events] == sorted({e.version for e in events})


async def test_a_stage_whose_connection_is_lost_after_sending_may_be_staged(tmp_path: Path) -> None:
    # Given a hot store on a private Redis, connected, and Redis holding every write command (CLIENT PAUSE)
    server = RedisServer(tmp_path, args=VOLATILE).start()
    hot = HotStore(redis_url=server.url, prefix="t", origin="main_pc", cache_ttl_seconds=60)
    admin = server.client()
    try:
        await put(hot, "warm")
        admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        try:
            # When a stage is sent and its connection is closed before Redis answers it
            staging = asyncio.create_task(put(hot, "k"))
            await asyncio.to_thread(wait_until, lambda: _paused_client(admin) is not None, 5.0)
            admin.execute_command("CLIENT", "KILL", "ID", _paused_client(admin))
            # Then the caller is told the write may be staged (DeadlineExceeded), not "nothing staged"
            with pytest.raises(DeadlineExceeded, match="may be staged"):
                await staging
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
        # And with Redis gone, nothing can be sent: Unavailable, nothing staged
        server.kill()
        with pytest.raises(Unavailable):
            await put(hot, "k2")
    finally:
        admin.close()
        await hot.close()
        server.kill()


def _paused_client(admin: redis.Redis) -> str | None:
    """The id of the client whose EVALSHA is held by the pause."""
    for c in admin.client_list():
        if c.get("cmd") == "evalsha" and "b" in c.get("flags", ""):  # flag b: blocked
            return str(c["id"])
    return None


# -- a Redis reached by a unix socket -------------------------------------------------------------


async def test_the_hot_store_and_the_broker_reach_a_redis_given_as_a_unix_socket_url(tmp_path: Path) -> None:
    from hosts import make_host

    from mfh_tasks import build_hot_store
    from mfh_tasks.broker import build_broker

    # Given a Redis that also listens on a unix socket, and settings that name it by its unix:// URL
    sock = tmp_path / "redis.sock"
    with RedisServer(tmp_path, args=[*VOLATILE, "--unixsocket", str(sock), "--unixsocketperm", "700"]) as server:
        url = f"unix://{sock}?db=0"
        host = make_host(tmp_path, redis_url=url)
        hot = build_hot_store(host.settings)
        broker = build_broker(host.settings)
        try:
            # When a write is staged and a message enqueued through them
            [event] = await hot.stage_many([Change(Op.PUT, "ns", "k", Kind.MEMORY_ITEM, '{"c":1}')])
            broker.client.rpush("probe", b"x")
            # Then both went over the socket (a connection class chosen without the URL's scheme
            # would have tried TCP with the socket's path as a host name)
            entry = await hot.get("ns", "k")
            assert entry is not None and entry.record.version == event.version and entry.dirty
            assert server.client().llen("probe") == 1
        finally:
            broker.close()
            await hot.close()
