"""What the hub's ZeroMQ doors (``mfh api`` and ``mfh front``) share: the bound ROUTER socket (bounds, CURVE),
the envelope of a request, and who a request counts against (its peer)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from mfh_core.metrics import ZMQ_REPLIES_DELAYED, ZMQ_REPLIES_DROPPED
from mfh_models import ConfigError

log = logging.getLogger("mfh.api.zmq")

__all__ = [
    "FRONT_ROUTING_PREFIX",
    "ReplyOutbox",
    "door_mode",
    "load_curve_keys",
    "open_router",
    "peer_of",
    "receive_loop",
    "split_envelope",
]


async def receive_loop(
    sock: zmq.asyncio.Socket, admit: Callable[[list[bytes]], Awaitable[None]], *, what: str, log: logging.Logger
) -> None:
    """Receive messages and ``admit`` each, until the socket is closed; a message that ``admit`` fails on
    is logged by its error's type only (nothing a peer sent reaches the log) and never stops the loop."""
    while True:
        try:
            frames = await sock.recv_multipart()
        except zmq.ZMQError as e:
            if e.errno in (zmq.ETERM, zmq.ENOTSOCK):
                return
            log.warning("%s: receive failed: %s", what, e)
            continue
        try:
            await admit(frames)
        except Exception as e:
            log.error("%s: message not handled (%s)", what, type(e).__name__)
        # PITFALLS: awaiting a completed pyzmq future does not yield, so a flooding peer would
        # hold the event loop (other peers, gRPC, timers) for as long as its messages keep coming.
        await asyncio.sleep(0)


def split_envelope(frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """(envelope, body frames): REQ peers add an empty delimiter after the identity, DEALER peers may not."""
    for i in range(1, len(frames)):
        if frames[i] == b"":
            return frames[: i + 1], frames[i + 1 :]
    return frames[:1], frames[1:]


def door_mode(curve_secret_file: str | None, curve_clients_dir: str | None) -> str:
    """How a ZeroMQ door authenticates, for its start-up log line."""
    if curve_secret_file is None:
        return "plain text"
    return "CURVE, listed clients only" if curve_clients_dir else "CURVE"


def open_router(
    ctx: zmq.asyncio.Context,
    *,
    bind: str,
    port: int,
    max_message_bytes: int,
    queue_messages: int,
    curve_secret_file: str | None = None,
    curve_clients_dir: str | None = None,
) -> tuple[zmq.asyncio.Socket, AsyncioAuthenticator | None, int]:
    """A bound ROUTER socket as the hub's ZeroMQ doors have it (``mfh api`` and ``mfh front``): message size
    and per-peer queues bounded, CURVE with a ZAP handler when configured; with its authenticator (None
    without CURVE) and the bound port. OSError when the address cannot be bound; nothing is left open."""
    sock = ctx.socket(zmq.ROUTER)
    # libzmq drops a bigger message and disconnects its peer; the server keeps serving others.
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    # Per peer, libzmq holds at most this many messages each way (then TCP pushes back on a
    # sender; replies to a peer that does not read are dropped): bounded memory per connection.
    sock.setsockopt(zmq.RCVHWM, queue_messages)
    sock.setsockopt(zmq.SNDHWM, queue_messages)
    sock.setsockopt(zmq.LINGER, 200)
    # A reply that does not fit is refused (EAGAIN), not dropped in silence: it waits in a ReplyOutbox.
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    zap: AsyncioAuthenticator | None = None
    try:
        zap = _secure(ctx, sock, curve_secret_file, curve_clients_dir)
        if ":" in bind:
            sock.setsockopt(zmq.IPV6, 1)
        host = f"[{bind}]" if ":" in bind else bind
        try:
            sock.bind(f"tcp://{host}:{port or '*'}")
        except zmq.ZMQError as e:
            raise OSError(f"cannot bind ZeroMQ to {host}:{port}: {e}") from e
    except BaseException:
        sock.close(linger=0)
        if zap is not None:
            zap.stop()
        raise
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    bound = int(bytes(last).decode().rsplit(":", 1)[1]) if isinstance(last, bytes) else 0
    return sock, zap, bound


def _secure(
    ctx: zmq.asyncio.Context, sock: zmq.asyncio.Socket, secret_file: str | None, clients_dir: str | None
) -> AsyncioAuthenticator | None:
    """CURVE with a ZAP handler (docs/security.md): only peers that know the server's public key (and,
    with ``clients_dir``, hold a listed key) complete the handshake; others never reach us."""
    if secret_file is None:
        return None
    public, secret = load_curve_keys(secret_file)
    if clients_dir is not None and not os.path.isdir(clients_dir):
        raise ConfigError(f"server.zmq_curve_clients_dir: {clients_dir!r} is not a directory")
    zap = AsyncioAuthenticator(ctx, log=logging.getLogger("mfh.api.zmq.zap"))
    zap.start()
    zap.configure_curve(domain="*", location=clients_dir or zmq.auth.CURVE_ALLOW_ANY)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
    return zap


def load_curve_keys(secret_file: str) -> tuple[bytes, bytes]:
    """(public, secret) of the server's CURVE key pair file; ConfigError naming the setting when it cannot."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"server.zmq_curve_secret_file: cannot read {secret_file!r}: {e}") from None
    if secret is None:
        raise ConfigError(f"server.zmq_curve_secret_file: {secret_file!r} holds no secret key (a .key_secret file)")
    return public, secret


#: The routing id prefix of ``mfh front``'s connections to a replica: behind it, the frame after the routing
#: id names the front's own peer, and the per-peer limits count that peer (see :func:`peer_of`).
FRONT_ROUTING_PREFIX: Final = b"mfh-front:"


def peer_of(envelope: list[bytes]) -> bytes:
    """Who the per-peer limits count: the connection, or behind ``mfh front`` the front's peer.

    A peer that names itself a front only splits its own share into several (as opening more
    connections would); the totals (``max_in_flight``, ``max_in_flight_bytes``) bound them all."""
    if len(envelope) >= 3 and envelope[0].startswith(FRONT_ROUTING_PREFIX):
        return envelope[0] + b"\x00" + envelope[1]
    return envelope[0]


#: How long a reply waits in a :class:`ReplyOutbox` for its peer's pipe before it is dropped (seconds).
OUTBOX_PATIENCE_S: Final = 10.0
#: Replies waiting for one peer (a front's connection: :data:`OUTBOX_PER_FRONT`), and their bytes in all.
OUTBOX_PER_PEER: Final = 64
OUTBOX_PER_FRONT: Final = 4096
OUTBOX_BYTES: Final = 64 * 1024 * 1024
#: The flusher's pause between tries while every waiting peer's pipe is full: from the first to the last.
_FLUSH_PAUSES: Final = (0.0005, 0.001, 0.002, 0.005, 0.01)


class ReplyOutbox:
    """The replies of one ROUTER socket that could not be sent at once; sent, in order per peer, as its pipe frees.

    With ``ROUTER_MANDATORY`` libzmq refuses (EAGAIN) a reply to a peer whose pipe holds ``SNDHWM``
    messages: full for real (a peer that does not read, TCP pushing back) or only in the socket's books,
    which count a pipe full until the socket's own thread hears from its I/O thread what was sent (at
    most once a millisecond, and only when both threads get the CPU). A burst of replies to one peer
    (a front carries the requests of all its peers over one connection) met that on a loaded machine,
    and a reply given up on after a few tries left its request unanswered: the front held it for
    minutes. So a refused reply waits here, behind that peer's earlier ones, and one task sends them
    as soon as the pipe takes them, until the peer is gone (EHOSTUNREACH), or a reply has waited
    ``patience_s``. Bounded: ``per_peer`` replies per peer (``per_front`` for a front's connection, whose
    requests the front bounds itself) and ``max_bytes`` in all; beyond them a reply is dropped, counted in
    ``mfh_zmq_replies_dropped_total``, as before. Never blocks the caller.
    """

    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        *,
        door: str,
        patience_s: float = OUTBOX_PATIENCE_S,
        per_peer: int = OUTBOX_PER_PEER,
        per_front: int = OUTBOX_PER_FRONT,
        max_bytes: int = OUTBOX_BYTES,
    ) -> None:
        self._sock = sock
        self.door = door
        self.patience_s = patience_s
        self.per_peer = per_peer
        self.per_front = per_front
        self.max_bytes = max_bytes
        self.bytes = 0
        self._queues: dict[bytes, deque[tuple[float, list[bytes], int]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def waiting(self) -> int:
        """Replies waiting for their peer's pipe."""
        return sum(len(q) for q in self._queues.values())

    async def send(self, frames: list[bytes]) -> bool:
        """Send ``frames`` (routing id first) now, or keep them to send as soon as the pipe takes them;
        False when the reply is dropped (the peer is gone, or the bounds are reached)."""
        peer = frames[0]
        if peer not in self._queues:  # nothing of this peer waits: try now (twice: the books may be behind)
            for attempt in range(2):
                try:
                    await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    if attempt == 0:
                        self._catch_up()
                except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone; nothing to answer
                    log.debug("reply not sent: %s", e)
                    ZMQ_REPLIES_DROPPED.labels(door=self.door, reason="gone").inc()
                    return False
        return self._keep(peer, frames)

    def _catch_up(self) -> None:
        """Let the socket hear from its I/O thread what was sent (``EVENTS``). Through the asyncio socket's own
        ``get``: it then wakes a receive that this reading of ``EVENTS`` would otherwise leave waiting
        (``getsockopt`` is libzmq's, and reading the events consumes the edge the receive waits for)."""
        self._sock.get(zmq.EVENTS)

    def _keep(self, peer: bytes, frames: list[bytes]) -> bool:
        size = sum(len(f) for f in frames)
        queue = self._queues.get(peer)
        cap = self.per_front if peer.startswith(FRONT_ROUTING_PREFIX) else self.per_peer
        if self._closed or (queue is not None and len(queue) >= cap) or self.bytes + size > self.max_bytes:
            ZMQ_REPLIES_DROPPED.labels(door=self.door, reason="full").inc()
            return False
        if queue is None:
            queue = self._queues[peer] = deque()
        queue.append((time.monotonic(), frames, size))
        self.bytes += size
        ZMQ_REPLIES_DELAYED.labels(door=self.door).inc()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._flush(), name=f"mfh-{self.door}-outbox")
        self._wake.set()
        return True

    async def _flush(self) -> None:
        """Send what waits, peer by peer, pausing (a little longer each time, up to 10 ms) while no pipe takes
        anything; sleep when nothing waits."""
        pause = 0
        while not self._closed:
            if not self._queues:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._catch_up()
            sent = self._flush_once(time.monotonic() - self.patience_s)
            if sent:
                pause = 0
                await asyncio.sleep(0)
            else:
                await asyncio.sleep(_FLUSH_PAUSES[pause])
                pause = min(pause + 1, len(_FLUSH_PAUSES) - 1)

    def _flush_once(self, too_old: float) -> int:
        sent = 0
        for peer in list(self._queues):
            queue = self._queues[peer]
            while queue:
                since, frames, size = queue[0]
                if since < too_old:
                    ZMQ_REPLIES_DROPPED.labels(door=self.door, reason="patience").inc()
                else:
                    done = self._sock.send_multipart(frames, flags=zmq.NOBLOCK)  # NOBLOCK: done at once
                    e = done.exception() if isinstance(done, asyncio.Future) and done.done() else None
                    if isinstance(e, zmq.Again):
                        break
                    if e is not None:  # the peer is gone (EHOSTUNREACH): so is everything it waits for
                        log.debug("replies not sent: %s", e)
                        ZMQ_REPLIES_DROPPED.labels(door=self.door, reason="gone").inc(len(queue))
                        self.bytes -= sum(n for _, _, n in queue)
                        queue.clear()
                        break
                    sent += 1
                queue.popleft()
                self.bytes -= size
            if not queue:
                del self._queues[peer]
        return sent

    async def drain(self, timeout_s: float) -> None:
        """Give what waits up to ``timeout_s`` to go (a closing door), then stop; the rest is dropped."""
        deadline = time.monotonic() + timeout_s
        while self._queues and time.monotonic() < deadline:  # noqa: ASYNC110 - the flusher sends; we look
            await asyncio.sleep(0.005)
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        left = self.waiting
        if left:
            ZMQ_REPLIES_DROPPED.labels(door=self.door, reason="closing").inc(left)
        self._queues.clear()
        self.bytes = 0
