"""JetStream plumbing under the event bus: error translation, the PubAck multiplexer, the pull feed.

Kept apart from :mod:`mfh_core.eventbus` (the bus's public surface) and
:mod:`mfh_core.subscription` (durable consumers) so each stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Final

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mfh_models import InvalidArgument, Unavailable

if TYPE_CHECKING:
    from mfh_core.eventbus import EventBus

log = logging.getLogger("mfh.eventbus")

MSG_ID_HEADER: Final = "Nats-Msg-Id"
EXPECTED_STREAM_HEADER: Final = "Nats-Expected-Stream"
#: Client-side buffer for commands written while reconnecting (PITFALLS: set one deliberately).
PENDING_BUFFER_BYTES: Final = 8 * 1024 * 1024
RECONNECT_WAIT_S: Final = 0.5
#: Seconds between client PINGs; two missed PONGs mark a silently dead server.
PING_INTERVAL_S: Final = 10
JS_API_TIMEOUT_S: Final = 5.0
#: A pull request lives this long on the server; heartbeats show it is still there.
PULL_EXPIRES_S: Final = 10.0
PULL_HEARTBEAT_S: Final = 1.0

FIRST: Final = asyncio.FIRST_COMPLETED

NATS_ERRORS: Final = (nats.errors.Error, OSError, asyncio.TimeoutError)


def translate_error(e: BaseException, what: str) -> Exception:
    """NATS errors as hub errors: a rejected request is the caller's fault, anything else is 'unavailable'."""
    if isinstance(e, nats.js.errors.BadRequestError):
        return InvalidArgument(f"{what}: {e.description or e}")
    if isinstance(e, ValueError):
        return InvalidArgument(f"{what}: {e}")
    return Unavailable(f"{what}: {type(e).__name__}: {e}")


def msg_status(msg: Msg) -> str | None:
    return msg.headers.get("Status") if msg.headers else None


def msg_description(msg: Msg) -> str:
    return (msg.headers or {}).get("Description", "")


def ack_error(msg: Msg) -> str | None:
    """None when ``msg`` is a PubAck (a duplicate one too), else why the publish failed."""
    status = msg_status(msg)
    if status:
        return f"status {status} {msg_description(msg)}".strip() if status != "503" else "no stream answered (503)"
    try:
        resp = json.loads(msg.data)
    except ValueError:
        return "unreadable PubAck"
    if not isinstance(resp, dict):
        return "unreadable PubAck"
    if "error" in resp:
        err = resp["error"]
        return str(err.get("description", err)) if isinstance(err, dict) else str(err)
    return None if "seq" in resp else "PubAck without a sequence"


class AckMux:
    """PubAcks to futures through one wildcard inbox: no task or timer per message, unlike ``js.publish``.

    Not nats-py's ``publish_async``: in 2.16 an error reply leaves its future pending forever."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._futures: dict[str, asyncio.Future[str | None]] = {}
        self._tokens = itertools.count(1)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)

    async def send(
        self, subject: str, payload: bytes, headers: dict[str, str]
    ) -> tuple[str, asyncio.Future[str | None]]:
        token = str(next(self._tokens))
        fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._futures[token] = fut
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._futures.pop(token, None)
            raise
        return token, fut

    def forget(self, token: str) -> None:
        fut = self._futures.pop(token, None)
        if fut is not None and not fut.done():
            fut.cancel()

    async def _on_reply(self, msg: Msg) -> None:
        fut = self._futures.pop(msg.subject[len(self._prefix) :], None)
        if fut is not None and not fut.done():
            fut.set_result(ack_error(msg))


class ConsumerGone(Exception):
    """The consumer (or its stream) no longer answers pull requests: it must be created again."""


class PullFeed:
    """One pull consumer's messages; the open pull request is re-sent when used up, expired, silent (missed
    heartbeats) or after a reconnect, so a NATS restart, which forgets pull requests, is survived."""

    def __init__(self, bus: EventBus, consumer: str, *, batch: int) -> None:
        self._bus = bus
        self.consumer = consumer
        self._batch = max(1, batch)
        self._queue: asyncio.Queue[Msg] = asyncio.Queue()
        self._sub: Subscription | None = None
        self._inbox = ""
        self._requests = itertools.count(1)
        self._reply = ""  # reply subject of the current pull request
        self._outstanding = 0  # messages the current request may still deliver
        self._expires_at = 0.0
        self._watch_until = 0.0  # no heartbeat or message by then: the request is lost
        self._reconnects = -1

    async def start(self) -> None:
        nc = self._bus._client()
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox + ".*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        # Liveness is judged on arrival, not on consumption, so a slow handler does not cause extra pulls.
        if not msg_status(msg) or msg.subject == self._reply:
            self._watch_until = asyncio.get_running_loop().time() + 3 * PULL_HEARTBEAT_S
        self._queue.put_nowait(msg)

    def restart(self, consumer: str) -> None:
        """Point the feed at another consumer; its first ``next`` sends a fresh pull request."""
        self.consumer = consumer
        self._outstanding = 0

    def buffered(self) -> list[Msg]:
        """Delivered messages nobody has taken yet (to nak on close)."""
        out: list[Msg] = []
        while not self._queue.empty():
            msg = self._queue.get_nowait()
            if not msg_status(msg):
                out.append(msg)
        return out

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self._sub.unsubscribe()
            self._sub = None

    def _needs_pull(self, now: float) -> bool:
        return (
            self._outstanding <= 0
            or now >= self._expires_at
            or now >= self._watch_until
            or self._reconnects != self._bus._reconnects
        )

    async def _pull(self, nc: NATS, now: float) -> None:
        self._reply = f"{self._inbox}.{next(self._requests)}"
        request = {
            "batch": self._batch,
            "expires": int(PULL_EXPIRES_S * 1e9),
            "idle_heartbeat": int(PULL_HEARTBEAT_S * 1e9),
        }
        subject = f"{self._bus._js_prefix}.CONSUMER.MSG.NEXT.{self._bus.stream}.{self.consumer}"
        await nc.publish(subject, json.dumps(request).encode(), reply=self._reply)
        self._outstanding = self._batch
        self._expires_at = now + PULL_EXPIRES_S + 1.0
        self._watch_until = now + 3 * PULL_HEARTBEAT_S
        self._reconnects = self._bus._reconnects

    async def next(self, within_s: float) -> Msg | None:
        """The next delivered message, or None after ``within_s`` seconds; raises ConsumerGone."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s
        while True:
            now = loop.time()
            nc = self._bus._client()
            if nc.is_connected and self._needs_pull(now):
                await self._pull(nc, now)
            if self._queue.empty():
                wait = min(end, self._watch_until, self._expires_at) - now
                if not nc.is_connected:
                    wait = min(end - now, 0.1)
                if now >= end:
                    return None
                try:
                    msg = await asyncio.wait_for(self._queue.get(), timeout=max(wait, 0.001))
                except TimeoutError:
                    continue
            else:
                msg = self._queue.get_nowait()
            status = msg_status(msg)
            if status is None:
                self._outstanding -= 1
                return msg
            if msg.subject != self._reply:
                continue  # about an older pull request
            if status == "100":
                continue  # idle heartbeat: the request is alive
            if status == "503":
                raise ConsumerGone(f"consumer {self.consumer} does not answer (503)")
            description = msg_description(msg)
            if status == "409" and ("Deleted" in description or "push" in description):
                raise ConsumerGone(f"consumer {self.consumer}: {description}")
            if status not in ("404", "408", "409"):
                log.warning("pull request for %s ended with status %s %s", self.consumer, status, description)
            self._outstanding = 0  # request over (expired, no messages, ...): pull again


def all_done(futures: Sequence[asyncio.Future[Any]]) -> asyncio.Future[None]:
    """One future for many, without a task per future (``asyncio.gather`` wraps each one)."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    remaining = len(futures)

    def one(_: asyncio.Future[Any]) -> None:
        nonlocal remaining
        remaining -= 1
        if remaining <= 0 and not done.done():
            done.set_result(None)

    for f in futures:
        f.add_done_callback(one)
    if not futures:
        done.set_result(None)
    return done


def msg_metadata(msg: Msg | None) -> Msg.Metadata | None:
    if msg is None:
        return None
    try:
        return msg.metadata
    except (nats.errors.Error, ValueError, IndexError):
        return None


def redelivery_delay(msg: Msg) -> float:
    try:
        attempts = msg.metadata.num_delivered
    except Exception:
        attempts = 1
    return float(min(30.0, 0.5 * 2 ** min(max(attempts - 1, 0), 6)))


async def quietly(aw: Awaitable[None], what: str) -> None:
    try:
        await aw
    except Exception as e:
        log.debug("%s failed: %s: %s", what, type(e).__name__, e)
