"""The shared service fixtures themselves work (Redis, Postgres, SQLite, private NATS servers)."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
import redis
import sqlalchemy as sa
from nats.js.errors import NotFoundError
from services import NatsServer, async_wait_until, free_port, tcp_open, wait_until

from mfh_core.sqlstore import engine_url


def test_redis_fixture_gives_empty_db(redis_url: str, redis_url_b: str) -> None:
    assert redis_url != redis_url_b
    a = redis.Redis.from_url(redis_url)
    b = redis.Redis.from_url(redis_url_b)
    try:
        assert a.ping()
        assert a.dbsize() == 0
        a.set("k", "a")
        assert b.get("k") is None
    finally:
        a.close()
        b.close()


def test_db_url_select_1(db_url: str) -> None:
    engine = sa.create_engine(engine_url(db_url))
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar_one() == 1
    finally:
        engine.dispose()


def test_postgres_url_is_a_fresh_database(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://")  # the URL users type, not a driver-specific one
    engine = sa.create_engine(engine_url(postgres_url))
    try:
        with engine.connect() as conn:
            name = conn.execute(sa.text("select current_database()")).scalar_one()
            tables = conn.execute(
                sa.text("select count(*) from information_schema.tables where table_schema = 'public'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert name.startswith("mfh_t_")
    assert tables == 0


def test_wait_until_returns_value_and_times_out() -> None:
    start = time.monotonic()
    assert wait_until(lambda: time.monotonic() - start > 0.02 and "done", timeout=2) == "done"
    with pytest.raises(AssertionError, match="the impossible"):
        wait_until(lambda: False, timeout=0.05, message="the impossible")


async def test_async_wait_until_accepts_sync_and_async_predicates() -> None:
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, flag.set)
    assert await async_wait_until(flag.is_set, timeout=2)

    async def probe() -> int:
        return 7

    assert await async_wait_until(probe, timeout=1) == 7
    with pytest.raises(AssertionError, match="never"):
        await async_wait_until(lambda: 0, timeout=0.05, message="never")


def test_free_port_is_free() -> None:
    assert not tcp_open("127.0.0.1", free_port())


async def test_module_nats_server_answers(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        msg = await sub.next_msg(timeout=2)
        assert msg.data == b"pong"
    finally:
        await nc.close()


async def test_nats_restart_keeps_jetstream_stream(fresh_nats: NatsServer) -> None:
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="svc_test", subjects=["svc.>"])
        ack = await js.publish("svc.one", b"hello", headers={"Nats-Msg-Id": "m-1"})
        assert ack.seq == 1
    finally:
        await nc.close()

    port = fresh_nats.port
    fresh_nats.stop()
    assert not fresh_nats.running
    wait_until(lambda: not tcp_open("127.0.0.1", port), timeout=5, message="the port to close")

    fresh_nats.start()
    assert fresh_nats.port == port
    nc = await nats.connect(fresh_nats.url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("svc_test")
        assert info.state.messages == 1
        msg = await js.get_msg("svc_test", seq=1)
        assert msg.data == b"hello"
        with pytest.raises(NotFoundError):
            await js.stream_info("no_such_stream")
    finally:
        await nc.close()


def test_nats_kill_then_start(fresh_nats: NatsServer) -> None:
    fresh_nats.kill()
    assert not fresh_nats.running
    fresh_nats.start()
    assert fresh_nats.running
    assert tcp_open("127.0.0.1", fresh_nats.port)
