"""The clients agents use: :class:`MemoryClient` / :class:`AsyncMemoryClient` (gRPC) and
:class:`ZmqClient` / :class:`AsyncZmqClient` (ZeroMQ), with the same methods and the same errors.

Each method is written once per flavour (blocking or asyncio): it builds a
:class:`~mfh_client.calls.Call` and hands it to the one retry loop, which asks the transport for
one attempt at a time and the :class:`~mfh_client.calls.RetryPolicy` whether to try again
(on another endpoint, when there are several).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from typing import Any, Protocol, TypeVar

from mfh_client import calls
from mfh_client.calls import Call, Endpoints, Failure, RetryPolicy, WatchResume
from mfh_client.transport_grpc import AsyncGrpcTransport, GrpcTransport
from mfh_client.transport_zmq import AsyncZmqTransport, ZmqTransport, zmq_endpoints
from mfh_client.types import Durability, MetadataFilter, PutResult, PutSpec, SearchHit
from mfh_models.records import Record, WatchedEvent

__all__ = ["AsyncClient", "AsyncMemoryClient", "AsyncZmqClient", "Client", "MemoryClient", "ZmqClient"]

T = TypeVar("T")
_Hits = list[SearchHit]
_Names = list[str]
_DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
#: How long a ZeroMQ Watch poll waits for a change before it is answered (then the client polls again).
_ZMQ_WATCH_WAIT_S = 2.0
#: One Watch stream on endpoint i, resuming after a sequence: (sequence, change) or (sequence, None), progress.
_Stream = Callable[[int, int | None], Generator[tuple[int, WatchedEvent | None]]]
_AsyncStream = Callable[[int, int | None], AsyncGenerator[tuple[int, WatchedEvent | None]]]


class SyncTransport(Protocol):
    def attempt(self, call: Call[Any], i: int, timeout: float) -> Any: ...
    def close(self) -> None: ...


class AsyncTransport(Protocol):
    async def attempt(self, call: Call[Any], i: int, timeout: float) -> Any: ...  # noqa: ASYNC109


class _Base:
    """Endpoints, timeout and retry policy; a subclass names its transport (``_connect``)."""

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 5.0,
        retries: int = 3,
        backoff: float = 0.05,
        cooldown: float = 2.0,
        **transport_options: Any,
    ) -> None:
        eps = self._addresses([endpoints] if isinstance(endpoints, str) else list(endpoints))
        self._endpoints = Endpoints(eps, cooldown=cooldown)
        self.endpoints = self._endpoints.addresses
        self.timeout = timeout
        self.policy = RetryPolicy(retries=retries, backoff=backoff)
        self.failovers = 0  # how many times a call was retried, on another endpoint when there is one
        self._connect(eps, api_key, **transport_options)

    @staticmethod
    def _addresses(endpoints: list[str]) -> list[str]:
        return endpoints

    def _connect(self, addresses: list[str], api_key: str | None, **options: Any) -> None:
        raise NotImplementedError

    def _retry(self, call: Call[Any], failure: Failure, i: int, attempt: int, attempts: int) -> float | None:
        """The pause before the next attempt, or None when ``failure`` is the answer."""
        if attempt + 1 >= attempts or not self.policy.retryable(call, failure):
            return None
        self.failovers += 1
        self._endpoints.failed(i)
        return self.policy.delay(attempt, failure)

    def _watch_pause(self, resume: WatchResume, failure: Failure, i: int) -> float:
        """The pause before a Watch opens its stream again; raises ``failure``'s error when it is the answer."""
        pause = resume.pause(failure, self.policy)
        if pause is None:
            raise failure.error from failure.__cause__
        self.failovers += 1
        self._endpoints.failed(i)
        return pause


class Client(_Base):
    """Blocking client over any transport; one per thread."""

    transport: SyncTransport

    def _run(self, call: Call[T], timeout: float | None) -> T:
        t = timeout or self.timeout
        attempts = self.policy.attempts(len(self.endpoints))
        for attempt in range(attempts):
            i = self._endpoints.pick()
            try:
                result: T = self.transport.attempt(call, i, t)
                return result
            except Failure as f:
                pause = self._retry(call, f, i, attempt, attempts)
                if pause is None:
                    raise f.error from f.__cause__
                time.sleep(pause)
        raise AssertionError("unreachable")

    def _watch(self, stream: _Stream, after: int | None, reconnect_for: float) -> Iterator[WatchedEvent]:
        """The one resume loop of the blocking clients: open ``stream`` after the newest sequence seen, again
        after a failure a read is retried on (on another endpoint, when there are several)."""
        resume = WatchResume(after, reconnect_for)
        while True:
            i = self._endpoints.pick()
            try:
                with contextlib.closing(stream(i, resume.after)) as events:  # closed at once: its call is cancelled
                    for seq, event in events:
                        resume.seen(seq)
                        if event is not None:
                            yield event
            except Failure as f:
                pause = self._watch_pause(resume, f, i)
                time.sleep(pause)

    def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:
        """The live record; NotFound if absent or deleted."""
        return self._run(calls.get(namespace, key), timeout)

    def batch_get(
        self, namespace: str, keys: Sequence[str], *, timeout: float | None = None
    ) -> tuple[list[Record], list[str]]:
        """(live records in request order, keys absent or deleted)."""
        return self._run(calls.batch_get(namespace, keys), timeout)

    def put(
        self, spec: PutSpec, *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> PutResult:
        """Create or replace one record; VersionConflict if ``spec.expected_version`` does not match."""
        return self._run(calls.put(spec, durability), timeout)

    def batch_put(
        self, specs: Sequence[PutSpec], *, durability: Durability = Durability.ACCEPTED, timeout: float | None = None
    ) -> list[PutResult]:
        """Several puts, all or nothing; one result per put, in order."""
        return self._run(calls.batch_put(specs, durability), timeout)

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
        return self._run(calls.delete(namespace, key, expected_version, durability), timeout)

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
        return self._run(calls.list_page(namespace, kind, key_prefix, page_size, page_token, include_deleted), timeout)

    def search(
        self,
        namespace: str = "",
        *,
        namespace_prefix: str = "",
        query: str = "",
        kinds: Sequence[str] = (),
        tags: Sequence[str] = (),
        metadata: Sequence[MetadataFilter | Sequence[Any]] = (),
        updated_after_ms: int | None = None,
        updated_before_ms: int | None = None,
        embedding: Sequence[float] = (),
        top_k: int = 10,
        timeout: float | None = None,
    ) -> _Hits:
        """Records of ``namespace`` (or at/below ``namespace_prefix``) passing the filters, best first
        (cosine with ``embedding``, else full-text rank of ``query``, else newest); see docs/api.md."""
        call = calls.search(
            namespace,
            namespace_prefix,
            query,
            kinds,
            tags,
            metadata,
            updated_after_ms,
            updated_before_ms,
            embedding,
            top_k,
        )
        return self._run(call, timeout)

    def list_namespaces(
        self,
        *,
        prefix: str = "",
        max_depth: int = 0,
        page_size: int = 100,
        page_token: str = "",
        timeout: float | None = None,
    ) -> tuple[_Names, str]:
        """One page of namespace names holding live records (names, next page token)."""
        return self._run(calls.list_namespaces(prefix, max_depth, page_size, page_token), timeout)

    def close(self) -> None:
        self.transport.close()

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_C = TypeVar("_C", bound=Client)
_A = TypeVar("_A", bound="AsyncClient")


class AsyncClient(_Base):
    """asyncio client over any transport; one per event loop. Same methods as :class:`Client`, awaited."""

    transport: AsyncTransport

    async def _run(self, call: Call[T], timeout: float | None) -> T:  # noqa: ASYNC109
        t = timeout or self.timeout
        attempts = self.policy.attempts(len(self.endpoints))
        for attempt in range(attempts):
            i = self._endpoints.pick()
            try:
                result: T = await self.transport.attempt(call, i, t)
                return result
            except Failure as f:
                pause = self._retry(call, f, i, attempt, attempts)
                if pause is None:
                    raise f.error from f.__cause__
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")

    async def _watch(
        self, stream: _AsyncStream, after: int | None, reconnect_for: float
    ) -> AsyncIterator[WatchedEvent]:
        """The one resume loop of the asyncio clients (as :meth:`Client._watch`)."""
        resume = WatchResume(after, reconnect_for)
        while True:
            i = self._endpoints.pick()
            try:
                async with contextlib.aclosing(stream(i, resume.after)) as events:
                    async for seq, event in events:
                        resume.seen(seq)
                        if event is not None:
                            yield event
            except Failure as f:
                pause = self._watch_pause(resume, f, i)
                await asyncio.sleep(pause)

    async def get(self, namespace: str, key: str, *, timeout: float | None = None) -> Record:  # noqa: ASYNC109
        """The live record; NotFound if absent or deleted."""
        return await self._run(calls.get(namespace, key), timeout)

    async def batch_get(
        self,
        namespace: str,
        keys: Sequence[str],
        *,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[list[Record], list[str]]:
        """(live records in request order, keys absent or deleted)."""
        return await self._run(calls.batch_get(namespace, keys), timeout)

    async def put(
        self,
        spec: PutSpec,
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> PutResult:
        """Create or replace one record; VersionConflict if ``spec.expected_version`` does not match."""
        return await self._run(calls.put(spec, durability), timeout)

    async def batch_put(
        self,
        specs: Sequence[PutSpec],
        *,
        durability: Durability = Durability.ACCEPTED,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> list[PutResult]:
        """Several puts, all or nothing; one result per put, in order."""
        return await self._run(calls.batch_put(specs, durability), timeout)

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
        return await self._run(calls.delete(namespace, key, expected_version, durability), timeout)

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
        call = calls.list_page(namespace, kind, key_prefix, page_size, page_token, include_deleted)
        return await self._run(call, timeout)

    async def search(
        self,
        namespace: str = "",
        *,
        namespace_prefix: str = "",
        query: str = "",
        kinds: Sequence[str] = (),
        tags: Sequence[str] = (),
        metadata: Sequence[MetadataFilter | Sequence[Any]] = (),
        updated_after_ms: int | None = None,
        updated_before_ms: int | None = None,
        embedding: Sequence[float] = (),
        top_k: int = 10,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> _Hits:
        """Records of ``namespace`` (or at/below ``namespace_prefix``) passing the filters, best first
        (cosine with ``embedding``, else full-text rank of ``query``, else newest); see docs/api.md."""
        call = calls.search(
            namespace,
            namespace_prefix,
            query,
            kinds,
            tags,
            metadata,
            updated_after_ms,
            updated_before_ms,
            embedding,
            top_k,
        )
        return await self._run(call, timeout)

    async def list_namespaces(
        self,
        *,
        prefix: str = "",
        max_depth: int = 0,
        page_size: int = 100,
        page_token: str = "",
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> tuple[_Names, str]:
        """One page of namespace names holding live records (names, next page token)."""
        return await self._run(calls.list_namespaces(prefix, max_depth, page_size, page_token), timeout)

    async def aclose(self) -> None:
        close = getattr(self.transport, "close", None)
        if close is not None:
            done = close()
            if asyncio.iscoroutine(done):
                await done

    async def __aenter__(self: _A) -> _A:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- gRPC --------------------------------------------------------------------------------------------


class MemoryClient(Client):
    """Blocking gRPC client: ``MemoryClient("127.0.0.1:5714")`` or several ``host:port`` for failover."""

    def _connect(self, addresses: list[str], api_key: str | None, **options: Any) -> None:
        """Options: ``max_message_bytes`` (default 4 MiB), sent and received; ``tls``
        (:class:`mfh_client.security.TlsConfig`) for a hub that serves TLS."""
        size = int(options.pop("max_message_bytes", _DEFAULT_MAX_MESSAGE))
        self.transport = self._grpc = GrpcTransport(addresses, api_key=api_key, max_message_bytes=size, **options)

    def watch(
        self, namespace: str, key_prefix: str = "", *, after_sequence: int | None = None, reconnect_for: float = 30.0
    ) -> Iterator[WatchedEvent]:
        """Changes as they are committed, each with its ``sequence``: after ``after_sequence`` (backfill, then
        live) or from now on. Resumes by itself after a reconnect or a failover, for up to ``reconnect_for``
        seconds of failures (docs/api.md, "Watch"); close the iterator (or break) to end it."""
        grpc = self._grpc
        return self._watch(lambda i, a: grpc.watch(i, namespace, key_prefix, a), after_sequence, reconnect_for)


class AsyncMemoryClient(AsyncClient):
    """asyncio gRPC client; ``async with AsyncMemoryClient([...]) as c:`` or call :meth:`close`."""

    def _connect(self, addresses: list[str], api_key: str | None, **options: Any) -> None:
        """Options: ``max_message_bytes`` (default 4 MiB), sent and received; ``tls``
        (:class:`mfh_client.security.TlsConfig`) for a hub that serves TLS."""
        size = int(options.pop("max_message_bytes", _DEFAULT_MAX_MESSAGE))
        self.transport = self._grpc = AsyncGrpcTransport(addresses, api_key=api_key, max_message_bytes=size, **options)

    def watch(
        self, namespace: str, key_prefix: str = "", *, after_sequence: int | None = None, reconnect_for: float = 30.0
    ) -> AsyncIterator[WatchedEvent]:
        """As :meth:`MemoryClient.watch`: ``async for ev in client.watch(...)``."""
        grpc = self._grpc
        return self._watch(lambda i, a: grpc.watch(i, namespace, key_prefix, a), after_sequence, reconnect_for)

    async def close(self) -> None:
        await self._grpc.close()


# -- ZeroMQ ------------------------------------------------------------------------------------------


class ZmqClient(Client):
    """Blocking ZeroMQ client: ``ZmqClient("tcp://127.0.0.1:5713")``; one per thread."""

    _addresses = staticmethod(zmq_endpoints)

    def _connect(self, addresses: list[str], api_key: str | None, **options: Any) -> None:
        """Options: ``context``, a ``zmq.Context`` (default: the process's shared one)."""
        self.transport = ZmqTransport(addresses, api_key=api_key, **options)
        self._watch_transport: Callable[[], ZmqTransport] = lambda: ZmqTransport(addresses, api_key=api_key, **options)

    def watch(
        self, namespace: str, key_prefix: str = "", *, after_sequence: int | None = None, reconnect_for: float = 30.0
    ) -> Iterator[WatchedEvent]:
        """As :meth:`MemoryClient.watch`, as long polls (the ``watch`` action) on a socket of its own."""
        transport = self._watch_transport()
        t, wait = self.timeout, _ZMQ_WATCH_WAIT_S
        try:
            yield from self._watch(
                lambda i, a: transport.watch(i, namespace, key_prefix, a, wait=wait, reply_s=t),
                after_sequence,
                reconnect_for,
            )
        finally:
            transport.close()


class AsyncZmqClient(AsyncClient):
    """asyncio ZeroMQ client; one per event loop. Concurrent calls on one client take turns."""

    _addresses = staticmethod(zmq_endpoints)

    def _connect(self, addresses: list[str], api_key: str | None, **options: Any) -> None:
        """Options: ``context``, a ``zmq.asyncio.Context`` (default: the process's shared one)."""
        self.transport = self._zmq = AsyncZmqTransport(addresses, api_key=api_key, **options)
        self._watch_transport: Callable[[], AsyncZmqTransport] = lambda: AsyncZmqTransport(
            addresses, api_key=api_key, **options
        )

    async def watch(
        self, namespace: str, key_prefix: str = "", *, after_sequence: int | None = None, reconnect_for: float = 30.0
    ) -> AsyncIterator[WatchedEvent]:
        """As :meth:`MemoryClient.watch`, as long polls on a socket of its own (the client's other calls go on)."""
        transport = self._watch_transport()
        t, wait = self.timeout, _ZMQ_WATCH_WAIT_S
        try:
            async for event in self._watch(
                lambda i, a: transport.watch(i, namespace, key_prefix, a, wait=wait, reply_s=t),
                after_sequence,
                reconnect_for,
            ):
                yield event
        finally:
            transport.close()

    def close(self) -> None:
        """Close the socket (the shared context stays)."""
        self._zmq.close()
