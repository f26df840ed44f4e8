"""``mfh front``: one ZeroMQ door (``server.zmq_port``, 5713) for several api replicas (docs/operations.md).

Agents that know one address (the legacy v0 agents know ``tcp://host:5713``) reach every replica
of a host through it. The front binds the ROUTER the api's door binds (:func:`open_router`: the
same bounds and CURVE), and forwards each request frame for frame, its body unread, to one live
replica over a DEALER socket of that replica's own; the replica authenticates, validates, sheds
and answers, and the front routes the answer back with the envelope the request came with.

To a replica a request arrives as ``[peer, tag, "", body...]`` from a connection whose routing id
starts with :data:`FRONT_ROUTING_PREFIX`: ``peer`` (the agent at the front) is who the replica's
per-peer limits count, and ``tag`` matches the answer to the request.

Liveness: each replica gets a ``ping`` every ``front.heartbeat_ms``; one that answered nothing for
``front.dead_after_ms``, whose connection dropped (a killed process closes it at once), or whose
ping says it is shutting down leaves the rotation, and comes back when it answers a ping again.
The requests it held are sent to a live replica when a repeat is harmless (reads; unconditional
puts too when its connection is gone, so it can run nothing more: :func:`repeat_kind`), else answered
DEADLINE_EXCEEDED ("it may have run"). With no live
replica a request is answered UNAVAILABLE at once. An agent is sent to one replica while the
rotation stays the same (a hash of its identity), so it reads its own writes from the process
that took them.

Bounds: ``front.max_in_flight`` requests held, ``server.max_in_flight_per_peer`` per peer and
``server.max_in_flight_bytes`` in all; beyond them a request is answered RESOURCE_EXHAUSTED as
the api answers it, from a peek at its first bytes. No log line holds anything a peer sent.

Exactly one answer each, promptly: a request no replica answered by its deadline (its ``timeout_ms``,
else ``server.deadline_seconds``, when the replica itself answers DEADLINE_EXCEEDED) and
:data:`ANSWER_MARGIN_S` is answered DEADLINE_EXCEEDED by the front (a later answer is dropped, "late");
an answer an agent's pipe cannot take at once waits for it in a :class:`~mfh_api.zmq_door.ReplyOutbox`
(as the replicas' answers to the front do on their side) instead of being dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import re
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils.monitor import parse_monitor_message

from mfh_api.limits import PeerSlots
from mfh_api.zmq_door import (
    FRONT_ROUTING_PREFIX,
    ReplyOutbox,
    door_mode,
    load_curve_keys,
    open_router,
    receive_loop,
    split_envelope,
)
from mfh_api.zmq_protocol import SHUTTING_DOWN, peek, peek_error
from mfh_client.retry import CallKind
from mfh_core.metrics import (
    FRONT_FAILOVERS,
    FRONT_HELD,
    FRONT_REPLICA_UP,
    FRONT_REPLICAS_LIVE,
    FRONT_REQUESTS,
    FRONT_SENT,
)
from mfh_models import Settings

__all__ = ["ZmqFront", "repeat_kind"]

log = logging.getLogger("mfh.front")

#: The ``peer`` frame of the front's own pings (never a ROUTER identity: those are not this long).
_HEARTBEAT_PEER: Final = b"mfh-front-heartbeat"
#: A request no replica answered by its deadline (``timeout_ms``, else ``server.deadline_seconds``; a replica
#: answers DEADLINE_EXCEEDED then) and this long after is answered by the front: its answer was lost.
ANSWER_MARGIN_S: Final = 2.0
_MAX_TIMEOUT_S: Final = 300.0  # the api's bound on timeout_ms
#: The envelope's last member, as our clients write it: ``..., "timeout_ms": 5000}`` at the body's end.
_TAIL_TIMEOUT: Final = re.compile(rb',\s*"timeout_ms"\s*:\s*([0-9]{1,9})\s*\}\s*\Z')
#: A body naming timeout_ms elsewhere is parsed for it only up to this size (the front's loop is shared).
_PARSE_BUDGET_BYTES: Final = 4096
_READS_V1: Final = frozenset({"get", "batch_get", "list", "watch", "search", "list_namespaces", "ping"})
_READS_V0: Final = frozenset({"get", "retrieve", "batch_get", "list"})
_WRITES_V0: Final = frozenset({"put", "store"})
_REFUSED_DRAINING: Final = SHUTTING_DOWN.encode()


def _refused_draining(reply: list[bytes]) -> bool:
    """Whether a replica refused the request because it is shutting down (nothing done: any replica may take it)."""
    return (
        len(reply) == 1 and len(reply[0]) < 1024 and b'"status":"error"' in reply[0] and _REFUSED_DRAINING in reply[0]
    )


def _error_code(reply: list[bytes]) -> str:
    """The error code of a (v1) reply, for a log line: nothing else of it."""
    with contextlib.suppress(orjson.JSONDecodeError, IndexError, KeyError, AttributeError, TypeError):
        code = orjson.loads(reply[0])["error"]["code"]
        if isinstance(code, str) and code.isupper() and len(code) < 40:
            return code
    return "an unreadable answer"


def _unconditional(put: Any) -> bool:
    return isinstance(put, dict) and put.get("expected_version") is None


def repeat_kind(body: list[bytes]) -> CallKind:
    """What sending a request again could do (:mod:`mfh_client.retry`): READ and WRITE (an unconditional put)
    may go to another replica; CONDITIONAL (a delete, a write with ``expected_version``) may not.

    Read only for requests whose replica died holding them. A body no replica would accept (not one JSON
    object) changes nothing anywhere: a READ."""
    if len(body) != 1:
        return CallKind.READ
    try:
        obj = orjson.loads(body[0])
    except orjson.JSONDecodeError:
        return CallKind.READ
    if not isinstance(obj, dict):
        return CallKind.READ
    action = obj.get("action")
    if "v" in obj:
        payload = obj.get("payload")
        if action in _READS_V1:
            return CallKind.READ
        if action == "put" and _unconditional(payload):
            return CallKind.WRITE
        if action == "batch_put" and isinstance(payload, dict):
            puts = payload.get("puts")
            if isinstance(puts, list) and all(_unconditional(p) for p in puts):
                return CallKind.WRITE
        return CallKind.READ if action not in ("put", "batch_put", "delete") else CallKind.CONDITIONAL
    if action in _READS_V0:
        return CallKind.READ
    if action in _WRITES_V0:
        return CallKind.WRITE if _unconditional(obj) else CallKind.CONDITIONAL
    return CallKind.READ if action != "delete" else CallKind.CONDITIONAL


@dataclass(slots=True, eq=False)
class _Held:
    """A request sent to a replica and not answered yet."""

    tag: bytes  # what the replica's answer carries back
    envelope: list[bytes]
    body: list[bytes]
    peer: bytes
    size: int
    received: float
    deadline: float  # monotonic: answered by the front if no replica answered by then
    replica: _Replica | None = None
    resends: int = 0


@dataclass(eq=False)
class _Replica:
    endpoint: str
    sock: zmq.asyncio.Socket
    monitor: zmq.asyncio.Socket
    connected: bool = False
    draining: bool = False
    live: bool = False
    ping_refused: bool = False  # its last ping answer was an error, not "shutting down" or "busy" (logged once)
    last_heard: float = float("-inf")
    held: dict[bytes, _Held] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ZmqFront:
    """The front's ROUTER, its replicas' DEALERs and the heartbeat; ``port`` is the bound port (port 0: any)."""

    def __init__(
        self,
        replicas: list[str],
        *,
        bind: str = "127.0.0.1",
        port: int = 5713,
        api_key: str | None = None,
        max_message_bytes: int = 1024 * 1024,
        max_in_flight: int = 1024,
        max_in_flight_per_peer: int = 16,
        max_in_flight_bytes: int = 16 * 1024 * 1024,
        queue_messages: int = 16,
        heartbeat_s: float = 0.2,
        dead_after_s: float = 1.0,
        max_resends: int = 2,
        deadline_s: float = 5.0,
        curve_secret_file: str | None = None,
        curve_clients_dir: str | None = None,
    ) -> None:
        if not replicas:
            raise ValueError("mfh front needs at least one replica (front.replicas, --replica)")
        self.endpoints = list(replicas)
        self.bind = bind
        self.requested_port = port
        self.port = 0
        self.max_message_bytes = max_message_bytes
        self.max_in_flight_bytes = max_in_flight_bytes
        self.queue_messages = queue_messages
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.max_resends = max_resends
        self.deadline_s = deadline_s
        self.curve_secret_file = curve_secret_file
        self.curve_clients_dir = curve_clients_dir
        self._slots = PeerSlots("requests in flight", max_total=max_in_flight, max_per_peer=max_in_flight_per_peer)
        ping: dict[str, Any] = {"v": 1, "id": "front-heartbeat", "action": "ping"}
        if api_key:
            ping["api_key"] = api_key
        self._ping = orjson.dumps(ping)
        self.bytes_in_flight = 0
        self.replicas: list[_Replica] = []
        self._live: list[_Replica] = []
        self._held: dict[bytes, _Held] = {}  # by tag, in arrival order
        self._deadlines: list[tuple[float, bytes]] = []  # (deadline, tag), a heap; tags answered since stay
        self._tags = itertools.count(1)
        self._outbox: ReplyOutbox | None = None
        #: Replicas are judged by their silence since this (monotonic): a front that itself stalled (starved,
        #: stopped) heard nothing meanwhile, through no fault of theirs.
        self._listening_since = float("-inf")
        #: Called when a replica enters or leaves the rotation (the heartbeat says so at once).
        self.on_change: Callable[[], None] | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._zap: AsyncioAuthenticator | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._draining = False
        self._idle: asyncio.Event | None = None  # while closing: set once nothing is held

    @classmethod
    def from_settings(cls, settings: Settings, replicas: list[str] | None = None) -> ZmqFront:
        """The front of the ``server`` (door, bounds) and ``front`` (replicas, heartbeat) settings."""
        s, f = settings.server, settings.front
        return cls(
            replicas if replicas else f.replicas,
            bind=s.bind,
            port=s.zmq_port,
            api_key=s.api_key.get_secret_value() if s.api_key else None,
            max_message_bytes=s.max_message_bytes,
            max_in_flight=f.max_in_flight,
            max_in_flight_per_peer=s.max_in_flight_per_peer,
            max_in_flight_bytes=s.max_in_flight_bytes,
            queue_messages=s.zmq_queue_messages,
            heartbeat_s=f.heartbeat_ms / 1000,
            dead_after_s=f.dead_after_ms / 1000,
            max_resends=f.max_resends,
            deadline_s=s.deadline_seconds,
            curve_secret_file=s.zmq_curve_secret_file,
            curve_clients_dir=s.zmq_curve_clients_dir,
        )

    @property
    def live_endpoints(self) -> list[str]:
        """The replicas in rotation now."""
        return [r.endpoint for r in self._live]

    @property
    def held(self) -> int:
        """Requests sent to a replica and not answered yet."""
        return len(self._held)

    def replica_states(self) -> list[dict[str, Any]]:
        """Each replica as ``mfh status`` shows it: endpoint, live, why not, seconds since it was last heard."""
        now = time.monotonic()
        out = []
        for r in self.replicas:
            why = None if r.live else self._why(r)
            heard = None if r.last_heard == float("-inf") else round(now - r.last_heard, 3)
            out.append({"endpoint": r.endpoint, "live": r.live, "why": why, "heard_s_ago": heard, "held": len(r.held)})
        return out

    async def start(self) -> int:
        """Bind the door, connect to every replica, start the heartbeat; returns the bound port."""
        ctx = self._ctx = zmq.asyncio.Context()
        try:
            self._sock, self._zap, self.port = open_router(
                ctx,
                bind=self.bind,
                port=self.requested_port,
                max_message_bytes=self.max_message_bytes,
                queue_messages=self.queue_messages,
                curve_secret_file=self.curve_secret_file,
                curve_clients_dir=self.curve_clients_dir,
            )
            keys = load_curve_keys(self.curve_secret_file) if self.curve_secret_file else None
            for endpoint in self.endpoints:
                self.replicas.append(self._connect(ctx, endpoint, keys))
        except BaseException:
            await self._close_sockets()
            raise
        self._outbox = ReplyOutbox(self._sock, door="front")
        for r in self.replicas:
            FRONT_REPLICA_UP.labels(replica=r.endpoint).set(0)
            r.tasks = [
                asyncio.create_task(self._replies(r), name="mfh-front-replies"),
                asyncio.create_task(self._watch_connection(r), name="mfh-front-monitor"),
            ]
        FRONT_REPLICAS_LIVE.set(0)
        self._tasks = [
            asyncio.create_task(self._serve(), name="mfh-front-router"),
            asyncio.create_task(self._heartbeat(), name="mfh-front-heartbeat"),
        ]
        log.info(
            "mfh front listening on port %d (%s) for %d replica(s)",
            self.port,
            door_mode(self.curve_secret_file, self.curve_clients_dir),
            len(self.replicas),
        )
        return self.port

    def _connect(self, ctx: zmq.asyncio.Context, endpoint: str, keys: tuple[bytes, bytes] | None) -> _Replica:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, FRONT_ROUTING_PREFIX + secrets.token_hex(8).encode())
        sock.setsockopt(zmq.IMMEDIATE, 1)  # no queue for a replica that is not connected: a send fails at once
        sock.setsockopt(zmq.SNDHWM, self._slots.max_total + 64)  # what the front holds, plus the pings
        sock.setsockopt(zmq.RCVHWM, self._slots.max_total + 64)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:  # replicas of a host share its CURVE key pair: the front shows it as its own
            public, secret = keys
            sock.curve_serverkey = public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECTED
        monitor = sock.get_monitor_socket(events)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            raise OSError(f"cannot connect to replica {endpoint}: {e}") from e
        return _Replica(endpoint=endpoint, sock=sock, monitor=monitor)

    async def close(self, grace: float = 2.0) -> None:
        """Answer new requests UNAVAILABLE, let held ones be answered (up to ``grace`` s), then close."""
        self._draining = True
        if self._held:
            self._idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for held in list(self._held.values()):
            await self._answer(held, "UNAVAILABLE", "mfh front is shutting down; retry (it may have run)")
        for task in [*self._tasks, *(t for r in self.replicas for t in r.tasks)]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._outbox is not None:  # answers still waiting for a slow agent's pipe
            await self._outbox.drain(min(grace, 1.0))
            self._outbox = None
        await self._close_sockets()

    async def _close_sockets(self) -> None:
        for r in self.replicas:
            with contextlib.suppress(zmq.ZMQError):
                r.sock.disable_monitor()
            r.monitor.close(linger=0)
            r.sock.close(linger=0)
        self.replicas = []
        if self._sock is not None:
            self._sock.close(linger=200)
            self._sock = None
        if self._zap is not None:
            self._zap.stop()
            self._zap = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- the door -----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        assert self._sock is not None
        await receive_loop(self._sock, self._admit, what="front", log=log)

    async def _admit(self, frames: list[bytes]) -> None:
        envelope, body = split_envelope(frames)
        peer = envelope[0]
        size = sum(len(f) for f in body)
        first = body[-1] if body else b""  # what the api peeks at too
        if self._draining:
            FRONT_REQUESTS.labels(outcome="unavailable").inc()
            error = {"code": "UNAVAILABLE", "message": "mfh front is shutting down; retry (nothing was done)"}
            await self._reply(envelope, [peek_error(peek(first), error)])
            return
        refusal = self._slots.refusal(peer)
        if refusal is None and self.bytes_in_flight + size > self.max_in_flight_bytes:
            refusal = f"too many request bytes in flight ({self.max_in_flight_bytes}); retry shortly"
        if refusal is not None:
            FRONT_REQUESTS.labels(outcome="shed").inc()
            error = {"code": "RESOURCE_EXHAUSTED", "message": refusal}
            await self._reply(envelope, [peek_error(peek(first), error)])
            return
        tag = next(self._tags).to_bytes(8, "big")
        now = time.monotonic()
        deadline = now + self._budget(body) + ANSWER_MARGIN_S
        held = _Held(tag=tag, envelope=envelope, body=body, peer=peer, size=size, received=now, deadline=deadline)
        if not await self._forward(held):
            FRONT_REQUESTS.labels(outcome="unavailable").inc()
            error = {"code": "UNAVAILABLE", "message": "no api replica is live behind mfh front; retry shortly"}
            await self._reply(envelope, [peek_error(peek(first), error)])
            return
        FRONT_REQUESTS.labels(outcome="forwarded").inc()

    def _pick(self, peer: bytes, exclude: _Replica | None = None) -> list[_Replica]:
        """Live replicas to try, the peer's own first (a hash of its identity over the rotation)."""
        live = [r for r in self._live if r is not exclude]
        if not live:
            return []
        start = zlib.crc32(peer) % len(live)
        return live[start:] + live[:start]

    async def _forward(self, held: _Held, exclude: _Replica | None = None) -> bool:
        """Send ``held`` to a live replica (not ``exclude``) and hold it there; False when none took it."""
        tag = held.tag
        for r in self._pick(held.peer, exclude):
            try:
                await r.sock.send_multipart([held.peer, tag, b"", *held.body], flags=zmq.NOBLOCK)
            except zmq.ZMQError:  # not connected any more, or its queue is full: the next one
                continue
            if tag not in self._held:
                self._slots.try_acquire(held.peer)
                self.bytes_in_flight += held.size
                self._held[tag] = held
                heapq.heappush(self._deadlines, (held.deadline, tag))
                FRONT_HELD.set(len(self._held))
            held.replica = r
            r.held[tag] = held
            FRONT_SENT.labels(replica=r.endpoint).inc()
            return True
        return False

    def _budget(self, body: list[bytes]) -> float:
        """How long a replica may take over a request: its ``timeout_ms`` (the v1 envelope's), else
        ``server.deadline_seconds``; at most 300 s, as the api bounds it.

        The body is not parsed on this path: our clients write ``timeout_ms`` as the envelope's last
        member, where a match anchored at the body's end can only be the top-level one. Only a small body
        naming it elsewhere is parsed; a large one gets the default budget (the api still applies its own).
        """
        if len(body) != 1:
            return min(self.deadline_s, _MAX_TIMEOUT_S)
        data = body[0]
        t: object = None
        tail = _TAIL_TIMEOUT.search(data, max(0, len(data) - 48))
        if tail is not None:
            t = int(tail.group(1))
        elif len(data) <= _PARSE_BUDGET_BYTES and b'"timeout_ms"' in data:
            with contextlib.suppress(orjson.JSONDecodeError):
                obj = orjson.loads(data)
                t = obj.get("timeout_ms") if isinstance(obj, dict) else None
        if type(t) is int and t > 0:
            return min(t / 1000, _MAX_TIMEOUT_S)
        return min(self.deadline_s, _MAX_TIMEOUT_S)

    async def _reply(self, envelope: list[bytes], reply: list[bytes]) -> None:
        if self._outbox is not None:  # sent now, or as soon as the agent's pipe takes it (ReplyOutbox)
            await self._outbox.send([*envelope, *reply])

    def _release(self, tag: bytes) -> _Held | None:
        held = self._held.pop(tag, None)
        if held is None:
            return None
        if held.replica is not None:
            held.replica.held.pop(tag, None)
        self._slots.release(held.peer)
        self.bytes_in_flight -= held.size
        FRONT_HELD.set(len(self._held))
        if not self._held and self._idle is not None:
            self._idle.set()
        return held

    async def _answer(self, held: _Held, code: str, message: str) -> None:
        self._release(held.tag)
        first = held.body[-1] if held.body else b""
        await self._reply(held.envelope, [peek_error(peek(first), {"code": code, "message": message})])

    # -- the replicas -------------------------------------------------------------------------------

    async def _replies(self, r: _Replica) -> None:
        while True:
            try:
                frames = await r.sock.recv_multipart()
            except zmq.ZMQError as e:
                if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                continue
            r.last_heard = time.monotonic()
            if len(frames) < 3 or frames[2] != b"":
                continue  # not an answer to anything we sent
            peer, tag, reply = frames[0], frames[1], frames[3:]
            if peer == _HEARTBEAT_PEER:
                # Only "shutting down" takes it out: a busy replica sheds the ping too (RESOURCE_EXHAUSTED),
                # and under load that emptied the rotation while the replica answered everything it held.
                ok = len(reply) == 1 and b'"status":"ok"' in reply[0]
                r.draining = not ok and _refused_draining(reply)
                refused = not ok and not r.draining and _error_code(reply) != "RESOURCE_EXHAUSTED"
                if refused and not r.ping_refused:  # a wrong front.api_key, say: every request fails there too
                    log.warning("replica %s refused the front's ping: %s", r.endpoint, _error_code(reply))
                r.ping_refused = refused
                self._update(r)
                continue
            held = self._held.get(tag)
            if held is None or held.replica is not r:
                FRONT_REQUESTS.labels(outcome="late").inc()  # answered by another replica after a re-send
                continue
            if _refused_draining(reply):
                r.draining = True
                self._update(r)
                if held.resends < self.max_resends:
                    held.resends += 1
                    r.held.pop(tag, None)
                    if await self._forward(held, exclude=r):
                        FRONT_REQUESTS.labels(outcome="resent").inc()
                        continue
                    r.held[tag] = held
            self._release(tag)
            await self._reply(held.envelope, reply)
            await asyncio.sleep(0)

    async def _watch_connection(self, r: _Replica) -> None:
        while True:
            try:
                event = parse_monitor_message(await r.monitor.recv_multipart())
            except zmq.ZMQError as e:
                if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                    return
                continue
            if event["event"] == zmq.EVENT_DISCONNECTED:
                r.connected = False
                await self._update_and_fail_over(r)
            elif event["event"] in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_CONNECTED):
                r.connected = True
                with contextlib.suppress(zmq.ZMQError):  # a ping at once: back in rotation without waiting a beat
                    await r.sock.send_multipart([_HEARTBEAT_PEER, b"hb", b"", self._ping], flags=zmq.NOBLOCK)

    async def _heartbeat(self) -> None:
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last > self.heartbeat_s + self.dead_after_s / 2:
                # We were not running (starved, stopped): what the replicas said meanwhile is still unread.
                # Each gets a full dead_after_s from now to be heard, as if we had just started listening.
                log.warning("mfh front did not run for %.2f s; replicas are judged from now", now - last)
                self._listening_since = now
            last = now
            for r in self.replicas:
                with contextlib.suppress(zmq.ZMQError):
                    await r.sock.send_multipart([_HEARTBEAT_PEER, b"hb", b"", self._ping], flags=zmq.NOBLOCK)
                await self._update_and_fail_over(r)
            await self._expire()
            await asyncio.sleep(self.heartbeat_s)

    def _update(self, r: _Replica) -> bool:
        """Put ``r`` in or out of the rotation; True when it just left it."""
        fresh = self._fresh(r)
        live = r.connected and fresh and not r.draining
        if live == r.live:
            return False
        r.live = live
        self._live = [x for x in self.replicas if x.live]
        FRONT_REPLICA_UP.labels(replica=r.endpoint).set(1 if live else 0)
        FRONT_REPLICAS_LIVE.set(len(self._live))
        why = self._why(r)
        if live:
            log.info("replica %s is live (%d in rotation)", r.endpoint, len(self._live))
        else:
            FRONT_FAILOVERS.labels(replica=r.endpoint).inc()
            log.warning("replica %s left the rotation: %s (%d in rotation)", r.endpoint, why, len(self._live))
        if self.on_change is not None:
            self.on_change()
        return not live

    @staticmethod
    def _why(r: _Replica) -> str:
        return "shutting down" if r.draining else ("disconnected" if not r.connected else "no answer")

    def _fresh(self, r: _Replica) -> bool:
        """Heard within ``dead_after_s``, counting only time the front was listening."""
        return time.monotonic() - max(r.last_heard, self._listening_since) <= self.dead_after_s

    async def _update_and_fail_over(self, r: _Replica) -> None:
        self._update(r)
        if r.live or not r.held:
            return
        if r.connected and self._fresh(r):
            return  # shutting down, not dead: it answers what it holds
        # Whatever it held gets an answer: from another replica when a repeat is harmless, else from us.
        # A replica whose connection is gone runs nothing more of what we sent it; a silent one (hung,
        # stopped) may run a write when it wakes, after the repeat and any later write: only reads go again.
        gone = not r.connected
        for tag, held in list(r.held.items()):
            r.held.pop(tag, None)
            kind = repeat_kind(held.body)
            again = kind is CallKind.READ or (kind is CallKind.WRITE and gone)
            if again and held.resends < self.max_resends:
                held.resends += 1
                if await self._forward(held, exclude=r):
                    FRONT_REQUESTS.labels(outcome="resent").inc()
                    continue
            FRONT_REQUESTS.labels(outcome="lost").inc()
            if kind is CallKind.READ:
                await self._answer(held, "UNAVAILABLE", "the api replica serving it went away; retry")
            elif kind is CallKind.WRITE and gone:
                await self._answer(
                    held, "UNAVAILABLE", "the api replica serving it went away; retry (a repeat is safe)"
                )
            else:
                await self._answer(
                    held,
                    "DEADLINE_EXCEEDED",
                    "the api replica serving it went away; it may have been applied: read before retrying",
                )

    async def _expire(self) -> None:
        """Answer requests held past their deadline and :data:`ANSWER_MARGIN_S`: their replica is live but its
        answer did not come (lost on the way, or the replica is stuck on it)."""
        now = time.monotonic()
        if now - self._listening_since < self.dead_after_s:
            return  # we just ran again after a stall: the answers that came meanwhile are being read
        if len(self._deadlines) > 2 * len(self._held) + 1024:  # mostly answered ones: keep those still held
            self._deadlines = [(h.deadline, t) for t, h in self._held.items()]
            heapq.heapify(self._deadlines)
        while self._deadlines and self._deadlines[0][0] <= now:
            _, tag = heapq.heappop(self._deadlines)
            held = self._held.get(tag)
            if held is None:
                continue  # answered already
            FRONT_REQUESTS.labels(outcome="expired").inc()
            await self._answer(held, "DEADLINE_EXCEEDED", "no answer from the api replica in time; it may have run")
