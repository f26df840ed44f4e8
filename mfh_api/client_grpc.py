"""gRPC clients for MFH: :class:`MemoryClient` (sync) and :class:`AsyncMemoryClient` (async).

Same methods, typed with the models; errors are the mfh_models exceptions. Several endpoints
("host:port") give failover: a retryable failure moves the call to the next one. The retry policy
is :mod:`mfh_api.retry_policy` (the same for every client; docs/api.md has the table).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from mfh_api.auth import API_KEY_METADATA
from mfh_api.errors import exception_for
from mfh_api.grpc_server import from_pb_record
from mfh_api.proto import pb, pb_grpc
from mfh_api.retry_policy import SERVER_ANSWER_METADATA, CallKind, delay, retryable
from mfh_api.service import Durability, PutResult, PutSpec
from mfh_models import InvalidArgument, MemoryEvent, Op, Record, canonical_json, event_id_for

__all__ = ["AsyncMemoryClient", "MemoryClient"]

T = TypeVar("T")


def _answered_by_server(e: grpc.RpcError) -> bool:
    try:
        md = e.trailing_metadata() or ()
    except Exception:  # an error raised before any call was made
        return False
    return any(item[0] == SERVER_ANSWER_METADATA for item in md if isinstance(item, tuple))


def _retryable(kind: CallKind, e: grpc.RpcError) -> bool:
    code = e.code()
    return retryable(kind, code.name, e.details() or "", answered_by_server=_answered_by_server(e))


def _code(e: grpc.RpcError) -> str:
    return str(e.code().name)


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    request: Any
    retry: CallKind
    convert: Callable[[Any], T]


def _durability(d: Durability) -> Any:
    return pb.DURABILITY_PERSISTED if d is Durability.PERSISTED else pb.DURABILITY_ACCEPTED


def _put_request(spec: PutSpec) -> Any:
    payload = spec.payload if isinstance(spec.payload, str) else canonical_json(spec.payload)
    req = pb.PutRequest(record=pb.Record(namespace=spec.namespace, key=spec.key, kind=spec.kind, payload_json=payload))
    if spec.expected_version is not None:
        req.expected_version = spec.expected_version
    return req


def _result(m: Any) -> PutResult:
    return PutResult(version=int(m.version), event_id=str(m.event_id))


def _get(namespace: str, key: str) -> _Call[Record]:
    req = pb.GetRequest(namespace=namespace, key=key)
    return _Call("Get", req, CallKind.READ, lambda m: from_pb_record(m.record))


def _batch_get(namespace: str, keys: Sequence[str]) -> _Call[tuple[list[Record], list[str]]]:
    req = pb.BatchGetRequest(namespace=namespace, keys=list(keys))
    return _Call("BatchGet", req, CallKind.READ, lambda m: ([from_pb_record(r) for r in m.records], list(m.missing)))


def _put(spec: PutSpec, durability: Durability) -> _Call[PutResult]:
    req = _put_request(spec)
    req.durability = _durability(durability)
    retry = CallKind.WRITE if spec.expected_version is None else CallKind.CONDITIONAL
    return _Call("Put", req, retry, _result)


def _batch_put(specs: Sequence[PutSpec], durability: Durability) -> _Call[list[PutResult]]:
    req = pb.BatchPutRequest(puts=[_put_request(s) for s in specs], durability=_durability(durability))
    retry = CallKind.WRITE if all(s.expected_version is None for s in specs) else CallKind.CONDITIONAL
    return _Call("BatchPut", req, retry, lambda m: [_result(r) for r in m.results])


def _delete(namespace: str, key: str, expected_version: int | None, durability: Durability) -> _Call[PutResult]:
    req = pb.DeleteRequest(namespace=namespace, key=key, durability=_durability(durability))
    if expected_version is not None:
        req.expected_version = expected_version
    return _Call("Delete", req, CallKind.CONDITIONAL, _result)


def _list(
    namespace: str, kind: str | None, key_prefix: str, page_size: int, page_token: str, include_deleted: bool
) -> _Call[tuple[list[Record], str]]:
    req = pb.ListRequest(
        namespace=namespace,
        kind=kind or "",
        key_prefix=key_prefix,
        page_size=page_size,
        page_token=page_token,
        include_deleted=include_deleted,
    )
    return _Call("List", req, CallKind.READ, lambda m: ([from_pb_record(r) for r in m.records], m.next_page_token))


def _event(m: Any) -> MemoryEvent:
    rec = from_pb_record(m.record)
    return MemoryEvent.model_construct(
        event_id=m.event_id or event_id_for(rec.origin, rec.version),
        op=Op(m.op),
        namespace=rec.namespace,
        key=rec.key,
        kind=rec.kind,
        payload=rec.payload,
        version=rec.version,
        origin=rec.origin,
        created_at=rec.updated_at,
        schema_version=rec.schema_version,
    )


class _Base:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.05,
        max_message_bytes: int = 4 * 1024 * 1024,
        cooldown: float = 2.0,
    ) -> None:
        eps = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not eps:
            raise InvalidArgument("at least one endpoint (host:port) is required")
        self.endpoints = eps
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._metadata: tuple[tuple[str, str], ...] = ((API_KEY_METADATA, api_key),) if api_key else ()
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self.cooldown = cooldown
        self._current = 0
        self._down_until = [0.0] * len(eps)
        self.failovers = 0  # how many times a call was retried, on another endpoint when there is one

    def _attempts(self) -> int:
        return max(self.retries, len(self.endpoints) - 1) + 1

    def _pick(self) -> int:
        """The current endpoint unless it failed recently; else the next healthy one (else the soonest back)."""
        now = time.monotonic()
        n = len(self.endpoints)
        for step in range(n):
            i = (self._current + step) % n
            if self._down_until[i] <= now:
                self._current = i
                return i
        self._current = min(range(n), key=lambda i: self._down_until[i])
        return self._current

    def _failed(self, i: int) -> None:
        """Concurrent calls that fail on one endpoint all move off it (and none moves back to it)."""
        self.failovers += 1
        if len(self.endpoints) > 1:
            self._down_until[i] = time.monotonic() + self.cooldown

    def _delay(self, attempt: int, code: str) -> float:
        return delay(attempt, self.backoff, code)


class AsyncMemoryClient(_Base):
    """Async gRPC client; use ``async with AsyncMemoryClient([...]) as c:`` or call :meth:`close`."""

    def __init__(self, endpoints: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self._stubs: dict[int, tuple[grpc.aio.Channel, Any]] = {}

    def _stub(self, i: int) -> Any:
        if i not in self._stubs:
            ch = grpc.aio.insecure_channel(self.endpoints[i], options=self._options)
            self._stubs[i] = (ch, pb_grpc.MemoryFusionStub(ch))
        return self._stubs[i][1]

    async def _run(self, call: _Call[T], timeout: float | None) -> T:  # noqa: ASYNC109
        t = timeout or self.timeout
        attempts = self._attempts()
        for attempt in range(attempts):
            i = self._pick()
            try:
                reply = await getattr(self._stub(i), call.method)(call.request, timeout=t, metadata=self._metadata)
                return call.convert(reply)
            except grpc.aio.AioRpcError as e:
                if attempt + 1 < attempts and _retryable(call.retry, e):
                    self._failed(i)
                    await asyncio.sleep(self._delay(attempt, _code(e)))
                    continue
                raise exception_for(e.code(), e.details() or "") from e
        raise AssertionError("unreachable")

    async def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:  # noqa: ASYNC109
        return await self._run(_get(namespace, key), timeout)

    async def batch_get(
        self,
        namespace: str,
        keys: Sequence[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[list[Record], list[str]]:
        return await self._run(_batch_get(namespace, keys), timeout)

    async def put(
        self,
        spec: PutSpec,
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        return await self._run(_put(spec, durability), timeout)

    async def batch_put(
        self,
        specs: Sequence[PutSpec],
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[PutResult]:
        return await self._run(_batch_put(specs, durability), timeout)

    async def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        return await self._run(_delete(namespace, key, expected_version, durability), timeout)

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
        return await self._run(_list(namespace, kind, key_prefix, page_size, page_token, include_deleted), timeout)

    async def watch(self, namespace: str, key_prefix: str = "") -> AsyncIterator[MemoryEvent]:
        """Changes as they are persisted; no retry (re-list and re-watch after an error)."""
        call = self._stub(self._pick()).Watch(
            pb.WatchRequest(namespace=namespace, key_prefix=key_prefix), metadata=self._metadata
        )
        try:
            async for m in call:
                yield _event(m)
        except grpc.aio.AioRpcError as e:
            raise exception_for(e.code(), e.details() or "") from e
        finally:
            call.cancel()

    async def close(self) -> None:
        for ch, _ in self._stubs.values():
            await ch.close(None)
        self._stubs.clear()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class MemoryClient(_Base):
    """Blocking gRPC client with the same methods as :class:`AsyncMemoryClient`."""

    def __init__(self, endpoints: str | Sequence[str], **kwargs: Any) -> None:
        super().__init__(endpoints, **kwargs)
        self._stubs: dict[int, tuple[grpc.Channel, Any]] = {}

    def _stub(self, i: int) -> Any:
        if i not in self._stubs:
            ch = grpc.insecure_channel(self.endpoints[i], options=self._options)
            self._stubs[i] = (ch, pb_grpc.MemoryFusionStub(ch))
        return self._stubs[i][1]

    def _run(self, call: _Call[T], timeout: float | None) -> T:
        t = timeout or self.timeout
        attempts = self._attempts()
        for attempt in range(attempts):
            i = self._pick()
            try:
                reply = getattr(self._stub(i), call.method)(call.request, timeout=t, metadata=self._metadata)
                return call.convert(reply)
            except grpc.RpcError as e:
                if attempt + 1 < attempts and _retryable(call.retry, e):
                    self._failed(i)
                    time.sleep(self._delay(attempt, _code(e)))
                    continue
                raise exception_for(e.code(), e.details() or "") from e
        raise AssertionError("unreachable")

    def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:
        return self._run(_get(namespace, key), timeout)

    def batch_get(
        self, namespace: str, keys: Sequence[str], *, timeout: float | None = None
    ) -> tuple[list[Record], list[str]]:
        return self._run(_batch_get(namespace, keys), timeout)

    def put(
        self, spec: PutSpec, *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> PutResult:
        return self._run(_put(spec, durability), timeout)

    def batch_put(
        self, specs: Sequence[PutSpec], *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> list[PutResult]:
        return self._run(_batch_put(specs, durability), timeout)

    def delete(
        self,
        namespace: str,
        key: str,
        *,
        expected_version: int | None = None,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,
    ) -> PutResult:
        return self._run(_delete(namespace, key, expected_version, durability), timeout)

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
        return self._run(_list(namespace, kind, key_prefix, page_size, page_token, include_deleted), timeout)

    def watch(self, namespace: str, key_prefix: str = "") -> Iterator[MemoryEvent]:
        """Changes as they are persisted; close the iterator (or break) to cancel the stream."""
        call = self._stub(self._pick()).Watch(
            pb.WatchRequest(namespace=namespace, key_prefix=key_prefix), metadata=self._metadata
        )
        try:
            for m in call:
                yield _event(m)
        except grpc.RpcError as e:
            raise exception_for(e.code(), e.details() or "") from e
        finally:
            call.cancel()

    def close(self) -> None:
        for ch, _ in self._stubs.values():
            ch.close()
        self._stubs.clear()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
