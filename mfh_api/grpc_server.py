"""grpc.aio server for ``mfh.v1.MemoryFusion``, plus the standard health service and reflection.

When a key is configured, an interceptor checks it before any handler runs (UNAUTHENTICATED).
Unary calls and streams have separate capacity (docs/operations.md): at most
``server.max_concurrent_rpcs`` unary calls run at once, counted here, and open streams (Watch,
health Watch, reflection) are capped per api and per connection, so idle streams never take a
unary call's slot; grpc's own ``maximum_concurrent_rpcs`` is only the sum of both, a backstop.
Requests are parsed by a deserializer that turns malformed protobuf into INVALID_ARGUMENT
instead of an opaque INTERNAL. Each RPC gets the client's deadline, or ``server.deadline_seconds``
when the client set none; errors come from the one table in :mod:`mfh_api.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, NoReturn, TypeVar

import grpc
from grpc_health.v1 import _async as health_aio  # the class `health.aio` re-exports
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from mfh_api.auth import read_file
from mfh_api.grpc_guard import Guard, GuardedRegistrar
from mfh_api.keys import OPEN, Grant, KeyRing, count_refusal
from mfh_api.limits import PeerSlots
from mfh_api.search import SearchSpec, parse_metadata_filter
from mfh_api.service import Durability, MemoryService, PutSpec
from mfh_client.codecs import from_pb_record, to_pb_record
from mfh_client.codes import INTERNAL_MESSAGE, grpc_status
from mfh_client.proto import pb, pb_grpc
from mfh_client.retry import SERVER_ANSWER_METADATA
from mfh_client.types import API_KEY_METADATA
from mfh_core.metrics import API_LATENCY, API_REQUESTS
from mfh_models import (
    SCHEMA_VERSION,
    DeadlineExceeded,
    InvalidArgument,
    Kind,
    MemoryEvent,
    MFHError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Settings,
    Unauthenticated,
    Unavailable,
)

__all__ = ["SERVICE_NAME", "GrpcServer", "MemoryFusionServicer", "from_pb_record", "to_pb_record"]

log = logging.getLogger("mfh.grpc")

SERVICE_NAME: Final = pb.DESCRIPTOR.services_by_name["MemoryFusion"].full_name
_AUTH_EXEMPT: Final = ("/grpc.health.v1.Health/",)  # load balancers probe without a key
_NO_DEADLINE: Final = 1e6  # grpc reports "no deadline" as None or a huge number
_SHUTTING_DOWN: Final = "server is shutting down; retry on another replica (nothing was done)"
_WATCH_SHUTTING_DOWN: Final = "server is shutting down; watch again on another replica, after the last sequence seen"
#: While draining, the close waits until no call has arrived for this long (clients have moved to another
#: replica), at most ``_DRAIN_QUIET_MAX_S``: gRPC's close cancels every call that reached the server but
#: not yet its handler, so it is left until the callers have gone.
_DRAIN_QUIET_S: Final = 0.15
_DRAIN_QUIET_MAX_S: Final = 3.0
_MARGIN: Final = 0.05  # answer with our own DEADLINE_EXCEEDED message before grpc cancels the call
#: grpc-level slots beyond our own caps, for calls being refused (a stream over its cap holds one briefly).
_SPARE_RPCS: Final = 64
R = TypeVar("R")
_KINDS: Final = frozenset(k.value for k in Kind)
_GET_REQUEST: Final = pb.GetRequest


@functools.cache
def _latency(method: str) -> Any:
    return API_LATENCY.labels("grpc", method)  # labels() takes a lock: resolve each child once


@functools.cache
def _ok_count(method: str) -> Any:
    return API_REQUESTS.labels("grpc", method, "OK")


_GET_OK: Final = _ok_count("Get")
_GET_LATENCY: Final = _latency("Get")


def _spec(put: Any) -> PutSpec:
    r = put.record
    if r.schema_version not in (0, SCHEMA_VERSION):
        raise InvalidArgument(f"schema_version {r.schema_version} is not supported (this server: {SCHEMA_VERSION})")
    expected = put.expected_version if put.HasField("expected_version") else None
    return PutSpec(
        namespace=r.namespace,
        key=r.key,
        kind=r.kind,
        payload=r.payload_json,
        expected_version=expected,
        ttl_seconds=put.ttl_seconds or None,
    )


def _search_spec(r: Any) -> SearchSpec:
    f = r.filters
    return SearchSpec(
        namespace=r.namespace,
        namespace_prefix=r.namespace_prefix,
        query=r.query,
        kinds=list(f.kinds),
        tags=list(f.tags),
        metadata=[parse_metadata_filter(m.field, m.op, m.value_json) for m in f.metadata],
        updated_after_ms=f.updated_after_ms if f.HasField("updated_after_ms") else None,
        updated_before_ms=f.updated_before_ms if f.HasField("updated_before_ms") else None,
        embedding=list(r.embedding),
        top_k=r.top_k,
    )


def _visible(grant: Grant, r: Any) -> Callable[[str], bool] | None:
    """A Search's namespace filter for ``grant`` (None: all in its scope are visible); PermissionDenied."""
    if r.namespace or not r.namespace_prefix:  # one namespace (or neither: the service says which to set)
        if r.namespace:
            grant.require(r.namespace)
        return None
    return grant.require_subtree(r.namespace_prefix)


def _durability(value: int, field: str = "durability") -> Durability:
    """proto3 enums are open: an unknown number arrives as itself and is refused, not read as ACCEPTED."""
    if value == pb.DURABILITY_PERSISTED:
        return Durability.PERSISTED
    if value in (pb.DURABILITY_UNSPECIFIED, pb.DURABILITY_ACCEPTED):
        return Durability.ACCEPTED
    allowed = ", ".join(f"{name} ({number})" for name, number in pb.Durability.items())
    raise InvalidArgument(f"{field} {value} is not a known Durability; expected one of {allowed}")


class _Malformed:
    """Stands in for a request whose bytes did not parse; the handler answers INVALID_ARGUMENT."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:
            return _Malformed(f"{type(e).__name__}: {e}")

    return parse


def _rebuild(handler: Any, behavior: Any) -> Any:
    """A handler of the same shape as ``handler`` running ``behavior``; a denied call never parses the request."""
    des = None
    ser = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behavior or handler.stream_stream, des, ser)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behavior or handler.stream_unary, des, ser)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behavior or handler.unary_stream, des, ser)
    return grpc.unary_unary_rpc_method_handler(behavior or handler.unary_unary, des, ser)


def _serializer(inner: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """``inner``, except that an answer already encoded (the near cache keeps Get answers so) is sent as is."""

    def serialize(message: Any) -> bytes:
        return message if type(message) is bytes else inner(message)

    return serialize


def _method_handlers(servicer: MemoryFusionServicer) -> dict[str, Any]:
    """Like the generated ``add_MemoryFusionServicer_to_server``, with request parsing that cannot fail."""
    handlers: dict[str, Any] = {}
    for m in pb.DESCRIPTOR.services_by_name["MemoryFusion"].methods:
        req, resp = getattr(pb, m.input_type.name), getattr(pb, m.output_type.name)
        make = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = make(
            getattr(servicer, m.name),
            request_deserializer=_safe(req.FromString),
            response_serializer=_serializer(resp.SerializeToString),
        )
    return handlers


def _get_response(rec: Any) -> bytes:
    """A Get answer as protobuf bytes: what the near cache keeps for gRPC."""
    return bytes(pb.GetResponse(record=to_pb_record(rec)).SerializeToString())


def _presented(metadata: Any) -> str | None:
    return next((v for k, v in metadata or () if k == API_KEY_METADATA), None)


class _Gate(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """The API key, looked up by its hash before any handler runs (health probes are exempt); what the key
    may touch is checked by each handler, which knows the namespaces (PERMISSION_DENIED)."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if self.keys.required and not method.startswith(_AUTH_EXEMPT):
            try:
                self.keys.authenticate(_presented(details.invocation_metadata), "grpc")
            except Unauthenticated as e:
                message = e.message
                name = method.rsplit("/", 1)[-1]

                async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
                    API_REQUESTS.labels("grpc", name, "UNAUTHENTICATED").inc()
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

                return _rebuild(handler, behavior=deny)  # type: ignore[no-any-return]
        return handler


class MemoryFusionServicer(pb_grpc.MemoryFusionServicer):  # type: ignore[misc]
    """Translates protobuf to service calls; every call goes through :meth:`_call`."""

    def __init__(
        self,
        service: MemoryService,
        settings: Settings,
        *,
        streams: PeerSlots | None = None,
        keys: KeyRing | None = None,
    ) -> None:
        s = settings.server
        self.service = service
        self.keys = keys if keys is not None else KeyRing.from_settings(settings)
        self.deadline = s.deadline_seconds
        self.max_unary = s.max_concurrent_rpcs
        self.unary_in_flight = 0  # unary calls running now (capped; the shutdown waits for them)
        self.streams = streams or PeerSlots(
            "open streams", max_total=s.max_streams, max_per_peer=s.max_streams_per_peer
        )
        self.watch_idle = s.watch_idle_seconds
        self.watch_lifetime = s.watch_max_lifetime_seconds
        self.draining = False  # shutting down: new calls are answered UNAVAILABLE (clients fail over)
        self._idle = asyncio.Event()
        self._closing = asyncio.Event()  # set by drain(): open Watch streams end UNAVAILABLE
        self._last_arrival = 0.0  # loop time of the last call that arrived while draining
        self.drain_quiet_s, self.drain_quiet_max_s = _DRAIN_QUIET_S, _DRAIN_QUIET_MAX_S

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - the shutdown's grace period
        """From now on answer UNAVAILABLE and end the open Watch streams (UNAVAILABLE: watch again
        elsewhere); wait (up to ``timeout`` s) for the calls already running, then until no call has
        arrived for ``drain_quiet_s`` (at most ``drain_quiet_max_s``), so that the close that follows
        finds no call that reached the server and has not been answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.draining = True
        self._closing.set()
        self._last_arrival = loop.time()
        if self.unary_in_flight > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout)
        quiet_until = min(deadline, loop.time() + self.drain_quiet_max_s)
        while (now := loop.time()) < quiet_until:
            quiet_for = now - self._last_arrival
            if quiet_for >= self.drain_quiet_s:
                break
            await asyncio.sleep(min(self.drain_quiet_s - quiet_for, quiet_until - now))

    def _grant(self, context: grpc.aio.ServicerContext[Any, Any]) -> Grant:
        """What the call's key may do (the gate let it in; a key removed since then is refused now)."""
        if not self.keys.required:
            return OPEN
        return self.keys.authenticate(_presented(context.invocation_metadata()), "grpc")

    async def _call(
        self, name: str, request: Any, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[float], Awaitable[R]]
    ) -> R:
        start = time.perf_counter()
        status: tuple[grpc.StatusCode, str]
        counted = False
        try:
            if self.draining:
                self._last_arrival = asyncio.get_running_loop().time()
                raise Unavailable(_SHUTTING_DOWN)
            if self.unary_in_flight >= self.max_unary:  # streams are counted apart (self.streams)
                raise ResourceExhausted(f"too many calls in flight ({self.max_unary}); retry shortly")
            self.unary_in_flight += 1
            counted = True
            if isinstance(request, _Malformed):
                raise InvalidArgument(f"malformed {name}Request: {request.error}")
            remaining = context.time_remaining()
            budget = self.deadline if remaining is None or remaining > _NO_DEADLINE else remaining
            try:
                async with asyncio.timeout(budget):
                    return await fn(max(budget - _MARGIN, 0.0))
            except TimeoutError:
                raise DeadlineExceeded(f"{name} did not finish within {budget:.3g}s") from None
        except MFHError as e:
            if isinstance(e, PermissionDenied):
                count_refusal("grpc", e.reason)
            status = grpc_status(e)
        except asyncio.CancelledError:  # the client went away or its deadline passed
            API_REQUESTS.labels("grpc", name, "CANCELLED").inc()
            raise
        except Exception:
            log.exception("%s failed", name)
            status = (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        finally:
            if counted:
                self.unary_in_flight -= 1
                if self.draining and self.unary_in_flight == 0:
                    self._idle.set()
            elapsed = time.perf_counter() - start
            _latency(name).observe(elapsed)
        API_REQUESTS.labels("grpc", name, status[0].name).inc()
        await _abort(context, status)

    async def Get(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        probed = type(request) is _GET_REQUEST and not self.draining
        if probed and self.keys.required:  # the near cache answers only what the key may read
            grant = self.keys.grant(_presented(context.invocation_metadata()))
            probed = grant is not None and grant.can_read(request.namespace)
        if probed:
            # A near-cache hit: no I/O, no slot to hold, the answer already encoded.
            start = time.perf_counter()
            try:
                hit = self.service.cached_answer(request.namespace, request.key, "grpc", _get_response)
            except NotFound:  # a cached absence: answered through _call below, from the cache again
                hit, probed = None, False
            if hit is not None:
                _GET_OK.inc()
                _GET_LATENCY.observe(time.perf_counter() - start)
                return hit

        async def run(_t: float) -> Any:
            self._grant(context).require(request.namespace)
            return await self.service.get_answer(request.namespace, request.key, "grpc", _get_response, probed=probed)

        return await self._ok("Get", request, context, run)

    async def BatchGet(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(_t: float) -> Any:
            self._grant(context).require(request.namespace)
            found, missing = await self.service.batch_get(request.namespace, list(request.keys))
            return pb.BatchGetResponse(records=[to_pb_record(r) for r in found], missing=missing)

        return await self._ok("BatchGet", request, context, run)

    async def Put(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(t: float) -> Any:
            self._grant(context).require(request.record.namespace, write=True)
            res = await self.service.put(_spec(request), durability=_durability(request.durability), timeout=t)
            return pb.PutResponse(version=res.version, event_id=res.event_id)

        return await self._ok("Put", request, context, run)

    async def BatchPut(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(t: float) -> Any:
            grant = self._grant(context)
            grant.require_writer()
            for p in request.puts:  # every one before any: a batch is refused whole
                grant.require(p.record.namespace, write=True)
            specs = [_spec(p) for p in request.puts]
            for i, p in enumerate(request.puts):  # ignored inside a batch, but still a Durability
                _durability(p.durability, f"puts[{i}].durability")
            results = await self.service.batch_put(specs, durability=_durability(request.durability), timeout=t)
            return pb.BatchPutResponse(
                results=[pb.PutResponse(version=r.version, event_id=r.event_id) for r in results]
            )

        return await self._ok("BatchPut", request, context, run)

    async def Delete(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(t: float) -> Any:
            self._grant(context).require(request.namespace, write=True)
            expected = request.expected_version if request.HasField("expected_version") else None
            res = await self.service.delete(
                request.namespace,
                request.key,
                expected_version=expected,
                durability=_durability(request.durability),
                timeout=t,
            )
            return pb.DeleteResponse(version=res.version, event_id=res.event_id)

        return await self._ok("Delete", request, context, run)

    async def List(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(_t: float) -> Any:
            self._grant(context).require(request.namespace)
            records, token = await self.service.list(
                request.namespace,
                kind=request.kind or None,
                key_prefix=request.key_prefix,
                page_size=request.page_size,
                page_token=request.page_token,
                include_deleted=request.include_deleted,
            )
            return pb.ListResponse(records=[to_pb_record(r) for r in records], next_page_token=token)

        return await self._ok("List", request, context, run)

    async def Search(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(_t: float) -> Any:
            hits = await self.service.search(_search_spec(request), visible=_visible(self._grant(context), request))
            return pb.SearchResponse(hits=[pb.SearchHit(record=to_pb_record(r), score=s) for r, s in hits])

        return await self._ok("Search", request, context, run)

    async def ListNamespaces(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async def run(_t: float) -> Any:
            names, token = await self.service.list_namespaces(
                visible=self._grant(context).require_subtree(request.prefix),
                prefix=request.prefix,
                max_depth=request.max_depth,
                page_size=request.page_size,
                page_token=request.page_token,
            )
            return pb.ListNamespacesResponse(namespaces=names, next_page_token=token)

        return await self._ok("ListNamespaces", request, context, run)

    async def _ok(
        self, name: str, request: Any, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[float], Awaitable[R]]
    ) -> R:
        result = await self._call(name, request, context, fn)
        _ok_count(name).inc()
        return result

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        """A stream lives until the client cancels, its deadline, ``watch_idle_seconds`` without an event or
        ``watch_max_lifetime_seconds`` (DEADLINE_EXCEEDED: watch again, after the last sequence seen); it
        holds a stream slot of its connection, never a unary one."""
        status: tuple[grpc.StatusCode, str] | None = None
        try:
            if self.draining:
                self._last_arrival = asyncio.get_running_loop().time()
                raise Unavailable(_WATCH_SHUTTING_DOWN)
            if isinstance(request, _Malformed):
                raise InvalidArgument(f"malformed WatchRequest: {request.error}")
            self._grant(context).require(request.namespace)
            with self.streams.hold(context.peer()):
                after = request.after_sequence if request.HasField("after_sequence") else None
                events = self.service.watch(
                    request.namespace, request.key_prefix, after_sequence=after, progress=request.send_progress
                )
                async for seq, ev in self._bounded(events):
                    yield _watch_event(seq, ev)
        except MFHError as e:
            if isinstance(e, PermissionDenied):
                count_refusal("grpc", e.reason)
            status = grpc_status(e)
        except Exception:
            log.exception("Watch failed")
            status = (grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        API_REQUESTS.labels("grpc", "Watch", status[0].name if status else "OK").inc()
        if status is not None:
            await _abort(context, status)

    async def _bounded(self, events: AsyncIterator[R]) -> AsyncIterator[R]:
        """``events`` until the idle or the lifetime limit passes (then DeadlineExceeded), or the server
        starts shutting down (then Unavailable: watch again on another replica)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + self.watch_lifetime
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while True:
                wait = min(self.watch_idle, end - loop.time())
                try:
                    if wait <= 0:
                        raise TimeoutError
                    async with asyncio.timeout(wait):  # never around the yield: only the wait for an event
                        nxt = asyncio.ensure_future(anext(events))
                        try:
                            await asyncio.wait((nxt, closing), return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if not nxt.done():
                                nxt.cancel()
                                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                                    await nxt
                        if not nxt.done() or nxt.cancelled():
                            raise Unavailable(_WATCH_SHUTTING_DOWN)
                        try:
                            ev = nxt.result()
                        except StopAsyncIteration:
                            return
                except TimeoutError:
                    if loop.time() >= end:
                        raise DeadlineExceeded(
                            f"watch stream reached its maximum lifetime ({self.watch_lifetime:g} s); watch again"
                        ) from None
                    raise DeadlineExceeded(
                        f"watch stream idle for {self.watch_idle:g} s; list again and watch again"
                    ) from None
                yield ev
        finally:
            closing.cancel()
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()


def _stream_slots(settings: Settings) -> PeerSlots:
    s = settings.server
    return PeerSlots("open streams", max_total=s.max_streams, max_per_peer=s.max_streams_per_peer)


class _Health(health_aio.HealthServicer):  # type: ignore[misc]
    """The standard health service; its Watch stream holds a stream slot like ours."""

    def __init__(self, streams: PeerSlots) -> None:
        super().__init__()
        self._streams = streams

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        peer = context.peer()
        reason = self._streams.refusal(peer)
        if reason is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        with self._streams.hold(peer):
            await super().Watch(request, context)


class _Reflection(ReflectionServicer):  # type: ignore[misc]
    """Server reflection; its stream holds a stream slot like ours."""

    def __init__(self, names: Any, streams: PeerSlots) -> None:
        super().__init__(names)
        self._streams = streams

    async def ServerReflectionInfo(
        self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        peer = context.peer()
        reason = self._streams.refusal(peer)
        if reason is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
        with self._streams.hold(peer):
            async for reply in super().ServerReflectionInfo(request_iterator, context):
                yield reply


def _watch_event(seq: int, ev: MemoryEvent | None) -> Any:
    if ev is None:  # a progress event: the position only
        return pb.WatchEvent(sequence=seq)
    return pb.WatchEvent(record=to_pb_record(ev.to_record()), op=ev.op.value, event_id=ev.event_id, sequence=seq)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], status: tuple[grpc.StatusCode, str]) -> NoReturn:
    # The marker tells a client the server itself answered (an UNAVAILABLE from it means nothing was done),
    # as opposed to the transport failing mid-call (mfh_client.retry).
    await context.abort(status[0], status[1], trailing_metadata=((SERVER_ANSWER_METADATA, "1"),))
    raise AssertionError("unreachable: abort raises")


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the ``server`` settings (None: plain text); ConfigError names a file it cannot read."""
    s = settings.server
    if s.tls_cert_file is None or s.tls_key_file is None:
        return None
    cert, key = read_file(s.tls_cert_file, "tls_cert_file"), read_file(s.tls_key_file, "tls_key_file")
    client_ca = read_file(s.tls_client_ca_file, "tls_client_ca_file") if s.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _security_mode(settings: Settings) -> str:
    s = settings.server
    if s.tls_client_ca_file:
        return "TLS, client certificates required"
    return "TLS" if s.tls else "plain text"


class GrpcServer:
    """The api's gRPC listener; ``port`` is the bound port (settings may say 0 for an ephemeral one)."""

    def __init__(self, service: MemoryService, settings: Settings, *, keys: KeyRing | None = None) -> None:
        self.service = service
        self.settings = settings
        self.keys = keys if keys is not None else KeyRing.from_settings(settings)
        self.streams = _stream_slots(settings)
        self.health = _Health(self.streams)
        self._server: grpc.aio.Server | None = None
        self._port = 0
        self._health_task: asyncio.Task[None] | None = None
        self.servicer: MemoryFusionServicer | None = None

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> int:
        s = self.settings.server
        options = [
            ("grpc.max_send_message_length", s.max_message_bytes),
            ("grpc.max_receive_message_length", s.max_message_bytes),
            # Never share a port: with SO_REUSEPORT another host's api could bind beside this one and answer
            # its clients. Replicas of one host get their own ports (mfh_api.app.check_ports_free).
            ("grpc.so_reuseport", 0),
        ]
        auth = self.keys
        # An interceptor costs every call a few coroutine hops: the key check is one only when there is a
        # key to check. The guard covers every handler (health and reflection too: no UNKNOWN, no INTERNAL
        # to input); it wraps them as they are registered, or innermost when interceptors run anyway.
        interceptors: list[Any] = [_Gate(auth), Guard()] if auth.required else []
        server = grpc.aio.server(
            interceptors=interceptors,
            options=options,
            # A backstop only (it counts streams too: PITFALLS); the caps that matter are our own.
            maximum_concurrent_rpcs=s.max_concurrent_rpcs + s.max_streams + _SPARE_RPCS,
        )
        self.servicer = MemoryFusionServicer(self.service, self.settings, streams=self.streams, keys=self.keys)
        handlers = _method_handlers(self.servicer)
        target: Any = server if interceptors else GuardedRegistrar(server)
        target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        target.add_registered_method_handlers(SERVICE_NAME, handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, target)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(_Reflection(names, self.streams), target)
        host = f"[{s.bind}]" if ":" in s.bind else s.bind
        try:
            address = f"{host}:{s.grpc_port}"
            credentials = server_credentials(self.settings)
            if credentials is None:
                self._port = server.add_insecure_port(address)
            else:
                self._port = server.add_secure_port(address, credentials)
        except RuntimeError as e:
            raise OSError(f"cannot bind gRPC to {host}:{s.grpc_port}: {e}") from e
        if self._port == 0:  # older grpcio reports a failed bind this way
            raise OSError(f"cannot bind gRPC to {host}:{s.grpc_port}: address in use or unavailable")
        await server.start()
        self._server = server
        await self._update_health()
        self._health_task = asyncio.create_task(self._health_loop(), name="mfh-grpc-health")
        log.info("gRPC listening on %s:%d (%s)", s.bind, self._port, _security_mode(self.settings))
        return self._port

    async def _update_health(self) -> None:
        h = await self.service.health()
        serving = h.get("redis", False) or h.get("sql", False)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(2.0)
            try:
                await self._update_health()
            except Exception:
                log.exception("health update failed")

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, answer new calls UNAVAILABLE ("shutting down": clients fail over), let running
        ones finish for up to ``grace`` seconds, then close. No call is left to be CANCELLED by the close."""
        if self._health_task is not None:
            self._health_task.cancel()
        await self.health.enter_graceful_shutdown()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.servicer is not None:
            await self.servicer.drain(grace)
        if self._server is not None:
            await self._server.stop(max(deadline - loop.time(), 0.2))
