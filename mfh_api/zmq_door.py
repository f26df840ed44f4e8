"""What the hub's ZeroMQ doors (``mfh api`` and ``mfh front``) share: the bound ROUTER socket (bounds, CURVE),
the envelope of a request, and who a request counts against (its peer)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Final

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator

from mfh_models import ConfigError

log = logging.getLogger("mfh.api.zmq")

__all__ = [
    "FRONT_ROUTING_PREFIX",
    "door_mode",
    "load_curve_keys",
    "open_router",
    "peer_of",
    "receive_loop",
    "send_reply",
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
    # A reply that does not fit is refused (EAGAIN), not dropped in silence: send_reply tries again.
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


#: Pauses before the tries of a patient :func:`send_reply` after the first (seconds).
_PATIENCE: Final = (0.0, 0.001, 0.005, 0.02)


async def send_reply(sock: zmq.asyncio.Socket, frames: list[bytes], *, patient: bool = True) -> bool:
    """Send one reply on a ROUTER; False when it was not sent (the peer is gone, or does not read).

    libzmq counts a pipe full until the socket's own thread hears that its I/O thread sent what was
    queued, and it listens for that at most once a millisecond: a burst of replies to one peer (a front
    sends one replica the requests of all its peers) found the pipe "full" after ``queue_messages``
    replies and lost the rest. So a refused reply is tried again after the socket caught up
    (``EVENTS`` makes it listen); a patient one (a request's own task) also after short pauses, so
    a peer that does not read costs its own task about 25 ms, never the receive loop."""
    for pause in _PATIENCE if patient else _PATIENCE[:1]:
        try:
            await sock.send_multipart(frames, flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            if pause:
                await asyncio.sleep(pause)
            sock.getsockopt(zmq.EVENTS)
        except zmq.ZMQError as e:  # EHOSTUNREACH: the peer is gone; nothing to answer
            log.debug("reply not sent: %s", e)
            return False
    try:
        await sock.send_multipart(frames, flags=zmq.NOBLOCK)
        return True
    except zmq.ZMQError as e:
        log.debug("reply not sent: %s", e)
        return False
