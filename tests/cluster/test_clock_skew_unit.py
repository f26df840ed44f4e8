"""The version clock's test-only skew (storage.clock_skew_ms): it moves new versions, nothing else.

Needs only Redis, not root: the cluster scenario (test_cluster_scenarios.py) uses the same setting.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from mfh_core import HotStore
from mfh_models import Kind, Op, Record, load_settings, unpack
from mfh_tasks import build_hot_store

SKEW_MS = 5000


@pytest.fixture
async def skewed(redis_url: str) -> AsyncIterator[HotStore]:
    h = HotStore(redis_url=redis_url, prefix="t", origin="pc3", cache_ttl_seconds=60, clock_skew_ms=SKEW_MS)
    yield h
    await h.close()


async def test_a_skewed_host_stamps_versions_ahead_but_keeps_real_time_elsewhere(skewed: HotStore) -> None:
    # Given a hot store whose clock is 5 s ahead; when it stages a write
    before = int(time.time() * 1000)
    e = await skewed.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload='{"content":"x"}')
    after = int(time.time() * 1000)
    # Then the version's wall time is 5 s ahead of Redis TIME...
    ms, _ = unpack(e.version)
    assert before + SKEW_MS - 50 <= ms <= after + SKEW_MS + 50
    # ...while created_at and the dirty set's score stay on the real clock (the sweep compares them with TIME).
    assert before - 50 <= e.created_at <= after + 50
    [(_, score)] = await skewed.redis.zrange(skewed.dirty_key, 0, -1, withscores=True)
    assert before - 50 <= score <= after + 50


async def test_an_unskewed_host_moves_past_a_skewed_hosts_version(skewed: HotStore, redis_url_b: str) -> None:
    # Given host B with a true clock that applies an event from the skewed host
    b = HotStore(redis_url=redis_url_b, prefix="t", origin="main_pc", cache_ttl_seconds=60)
    try:
        e = await skewed.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload='{"content":"c"}')
        assert await b.apply(e.to_record(), from_sql=False)
        # When B writes the same key right after
        mine = await b.stage(op=Op.PUT, namespace="ns", key="k", kind=Kind.MEMORY_ITEM, payload='{"content":"b"}')
        # Then B's write is newer (its clock moved past the remote version), so last-writer-wins picks it
        assert mine.version > e.version
        entry = await b.get("ns", "k")
        assert isinstance(entry.record if entry else None, Record) and entry is not None
        assert entry.record.origin == "main_pc"
    finally:
        await b.close()


async def test_the_setting_reaches_the_hot_store() -> None:
    base = load_settings("main_pc", env={})
    settings = base.model_copy(update={"storage": base.storage.model_copy(update={"clock_skew_ms": SKEW_MS})})
    hot = build_hot_store(settings)
    assert hot.clock_skew_ms == SKEW_MS
    await hot.close()
    assert load_settings("main_pc", env={}).storage.clock_skew_ms == 0
