"""Two api replicas, a client under load, one replica SIGKILLed: the client fails over and no call is lost."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosts import TestHost, make_host
from services import async_wait_until, free_port, tcp_open

from mfh_api.client_grpc import AsyncMemoryClient
from mfh_api.service import PutSpec
from mfh_core import SqlStore
from mfh_models import MFHError

pytestmark = pytest.mark.slow


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[list[TestHost]]:
    """Two api configs of one host (same Redis, SQLite file and queue), each on its own gRPC port."""
    shared = {
        "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
        "write_behind": {"queue_name": f"t_{uuid.uuid4().hex[:8]}"},
    }
    hosts = [
        make_host(
            tmp_path / name,
            redis_url=redis_url,
            database_url=f"sqlite:///{tmp_path}/shared.db",
            overrides={**shared, "server": {"grpc_port": free_port()}},
        )
        for name in ("a", "b")
    ]
    yield hosts
    for h in hosts:
        h.stop_all()


async def test_client_fails_over_when_a_replica_is_killed_under_load(replicas: list[TestHost]) -> None:
    # Given two api replicas serving the same host
    a, b = replicas
    procs = [h.spawn("mfh_api.app", log_name="api") for h in replicas]
    ports = [h.settings.server.grpc_port for h in replicas]
    for h, port in zip(replicas, ports, strict=True):
        await async_wait_until(lambda p=port: tcp_open("127.0.0.1", p), 30, message=f"api on {port}\n{h.log('api')}")
    client = AsyncMemoryClient([f"127.0.0.1:{p}" for p in ports], timeout=2.0, retries=6)
    acked: dict[str, int] = {}
    errors: list[MFHError] = []
    done = 0
    stop = asyncio.Event()

    async def agent(n: int) -> None:
        nonlocal done
        i = 0
        while not stop.is_set():
            key = f"agent{n}/{i}"
            try:
                r = await client.put(PutSpec("ns", key, "memory_item", {"content": key}))
                acked[key] = r.version
                assert (await client.get("ns", key)).version >= r.version
                done += 1
            except MFHError as e:
                errors.append(e)
            i += 1

    # When the client is under load and the replica it talks to is SIGKILLed
    tasks = [asyncio.create_task(agent(n)) for n in range(8)]
    try:
        await async_wait_until(lambda: done >= 200, 60, message="load before the kill")
        a.kill(procs[0])
        at_kill = done
        await async_wait_until(lambda: done >= at_kill + 400, 60, message=f"load after the kill\n{b.log('api')}")
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await client.close()

    # Then every call succeeded (retried on the survivor), or failed only with a retryable error
    assert client.failovers > 0
    assert all(e.retryable for e in errors), errors
    assert len(errors) <= 0.01 * done, f"{len(errors)} retryable failures in {done} calls: {errors[:3]}"
    # and every acknowledged write reaches SQL once a worker runs
    b.start_worker(threads=2)
    sql = SqlStore(b.settings.storage.database_url)
    try:
        await async_wait_until(
            lambda: len(sql.get_many("ns", list(acked))) == len(acked), 60, interval=0.2, message="acked writes in SQL"
        )
        rows = sql.get_many("ns", list(acked))
        assert all(rows[k].version >= v for k, v in acked.items())
    finally:
        sql.close()
    # and the survivor shuts down cleanly on SIGTERM
    procs[1].send_signal(signal.SIGTERM)
    assert procs[1].wait(timeout=30) == 0, b.log("api")
    assert "stopped in" in b.log("api")
