"""ZeroMQ ROUTER server: the JSON front door on port 5713, v1 and the legacy v0 schema (docs/api.md).

One ROUTER socket serves REQ and DEALER clients; each admitted request runs as its own asyncio task
and is answered over the ROUTER with the identity envelope it came with. Hostile or greedy peers
(docs/operations.md): the receive loop yields after every message (awaiting a completed pyzmq
future does not); a request beyond ``max_in_flight`` (all peers), ``max_in_flight_per_peer`` (one
ROUTER identity) or ``max_in_flight_bytes`` is shed with RESOURCE_EXHAUSTED without being parsed,
and of one peer's requests held, at most ``max_running_per_peer`` run at once (the others wait, in
order; see ``_admit`` for why a flood must not run 16 at a time),
and, with a key configured, a body that cannot carry the key is refused before it is parsed. libzmq
buffers at most ``queue_messages`` messages per peer each way and drops a message over
``max_message_bytes``. Every request gets exactly one reply, whatever it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from typing import Any, Final

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from mfh_api import legacy_v0
from mfh_api.keys import OPEN, Door, Grant, KeyRing, count_refusal
from mfh_api.limits import PeerSlots
from mfh_api.search import MetadataCondition, SearchSpec
from mfh_api.service import Durability, MemoryService, PutSpec
from mfh_api.zmq_door import ReplyOutbox, door_mode, open_router, peer_of, receive_loop, split_envelope
from mfh_api.zmq_protocol import (
    MAX_ID_CHARS,
    RPC_NAMES,
    SHUTTING_DOWN,
    BatchGetPayload,
    BatchPutPayload,
    DeletePayload,
    GetPayload,
    ListNamespacesPayload,
    ListPayload,
    PingPayload,
    PutPayload,
    SearchPayload,
    WatchPayload,
    decode_json,
    encode,
    encode_records,
    error_reply,
    get_data,
    ok_get_reply,
    ok_reply,
    parse_payload,
    parse_v1,
    peek,
    peek_error,
    plain_get,
    record_to_json,
    record_to_wire,
    request_id,
    watch_event_to_json,
)
from mfh_client.codes import INTERNAL_MESSAGE, zmq_error
from mfh_core.metrics import API_LATENCY, API_REQUESTS
from mfh_models import (
    DeadlineExceeded,
    InvalidArgument,
    MFHError,
    NotFound,
    PermissionDenied,
    Settings,
    Unauthenticated,
    Unavailable,
)

__all__ = ["ZmqServer", "dispatch"]

log = logging.getLogger("mfh.api.zmq")

#: A watch poll answers this long before the request's deadline, so its reply is not late.
_WATCH_MARGIN_S: Final = 0.25


def _spec(p: PutPayload) -> PutSpec:
    return PutSpec(
        namespace=p.namespace,
        key=p.key,
        kind=p.kind,
        payload=p.payload,
        expected_version=p.expected_version,
        ttl_seconds=p.ttl_seconds or None,
    )


def _search_spec(m: SearchPayload) -> SearchSpec:
    f = m.filters
    return SearchSpec(
        namespace=m.namespace,
        namespace_prefix=m.namespace_prefix,
        query=m.query,
        kinds=f.kinds,
        tags=f.tags,
        metadata=[MetadataCondition(c.field, c.op, c.value) for c in f.metadata],
        updated_after_ms=f.updated_after_ms,
        updated_before_ms=f.updated_before_ms,
        embedding=m.embedding,
        top_k=m.top_k,
    )


def _visible(grant: Grant, m: SearchPayload) -> Any:
    """A search's namespace filter for ``grant`` (None: all in its scope are visible); PermissionDenied."""
    if m.namespace or not m.namespace_prefix:  # one namespace (or neither: the service says which to set)
        if m.namespace:
            grant.require(m.namespace)
        return None
    return grant.require_subtree(m.namespace_prefix)


async def dispatch(
    service: MemoryService, action: str, payload: dict[str, Any], budget_s: float, grant: Grant = OPEN
) -> Any:
    """Run one v1 action on the service and return its ``data``; raises MFHError on failure (PermissionDenied,
    before anything runs, when ``grant`` does not cover a namespace the action touches)."""
    m = parse_payload(action, payload)
    if isinstance(m, GetPayload):
        grant.require(m.namespace)
        return {"record": record_to_wire(await service.get(m.namespace, m.key))}
    if isinstance(m, BatchGetPayload):
        grant.require(m.namespace)
        records, missing = await service.batch_get(m.namespace, m.keys)
        return {"records": [record_to_wire(r) for r in records], "missing": missing}
    if isinstance(m, PutPayload):
        grant.require(m.namespace, write=True)
        res = await service.put(_spec(m), durability=Durability(m.durability), timeout=budget_s)
        return {"version": res.version, "event_id": res.event_id}
    if isinstance(m, BatchPutPayload):
        grant.require_writer()
        for p in m.puts:  # every one before any: a batch is refused whole
            grant.require(p.namespace, write=True)
        results = await service.batch_put(
            [_spec(p) for p in m.puts], durability=Durability(m.durability), timeout=budget_s
        )
        return {"results": [{"version": r.version, "event_id": r.event_id} for r in results]}
    if isinstance(m, DeletePayload):
        grant.require(m.namespace, write=True)
        res = await service.delete(
            m.namespace,
            m.key,
            expected_version=m.expected_version,
            durability=Durability(m.durability),
            timeout=budget_s,
        )
        return {"version": res.version, "event_id": res.event_id}
    if isinstance(m, ListPayload):
        grant.require(m.namespace)
        records, token = await service.list(
            m.namespace,
            kind=m.kind,
            key_prefix=m.key_prefix,
            page_size=m.page_size,
            page_token=m.page_token,
            include_deleted=m.include_deleted,
        )
        return {"records": [record_to_wire(r) for r in records], "next_page_token": token}
    if isinstance(m, WatchPayload):
        grant.require(m.namespace)
        # Answer before the request's deadline, with what came: the client polls again after next_sequence.
        wait = max(0.0, min(m.wait_ms / 1000, budget_s - _WATCH_MARGIN_S))
        events, position = await service.watch_poll(
            m.namespace, m.key_prefix, after_sequence=m.after_sequence, max_events=m.max_events, wait_s=wait
        )
        return {"events": [watch_event_to_json(seq, e) for seq, e in events], "next_sequence": position}
    if isinstance(m, SearchPayload):
        hits = await service.search(_search_spec(m), visible=_visible(grant, m))
        return {"hits": [{"record": record_to_json(r), "score": s} for r, s in hits]}
    if isinstance(m, ListNamespacesPayload):
        names, token = await service.list_namespaces(
            visible=grant.require_subtree(m.prefix),
            prefix=m.prefix,
            max_depth=m.max_depth,
            page_size=m.page_size,
            page_token=m.page_token,
        )
        return {"namespaces": names, "next_page_token": token}
    if isinstance(m, PingPayload):
        return {"serving": True}
    raise InvalidArgument(f"unknown action {action!r}")  # unreachable: parse_payload knows every action


#: Actions whose data holds only records (payloads as fragments): encode_records writes them.
_RECORD_ACTIONS: Final = frozenset({"get", "batch_get", "list"})


@functools.cache
def _requests(method: str, code: str) -> Any:
    return API_REQUESTS.labels(transport="zmq", method=method, code=code)  # labels() takes a lock: once each


@functools.cache
def _latency(method: str) -> Any:
    return API_LATENCY.labels(transport="zmq", method=method)


class ZmqServer:
    """The ROUTER socket and its request tasks; ``port`` is the bound port (useful with port 0)."""

    def __init__(
        self,
        service: MemoryService,
        *,
        bind: str = "127.0.0.1",
        port: int = 5713,
        api_key: str | None = None,
        keys: KeyRing | None = None,
        max_message_bytes: int = 1024 * 1024,
        deadline_seconds: float = 5.0,
        max_in_flight: int = 256,
        max_in_flight_per_peer: int = 16,
        max_running_per_peer: int = 4,
        max_in_flight_bytes: int = 16 * 1024 * 1024,
        queue_messages: int = 16,
        curve_secret_file: str | None = None,
        curve_clients_dir: str | None = None,
    ) -> None:
        self.service = service
        self.curve_secret_file = curve_secret_file
        self.curve_clients_dir = curve_clients_dir
        self._zap: AsyncioAuthenticator | None = None
        self.bind = bind
        self.requested_port = port
        self._keys = keys if keys is not None else KeyRing(api_key=api_key)
        self.max_message_bytes = max_message_bytes
        self.deadline_seconds = deadline_seconds
        self._slots = PeerSlots("requests in flight", max_total=max_in_flight, max_per_peer=max_in_flight_per_peer)
        self.max_in_flight_bytes = max_in_flight_bytes
        self.max_running_per_peer = max_running_per_peer
        self._running: dict[bytes, int] = {}  # per peer; a peer with none running has no entry
        # Admitted, not started yet: (envelope, body, when it came); its deadline runs from then.
        self._waiting: dict[bytes, deque[tuple[list[bytes], bytes, float, bool]]] = {}
        self.queue_messages = queue_messages
        self.bytes_in_flight = 0
        self.port = 0
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._outbox: ReplyOutbox | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False

    @property
    def max_in_flight(self) -> int:
        """Requests running at once, all peers together."""
        return self._slots.max_total

    @max_in_flight.setter
    def max_in_flight(self, value: int) -> None:
        self._slots.max_total = value

    @classmethod
    def from_settings(cls, service: MemoryService, settings: Settings, *, keys: KeyRing | None = None) -> ZmqServer:
        """The server of the ``server`` settings section (bind, port, keys, limits)."""
        s = settings.server
        return cls(
            service,
            bind=s.bind,
            port=s.zmq_port,
            keys=keys if keys is not None else KeyRing.from_settings(settings),
            max_message_bytes=s.max_message_bytes,
            deadline_seconds=s.deadline_seconds,
            max_in_flight=s.max_concurrent_rpcs,
            max_in_flight_per_peer=s.max_in_flight_per_peer,
            max_running_per_peer=s.max_running_per_peer,
            max_in_flight_bytes=s.max_in_flight_bytes,
            queue_messages=s.zmq_queue_messages,
            curve_secret_file=s.zmq_curve_secret_file,
            curve_clients_dir=s.zmq_curve_clients_dir,
        )

    @property
    def endpoint(self) -> str:
        """The address clients connect to, e.g. ``tcp://127.0.0.1:5713``."""
        host = f"[{self.bind}]" if ":" in self.bind else self.bind
        return f"tcp://{host}:{self.port}"

    async def start(self) -> int:
        """Bind (port 0 picks a free port) and start serving; returns the bound port."""
        self._ctx = zmq.asyncio.Context()
        try:
            self._sock, self._zap, self.port = open_router(
                self._ctx,
                bind=self.bind,
                port=self.requested_port,
                max_message_bytes=self.max_message_bytes,
                queue_messages=self.queue_messages,
                curve_secret_file=self.curve_secret_file,
                curve_clients_dir=self.curve_clients_dir,
            )
        except BaseException:  # an open socket would keep the context (and the process) from ever ending
            ctx, self._ctx = self._ctx, None
            ctx.term()
            raise
        self._outbox = ReplyOutbox(self._sock, door="api")
        self._loop_task = asyncio.create_task(self._serve(), name="mfh-zmq-router")
        mode = door_mode(self.curve_secret_file, self.curve_clients_dir)
        log.info("ZeroMQ ROUTER listening on %s (%s)", self.endpoint, mode)
        return self.port

    def _stop_zap(self) -> None:
        if self._zap is not None:
            self._zap.stop()
            self._zap = None

    async def close(self, grace: float = 2.0) -> None:
        """Answer new requests UNAVAILABLE ("shutting down": clients fail over), let requests in flight
        answer (up to ``grace`` seconds), then stop receiving and close the socket."""
        self._draining = True
        for peer, queue in list(self._waiting.items()):  # answered at once: UNAVAILABLE, shutting down
            while queue:
                self._start(peer, *queue.popleft())
        running = set(self._tasks)
        if running:
            await asyncio.wait(running, timeout=grace)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._outbox is not None:  # replies still waiting for a slow reader's pipe
            await self._outbox.drain(min(grace, 1.0))
            self._outbox = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._stop_zap()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    async def _serve(self) -> None:
        assert self._sock is not None
        await receive_loop(self._sock, self._admit, what="ZeroMQ", log=log)

    async def _admit(self, frames: list[bytes]) -> None:
        """Start a task for the request, or answer it at once, unparsed, when it may not run."""
        envelope, body = split_envelope(frames)
        peer = peer_of(envelope)
        if len(body) != 1:
            error = {"code": "INVALID_ARGUMENT", "message": "a request is exactly one JSON frame"}
            await self._send(envelope, peek_error(peek(body[-1] if body else b""), error))
            return
        raw = body[0]
        size = len(raw)
        refusal = self._slots.refusal(peer)
        if refusal is None and self.bytes_in_flight + size > self.max_in_flight_bytes:
            refusal = f"too many request bytes in flight ({self.max_in_flight_bytes}); retry shortly"
        if refusal is not None:
            API_REQUESTS.labels(transport="zmq", method="shed", code="RESOURCE_EXHAUSTED").inc()
            await self._send(envelope, peek_error(peek(raw), {"code": "RESOURCE_EXHAUSTED", "message": refusal}))
            return
        denied = self._keys.scan_json(raw)  # a body that cannot hold a key is never parsed
        if denied is not None:
            seen = peek(raw)
            if seen.legacy:
                legacy_v0.count_call({"action": seen.action})  # refused calls too, as in _run
            count_refusal("v0" if seen.legacy else "zmq", "missing" if denied.startswith("missing") else "wrong")
            API_REQUESTS.labels(transport="zmq", method="invalid", code="UNAUTHENTICATED").inc()
            await self._send(envelope, peek_error(seen, {"code": "UNAUTHENTICATED", "message": denied}))
            return
        probed = False
        if not self._draining:
            reply, probed = self._cached_get(raw)
            if reply is not None:  # answered from the near cache: nothing to wait for, no slot held
                await self._send(envelope, reply)
                return
        self._slots.try_acquire(peer)
        self.bytes_in_flight += size
        # Held is not running. Every running request adds its steps to each turn of the event loop
        # that both doors share, and grpc.aio accepts one new call per couple of turns: a peer that
        # kept 16 cheap requests running made every turn long enough to cap gRPC's accept rate
        # under its callers' rate (issue 7: seconds queued inside grpc, not a slot short). So a
        # peer runs a few at a time and the rest of its share waits here, in arrival order, for
        # one of them to end: a burst from a well-behaved peer waits a moment instead of failing.
        if self._running.get(peer, 0) < self.max_running_per_peer:
            self._start(peer, envelope, raw, None, probed)
        else:
            self._waiting.setdefault(peer, deque()).append((envelope, raw, time.monotonic(), probed))

    def _start(
        self, peer: bytes, envelope: list[bytes], raw: bytes, received: float | None, probed: bool = False
    ) -> None:
        self._running[peer] = self._running.get(peer, 0) + 1
        task = asyncio.create_task(self._handle(envelope, raw, received, probed))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._finished, peer, len(raw)))

    def _cached_get(self, raw: bytes) -> tuple[bytes | None, bool]:
        """The reply to a plain v1 ``get`` whose record the near cache holds (None: take the full path), and
        whether the near cache was asked."""
        started = time.perf_counter()
        plain = plain_get(raw)
        if plain is None:
            return None, False
        rid, namespace, key, api_key, _timeout = plain
        if self._keys.required:  # the near cache answers only what the key may read
            grant = self._keys.grant(api_key)
            if grant is None or not grant.can_read(namespace):
                return None, False
        try:
            data = self.service.cached_answer(namespace, key, "zmq", get_data)
        except NotFound:  # a cached absence: the full path answers it, from the cache again
            return None, False
        if data is None:
            return None, True
        _requests("Get", "OK").inc()
        _latency("Get").observe(time.perf_counter() - started)
        return ok_get_reply(rid, data), True

    def _finished(self, peer: bytes, size: int, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release(peer)
        self.bytes_in_flight -= size
        n = self._running.pop(peer) - 1
        if n:
            self._running[peer] = n
        queue = self._waiting.get(peer)
        if queue:
            self._start(peer, *queue.popleft())  # this peer's next, in order
            if not queue:
                del self._waiting[peer]
        if not task.cancelled() and task.exception() is not None:  # retrieved: no asyncio log with its repr
            log.error("ZeroMQ request task failed (%s)", type(task.exception()).__name__)

    async def _send(self, envelope: list[bytes], reply: bytes) -> None:
        if self._outbox is not None:  # sent now, or as soon as the peer's pipe takes it (ReplyOutbox)
            await self._outbox.send([*envelope, reply])

    async def _handle(
        self, envelope: list[bytes], body: bytes, received: float | None = None, probed: bool = False
    ) -> None:
        try:
            reply = await self.answer(body, received, probed=probed)
        except Exception as e:  # answer() does not raise; if it ever did, the request still gets its one reply
            log.error("ZeroMQ request failed outside its handler (%s)", type(e).__name__)
            reply = peek_error(peek(body), {"code": "INTERNAL", "message": INTERNAL_MESSAGE})
        await self._send(envelope, reply)

    def _authenticate(self, obj: dict[str, Any], door: Door) -> Grant:
        """The request's grant; Unauthenticated (counted) for a missing or unknown key."""
        if not self._keys.required:
            return OPEN
        given = obj.get("api_key")
        if given is not None and not isinstance(given, str):
            count_refusal(door, "wrong")
            raise Unauthenticated("wrong api_key")
        return self._keys.authenticate(given, door)

    async def answer(self, body: bytes, received: float | None = None, *, probed: bool = False) -> bytes:
        """The whole request → reply path for one message, transport aside; never raises. ``received``: when
        it arrived, if it waited its turn; ``probed``: the near cache was asked for this (plain v1 get)
        request already and had nothing."""
        started = time.perf_counter()
        call = _Call()
        try:
            data = await self._run(body, call, received, probed)
            code = "OK"
            if type(data) is bytes:  # a v1 get's data, encoded (and kept with its near-cache entry)
                out = ok_get_reply(call.rid, data)
            else:
                reply = legacy_v0.ok_to_v0(call.v0, data) if call.v0 is not None else ok_reply(call.rid, data)
                # Both never raise: an unencodable reply becomes an INTERNAL error reply.
                out = encode_records(reply) if call.method in _RECORD_ACTIONS else encode(reply)
        except Exception as e:
            if isinstance(e, PermissionDenied):
                count_refusal("v0" if call.legacy else "zmq", e.reason)
            elif not isinstance(e, MFHError):
                log.exception("ZeroMQ %s request failed", call.method)
            error = zmq_error(e)
            code = error["code"]
            out = encode(legacy_v0.error_to_v0(call.rid, error) if call.legacy else error_reply(call.rid, error))
        method = RPC_NAMES.get(call.method, "invalid")  # the gRPC names, so dashboards sum both transports
        _requests(method, code).inc()
        _latency(method).observe(time.perf_counter() - started)
        return out

    async def _run(self, body: bytes, call: _Call, received: float | None = None, probed: bool = False) -> Any:
        obj = decode_json(body)
        call.legacy = "v" not in obj
        field = "request_id" if call.legacy else "id"
        call.rid = request_id(obj, field)
        if call.legacy:
            legacy_v0.count_call(obj)  # refused calls too: they still show a legacy agent is out there
        # Before anything else looks at the request: no handler runs unauthenticated.
        grant = self._authenticate(obj, "v0" if call.legacy else "zmq")
        if obj.get(field) is not None and call.rid is None:
            raise InvalidArgument(
                f"{field} must be a string of at most {MAX_ID_CHARS} characters (valid Unicode) or a 64-bit integer"
            )
        if call.legacy:
            call.v0 = legacy_v0.parse_v0(obj)
            call.method, payload, timeout = call.v0.action, call.v0.payload, None
        else:
            req = parse_v1(obj)
            call.method, payload, timeout = req.action, req.payload, req.timeout_s
        if self._draining:
            raise Unavailable(SHUTTING_DOWN)
        budget = min(timeout or self.deadline_seconds, 300.0)
        if received is not None:  # it waited its turn (max_running_per_peer): the deadline ran meanwhile
            budget -= time.monotonic() - received
            if budget <= 0:
                raise DeadlineExceeded("waited its turn past its deadline; nothing was done")
        try:
            async with asyncio.timeout(budget):
                if call.v0 is None and call.method == "get":
                    m = parse_payload("get", payload)
                    assert isinstance(m, GetPayload)
                    grant.require(m.namespace)
                    return await self.service.get_answer(m.namespace, m.key, "zmq", get_data, probed=probed)
                return await dispatch(self.service, call.method, payload, budget, grant)
        except TimeoutError:
            raise DeadlineExceeded(f"no answer within {budget:g} s") from None


class _Call:
    """What is known about a request so far, for its reply and its metric labels."""

    __slots__ = ("legacy", "method", "rid", "v0")

    def __init__(self) -> None:
        self.rid: str | int | None = None
        self.legacy = False
        self.v0: legacy_v0.V0Request | None = None
        self.method = "invalid"
