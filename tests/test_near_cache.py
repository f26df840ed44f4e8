"""The api's near cache (docs/operations.md, "The near cache"), with real Redis and real api processes.

- A write made by another process, or on another host (replicated into this host's Redis), is
  never hidden by the cache for longer than ``near_cache.max_stale_ms``: every Get sent that long
  after the write reached this host's Redis answers the new version.
- A confirmed absence is cached, and a later put (through the api or behind its back) ends it.
- Across a Redis restart the whole cache is dropped: a write made before the api's tracking
  connection is back is never hidden by an entry read before the restart.
- The bounds (entries, bytes, absences) hold, and a read in flight when its key changes is not kept.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hosts import TestHost, make_host
from redis_server import HUB_REDIS_CONF, RedisServer
from services import NatsServer, async_wait_until, free_port, tcp_open

from mfh_api.client_grpc import AsyncMemoryClient
from mfh_api.service import PutSpec
from mfh_core import HotStore
from mfh_core.nearcache import NearCache
from mfh_models import Kind, NotFound, Op, Record, canonical_json
from mfh_tasks import build_hot_store

BOUND_S = 0.05  # near_cache.max_stale_ms, the shipped default


@dataclass
class ApiProcess:
    """One ``mfh_api.app`` process of a host, its client, and its metrics."""

    host: TestHost
    client: AsyncMemoryClient

    def metric(self, name: str, labels: str = "") -> float:
        port = self.host.settings.server.metrics_port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    async def hits(self) -> float:
        return await asyncio.to_thread(self.metric, "mfh_near_cache_lookups_total", '{result="hit"}')

    async def tracking(self) -> bool:
        return await asyncio.to_thread(self.metric, "mfh_near_cache_tracking") == 1.0

    async def cached(self, key: str) -> Record:
        """Read ``key`` until an answer came from the near cache (a hit was counted), and return it."""
        before = await self.hits()

        async def hit() -> bool:
            await self.client.get("ns", key)
            return await self.hits() > before

        await async_wait_until(hit, 10, message=f"a near-cache hit for {key}\n{self.host.log('api')}")
        return await self.client.get("ns", key)


def api_host(tmp_path: Path, redis_url: str, *, name: str = "main_pc", nats_url: str | None = None) -> TestHost:
    return make_host(
        tmp_path,
        name=name,
        redis_url=redis_url,
        nats_url=nats_url,
        overrides={
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
            "server": {"grpc_port": free_port(), "metrics_port": free_port()},
        },
    )


async def start_api(host: TestHost) -> ApiProcess:
    host.spawn("mfh_api.app", log_name="api")
    port = host.settings.server.grpc_port
    await async_wait_until(lambda: tcp_open("127.0.0.1", port), 30, message=f"api on {port}\n{host.log('api')}")
    api = ApiProcess(host, AsyncMemoryClient([f"127.0.0.1:{port}"], timeout=5.0, retries=0))
    await async_wait_until(api.tracking, 10, message=f"near-cache tracking\n{host.log('api')}")
    return api


async def stage(hot: HotStore, key: str, text: str) -> int:
    """A write made behind the api's back (another process): staged in Redis as any api stages it."""
    payload = canonical_json({"content": text, "schema_version": 1})
    e = await hot.stage(op=Op.PUT, namespace="ns", key=key, kind=Kind.MEMORY_ITEM, payload=payload)
    return e.version


async def assert_seen_within_bound(api: ApiProcess, key: str, version: int, written_at: float) -> float:
    """Read ``key`` until ``version`` shows; every read sent ``BOUND_S`` after ``written_at`` must show it.
    Returns how long after ``written_at`` the first read that saw it was sent."""
    while True:
        sent = time.monotonic()
        try:
            got = (await api.client.get("ns", key)).version
        except NotFound:
            got = 0
        if got >= version:
            return sent - written_at
        assert sent - written_at <= BOUND_S, (
            f"a read sent {1000 * (sent - written_at):.1f} ms after the write was stale"
        )


@pytest.fixture
async def api(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[ApiProcess, HotStore]]:
    host = api_host(tmp_path, redis_url)
    hot = build_hot_store(host.settings)
    try:
        proc = await start_api(host)
        yield proc, hot
        await proc.client.close()
    finally:
        host.stop_all()
        await hot.close()


async def test_a_write_from_another_process_is_never_hidden_longer_than_the_bound(
    api: tuple[ApiProcess, HotStore],
) -> None:
    proc, hot = api
    for i in range(10):
        # Given a record this api serves from its near cache
        await proc.client.put(PutSpec("ns", "k", "memory_item", {"content": f"api {i}"}))
        await proc.cached("k")
        # When another process writes a newer version
        version = await stage(hot, "k", f"other {i}")
        written = time.monotonic()
        # Then no read sent later than the bound answers the old one (normally the very next read is new)
        await assert_seen_within_bound(proc, "k", version, written)
    # And a write through this api is read back at once (read-your-writes)
    await proc.cached("k")
    put = await proc.client.put(PutSpec("ns", "k", "memory_item", {"content": "mine"}))
    assert (await proc.client.get("ns", "k")).version == put.version


async def test_a_cached_absence_ends_with_a_later_put(api: tuple[ApiProcess, HotStore]) -> None:
    proc, hot = api
    # Given a key this api has confirmed absent (NOT_FOUND answered from the near cache)
    before = await proc.hits()

    async def absence_hit() -> bool:
        with pytest.raises(NotFound):
            await proc.client.get("ns", "later")
        return await proc.hits() > before

    await async_wait_until(absence_hit, 10, message="a cached absence")
    # (answered without the stores: the hot store counts no further lookup of it)
    hot_misses = await asyncio.to_thread(proc.metric, "mfh_cache_lookups_total", '{result="miss"}')
    with pytest.raises(NotFound):
        await proc.client.get("ns", "later")
    assert await asyncio.to_thread(proc.metric, "mfh_cache_lookups_total", '{result="miss"}') == hot_misses
    # When another process puts it, Then reads see it within the bound
    version = await stage(hot, "later", "now here")
    await assert_seen_within_bound(proc, "later", version, time.monotonic())
    # And the same through the api itself: an absence cached again, then a put, then the record at once
    await proc.client.delete("ns", "later")
    with pytest.raises(NotFound):
        await proc.client.get("ns", "later")
    put = await proc.client.put(PutSpec("ns", "later", "memory_item", {"content": "back"}))
    assert (await proc.client.get("ns", "later")).version == put.version


async def test_a_write_on_another_host_is_never_hidden_longer_than_the_bound(
    tmp_path: Path, redis_url: str, redis_url_b: str, fresh_nats: NatsServer
) -> None:
    from hosts import InProcessApi
    from test_replication import Side, start_pair, stop_pair

    from mfh_core import SqlStore

    # Given main_pc (a real api with its near cache, worker, replicator) and pc2 (worker, replicator)
    sides = []
    for name, url in (("main_pc", redis_url), ("pc2", redis_url_b)):
        host = api_host(tmp_path, url, name=name, nats_url=fresh_nats.url)
        sql = SqlStore(host.settings.storage.database_url)
        sql.create_schema()
        sides.append(Side(host=host, api=InProcessApi(host), sql=sql))
    main_pc, pc2 = sides
    try:
        await start_pair(main_pc, pc2)
        proc = await start_api(main_pc.host)
        for i in range(5):
            # And a record main_pc's api serves from its near cache
            await proc.client.put(PutSpec("ns", "k", "memory_item", {"content": f"main {i}"}))
            await proc.cached("k")
            # When pc2 writes a newer version, and it is replicated into main_pc's Redis
            e = await pc2.api.put("k", f"pc2 {i}")

            async def replicated(v: int = e.version) -> bool:
                entry = await main_pc.api.hot.get("ns", "k")
                return entry is not None and entry.record.version >= v

            await async_wait_until(replicated, 10, interval=0.001, message=f"replication\n{main_pc.logs()}")
            # Then main_pc's api answers it within the bound of its arrival
            await assert_seen_within_bound(proc, "k", e.version, time.monotonic())
        await proc.client.close()
    finally:
        await stop_pair(main_pc, pc2)


async def test_the_cache_is_dropped_across_a_redis_restart(tmp_path: Path) -> None:
    # Given an api on a Redis of its own (append-only file: entries survive a restart), a record in its cache
    with RedisServer(tmp_path, conf=HUB_REDIS_CONF) as redis:
        host = api_host(tmp_path, redis.url)
        try:
            proc = await start_api(host)
            await proc.client.put(PutSpec("ns", "k", "memory_item", {"content": "before"}))
            old = await proc.cached("k")
            # When Redis crashes and comes back, and another process writes before the api's tracking is back
            redis.kill()
            await async_wait_until(lambda: asyncio.to_thread(proc.metric, "mfh_near_cache_flushes_total"), 10)
            redis.start()
            hot = build_hot_store(host.settings)
            try:
                version = await stage(hot, "k", "while tracking was down")
            finally:
                await hot.close()

            # Then the first answer the api gives is the new version, never the entry read before the crash
            async def answered() -> Record | None:
                try:
                    return await proc.client.get("ns", "k")
                except Exception:
                    return None

            rec = await async_wait_until(answered, 20, message=f"the api answering again\n{host.log('api')}")
            assert rec.version == version > old.version
            # And the cache comes back: tracking on again, and hits again
            await async_wait_until(proc.tracking, 10, message=f"tracking back\n{host.log('api')}")
            assert (await proc.cached("k")).version == version
            await proc.client.close()
        finally:
            host.stop_all()


# -- the cache itself: bounds and reads in flight ------------------------------------------------------


def _rec(key: str, payload_chars: int = 10) -> Record:
    payload = canonical_json({"content": "x" * payload_chars})
    return Record(namespace="ns", key=key, kind=Kind.MEMORY_ITEM, payload=payload, version=1, origin="main_pc")


def _cache(**kw: Any) -> NearCache:
    args: dict[str, Any] = dict(max_entries=3, max_bytes=1 << 20, max_absent=2, absent_ttl_s=60, max_stale_s=60)
    cache = NearCache(**(args | kw))
    cache.tracking_started()
    cache.confirmed(cache.clock())
    return cache


def _fill(cache: NearCache, key: str, record: Record | None) -> None:
    cache.finish(cache.begin(("ns", key)), record)


def test_entries_bytes_and_absences_stay_within_their_bounds() -> None:
    # Given a cache of 3 records and 2 absences, When more are stored
    cache = _cache()
    for i in range(5):
        _fill(cache, f"r{i}", _rec(f"r{i}"))
        _fill(cache, f"a{i}", None)
    # Then the least recently used went first
    assert cache.entries == 3 and cache.absences == 2 and cache.stats.evictions == 5
    assert cache.lookup(("ns", "r0")) is None and cache.lookup(("ns", "r4")) is not None
    # Given a byte bound of about two 10 kB payloads, Then a third evicts the oldest
    small = _cache(max_entries=100, max_bytes=2 * (3 * 10_030 + 500))
    for i in range(3):
        _fill(small, f"b{i}", _rec(f"b{i}", 10_000))
    assert small.entries == 2 and small.bytes <= small.max_bytes


def test_a_read_in_flight_when_its_key_changes_is_not_kept() -> None:
    cache = _cache()
    # Given a read of k in flight, When k changes before it returns, Then its (old) result is not stored
    ticket = cache.begin(("ns", "k"))
    cache.invalidate([("ns", "k")])
    assert cache.finish(ticket, _rec("k")) is None and cache.lookup(("ns", "k")) is None
    # And when tracking is lost meanwhile, nothing is kept and nothing is served until it is back
    ticket = cache.begin(("ns", "k"))
    cache.tracking_lost()
    cache.tracking_started()
    cache.confirmed(cache.clock())
    assert cache.finish(ticket, _rec("k")) is None and cache.in_flight == 0
    _fill(cache, "k", _rec("k"))
    cache.tracking_lost()
    assert cache.lookup(("ns", "k")) is None and cache.entries == 0 and cache.begin(("ns", "k")) is None


def test_hits_stop_when_the_feed_has_not_confirmed_freshness_within_the_bound() -> None:
    now = [100.0]
    cache = _cache(clock=lambda: now[0], max_stale_s=0.05)
    _fill(cache, "k", _rec("k"))
    assert cache.lookup(("ns", "k")) is not None
    # When no ping came back for longer than the bound, Then the cache is bypassed (the entry stays)
    now[0] += 0.06
    assert cache.lookup(("ns", "k")) is None and cache.stats.bypasses == 1
    # And a confirmation brings it back
    cache.confirmed(now[0])
    assert cache.lookup(("ns", "k")) is not None
