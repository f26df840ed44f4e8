"""gRPC end to end over a real socket: every RPC, bad input of every sort, auth, health and reflection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hosts import TestHost, make_host
from services import async_wait_until, free_port

from mfh_api.app import run_api
from mfh_api.client_grpc import AsyncMemoryClient, MemoryClient
from mfh_api.grpc_server import SERVICE_NAME, GrpcServer
from mfh_api.proto import pb, pb_grpc
from mfh_api.service import Durability, MemoryService, PutSpec, build_service
from mfh_models import MAX_PAYLOAD_BYTES, ConfigError, MemoryEvent, NotFound, Op, VersionConflict

KEY = "test-key"
MAX_MESSAGE = 512 * 1024  # above MAX_PAYLOAD_BYTES, so both limits can be hit separately


@dataclass
class Api:
    host: TestHost
    service: MemoryService
    server: GrpcServer
    client: AsyncMemoryClient
    channel: grpc.aio.Channel

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stub(self) -> Any:
        return pb_grpc.MemoryFusionStub(self.channel)

    async def serves(self) -> None:
        """The server still answers a well-formed call after whatever came before."""
        await self.client.put(PutSpec("ns", "probe", "memory_item", {"content": "alive"}))
        assert (await self.client.get("ns", "probe")).key == "probe"


@pytest.fixture
async def api(tmp_path: Path, redis_url: str) -> AsyncIterator[Api]:
    host = make_host(
        tmp_path,
        redis_url=redis_url,
        overrides={
            "server": {"api_key": KEY, "max_message_bytes": MAX_MESSAGE, "deadline_seconds": 1.0},
            "storage": {"redis_prefix": f"t{uuid.uuid4().hex[:10]}"},
        },
    )
    service = await build_service(host.settings)
    server = GrpcServer(service, host.settings)
    await server.start()
    client = AsyncMemoryClient([f"127.0.0.1:{server.port}"], api_key=KEY, max_message_bytes=4 * MAX_MESSAGE)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)]
    )
    try:
        yield Api(host, service, server, client, channel)
    finally:
        await channel.close()
        await client.close()
        await server.stop(grace=1)
        await service.close()
        host.stop_all()


MD = ((("x-api-key", KEY),),)


def put_req(key: str, payload: str = '{"content": "x"}', kind: str = "memory_item", **kw: Any) -> Any:
    return pb.PutRequest(record=pb.Record(namespace="ns", key=key, kind=kind, payload_json=payload), **kw)


async def status_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


# -- every RPC, happy path ------------------------------------------------------------------------


async def test_every_rpc_round_trips_over_the_socket(api: Api) -> None:
    c = api.client
    r = await c.put(PutSpec("ns", "a", "memory_item", {"content": "hello", "tags": ["x"]}))
    rec = await c.get("ns", "a")
    assert rec.version == r.version and rec.payload_obj()["content"] == "hello" and rec.origin == "main_pc"
    results = await c.batch_put([PutSpec("ns", f"b{i}", "session_data", {"session_id": f"s{i}"}) for i in range(3)])
    assert [x.version for x in results] == sorted(x.version for x in results)
    found, missing = await c.batch_get("ns", ["b2", "nope", "a"])
    assert [f.key for f in found] == ["b2", "a"] and missing == ["nope"]
    d = await c.delete("ns", "a", expected_version=r.version)
    assert d.version > r.version
    with pytest.raises(NotFound):
        await c.get("ns", "a")


async def test_persisted_put_returns_once_the_row_is_in_sql_and_list_and_watch_see_it(api: Api) -> None:
    api.host.start_worker(threads=2)
    events: list[MemoryEvent] = []

    async def watch() -> None:
        async for ev in api.client.watch("ns", "w/"):
            events.append(ev)
            return

    task = asyncio.create_task(watch())
    await async_wait_until(lambda: len(api.service.feed._watchers) == 1, 10, message="watch registered")
    # The worker was just started: on a loaded machine its boot alone can take seconds, so the
    # deadline is generous; the point is that the answer comes only once the row is in SQL.
    spec = PutSpec("ns", "w/1", "memory_item", {"content": "p"})
    r = await api.client.put(spec, durability=Durability.PERSISTED, timeout=30)
    row = api.service.sql.get("ns", "w/1")
    assert row is not None and row.version == r.version
    await asyncio.wait_for(task, 30)
    assert events[0].key == "w/1" and events[0].op is Op.PUT and events[0].version == r.version
    page, token = await api.client.list("ns", key_prefix="w/")
    assert [p.key for p in page] == ["w/1"] and token == ""


async def test_persisted_put_without_a_worker_hits_the_server_deadline(api: Api) -> None:
    # Given no worker and no client deadline, When a PERSISTED put waits, Then the server's 1 s deadline answers
    code, details = await status_of(api.stub().Put(put_req("k", durability=pb.DURABILITY_PERSISTED), metadata=MD[0]))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and "still be written" in details


# -- bad input: documented error, nothing changed, still serving -----------------------------------------


async def test_malformed_protobuf_is_invalid_argument(api: Api) -> None:
    raw = api.channel.unary_unary(f"/{SERVICE_NAME}/Put")
    code, details = await status_of(raw(b"\x0a\xff\xff\xff\xff\x0fgarbage", metadata=MD[0]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "malformed PutRequest" in details
    await api.serves()


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (put_req("k", kind="poem"), grpc.StatusCode.INVALID_ARGUMENT, "unknown kind"),
        (put_req("k", payload="{not json"), grpc.StatusCode.INVALID_ARGUMENT, "not valid JSON"),
        (put_req("bad key!"), grpc.StatusCode.INVALID_ARGUMENT, "key"),
        (
            pb.PutRequest(record=pb.Record(namespace="../etc", key="k", kind="memory_item", payload_json="{}")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "namespace",
        ),
        (
            put_req("k", payload='{"content": "' + "x" * (MAX_PAYLOAD_BYTES + 10) + '"}'),
            grpc.StatusCode.INVALID_ARGUMENT,
            "262144",
        ),
        (
            put_req("k", payload='{"content": "' + "x" * (MAX_MESSAGE + 10) + '"}'),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    ],
)
async def test_bad_puts_get_their_code_and_change_nothing(
    api: Api, request_: Any, code: grpc.StatusCode, text: str
) -> None:
    got, details = await status_of(api.stub().Put(request_, metadata=MD[0]))
    assert got is code and text in details
    assert await api.service.hot.dirty_count() == 0
    await api.serves()


async def test_invalid_names_on_reads_are_invalid_argument(api: Api) -> None:
    for call in (
        api.stub().Get(pb.GetRequest(namespace="", key="k"), metadata=MD[0]),
        api.stub().BatchGet(pb.BatchGetRequest(namespace="ns", keys=["ok", "no spaces"]), metadata=MD[0]),
        api.stub().List(pb.ListRequest(namespace="ns", kind="poem"), metadata=MD[0]),
        api.stub().Delete(pb.DeleteRequest(namespace="ns", key="x" * 300), metadata=MD[0]),
        api.stub().BatchGet(pb.BatchGetRequest(namespace="ns", keys=[f"k{i}" for i in range(1001)]), metadata=MD[0]),
        api.stub().List(pb.ListRequest(namespace="ns", page_token="not-a-token"), metadata=MD[0]),
    ):
        code, _ = await status_of(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, _ = await status_of(api.stub().Delete(pb.DeleteRequest(namespace="ns", key="absent"), metadata=MD[0]))
    assert code is grpc.StatusCode.NOT_FOUND
    await api.serves()


@pytest.mark.parametrize("metadata", [(), (("x-api-key", "wrong"),), (("x-api-key", ""),)])
async def test_missing_or_wrong_api_key_is_unauthenticated_and_writes_nothing(api: Api, metadata: Any) -> None:
    code, _ = await status_of(api.stub().Put(put_req("k"), metadata=metadata))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    code, _ = await status_of(api.stub().BatchPut(pb.BatchPutRequest(puts=[put_req("k")]), metadata=metadata))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    watch = api.stub().Watch(pb.WatchRequest(namespace="ns"), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in watch:
            pass
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert await api.service.hot.get("ns", "k") is None
    assert await api.service.hot.dirty_count() == 0
    await api.serves()


async def test_stale_expected_version_is_failed_precondition_and_changes_nothing(api: Api) -> None:
    v1 = (await api.client.put(PutSpec("ns", "k", "memory_item", {"content": "one"}))).version
    v2 = (await api.client.put(PutSpec("ns", "k", "memory_item", {"content": "two"}, expected_version=v1))).version
    code, details = await status_of(api.stub().Put(put_req("k", expected_version=v1), metadata=MD[0]))
    assert code is grpc.StatusCode.FAILED_PRECONDITION and str(v2) in details
    with pytest.raises(VersionConflict):
        await api.client.batch_put(
            [
                PutSpec("ns", "new", "memory_item", {"content": "n"}),
                PutSpec("ns", "k", "memory_item", {"content": "3"}, expected_version=v1),
            ]
        )
    rec = await api.client.get("ns", "k")
    assert rec.version == v2 and rec.payload_obj()["content"] == "two"
    assert (await api.client.batch_get("ns", ["new"]))[1] == ["new"]
    await api.serves()


async def test_an_unexpected_error_is_internal_with_a_generic_message(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a service that fails in a way nobody planned for
    async def broken(*_: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.service, "get_answer", broken)  # what the Get handler calls
    # When a Get arrives, Then the client sees INTERNAL without the details, and the server keeps serving
    code, details = await status_of(api.stub().Get(pb.GetRequest(namespace="ns", key="k"), metadata=MD[0]))
    assert code is grpc.StatusCode.INTERNAL and "secret" not in details and "logged" in details
    monkeypatch.undo()
    await api.serves()


# -- health, reflection, the sync client, the start-up guard -----------------------------------------------


async def test_health_and_reflection_are_served(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for name in ("", SERVICE_NAME):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))  # no key needed for probes
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    call = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), metadata=MD[0])
    async for reply in call:
        names = {s.name for s in reply.list_services_response.service}
        assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
        break


async def test_sync_client_has_the_same_methods(api: Api) -> None:
    def use() -> None:
        with MemoryClient([api.target], api_key=KEY) as c:
            r = c.put(PutSpec("ns", "s", "memory_item", {"content": "sync"}))
            assert c.get("ns", "s").version == r.version
            assert c.batch_get("ns", ["s", "t"])[1] == ["t"]
            c.delete("ns", "s")
            with pytest.raises(NotFound):
                c.get("ns", "s")

    await asyncio.to_thread(use)


async def test_client_skips_a_dead_endpoint_even_for_conditional_writes(api: Api) -> None:
    # Given a client whose first endpoint has nothing listening
    async with AsyncMemoryClient([f"127.0.0.1:{free_port()}", api.target], api_key=KEY, backoff=0.01) as c:
        # When it reads, and writes with an expected_version (only retried when it cannot have run)
        r = await c.put(PutSpec("ns", "cas", "memory_item", {"content": "1"}, expected_version=0))
        assert (await c.get("ns", "cas")).version == r.version
        # Then both calls landed on the live endpoint, after one failover
        assert c.failovers == 1
        # and a conditional write that ran is never repeated: a stale one fails at once
        with pytest.raises(VersionConflict):
            await c.put(PutSpec("ns", "cas", "memory_item", {"content": "2"}, expected_version=0))


async def test_api_refuses_a_public_bind_without_a_key(tmp_path: Path, redis_url: str) -> None:
    host = make_host(tmp_path, redis_url=redis_url, overrides={"server": {"bind": "0.0.0.0", "api_key": None}})
    with pytest.raises(ConfigError, match="--insecure"):
        await run_api(host.settings)


# -- hostile input (issue 7): no INTERNAL, no UNKNOWN, nothing written ------------------------------------

DEEP = 5000  # json.loads raises RecursionError at about 1,000 levels


def _token(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        ('{"content": "x", "metadata": {"a": ' + "[" * DEEP + "]" * DEEP + "}}", "deeper than 64"),
        ("[" * DEEP, "deeper than 64"),
        ('{"content": "x", "metadata": {"note": "\\ud800"}}', "lone surrogate"),  # free-form: no model checks it
        ('{"content": "x", "metadata": {"\\udfff": 1}}', "lone surrogate"),
        ('{"content": "x", "importance": NaN}', "NaN"),
    ],
    ids=["deep", "deep unterminated", "surrogate value", "surrogate key", "NaN"],
)
async def test_hostile_payload_json_is_invalid_argument(api: Api, payload: str, needle: str) -> None:
    # Given a serving hub  When a Put and a BatchPut carry hostile payload_json
    got, details = await status_of(api.stub().Put(put_req("k", payload=payload), metadata=MD[0]))
    batch = pb.BatchPutRequest(puts=[put_req("good"), put_req("k", payload=payload)])
    got_batch, _ = await status_of(api.stub().BatchPut(batch, metadata=MD[0]))
    # Then both are INVALID_ARGUMENT saying why, nothing was staged, and the server keeps serving
    assert got is grpc.StatusCode.INVALID_ARGUMENT and needle in details
    assert got_batch is grpc.StatusCode.INVALID_ARGUMENT
    assert await api.service.hot.dirty_count() == 0
    await api.serves()


@pytest.mark.parametrize(
    "token",
    [_token("[" * DEEP + "]" * DEEP), _token('{"a": "k", "s": ' + "[" * DEEP + "]" * DEEP + "}"), _token('"\\ud800"')],
    ids=["deep", "deep scope", "surrogate"],
)
async def test_forged_page_token_is_invalid_argument(api: Api, token: str) -> None:
    code, details = await status_of(api.stub().List(pb.ListRequest(namespace="ns", page_token=token), metadata=MD[0]))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "page_token" in details
    await api.serves()


@pytest.mark.parametrize("value", [3, 99, -1])
async def test_unknown_durability_is_invalid_argument_and_writes_nothing(api: Api, value: int) -> None:
    # Given a serving hub  When a write names a Durability the proto does not define
    calls = {
        "Put": api.stub().Put(put_req("k", durability=value), metadata=MD[0]),
        "BatchPut": api.stub().BatchPut(pb.BatchPutRequest(puts=[put_req("k")], durability=value), metadata=MD[0]),
        "BatchPut inner": api.stub().BatchPut(
            pb.BatchPutRequest(puts=[put_req("k", durability=value)]), metadata=MD[0]
        ),
    }
    # Then each is INVALID_ARGUMENT naming the field and the allowed values, and nothing was staged
    for name, call in calls.items():
        code, details = await status_of(call)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, name
        assert f"durability {value}" in details and "DURABILITY_PERSISTED (2)" in details, details
    assert await api.service.hot.dirty_count() == 0
    await api.client.put(PutSpec("ns", "d", "memory_item", {"content": "x"}))
    code, details = await status_of(
        api.stub().Delete(pb.DeleteRequest(namespace="ns", key="d", durability=value), metadata=MD[0])
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "durability" in details
    assert (await api.client.get("ns", "d")).key == "d"  # not deleted


GARBAGE = b"\x0a\xff\xff\xff\xff\x0fgarbage"


@pytest.mark.parametrize(
    ("method", "shape"),
    [
        ("/grpc.health.v1.Health/Check", "unary"),
        ("/grpc.health.v1.Health/Watch", "server stream"),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "bidi"),
        (f"/{SERVICE_NAME}/Get", "unary"),
        (f"/{SERVICE_NAME}/Watch", "server stream"),
    ],
)
async def test_malformed_protobuf_is_invalid_argument_on_every_service(api: Api, method: str, shape: str) -> None:
    # Given a serving hub  When malformed protobuf reaches our service, health or reflection
    with pytest.raises(grpc.aio.AioRpcError) as info:
        if shape == "unary":
            await api.channel.unary_unary(method)(GARBAGE, metadata=MD[0], timeout=5)
        elif shape == "server stream":
            async for _ in api.channel.unary_stream(method)(GARBAGE, metadata=MD[0], timeout=5):
                pass
        else:

            async def one() -> AsyncIterator[bytes]:
                yield GARBAGE

            async for _ in api.channel.stream_stream(method)(one(), metadata=MD[0], timeout=5):
                pass
    # Then the answer is INVALID_ARGUMENT (grpc itself says UNKNOWN), and every service still answers
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    health = health_pb2_grpc.HealthStub(api.channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(service=""))
    ).status == health_pb2.HealthCheckResponse.SERVING
    await api.serves()


# -- graceful stop --------------------------------------------------------------------------------


async def test_stop_ends_open_watch_streams_unavailable_at_once_and_answers_new_calls_unavailable(api: Api) -> None:
    # Given an agent's Watch stream open on the server (registered with the change feed)
    watch = api.stub().Watch(pb.WatchRequest(namespace="ns", key_prefix="w/"), metadata=MD[0])

    async def watched() -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in watch:
                pass
        return info.value.code(), info.value.details() or ""

    ended = asyncio.create_task(watched())
    await async_wait_until(lambda: len(api.service.feed._watchers) == 1, 10, message="watch registered")
    # When the server stops with a 10 s grace (its drain waiting for 2 s without a call, at most 4 s,
    # so that the call below surely comes while it drains), and a call arrives while it drains
    assert api.server.servicer is not None
    api.server.servicer.drain_quiet_s, api.server.servicer.drain_quiet_max_s = 2.0, 4.0
    loop = asyncio.get_running_loop()
    started = loop.time()
    stopping = asyncio.create_task(api.server.stop(grace=10))
    code, details = await asyncio.wait_for(ended, 5)
    watch_s = loop.time() - started
    during = await status_of(api.stub().Put(put_req("late"), metadata=MD[0]))
    await stopping
    stop_s = loop.time() - started
    # Then the stream ended UNAVAILABLE ("shutting down": watch again elsewhere), not CANCELLED by the close
    # at the end of the grace; the late call was answered UNAVAILABLE (nothing done); the stop waited for
    # the quiet window after it, not for the grace
    assert code is grpc.StatusCode.UNAVAILABLE and "shutting down" in details, (code, details)
    assert watch_s < 2.0, watch_s
    assert during[0] is grpc.StatusCode.UNAVAILABLE and "nothing was done" in during[1], during
    assert 2.0 <= stop_s < 8.0, stop_s
    assert await api.service.hot.get("ns", "late") is None
