"""Store outages with real services: back within seconds of the store answering, and quiet logs meanwhile.

- Redis cut for 5 s under a write load: writes succeed again within 2 s of Redis answering, the
  breaker probed without a storm and logged one line per state change (issue 10, finding 3).
- A worker with Postgres cut, then NATS stopped, while batches keep coming: a bounded number of
  log lines, and every write lands in SQL afterwards (finding 6).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hosts import InProcessApi, TestHost, make_host
from proxy import TcpProxy
from services import NatsServer, async_wait_until

from mfh_api.service import PutSpec, build_service
from mfh_core import SqlStore
from mfh_models import MFHError

pytestmark = pytest.mark.slow


def _proxied(url: str, proxy: TcpProxy) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    creds = netloc[0] + "@" if len(netloc) == 2 else ""
    return parts._replace(netloc=f"{creds}127.0.0.1:{proxy.port}").geturl()


def _proxy_for(url: str) -> TcpProxy:
    parts = urlsplit(url)
    return TcpProxy(parts.hostname or "127.0.0.1", parts.port or 0).start()


async def test_writes_are_back_within_two_seconds_of_redis_answering_after_a_5s_outage(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given an api side whose Redis (hot store, queue, change feed) is reached through a proxy
    proxy = _proxy_for(redis_url)
    host = make_host(
        tmp_path,
        redis_url=_proxied(redis_url, proxy),
        overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}},
    )
    caplog.set_level(logging.INFO, "mfh")
    svc = await build_service(host.settings)
    results: list[tuple[float, bool]] = []
    stop = asyncio.Event()

    async def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                await svc.put(PutSpec("ns", f"w{n}/{i}", "memory_item", {"content": "x"}))
                results.append((time.monotonic(), True))
            except MFHError:
                results.append((time.monotonic(), False))
            i += 1
            await asyncio.sleep(0.005)

    tasks = [asyncio.create_task(writer(n)) for n in range(4)]
    try:
        await async_wait_until(lambda: sum(ok for _, ok in results) >= 50, 10, message="writes before the cut")
        # When Redis is unreachable for 5 s (the outage itself is the scenario: a fixed length)
        proxy.cut()
        cut_at = time.monotonic()
        await async_wait_until(lambda: any(not ok and t > cut_at for t, ok in results), 5, message="refusals")
        await asyncio.sleep(5.0 - (time.monotonic() - cut_at))
        probes_during_outage = svc.redis_breaker.probes
        proxy.start()
        back_at = time.monotonic()
        # Then writes succeed again within 2 s of Redis answering
        await async_wait_until(
            lambda: any(ok and t > back_at for t, ok in results), 10, interval=0.01, message="a write after the outage"
        )
        first_ok = min(t for t, ok in results if ok and t > back_at) - back_at
        assert first_ok <= 2.0, f"writes back {first_ok:.2f}s after Redis answered"
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await svc.close()
        proxy.cut()
    # and meanwhile the breaker probed with backoff, not on every one of thousands of calls
    refused = sum(1 for t, ok in results if not ok and t > cut_at)
    assert refused > 100
    assert probes_during_outage <= 15, f"{probes_during_outage} probes in a 5 s outage"
    # and logged one line per state change (opened, closed), not one per refused call
    lines = [r.getMessage() for r in caplog.records if "redis (circuit open)" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "unavailable" in lines[0] and "is back" in lines[1]


# -- the worker ------------------------------------------------------------------------------------


def _lines_since(host: TestHost, offset: int) -> list[str]:
    text = (host.config_dir / "worker.log").read_text(errors="replace")
    return [line for line in text[offset:].splitlines() if line.strip()]


def _log_size(host: TestHost) -> int:
    path = host.config_dir / "worker.log"
    return len(path.read_text(errors="replace")) if path.exists() else 0


async def _write_for(api: InProcessApi, seconds: float, tag: str) -> list[str]:
    """Small batches, as a trickle of writes makes them: one write every 10 ms."""
    keys = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    i = 0
    while loop.time() < end:
        key = f"{tag}/{i}"
        await api.put(key, key)
        keys.append(key)
        i += 1
        await asyncio.sleep(0.01)
    return keys


async def test_worker_logs_stay_bounded_while_sql_then_nats_is_down_and_every_write_lands(
    tmp_path: Path, redis_url: str, postgres_url: str, fresh_nats: NatsServer
) -> None:
    # Given a worker whose Postgres is reached through a proxy, publishing to a private NATS
    proxy = _proxy_for(postgres_url)
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        database_url=_proxied(postgres_url, proxy),
        nats_url=fresh_nats.url,
        overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}},
    )
    direct = SqlStore(postgres_url)
    direct.create_schema()
    api = InProcessApi(host)
    try:
        host.start_worker(threads=4)
        warm = await _write_for(api, 0.5, "warm")
        await async_wait_until(
            lambda: len(direct.get_many("ns", warm)) == len(warm), 60, message=f"worker up\n{host.log()}"
        )

        # When Postgres is cut for 6 s while small batches keep coming
        mark = _log_size(host)
        proxy.cut()
        during_sql = await _write_for(api, 6.0, "sql")
        proxy.start()
        # Then every write lands once it is back
        await async_wait_until(
            lambda: len(direct.get_many("ns", during_sql)) == len(during_sql),
            60,
            interval=0.2,
            message=f"writes after the SQL outage\n{host.log()}",
        )
        sql_lines = _lines_since(host, mark)
        # and the worker logged a bounded number of lines, with no traceback per batch
        assert len(sql_lines) < 20, "\n".join(sql_lines[:40])
        assert not any("Traceback" in line for line in sql_lines), "\n".join(sql_lines[:40])
        assert any("sql (circuit open) unavailable" in line for line in sql_lines), "\n".join(sql_lines)

        # When NATS is down for a few seconds while batches keep coming
        mark = _log_size(host)
        fresh_nats.stop()
        during_nats = await _write_for(api, 4.0, "nats")
        fresh_nats.start()
        await async_wait_until(
            lambda: len(direct.get_many("ns", during_nats)) == len(during_nats),
            60,
            interval=0.2,
            message=f"writes during the NATS outage\n{host.log()}",
        )
        more = await _write_for(api, 1.0, "after")
        await async_wait_until(lambda: len(direct.get_many("ns", more)) == len(more), 60, message="after NATS")
        nats_lines = _lines_since(host, mark)
        # Then the warnings are bounded (one per state change, not one per batch)
        warnings = [line for line in nats_lines if "WARNING" in line or "warning" in line]
        assert len(during_nats) > 100
        assert len(nats_lines) < 20, "\n".join(nats_lines[:40])
        assert len(warnings) <= 5, "\n".join(warnings)
    finally:
        await api.close()
        host.stop_all()
        direct.close()
        proxy.cut()
