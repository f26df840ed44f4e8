"""Degraded modes of the write path (docs/architecture.md): SQL down, then back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hosts import InProcessApi, TestHost, make_host
from proxy import TcpProxy
from services import async_wait_until
from sqlalchemy.engine import make_url

from mfh_core import SqlStore


@pytest.fixture
async def pg_host(tmp_path: Path, redis_url: str, postgres_url: str) -> AsyncIterator[tuple[TestHost, TcpProxy]]:
    url = make_url(postgres_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    via_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    # The store's schema is created directly, so the worker only needs the proxy for batches.
    SqlStore(postgres_url).create_schema()
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        database_url=via_proxy,
        overrides={"write_behind": {"min_backoff_ms": 100, "max_backoff_ms": 500, "max_retries": 100}},
    )
    yield host, proxy
    host.stop_all()
    proxy.cut()


async def test_writes_are_accepted_while_sql_is_down_and_land_when_it_returns(
    pg_host: tuple[TestHost, TcpProxy], postgres_url: str
) -> None:
    host, proxy = pg_host
    sender = InProcessApi(host)
    sql = SqlStore(postgres_url)
    try:
        # Given a worker persisting into Postgres
        host.start_worker(threads=2)
        await sender.put("before", "x")
        await async_wait_until(lambda: sql.get("ns", "before") is not None, 30, message=f"first row\n{host.log()}")
        # When Postgres becomes unreachable
        proxy.cut()
        # Then writes are still acknowledged (staged in Redis, batches enqueued)...
        writes = [await sender.put(f"k{i}", f"v{i}") for i in range(200)]
        assert await sender.hot.dirty_count() == 200
        # ...and none has reached SQL
        assert sql.get_many("ns", [w.key for w in writes]) == {}
        # When Postgres is reachable again, every write lands (retries with backoff) and the entries turn clean
        proxy.start()
        await async_wait_until(
            lambda: len(sql.get_many("ns", [w.key for w in writes])) == 200,
            60,
            interval=0.1,
            message=f"200 rows after SQL returned\n{host.log()}",
        )
        await async_wait_until(lambda: _dirty_zero(sender), 30, message="dirty set to drain")
    finally:
        await sender.close()
        sql.close()


async def _dirty_zero(sender: InProcessApi) -> bool:
    return await sender.hot.dirty_count() == 0
