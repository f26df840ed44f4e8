"""The ZeroMQ transport: a :class:`~mfh_client.calls.Call` as a v1 JSON request on a DEALER socket.

Reliability is the Lazy Pirate pattern: wait ``timeout`` seconds for the reply, then close the
socket (it may hold a dead peer's queue) so the next attempt opens a fresh one, on the endpoint
the client picks. Replies to earlier attempts are recognised by their id and dropped.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from typing import Any, Final

import zmq
import zmq.asyncio

from mfh_client import calls
from mfh_client.calls import Call, Failure
from mfh_client.codecs import record_from_json, watch_event_from_json
from mfh_client.codes import exception_for_zmq
from mfh_client.security import CurveConfig
from mfh_client.types import PutResult, SearchHit
from mfh_models.errors import DeadlineExceeded
from mfh_models.records import WatchedEvent

__all__ = ["AsyncZmqTransport", "ZmqTransport", "zmq_endpoints"]


def zmq_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    return [e if "://" in e else f"tcp://{e}" for e in eps]


def _put_payload(a: Mapping[str, Any]) -> dict[str, Any]:
    p = {k: a[k] for k in ("namespace", "key", "kind", "payload")}
    if a["expected_version"] is not None:
        p["expected_version"] = a["expected_version"]
    if a.get("ttl_seconds"):
        p["ttl_seconds"] = a["ttl_seconds"]
    return p


def _payload(call: Call[Any]) -> dict[str, Any]:
    a = call.args
    if call.op == "put":
        return {**_put_payload(a), "durability": a["durability"].value}
    if call.op == "batch_put":
        return {"puts": [_put_payload(p) for p in a["puts"]], "durability": a["durability"].value}
    if call.op in ("search", "list_namespaces"):
        return dict(a)
    # get, batch_get, delete, list: send the fields that are set (the server's defaults fill the rest)
    out = {k: v for k, v in a.items() if v is not None and v != "" and v is not False}
    if "durability" in out:
        out["durability"] = a["durability"].value
    return {**out, "namespace": a["namespace"]}


def _ms(seconds: float) -> int:
    return max(0, int(seconds * 1000))


def _result(d: Mapping[str, Any]) -> PutResult:
    return PutResult(version=int(d["version"]), event_id=str(d["event_id"]))


def _records(d: Mapping[str, Any]) -> list[Any]:
    return [record_from_json(r) for r in d["records"]]


#: op -> result from the reply's ``data``
_RESULTS: Final[dict[str, Callable[[Any], Any]]] = {
    "get": lambda d: record_from_json(d["record"]),
    "batch_get": lambda d: (_records(d), list(d["missing"])),
    "put": _result,
    "batch_put": lambda d: [_result(r) for r in d["results"]],
    "delete": _result,
    "list": lambda d: (_records(d), str(d["next_page_token"])),
    "watch": lambda d: ([watch_event_from_json(e) for e in d["events"]], int(d["next_sequence"])),
    "search": lambda d: [SearchHit(record=record_from_json(h["record"]), score=float(h["score"])) for h in d["hits"]],
    "list_namespaces": lambda d: ([str(n) for n in d["namespaces"]], str(d["next_page_token"])),
}

#: What a Watch yields per poll: (sequence, the change), then (the position to poll after, None).
Watched = tuple[int, WatchedEvent | None]


def _polled(reply: tuple[list[WatchedEvent], int]) -> list[Watched]:
    events, position = reply
    return [*((e.sequence, e) for e in events), (position, None)]


class _Wire:
    """What both ZeroMQ transports share: request bodies, reply matching, results."""

    def __init__(self, addresses: Sequence[str], *, api_key: str | None, curve: CurveConfig | None = None) -> None:
        self.addresses = list(addresses)
        self.api_key = api_key
        self.curve = curve
        self._index = -1  # the endpoint the open socket is connected to

    def dealer(self, sock: zmq.Socket[bytes] | zmq.asyncio.Socket, i: int) -> None:
        """Set up a new DEALER socket (CURVE, when configured) and connect it to endpoint ``i``."""
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.addresses[i])

    def request(self, call: Call[Any], timeout: float) -> tuple[str, bytes]:
        rid = uuid.uuid4().hex
        body: dict[str, Any] = {"v": 1, "id": rid, "action": call.op, "payload": _payload(call)}
        if self.api_key:
            body["api_key"] = self.api_key
        # The server gives up when the client does. Last member: `mfh front` reads it from the tail, unparsed.
        body["timeout_ms"] = max(1, int(timeout * 1000))
        return rid, json.dumps(body, separators=(",", ":")).encode("utf-8")

    @staticmethod
    def reply(frames: list[bytes], rid: str) -> dict[str, Any] | None:
        """The reply to ``rid``, or None for a stale reply to an earlier attempt."""
        try:
            reply = json.loads(frames[-1])
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == rid else None

    @staticmethod
    def result(call: Call[Any], reply: dict[str, Any]) -> Any:
        if reply.get("status") == "ok":
            return _RESULTS[call.op](reply.get("data"))
        err = reply.get("error")
        err = err if isinstance(err, dict) else {}
        error = exception_for_zmq(err)
        raise Failure(error, str(err.get("code", "")), error.message, answered_by_server=True)

    def no_reply(self, call: Call[Any], timeout: float) -> Failure:
        where = self.addresses[self._index] if self._index >= 0 else "?"
        return Failure(DeadlineExceeded(f"no reply to {call.op} within {timeout:g} s from {where}"), "NO_REPLY")


class ZmqTransport(_Wire):
    """Blocking ZeroMQ; one per thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        api_key: str | None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        super().__init__(addresses, api_key=api_key, curve=curve)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None

    def _socket(self, i: int) -> zmq.Socket[bytes]:
        if self._sock is None or self._index != i:
            self.close()
            sock = self._ctx.socket(zmq.DEALER)
            self.dealer(sock, i)
            self._sock, self._index = sock, i
        return self._sock

    def attempt(self, call: Call[Any], i: int, timeout: float) -> Any:
        rid, body = self.request(call, timeout)
        sock = self._socket(i)
        sock.send_multipart([b"", body])
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                reply = self.reply(sock.recv_multipart(), rid)
                if reply is not None:
                    return self.result(call, reply)
        failure = self.no_reply(call, timeout)
        self.close()
        raise failure

    def watch(
        self, i: int, namespace: str, key_prefix: str, after: int | None, *, wait: float, reply_s: float
    ) -> Generator[Watched]:
        """Long polls on endpoint ``i``, each waiting up to ``wait`` seconds for a change; a failed poll raises
        its :class:`Failure`. From now on when ``after`` is None (a first poll asks where now is)."""
        while True:
            for item in _polled(
                self.attempt(calls.watch_poll(namespace, key_prefix, after, _ms(wait)), i, wait + reply_s)
            ):
                after = item[0]
                yield item

    def close(self) -> None:
        """Close the socket (the shared context stays)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class AsyncZmqTransport(_Wire):
    """asyncio ZeroMQ; one per event loop. Concurrent calls take turns (one socket, one request in flight)."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        api_key: str | None,
        context: zmq.asyncio.Context | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        super().__init__(addresses, api_key=api_key, curve=curve)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._turn = asyncio.Lock()

    def _socket(self, i: int) -> zmq.asyncio.Socket:
        if self._sock is None or self._index != i:
            self.close()
            sock = self._ctx.socket(zmq.DEALER)
            self.dealer(sock, i)
            self._sock, self._index = sock, i
        return self._sock

    async def attempt(self, call: Call[Any], i: int, timeout: float) -> Any:  # noqa: ASYNC109
        async with self._turn:  # a reply for another caller would otherwise be dropped as stale
            rid, body = self.request(call, timeout)
            sock = self._socket(i)
            await sock.send_multipart([b"", body])
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if await sock.poll(int(left * 1000) + 1):  # POLLIN by default
                    reply = self.reply(await sock.recv_multipart(), rid)
                    if reply is not None:
                        return self.result(call, reply)
            failure = self.no_reply(call, timeout)
            self.close()
            raise failure

    async def watch(
        self, i: int, namespace: str, key_prefix: str, after: int | None, *, wait: float, reply_s: float
    ) -> AsyncGenerator[Watched]:
        """As :meth:`ZmqTransport.watch`, awaited (give a Watch its own transport: a poll holds the socket)."""
        while True:
            call = calls.watch_poll(namespace, key_prefix, after, _ms(wait))
            for item in _polled(await self.attempt(call, i, wait + reply_s)):
                after = item[0]
                yield item

    def close(self) -> None:
        """Close the socket (the shared context stays)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
