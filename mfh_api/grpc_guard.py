"""A guard around every gRPC method handler (ours, health, reflection): no input yields UNKNOWN or INTERNAL.

grpc answers UNKNOWN when a request does not parse (the deserializer raises inside grpc) and when
a handler raises anything but an abort. :class:`GuardedRegistrar` rebuilds each handler as it is
registered (:class:`Guard`, a server interceptor, does the same per call for a server built with
interceptors anyway; an interceptor costs every call a few coroutine hops) so that malformed
bytes become a :class:`Malformed` stand-in answered with INVALID_ARGUMENT, and
an unexpected exception is logged by type only (its message may quote a request) and answered
with the generic INTERNAL of :mod:`mfh_client.codes`: a bug of ours, never a verdict on the input
(docs/architecture.md invariant 8).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc

from mfh_client.codes import INTERNAL_MESSAGE, grpc_status
from mfh_models import MFHError

__all__ = ["Guard", "GuardedRegistrar", "Malformed", "guard_handler", "safe_deserializer"]

log = logging.getLogger("mfh.grpc.guard")


_PASS_THROUGH: Final = (grpc.aio.AbortError, grpc.aio.UsageError)


class Malformed:
    """Stands in for a request whose bytes did not parse; the guard answers it with INVALID_ARGUMENT."""

    __slots__ = ("error",)

    def __init__(self, error: str) -> None:
        self.error = error


def safe_deserializer(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """``deserializer`` that returns :class:`Malformed` instead of raising (None stays None: raw bytes)."""
    if deserializer is None or getattr(deserializer, "_mfh_safe", False):
        return deserializer

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as e:  # DecodeError, and whatever a third-party message class raises
            return Malformed(type(e).__name__)

    parse._mfh_safe = True  # type: ignore[attr-defined]
    return parse


async def _refuse(context: Any, method: str, error: BaseException | Malformed) -> None:
    if isinstance(error, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request for {method}: {error.error}")
    if isinstance(error, MFHError):
        code, message = grpc_status(error)
        await context.abort(code, message)
    # Type only: the message of an exception we did not plan for may quote the request.
    log.error("gRPC %s failed with an unexpected %s", method, type(error).__name__)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


async def _checked(requests: AsyncIterator[Any], context: Any, method: str) -> AsyncIterator[Any]:
    async for r in requests:
        if isinstance(r, Malformed):
            await _refuse(context, method, r)
        yield r


def _wrap_unary_request(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Malformed):
                await _refuse(context, method, request)
            try:
                async for r in fn(request, context):
                    yield r
            except _PASS_THROUGH:
                raise
            except Exception as e:
                await _refuse(context, method, e)

        return stream

    async def call(request: Any, context: Any) -> Any:
        if isinstance(request, Malformed):
            await _refuse(context, method, request)
        try:
            result = fn(request, context)
            return await result if inspect.isawaitable(result) else result
        except _PASS_THROUGH:
            raise
        except Exception as e:
            await _refuse(context, method, e)

    return call


def _wrap_stream_request(fn: Callable[..., Any], method: str) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(fn):

        async def stream(requests: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for r in fn(_checked(requests, context, method), context):
                    yield r
            except _PASS_THROUGH:
                raise
            except Exception as e:
                await _refuse(context, method, e)

        return stream

    async def call(requests: Any, context: Any) -> Any:
        try:
            result = fn(_checked(requests, context, method), context)
            return await result if inspect.isawaitable(result) else result
        except _PASS_THROUGH:
            raise
        except Exception as e:
            await _refuse(context, method, e)

    return call


def guard_handler(handler: Any, method: str) -> Any:
    """The same handler with a deserializer that cannot raise and a behaviour that cannot leak UNKNOWN."""
    if handler is None:
        return handler
    des = safe_deserializer(handler.request_deserializer)
    ser = handler.response_serializer
    out: Any
    if handler.request_streaming and handler.response_streaming:
        out = grpc.stream_stream_rpc_method_handler(_wrap_stream_request(handler.stream_stream, method), des, ser)
    elif handler.request_streaming:
        out = grpc.stream_unary_rpc_method_handler(_wrap_stream_request(handler.stream_unary, method), des, ser)
    elif handler.response_streaming:
        out = grpc.unary_stream_rpc_method_handler(_wrap_unary_request(handler.unary_stream, method), des, ser)
    else:
        out = grpc.unary_unary_rpc_method_handler(_wrap_unary_request(handler.unary_unary, method), des, ser)
    return out


class Guard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Install last (innermost): every handler the server finds is guarded before other interceptors see it.

    Handlers are rebuilt once per method and cached; the per-call cost is one interceptor hop.
    """

    def __init__(self) -> None:
        self._cache: dict[int, tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler  # grpc answers UNIMPLEMENTED
        hit = self._cache.get(id(handler))
        if hit is not None and hit[0] is handler:
            return hit[1]  # type: ignore[no-any-return]
        guarded = guard_handler(handler, details.method.rsplit("/", 1)[-1] or details.method)
        if len(self._cache) < 1024:  # registered handlers are a handful of long-lived objects
            self._cache[id(handler)] = (handler, guarded)
        return guarded  # type: ignore[no-any-return]


class _GuardedGeneric(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """A generic handler whose handlers come out guarded (rebuilt once per method, then cached)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._cache: dict[int, tuple[Any, Any]] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        hit = self._cache.get(id(handler))
        if hit is not None and hit[0] is handler:
            return hit[1]
        method = handler_call_details.method
        guarded = guard_handler(handler, method.rsplit("/", 1)[-1] or method)
        if len(self._cache) < 1024:
            self._cache[id(handler)] = (handler, guarded)
        return guarded


class GuardedRegistrar:
    """Stands in for a grpc.aio server where handlers are added (``add_*Servicer_to_server(servicer, this)``),
    guarding every handler on the way in: the server then needs no interceptor for the guarantee."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(tuple(_GuardedGeneric(h) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        guarded = {name: guard_handler(h, name) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, guarded)  # type: ignore[attr-defined]
