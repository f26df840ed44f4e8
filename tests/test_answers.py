"""Every answer says what happened (issue 10, finding 7), with real Redis, real servers and processes.

- A write whose batch cannot be enqueued (the broker's Redis connection cut) is answered
  UNAVAILABLE and nothing of it stays staged: not readable, not persisted later; an overwrite
  leaves the previous (unpersisted) version in place.
- An api replica sent SIGTERM under load answers no call CANCELLED: clients fail over to the
  other replica with zero failed calls.
- Clients retry a server's UNAVAILABLE (nothing was done) even for a conditional write.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import redis
from hosts import TestHost, make_host
from proxy import TcpProxy
from services import async_wait_until, free_port, tcp_open

from mfh_api.client_grpc import AsyncMemoryClient, MemoryClient
from mfh_api.client_zmq import AsyncZmqClient
from mfh_api.errors import exception_for
from mfh_api.grpc_server import GrpcServer
from mfh_api.service import MemoryService, PutSpec, build_service, compose_service
from mfh_api.zmq_server import ZmqServer
from mfh_client.retry import CallKind, retryable
from mfh_core import HotStore, SqlStore
from mfh_models import MFHError, NotFound, Unavailable
from mfh_tasks import BatchQueue, build_hot_store


def _item(key: str, text: str, expected: int | None = None) -> PutSpec:
    return PutSpec("ns", key, "memory_item", {"content": text}, expected_version=expected)


def _host(tmp_path: Path, redis_url: str, name: str = "main_pc", **overrides: object) -> TestHost:
    return make_host(
        tmp_path / name,
        redis_url=redis_url,
        overrides={"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"}, **overrides},
    )


# -- a failed enqueue -------------------------------------------------------------------------------


@dataclass
class BrokerBehindProxy:
    """An api side whose hot store talks to Redis directly and whose broker reaches the same Redis
    through a proxy (the broker boundary: a real Dramatiq enqueue over a real socket)."""

    proxy: TcpProxy
    host: TestHost
    broker: Any  # the HubBroker: its client is untyped
    hot: HotStore
    svc: MemoryService


@pytest.fixture
async def broker_behind_proxy(tmp_path: Path, redis_url: str) -> AsyncIterator[BrokerBehindProxy]:
    parts = urlsplit(redis_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379).start()
    host = _host(tmp_path, redis_url)
    queue_settings = host.settings.model_copy(
        update={
            "storage": host.settings.storage.model_copy(
                update={"redis_url": parts._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()}
            )
        }
    )
    queue = BatchQueue.from_settings(queue_settings)
    broker = queue.broker
    assert broker is not None
    hot = build_hot_store(host.settings)
    sql = SqlStore(host.settings.storage.database_url)
    sql.create_schema()
    svc = compose_service(host.settings, hot=hot, sql=sql, queue=queue)
    try:
        yield BrokerBehindProxy(proxy, host, broker, hot, svc)
    finally:
        proxy.swallow_answers(False)
        await svc.close()
        sql.close()
        proxy.cut()


async def test_a_write_whose_batch_cannot_be_enqueued_is_unavailable_and_leaves_nothing_staged(
    broker_behind_proxy: BrokerBehindProxy,
) -> None:
    # Given an api side whose hot store talks to Redis directly, and whose broker reaches the
    # same Redis through a proxy (the broker boundary: a real Dramatiq enqueue over a real socket)
    b = broker_behind_proxy
    proxy, host, broker, hot, svc = b.proxy, b.host, b.broker, b.hot, b.svc
    first = await svc.put(_item("kept", "v1"))  # enqueued; no worker runs, so it stays dirty
    queued = broker.client.llen(f"dramatiq:{host.settings.write_behind.queue_name}")  # type: ignore[attr-defined]
    # When the broker's connection to Redis is cut and two writes arrive: a new key and an overwrite
    proxy.cut()
    with pytest.raises(Unavailable, match="nothing was staged"):
        await svc.put(_item("new", "lost"))
    with pytest.raises(Unavailable, match="nothing was staged"):
        await svc.put(_item("kept", "v2"))
    # Then neither is readable: the new key does not exist, the overwritten one reads its previous version
    with pytest.raises(NotFound):
        await svc.get("ns", "new")
    got = await svc.get("ns", "kept")
    assert got.version == first.version and '"v1"' in got.payload
    # and nothing new is staged: only the first write is dirty, and it is still dirty (its batch is queued)
    entry = await hot.get("ns", "kept")
    assert entry is not None and entry.dirty
    assert await hot.dirty_count() == 1
    # and once the queue answers again, new writes are accepted and nothing of the refused ones is queued
    proxy.start()
    await async_wait_until(lambda: tcp_open("127.0.0.1", proxy.port), 5)
    third = await svc.put(_item("kept", "v3"))
    assert third.version > first.version
    assert broker.client.llen(f"dramatiq:{host.settings.write_behind.queue_name}") == queued + 1  # type: ignore[attr-defined]


async def test_a_write_whose_enqueue_lost_its_connection_after_sending_is_acknowledged_and_stays_staged(
    broker_behind_proxy: BrokerBehindProxy, redis_url: str
) -> None:
    # Given the same api side, its broker behind a proxy
    b = broker_behind_proxy
    proxy, host, hot, svc = b.proxy, b.host, b.hot, b.svc
    direct = redis.Redis.from_url(redis_url)
    name = f"dramatiq:{host.settings.write_behind.queue_name}"
    try:
        await svc.put(_item("first", "v1"))  # the broker's scripts are loaded, its connection open
        queued = direct.llen(name)
        # When the broker's next enqueue reaches Redis but its answer never comes back (the connection
        # drops with the command sent: Redis ran it)
        proxy.swallow_answers()
        result = await svc.put(_item("second", "v1"))
        # Then the write is acknowledged, not answered "nothing was staged": its message is in the queue,
        # and the entry stays staged and dirty (a worker or the sweep persists it)
        assert result.version > 0
        assert direct.llen(name) > queued
        entry = await hot.get("ns", "second")
        assert entry is not None and entry.dirty and entry.record.version == result.version
    finally:
        direct.close()


# -- SIGTERM under load -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_under_load_answers_nothing_cancelled_and_clients_fail_over_with_zero_failures(
    tmp_path: Path, redis_url: str
) -> None:
    # Given two api replicas of one host and a client that knows both
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
    procs = [h.spawn("mfh_api.app", log_name="api") for h in hosts]
    ports = [h.settings.server.grpc_port for h in hosts]
    try:
        for h, port in zip(hosts, ports, strict=True):
            await async_wait_until(lambda p=port: tcp_open("127.0.0.1", p), 30, message=f"api {port}\n{h.log('api')}")
        client = AsyncMemoryClient([f"127.0.0.1:{p}" for p in ports], timeout=3.0, retries=4)
        errors: list[BaseException] = []
        done = 0
        stop = asyncio.Event()

        async def agent(n: int) -> None:
            nonlocal done
            i = 0
            while not stop.is_set():
                key = f"agent{n}/{i}"
                try:
                    r = await client.put(_item(key, key))
                    assert (await client.get("ns", key)).version >= r.version
                    done += 1
                except MFHError as e:
                    errors.append(e)
                i += 1

        tasks = [asyncio.create_task(agent(n)) for n in range(16)]
        try:
            await async_wait_until(lambda: done >= 200, 60, message="load before SIGTERM")
            # When the first replica gets SIGTERM in the middle of it
            procs[0].send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(procs[0].wait, 30) == 0, hosts[0].log("api")
            at_exit = done
            await async_wait_until(lambda: done >= at_exit + 200, 60, message=f"load after\n{hosts[1].log('api')}")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await client.close()
        # Then no call failed (none was answered CANCELLED: the client would have failed it), and it failed over
        assert errors == [], errors[:5]
        assert client.failovers > 0
        assert "stopped in" in hosts[0].log("api")
    finally:
        for h in hosts:
            h.stop_all()


# -- clients retry a server's UNAVAILABLE ---------------------------------------------------------


@pytest.fixture
async def draining_and_live(
    tmp_path: Path, redis_url: str
) -> AsyncIterator[tuple[GrpcServer, GrpcServer, ZmqServer, ZmqServer]]:
    """Two servers of one service: the first is shutting down (answers UNAVAILABLE), the second serves."""
    host = _host(tmp_path, redis_url, server={"grpc_port": 0, "zmq_port": 0})
    svc = await build_service(host.settings)
    g1, g2 = GrpcServer(svc, host.settings), GrpcServer(svc, host.settings)
    z1, z2 = ZmqServer(svc, port=0), ZmqServer(svc, port=0)
    for s in (g1, g2, z1, z2):
        await s.start()
    assert g1.servicer is not None
    await g1.servicer.drain(0)
    z1._draining = True
    yield g1, g2, z1, z2
    for g in (g1, g2):
        await g.stop(0)
    for z in (z1, z2):
        await z.close(0)
    await svc.close()


async def test_clients_retry_a_servers_unavailable_even_for_conditional_writes(
    draining_and_live: tuple[GrpcServer, GrpcServer, ZmqServer, ZmqServer],
) -> None:
    g1, g2, z1, z2 = draining_and_live
    endpoints = [f"127.0.0.1:{g1.port}", f"127.0.0.1:{g2.port}"]
    # Given clients whose first endpoint is shutting down
    async with AsyncMemoryClient(endpoints, timeout=2.0) as c:
        # When they make a create-only write (expected_version 0) and a delete
        r = await c.put(_item("cond", "x", expected=0))
        # Then the server's UNAVAILABLE (nothing was done) is retried on the other endpoint
        assert c.failovers >= 1
        await c.delete("ns", "cond", expected_version=r.version)
    sync = MemoryClient(endpoints, timeout=2.0)
    try:
        r = await asyncio.to_thread(sync.put, _item("cond-sync", "x", expected=0))
        assert sync.failovers >= 1 and r.version > 0
    finally:
        sync.close()
    async with AsyncZmqClient([z1.endpoint, z2.endpoint], timeout=2.0) as z:
        r = await z.put(_item("cond-zmq", "x", expected=0))
        assert z.failovers >= 1 and r.version > 0


def test_one_retry_policy_for_every_code() -> None:
    read, write, cond = CallKind.READ, CallKind.WRITE, CallKind.CONDITIONAL
    # UNAVAILABLE and CANCELLED from the transport: reads and unconditional writes only
    for code in ("UNAVAILABLE", "CANCELLED"):
        assert retryable(read, code) and retryable(write, code) and not retryable(cond, code, "Socket closed")
    # ... a conditional write too when the server said it (nothing was done) or the call never left
    assert retryable(cond, "UNAVAILABLE", answered_by_server=True)
    assert retryable(cond, "UNAVAILABLE", "failed to connect to all addresses")
    # RESOURCE_EXHAUSTED: refused before running, so always, unless the message can never fit
    assert all(retryable(k, "RESOURCE_EXHAUSTED") for k in CallKind)
    assert not retryable(write, "RESOURCE_EXHAUSTED", "Received message larger than max")
    # DEADLINE_EXCEEDED: reads only
    assert retryable(read, "DEADLINE_EXCEEDED") and not retryable(write, "DEADLINE_EXCEEDED")
    # never: the answer would be the same
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "UNAUTHENTICATED", "INTERNAL"):
        assert not any(retryable(k, code, answered_by_server=True) for k in CallKind)
    # and a CANCELLED that reaches the caller is an Unavailable (retryable), not a plain MFHError
    err = exception_for(grpc.StatusCode.CANCELLED, "Cancelled")
    assert isinstance(err, Unavailable) and err.retryable
