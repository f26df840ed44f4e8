"""The gRPC transport: a :class:`~mfh_client.calls.Call` as a protobuf request, the reply as a result.

One table maps each call to its method, its request and its result; the sync and async
transports differ only in the channel they send it on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable, Generator, Mapping, Sequence
from typing import Any, Final

import grpc

from mfh_client.calls import Call, Failure
from mfh_client.codecs import event_from_pb, from_pb_record
from mfh_client.codes import exception_for
from mfh_client.proto import pb, pb_grpc
from mfh_client.retry import SERVER_ANSWER_METADATA
from mfh_client.security import TlsConfig
from mfh_client.types import API_KEY_METADATA, Durability, PutResult, SearchHit
from mfh_models.canonical import canonical_json
from mfh_models.records import WatchedEvent

__all__ = ["AsyncGrpcTransport", "GrpcTransport", "failure_of", "watch_request"]

#: What one Watch stream yields: (sequence, the change), or (sequence, None) for a progress event.
Watched = tuple[int, WatchedEvent | None]


def _answered_by_server(e: grpc.RpcError) -> bool:
    try:
        md = e.trailing_metadata() or ()
    except Exception:  # an error raised before any call was made
        return False
    return any(item[0] == SERVER_ANSWER_METADATA for item in md if isinstance(item, tuple))


def failure_of(e: grpc.RpcError) -> Failure:
    """Classify one failed attempt for the retry policy."""
    code, details = e.code(), e.details() or ""
    return Failure(exception_for(code, details), code.name, details, answered_by_server=_answered_by_server(e))


def _durability(d: Durability) -> Any:
    return pb.DURABILITY_PERSISTED if d is Durability.PERSISTED else pb.DURABILITY_ACCEPTED


def _pb_put(a: Mapping[str, Any]) -> Any:
    payload = a["payload"] if isinstance(a["payload"], str) else canonical_json(a["payload"])
    rec = pb.Record(namespace=a["namespace"], key=a["key"], kind=a["kind"], payload_json=payload)
    req = pb.PutRequest(record=rec, ttl_seconds=a.get("ttl_seconds") or 0)
    if a["expected_version"] is not None:
        req.expected_version = a["expected_version"]
    return req


def _search_request(a: Mapping[str, Any]) -> Any:
    f = a["filters"]
    filters = pb.SearchFilters(
        kinds=f["kinds"],
        tags=f["tags"],
        metadata=[
            pb.MetadataFilter(field=c["field"], op=c["op"], value_json=json.dumps(c["value"])) for c in f["metadata"]
        ],
    )
    if f["updated_after_ms"] is not None:
        filters.updated_after_ms = f["updated_after_ms"]
    if f["updated_before_ms"] is not None:
        filters.updated_before_ms = f["updated_before_ms"]
    return pb.SearchRequest(
        namespace=a["namespace"],
        namespace_prefix=a["namespace_prefix"],
        query=a["query"],
        filters=filters,
        embedding=a["embedding"],
        top_k=a["top_k"],
    )


def _hits(m: Any) -> list[SearchHit]:
    return [SearchHit(record=from_pb_record(h.record), score=h.score) for h in m.hits]


def _put_request(a: Mapping[str, Any]) -> Any:
    req = _pb_put(a)
    req.durability = _durability(a["durability"])
    return req


def _delete_request(a: Mapping[str, Any]) -> Any:
    req = pb.DeleteRequest(namespace=a["namespace"], key=a["key"], durability=_durability(a["durability"]))
    if a["expected_version"] is not None:
        req.expected_version = a["expected_version"]
    return req


def _result(m: Any) -> PutResult:
    return PutResult(version=int(m.version), event_id=str(m.event_id))


def _records(m: Any) -> list[Any]:
    return [from_pb_record(r) for r in m.records]


#: op -> (gRPC method, request builder, result from the reply)
_METHODS: Final[dict[str, tuple[str, Callable[[Mapping[str, Any]], Any], Callable[[Any], Any]]]] = {
    "get": ("Get", lambda a: pb.GetRequest(namespace=a["namespace"], key=a["key"]), lambda m: from_pb_record(m.record)),
    "batch_get": (
        "BatchGet",
        lambda a: pb.BatchGetRequest(namespace=a["namespace"], keys=a["keys"]),
        lambda m: (_records(m), list(m.missing)),
    ),
    "put": ("Put", _put_request, _result),
    "batch_put": (
        "BatchPut",
        lambda a: pb.BatchPutRequest(puts=[_pb_put(p) for p in a["puts"]], durability=_durability(a["durability"])),
        lambda m: [_result(r) for r in m.results],
    ),
    "delete": ("Delete", _delete_request, _result),
    "list": ("List", lambda a: pb.ListRequest(**a), lambda m: (_records(m), m.next_page_token)),
    "search": ("Search", _search_request, _hits),
    "list_namespaces": (
        "ListNamespaces",
        lambda a: pb.ListNamespacesRequest(**a),
        lambda m: (list(m.namespaces), m.next_page_token),
    ),
}


def watch_request(namespace: str, key_prefix: str, after_sequence: int | None) -> Any:
    """A WatchRequest that asks for progress events (so a client always knows where to resume)."""
    req = pb.WatchRequest(namespace=namespace, key_prefix=key_prefix, send_progress=True)
    if after_sequence is not None:
        req.after_sequence = after_sequence
    return req


def _watched(m: Any) -> Watched:
    return int(m.sequence), event_from_pb(m) if m.HasField("record") else None


class _Channels:
    """What both gRPC transports hold: addresses, metadata, channel options."""

    def __init__(
        self, addresses: Sequence[str], *, api_key: str | None, max_message_bytes: int, tls: TlsConfig | None = None
    ) -> None:
        self.addresses = list(addresses)
        self.metadata: tuple[tuple[str, str], ...] = ((API_KEY_METADATA, api_key),) if api_key else ()
        self.options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            *(tls.channel_options() if tls else []),
        ]
        self.credentials = tls.credentials() if tls else None  # read once: a missing file fails here

    def channel(self, i: int) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(self.addresses[i], options=self.options)
        return grpc.secure_channel(self.addresses[i], self.credentials, options=self.options)

    def aio_channel(self, i: int) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.addresses[i], options=self.options)
        return grpc.aio.secure_channel(self.addresses[i], self.credentials, options=self.options)


class GrpcTransport(_Channels):
    """Blocking gRPC: one channel per endpoint, opened on first use."""

    def __init__(
        self, addresses: Sequence[str], *, api_key: str | None, max_message_bytes: int, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(addresses, api_key=api_key, max_message_bytes=max_message_bytes, tls=tls)
        self._stubs: dict[int, tuple[grpc.Channel, Any]] = {}

    def stub(self, i: int) -> Any:
        if i not in self._stubs:
            ch = self.channel(i)
            self._stubs[i] = (ch, pb_grpc.MemoryFusionStub(ch))
        return self._stubs[i][1]

    def attempt(self, call: Call[Any], i: int, timeout: float) -> Any:
        method, build, convert = _METHODS[call.op]
        try:
            reply = getattr(self.stub(i), method)(build(call.args), timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise failure_of(e) from e
        return convert(reply)

    def watch(self, i: int, namespace: str, key_prefix: str, after_sequence: int | None) -> Generator[Watched]:
        """One Watch stream on endpoint ``i``; a failure is raised as a :class:`Failure`."""
        call = self.stub(i).Watch(watch_request(namespace, key_prefix, after_sequence), metadata=self.metadata)
        try:
            for m in call:
                yield _watched(m)
        except grpc.RpcError as e:
            raise failure_of(e) from e
        finally:
            call.cancel()

    def close(self) -> None:
        for ch, _ in self._stubs.values():
            ch.close()
        self._stubs.clear()


class AsyncGrpcTransport(_Channels):
    """grpc.aio: one channel per endpoint, opened on first use (inside the caller's event loop)."""

    def __init__(
        self, addresses: Sequence[str], *, api_key: str | None, max_message_bytes: int, tls: TlsConfig | None = None
    ) -> None:
        super().__init__(addresses, api_key=api_key, max_message_bytes=max_message_bytes, tls=tls)
        self._stubs: dict[int, tuple[grpc.aio.Channel, Any]] = {}

    def stub(self, i: int) -> Any:
        if i not in self._stubs:
            ch = self.aio_channel(i)
            self._stubs[i] = (ch, pb_grpc.MemoryFusionStub(ch))
        return self._stubs[i][1]

    async def attempt(self, call: Call[Any], i: int, timeout: float) -> Any:  # noqa: ASYNC109
        method, build, convert = _METHODS[call.op]
        try:
            reply = await getattr(self.stub(i), method)(build(call.args), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError as e:
            raise failure_of(e) from e
        return convert(reply)

    async def watch(
        self, i: int, namespace: str, key_prefix: str, after_sequence: int | None
    ) -> AsyncGenerator[Watched]:
        """One Watch stream on endpoint ``i``; a failure is raised as a :class:`Failure`."""
        call = self.stub(i).Watch(watch_request(namespace, key_prefix, after_sequence), metadata=self.metadata)
        try:
            async for m in call:
                yield _watched(m)
        except grpc.aio.AioRpcError as e:
            raise failure_of(e) from e
        finally:
            call.cancel()

    async def close(self) -> None:
        for ch, _ in self._stubs.values():
            await ch.close(None)
        self._stubs.clear()
