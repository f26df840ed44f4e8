"""ZeroMQ clients (sync and async) with the gRPC client's method names, for agents that speak ZeroMQ.

Reliability is the Lazy Pirate pattern on a DEALER socket: wait ``timeout`` seconds for the reply,
then close the socket, reopen it on the next endpoint and resend when the call may be repeated.
The retry policy is the gRPC client's, :mod:`mfh_api.retry_policy` (docs/api.md has the table);
no reply at all counts as a lost connection (reads and unconditional puts are resent).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

import zmq
import zmq.asyncio

from mfh_api.errors import exception_for_zmq
from mfh_api.retry_policy import CallKind, delay, retryable
from mfh_api.service import Durability, PutResult, PutSpec
from mfh_api.zmq_protocol import record_from_json
from mfh_models import (
    DeadlineExceeded,
    InvalidArgument,
    MFHError,
    Record,
)

__all__ = ["AsyncZmqClient", "ZmqClient"]

_READS: Final = frozenset({"get", "batch_get", "list"})


def _endpoints(endpoints: str | Sequence[str]) -> list[str]:
    eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
    if not eps:
        raise InvalidArgument("at least one ZeroMQ endpoint is needed")
    return [e if "://" in e else f"tcp://{e}" for e in eps]


def _put_payload(spec: PutSpec) -> dict[str, Any]:
    p: dict[str, Any] = {"namespace": spec.namespace, "key": spec.key, "kind": spec.kind, "payload": spec.payload}
    if spec.expected_version is not None:
        p["expected_version"] = spec.expected_version
    return p


class _Calls:
    """What both clients share: request bodies, idempotency, reply checking, results as models."""

    def __init__(
        self, endpoints: str | Sequence[str], *, api_key: str | None, timeout: float, retries: int, backoff: float
    ) -> None:
        self.endpoints = _endpoints(endpoints)
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._current = 0
        self.failovers = 0  # how many times a call moved to another endpoint or was resent

    def _request(self, action: str, payload: dict[str, Any], timeout: float) -> tuple[str, bytes]:
        rid = uuid.uuid4().hex
        body: dict[str, Any] = {"v": 1, "id": rid, "action": action, "payload": payload}
        if self.api_key:
            body["api_key"] = self.api_key
        body["timeout_ms"] = max(1, int(timeout * 1000))  # the server gives up when the client does
        return rid, json.dumps(body, separators=(",", ":")).encode("utf-8")

    def _attempts(self) -> int:
        return max(self.retries, len(self.endpoints) - 1) + 1

    def _delay(self, attempt: int, code: str) -> float:
        return delay(attempt, self.backoff, code)

    @staticmethod
    def _kind(action: str, payload: dict[str, Any]) -> CallKind:
        """What a repeat of the call could do (mfh_api.retry_policy)."""
        if action in _READS:
            return CallKind.READ
        if action == "put" and payload.get("expected_version") is None:
            return CallKind.WRITE
        if action == "batch_put" and all(p.get("expected_version") is None for p in payload["puts"]):
            return CallKind.WRITE
        return CallKind.CONDITIONAL

    @staticmethod
    def _reply(frames: list[bytes], rid: str) -> dict[str, Any] | None:
        """The reply to ``rid``, or None for a stale reply to an earlier attempt."""
        try:
            reply = json.loads(frames[-1])
        except ValueError:
            return None
        return reply if isinstance(reply, dict) and reply.get("id") == rid else None

    @staticmethod
    def _data(reply: dict[str, Any]) -> Any:
        if reply.get("status") == "ok":
            return reply.get("data")
        err = reply.get("error")
        raise exception_for_zmq(err if isinstance(err, dict) else {})

    @staticmethod
    def _retry_after(kind: CallKind, reply: dict[str, Any]) -> str | None:
        """The error code of an error reply that may be retried (see the module docstring), else None."""
        err = reply.get("error")
        code = str(err.get("code", "")) if isinstance(err, dict) else ""
        message = str(err.get("message", "")) if isinstance(err, dict) else ""
        return code if retryable(kind, code, message, answered_by_server=True) else None

    def _rotate(self) -> None:
        self.failovers += 1
        self._current = (self._current + 1) % len(self.endpoints)

    def _no_reply(self, action: str, timeout: float, attempts: int) -> MFHError:
        tried = ", ".join(self.endpoints)
        return DeadlineExceeded(f"no reply to {action} within {timeout:g} s ({attempts} attempt(s); {tried})")

    # -- arguments -> (action, payload) and data -> results ---------------------------------------

    @staticmethod
    def _put(spec: PutSpec, durability: Durability) -> dict[str, Any]:
        return {**_put_payload(spec), "durability": Durability(durability).value}

    @staticmethod
    def _batch_put(specs: Sequence[PutSpec], durability: Durability) -> dict[str, Any]:
        return {"puts": [_put_payload(s) for s in specs], "durability": Durability(durability).value}

    @staticmethod
    def _delete(namespace: str, key: str, expected_version: int | None, durability: Durability) -> dict[str, Any]:
        p: dict[str, Any] = {"namespace": namespace, "key": key, "durability": Durability(durability).value}
        if expected_version is not None:
            p["expected_version"] = expected_version
        return p

    @staticmethod
    def _list(namespace: str, kind: str | None, prefix: str, size: int, token: str, deleted: bool) -> dict[str, Any]:
        p: dict[str, Any] = {"namespace": namespace, "key_prefix": prefix, "page_size": size, "page_token": token}
        if kind:
            p["kind"] = kind
        if deleted:
            p["include_deleted"] = True
        return p

    @staticmethod
    def _result(data: dict[str, Any]) -> PutResult:
        return PutResult(version=int(data["version"]), event_id=str(data["event_id"]))

    @staticmethod
    def _records(data: dict[str, Any]) -> list[Record]:
        return [record_from_json(r) for r in data["records"]]


class ZmqClient(_Calls):
    """Blocking client; one per thread (ZeroMQ sockets are not thread-safe)."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.05,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        super().__init__(endpoints, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoints[self._current])
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Close the socket (the shared context stays)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def __enter__(self) -> ZmqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, action: str, payload: dict[str, Any], timeout: float | None = None) -> Any:
        """Send one v1 request and return its ``data``; raises the MFHError of an error reply."""
        t = timeout or self.timeout
        rid, body = self._request(action, payload, t)
        kind = self._kind(action, payload)
        attempts = self._attempts()
        for attempt in range(attempts):
            sock = self._socket()
            sock.send_multipart([b"", body])
            deadline = time.monotonic() + t
            reply = None
            while reply is None and (left := deadline - time.monotonic()) > 0:
                if sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    reply = self._reply(sock.recv_multipart(), rid)
            if reply is None:  # Lazy Pirate: this socket may hold a dead peer's queue; start afresh
                self.close()
                self._rotate()
                if attempt + 1 < attempts and retryable(kind, "NO_REPLY"):
                    continue
                raise self._no_reply(action, t, attempt + 1)
            code = self._retry_after(kind, reply) if reply.get("status") != "ok" else None
            if code is None or attempt + 1 >= attempts:
                return self._data(reply)
            self.close()  # the socket is connected to one endpoint: reopen it on the next one
            self._rotate()
            time.sleep(self._delay(attempt, code))
        raise self._no_reply(action, t, attempts)

    def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:
        """The live record; NotFound if absent or deleted."""
        return record_from_json(self.call("get", {"namespace": namespace, "key": key}, timeout)["record"])

    def batch_get(
        self, namespace: str, keys: Sequence[str], *, timeout: float | None = None
    ) -> tuple[list[Record], list[str]]:
        """(live records in request order, keys absent or deleted)."""
        data = self.call("batch_get", {"namespace": namespace, "keys": list(keys)}, timeout)
        return self._records(data), list(data["missing"])

    def put(
        self, spec: PutSpec, *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> PutResult:
        """Create or replace one record; VersionConflict if ``spec.expected_version`` does not match."""
        return self._result(self.call("put", self._put(spec, durability), timeout))

    def batch_put(
        self, specs: Sequence[PutSpec], *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> list[PutResult]:
        """Several puts, all or nothing; one result per put, in order."""
        data = self.call("batch_put", self._batch_put(specs, durability), timeout)
        return [self._result(r) for r in data["results"]]

    def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,
    ) -> PutResult:
        """Tombstone one record; NotFound if absent or already deleted."""
        return self._result(self.call("delete", self._delete(namespace, key, expected_version, durability), timeout))

    def list(
        self,
        namespace: str,
        *,
        kind: str | None = None,
        key_prefix: str = "",
        page_size: int = 100,
        page_token: str = "",
        include_deleted: bool = False,
        timeout: float | None = None,
    ) -> tuple[list[Record], str]:
        """One page (records, next page token; ``""`` on the last page)."""
        payload = self._list(namespace, kind, key_prefix, page_size, page_token, include_deleted)
        data = self.call("list", payload, timeout)
        return self._records(data), str(data["next_page_token"])


class AsyncZmqClient(_Calls):
    """asyncio client; one per event loop. Same methods as :class:`ZmqClient`, awaited.

    Concurrent calls on one client take turns (one socket, one request in flight); for parallel
    requests use several clients.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.05,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        super().__init__(endpoints, api_key=api_key, timeout=timeout, retries=retries, backoff=backoff)
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._turn = asyncio.Lock()

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoints[self._current])
            self._sock = sock
        return self._sock

    def close(self) -> None:
        """Close the socket (the shared context stays)."""
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> AsyncZmqClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def call(self, action: str, payload: dict[str, Any], timeout: float | None = None) -> Any:  # noqa: ASYNC109
        """Send one v1 request and return its ``data``; raises the MFHError of an error reply."""
        async with self._turn:  # a reply for another caller would otherwise be dropped as stale
            return await self._call(action, payload, timeout)

    async def _call(self, action: str, payload: dict[str, Any], timeout: float | None) -> Any:  # noqa: ASYNC109
        t = timeout or self.timeout
        rid, body = self._request(action, payload, t)
        kind = self._kind(action, payload)
        attempts = self._attempts()
        for attempt in range(attempts):
            sock = self._socket()
            await sock.send_multipart([b"", body])
            deadline = time.monotonic() + t
            reply = None
            while reply is None and (left := deadline - time.monotonic()) > 0:
                if await sock.poll(int(left * 1000) + 1):  # POLLIN by default
                    reply = self._reply(await sock.recv_multipart(), rid)
            if reply is None:  # Lazy Pirate: this socket may hold a dead peer's queue; start afresh
                self.close()
                self._rotate()
                if attempt + 1 < attempts and retryable(kind, "NO_REPLY"):
                    continue
                raise self._no_reply(action, t, attempt + 1)
            code = self._retry_after(kind, reply) if reply.get("status") != "ok" else None
            if code is None or attempt + 1 >= attempts:
                return self._data(reply)
            self.close()  # the socket is connected to one endpoint: reopen it on the next one
            self._rotate()
            await asyncio.sleep(self._delay(attempt, code))
        raise self._no_reply(action, t, attempts)

    async def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:  # noqa: ASYNC109
        """The live record; NotFound if absent or deleted."""
        return record_from_json((await self.call("get", {"namespace": namespace, "key": key}, timeout))["record"])

    async def batch_get(
        self,
        namespace: str,
        keys: Sequence[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[list[Record], list[str]]:
        """(live records in request order, keys absent or deleted)."""
        data = await self.call("batch_get", {"namespace": namespace, "keys": list(keys)}, timeout)
        return self._records(data), list(data["missing"])

    async def put(
        self,
        spec: PutSpec,
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        """Create or replace one record; VersionConflict if ``spec.expected_version`` does not match."""
        return self._result(await self.call("put", self._put(spec, durability), timeout))

    async def batch_put(
        self,
        specs: Sequence[PutSpec],
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[PutResult]:
        """Several puts, all or nothing; one result per put, in order."""
        data = await self.call("batch_put", self._batch_put(specs, durability), timeout)
        return [self._result(r) for r in data["results"]]

    async def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        """Tombstone one record; NotFound if absent or already deleted."""
        payload = self._delete(namespace, key, expected_version, durability)
        return self._result(await self.call("delete", payload, timeout))

    async def list(
        self,
        namespace: str,
        *,
        kind: str | None = None,
        key_prefix: str = "",
        page_size: int = 100,
        page_token: str = "",
        include_deleted: bool = False,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[list[Record], str]:
        """One page (records, next page token; ``""`` on the last page)."""
        payload = self._list(namespace, kind, key_prefix, page_size, page_token, include_deleted)
        data = await self.call("list", payload, timeout)
        return self._records(data), str(data["next_page_token"])
