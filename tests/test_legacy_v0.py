"""The legacy v0 schema (docs/v0_schema.md) end to end over a real ZeroMQ socket, and its call counter."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from hosts import TestHost, make_host

from mfh_api.service import build_service
from mfh_api.zmq_server import ZmqServer
from mfh_core.metrics import LEGACY_V0_CALLS

NOTE = {"content": "met Ada at the station"}


def own_prefix() -> dict[str, Any]:
    """A Redis key prefix of this test's own: suites running side by side share Redis db 9."""
    return {"storage": {"redis_prefix": f"t{uuid.uuid4().hex[:12]}"}}


class V0Agent:
    """A legacy agent: a REQ socket sending flat v0 JSON."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    async def send_raw(self, body: bytes) -> dict[str, Any]:
        await self.sock.send(body)
        assert await self.sock.poll(10_000), "no reply"
        reply = json.loads(await self.sock.recv())
        assert isinstance(reply, dict)
        return reply

    async def ask(self, **fields: Any) -> dict[str, Any]:
        return await self.send_raw(json.dumps(fields).encode())


@pytest.fixture
def host(tmp_path: Path, redis_url: str) -> Iterator[TestHost]:
    h = make_host(tmp_path, redis_url=redis_url, overrides=own_prefix())
    yield h
    for p in h.procs:
        h.kill(p)


@pytest.fixture
async def agent(host: TestHost) -> AsyncIterator[V0Agent]:
    service = await build_service(host.settings)
    server = ZmqServer.from_settings(service, host.settings)
    await server.start()
    ctx = zmq.asyncio.Context()
    try:
        yield V0Agent(ctx, server.endpoint)
    finally:
        ctx.destroy(linger=0)
        await server.close()
        await service.close()


def success(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "success", reply
    assert "v" not in reply
    return reply


def failure(reply: dict[str, Any], code: str) -> str:
    assert reply["status"] == "error", reply
    assert reply["error_code"] == code, reply
    assert "v" not in reply
    message = reply["error"]
    assert isinstance(message, str) and message
    return message


async def test_store_and_retrieve_in_the_default_namespace(agent: V0Agent) -> None:
    # Given a legacy agent that knows only "store" and "retrieve" and sends a request_id and extra fields
    # When it stores a memory and retrieves it
    stored = success(await agent.ask(action="store", key="m1", value=NOTE, request_id="r-7", agent="episodic-3"))
    got = success(await agent.ask(action="retrieve", key="m1"))
    # Then the reply is flat v0: the request_id echoed, the record's fields at the top level
    assert stored["request_id"] == "r-7" and stored["key"] == "m1" and stored["version"] > 0
    assert got["namespace"] == "default" and got["kind"] == "memory_item"
    assert got["value"] == {**NOTE, "schema_version": 1} and got["version"] == stored["version"]


async def test_every_v0_action(host: TestHost, agent: V0Agent) -> None:
    # Given a worker (list reads SQL) and three keys put with the v0 "put" action
    host.start_worker()
    for k in ("a", "b", "c"):
        success(await agent.ask(action="put", namespace="legacy", key=k, kind="session_data", value={"session_id": k}))
    # When the agent gets, batch_gets, deletes and lists
    one = success(await agent.ask(action="get", namespace="legacy", key="a"))
    gone = success(await agent.ask(action="delete", namespace="legacy", key="b"))
    many = success(await agent.ask(action="batch_get", namespace="legacy", keys=["a", "b", "c", "zz"]))
    # Then each answers in v0 shape
    assert one["value"] == {"session_id": "a", "schema_version": 1}
    assert gone["key"] == "b" and gone["version"] > one["version"]
    assert [i["key"] for i in many["items"]] == ["a", "c"] and many["missing"] == ["b", "zz"]
    # And list, one item a page with limit/cursor, shows the live keys once the writes reach SQL
    from services import async_wait_until

    async def listed() -> list[str]:
        keys: list[str] = []
        cursor = None
        for _ in range(10):
            page = success(await agent.ask(action="list", namespace="legacy", limit=1, cursor=cursor))
            keys += [i["key"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                return keys
        raise AssertionError("list did not end")

    assert await async_wait_until(lambda: _equal(listed(), ["a", "c"]), 30, message="list to see persisted keys")
    tombstones = success(await agent.ask(action="list", namespace="legacy", include_deleted=True, prefix="b"))
    assert [(i["key"], i["deleted"]) for i in tombstones["items"]] == [("b", True)]


async def _equal(got: Any, want: list[str]) -> bool:
    return bool(await got == want)


BAD_V0: list[tuple[str, dict[str, Any], str]] = [
    ("unknown action", {"action": "forget_everything"}, "INVALID_ARGUMENT"),
    ("no action", {"key": "k"}, "INVALID_ARGUMENT"),
    ("action not a string", {"action": 3}, "INVALID_ARGUMENT"),
    ("get without key", {"action": "get"}, "INVALID_ARGUMENT"),
    ("put without value", {"action": "put", "key": "k"}, "INVALID_ARGUMENT"),
    ("value not an object", {"action": "put", "key": "k", "value": "text"}, "INVALID_ARGUMENT"),
    ("key of wrong type", {"action": "get", "key": 12}, "INVALID_ARGUMENT"),
    ("keys not a list", {"action": "batch_get", "keys": "a,b"}, "INVALID_ARGUMENT"),
    ("unknown kind", {"action": "put", "key": "k", "kind": "diary", "value": NOTE}, "INVALID_ARGUMENT"),
    ("invalid key", {"action": "put", "key": "no spaces", "value": NOTE}, "INVALID_ARGUMENT"),
    ("invalid namespace", {"action": "get", "namespace": "a/b", "key": "k"}, "INVALID_ARGUMENT"),
    ("payload fails its model", {"action": "put", "key": "k", "value": {"content": ""}}, "INVALID_ARGUMENT"),
    ("limit zero", {"action": "list", "limit": 0}, "INVALID_ARGUMENT"),
    ("absent key", {"action": "get", "key": "never"}, "NOT_FOUND"),
]


@pytest.mark.parametrize(("case", "request_fields", "code"), BAD_V0, ids=[c[0] for c in BAD_V0])
async def test_bad_v0_requests_get_a_v0_error_and_change_nothing(
    agent: V0Agent, case: str, request_fields: dict[str, Any], code: str
) -> None:
    # Given a key already stored
    success(await agent.ask(action="put", key="k", value=NOTE))
    before = success(await agent.ask(action="get", key="k"))
    # When a bad v0 request arrives
    failure(await agent.ask(**request_fields, request_id=41), code)
    # Then the stored key is unchanged and the server keeps answering
    assert success(await agent.ask(action="get", key="k"))["version"] == before["version"]


async def test_error_echoes_request_id_and_stale_version_reports_current(agent: V0Agent) -> None:
    # Given a key at some version
    v = success(await agent.ask(action="put", key="k", value=NOTE))["version"]
    success(await agent.ask(action="put", key="k", value={"content": "newer"}, expected_version=v))
    # When a writer holding the old version deletes
    reply = await agent.ask(action="delete", key="k", expected_version=v, request_id="old-writer")
    # Then it is refused with the current version, and the key still holds the newer write
    failure(reply, "FAILED_PRECONDITION")
    assert reply["request_id"] == "old-writer" and reply["current_version"] > v
    assert success(await agent.ask(action="get", key="k"))["value"]["content"] == "newer"


async def test_malformed_json_gets_an_error_reply(agent: V0Agent) -> None:
    # Given a legacy agent  When it sends broken JSON  Then it gets a "status": "error" reply and is served after
    reply = await agent.send_raw(b"{action: get}")
    assert reply["status"] == "error" and reply["error"]["code"] == "INVALID_ARGUMENT"
    failure(await agent.ask(action="get", key="absent"), "NOT_FOUND")


async def test_v0_calls_are_counted_by_action(agent: V0Agent) -> None:
    # Given the v0 counters
    store = LEGACY_V0_CALLS.labels(action="store")
    unknown = LEGACY_V0_CALLS.labels(action="unknown")
    before = store._value.get(), unknown._value.get()
    # When a store and an unknown action arrive
    success(await agent.ask(action="store", key="k", value=NOTE))
    failure(await agent.ask(action="nonsense"), "INVALID_ARGUMENT")
    # Then each is counted under its own bounded label
    assert (store._value.get(), unknown._value.get()) == (before[0] + 1, before[1] + 1)


def _cursor(raw: str) -> str:
    import base64

    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


DEEP = 5000  # json.loads raises RecursionError at about 1,000 levels
HOSTILE_V0: list[tuple[str, bytes]] = [
    ("deep body", b'{"action": "get", "key": "k", "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"),
    ("deep value", b'{"action": "put", "key": "k", "value": {"content": "x", "metadata": {"a": '
     + b"[" * DEEP + b"]" * DEEP + b"}}}"),
    ("escaped lone surrogate value",
     b'{"action": "put", "key": "k", "value": {"content": "x", "metadata": {"m": "\\ud800"}}}'),
    ("raw surrogate bytes value", b'{"action": "put", "key": "k", "value": {"content": "\xed\xa0\x80"}}'),
    ("escaped lone surrogate request_id", b'{"action": "get", "key": "k", "request_id": "\\udc80"}'),
    ("deep forged cursor", json.dumps({"action": "list", "cursor": _cursor("[" * DEEP + "]" * DEEP)}).encode()),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body"), HOSTILE_V0, ids=[c[0] for c in HOSTILE_V0])
async def test_hostile_v0_bodies_get_invalid_argument_and_change_nothing(
    agent: V0Agent, case: str, body: bytes
) -> None:
    # Given a key already stored
    before = success(await agent.ask(action="put", key="k", value=NOTE))["version"]
    # When a hostile v0 body arrives  Then it is refused as INVALID_ARGUMENT (not INTERNAL)
    reply = await agent.send_raw(body)
    assert reply["status"] == "error", reply
    assert (reply.get("error_code") or reply["error"]["code"]) == "INVALID_ARGUMENT", reply
    # And the key is unchanged and the server keeps answering
    assert success(await agent.ask(action="get", key="k"))["version"] == before
