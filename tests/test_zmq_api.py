"""ZeroMQ v1 API end to end: a real ROUTER socket and service (Redis, SQLite), a real worker where SQL matters."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from hosts import TestHost, make_host
from services import async_wait_until

from mfh_api.client_zmq import AsyncZmqClient, ZmqClient
from mfh_api.service import Durability, MemoryService, PutSpec, build_service
from mfh_api.zmq_server import ZmqServer
from mfh_core.metrics import API_REQUESTS, LEGACY_V0_CALLS
from mfh_models import NotFound, VersionConflict

API_KEY = "s3cret-key"
NOTE = {"content": "the user prefers tea"}


def own_prefix() -> dict[str, Any]:
    """A Redis key prefix of this test's own: suites running side by side share Redis db 9."""
    return {"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:12]}"}}


class Raw:
    """A raw peer (REQ or DEALER) for sending exact bytes and reading the JSON reply."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, kind: int = zmq.DEALER) -> None:
        self.kind = kind
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send_bytes(self, body: bytes) -> None:
        await self.sock.send_multipart([body] if self.kind == zmq.REQ else [b"", body])

    async def recv(self, wait_s: float = 10.0) -> dict[str, Any]:
        assert await self.sock.poll(int(wait_s * 1000)), "no reply"
        frames = await self.sock.recv_multipart()
        reply = json.loads(frames[-1])
        assert isinstance(reply, dict)
        return reply

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send_bytes(json.dumps(obj).encode())
        return await self.recv()

    async def v1(self, action: str, payload: dict[str, Any], **extra: Any) -> dict[str, Any]:
        return await self.ask({"v": 1, "id": "r1", "action": action, "payload": payload, **extra})


@pytest.fixture
def host(tmp_path: Path, redis_url: str) -> Iterator[TestHost]:
    h = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    yield h
    for p in h.procs:  # nothing is left to persist: a quick SIGKILL instead of a graceful stop
        h.kill(p)


async def _serve(h: TestHost) -> AsyncIterator[tuple[MemoryService, ZmqServer]]:
    service = await build_service(h.settings)
    server = ZmqServer.from_settings(service, h.settings)
    await server.start()
    try:
        yield service, server
    finally:
        await server.close()
        await service.close()


@pytest.fixture
async def served(host: TestHost) -> AsyncIterator[tuple[MemoryService, ZmqServer]]:
    async for pair in _serve(host):
        yield pair


@pytest.fixture
async def raw(served: tuple[MemoryService, ZmqServer]) -> AsyncIterator[Raw]:
    ctx = zmq.asyncio.Context()
    yield Raw(ctx, served[1].endpoint)
    ctx.destroy(linger=0)


def ok(reply: dict[str, Any]) -> Any:
    assert reply["status"] == "ok", reply
    assert reply["v"] == 1
    return reply["data"]


def err(reply: dict[str, Any], code: str) -> str:
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    message = reply["error"]["message"]
    assert isinstance(message, str) and message
    return message


# -- every action, happy path ---------------------------------------------------------------------


async def test_put_then_get_round_trips_the_payload(raw: Raw) -> None:
    # Given an empty hub
    # When a memory is put and read back
    put = ok(await raw.v1("put", {"namespace": "agents", "key": "a1", "kind": "memory_item", "payload": NOTE}))
    got = await raw.v1("get", {"namespace": "agents", "key": "a1"})
    # Then the reply echoes the id and carries the record with the server-assigned version
    assert got["id"] == "r1"
    record = ok(got)["record"]
    assert record["payload"] == {**NOTE, "schema_version": 1}
    assert record["version"] == put["version"] > 0
    assert put["event_id"] == f"main_pc-{put['version']}"
    assert record["kind"] == "memory_item" and record["deleted"] is False


PERSISTED = {"durability": "persisted"}
SLOW_OK = {"timeout_ms": 30_000}  # the first persisted write waits for the worker to start


async def test_batch_put_batch_get_list_and_delete(host: TestHost, raw: Raw) -> None:
    # Given a worker and three memories written in one batch_put (list reads SQL, so they are persisted)
    host.start_worker()
    puts = [
        {"namespace": "ns", "key": f"k{i}", "kind": "memory_item", "payload": {"content": str(i)}} for i in range(3)
    ]
    results = ok(await raw.v1("batch_put", {"puts": puts, **PERSISTED}, **SLOW_OK))["results"]
    assert len(results) == 3
    # When one is deleted
    deleted = ok(await raw.v1("delete", {"namespace": "ns", "key": "k1", **PERSISTED}, **SLOW_OK))
    assert deleted["version"] > results[1]["version"]
    # Then batch_get reports it missing, list skips it, and list with include_deleted shows the tombstone
    data = ok(await raw.v1("batch_get", {"namespace": "ns", "keys": ["k0", "k1", "k2", "nope"]}))
    assert [r["key"] for r in data["records"]] == ["k0", "k2"]
    assert data["missing"] == ["k1", "nope"]
    listed = ok(await raw.v1("list", {"namespace": "ns"}))
    assert [r["key"] for r in listed["records"]] == ["k0", "k2"] and listed["next_page_token"] == ""
    everything = ok(await raw.v1("list", {"namespace": "ns", "include_deleted": True}))
    assert [(r["key"], r["deleted"]) for r in everything["records"]] == [("k0", False), ("k1", True), ("k2", False)]


async def test_list_pages_with_a_token(host: TestHost, raw: Raw) -> None:
    # Given five persisted records
    host.start_worker()
    puts = [{"namespace": "p", "key": f"k{i}", "kind": "memory_item", "payload": {"content": "x"}} for i in range(5)]
    ok(await raw.v1("batch_put", {"puts": puts, **PERSISTED}, **SLOW_OK))
    # When listed two at a time
    keys, token, pages = [], "", 0
    while True:
        page = ok(await raw.v1("list", {"namespace": "p", "page_size": 2, "page_token": token}))
        keys += [r["key"] for r in page["records"]]
        token, pages = page["next_page_token"], pages + 1
        if not token:
            break
    # Then every key comes once, in order, over three pages
    assert keys == [f"k{i}" for i in range(5)] and pages == 3


async def test_a_req_socket_is_answered_too(served: tuple[MemoryService, ZmqServer]) -> None:
    # Given a REQ client (it adds an empty delimiter frame the server must keep in its reply)
    ctx = zmq.asyncio.Context()
    req = Raw(ctx, served[1].endpoint, zmq.REQ)
    try:
        # When it asks for a key that does not exist, then for one that does
        err(await req.v1("get", {"namespace": "n", "key": "absent"}), "NOT_FOUND")
        ok(await req.v1("put", {"namespace": "n", "key": "k", "kind": "memory_item", "payload": NOTE}))
        # Then both replies arrive on the REQ socket
        assert ok(await req.v1("get", {"namespace": "n", "key": "k"}))["record"]["key"] == "k"
    finally:
        ctx.destroy(linger=0)


async def test_persisted_put_is_in_sql_when_answered(host: TestHost, raw: Raw) -> None:
    # Given a running worker
    host.start_worker()
    # When a put asks for durability "persisted"
    payload = {"namespace": "d", "key": "k", "kind": "knowledge_record", "payload": {"subject": "sky"}}
    put = ok(await raw.v1("put", {**payload, **PERSISTED}, **SLOW_OK))
    # Then SQL holds that version as soon as the reply arrives
    from mfh_tasks import build_sql_store

    row = build_sql_store(host.settings).get("d", "k")
    assert row is not None and row.version == put["version"]


# -- bad input: a documented error, nothing changed, the server keeps serving ---------------------

BAD_REQUESTS: list[tuple[str, bytes, str]] = [
    ("malformed JSON", b'{"v": 1, "action": "get", ', "INVALID_ARGUMENT"),
    ("not UTF-8", b"\xff\xfe", "INVALID_ARGUMENT"),
    ("JSON array", b"[1, 2]", "INVALID_ARGUMENT"),
    ("unknown action", b'{"v": 1, "id": 1, "action": "drop_all", "payload": {}}', "INVALID_ARGUMENT"),
    ("unknown version", b'{"v": 2, "id": 1, "action": "get", "payload": {}}', "INVALID_ARGUMENT"),
    ("payload not an object", b'{"v": 1, "action": "get", "payload": "x"}', "INVALID_ARGUMENT"),
    ("missing key", b'{"v": 1, "action": "get", "payload": {"namespace": "n"}}', "INVALID_ARGUMENT"),
    ("key of wrong type", b'{"v": 1, "action": "get", "payload": {"namespace": "n", "key": 5}}', "INVALID_ARGUMENT"),
    ("unknown field", b'{"v": 1, "action": "get", "payload": {"namespace": "n", "key": "k", "x": 1}}',
     "INVALID_ARGUMENT"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "code"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_envelopes_get_an_error_and_the_server_keeps_serving(
    raw: Raw, case: str, body: bytes, code: str
) -> None:
    # Given a serving hub
    # When a malformed request arrives
    await raw.send_bytes(body)
    # Then it gets an error reply, and the next good request is answered
    err(await raw.recv(), code)
    err(await raw.v1("get", {"namespace": "n", "key": "k"}), "NOT_FOUND")


def _put(**changes: Any) -> dict[str, Any]:
    return {"namespace": "n", "key": "k", "kind": "memory_item", "payload": NOTE, **changes}


BAD_PUTS: list[tuple[str, dict[str, Any]]] = [
    ("unknown kind", _put(kind="diary")),
    ("invalid namespace", _put(namespace="bad ns!")),
    ("invalid key", _put(key="k\n")),
    ("key too long", _put(key="k" * 300)),
    ("payload fails its model", _put(payload={"tags": []})),
    ("payload over 256 KiB", _put(payload={"content": "x" * 300_000})),
    ("payload JSON text invalid", _put(payload="{nope")),
    ("payload not an object", _put(payload=[1, 2])),
    ("expected_version negative", _put(expected_version=-1)),
    ("expected_version not an integer", _put(expected_version="7")),
    ("durability unknown", _put(durability="maybe"))]  # fmt: skip


@pytest.mark.parametrize(("case", "payload"), BAD_PUTS, ids=[c[0] for c in BAD_PUTS])
async def test_bad_puts_are_rejected_and_write_nothing(
    served: tuple[MemoryService, ZmqServer], raw: Raw, case: str, payload: dict[str, Any]
) -> None:
    # Given a serving hub with nothing staged
    service = served[0]
    # When a bad put arrives, alone and inside a batch with a good one
    message = err(await raw.v1("put", payload), "INVALID_ARGUMENT")
    good = {"namespace": "n", "key": "good", "kind": "memory_item", "payload": NOTE}
    err(await raw.v1("batch_put", {"puts": [good, payload]}), "INVALID_ARGUMENT")
    # Then nothing was written (not even the good half of the batch), and the message says what is wrong
    assert message
    assert await service.hot.redis.zcard(service.hot.dirty_key) == 0
    err(await raw.v1("get", {"namespace": "n", "key": "good"}), "NOT_FOUND")


async def test_stale_expected_version_is_failed_precondition_and_changes_nothing(raw: Raw) -> None:
    # Given a key at some version
    base = {"namespace": "n", "key": "k", "kind": "memory_item"}
    v1 = ok(await raw.v1("put", {**base, "payload": {"content": "one"}}))["version"]
    v2 = ok(await raw.v1("put", {**base, "payload": {"content": "two"}, "expected_version": v1}))["version"]
    # When a writer still holding v1 puts or deletes
    err(await raw.v1("put", {**base, "payload": {"content": "three"}, "expected_version": v1}), "FAILED_PRECONDITION")
    err(await raw.v1("delete", {"namespace": "n", "key": "k", "expected_version": v1}), "FAILED_PRECONDITION")
    # Then the key still holds the second write
    record = ok(await raw.v1("get", {"namespace": "n", "key": "k"}))["record"]
    assert record["version"] == v2 and record["payload"]["content"] == "two"


async def test_oversized_message_is_dropped_and_the_server_keeps_serving(
    served: tuple[MemoryService, ZmqServer], raw: Raw
) -> None:
    # Given a server whose max_message_bytes is 1 MiB
    assert served[1].max_message_bytes == 1024 * 1024
    ctx = zmq.asyncio.Context()
    big = Raw(ctx, served[1].endpoint)
    try:
        # When a peer sends a 2 MiB message
        await big.send_bytes(b'{"v": 1, "action": "get", "payload": {"pad": "' + b"x" * (2 * 1024 * 1024) + b'"}}')
        # Then libzmq drops it (no reply) and disconnects that peer, while other clients are still served
        assert not await big.sock.poll(300)
        err(await raw.v1("get", {"namespace": "n", "key": "k"}), "NOT_FOUND")
    finally:
        ctx.destroy(linger=0)


async def test_busy_server_sheds_load_with_resource_exhausted(host: TestHost) -> None:
    # Given a server that may hold only one request in flight, and a service stuck on reads
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow_get(*_args: Any, **_kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        raise NotFound("x")

    async for service, server in _serve(host):
        server.max_in_flight = 1

        service.get_answer = slow_get  # type: ignore[method-assign] # what a v1 get calls
        ctx = zmq.asyncio.Context()
        a, b = Raw(ctx, server.endpoint), Raw(ctx, server.endpoint)
        try:
            # When two requests arrive together
            await a.send_bytes(
                json.dumps({"v": 1, "action": "get", "payload": {"namespace": "n", "key": "k"}}).encode()
            )
            await asyncio.wait_for(entered.wait(), 10)
            shed = await b.v1("get", {"namespace": "n", "key": "k"})
            # Then the second is shed at once, with its id, and the first still completes
            err(shed, "RESOURCE_EXHAUSTED")
            assert shed["id"] == "r1"
            gate.set()
            err(await a.recv(), "NOT_FOUND")
        finally:
            ctx.destroy(linger=0)


# -- API key -----------------------------------------------------------------------------------------


@pytest.fixture
async def keyed(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[MemoryService, ZmqServer]]:
    h = make_host(tmp_path, redis_url=redis_url, overrides={**own_prefix(), "server": {"api_key": API_KEY}})
    async for pair in _serve(h):
        yield pair


@pytest.mark.parametrize("given", [None, "wrong", "", 12345])
async def test_missing_or_wrong_api_key_is_unauthenticated_and_runs_nothing(
    keyed: tuple[MemoryService, ZmqServer], given: Any
) -> None:
    # Given a server that requires an API key
    service, server = keyed
    ctx = zmq.asyncio.Context()
    peer = Raw(ctx, server.endpoint)
    try:
        extra = {} if given is None else {"api_key": given}
        # When a put and a legacy v0 put arrive without the right key
        put = {"namespace": "n", "key": "k", "kind": "memory_item", "payload": NOTE}
        err(await peer.v1("put", put, **extra), "UNAUTHENTICATED")
        v0_puts = LEGACY_V0_CALLS.labels(action="put")
        counted = v0_puts._value.get()
        v0 = await peer.ask({"action": "put", "key": "k", "value": NOTE, **extra})
        # Then both are refused and nothing was staged; with the key the same put succeeds
        assert v0["status"] == "error" and v0["error_code"] == "UNAUTHENTICATED"
        assert v0_puts._value.get() == counted + 1  # refused, yet counted: a legacy agent is still out there
        assert await service.hot.redis.zcard(service.hot.dirty_key) == 0
        ok(await peer.v1("put", put, api_key=API_KEY))
    finally:
        ctx.destroy(linger=0)


# -- clients ---------------------------------------------------------------------------------------------


async def test_async_client_every_method(host: TestHost, served: tuple[MemoryService, ZmqServer]) -> None:
    # Given the async client and a worker
    host.start_worker()
    async with AsyncZmqClient(served[1].endpoint, timeout=30) as client:
        # When it puts, reads, lists and deletes
        res = await client.put(PutSpec("c", "k1", "memory_item", NOTE))
        more = await client.batch_put(
            [PutSpec("c", "k2", "session_data", {"session_id": "s1"})], durability=Durability.PERSISTED
        )
        record = await client.get("c", "k1")
        found, missing = await client.batch_get("c", ["k1", "k2", "k3"])
        listed, token = await client.list("c", kind="session_data")
        gone = await client.delete("c", "k1", expected_version=res.version)
        # Then the results are typed models with the server's versions
        assert record.version == res.version and record.payload_obj()["content"] == NOTE["content"]
        assert [r.key for r in found] == ["k1", "k2"] and missing == ["k3"]
        assert [r.key for r in listed] == ["k2"] and token == "" and more[0].version > res.version
        assert gone.version > res.version
        with pytest.raises(NotFound):
            await client.get("c", "k1")
        with pytest.raises(VersionConflict):
            await client.delete("c", "k2", expected_version=1)


def _sync_session(endpoint: str) -> tuple[int, int]:
    from services import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"  # nobody there: the first attempt times out and fails over
    with ZmqClient([dead, endpoint], timeout=0.5) as client:
        put = client.put(PutSpec("s", "k", "memory_item", NOTE), durability=Durability.ACCEPTED)
        return put.version, client.get("s", "k").version


async def test_sync_client_round_trip(served: tuple[MemoryService, ZmqServer]) -> None:
    # Given the blocking client in a thread, its first endpoint dead
    # When it puts and gets  Then it fails over and reads its own write
    put_version, got_version = await asyncio.to_thread(_sync_session, served[1].endpoint)
    assert put_version == got_version


async def test_client_fails_over_to_the_next_endpoint(served: tuple[MemoryService, ZmqServer]) -> None:
    # Given a client whose first endpoint has nobody behind it
    from services import free_port

    dead = f"tcp://127.0.0.1:{free_port()}"
    async with AsyncZmqClient([dead, served[1].endpoint], timeout=0.3, retries=2) as client:
        # When it reads  Then the read times out on the dead endpoint and is resent to the live one
        with pytest.raises(NotFound):
            await client.get("f", "k")
        # And a non-idempotent delete is not resent: it goes to the endpoint that now answers
        with pytest.raises(NotFound):
            await client.delete("f", "k")


async def test_client_retries_a_shed_call(served: tuple[MemoryService, ZmqServer]) -> None:
    # Given a server that holds one request at a time, busy with a slow get
    service, server = served
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow_get(*_args: Any, **_kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        raise NotFound("x")

    shed = API_REQUESTS.labels(transport="zmq", method="shed", code="RESOURCE_EXHAUSTED")
    server.max_in_flight = 1
    service.get_answer = slow_get  # type: ignore[method-assign] # what a v1 get calls
    ctx = zmq.asyncio.Context()
    try:
        holder = Raw(ctx, server.endpoint)  # kept referenced: a collected socket drops its queued message
        await holder.send_bytes(b'{"v": 1, "action": "get", "payload": {"namespace": "n", "key": "k"}}')
        await asyncio.wait_for(entered.wait(), 10)
        before = shed._value.get()

        def was_shed() -> bool:
            return bool(shed._value.get() > before)

        async with AsyncZmqClient(server.endpoint, timeout=5, retries=20, backoff=0.02) as client:
            # When a client reads while the server is busy, and the slow get finishes after the first shed
            call = asyncio.create_task(client.batch_get("n", ["k"]))
            await async_wait_until(was_shed, 10, message="a shed reply")
            gate.set()
            # Then the client's retry succeeds
            assert await call == ([], ["k"])
            assert client.failovers >= 1
    finally:
        ctx.destroy(linger=0)


async def test_put_accepts_the_payload_as_json_text(raw: Raw) -> None:
    # Given a payload sent as JSON text (as gRPC's payload_json)  When it is put and read
    ok(await raw.v1("put", _put(key="text", payload='{"content": "as text"}')))
    record = ok(await raw.v1("get", {"namespace": "n", "key": "text"}))["record"]
    # Then it is stored as the object
    assert record["payload"] == {"content": "as text", "schema_version": 1}


async def test_requests_are_counted_with_transport_zmq(raw: Raw) -> None:
    # Given the request counter for zmq Get NOT_FOUND (method labels are the gRPC names)
    counter = API_REQUESTS.labels(transport="zmq", method="Get", code="NOT_FOUND")
    before = counter._value.get()
    # When a get misses
    err(await raw.v1("get", {"namespace": "m", "key": "k"}), "NOT_FOUND")
    # Then the counter moved by one
    assert counter._value.get() == before + 1


# -- hostile input (issue 7): every body gets a documented error reply, nothing is written ------------------

DEEP = 5000  # json.loads raises RecursionError at about 1,000 levels
_DEEP_VALUE = "[" * DEEP + "]" * DEEP

HOSTILE_BODIES: list[tuple[str, bytes]] = [
    ("deep body", ("[" * DEEP + "]" * DEEP).encode()),
    ("deep object body", ('{"v": 1, "x": ' + _DEEP_VALUE + "}").encode()),
    ("deep payload", b'{"v": 1, "id": "r", "action": "put", "payload": {"namespace": "n", "key": "k", '
     b'"kind": "memory_item", "payload": {"content": "x", "metadata": {"a": ' + _DEEP_VALUE.encode() + b"}}}}"),
    ("deep payload as text", json.dumps({"v": 1, "action": "put", "payload": {
        "namespace": "n", "key": "k", "kind": "memory_item", "payload": '{"content": ' + _DEEP_VALUE + "}"}}).encode()),
    ("escaped lone surrogate in a payload value", b'{"v": 1, "action": "put", "payload": {"namespace": "n", '
     b'"key": "k", "kind": "memory_item", "payload": {"content": "x", "metadata": {"m": "\\ud800"}}}}'),
    ("raw surrogate bytes in a payload value", b'{"v": 1, "action": "put", "payload": {"namespace": "n", '
     b'"key": "k", "kind": "memory_item", "payload": {"content": "\xed\xa0\x80"}}}'),
    ("escaped lone surrogate as the id", b'{"v": 1, "id": "\\ud800", "action": "get", '
     b'"payload": {"namespace": "n", "key": "k"}}'),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body"), HOSTILE_BODIES, ids=[c[0] for c in HOSTILE_BODIES])
async def test_hostile_bodies_are_invalid_argument_and_write_nothing(
    served: tuple[MemoryService, ZmqServer], raw: Raw, case: str, body: bytes
) -> None:
    # Given a serving hub  When a hostile body arrives
    await raw.send_bytes(body)
    # Then it is answered INVALID_ARGUMENT (not INTERNAL), nothing is staged, and the server keeps serving
    err(await raw.recv(), "INVALID_ARGUMENT")
    service = served[0]
    assert await service.hot.redis.zcard(service.hot.dirty_key) == 0
    err(await raw.v1("get", {"namespace": "n", "key": "k"}), "NOT_FOUND")


@pytest.mark.parametrize("value", [3, 99, -1, "ACCEPTED", None])
async def test_unknown_durability_is_invalid_argument(raw: Raw, value: Any) -> None:
    # Given a serving hub  When a write names a durability that is not one of the two
    put = {"namespace": "n", "key": "k", "kind": "memory_item", "payload": NOTE, "durability": value}
    for action, payload in (("put", put), ("batch_put", {"puts": [_put()], "durability": value})):
        message = err(await raw.v1(action, payload), "INVALID_ARGUMENT")
        # Then the message names the field and the allowed values
        assert "durability" in message and "accepted" in message and "persisted" in message, message
    err(await raw.v1("get", {"namespace": "n", "key": "k"}), "NOT_FOUND")
