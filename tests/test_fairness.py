"""Hostile or greedy peers (issue 7, findings 3, 6, 7, 8): every request answered once, streams apart
from unary capacity, one flooding ZeroMQ peer cannot starve another, memory bounded before auth."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
import zmq.asyncio
from hosts import TestHost, make_host
from services import async_wait_until

from mfh_api.grpc_server import GrpcServer
from mfh_api.proto import pb, pb_grpc
from mfh_api.service import MemoryService, build_service
from mfh_api.zmq_protocol import encode
from mfh_api.zmq_server import ZmqServer
from mfh_models import NotFound

FLOOD = str(Path(__file__).with_name("_flood.py"))
KEY = "fair-test-key"


def own_prefix() -> dict[str, Any]:
    return {"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:12]}"}}


@pytest.fixture
def host(tmp_path: Path, redis_url: str) -> Iterator[TestHost]:
    h = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    yield h
    for p in h.procs:
        h.kill(p)


@pytest.fixture
async def zmq_served(host: TestHost) -> AsyncIterator[tuple[MemoryService, ZmqServer]]:
    service = await build_service(host.settings)
    server = ZmqServer.from_settings(service, host.settings)
    await server.start()
    try:
        yield service, server
    finally:
        await server.close()
        await service.close()


class Peer:
    """A raw DEALER peer: exact bytes out, the JSON reply back (or None when there is none)."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send(self, body: bytes) -> None:
        await self.sock.send_multipart([b"", body])

    async def recv(self, wait_s: float = 5.0) -> dict[str, Any] | None:
        if not await self.sock.poll(int(wait_s * 1000)):
            return None
        reply = json.loads((await self.sock.recv_multipart())[-1])
        assert isinstance(reply, dict)
        return reply


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    c = zmq.asyncio.Context()
    yield c
    c.destroy(linger=0)


# -- finding 3: a request id no reply can carry ------------------------------------------------------

GET = b'"action": "get", "payload": {"namespace": "n", "key": "k"}'
SURROGATE_BODIES = {
    "v1 escaped": b'{"v": 1, "id": "\\ud800", ' + GET + b"}",
    "v1 raw bytes": b'{"v": 1, "id": "\xed\xa0\x80", ' + GET + b"}",
    "v0 escaped": b'{"action": "get", "key": "k", "request_id": "\\ud800"}',
    "v0 raw bytes": b'{"action": "get", "key": "k", "request_id": "a\xed\xa0\x80"}',
}


@pytest.mark.parametrize("body", SURROGATE_BODIES.values(), ids=SURROGATE_BODIES.keys())
async def test_a_request_id_holding_a_lone_surrogate_gets_one_error_reply(
    zmq_served: tuple[MemoryService, ZmqServer], ctx: zmq.asyncio.Context, body: bytes
) -> None:
    # Given a peer whose request id is a lone surrogate (no UTF-8 reply can echo it)
    peer = Peer(ctx, zmq_served[1].endpoint)
    # When it sends the request
    await peer.send(body)
    reply = await peer.recv()
    # Then it gets exactly one reply: INVALID_ARGUMENT, without the id
    assert reply is not None, "no reply"
    code = reply["error"]["code"] if "v" in reply else reply["error_code"]
    assert code == "INVALID_ARGUMENT", reply
    assert reply.get("id") is None and "request_id" not in reply
    assert await peer.recv(0.3) is None
    # And the server still answers a well-formed request
    await peer.send(b'{"v": 1, "id": "ok", ' + GET + b"}")
    after = await peer.recv()
    assert after is not None and after["id"] == "ok" and after["error"]["code"] == "NOT_FOUND"


@pytest.mark.parametrize(
    "reply",
    [
        {"v": 1, "id": "r", "status": "ok", "data": {"text": "\ud800"}},
        {"v": 1, "id": "\udfff", "status": "error", "error": {"code": "NOT_FOUND", "message": "x"}},
        {"v": 1, "id": 7, "status": "ok", "data": {"n": float("nan")}},
        {"status": "success", "request_id": "r0", "value": {"t": "\ud800"}},
    ],
)
def test_a_reply_that_cannot_be_encoded_becomes_an_internal_error_reply(reply: dict[str, Any]) -> None:
    # Given a reply holding something JSON/UTF-8 cannot carry; when it is encoded
    out = json.loads(encode(reply))
    # Then the wire form is a valid error reply in the same schema, with the id only if it is safe
    if "v" in reply:
        assert out["status"] == "error" and out["error"]["code"] == "INTERNAL"
        assert out["id"] == (reply["id"] if reply["id"] in ("r", 7) else None)
    else:
        assert out == {"status": "error", "error": out["error"], "error_code": "INTERNAL", "request_id": "r0"}


# -- finding 6: idle Watch streams and unary capacity ------------------------------------------------


@pytest.fixture
async def grpc_served(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[MemoryService, GrpcServer]]:
    h = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    service = await build_service(h.settings)
    server = GrpcServer(service, h.settings)
    await server.start()
    try:
        yield service, server
    finally:
        await server.stop(grace=0.5)
        await service.close()


async def _open_watches(target: str, channels: int, per_channel: int) -> tuple[list[grpc.aio.Channel], list[Any]]:
    # One connection each: channels of one process otherwise share a connection (a global subchannel pool).
    local = [("grpc.use_local_subchannel_pool", 1)]
    chans = [grpc.aio.insecure_channel(target, options=local) for _ in range(channels)]
    calls = [
        pb_grpc.MemoryFusionStub(ch).Watch(pb.WatchRequest(namespace="quiet"))
        for ch in chans
        for _ in range(per_channel)
    ]
    return chans, calls


async def test_idle_watch_streams_do_not_take_unary_capacity(grpc_served: tuple[MemoryService, GrpcServer]) -> None:
    # Given an api with its shipped limits (256 unary calls at once) and 300 idle Watch streams open
    service, server = grpc_served
    assert server.settings.server.max_concurrent_rpcs == 256
    target = f"127.0.0.1:{server.port}"
    chans, calls = await _open_watches(target, channels=3, per_channel=100)
    try:
        # (256 is where grpc's maximum_concurrent_rpcs, which counts streams, used to refuse everything)
        await async_wait_until(lambda: len(service.feed._watchers) >= 256, 30, message="256 open Watch streams")
        # When a unary call comes
        async with grpc.aio.insecure_channel(target) as ch:
            stub = pb_grpc.MemoryFusionStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.Get(pb.GetRequest(namespace="ns", key="absent"), timeout=5)
        # Then it is served (NOT_FOUND), not refused for lack of capacity
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        # And all 300 streams are open (a connection may hold 128, the api 1024)
        await async_wait_until(lambda: len(service.feed._watchers) == 300, 30, message="300 open Watch streams")
    finally:
        for c in calls:
            c.cancel()
        for ch in chans:
            await ch.close()


async def test_watch_streams_have_their_own_cap_per_connection(tmp_path: Path, redis_url: str) -> None:
    # Given an api that allows 3 open streams per connection and ends idle ones after 0.5 s
    server_cfg = {"max_streams_per_peer": 3, "watch_idle_seconds": 0.5}
    h = make_host(tmp_path, redis_url=redis_url, overrides={**own_prefix(), "server": server_cfg})
    service = await build_service(h.settings)
    server = GrpcServer(service, h.settings)
    await server.start()
    chans, calls = await _open_watches(f"127.0.0.1:{server.port}", channels=1, per_channel=4)
    try:
        # When one connection opens 4 streams
        codes = []
        for c in calls:
            try:
                async for _ in c:
                    pass
            except grpc.aio.AioRpcError as e:
                codes.append((e.code(), e.details()))
        # Then the 4th is refused with a clear RESOURCE_EXHAUSTED and the 3 others end idle (DEADLINE_EXCEEDED)
        exhausted = [d for c, d in codes if c == grpc.StatusCode.RESOURCE_EXHAUSTED]
        idle = [d for c, d in codes if c == grpc.StatusCode.DEADLINE_EXCEEDED]
        assert len(exhausted) == 1 and "from this connection" in exhausted[0], codes
        assert len(idle) == 3 and all("idle" in d for d in idle), codes
        assert server.streams.total == 0
    finally:
        for ch in chans:
            await ch.close()
        await server.stop(grace=0.5)
        await service.close()


# -- finding 7: one flooding ZeroMQ peer ------------------------------------------------------------


async def _run_flood(endpoint: str, count: int, size: int, *extra: str) -> tuple[asyncio.subprocess.Process, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, FLOOD, endpoint, str(count), str(size), *extra, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 90)
    return proc, json.loads(line)


async def test_a_flooding_peer_does_not_hold_back_a_well_behaved_one(
    zmq_served: tuple[MemoryService, ZmqServer],
) -> None:
    # Given one peer sending 50,000 requests without reading (in its own process, beside a good peer)
    # When the good peer sends one request once the flood is under way
    proc, out = await _run_flood(zmq_served[1].endpoint, 50_000, 200, "--good")
    try:
        # Then the good request is answered while the flood is still being sent, within a generous second
        assert out["good_answered"] is not None, "the well-behaved peer got no reply"
        assert out["good_answered"] < out["flood_done"], out
        assert out["good_answered"] - out["good_sent"] < 1.0, out
    finally:
        proc.kill()
        await proc.wait()


async def test_one_peer_holds_at_most_its_share_and_the_excess_is_shed_unparsed(
    zmq_served: tuple[MemoryService, ZmqServer], ctx: zmq.asyncio.Context
) -> None:
    # Given a service stuck on reads, and a peer with max_in_flight_per_peer (16) requests running
    service, server = zmq_served
    gate = asyncio.Event()

    async def stuck_get(namespace: str, key: str, *_: Any, **__: Any) -> Any:
        await gate.wait()
        raise NotFound("x")

    service.get_answer = stuck_get  # type: ignore[method-assign] # what a v1 get calls
    greedy, polite = Peer(ctx, server.endpoint), Peer(ctx, server.endpoint)
    share = 16  # server.max_in_flight_per_peer, shipped
    for i in range(share):
        await greedy.send(b'{"v": 1, "id": "g%d", ' % i + GET + b"}")
    await async_wait_until(lambda: server._slots.total >= share, 10, message="the greedy peer's share held")
    assert len(server._tasks) == server.max_running_per_peer  # 4 run, the others wait their turn
    # When it sends one more (not even JSON), and another peer sends a request
    await greedy.send(b'{"v": 1, "id": "extra", not json at all')
    shed = await greedy.recv()
    await polite.send(b'{"v": 1, "id": "p", ' + GET + b"}")
    await async_wait_until(
        lambda: len(server._tasks) >= server.max_running_per_peer + 1, 10, message="the polite request running"
    )
    # Then the extra one is shed at once without being parsed (RESOURCE_EXHAUSTED, not INVALID_ARGUMENT),
    # with its id, while the other peer's request runs
    assert shed is not None and shed["id"] == "extra" and shed["error"]["code"] == "RESOURCE_EXHAUSTED", shed
    assert "from this connection" in shed["error"]["message"]
    gate.set()
    reply = await polite.recv()
    assert reply is not None and reply["id"] == "p" and reply["error"]["code"] == "NOT_FOUND"


async def test_a_peer_runs_a_few_requests_at_a_time_and_the_rest_wait_in_order(
    zmq_served: tuple[MemoryService, ZmqServer], ctx: zmq.asyncio.Context
) -> None:
    # Given a service whose reads wait for a gate, and a peer sending 10 requests at once
    service, server = zmq_served
    gate = asyncio.Event()
    started: list[str] = []

    async def gated_get(namespace: str, key: str, *_: Any, **__: Any) -> Any:
        started.append(key)
        await gate.wait()
        raise NotFound("x")

    service.get_answer = gated_get  # type: ignore[method-assign] # what a v1 get calls
    peer = Peer(ctx, server.endpoint)
    for i in range(10):
        await peer.send(b'{"v": 1, "id": "r%d", "action": "get", "payload": {"namespace": "n", "key": "k%d"}}' % (i, i))
    # When all 10 are held
    await async_wait_until(lambda: server._slots.total == 10, 10, message="10 held")
    # Then only max_running_per_peer (4) run; none is refused
    assert started == ["k0", "k1", "k2", "k3"]
    # And once the gate opens, the others run in the order they came and each gets its reply
    gate.set()
    replies = [await peer.recv() for _ in range(10)]
    assert all(r is not None and r["error"]["code"] == "NOT_FOUND" for r in replies), replies
    assert started == [f"k{i}" for i in range(10)]
    assert server._slots.total == 0 and not server._waiting and not server._running


async def test_a_request_that_waited_its_turn_past_its_deadline_is_answered_without_running(
    zmq_served: tuple[MemoryService, ZmqServer], ctx: zmq.asyncio.Context
) -> None:
    # Given a peer with max_running_per_peer (4) reads stuck, and a fifth request with a 5 ms deadline waiting
    service, server = zmq_served
    gate = asyncio.Event()
    started: list[str] = []

    async def gated_get(namespace: str, key: str, *_: Any, **__: Any) -> Any:
        started.append(key)
        await gate.wait()
        raise NotFound("x")

    service.get_answer = gated_get  # type: ignore[method-assign] # what a v1 get calls
    peer = Peer(ctx, server.endpoint)
    for i in range(4):
        await peer.send(b'{"v": 1, "id": "r%d", "action": "get", "payload": {"namespace": "n", "key": "k%d"}}' % (i, i))
    late = b'{"v": 1, "id": "late", "timeout_ms": 5, "action": "get", "payload": {"namespace": "n", "key": "late"}}'
    await peer.send(late)
    await async_wait_until(lambda: server._slots.total == 5, 10, message="5 held")
    sent = asyncio.get_running_loop().time()
    await async_wait_until(lambda: asyncio.get_running_loop().time() > sent + 0.05, 5, message="its deadline passed")
    # When its turn comes
    gate.set()
    replies = {r["id"]: r for r in [await peer.recv() for _ in range(5)] if r is not None}
    # Then it is answered DEADLINE_EXCEEDED and never ran; the four others ran
    assert replies["late"]["error"]["code"] == "DEADLINE_EXCEEDED", replies["late"]
    assert "nothing was done" in replies["late"]["error"]["message"]
    assert sorted(started) == ["k0", "k1", "k2", "k3"]


async def _grpc_latencies_ms(stub: Any, rate: float, seconds: float) -> list[float]:
    """Gets sent open-loop at ``rate`` (latency from each one's scheduled time, so a stall shows), sorted."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.02

    async def one(i: int) -> float:
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.Get(pb.GetRequest(namespace="quiet", key=f"k{i}"), timeout=30)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
        return (loop.time() - (t0 + i / rate)) * 1000

    return sorted(await asyncio.gather(*(one(i) for i in range(int(rate * seconds)))))


async def test_a_zeromq_flood_does_not_starve_grpc_callers_of_the_same_api(tmp_path: Path, redis_url: str) -> None:
    # Given a real api process (shipped limits) and a gRPC caller at 250 Gets/s, measured alone
    h = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    api = h.spawn("mfh_api.app", log_name="api")
    proc: asyncio.subprocess.Process | None = None
    try:
        ready = await async_wait_until(
            lambda: re.search(r'"grpc_port": (\d+), "zmq_port": (\d+)', h.log("api")), 60, 0.1, "api ready"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{ready.group(1)}") as ch:
            stub = pb_grpc.MemoryFusionStub(ch)
            await _grpc_latencies_ms(stub, 250, 0.5)  # warm-up
            alone = await _grpc_latencies_ms(stub, 250, 2.0)
            # When one ZeroMQ peer floods the same api with well-formed Gets, never reading a reply
            proc = await asyncio.create_subprocess_exec(
                sys.executable, FLOOD, f"tcp://127.0.0.1:{ready.group(2)}", "1000000", "100", "--ready",
                stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert proc.stdout is not None
            assert json.loads(await asyncio.wait_for(proc.stdout.readline(), 60)) == {"flooding": True}
            flooded = await _grpc_latencies_ms(stub, 250, 2.0)
            still_flooding = proc.returncode is None and not await _has_line(proc.stdout)
        # Then the gRPC caller keeps about its latency: p99 under the flood within 10x of alone (or 1 s, for
        # a box too loaded to show a fast p99: other test files run beside this one). With 16 flood
        # requests running at once, grpc's accept rate fell under the callers' rate and calls queued for
        # seconds (4.8 s flooded against 0.3 s alone, measured before the fix).
        p99_alone, p99_flooded = alone[int(len(alone) * 0.99) - 1], flooded[int(len(flooded) * 0.99) - 1]
        assert still_flooding, "the flood ended before the measurement did: nothing was measured"
        assert p99_flooded < max(10 * p99_alone, 1000.0), (
            f"gRPC p99 {p99_alone:.1f} ms alone, {p99_flooded:.1f} flooded"
        )
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        h.kill(api)


async def _has_line(stream: asyncio.StreamReader) -> bool:
    """Whether a line is waiting already (the flooder prints its last line when it has sent everything)."""
    try:
        return bool(await asyncio.wait_for(stream.readline(), 0.01))
    except TimeoutError:
        return False


# -- finding 8: memory before authentication ---------------------------------------------------------

RSS_CEILING_MB = 300  # docs/operations.md: the documented ceiling with shipped settings


def _rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert m is not None
    return int(m.group(1)) / 1024


async def test_a_flood_of_large_unauthenticated_messages_keeps_the_api_under_its_rss_ceiling(
    tmp_path: Path, redis_url: str
) -> None:
    # Given a real api process with a key and its shipped limits
    h = make_host(tmp_path, redis_url=redis_url, overrides={**own_prefix(), "server": {"api_key": KEY}})
    api = h.spawn("mfh_api.app", log_name="api")
    try:
        ready = await async_wait_until(
            lambda: re.search(r'"zmq_port": (\d+)', h.log("api")), 60, interval=0.1, message="api ready"
        )
        endpoint = f"tcp://127.0.0.1:{ready.group(1)}"
        base = _rss_mb(api.pid)
        # When one peer sends 1,600 messages of 300 KB without a key, never reading
        proc = await asyncio.create_subprocess_exec(
            sys.executable, FLOOD, endpoint, "1600", str(300 * 1024), stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        peak = base
        line = asyncio.ensure_future(proc.stdout.readline())
        try:
            while not line.done():
                peak = max(peak, _rss_mb(api.pid))
                await asyncio.wait({line}, timeout=0.02)
            for _ in range(25):  # and a moment after the last one
                peak = max(peak, _rss_mb(api.pid))
                await asyncio.sleep(0.02)
        finally:
            proc.kill()
            await proc.wait()
        # Then the api's RSS never passed the documented ceiling, and it still answers
        assert peak < RSS_CEILING_MB, f"api RSS peaked at {peak:.0f} MB (started at {base:.0f} MB)"
        c = zmq.asyncio.Context()
        try:
            peer = Peer(c, endpoint)
            await peer.send(b'{"v": 1, "id": "ok", "api_key": "%s", ' % KEY.encode() + GET + b"}")
            reply = await peer.recv(10)
            assert reply is not None and reply["error"]["code"] == "NOT_FOUND", reply
        finally:
            c.destroy(linger=0)
    finally:
        h.kill(api)
